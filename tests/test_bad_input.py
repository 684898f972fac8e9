"""Bad input through the real CLI: one `error:` line on stderr, exit 2, no traceback, no partial artifact."""

import shutil

import pytest
import torch
from nm_fixtures import MODEL, assert_one_error_line, cli, dense_weights_file, make_artifacts

from pipeline.cli import main
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network

ARTIFACTS = {
    "dense.onnx",
    "sparse.onnx",
    "dense.fp16.onnx",
    "sparse.fp16.onnx",
    "export.json",
    "build.json",
    "report.json",
    "report.md",
    "masks.ckpt",
    "layers.json",
    "train_masks.json",
    "masks.pt",
    "sparse.pt",
}


def files_in(folder):
    return {path.name for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    weights = dense_weights_file(root)
    make_artifacts(root / "engines", weights)
    common = ["--model", MODEL, "--out", str(root / "engines"), "--weights", str(weights)]
    assert main(["export", *common, "--no-fp16"]) == 0
    assert main(["build", *common, "--backend", "onnxruntime"]) == 0
    return root, weights


def copy_of(built, tmp_path):
    root, weights = built
    shutil.copytree(root / "engines", tmp_path / "engines")
    return tmp_path / "engines", weights


def test_unknown_model(tmp_path):
    result = cli("export", "--model", "resnet51", "--out", str(tmp_path))
    assert_one_error_line(result, "unknown model 'resnet51'", "resnet50")
    assert not files_in(tmp_path)


def test_missing_image_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("train-masks", "--model", MODEL, "--data", str(empty), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, f"{empty}/train does not exist")
    assert not (tmp_path / "out").exists()  # found inside the stage: the folders the run made are removed


@pytest.mark.parametrize("setting", ["masks.stop_patience=0", "masks.validation_images=0"])
def test_bench_masks_without_the_rule_leaves_no_out_folder(tmp_path, capsys, setting):
    out = tmp_path / "new" / "engines"
    assert main(["bench-masks", "--model", MODEL, "--out", str(out), "--set", setting]) == 2
    assert "bench-masks needs the plateau rule and a validation split" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "setting, pattern",
    [
        ("masks.exclude=layer9.*", "layer9.*"),
        ('masks.exclude=["layer1.*", "Layer2*"]', "Layer2*"),
        ("masks.include=layer1.0.conv,layer2.*", "layer1.0.conv"),
    ],
)
@pytest.mark.parametrize("stage", ["layers", "train-masks"])
def test_layer_pattern_that_matches_nothing(tmp_path, stage, setting, pattern):
    """A typo in masks.include/exclude would mask (or keep dense) other layers than meant, without a word."""
    result = cli(stage, "--model", MODEL, "--out", str(tmp_path / "out"), "--set", setting)
    assert_one_error_line(result, f"pattern '{pattern}' matches no Conv2d/Linear layer", "layer1.0.conv1")
    assert not (tmp_path / "out").exists()


def test_missing_fashion_mnist(tmp_path, monkeypatch, capsys):
    import torchvision

    import pipeline.data.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("offline")

    # The Debian package would be found in /usr/share/datasets: point the search elsewhere, and no download.
    monkeypatch.setattr(pipeline.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.chdir(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    code = main(
        [
            "train-masks",
            "--model",
            "fmnist_resnet",
            "--weights",
            "random",
            "--data",
            str(wrong),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: Fashion-MNIST not found")
    assert str(wrong) in err[0] and "--data DIR" in err[0]
    assert not files_in(tmp_path / "out") & ARTIFACTS


def test_corrupt_weights_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 100)
    result = cli("export", "--model", MODEL, "--weights", str(garbage), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, str(garbage), "not a PyTorch file", "torch.save(model.state_dict(), PATH)")
    assert not files_in(tmp_path / "out") & ARTIFACTS


def test_weights_of_another_architecture(tmp_path):
    other = tmp_path / "small_resnet.pth"
    torch.save(build_network(get_recipe("fmnist_resnet")).state_dict(), other)
    result = cli("export", "--model", MODEL, "--weights", str(other), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, "has shape", "same architecture")
    assert not files_in(tmp_path / "out") & ARTIFACTS


@pytest.mark.slow  # a CLI run of 5-12 s: the whole suite keeps it, the fast subset leaves it out
def test_truncated_onnx_for_build(built, tmp_path):
    out, weights = copy_of(built, tmp_path)
    folder = out / MODEL
    (folder / "build.json").unlink()
    shutil.rmtree(folder / "onnxruntime")
    data = (folder / "sparse.onnx").read_bytes()
    (folder / "sparse.onnx").write_bytes(data[: len(data) // 3])
    result = cli("build", "--model", MODEL, "--out", str(out), "--weights", str(weights))
    assert_one_error_line(result, "sparse.onnx changed since export", "re-run")
    # without export.json's hashes nothing vouches for the ONNX files
    (folder / "export.json").unlink()
    result = cli("build", "--model", MODEL, "--out", str(out), "--weights", str(weights))
    assert_one_error_line(result, "export.json does not exist", "pipeline export")
    assert not (folder / "build.json").exists() and not files_in(folder / "onnxruntime")


@pytest.mark.slow  # a CLI run of 5-12 s: the whole suite keeps it, the fast subset leaves it out
def test_truncated_engine_for_verify(built, tmp_path):
    out, weights = copy_of(built, tmp_path)
    folder = out / MODEL
    engine = folder / "onnxruntime" / "dense.ort.onnx"
    engine.write_bytes(engine.read_bytes()[:1000])
    result = cli("verify", "--model", MODEL, "--out", str(out), "--weights", str(weights))
    assert_one_error_line(result, "dense.ort.onnx changed since build")
    assert not (folder / "report.json").exists() and not (folder / "report.md").exists()


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unwritable_output_folder(tmp_path, where):
    if where == "file":
        blocker = tmp_path / "somefile"
        blocker.write_text("x")
        out = blocker / "sub"
    else:
        out = "/proc/sparse-pipeline-test"
    result = cli("layers", "--model", MODEL, "--out", str(out))
    assert_one_error_line(result, "cannot create output folder", "writable --out")
