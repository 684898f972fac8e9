"""Which TensorRT each Triton Inference Server container release ships.

A TensorRT plan only loads in the TensorRT that built it, so `serve.triton_release` (validated by the
recipe) and the package stage (pipeline/package/plans.py) both read this one table; it lives outside
both so that neither imports the other. docs/tensorrt.md says which rows were checked against a
public source.
"""
from __future__ import annotations

# Triton container release -> the TensorRT it ships (major.minor.patch), from NVIDIA's Frameworks
# Support Matrix and the Triton release notes. Extend it when a new release is needed.
TRITON_TENSORRT = {
    "23.01": "8.5.2", "23.02": "8.5.3", "23.03": "8.5.3",
    "23.04": "8.6.1", "23.05": "8.6.1", "23.06": "8.6.1", "23.07": "8.6.1", "23.08": "8.6.1", "23.09": "8.6.1",
    "23.10": "8.6.1", "23.11": "8.6.1", "23.12": "8.6.1", "24.01": "8.6.1",
    "24.02": "8.6.3", "24.03": "8.6.3", "24.04": "8.6.3",
    "24.05": "10.0.1", "24.06": "10.1.0", "24.07": "10.2.0", "24.08": "10.3.0", "24.09": "10.4.0",
    "24.10": "10.5.0", "24.11": "10.6.0", "24.12": "10.7.0", "25.01": "10.8.0", "25.02": "10.8.0",
    "25.03": "10.9.0", "25.04": "10.9.0", "25.05": "10.10.0", "25.06": "10.11.0", "25.07": "10.11.0",
}
