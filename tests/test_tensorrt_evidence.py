"""Issue 35, must-show 3: sparse-kernel evidence from today's TensorRT logs and inspector JSON, fused blocks as blocks.

Fixtures (tests/fixtures/tensorrt, README there names the source of each shape):
- builder_log_trt1014_blocks.txt: the 10.14+ "(Sparsity) Found N layer(s) eligible to use sparse tactics: ..." /
  "(Sparsity) Chose M layer(s) using sparse tactics: ..." lines, one pair per fused (Myelin) block, two blocks;
- builder_log_trt1014_counts_only.txt: the same lines with counts and no names;
- inspector_trt11_blocks.json: the 11.x inspector shape ("I/O Tensors", "Format" and "DataType" split), two
  {ForeignNode[...]} blocks whose Metadata names their ONNX nodes.
"""

from __future__ import annotations

import pytest

from pipeline.backends.tensorrt import sparsity
from pipeline.backends.tensorrt.sparsity import (
    OnnxNameMap,
    module_layer_times,
    parse_inspector_json,
    parse_sparsity_log,
    sparse_layer_report,
)
from tests.test_tensorrt_backend import CONV_A, CONV_B, FIXTURES, _onnx, fixture_lines

NEW_FORMAT = getattr(sparsity, "NEW_FORMAT", "TensorRT >= 10.14 lines")  # getattr: the file runs on the base commit


def inspector_io(text):
    return sparsity.inspector_io(text)


BLOCK_A = f"{{ForeignNode[{CONV_A}.../layer1/layer1.0/relu/Relu]}}"
BLOCK_B = f"{{ForeignNode[{CONV_B}.../fc/Gemm]}}"


@pytest.fixture
def names(tmp_path) -> OnnxNameMap:
    return OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx"))


def test_the_10_14_lines_are_parsed_and_every_blocks_pair_is_kept():
    log = parse_sparsity_log(fixture_lines("builder_log_trt1014_blocks.txt"))
    assert log["format"] == NEW_FORMAT
    assert log["blocks"] == [
        {"eligible_count": 1, "eligible": [CONV_A], "picked_count": 1, "picked": [CONV_A]},
        {"eligible_count": 2, "eligible": [CONV_B, "/fc/Gemm"], "picked_count": 1, "picked": [BLOCK_B]},
    ]
    assert log["eligible"] == [CONV_A, CONV_B, "/fc/Gemm"] and log["picked"] == [CONV_A, BLOCK_B]
    assert (log["eligible_count"], log["picked_count"]) == (3, 2)


def test_counts_without_names_say_how_many_and_not_which():
    log = parse_sparsity_log(fixture_lines("builder_log_trt1014_counts_only.txt"))
    assert (log["eligible_count"], log["picked_count"], log["picked"], log["unnamed"]) == (39, 0, [], ["eligible"])
    chose_some = parse_sparsity_log(["[V] (Sparsity) Chose 5 layer(s) using sparse tactics"])
    assert chose_some["picked"] is None and chose_some["picked_count"] == 5
    report = sparse_layer_report(["[V] (Sparsity) Chose 5 layer(s) using sparse tactics"], None, OnnxNameMap())
    assert report["picked_sparse"] is None and "chose 5 layer(s)" in report["notes"][0]


def test_the_11x_inspector_shape_is_read(names):
    text = (FIXTURES / "inspector_trt11_blocks.json").read_text()
    assert inspector_io(text) == ["input", "logits"]
    assert inspector_io((FIXTURES / "inspector_fp16_sparse.json").read_text()) == ["input", "logits"]  # 10.x
    layers = parse_inspector_json(text)
    assert [layer.name for layer in layers] == [BLOCK_A, BLOCK_B]
    assert layers[0].formats == ["Row major linear FP32"] and layers[1].formats == ["Row major linear Half"]
    assert [names.modules_of(layer) for layer in layers] == [["layer1.0.conv1"], ["layer2.0.conv1", "fc"]]


def test_a_fused_blocks_modules_are_never_credited_one_by_one(names):
    """10.14 log + 11.x inspector: block A's node is named by the log (its one module is credited); block B is
    named as a whole, so its two modules are listed inside it and neither is credited."""
    report = sparse_layer_report(
        fixture_lines("builder_log_trt1014_blocks.txt"), (FIXTURES / "inspector_trt11_blocks.json").read_text(), names
    )
    assert report["picked_sparse"] == ["layer1.0.conv1"]
    assert report["sparse_blocks"] == [{"trt_layer": BLOCK_B, "modules": ["layer2.0.conv1", "fc"]}]
    assert report["eligible"] == ["layer1.0.conv1", "layer2.0.conv1", "fc"]
    rows = {row["trt_layer"]: row for row in report["layers"]}
    assert (rows[BLOCK_A]["kind"], rows[BLOCK_A]["picked_sparse"], rows[BLOCK_A]["evidence"]) == (
        "layer",
        True,
        ["builder log names its ONNX node"],
    )
    block = rows[BLOCK_B]
    assert (block["kind"], block["modules"], block["picked_sparse"], block["modules_named_sparse"]) == (
        "block",
        ["layer2.0.conv1", "fc"],
        True,
        [],
    )
    assert block["evidence"] == ["builder log"] and report["raw"]["log_format"] == NEW_FORMAT
    assert any("fused block" in note for note in report["notes"])


def test_a_log_naming_a_node_inside_a_block_credits_that_module_only(names):
    lines = [
        f"[V] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: {CONV_B}, /fc/Gemm",
        f"[V] (Sparsity) Chose 1 layer(s) using sparse tactics: {CONV_B}",
    ]
    report = sparse_layer_report(lines, (FIXTURES / "inspector_trt11_blocks.json").read_text(), names)
    assert report["picked_sparse"] == ["layer2.0.conv1"] and report["sparse_blocks"] == []
    block = next(row for row in report["layers"] if row["trt_layer"] == BLOCK_B)
    assert block["modules_named_sparse"] == ["layer2.0.conv1"] and block["picked_sparse"] is True


def test_a_blocks_time_is_kept_whole_not_split_evenly(names):
    text = (FIXTURES / "inspector_trt11_blocks.json").read_text()
    times = module_layer_times({BLOCK_A: 1.0, BLOCK_B: 3.0}, text, names)
    assert times["modules"] == {"layer1.0.conv1": 1.0}
    assert times["blocks"] == {BLOCK_B: {"ms": 3.0, "modules": ["layer2.0.conv1", "fc"]}}


def test_old_format_lines_with_polygraphys_verbose_prefix_still_parse():
    """Polygraphy logs TensorRT INFO as [V] (polygraphy/backend/trt/util.py maps trt.Logger.INFO to verbose)."""
    assert all(line.startswith(("[V]", "[W]")) for line in fixture_lines("builder_log_trt86.txt"))
    log = parse_sparsity_log(fixture_lines("builder_log_trt86.txt"))
    assert log["format"].startswith("TensorRT < 10.14") and len(log["picked"]) == 1


def test_verify_coverage_counts_block_modules_apart(names):
    """The MAC share that verify reports as running sparse kernels counts only modules credited one by one; a
    picked block's modules are marked as inside it and their share is named apart, not added."""
    import types

    from pipeline.verify.engines import sparse_kernel_coverage

    report = sparse_layer_report(
        fixture_lines("builder_log_trt1014_blocks.txt"), (FIXTURES / "inspector_trt11_blocks.json").read_text(), names
    )
    build = types.SimpleNamespace(
        has_sparse_kernels=True, backend="tensorrt", engines={"sparse": {"sparse_layers": report}}
    )
    layers = [{"name": n, "macs": macs} for n, macs in (("layer1.0.conv1", 50), ("layer2.0.conv1", 40), ("fc", 10))]
    share, note = sparse_kernel_coverage(build, layers, 100)
    assert share == pytest.approx(0.5) and "a further 50.0 % of the MACs is in fused blocks" in note
    assert [layer.get("in_sparse_block") for layer in layers] == [None, BLOCK_B, BLOCK_B]
