"""The fused CPU kernel of a Gumbel-mask layer (`gumbel_mask.c`): sample the pattern argmax and mask the weight
in one pass over the blocks (forward), and the straight-through softmax gradient of the logits in one more
(backward), where the PyTorch path (`pipeline.masks.gumbel._MaskedWeight`) makes about ten passes over the logits
and allocates the perturbed logits every step. On small inputs (`fmnist_resnet18`: 28x28 images, 11 M masked
weights) that per-weight work is most of a mask step (docs/notebook/time-to-accuracy.md "Cost of a mask-training step").

The C file is compiled with the system C compiler (`cc`, or $CC) on first use, for this CPU (-march=native), and
cached under $XDG_CACHE_HOME/sparse-pipeline/kernels (default ~/.cache) by a hash of the source, the flags, the
compiler's version and the CPU's flags, written to a temporary file and renamed. It runs on CPU tensors only, on
OpenMP threads: loaded after PyTorch, the library binds to PyTorch's own libgomp (same soname), so it shares
PyTorch's thread team and thread count instead of running beside threads that spin (Python threads here took twice
the time). When no compiler builds it,
`kernel()` returns None, `status()` says why, and the PyTorch path runs: masks.kernel = torch forces that path.
Same computation as the PyTorch path up to float rounding (the softmax's exp; `tests/test_fused_mask_kernel.py`
compares both); the argmax ties go to the first pattern in both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import cast

import torch

SOURCE = Path(__file__).with_name("gumbel_mask.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared")
LIBRARIES = ("-lmvec", "-lm")  # glibc's vector expf, so that the softmax vectorises

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse-pipeline" / "kernels"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.processor())


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *LIBRARIES, version, _cpu_flags()]).encode())
    target = cache_dir() / f"gumbel_mask-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, *LIBRARIES], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise OSError(f"{compiler} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    library.gm_limits.argtypes, library.gm_limits.restype = [i32, i32], i32
    library.gm_forward.argtypes = [pointer, pointer, f32, i64, i32, i32, pointer, pointer, pointer, i32]
    library.gm_forward.restype = None
    library.gm_backward.argtypes = [pointer, pointer, f32, i64, i32, i32, pointer, pointer, i32, pointer, f32, pointer]
    library.gm_backward.restype = None
    return library


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call of the process; None (and `status()` says why) without one."""
    with _lock:
        if "library" not in _state:
            compiler = _compiler()
            try:
                if compiler is None:
                    raise OSError("no C compiler (cc, gcc or clang; or set $CC)")
                _state["library"] = _bind(_build(compiler))
                _state["status"] = f"fused C kernel ({Path(compiler).name}, {cache_dir()})"
            except (OSError, subprocess.SubprocessError) as error:
                _state["library"] = None
                _state["status"] = f"PyTorch ops (the fused C kernel is unavailable: {error})"
        return cast("ctypes.CDLL | None", _state["library"])


def status() -> str:
    """Which path the mask layers' per-block work takes in this process, and why."""
    kernel()
    return str(_state["status"])


def _loaded() -> ctypes.CDLL:
    """The compiled kernel, for a caller that checked `usable` (which only holds when it built)."""
    library = kernel()
    if library is None:
        raise RuntimeError(f"the fused mask kernel was called without a compiled kernel ({status()})")
    return library


def block_last(tensor: torch.Tensor, m: int) -> bool:
    """Whether each block of `m` input channels lies contiguous, blocks in the logits' order: a row-major linear
    weight, or a conv weight in channels_last memory ([K, *kernel, C] contiguous)."""
    if tensor.dim() == 4:
        return tensor.permute(0, 2, 3, 1).is_contiguous()
    return tensor.dim() == 2 and tensor.is_contiguous()


def usable(logits: torch.Tensor, noise: torch.Tensor | None, weight: torch.Tensor, m: int) -> bool:
    """Whether the kernel can take this layer's step: CPU float32 logits and noise, a block-last float32 or
    bfloat16 weight, and a pattern count and block size within the C file's limits."""
    if noise is None or logits.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if (
        logits.dtype != torch.float32
        or noise.dtype != torch.float32
        or weight.dtype not in (torch.float32, torch.bfloat16)
    ):
        return False
    library = kernel()
    return (
        library is not None
        and bool(library.gm_limits(logits.shape[0], m))
        and logits.is_contiguous()
        and noise.is_contiguous()
        and block_last(weight, m)
    )


def forward(
    logits: torch.Tensor,
    noise: torch.Tensor,
    alpha: float,
    keep_rows: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = weight masked by the argmax pattern of noise + alpha * logits, per block (`usable` checked)."""
    library, patterns, m = _loaded(), logits.shape[0], keep_rows.shape[1]
    library.gm_forward(
        logits.data_ptr(),
        noise.data_ptr(),
        alpha,
        logits[0].numel(),
        patterns,
        m,
        keep_rows.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        weight.element_size(),
    )


def backward(
    logits: torch.Tensor,
    noise: torch.Tensor,
    alpha: float,
    table: torch.Tensor,
    grad_weight: torch.Tensor,
    weight_pm: torch.Tensor,
    kept_scale: float,
) -> torch.Tensor:
    """The gradient of the logits (`[P, *blocks]` float32) for the block-last `grad_weight`; `kept_scale`: the
    kept-magnitude term's -c / sum|W| (0: off), applied to |W| inside the kernel rather than read as a tensor."""
    library, patterns, m = _loaded(), logits.shape[0], table.shape[1]
    grad = torch.empty_like(logits)
    library.gm_backward(
        logits.data_ptr(),
        noise.data_ptr(),
        alpha,
        logits[0].numel(),
        patterns,
        m,
        table.data_ptr(),
        grad_weight.data_ptr(),
        grad_weight.element_size(),
        weight_pm.data_ptr(),
        kept_scale,
        grad.data_ptr(),
    )
    return grad
