"""TensorRT backend (GPU), through Polygraphy: builds 2:4-sparse engines and runs them; see docs/tensorrt.md."""

from pipeline.backends.tensorrt.engine import TensorRTBackend, TensorRTRunner, onnx_for_precision, preflight
from pipeline.backends.tensorrt.info import EngineInfo


def backend() -> TensorRTBackend:
    return TensorRTBackend()


__all__ = ["backend", "onnx_for_precision", "preflight", "EngineInfo", "TensorRTBackend", "TensorRTRunner"]
