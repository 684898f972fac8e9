"""One engine sidecar shape for every backend (issue 33): ONNX Runtime's and TensorRT's sidecars are the same
dataclass (pipeline/backends/sidecar.py), read back typed, each refusing what its backend must fill and lacks;
build.json records the sidecar by name and sha256 instead of a second copy of it."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from pipeline.backends import get_backend
from pipeline.backends.sidecar import EngineSidecar
from pipeline.backends.tensorrt.info import EngineInfo
from pipeline.errors import PipelineError
from pipeline.export.onnx import ModelProtoFromTorch
from pipeline.io import sha256_file
from pipeline.recipe.config import BuildConfig, InputSpec
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory):
    """An ONNX Runtime build's sidecar and a TensorRT sidecar made the way TensorRT's build makes it."""
    folder = tmp_path_factory.mktemp("sidecars")
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(0)
    onnx_path = folder / "dense.onnx"
    onnx.save(
        ModelProtoFromTorch(build_network(recipe).eval(), recipe.input_shape, 18, "input", "logits"), str(onnx_path)
    )
    ort = get_backend("onnxruntime").build(
        onnx_path, folder / "ort", "dense", BuildConfig(), InputSpec.of(recipe), False
    )
    plan = folder / "trt" / "dense.engine"
    plan.parent.mkdir()
    plan.write_bytes(b"serialized engine")
    trt = EngineInfo.for_build(
        BuildConfig(), list(recipe.input_shape), "dense", onnx_path, plan, "10.9.0.34", {"gpu": "g", "compute_capability": "9.0"}, False,
        "input", False, 1.5, {}, "logits",
    )  # fmt: skip
    trt.save(plan)
    return ort, trt, plan


def test_both_backends_write_the_same_shape(sidecars):
    ort, trt, plan = sidecars
    cfg = BuildConfig()
    ort_json = json.loads(ort.engine_path.with_suffix(".json").read_text())
    trt_json = json.loads(plan.with_suffix(".json").read_text())
    assert list(ort_json) == list(trt_json)  # the same keys, in the same order
    assert (ort_json["backend"], trt_json["backend"]) == ("onnxruntime", "tensorrt")
    for data, engine in ((ort_json, ort.engine_path), (trt_json, plan)):
        assert data["engine"] == engine.name and data["engine_sha256"] == sha256_file(engine)
        assert data["batch"] == {"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch}
        assert data["input_shape"] == [-1, *get_recipe("tiny_resnet").input_shape]
    assert trt_json["runtime_version"] == "10.9.0.34" and EngineInfo.load(plan).tensorrt_version == "10.9.0.34"
    assert ort_json["providers"] and trt_json["providers"] == [] and ort_json["gpu"] == ""
    assert EngineSidecar.from_dict(ort_json, "ort") == ort.sidecar and EngineInfo.load(plan) == trt
    # build.json's entry is the sidecar's name and sha256, not a copy of its content
    record = ort.sidecar_record()
    assert record == {"file": "dense.ort.json", "sha256": sha256_file(ort.engine_path.with_suffix(".json"))}


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.pop("compute_capability"), "(backend tensorrt but no compute_capability)"),
        (lambda d: d.pop("engine_sha256"), "(no 'engine_sha256')"),
        (lambda d: d.update(batch={"min": "1"}), "'batch.min' is a string, expected an integer"),
        (lambda d: d.update(strongly_typed="no"), "'strongly_typed' is a string, expected a boolean"),
    ],
)
def test_a_tensorrt_sidecar_is_read_typed(sidecars, tmp_path, change, named):
    _, _, plan = sidecars
    data = json.loads(plan.with_suffix(".json").read_text())
    change(data)
    engine = tmp_path / "dense.engine"
    engine.with_suffix(".json").write_text(json.dumps(data))
    with pytest.raises(PipelineError) as caught:
        EngineInfo.load(engine)
    message = str(caught.value)
    assert "is not a TensorRT engine sidecar" in message and named in message
    assert message.endswith("rebuild the engine with the build stage") and "\n" not in message


def test_an_onnxruntime_sidecar_needs_its_own_fields_only(sidecars):
    ort, _, _ = sidecars
    data = json.loads(ort.engine_path.with_suffix(".json").read_text())
    for name in ("gpu", "compute_capability", "build_log"):  # TensorRT's: not required of ONNX Runtime
        data.pop(name)
    assert EngineSidecar.from_dict(data, "ort").gpu == ""
    data.pop("providers")
    with pytest.raises(PipelineError, match=r"\(backend onnxruntime but no providers\)"):
        EngineSidecar.from_dict(data, "ort")
