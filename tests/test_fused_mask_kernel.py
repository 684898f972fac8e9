"""The fused C kernel of the mask layers (`pipeline.masks.fused`, masks.kernel = auto) against the PyTorch path
(masks.kernel = torch): the same sampled masks and the same logit gradients up to float rounding, and the PyTorch
path whenever the kernel cannot run (no compiler, a layout it does not take), said by `status()`."""

import pytest
import torch

from pipeline.masks import fused
from pipeline.masks.gumbel import GumbelMask, GumbelNoisePool, initial_logits

needs_kernel = pytest.mark.skipif(fused.kernel() is None, reason=f"no fused kernel here: {fused.status()}")


def layer_step(weight, kernel, out_dtype=None, kept=0.0, tau=1.0, scale=1.0, seed=3):
    """One forward and backward of a mask layer on `weight`; the masked weight, the logit gradient and whether the
    fused kernel took the step."""
    logits = initial_logits(weight, 2, 4, "magnitude", 20.0, torch.Generator().manual_seed(0))
    pool = GumbelNoisePool(logits.numel(), seed=seed)
    pool.set_step(0, torch.device("cpu"))
    layer = GumbelMask(logits, 2, 4, pool, scale).train()
    layer.kernel, layer.tau, layer.kept_coefficient = kernel, tau, kept
    calls = []
    original = fused.forward
    fused.forward = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out_dtype == torch.bfloat16):
            masked = layer.masked_weight(weight, out_dtype=out_dtype)
    finally:
        fused.forward = original
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(masked.dtype)
    masked.backward(upstream.contiguous(memory_format=torch.channels_last) if weight.dim() == 4 else upstream)
    return masked.detach().float(), layer.logits.grad, bool(calls)


@needs_kernel
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (24, 64, 1, 1), (10, 128)])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kept, tau, scale", [(0.0, 1.0, 1.0), (5.0, 0.3, 2.0)])
def test_fused_kernel_samples_the_same_masks_and_gradients_as_pytorch(shape, out_dtype, kept, tau, scale):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    masked, grad, used = layer_step(weight, "auto", out_dtype, kept, tau, scale)
    reference, reference_grad, reference_used = layer_step(weight, "torch", out_dtype, kept, tau, scale)
    assert used and not reference_used
    assert torch.equal(masked, reference)  # the argmax is exact: same noise, same first-max tie rule
    assert torch.allclose(grad, reference_grad, rtol=1e-4, atol=1e-5)
    assert float(grad.abs().max()) > 1e-3  # a gradient that says something


@needs_kernel
def test_a_layout_the_kernel_does_not_take_runs_the_pytorch_path():
    """A 3x3 conv weight in the default (channels-first) memory format: blocks of four input channels are not
    contiguous, so the PyTorch path runs, with the same result."""
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    masked, grad, used = layer_step(weight, "auto")
    reference, reference_grad, _ = layer_step(weight, "torch")
    assert not used and torch.equal(masked, reference) and torch.equal(grad, reference_grad)


def test_without_a_compiler_the_pytorch_path_runs_and_status_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    assert fused.kernel() is None and "no C compiler" in fused.status()
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    _, _, used = layer_step(weight, "auto")
    assert not used and not list(tmp_path.iterdir())


def test_a_failing_compiler_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fused, "_compiler", lambda: "false")  # runs, prints nothing, exits 1
    assert fused.kernel() is None and "false failed" in fused.status()
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # no half-written library left


@needs_kernel
def test_the_library_is_built_once_and_cached_by_source(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused.kernel() is not None
    built = list((tmp_path / "sparse-pipeline" / "kernels").glob("gumbel_mask-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(fused, "_state", {})
    assert fused.kernel() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
