"""package stage: Triton repository from ONNX (and from faked plans), configs checked offline."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nm_fixtures import export_tiny_onnx, record_export

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.io import sha256_file
from pipeline.lock import LOCK_NAME
from pipeline.package.model_config import check_model_dir, check_repository, model_config_pb2, parse_config
from pipeline.package.python_models.preprocess import preprocess_image
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network

MODEL = "tiny_resnet"


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    export_tiny_onnx(folder / "dense.onnx", seed=0)
    export_tiny_onnx(folder / "sparse.onnx", seed=1)
    return folder


@pytest.fixture
def out(tmp_path, onnx_pair) -> Path:
    """An artifact root with engines/tiny_resnet/{dense,sparse}.onnx."""
    root = tmp_path / "engines"
    (root / MODEL).mkdir(parents=True)
    for name in ("dense.onnx", "sparse.onnx"):
        shutil.copyfile(onnx_pair / name, root / MODEL / name)
    record_export(root / MODEL)
    return root


def package(out: Path, *extra: str) -> int:
    return main(["package", "--model", MODEL, "--out", str(out), *extra])


def test_onnx_repository_matches_recipe_and_model(out, capsys):
    assert package(out) == 0
    recipe = get_recipe(MODEL)
    repo = out / MODEL / "triton"
    assert sorted(p.name for p in repo.iterdir()) == [
        f"{MODEL}_dense",
        f"{MODEL}_dense_e2e",
        f"{MODEL}_preprocess",
        f"{MODEL}_sparse",
        f"{MODEL}_sparse_e2e",
    ]
    pb2 = model_config_pb2()
    for variant in ("dense", "sparse"):
        model_dir = repo / f"{MODEL}_{variant}"
        config = parse_config(model_dir / "config.pbtxt")
        assert config.name == model_dir.name
        assert config.backend == "onnxruntime" and config.platform == ""
        assert config.max_batch_size == recipe.serve.max_batch_size == 16
        [inp] = config.input
        assert (inp.name, pb2.DataType.Name(inp.data_type), list(inp.dims)) == ("input", "TYPE_FP32", [1, 28, 28])
        [output] = config.output
        assert (output.name, list(output.dims), output.label_filename) == ("logits", [10], "labels.txt")
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.max_queue_delay_microseconds == recipe.serve.max_queue_delay_us
        [group] = config.instance_group
        assert (group.kind, group.count) == (pb2.ModelInstanceGroup.KIND_CPU, recipe.serve.instance_count)
        # the served file is the variant's own ONNX, byte for byte
        assert sha256_file(model_dir / "1" / "model.onnx") == sha256_file(out / MODEL / f"{variant}.onnx")
        assert (model_dir / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(10)]
        spec = json.loads((model_dir / "preprocessing.json").read_text())
        assert (spec["color"], spec["crop"], spec["mean"], spec["std"]) == ("L", 28, [0.5], [0.25])
        assert spec["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28], "layout": "NCHW"}
    assert set(check_repository(repo)) == {
        f"{MODEL}_dense",
        f"{MODEL}_sparse",
        f"{MODEL}_preprocess",
        f"{MODEL}_dense_e2e",
        f"{MODEL}_sparse_e2e",
    }
    assert "no TensorRT plan found" in capsys.readouterr().out


def test_packaged_onnx_runs_on_preprocessed_image(out, tmp_path):
    """The served ONNX takes what the preprocess model produces, at a batch size the config allows."""
    import onnxruntime as ort
    from PIL import Image

    assert package(out) == 0
    model_dir = out / MODEL / "triton" / f"{MODEL}_sparse"
    spec = json.loads((model_dir / "preprocessing.json").read_text())
    image_path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image_path)
    batch = np.stack([preprocess_image(image_path.read_bytes(), spec)] * 4)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run([spec["output"]["name"]], {spec["input"]["name"]: batch})
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("color,size,resize,crop", [("RGB", (50, 37), 32, 24), ("L", (20, 31), 0, 28)])
def test_served_preprocessing_equals_eval_transform(tmp_path, color, size, resize, crop):
    """The preprocess model's code against torchvision's eval transform of pipeline/data.py (image folders)."""
    from PIL import Image

    from pipeline.data.datasets import folder_transforms
    from pipeline.package.serving import preprocessing
    from pipeline.package.tensors import TensorSpec

    recipe = get_recipe(MODEL)
    recipe.preprocess.color, recipe.preprocess.resize, recipe.preprocess.crop = color, resize, crop
    recipe.preprocess.mean, recipe.preprocess.std = (
        ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if color == "RGB" else ([0.3], [0.2])
    )
    recipe.input_shape = [3 if color == "RGB" else 1, crop, crop]
    spec = json.loads(
        json.dumps(
            preprocessing(
                recipe,
                TensorSpec("input", "TYPE_FP32", (-1, 3, crop, crop)),
                TensorSpec("logits", "TYPE_FP32", (-1, 10)),
            )
        )
    )
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    expected = folder_transforms(recipe, train=False)(Image.open(path).convert("RGB")).numpy()
    got = preprocess_image(path.read_bytes(), spec)
    assert got.shape == expected.shape == (recipe.input_shape[0], crop, crop)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_served_preprocessing_of_png_equals_in_memory_dataset():
    """Fashion-MNIST-style datasets normalise uint8 arrays in memory; the PNG of such an image gives the same tensor."""
    from pipeline.data.datasets import SyntheticDataset
    from pipeline.package.serving import preprocessing
    from pipeline.package.tensors import TensorSpec
    from pipeline.serve.serve_check import encode_png

    recipe = get_recipe(MODEL)
    dataset = SyntheticDataset(4, recipe.input_shape, recipe.num_classes, seed=3)
    spec = preprocessing(
        recipe, TensorSpec("input", "TYPE_FP32", (-1, 1, 28, 28)), TensorSpec("logits", "TYPE_FP32", (-1, 10))
    )
    for index in range(4):
        got = preprocess_image(encode_png(dataset.images[index].numpy()), spec)
        np.testing.assert_allclose(got, dataset[index][0].numpy(), atol=1e-5)


def test_ensemble_naming_a_missing_model_is_refused(out):
    assert package(out) == 0
    repo = out / MODEL / "triton_cpu"
    _edit(repo / f"{MODEL}_dense_e2e" / "config.pbtxt", f'model_name: "{MODEL}_dense"', 'model_name: "elsewhere"')
    with pytest.raises(PipelineError, match="step model 'elsewhere' is not in the repository"):
        check_repository(repo)


def test_cpu_flavour_runs_the_onnx_in_python_models(out):
    assert package(out) == 0
    repo = out / MODEL / "triton_cpu"
    for variant in ("dense", "sparse"):
        config = parse_config(repo / f"{MODEL}_{variant}" / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == 16
        assert sha256_file(repo / f"{MODEL}_{variant}" / "1" / "model.onnx") == sha256_file(
            out / MODEL / f"{variant}.onnx"
        )
        assert (repo / f"{MODEL}_{variant}" / "1" / "model.py").read_text().startswith('"""Triton Python-backend model')
    manifest = json.loads((out / MODEL / "manifest.json").read_text())
    assert manifest["triton_cpu"]["format"] == "python"
    assert f"triton_cpu/{MODEL}_preprocess/1/model.py" in {entry["path"] for entry in manifest["files"]}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "old,new,message",
    [
        (
            "dims: [ 1, 28, 28 ]",
            "dims: [ 1, 28, 27 ]",
            r"input 'input' has dims \[1, 28, 27\], model.onnx has \[1, 28, 28\]",
        ),
        ('name: "input"', 'name: "image"', r"input names \['image'\] do not match model.onnx \(\['input'\]\)"),
        ("dims: [ 10 ]", "dims: [ 11 ]", r"output 'logits' has dims \[11\], model.onnx has \[10\]"),
        (
            "data_type: TYPE_FP32\n    format",
            "data_type: TYPE_FP16\n    format",
            r"input 'input' is TYPE_FP16, model.onnx has TYPE_FP32",
        ),
        ("max_batch_size: 16", "max_batch_size: 2", r"preferred_batch_size \[4, 8\] exceeds max_batch_size 2"),
        ('name: "tiny_resnet_sparse"', 'name: "other"', r"name 'other' differs from its folder 'tiny_resnet_sparse'"),
        ("dynamic_batching {", "dynamic_batching {{", r"is not a valid Triton ModelConfig"),
        ("max_batch_size: 16", "max_batch_size: 16\nbogus_field: 1", r"is not a valid Triton ModelConfig"),
    ],
)
def test_broken_config_is_a_clear_error(out, old, new, message):
    assert package(out) == 0
    model_dir = out / MODEL / "triton" / f"{MODEL}_sparse"
    check_model_dir(model_dir)
    _edit(model_dir / "config.pbtxt", old, new)
    with pytest.raises(PipelineError, match=message) as info:
        check_model_dir(model_dir)
    assert "\n" not in str(info.value)


def test_static_batch_onnx_is_refused(out, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_network(get_recipe(MODEL)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 1, 28, 28),),
            str(out / MODEL / "sparse.onnx"),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )
    record_export(out / MODEL)  # as if export had written it: the repository checks must catch it
    assert package(out) == 2
    err = capsys.readouterr().err
    assert "needs a dynamic batch axis" in err and "[1, 1, 28, 28]" in err
    assert (
        not (out / MODEL / "triton").exists()
        and not (out / MODEL / "triton_cpu").exists()
        and not (out / MODEL / "manifest.json").exists()
    )


def test_missing_onnx_names_the_export_stage(out, capsys):
    (out / MODEL / "sparse.onnx").unlink()
    assert package(out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sparse.onnx does not exist" in err and "pipeline export" in err


def test_failed_package_keeps_previous_repository(out, capsys):
    assert package(out) == 0
    config = out / MODEL / "triton" / f"{MODEL}_dense" / "config.pbtxt"
    before = config.read_text()
    manifest = (out / MODEL / "manifest.json").read_text()
    assert package(out, "--set", "labels=a,b") == 2  # 2 labels for 10 classes
    assert "2 labels for 10 classes" in capsys.readouterr().err
    assert config.read_text() == before
    assert (out / MODEL / "manifest.json").read_text() == manifest
    # no staging left behind (the run lock, .lock, stays: it is free once its holder exits)
    assert not [p.name for p in (out / MODEL).iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


def test_recipe_labels_feed_label_file(out):
    labels = [f"kind {i}" for i in range(10)]
    assert package(out, "--set", "labels=" + ",".join(labels)) == 0
    assert (out / MODEL / "triton" / f"{MODEL}_dense" / "labels.txt").read_text().splitlines() == labels


def test_bad_serving_settings_are_refused(out, capsys):
    assert package(out, "--set", "serve.preferred_batch_sizes=4,32") == 2
    assert "serve.preferred_batch_sizes [32] must lie in 1..serve.max_batch_size (16)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- faked TensorRT plans
def write_build_stage_output(out: Path, cc: str | None = "8.9", hardware: str = "none", **batch) -> Path:
    """What the build stage and TensorRT backend write, through their owners: tensorrt/<variant>.engine with its
    EngineInfo sidecar, and build.json (BuildReport). Plans are read only through these."""
    from pipeline.backends.build_report import BuildReport
    from pipeline.backends.tensorrt.info import EngineInfo

    root = out / MODEL
    (root / "tensorrt").mkdir()
    recipe = get_recipe(MODEL)
    for key, value in batch.items():
        setattr(recipe.build, key, value)
    recipe.build.hardware_compatibility = hardware
    engines = {}
    for variant in ("dense", "sparse"):
        engine = root / "tensorrt" / f"{variant}.engine"
        engine.write_bytes(b"serialized " + variant.encode())
        info = EngineInfo.for_build(
            recipe.build,
            recipe.input_shape,
            variant,
            root / f"{variant}.onnx",
            engine,
            "10.9.0.34",
            {"gpu": "NVIDIA L4", "compute_capability": cc},
            sparse=variant == "sparse",
            input_name="input",
            strongly_typed=False,
            build_seconds=1.0,
            sparse_layers={},
            output_name=recipe.export.output_name,
        )
        info.save(engine)
        engines[variant] = {
            "engine": f"tensorrt/{variant}.engine",
            "sha256": sha256_file(engine),
            "onnx": f"{variant}.onnx",
            "onnx_sha256": sha256_file(root / f"{variant}.onnx"),
            "metadata": info.to_dict(),
            "sparse_layers": {},
        }
    BuildReport(MODEL, "tensorrt", "tensorrt", "test", True, "", [1, 8, 16], "", engines).save(root / "build.json")
    return root


def test_build_stage_layout_is_packaged_as_plans(out, capsys):
    root = write_build_stage_output(out)
    (root / "stray.sm80.plan").write_bytes(b"not listed in build.json: never packaged")
    assert package(out) == 0
    assert "TensorRT plans for compute capability 8.9" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["triton"]["format"] == "plan"
    assert manifest["triton"]["models"][f"{MODEL}_dense"]["built_on"] == ["NVIDIA L4"]
    pb2 = model_config_pb2()
    for variant in ("dense", "sparse"):
        model_dir = root / "triton" / f"{MODEL}_{variant}"
        config = check_model_dir(model_dir)
        assert config.platform == "tensorrt_plan" and config.backend == "" and config.default_model_filename == ""
        assert dict(config.cc_model_filenames) == {"8.9": "model.sm89.plan"}
        assert (model_dir / "1" / "model.sm89.plan").read_bytes() == f"serialized {variant}".encode()
        assert [g.kind for g in config.instance_group] == [pb2.ModelInstanceGroup.KIND_GPU]
        assert list(config.input[0].dims) == [1, 28, 28] and list(config.output[0].dims) == [10]
        assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.sm89.plan", "model.sm89.plan.json"]
    # a config edited against the plan's metadata is caught too
    model_dir = root / "triton" / f"{MODEL}_sparse"
    _edit(model_dir / "config.pbtxt", "dims: [ 1, 28, 28 ]", "dims: [ 3, 28, 28 ]")
    with pytest.raises(PipelineError, match=r"input 'input' has dims \[3, 28, 28\], model.sm89.plan has"):
        check_model_dir(model_dir)


def test_ampere_plus_plan_is_served_on_every_ampere_gpu(out):
    """Issue 19, defect 5: Triton picks a plan by compute capability; an ampere_plus plan runs on all of them."""
    from pipeline.package.plans import AMPERE_PLUS_CCS

    root = write_build_stage_output(out, cc="8.6", hardware="ampere_plus")
    assert package(out) == 0
    config = check_model_dir(root / "triton" / f"{MODEL}_sparse")
    assert config.default_model_filename == "model.sm86.plan"
    assert dict(config.cc_model_filenames) == {cc: "model.sm86.plan" for cc in AMPERE_PLUS_CCS}


def test_replaced_engine_is_refused(out, capsys):
    root = write_build_stage_output(out)
    (root / "tensorrt" / "sparse.engine").write_bytes(b"something else")
    assert package(out) == 2
    assert "sparse.engine changed since build wrote it" in capsys.readouterr().err


def test_stray_plans_without_a_tensorrt_build_are_not_packaged(out, capsys):
    (out / MODEL / "sparse.plan").write_bytes(b"a plan no build.json lists")
    assert package(out) == 0
    assert "no TensorRT plan found" in capsys.readouterr().out
    assert parse_config(out / MODEL / "triton" / f"{MODEL}_sparse" / "config.pbtxt").backend == "onnxruntime"
    assert package(out, "--format", "plan") == 2
    assert "no TensorRT plan for dense, sparse" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"cc": None}, r"records no compute capability"),
        ({"max_batch": 8, "opt_batch": 8}, r"serve.max_batch_size 16 exceeds the batch range"),
        ({"min_batch": 4, "opt_batch": 8}, r"accepts batches from 4.*rebuild with build.min_batch=1"),
    ],
)
def test_unusable_plan_metadata_is_a_clear_error(out, capsys, setting, message):
    write_build_stage_output(out, **setting)
    assert package(out) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_tritonclient_is_a_clear_error(out, monkeypatch, capsys):
    import sys

    for name in [name for name in sys.modules if name.split(".")[0] == "tritonclient"]:
        monkeypatch.delitem(sys.modules, name)  # with grpcio installed, tritonclient.grpc may be imported already
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # as if it were not installed
    assert package(out) == 2
    assert "needs the tritonclient package: pip install" in capsys.readouterr().err
    assert not (out / MODEL / "triton").exists() and not (out / MODEL / "triton_cpu").exists()


def test_a_failed_manifest_write_leaves_the_previous_repositories_and_manifest(out, monkeypatch, capsys):
    """issue 33: the repositories are swapped in inside package's transaction, and the previous ones removed only
    once the stage commits, so a manifest write that fails (here: the disk fills up) changes nothing."""
    import errno
    import os

    import pipeline.package.manifest as manifest_module
    from pipeline.io import atomic_path

    assert package(out) == 0
    folder = out / MODEL
    before = {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    seen = {}

    def full_disk(path, obj):
        config = folder / "triton" / f"{MODEL}_dense" / "config.pbtxt"
        seen["new repository in place"] = "max_queue_delay_microseconds: 123" in config.read_text()
        with atomic_path(path) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(manifest_module, "write_json", full_disk)
    assert package(out, "--set", "serve.max_queue_delay_us=123") == 2
    assert "no space left on device" in capsys.readouterr().err
    assert seen == {"new repository in place": True}  # the new repositories had been swapped in when it failed
    after = {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    assert after == {name: digest for name, digest in before.items()} | (
        {LOCK_NAME: after[LOCK_NAME]} if LOCK_NAME in after else {}
    )
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
