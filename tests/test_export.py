"""export: dense/sparse ONNX (FP32 and FP16) keep 2:4 in TensorRT layout, equal kept weights, match PyTorch."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from nm_fixtures import MODEL, dense_weights_file, make_artifacts
from onnx import numpy_helper

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.export.onnx import check_sparse_layers, nm_violations_np, onnx_layer_weights, scope_from_torchscript_name
from pipeline.masks.artifact import MaskArtifact
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network

POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    weights = dense_weights_file(root)
    paths = make_artifacts(root / "engines", weights)
    assert main(["export", "--model", MODEL, "--out", str(root / "engines"), "--weights", str(weights)]) == 0
    report = json.loads(paths.export_report.read_text())
    return paths, weights, report


def _initializers(path):
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def test_files_are_valid_onnx_with_named_io_and_dynamic_batch(exported):
    paths, _, report = exported
    for path, elem in [
        (paths.dense_onnx, onnx.TensorProto.FLOAT),
        (paths.sparse_onnx, onnx.TensorProto.FLOAT),
        (paths.dense_onnx_fp16, onnx.TensorProto.FLOAT16),
        (paths.sparse_onnx_fp16, onnx.TensorProto.FLOAT16),
    ]:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        (graph_in,), (graph_out,) = model.graph.input, model.graph.output
        assert (graph_in.name, graph_out.name) == ("input", "logits")
        # I/O stays FP32 for every variant (documented); FP16 lives inside the graph
        assert graph_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert graph_out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert graph_in.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
        conv_weights = [init for init in model.graph.initializer if init.name.endswith("conv1.weight")]
        assert conv_weights and all(init.data_type == elem for init in conv_weights)
        assert report["files"][path.name]["sha256"]
    assert not list(paths.root.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_report_records_per_layer_checks_and_tolerances(exported):
    paths, _, report = exported
    masked = [layer.name for layer in MaskArtifact.load(paths.masks).layers]
    assert len(masked) == 8
    for precision in ("fp32", "fp16"):
        checks = {check["layer"]: check for check in report["layers"][precision]}
        assert set(checks) == set(masked)
        for check in checks.values():
            assert check["ok"] and check["nm_violations"] == 0 and check["kept_mismatch"] == 0
            assert check["pruned_nonzero"] == 0 and check["zero_fraction"] >= 0.5
    for name, info in report["files"].items():
        comparison = info["ort_vs_torch"]
        assert comparison["ok"] and comparison["max_abs_diff"] <= comparison["allowed"]
        assert comparison["precision"] == ("fp16" if ".fp16." in name else "fp32")
    assert report["tolerances"]["fp32"]["atol"] < report["tolerances"]["fp16"]["atol"]


def test_polygraphy_agrees_masked_layers_are_sparse(exported):
    paths, _, report = exported
    masked_inits = {check["initializer"] for check in report["layers"]["fp32"]}

    def sparse_tensors(path):
        run = subprocess.run(
            [str(POLYGRAPHY), "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr
        text = run.stdout + run.stderr
        return (
            set(re.findall(r"Found sparse tensor: (\S+)", text)),
            set(re.findall(r"Found non-sparse tensor: (\S+)", text)),
        )

    sparse, non_sparse = sparse_tensors(paths.sparse_onnx)
    assert masked_inits <= sparse and not masked_inits & non_sparse
    assert "fc.weight" in non_sparse  # the classifier is not masked
    sparse16, _ = sparse_tensors(paths.sparse_onnx_fp16)
    assert masked_inits <= sparse16
    dense_sparse, _ = sparse_tensors(paths.dense_onnx)
    assert not masked_inits & dense_sparse  # random dense weights are not 2:4 by accident


def test_kept_weights_equal_dense_and_batchnorm_was_folded(exported):
    paths, weights, report = exported
    state = torch.load(paths.sparse_weights, weights_only=True)
    for dense_file, sparse_file in [
        (paths.dense_onnx, paths.sparse_onnx),
        (paths.dense_onnx_fp16, paths.sparse_onnx_fp16),
    ]:
        dense, sparse = _initializers(dense_file), _initializers(sparse_file)
        for check in report["layers"]["fp32"]:
            name = check["initializer"]
            kept = state[f"{check['layer']}.weight"].numpy() != 0
            assert np.array_equal(sparse[name][kept], dense[name][kept])
            assert not np.any(sparse[name][~kept])
            assert nm_violations_np(sparse[name], 2, 4) == 0
    # BatchNorm is folded (the graph has none) and the folding rescaled the weights
    graph = onnx.load(str(paths.dense_onnx)).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    original = torch.load(weights, weights_only=True)["layer1.0.conv1.weight"].numpy()
    assert not np.allclose(_initializers(paths.dense_onnx)["layer1.0.conv1.weight"], original)


def test_onnxruntime_matches_pytorch_at_several_batch_sizes(exported):
    paths, weights, _ = exported
    recipe = get_recipe(MODEL)
    model = build_network(recipe)
    model.load_state_dict(torch.load(paths.sparse_weights, weights_only=True))
    model.eval()
    for path, tolerance in [(paths.sparse_onnx, 1e-4), (paths.sparse_onnx_fp16, 2e-2)]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            x = torch.randn(batch, *recipe.input_shape)
            with torch.no_grad():
                expected = model(x).numpy()
            got = session.run(None, {"input": x.numpy()})[0]
            assert got.shape == expected.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=tolerance, rtol=tolerance)


def test_check_catches_a_broken_pattern_and_changed_kept_weight(exported):
    paths, _, report = exported
    dense, sparse = onnx.load(str(paths.dense_onnx)), onnx.load(str(paths.sparse_onnx))
    state = torch.load(paths.sparse_weights, weights_only=True)
    masked = [check["layer"] for check in report["layers"]["fp32"]]
    target = next(init for init in sparse.graph.initializer if init.name == "layer2.0.conv1.weight")
    array = numpy_helper.to_array(target).copy()
    kept = state["layer2.0.conv1.weight"].numpy() != 0
    array[~kept] = 1.0  # every block now holds 4 non-zeros
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    other = next(init for init in sparse.graph.initializer if init.name == "layer3.0.conv2.weight")
    changed = numpy_helper.to_array(other).copy()
    changed[kept_index(state["layer3.0.conv2.weight"].numpy())] += 1.0
    other.CopyFrom(numpy_helper.from_array(changed, other.name))
    results = {r["layer"]: r for r in check_sparse_layers(dense, sparse, masked, state, 2, 4)}
    assert not results["layer2.0.conv1"]["ok"] and results["layer2.0.conv1"]["nm_violations"] > 0
    assert not results["layer3.0.conv2"]["ok"] and results["layer3.0.conv2"]["kept_mismatch"] == 1
    assert results["layer1.0.conv1"]["ok"]


def kept_index(weight):
    return tuple(int(i[0]) for i in np.nonzero(weight))


def test_names_map_back_for_the_torchscript_exporter_too(tmp_path):
    recipe = get_recipe(MODEL)
    model = build_network(recipe).eval()
    path = tmp_path / "ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *recipe.input_shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    found = onnx_layer_weights(onnx.load(str(path)), names)
    assert set(found) == set(names)
    assert found["layer2.0.downsample.0"].array.shape == (16, 8, 1, 1)
    assert found["layer2.0.downsample.0"].mapped_by == "scope"  # TorchScript names initializers onnx::Conv_N
    assert scope_from_torchscript_name("/layer2/layer2.0/downsample/downsample.0/Conv") == "layer2.0.downsample.0"
    assert (
        scope_from_torchscript_name("/features/features.1/features.1.0/block/block.3/MatMul") == "features.1.0.block.3"
    )


def test_export_without_bake_names_the_missing_step(tmp_path):
    with pytest.raises(PipelineError, match="run `python -m pipeline bake"):
        from pipeline.paths import ArtifactPaths
        from pipeline.recipe.registry import get_recipe
        from pipeline.stages import export as stage

        stage.run(get_recipe(MODEL), ArtifactPaths.for_model(tmp_path, MODEL), stage.Options())
    assert not (tmp_path / MODEL / "dense.onnx").exists()


def test_no_fp16_is_recorded_in_config_json_and_writes_no_fp16_graphs(tmp_path):
    """`export --no-fp16` is the override export.fp16=false, applied before config.json is written: the record says
    what the run exported."""
    weights = dense_weights_file(tmp_path)
    paths = make_artifacts(tmp_path / "engines", weights)
    args = ["export", "--model", MODEL, "--out", str(tmp_path / "engines"), "--weights", str(weights)]
    assert main([*args, "--no-fp16"]) == 0
    assert json.loads(paths.config.read_text())["export"]["fp16"] is False
    assert paths.dense_onnx.is_file() and paths.sparse_onnx.is_file()
    assert not paths.dense_onnx_fp16.exists() and not paths.sparse_onnx_fp16.exists()
    assert set(json.loads(paths.export_report.read_text())["files"]) == {paths.dense_onnx.name, paths.sparse_onnx.name}
