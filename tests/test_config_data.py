import gzip
import struct

import numpy as np
import pytest
import torch

from pipeline.data.datasets import ResumableBatchSampler, build_datasets, load_fashion_mnist, make_loader, read_idx
from pipeline.errors import PipelineError
from pipeline.recipe.config import apply_override, recipe_from_dict
from pipeline.recipe.registry import get_recipe, list_models


def test_registry_has_every_product_model_and_lists_valid_names():
    assert {"resnet18", "resnet34", "resnet50", "convnext_t", "convnext_s", "fmnist_resnet"} <= set(list_models())
    with pytest.raises(PipelineError, match="valid models: .*resnet50"):
        get_recipe("resnet51")


def test_overrides_are_typed_and_checked():
    recipe = get_recipe("fmnist_resnet")
    apply_override(recipe, "masks.lr=0.2")
    apply_override(recipe, "masks.include_classifier=true")
    apply_override(recipe, "masks.exclude=layer1.*,layer2.0.conv1")
    apply_override(recipe, "weights=random")
    assert recipe.masks.lr == 0.2 and recipe.masks.include_classifier is True
    assert recipe.masks.exclude == ["layer1.*", "layer2.0.conv1"] and recipe.weights == "random"
    for bad, message in [
        ("masks.lr=fast", "expected float"),
        ("masks.nope=1", "unknown field"),
        ("nosection.x=1", "unknown section"),
        ("masks", "KEY=VALUE"),
    ]:
        with pytest.raises(PipelineError, match=message):
            apply_override(recipe, bad)
    assert recipe_from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    "text, expected",
    [
        ('["layer1.*"]', ["layer1.*"]),
        ('["layer1.*", "layer2.0.conv1"]', ["layer1.*", "layer2.0.conv1"]),
        (" layer1.* , layer2.0.conv1 ", ["layer1.*", "layer2.0.conv1"]),
        ("[]", []),
        ("", []),
    ],
)
def test_list_overrides_take_a_list_written_either_way(text, expected):
    """A bracketed list on the command line is a list, never one pattern `["layer1.*"]` that matches nothing."""
    recipe = get_recipe("fmnist_resnet")
    apply_override(recipe, f"masks.exclude={text}")
    assert recipe.masks.exclude == expected
    apply_override(recipe, "serve.preferred_batch_sizes=[4, 8]")
    assert recipe.serve.preferred_batch_sizes == [4, 8]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("masks.exclude=['layer1.*']", "double quotes"),
        ('masks.exclude=["layer1.*"', "double quotes"),
        ("masks.exclude=[1]", "expected str"),
        ('serve.preferred_batch_sizes=["x"]', "expected int"),
    ],
)
def test_malformed_list_overrides_are_refused(bad, message):
    with pytest.raises(PipelineError, match=message):
        apply_override(get_recipe("fmnist_resnet"), bad)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fake_fashion_mnist(folder, train=64, test=32):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))


def test_fashion_mnist_reads_idx_files_from_a_given_folder(tmp_path):
    make_fake_fashion_mnist(tmp_path)
    images, labels = load_fashion_mnist(str(tmp_path), "test")
    assert images.shape == (32, 28, 28) and images.dtype == torch.uint8 and labels.shape == (32,)
    recipe = get_recipe("fmnist_resnet")
    recipe.data.root = str(tmp_path)
    bundle = build_datasets(recipe)
    x, y = next(iter(make_loader(bundle.eval, batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)
    assert bundle.accuracy_meaningful


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(PipelineError, match="truncated"):
        read_idx(path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    import pipeline.data.datasets as data

    monkeypatch.setattr(data, "fashion_mnist_candidates", lambda root: [tmp_path / "nothing"])
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(PipelineError, match="apt-get install dataset-fashion-mnist"):
        data.locate_fashion_mnist(str(tmp_path / "empty"))


def test_image_folder_loads_user_images(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    recipe = get_recipe("resnet18")
    recipe.data.root = str(tmp_path)
    recipe.preprocess.resize, recipe.preprocess.crop = 36, 32
    bundle = build_datasets(recipe)
    x, y = next(iter(make_loader(bundle.eval, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    assert len(bundle.train) == 6


def test_synthetic_data_is_marked_meaningless():
    recipe = get_recipe("tiny_resnet")
    bundle = build_datasets(recipe)
    assert not bundle.accuracy_meaningful and "means nothing" in bundle.description


def test_resumable_sampler_shards_and_resumes():
    full = list(ResumableBatchSampler(100, 10, shuffle=True, seed=3))
    sampler = ResumableBatchSampler(100, 10, shuffle=True, seed=3)
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == full[4:]
    ranks = [list(ResumableBatchSampler(100, 10, True, 3, rank, 2)) for rank in (0, 1)]
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 100
