"""pipeline/verify/layout.py: each layer's 2:4 layout class, the axis found, MACs, and kept weights vs the dense model."""

import numpy as np
import onnx_fixtures as fx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import PipelineError
from pipeline.verify import layout as L


def _report(model, shape=(1, 8, 8)):
    layers, skipped = L.weighted_layers(model, list(shape))
    return L.layout_report(layers, skipped), layers


def _by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_tensorrt_layout_and_classes_of_the_other_layers():
    report, _ = _report(fx.pruned("tensorrt"))
    layers = _by_name(report)
    assert layers["/conv2/Conv"].layout == L.TENSORRT and layers["/conv2/Conv"].axis == "input channels"
    assert layers["/conv3/Conv"].layout == L.TENSORRT
    assert layers["/conv1/Conv"].layout == L.DENSE and "C = 1 is not a multiple of 4" in layers["/conv1/Conv"].note
    assert layers["/dw/Conv"].layout == L.GROUPED and layers["/dw/Conv"].groups == 8
    assert layers["/fc/Gemm"].layout == L.SMALL  # 32 of 50,208 MACs
    # MACs per image at 8x8: K * C/g * R * S * H * W
    assert layers["/conv2/Conv"].macs == 8 * 8 * 9 * 64 and layers["/dw/Conv"].macs == 8 * 1 * 9 * 64
    assert layers["/fc/Gemm"].macs == 4 * 8
    assert report.accelerable_mac_fraction == pytest.approx((8 * 8 * 9 * 64 + 8 * 8 * 64) / report.total_macs)


def test_flattened_crs_is_another_layout_but_a_1x1_conv_is_tensorrt():
    layers = _by_name(_report(fx.pruned("flattened"))[0])
    assert layers["/conv2/Conv"].layout == L.OTHER_LAYOUT and layers["/conv2/Conv"].axis == "flattened C*R*S"
    assert not layers["/conv2/Conv"].accelerable and layers["/conv2/Conv"].masked
    assert layers["/conv3/Conv"].layout == L.TENSORRT  # 1x1: C*R*S is C


def test_output_channel_groups_are_named():
    values = fx.weights()
    w = values["conv2.weight"]
    values["conv2.weight"] = np.moveaxis(fx.pruner().prune_last_axis(np.moveaxis(w, 0, -1)), -1, 0)
    layers = _by_name(_report(fx.classifier(values))[0])
    assert layers["/conv2/Conv"].layout == L.OTHER_LAYOUT and layers["/conv2/Conv"].axis == "output channels"


def test_unstructured_zeros_are_dense_with_a_note():
    values = fx.weights()
    rng = np.random.default_rng(3)
    w = values["conv2.weight"].copy()
    w[rng.random(w.shape) < 0.5] = 0.0
    values["conv2.weight"] = w
    layer = _by_name(_report(fx.classifier(values))[0])["/conv2/Conv"]
    assert layer.layout == L.DENSE and "zeros" in layer.note and "unstructured" in layer.note


def _gemm_model(weight: np.ndarray, trans_b: int):
    k = weight.shape[1] if trans_b else weight.shape[0]
    n = weight.shape[0] if trans_b else weight.shape[1]
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=trans_b)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_reduction_axis_follows_transB(trans_b):
    rng = np.random.default_rng(0)
    out_by_in = rng.standard_normal((16, 32)).astype(np.float32)  # [N out, K in]
    along_reduction = fx.pruner().prune_last_axis(out_by_in)
    along_outputs = fx.pruner().prune_last_axis(out_by_in.T).T
    for pruned, expected, axis in (
        (along_reduction, L.TENSORRT, "reduction axis"),
        (along_outputs, L.OTHER_LAYOUT, "output axis"),
    ):
        weight = pruned if trans_b else np.ascontiguousarray(pruned.T)
        layers, _ = L.weighted_layers(_gemm_model(weight, trans_b), [32])
        layer = L.layout_report(layers, []).layers[0]
        assert (layer.layout, layer.axis) == (expected, axis)
        assert layer.macs == 16 * 32


def _matmul_through(weight_kn: np.ndarray, via: str):
    """MatMul x[1, K] @ W[K, N], W read through Transpose or DequantizeLinear."""
    k, n = weight_kn.shape
    inits, nodes = [], []
    if via == "transpose":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight_kn.T), "wt"))
        nodes.append(helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]))
    else:
        scale = np.float32(0.05)
        quantized = np.clip(np.round(weight_kn / scale), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(quantized, "wq"),
            numpy_helper.from_array(np.array(scale), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"))
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("via", ["transpose", "dequantize"])
def test_matmul_weights_through_transpose_and_dequantize(via):
    rng = np.random.default_rng(1)
    weight = fx.pruner().prune_last_axis(rng.standard_normal((12, 32)).astype(np.float32)).T  # [K=32, N=12]
    layers, skipped = L.weighted_layers(_matmul_through(np.ascontiguousarray(weight), via), [32])
    assert not skipped and layers[0].source.startswith("Transpose" if via == "transpose" else "DequantizeLinear")
    layer = L.layout_report(layers, []).layers[0]
    assert layer.layout == L.TENSORRT and layer.axis == "reduction axis" and layer.macs == 12 * 32


def test_non_constant_weights_are_named_as_skipped():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="attention")
    graph = helper.make_graph(
        [node],
        "m",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    layers, skipped = L.weighted_layers(helper.make_model(graph), [8])
    assert layers == [] and skipped[0].name == "attention" and "not a constant" in skipped[0].reason


def test_kept_weights_masks_only_or_changed():
    dense_layers, _ = L.weighted_layers(fx.classifier(), [1, 8, 8])
    sparse_model = fx.pruned("tensorrt")
    sparse_layers, _ = L.weighted_layers(sparse_model, [1, 8, 8])
    report = L.layout_report(sparse_layers, [])
    L.compare_kept(report, dense_layers, sparse_layers)
    kept = {layer.name: layer.kept for layer in report.layers}
    assert kept["/conv2/Conv"] == "masks only" and kept["/conv1/Conv"] == "unchanged"
    sparse_layers[1].weight = np.where(sparse_layers[1].weight != 0, sparse_layers[1].weight * 1.1, 0.0)
    L.compare_kept(report, dense_layers, sparse_layers)
    assert report.layers[1].kept == "changed (fine-tuned)" and report.layers[1].max_kept_change > 0.01


def test_pairing_names_both_sides():
    dense_layers, _ = L.weighted_layers(fx.classifier(), [1, 8, 8])
    values = fx.weights()
    values["conv3.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    other, _ = L.weighted_layers(fx.classifier(values), [1, 8, 8])
    with pytest.raises(PipelineError, match=r"layer 3 differs: d.onnx /conv3/Conv .* vs s.onnx /conv3/Conv"):
        L.pair_layers(dense_layers, other, "d.onnx", "s.onnx")
    with pytest.raises(PipelineError, match="d.onnx has 5 .* s.onnx has 4"):
        L.pair_layers(dense_layers, other[:4], "d.onnx", "s.onnx")


def test_two_of_four_share():
    assert L.two_of_four_share(np.array([[0, 0, 1, 1, 0, 1, 0, 1]], np.float32)) == 1.0
    assert L.two_of_four_share(np.array([[0, 1, 1, 1, 0, 0, 1, 1]], np.float32)) == 0.5
    assert L.two_of_four_share(np.zeros((2, 6), np.float32)) == 0.0  # not a multiple of 4


def test_kept_weights_in_float16_count_as_masks_only():
    dense_layers, _ = L.weighted_layers(fx.classifier(), [1, 8, 8])
    half = {name: (w.astype(np.float16) if name.endswith("weight") else w) for name, w in fx.weights().items()}
    half["conv2.weight"] = fx.pruner().prune_conv(fx.weights()["conv2.weight"], "tensorrt").astype(np.float16)
    sparse_layers, _ = L.weighted_layers(fx.classifier(half), [1, 8, 8])
    report = L.layout_report(sparse_layers, [])
    L.compare_kept(report, dense_layers, sparse_layers)
    assert report.layers[1].kept == "masks only (within FP16 rounding)" and report.layers[1].layout == L.TENSORRT
    assert report.layers[0].kept in ("unchanged", "unchanged (within FP16 rounding)")


def test_per_channel_dequantize_of_a_conv_weight():
    """A Q/DQ conv (per-output-channel scales, axis 0) is read as its dequantized weights: layout and MACs as FP32."""
    weight = fx.pruner().prune_conv(fx.weights()["conv2.weight"], "tensorrt")
    scale = (np.abs(weight).reshape(8, -1).max(1) / 127).astype(np.float32)
    quantized = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], name="qconv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [
            numpy_helper.from_array(quantized, "wq"),
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(np.zeros(8, np.int8), "z"),
        ],
    )
    layers, _ = L.weighted_layers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), [8, 8, 8])
    assert np.allclose(layers[0].weight, weight, atol=float(scale.max()))
    layer = L.layout_report(layers, []).layers[0]
    assert layer.layout == L.TENSORRT and layers[0].source == "DequantizeLinear(initializer)"
    assert layer.macs == 8 * 8 * 9 * 64


def _qdq_conv(weight: np.ndarray, via: str):
    """A strongly typed Q/DQ conv (the INT8 export's and TensorRT 11's form): the input through Q -> DQ, the weight
    through one of: a Constant node -> Q -> DQ (per output channel, int8), an FP32 initializer -> Q -> DQ (uint8,
    zero point 128), an INT8 initializer -> DQ, or a flat [K, C*R*S] initializer -> Q -> DQ -> Reshape."""
    k, c = weight.shape[:2]
    scale = (np.abs(weight).reshape(k, -1).max(1) / 127).astype(np.float32)
    tensors = {"xs": np.array(0.02, np.float32), "xz": np.array(0, np.int8), "s": scale, "z": np.zeros(k, np.int8)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
    ]
    if via == "constant q dq":
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")))
        nodes += [helper.make_node(op, [src, "s", "z"], [dst], axis=0) for op, src, dst in _QDQ]
    elif via == "uint8 q dq":
        tensors.update(w=weight, s=np.float32(scale.max()), z=np.uint8(128))
        nodes += [helper.make_node(op, [src, "s", "z"], [dst]) for op, src, dst in _QDQ]
    elif via == "int8 dq":
        tensors["wq"] = np.clip(np.rint(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0))
    else:  # "q dq reshape"
        tensors.update(w=weight.reshape(k, -1), shape=np.array([0, c, *weight.shape[2:]], np.int64))
        nodes += [helper.make_node(op, [src, "s", "z"], [dst], axis=0) for op, src, dst in _QDQ]
        nodes.append(helper.make_node("Reshape", ["wd", "shape"], ["wr"]))
    conv_weight = "wr" if via == "q dq reshape" else "wd"
    nodes.append(helper.make_node("Conv", ["xd", conv_weight], ["y"], name="qconv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, 8, 8])],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in tensors.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_QDQ = (("QuantizeLinear", "w", "wq"), ("DequantizeLinear", "wq", "wd"))


@pytest.mark.parametrize("via", ["constant q dq", "uint8 q dq", "int8 dq", "q dq reshape"])
def test_qdq_conv_weights_are_followed_to_their_initializer(via):
    """Issue 35: a Q/DQ conv's weight arrives through DequantizeLinear (and QuantizeLinear, Reshape); its layout is
    that of the quantized values: the 2:4 weight is `tensorrt 2:4`, the dense one is not, and neither is skipped."""
    import onnx

    dense = fx.weights()["conv2.weight"]
    for weight, expected in ((fx.pruner().prune_conv(dense, "tensorrt"), L.TENSORRT), (dense, L.DENSE)):
        model = _qdq_conv(weight, via)
        onnx.checker.check_model(model, full_check=True)
        layers, skipped = L.weighted_layers(model, [8, 8, 8])
        assert skipped == [] and len(layers) == 1, skipped
        layer = L.layout_report(layers, []).layers[0]
        assert (layer.layout, layer.weight, layer.shape) == (expected, "wq" if via == "int8 dq" else "w", [8, 8, 3, 3])
        assert layer.macs == 8 * 8 * 9 * 64 and "DequantizeLinear" in layers[0].source
        assert ("QuantizeLinear" in layers[0].source) is (via != "int8 dq")
        assert np.all(layers[0].weight[weight == 0] == 0)  # a pruned weight quantizes to 0 and reads back as 0
        assert np.abs(layers[0].weight - weight).max() <= np.abs(weight).max() / 127


def test_quantize_saturates_and_rounds_half_to_even():
    """QuantizeLinear as ONNX defines it: round half to even, saturate to the zero point's type (uint8 here)."""
    values = np.array([0.0, 0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32).reshape(1, 7)
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])],
        [numpy_helper.from_array(values, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "s")]
        + [numpy_helper.from_array(np.array(128, np.uint8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])  # onnx.reference has Q/DQ from 19
    layers, skipped = L.weighted_layers(model, [1])
    assert len(layers) == 1 and skipped == []
    from onnx.reference import ReferenceEvaluator

    (expected,) = ReferenceEvaluator(model).run(None, {"x": np.ones((1, 1), np.float32)})
    assert np.array_equal(layers[0].weight.T.reshape(1, 7), expected)
    assert expected.tolist() == [[0.0, 0.0, 2.0, 2.0, -0.0, 127.0, -128.0]]
