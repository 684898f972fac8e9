"""`gpu-check` on CPU: everything but the CUDA calls, and the CUDA mask-training settings forced on CPU.

The stage has not run on a GPU. Here: its refusal without one (exit 2, one line), the GEMM each masked layer
runs and why others are skipped, the paired A B B A timing order, the report file and table (with the
CUDA-only timing replaced by CPU timing of the same callables), and the mask-training step with the
settings a CUDA run uses (channels_last, bfloat16 autocast) running on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.masks import learning
from pipeline.masks.learning import MaskLearning
from pipeline.stages import gpu_check


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    from nm_fixtures import cli

    result = cli("gpu-check")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: gpu-check needs a CUDA GPU")


def test_layer_gemms_shapes_and_skip_reasons():
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Conv2d(32, 64, 1, stride=2),
        nn.Conv2d(64, 64, 3, padding=1, groups=64),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 24),
        nn.Linear(24, 32),
    )
    gemms = {g.layer: g for g in gpu_check.layer_gemms(model, ["0", "1", "4", "5"], [16, 8, 8], batch=32)}
    rows, cols = gpu_check.sparse_min_shape()
    assert (rows, cols) == (16, 16)  # cuSPARSELt FP16, from torch's table
    assert (gemms["1"].kind, gemms["1"].m, gemms["1"].n, gemms["1"].k, gemms["1"].skip) == (
        "conv1x1",
        512,
        64,
        32,
        None,
    )
    assert gemms["0"].skip.startswith("3x3 conv: not one GEMM")
    assert "N=24, K=1024" in gemms["4"].skip and gemms["4"].m == 32
    assert (gemms["5"].m, gemms["5"].n, gemms["5"].k, gemms["5"].skip) == (32, 32, 24, None) or "K=24" in gemms[
        "5"
    ].skip


def test_paired_times_interleave_abba_after_warmup():
    calls = []
    times = gpu_check.paired_times(
        lambda: calls.append("a"),
        lambda: calls.append("b"),
        reps=4,
        warmup=2,
        timer=lambda run: (run(), float(len(calls)))[1],
    )
    assert calls == ["a", "b", "a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert times == ([5.0, 8.0, 9.0, 12.0], [6.0, 7.0, 10.0, 11.0])
    row = gpu_check.ratio_row([2.0, 4.0, 3.0], [1.0, 2.0, 1.5])
    assert row == {"dense_ms": 3.0, "sparse_ms": 1.5, "speedup": 2.0}


def test_masked_model_is_two_of_four_on_the_masked_layers_only():
    recipe, dense, sparse, report = gpu_check.masked_model("tiny_resnet")
    modules = dict(sparse.named_modules())
    dense_modules = dict(dense.named_modules())
    for layer in report.masked:
        weight = modules[layer.name].weight
        blocks = weight.detach().movedim(1, -1).reshape(-1, 4)
        assert int((blocks != 0).sum(1).max()) <= 2
        kept = weight != 0
        assert torch.equal(weight[kept], dense_modules[layer.name].weight[kept])
    assert report.masked


def test_report_file_and_table_with_the_cuda_timing_replaced(tmp_path, monkeypatch, capsys):
    """run() end to end on CPU: only require_cuda, the device name and the CUDA timing of one GEMM are replaced."""
    import time

    def cpu_time_gemm(gemm, weight, reps, warmup):
        w = weight.detach().reshape(gemm.n, gemm.k)
        x = torch.randn(gemm.m, gemm.k)

        def timer(run):
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3

        times = gpu_check.paired_times(lambda: x @ w.T, lambda: x @ w.T, reps, warmup, timer)
        return {**gpu_check.asdict(gemm), **gpu_check.ratio_row(*times), "outputs_agree": True}

    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "CPU stand-in")
    monkeypatch.setattr(gpu_check, "time_gemm", cpu_time_gemm)
    monkeypatch.setattr(gpu_check, "train_demo", lambda steps: {"steps": steps, "steps_per_second": 1.0})
    options = gpu_check.Options(models="tiny_resnet", steps=2, reps=3, warmup=1, out=str(tmp_path))
    assert gpu_check.run(options) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["gpu"] == "CPU stand-in" and report["engines"] == [] and "not installed" in report["tensorrt"]
    timed = [row for row in report["gemms"] if not row["skip"]]
    skipped = [row for row in report["gemms"] if row["skip"]]
    assert all(row["dense_ms"] > 0 and row["sparse_ms"] > 0 for row in timed)
    assert len(timed) + len(skipped) == len(gpu_check.masked_model("tiny_resnet")[3].masked)
    out = capsys.readouterr().out
    assert all(f"skipped: {row['skip']}" in out for row in skipped) and "speed-up" in out


def test_options_are_checked():
    with pytest.raises(Exception, match="--reps 1: not valid"):
        gpu_check.Options(reps=1)


def test_mask_training_step_runs_with_the_cuda_settings_on_cpu():
    """The code a CUDA run executes (channels_last model and images, bfloat16 autocast) runs here first."""
    from pipeline.data.datasets import build_datasets
    from pipeline.masks.eligibility import find_layers
    from pipeline.recipe.config import apply_override
    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network
    from pipeline.training import StepSettings

    recipe = get_recipe("tiny_resnet")
    for assignment in ("data.synthetic_size=128", "masks.checkpoint_every=0", "masks.steps=3", "masks.eval_every=3"):
        apply_override(recipe, assignment)
    torch.manual_seed(0)
    model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, [], [], recipe.classifier, False)
    seen = []

    def record(module, args, out):
        if torch.is_autocast_enabled("cpu"):  # the training steps (evaluation runs without autocast)
            seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype))

    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(record)
    result = learning.learn_masks(
        model,
        report,
        MaskLearning.of(recipe),
        build_datasets(recipe),
        torch.device("cpu"),
        log=lambda _: None,
        settings=StepSettings.for_device(torch.device("cpu"), True),
    )
    assert result.steps == 3 and len(seen) >= 3 and set(seen) == {(True, torch.bfloat16)}
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(logits).all() for logits in result.logits.values())


@pytest.mark.slow  # the demo network (7 s on an EPYC); the CUDA step settings on CPU have the fast test above
def test_demo_mask_training_report_with_the_cuda_settings_on_cpu():
    """gpu_check.train_demo, the step it times on CUDA, on CPU for two steps."""
    row = gpu_check.train_demo(2, device="cpu")
    assert row["model"] == gpu_check.DEMO and row["steps"] == 2 and row["steps_per_second"] > 0


# ----------------------------------------------------------------------------- issue 35 (Why 4)
def test_convnext_t_linear_gemms_run_on_nhwc_rows():
    """ConvNeXt's Linear layers see [N, H, W, C] tensors: their GEMM's M is batch x H x W (stage 1: 32 x 56 x 56 at
    224 px), not the batch; the classifier's M stays the batch."""
    recipe, _, model, report = gpu_check.masked_model("convnext_t")
    batch = 32
    gemms = gpu_check.layer_gemms(model, [layer.name for layer in report.masked], recipe.input_shape, batch)
    side = recipe.input_shape[1] // 4  # the stem's 4x4 patchify
    stage1 = [g for g in gemms if g.layer.startswith("features.1.")]
    assert stage1 and all(g.kind == "linear" and g.m == batch * side * side for g in stage1)
    assert {(g.n, g.k) for g in stage1} == {(384, 96), (96, 384)}
    stage4 = [g for g in gemms if g.layer.startswith("features.7.")]
    assert stage4 and all(g.m == batch * (side // 8) ** 2 for g in stage4)
    head = [g for g in gemms if g.layer == recipe.classifier]
    assert all(g.m == batch for g in head)


def test_each_sample_is_many_calls_between_one_event_pair():
    from tests.trt_fakes import Clock, FakeCuda

    clock = Clock()

    def gemm():
        clock.gpu_ms += 0.01  # a 10 us kernel: one call per event pair would time the launch
        clock.host_ms += 0.02

    timer = gpu_check.event_timer(gemm, clock=FakeCuda(clock))
    assert timer.calls == 100 and gpu_check.sample_ms(timer) == pytest.approx(0.01)
    dense, sparse = gpu_check.paired_times(timer, timer, reps=2, warmup=1, timer=gpu_check.sample_ms)
    assert dense == pytest.approx([0.01, 0.01]) and sparse == pytest.approx([0.01, 0.01])


def test_algorithm_search_is_named_when_pytorch_cannot_run_it():
    alg, why = gpu_check.searched_alg(torch.zeros(4, 4), torch.zeros(4, 4))
    assert alg is None and "no algorithm search" in why


def test_the_json_is_rewritten_after_each_step(tmp_path, monkeypatch):
    """A failure in a late step keeps what the earlier steps measured."""
    calls = []

    def gemm_rows(name, batch, reps, warmup):
        calls.append(name)
        if name == "second":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [{"model": name, "layer": "fc", "method": "PyTorch eager F.linear, CUSPARSELT alg 3"}]

    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "CPU stand-in")
    monkeypatch.setattr(gpu_check, "train_demo", lambda steps: {"steps": steps, "steps_per_second": 1.0})
    monkeypatch.setattr(gpu_check, "gemm_rows", gemm_rows)
    with pytest.raises(RuntimeError):
        gpu_check.run(gpu_check.Options(models="first,second", steps=2, reps=3, warmup=1, out=str(tmp_path)))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mask_training"]["steps"] == 2 and [row["model"] for row in report["gemms"]] == ["first"]
