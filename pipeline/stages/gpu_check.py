"""`gpu-check` (`make gpu-check`): the first measurements to take on a machine with a CUDA GPU.

NOT YET RUN ON A GPU: no machine of this project has one. Everything but the CUDA calls runs in
tests/test_gpu_check.py on CPU (GEMM shapes, skip reasons, paired timing order, table, report file).
On a GPU it takes, with PyTorch only (no network, about 10 minutes on one H100/H200):
1. mask training of the demo recipe on CUDA for `--steps` steps (synthetic images of the demo's shape: this
   times the CUDA path -- channels_last, bfloat16 autocast -- it does not measure accuracy);
2. dense vs 2:4 latency of every masked Linear and every masked 1x1 conv of each model, run as the GEMM it
   is (x[M, K] @ W[N, K]^T; M = serving batch x output pixels for a 1x1 conv, serving batch x the rows a Linear
   sees: ConvNeXt's Linear layers run on NHWC tensors, so their M is batch x H x W) through
   `torch.sparse.to_sparse_semi_structured` (cuSPARSELt, its algorithm id searched with
   torch._cslt_sparse_mm_search where PyTorch has it), FP16, paired: dense and sparse interleaved ABBA, each
   sample R back-to-back calls between one pair of CUDA events (R chosen so a sample is >= 1 ms), medians; each
   row says what ran ("PyTorch eager F.linear, cuSPARSELt alg N");
3. when tensorrt imports: dense and sparse TensorRT engines of each model (random weights, magnitude 2:4
   masks), their paired latency at the serving batch, and which layers TensorRT ran sparse, with per-layer times.
It rewrites OUT/gpu_check.json after each step (a late failure keeps the rest) and prints a table. Without a
CUDA GPU it stops with one line (exit 2).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.declaration import StageDeclaration
from pipeline.errors import PipelineError
from pipeline.io import write_json

DEMO = "fmnist_resnet"
MODELS = ("fmnist_resnet", "resnet50", "convnext_t")


DECLARATION = StageDeclaration(
    help="CUDA mask training, cuSPARSELt 2:4 GEMMs and TensorRT engines (GPU)",
    kind="lab",
    needs_recipe=False,  # its own --models list; writes OUT/gpu_check.json
)


@dataclass
class Options:
    models: str = ",".join(MODELS)
    steps: int = 300
    batch: int = 0  # 0: each recipe's verify.serving_batch
    reps: int = 50
    warmup: int = 10
    out: str = "engines"

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--steps", self.steps, 1),
            ("--batch", self.batch, 0),
            ("--reps", self.reps, 2),
            ("--warmup", self.warmup, 0),
        ):
            if value < low:
                raise PipelineError(f"{flag} {value}: not valid; valid: at least {low}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="models timed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="mask-training steps of the demo on CUDA (default 300)")
    parser.add_argument("--batch", type=int, default=0, help="batch of the GEMMs and engines (default: serving batch)")
    parser.add_argument("--reps", type=int, default=50, help="timed runs of each of dense and sparse (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs of each first (default 10)")
    parser.add_argument("--out", default="engines", help="writes OUT/gpu_check.json")


@dataclass
class Gemm:
    """One masked layer as the GEMM it runs: y[M, N] = x[M, K] @ W[N, K]^T."""

    layer: str
    kind: str  # linear | conv1x1
    m: int
    n: int
    k: int
    skip: str | None = None  # why it is not timed through to_sparse_semi_structured


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise PipelineError(
            "gpu-check needs a CUDA GPU; torch sees none here (run `make gpu-check` on a machine "
            "with an NVIDIA GPU and a CUDA build of torch)"
        )


def sparse_min_shape(dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """(rows, cols) multiples cuSPARSELt needs of a 2:4 weight of `dtype`, from torch's own table."""
    constraint = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return constraint.sparse_min_rows, constraint.sparse_min_cols


def layer_gemms(model: nn.Module, layers: list[str], input_shape: list[int], batch: int) -> list[Gemm]:
    """The GEMM of every named layer at `batch` (one CPU forward of one image finds each layer's rows per image:
    a conv's output pixels, a Linear's rows -- H x W for ConvNeXt's Linear on NHWC tensors, 1 for a classifier)."""
    modules = dict(model.named_modules())
    pixels: dict[str, int] = {}

    def rows_of(module, out) -> int:
        if isinstance(module, nn.Linear):
            return out[0].numel() // out.shape[-1]
        return out[0, 0].numel() if out.dim() == 4 else 1

    hooks = [
        modules[name].register_forward_hook(
            lambda module, args, out, name=name: pixels.__setitem__(name, rows_of(module, out))
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    rows, cols = sparse_min_shape()
    gemms = []
    for name in layers:
        module = modules[name]
        if isinstance(module, nn.Linear):
            gemm = Gemm(name, "linear", batch * pixels[name], module.out_features, module.in_features)
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
            gemm = Gemm(name, "conv1x1", batch * pixels[name], module.out_channels, module.in_channels)
        else:
            gemm = Gemm(
                name,
                "conv",
                0,
                module.weight.shape[0],
                module.weight[0].numel(),
                skip=f"{'x'.join(map(str, module.weight.shape[2:]))} conv: not one GEMM (timed in the engines)",
            )
        if gemm.skip is None and (gemm.n % rows or gemm.k % cols):
            gemm.skip = f"N={gemm.n}, K={gemm.k}: cuSPARSELt FP16 needs N a multiple of {rows} and K of {cols}"
        gemms.append(gemm)
    return gemms


def paired_times(
    run_a: Callable[[], Any],
    run_b: Callable[[], Any],
    reps: int,
    warmup: int,
    timer: Callable[[Any], float],
) -> tuple[list[float], list[float]]:
    """Times of `reps` runs of each, interleaved A B B A ... after `warmup` untimed runs of each."""
    for _ in range(warmup):
        run_a()
        run_b()
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(reps):
        order = ((0, run_a), (1, run_b)) if index % 2 == 0 else ((1, run_b), (0, run_a))
        for slot, run in order:
            times[slot].append(timer(run))
    return times


def ratio_row(dense_ms: list[float], sparse_ms: list[float]) -> dict[str, float]:
    dense, sparse = statistics.median(dense_ms), statistics.median(sparse_ms)
    return {"dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse if sparse > 0 else float("nan")}


def event_timer(fn: Callable[[], Any], clock=None):
    """A timer of `fn` on the current CUDA stream: each sample is R back-to-back calls between one pair of CUDA
    events (R chosen so a sample holds >= 1 ms of GPU time), per call; `clock`: a fake in the CPU tests."""
    from pipeline.backends.tensorrt import timing

    clock = clock or timing.TorchCuda(torch.cuda.current_stream().cuda_stream)
    timer = timing.GpuTimer(clock, fn, use_graph=False)
    timer.prepare()
    return timer


def sample_ms(timer) -> float:
    return timer.samples(1, 0).gpu_ms[0]


def searched_alg(sparse, x: torch.Tensor) -> tuple[int | None, str]:
    """cuSPARSELt's best algorithm id for this GEMM (torch._cslt_sparse_mm_search), or None and why not."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None or not hasattr(sparse, "packed"):
        return None, "no algorithm search in this PyTorch (or not the cuSPARSELt backend)"
    try:
        return int(search(sparse.packed, x.t())), ""
    except Exception as exc:  # a PyTorch without cuSPARSELt raises here
        return None, f"algorithm search failed: {type(exc).__name__}: {str(exc)[:80]}"


def masked_model(name: str, seed: int = 0):
    """(recipe, dense model, model with magnitude 2:4 masks on its masked layers, report): random weights, CPU."""
    import copy

    from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
    from pipeline.masks.eligibility import find_layers
    from pipeline.masks.patterns import magnitude_indices
    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network

    recipe = get_recipe(name)
    torch.manual_seed(seed)
    dense = build_network(recipe).eval()
    cfg, state = recipe.masks, dense.state_dict()
    report = find_layers(dense, recipe.input_shape, cfg.m, classifier=recipe.classifier)
    layers = [
        LayerMask(
            layer.name, layer.weight_shape, cfg.n, cfg.m, magnitude_indices(state[f"{layer.name}.weight"], cfg.n, cfg.m)
        )
        for layer in report.masked
    ]
    sparse = copy.deepcopy(dense)
    sparse.load_state_dict(apply_masks(state, MaskArtifact(recipe.name, recipe.arch, "magnitude", layers)))
    return recipe, dense, sparse, report


def time_gemm(gemm: Gemm, weight: torch.Tensor, reps: int, warmup: int) -> dict[str, Any]:
    """CUDA: dense vs to_sparse_semi_structured F.linear of one layer's GEMM, FP16."""
    from torch.sparse import to_sparse_semi_structured

    dense = weight.detach().reshape(gemm.n, gemm.k).to("cuda", torch.float16).contiguous()
    x = torch.randn(gemm.m, gemm.k, device="cuda", dtype=torch.float16)
    sparse = to_sparse_semi_structured(dense)
    alg, why = searched_alg(sparse, x)
    if alg is not None:
        sparse = to_sparse_semi_structured(dense, alg_id=alg)
    linear = torch.nn.functional.linear
    agree = torch.allclose(linear(x, dense), linear(x, sparse), rtol=1e-2, atol=1e-1)
    timers = event_timer(lambda: linear(x, dense)), event_timer(lambda: linear(x, sparse))
    times = paired_times(timers[0], timers[1], reps, warmup, sample_ms)
    backend = type(sparse).__name__.removeprefix("SparseSemiStructuredTensor") or "default"
    return {
        **asdict(gemm),
        **ratio_row(*times),
        "outputs_agree": bool(agree),
        "dense_method": f"PyTorch eager F.linear (dense FP16), {timers[0].calls} calls per CUDA event pair",
        "method": f"PyTorch eager F.linear, {backend} alg {alg if alg is not None else 'default (' + why + ')'}, "
        f"{timers[1].calls} calls per CUDA event pair",
    }


def gemm_rows(name: str, batch: int, reps: int, warmup: int) -> list[dict[str, Any]]:
    recipe, _, model, report = masked_model(name)
    batch = batch or recipe.verify.serving_batch
    modules = dict(model.named_modules())
    rows = []
    for gemm in layer_gemms(model, [layer.name for layer in report.masked], recipe.input_shape, batch):
        rows.append(
            {"model": name, **asdict(gemm)}
            if gemm.skip
            else {"model": name, **time_gemm(gemm, modules[gemm.layer].weight, reps, warmup)}
        )
    return rows


def train_demo(steps: int, device: str = "cuda") -> dict[str, Any]:
    """The demo's mask training (synthetic images of its shape) for `steps` steps on `device` (CUDA here), with
    the CUDA path's settings (channels_last, bfloat16 autocast) on whatever the device, so a CPU test runs it."""
    from pipeline.data.datasets import build_datasets
    from pipeline.masks.learning import MaskLearning, learn_masks
    from pipeline.recipe.config import apply_override
    from pipeline.training import StepSettings

    recipe, model, _, report = masked_model(DEMO)
    for assignment in ("data.kind=synthetic", f"masks.steps={steps}", "masks.checkpoint_every=0"):
        apply_override(recipe, assignment)
    start = time.perf_counter()
    result = learn_masks(
        model,
        report,
        MaskLearning.of(recipe),
        build_datasets(recipe),
        torch.device(device),
        log=lambda _: None,
        settings=StepSettings.for_device(torch.device(device), cuda_path=True),
    )
    seconds = time.perf_counter() - start
    return {
        "model": DEMO,
        "steps": result.steps,
        "seconds": round(seconds, 2),
        "steps_per_second": round(result.steps / seconds, 2),
        "data": "synthetic",
        "history": result.history,
    }


def engine_row(name: str, batch: int, reps: int, warmup: int, folder: Path) -> dict[str, Any]:
    """CUDA + TensorRT: dense and sparse engines of one model, paired latency and per-layer picks/times."""
    import numpy as np
    import onnx

    from pipeline.backends.tensorrt import TensorRTBackend
    from pipeline.backends.tensorrt.engine import import_tensorrt, trt_version
    from pipeline.export.onnx import ModelProtoFromTorch
    from pipeline.recipe.config import InputSpec

    recipe, dense, sparse, _ = masked_model(name)
    batch = batch or recipe.verify.serving_batch
    recipe.build.max_batch = max(recipe.build.max_batch, batch)
    fp16_graph = trt_version(import_tensorrt())[0] >= 11  # TensorRT 11 has no FP16 flag: build the FP16 graph
    backend, runners, builds = TensorRTBackend(), {}, {}
    for variant, net in (("dense", dense), ("sparse", sparse)):
        path = folder / name / f"{variant}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(ModelProtoFromTorch(net, recipe.input_shape, 18, "input", "logits", fp16=fp16_graph), path)
        spec = InputSpec.of(recipe)
        builds[variant] = backend.build(path, folder / name, variant, recipe.build, spec, sparse=variant == "sparse")
        runners[variant] = backend.load(builds[variant].engine_path, recipe)
    data = np.random.default_rng(0).standard_normal((batch, *recipe.input_shape)).astype(np.float32)
    times = paired_times(
        lambda: runners["dense"].time_batch(data, 1, 0)[0],
        lambda: runners["sparse"].time_batch(data, 1, 0)[0],
        reps,
        warmup,
        lambda run: run(),
    )
    report = builds["sparse"].sparse_layers
    layer_ms = {variant: runner.layer_times(batch=batch) for variant, runner in runners.items()}
    methods = {variant: runner.timing_method for variant, runner in runners.items()}
    for runner in runners.values():
        runner.close()
    return {
        "model": name,
        "batch": batch,
        **ratio_row(*times),
        "method": f"TensorRT {methods['sparse']}",
        "eligible": report["eligible"],
        "picked_sparse": report["picked_sparse"],
        "notes": report["notes"],
        "sparse_blocks": report.get("sparse_blocks", []),
        "layer_ms": layer_ms,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of the GEMM and engine rows."""
    lines = [
        f"{'model':<14} {'layer':<28} {'kind':<8} {'M x N x K':<20} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>9}"
        "  what ran (2:4)"
    ]
    for row in rows:
        shape = f"{row.get('m', '')}x{row.get('n', '')}x{row.get('k', '')}" if "k" in row else "engine"
        if row.get("skip"):
            lines.append(f"{row['model']:<14} {row['layer']:<28} {row['kind']:<8} {shape:<20} skipped: {row['skip']}")
        else:
            lines.append(
                f"{row['model']:<14} {row.get('layer', '(whole engine)'):<28} {row.get('kind', 'trt'):<8} "
                f"{shape:<20} {row['dense_ms']:>9.4f} {row['sparse_ms']:>9.4f} {row['speedup']:>8.2f}x"
                f"  {row.get('method', '')}"
            )
    return "\n".join(lines)


def tensorrt_available() -> tuple[bool, str]:
    from pipeline.backends.tensorrt import TensorRTBackend

    return TensorRTBackend().available()


def run(options: Options) -> int:
    require_cuda()
    models = [name for name in options.models.split(",") if name]
    path = Path(options.out) / "gpu_check.json"
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": f"python -m pipeline gpu-check --models {options.models} --steps "
        f"{options.steps} --reps {options.reps}",
        "gemms": [],
        "engines": [],
    }
    save = lambda: write_json(path, report)  # noqa: E731  after each step: a late failure keeps the rest
    print(f"gpu-check on {report['gpu']}: mask training of {DEMO} on CUDA ({options.steps} steps) ...", flush=True)
    report["mask_training"] = train_demo(options.steps)
    save()
    for name in models:
        report["gemms"] += gemm_rows(name, options.batch, options.reps, options.warmup)
        save()
    ok, why = tensorrt_available()
    report["tensorrt"] = why
    save()
    folder = Path(options.out) / "gpu_check"
    for name in models if ok else []:
        report["engines"].append(engine_row(name, options.batch, options.reps, options.warmup, folder))
        save()
    print(table(report["gemms"] + report["engines"]))
    print(f"mask training: {report['mask_training']['steps_per_second']} steps/s; tensorrt: {why}")
    print(f"report: {path}")
    return 0
