"""BatchNorm re-estimation (masks.bn_reestimate_images): running statistics only, recorded by bake."""

import json

import pytest
import torch
from nm_fixtures import cli
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.masks.batchnorm import reestimate_batchnorm, running_statistics_keys

pytestmark = pytest.mark.slow  # bake and export through the CLI


def test_reestimated_statistics_are_the_average_over_the_images_and_weights_stay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    images = torch.randn(64, 1, 8, 8) * 3 + 1
    dataset = TensorDataset(images, torch.zeros(64, dtype=torch.long))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    names = reestimate_batchnorm(model, dataset, images=64, batch_size=64, device=torch.device("cpu"))
    assert names == ["1"] and not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        conv = model[0](images)
    torch.testing.assert_close(model[1].running_mean, conv.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, conv.var((0, 2, 3), unbiased=True))
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    assert changed <= running_statistics_keys(model) and "1.running_mean" in changed


def test_bake_records_reestimation_and_keeps_every_weight(tmp_path):
    out = str(tmp_path)
    cli("train-masks", "--model", "tiny_resnet", "--steps", "3", "--out", out, check=True)
    cli("bake", "--model", "tiny_resnet", "--out", out, check=True)
    folder = tmp_path / "tiny_resnet"
    plain = torch.load(folder / "sparse.pt", weights_only=True)
    assert json.loads((folder / "bake.json").read_text())["batchnorm_reestimated"] is None
    cli("bake", "--model", "tiny_resnet", "--out", out, "--set", "masks.bn_reestimate_images=64", check=True)
    report = json.loads((folder / "bake.json").read_text())
    assert report["batchnorm_reestimated"]["images"] == 64 and report["batchnorm_reestimated"]["layers"]
    assert report["kept_weights_bit_exact"] and report["all_nm_in_tensorrt_layout"]
    reestimated = torch.load(folder / "sparse.pt", weights_only=True)
    changed = {key for key in plain if not torch.equal(plain[key], reestimated[key])}
    assert changed and all(
        key.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for key in changed
    )
    # export folds the re-estimated statistics into the sparse graph's convs; its checks compare it with the
    # dense weights carrying the same statistics, so kept weights stay bit-exact and the export succeeds
    cli("export", "--model", "tiny_resnet", "--out", out, "--set", "masks.bn_reestimate_images=64", check=True)
    export = json.loads((folder / "export.json").read_text())
    layers = [layer for checks in export["layers"].values() for layer in checks]  # per precision
    assert layers and all(layer["ok"] and layer["kept_mismatch"] == 0 for layer in layers)
