"""ONNX export of the dense and sparse networks and its report (export.json)."""
