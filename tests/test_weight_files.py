"""Weight files: every wrapped format and prefix users save, and one-line refusals that unpickle nothing."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.recipe.weight_files import fit_to_network, infer_num_classes, read_state_dict, read_weight_file

HINT = "save the weights with torch.save(model.state_dict(), PATH)"
UNPICKLED: list[str] = []  # filled by anything that gets unpickled; must stay empty


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


class RecordingNet(nn.Module):
    """A user's network that notes when it is unpickled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def __setstate__(self, state) -> None:
        UNPICKLED.append("RecordingNet")
        super().__setstate__(state)


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class RecordingObject:
    def __reduce__(self):
        return _record, ("RecordingObject",)


@pytest.fixture(autouse=True)
def nothing_unpickled():
    UNPICKLED.clear()
    yield
    assert UNPICKLED == []


def assert_same(state, expected):
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def with_prefix(state, prefix):
    return {prefix + key: value for key, value in state.items()}


def wrapped_formats(model: nn.Module) -> dict[str, object]:
    state = model.state_dict()
    args = argparse.Namespace(model="small", lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "plain": state,
        "model": {"model": state},
        "state_dict": {"state_dict": state},
        "model_state_dict": {"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
        "model_ema": {"model_ema": state},
        "ema": {"ema": state},
        "state_dict_ema": {"state_dict_ema": state},
        # torchvision references/classification/train.py: args is an argparse.Namespace
        "torchvision_reference": {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": {},
            "epoch": 3,
            "args": args,
        },
        # timm's train.py (CheckpointSaver): arch, args, version, metric
        "timm_train": {
            "epoch": 3,
            "arch": "small",
            "state_dict": state,
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": args,
            "metric": 71.5,
        },
        "ddp": with_prefix(state, "module."),
        "ddp_in_model": {"model": with_prefix(state, "module.")},
        "compile": torch.compile(model).state_dict(),
        "compile_of_ddp": with_prefix(state, "_orig_mod.module."),
        "ddp_of_compile": with_prefix(state, "module._orig_mod."),
        # torchvision's ExponentialMovingAverage is an AveragedModel: module. keys plus an n_averaged counter
        "averaged_model": {"model_ema": torch.optim.swa_utils.AveragedModel(model).state_dict()},
    }


@pytest.mark.parametrize("fmt", list(wrapped_formats(small_net())))
def test_every_wrapped_format_reads_back_the_state_dict(tmp_path, fmt):
    model = small_net()
    path = tmp_path / "weights.pth"
    torch.save(wrapped_formats(model)[fmt], path)
    fitted = fit_to_network(read_state_dict(path), small_net().state_dict())  # the prefix found by matching keys
    assert fitted is not None
    assert_same(fitted.state_dict, model.state_dict())
    small_net().load_state_dict(fitted.state_dict)  # strict: every key and shape fits


def test_legacy_non_zip_format(tmp_path):
    model = small_net()
    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert_same(read_state_dict(path), model.state_dict())


def test_plain_weights_win_over_ema_unless_asked(tmp_path):
    model = small_net()
    ema = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    path = tmp_path / "both.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema}, path)
    plain = read_weight_file(path)
    assert plain.entry == "model" and plain.ignored == ["model_ema"]
    assert_same(plain.state_dict, model.state_dict())
    assert plain.describe(path) == f"file {path} (entry 'model'); also holds 'model_ema', not used"
    chosen = read_weight_file(path, prefer_ema=True)
    assert chosen.entry == "model_ema" and chosen.ignored == ["model"]
    assert_same(chosen.state_dict, ema)


def test_a_model_with_its_own_module_prefix_is_left_alone(tmp_path):
    state = {"module.weight": torch.ones(2), "head.weight": torch.ones(2)}
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    assert list(read_state_dict(path)) == ["module.weight", "head.weight"]
    fitted = fit_to_network(read_state_dict(path), state)
    assert fitted is not None and fitted.prefix == "" and list(fitted.state_dict) == list(state)


@pytest.mark.parametrize("attribute", ["model.", "net.", "backbone.", "module.model.", "_orig_mod.student."])
def test_any_attribute_prefix_is_found_by_matching_the_network(attribute):
    network = small_net().state_dict()
    lightning = with_prefix(network, attribute) | {"criterion.weight": torch.ones(5), "metric.total": torch.ones(1)}
    fitted = fit_to_network(lightning, network)
    assert fitted is not None and fitted.prefix == attribute
    assert_same(fitted.state_dict, network)
    assert fitted.ignored == ["criterion.weight", "metric.total"]
    said = fitted.describe("weights file w.ckpt")
    assert f"prefix {attribute!r} removed" in said and "2 keys not of the network ignored" in said


def test_a_second_copy_of_the_network_is_named_not_used():
    network = small_net().state_dict()
    both = with_prefix(network, "model.") | with_prefix(network, "ema_model.")
    fitted = fit_to_network(both, network)
    assert fitted.prefix == "model." and fitted.copies == ["ema_model."] and fitted.ignored == []


def test_no_prefix_gives_the_whole_network():
    network = small_net().state_dict()
    partial = with_prefix({key: value for key, value in network.items() if not key.startswith("4.")}, "model.")
    assert fit_to_network(partial, network) is None


def test_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = small_net()
    path = tmp_path / "weights.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    assert_same(read_state_dict(path), model.state_dict())


# --------------------------------------------------------------------------- refusals
def refusal(path) -> str:
    with pytest.raises(PipelineError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message
    return message


def test_pickled_module_is_refused_without_unpickling(tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"full_{legacy}.pt"
        torch.save(RecordingNet(), path, _use_new_zipfile_serialization=not legacy)
        assert refusal(path) == (
            f"weights file {path} holds a whole pickled nn.Module (torch.save(model)), which "
            f"cannot be loaded without running its code; {HINT}"
        )


def test_pickled_torchvision_module_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=10), path)
    assert refusal(path) == (
        f"weights file {path} holds a whole pickled nn.Module (torch.save(model)), which "
        f"cannot be loaded without running its code; {HINT}"
    )


def test_pickled_python_objects_are_left_out_without_running_their_code(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model": small_net().state_dict(), "extra": RecordingObject(), "epoch": 3}, path)
    weights = read_weight_file(path)  # the fixture asserts nothing was unpickled: _record never ran
    assert_same(weights.state_dict, small_net().state_dict())
    assert weights.others == ["epoch"] and weights.stand_ins == ["test_weight_files._record"]
    assert "pickled objects left out, none of their code run (test_weight_files._record)" in weights.describe(path)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_is_refused(tmp_path, how):
    model = small_net().eval()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.zeros(1, 3, 8, 8))
    path = tmp_path / f"{how}.pt"
    torch.jit.save(scripted, str(path))
    assert refusal(path) == (
        f"weights file {path} is a TorchScript archive (torch.jit.save), which cannot be loaded "
        f"without running its code; {HINT} before scripting"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty; " + HINT),
        (b"epoch,loss\n1,0.5\n", "is a text file ('epoch,loss'...), not PyTorch weights; " + HINT),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n",
            "is a Git LFS pointer, not the weights (run `git lfs pull`); " + HINT,
        ),
        (bytes(range(7, 250)), "is not a PyTorch file (no zip archive or pickle header); " + HINT),
    ],
)
def test_non_pytorch_files_are_refused(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    assert refusal(path) == f"weights file {path} {message}"


def test_truncated_file_says_corrupt(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(small_net().state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    message = refusal(path)
    assert message.startswith(f"weights file {path} cannot be read (")
    assert message.endswith(f"); it is truncated or corrupt, {HINT}")


@pytest.mark.parametrize(
    "payload, message",
    [
        ([torch.ones(1)], "holds a list, not a state_dict; " + HINT),
        (
            {"epoch": 3, "optimizer": {}},
            "holds a dict ('epoch', 'optimizer') with no state_dict: expected tensors, or one under model, state_dict, "
            "model_state_dict, model_ema, state_dict_ema, ema; " + HINT,
        ),
        (
            {"model": {"fc.weight": torch.ones(1), "step": 3}},
            ": entry 'model' is not a state_dict (non-tensor values at step); " + HINT,
        ),
    ],
)
def test_payloads_without_a_state_dict(tmp_path, payload, message):
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    separator = "" if message.startswith(":") else " "
    assert refusal(path) == f"weights file {path}{separator}{message}"


def test_missing_file(tmp_path):
    assert refusal(tmp_path / "nope.pth") == f"weights file {tmp_path / 'nope.pth'} does not exist; check the path"


# --------------------------------------------------------------------------- head size
def test_infer_num_classes_from_the_head():
    import torchvision

    state = torchvision.models.resnet18(num_classes=10).state_dict()
    assert infer_num_classes(state, "fc") == 10
    assert infer_num_classes(small_net().state_dict(), "4") == 5
    assert infer_num_classes(state, None) is None
    with pytest.raises(PipelineError) as error:
        infer_num_classes(state, "classifier.1")
    assert str(error.value) == (
        "the weights have no 'classifier.1.weight', so the classifier head 'classifier.1' is "
        "not in them; name the head with --classifier (the last layers in the file: "
        "layer4.1.conv1, layer4.1.conv2, fc)"
    )
