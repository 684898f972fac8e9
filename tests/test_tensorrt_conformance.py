"""Conformance with real TensorRT on CPU: every TensorRT name the backend and Polygraphy's TensorRT path use
must appear in the extension module of each supported version's Python bindings wheel from PyPI.

The bindings wheels (`tensorrt-cu12-bindings`, 1-2 MB) hold the real pybind11 module, tensorrt.so, whose
names are strings in the binary; the libraries it loads (libnvinfer) are not in them, so the module cannot
be imported here, but its names can be read. The wheels are fetched once with `pip download --no-deps`
into ~/.cache/sparse-pipeline/trt-wheels (or $SPARSE_PIPELINE_TRT_WHEELS); a test skips, saying why,
when the download fails (offline).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.backends.tensorrt.parser_support import MIN_VERSION

BACKEND = Path(__file__).resolve().parents[1] / "pipeline" / "backends" / "tensorrt"
CACHE = Path(os.environ.get("SPARSE_PIPELINE_TRT_WHEELS", Path.home() / ".cache" / "sparse-pipeline" / "trt-wheels"))
# supported versions: the oldest (the minimum), the newest 10.x and the newest 11.x on PyPI when this was written
WHEELS = {
    "10.0.1": "tensorrt-cu12-bindings==10.0.1",
    "10.16.1.11": "tensorrt-cu12-bindings==10.16.1.11",
    "11.4.0.106": "tensorrt-cu12-bindings==11.4.0.106",
}
UNSUPPORTED = {"8.6.1": "tensorrt-bindings==8.6.1"}

# What Polygraphy 0.53 calls on TensorRT for the loaders and runner this backend uses (read in its
# backend/trt/{loader,config,profile,runner,util}.py): network + parser, builder config, build, runtime, runner.
POLYGRAPHY_PATH = [
    "Builder",
    "create_network",
    "NetworkDefinitionCreationFlag",
    "OnnxParser",
    "parse_from_file",
    "num_errors",
    "get_error",
    "init_libnvinfer_plugins",
    "ILogger",
    "Logger",
    "INTERNAL_ERROR",
    "ERROR",
    "WARNING",
    "INFO",
    "VERBOSE",
    "create_builder_config",
    "set_flag",
    "clear_flag",
    "BuilderFlag",
    "TF32",
    "SPARSE_WEIGHTS",
    "create_optimization_profile",
    "add_optimization_profile",
    "set_shape",
    "profiling_verbosity",
    "set_memory_pool_limit",
    "create_timing_cache",
    "set_timing_cache",
    "get_timing_cache",
    "combine",
    "serialize",
    "hardware_compatibility_level",
    "build_serialized_network",
    "Runtime",
    "deserialize_cuda_engine",
    "ICudaEngine",
    "IExecutionContext",
    "create_execution_context",
    "execute_async_v3",
    "set_input_shape",
    "get_tensor_shape",
    "set_tensor_address",
    "get_tensor_address",
    "num_io_tensors",
    "get_tensor_name",
    "get_tensor_mode",
    "TensorIOMode",
    "INPUT",
    "OUTPUT",
    "get_tensor_dtype",
    "get_tensor_profile_shape",
    "LayerType",
    "QUANTIZE",
    "DEQUANTIZE",
]
# What the backend calls on objects TensorRT hands it (not reachable as `trt.X` in its source).
BACKEND_OBJECTS = [
    "create_engine_inspector",
    "get_engine_information",
    "profiler",
    "report_layer_time",
    "IProfiler",
    # the runner's own reads of the ICudaEngine / IExecutionContext (pipeline/backends/tensorrt/runner.py)
    "execute_async_v3",
    "num_io_tensors",
    "get_tensor_name",
    "get_tensor_mode",
    "get_tensor_dtype",
    "get_tensor_profile_shape",
]
# Names the linker stores only as the tail of a longer string (it merges "INPUT\0" into "CONDITIONAL_INPUT\0"):
# each is accepted only as the tail of the named longer identifier, which must itself be a whole identifier.
TAIL_MERGED = {"INPUT": "CONDITIONAL_INPUT", "OUTPUT": "CONDITIONAL_OUTPUT", "QUANTIZE": "DEQUANTIZE"}
# Names used only from some versions on, or only below some version: (first version, first version without)
VERSIONED = {
    "STRONGLY_TYPED": ((11, 0), None),
    "FP16": ((10, 0), (11, 0)),
    "INT8": ((10, 0), (11, 0)),
    "SAME_COMPUTE_CAPABILITY": ((10, 9), None),
}


def trt_names_in_source(folder: Path = BACKEND) -> set[str]:
    """Every `trt.A.B` attribute the backend's modules read (so a new use is checked without editing this list)."""
    names: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            chain, current = [], node
            while isinstance(current, ast.Attribute):
                chain.append(current.attr)
                current = current.value
            if chain and isinstance(current, ast.Name) and current.id == "trt":
                names.update(name for name in chain if not name.startswith("__"))
    return names


def names_for(version: tuple[int, ...]) -> set[str]:
    wanted = (trt_names_in_source() | set(POLYGRAPHY_PATH) | set(BACKEND_OBJECTS)) - set(VERSIONED)
    wanted |= {
        name for name, (first, gone) in VERSIONED.items() if version >= first and (gone is None or version < gone)
    }
    return wanted


def _whole(module: bytes, name: str) -> bool:
    return re.search(rb"(?<![A-Za-z0-9_])" + re.escape(name.encode()) + rb"(?![A-Za-z0-9_])", module) is not None


def missing_names(module: bytes, names: set[str]) -> list[str]:
    """Names that are not a whole identifier among the extension module's strings. A name that merely ends a
    longer one ("TYPED" of "STRONGLY_TYPED") is missing, so a removed enum value whose name is the tail of another
    cannot pass; only the TAIL_MERGED names, which the linker stores as tails, are accepted as their tail."""
    return sorted(
        name
        for name in names
        if not _whole(module, name) and not (name in TAIL_MERGED and _whole(module, TAIL_MERGED[name]))
    )


def extension_module(spec: str) -> bytes:
    """tensorrt.so of a bindings wheel from the cache, downloading it first if needed; skips when it cannot."""
    name, version = spec.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(CACHE.glob(pattern))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(CACHE), spec],
            capture_output=True,
            text=True,
            timeout=300,
        )
        found = sorted(CACHE.glob(pattern))
        if not found:
            pytest.skip(f"cannot fetch {spec} (offline?): {(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(found[0]) as wheel:
        members = [m for m in wheel.namelist() if re.search(r"tensorrt[^/]*\.so", m)]
        return wheel.read(members[0])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.mark.parametrize("version", list(WHEELS))
def test_every_name_the_backend_and_polygraphy_use_is_in_the_bindings(version):
    module = extension_module(WHEELS[version])
    assert missing_names(module, names_for(_version(version))) == []


def test_the_backend_source_names_are_found_by_the_scan():
    """The AST scan sees the backend's own TensorRT names (a scan that found none would check nothing)."""
    assert {
        "HardwareCompatibilityLevel",
        "ProfilingVerbosity",
        "DETAILED",
        "MemoryPoolType",
        "WORKSPACE",
        "LayerInformationFormat",
        "JSON",
        "IProfiler",
    } <= trt_names_in_source()


def test_the_checker_fails_on_a_misspelt_name():
    module = extension_module(WHEELS["10.16.1.11"])
    names = names_for((10, 16)) | {"SPARSE_WIEGHTS", "set_input_shapes"}
    assert missing_names(module, names) == ["SPARSE_WIEGHTS", "set_input_shapes"]


def test_a_name_that_only_ends_another_is_missing():
    """Issue 35 (Why 8): the old check accepted any name that ended a string, so "TYPED" (the tail of
    STRONGLY_TYPED) or "WEIGHTS" (of SPARSE_WEIGHTS) passed though no TensorRT attribute has that name."""
    module = extension_module(WHEELS["10.16.1.11"])
    assert missing_names(module, {"TYPED", "WEIGHTS", "STRONGLY_TYPED", "INPUT"}) == ["TYPED", "WEIGHTS"]


def test_the_wheels_differ_where_the_versions_do():
    """The scan tells versions apart: 11 has no EXPLICIT_BATCH, 8.6 no STRONGLY_TYPED, 10.0 no SAME_COMPUTE_CAPABILITY."""
    assert missing_names(extension_module(WHEELS["11.4.0.106"]), {"EXPLICIT_BATCH"}) == ["EXPLICIT_BATCH"]
    assert missing_names(extension_module(UNSUPPORTED["8.6.1"]), {"STRONGLY_TYPED"}) == ["STRONGLY_TYPED"]
    assert missing_names(extension_module(WHEELS["10.0.1"]), {"SAME_COMPUTE_CAPABILITY"}) == ["SAME_COMPUTE_CAPABILITY"]


def test_the_oldest_wheel_checked_is_the_minimum_version():
    assert min(_version(v)[:2] for v in WHEELS) == MIN_VERSION
