import os

import pytest

os.environ.setdefault("PIPELINE_NO_PROGRESS", "1")
# One intra-op thread in this process and every subprocess it starts: the models are tiny, and on a shared
# 2-core machine more threads only oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _missing_hardware() -> dict[str, str]:
    """Marker -> why its tests cannot run here (absent when they can)."""
    try:
        import torch

        have_cuda = torch.cuda.is_available()
    except Exception:
        have_cuda = False
    try:
        import tensorrt  # noqa: F401

        have_tensorrt = have_cuda
    except Exception:
        have_tensorrt = False
    missing = {}
    if not have_cuda:
        missing["gpu"] = "needs a CUDA GPU; this machine has none"
    if not have_tensorrt:
        missing["tensorrt"] = "needs TensorRT and an NVIDIA GPU; this machine lacks at least one"
    return missing


def pytest_collection_modifyitems(config, items):
    missing = _missing_hardware()
    for item in items:
        for marker, reason in missing.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break
