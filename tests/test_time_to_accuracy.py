"""Issue 21: the plateau rule (on by default, read off one run), the one training step and its CUDA settings
run on CPU, the RNG left alone, and DataLoader workers sized to the machine."""

import json

import pytest
import torch

from pipeline.cli import main
from pipeline.data.datasets import TensorImageDataset, build_datasets, loader_workers, make_loader, usable_cores
from pipeline.errors import PipelineError
from pipeline.masks.eligibility import find_layers
from pipeline.masks.gumbel import masked_modules
from pipeline.masks.learning import MaskLearning, learn_masks
from pipeline.masks.schedules import Cooldown, MaskSchedule, PlateauRule
from pipeline.recipe.config import MaskConfig, apply_override
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network
from pipeline.training import StepSettings, cross_entropy_loss, train_step


def tiny(*overrides):
    recipe = get_recipe("tiny_resnet")
    for assignment in ("data.synthetic_size=256", "masks.checkpoint_every=0", *overrides):
        apply_override(recipe, assignment)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, [], [], recipe.classifier, False)
    return recipe, model, report


def quiet(_):
    pass


def test_the_plateau_rule_is_on_by_default():
    assert MaskConfig().stop_patience > 0 and 0 < MaskConfig().stop_changed < 1


def test_a_run_with_the_rule_is_the_prefix_of_the_full_run_up_to_its_stop():
    """The rule reads the evaluation history only: where it stops a run is where `first_stop` says it would
    have stopped the full-budget run, with the same masks (what bench-masks reads off one run)."""
    common = ("masks.steps=40", "masks.eval_every=2", "masks.stop_changed=0.5", "masks.cooldown=0")
    recipe, model, report = tiny(*common, "masks.stop_patience=3")
    data = build_datasets(recipe)
    stopped = learn_masks(model, report, MaskLearning.of(recipe), data, torch.device("cpu"), log=quiet)
    full_recipe, full_model, _ = tiny(*common, "masks.stop_patience=0")
    full = learn_masks(full_model, report, MaskLearning.of(full_recipe), data, torch.device("cpu"), log=quiet)
    assert full.steps == 40 and full.stop_reason is None
    assert stopped.stop_reason and stopped.stop_reason.startswith("plateau") and stopped.steps < 40
    keys = ("step", "top1", "changed")
    assert [{k: p[k] for k in keys} for p in stopped.history] == [
        {k: p[k] for k in keys} for p in full.history[: len(stopped.history)]
    ]
    rule = PlateauRule(3, 0.5, full.validation_images)
    assert full.history[rule.first_stop(full.history)]["step"] == stopped.steps
    assert stopped.best_step <= stopped.steps and stopped.best_score == max(p["top1"] for p in stopped.history)


def test_the_cooldown_anneals_from_where_it_starts_to_the_final_values():
    schedule = MaskSchedule(100, 5, 0.0, 1.0, 0.1, "exponential")
    before = schedule.lr_factor(40), schedule.tau(40)
    schedule.cooldown = Cooldown(40, 20)
    assert (schedule.lr_factor(40), schedule.tau(40)) == before  # continuous where it starts
    assert schedule.lr_factor(60) == 0.0 and schedule.tau(60) == pytest.approx(0.1)
    factors, taus = [schedule.lr_factor(s) for s in range(40, 70)], [schedule.tau(s) for s in range(40, 70)]
    assert all(a > b for a, b in zip(factors[:20], factors[1:21])) and all(a > b for a, b in zip(taus[:20], taus[1:21]))
    assert schedule.base_factor(60) > 0.3 and schedule.base_tau(60) > 0.2  # the budget's schedules, still high there
    with pytest.raises(PipelineError, match="at least 1 step"):
        Cooldown(10, 0)


def test_a_plateau_with_a_moving_argmax_cools_down_then_stops_and_resumes_exactly(tmp_path):
    """The score plateaus while the argmax still moves (stop_changed 0 is never met while it moves): the rule
    anneals the learning rate and the temperature over masks.cooldown of the budget and stops at its end. Up
    to the cooldown the run is the full run; killed inside the cooldown and resumed, it ends the same."""
    import shutil

    common = (
        "masks.steps=80",
        "masks.eval_every=2",
        "masks.stop_changed=0",
        "masks.lr=0.5",
        "masks.cooldown=0.2",
        "masks.checkpoint_every=2",
    )
    recipe, model, report = tiny(*common, "masks.stop_patience=2")
    data = build_datasets(recipe)
    checkpoint, inside = tmp_path / "masks.ckpt", tmp_path / "inside.ckpt"

    def keep_a_checkpoint_inside_the_cooldown(training, point):
        cooldown = training.state.cooldown
        if cooldown and point["step"] == cooldown[0] + 6 and not inside.exists():
            shutil.copy(checkpoint, inside)  # written at step cooldown[0] + 4

    ruled = learn_masks(
        model,
        report,
        MaskLearning.of(recipe),
        data,
        torch.device("cpu"),
        log=quiet,
        checkpoint=checkpoint,
        on_evaluation=keep_a_checkpoint_inside_the_cooldown,
    )
    assert ruled.cooldown_start is not None, [(p["step"], p["top1"], p["changed"]) for p in ruled.history]
    assert ruled.steps == ruled.cooldown_start + 16 < 80  # 0.2 x 80 steps
    assert "annealed over 16 steps (masks.cooldown)" in ruled.stop_reason
    last = ruled.history[-1]
    assert last["lr"] == pytest.approx(0.0, abs=1e-9) and last["tau"] == pytest.approx(0.1)
    full_recipe, full_model, _ = tiny(*common, "masks.stop_patience=0")
    full = learn_masks(full_model, report, MaskLearning.of(full_recipe), data, torch.device("cpu"), log=quiet)
    keys = ("step", "top1", "changed", "lr")
    until = [p for p in ruled.history if p["step"] <= ruled.cooldown_start]
    assert [{k: p[k] for k in keys} for p in until] == [{k: p[k] for k in keys} for p in full.history[: len(until)]]
    assert full.history[len(until)]["lr"] > ruled.history[len(until)]["lr"]  # the schedules part there

    assert inside.exists()
    _, again, _ = tiny(*common, "masks.stop_patience=2")
    resumed = learn_masks(
        again, report, MaskLearning.of(recipe), data, torch.device("cpu"), log=quiet, checkpoint=inside, resume=True
    )
    assert [{k: p[k] for k in keys} for p in resumed.history] == [{k: p[k] for k in keys} for p in ruled.history]
    assert resumed.stop_reason == ruled.stop_reason and resumed.cooldown_start == ruled.cooldown_start
    assert all(torch.equal(resumed.logits[name], ruled.logits[name]) for name in ruled.logits)


def test_learning_leaves_the_global_rng_alone_and_is_deterministic():
    recipe, model, report = tiny("masks.steps=4", "masks.eval_every=2")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = learn_masks(model, report, MaskLearning.of(recipe), build_datasets(recipe), torch.device("cpu"), log=quiet)
    assert torch.equal(torch.get_rng_state(), before)
    _, model2, _ = tiny("masks.steps=4", "masks.eval_every=2")
    torch.manual_seed(99)  # another global state: same masks and logits
    second = learn_masks(
        model2, report, MaskLearning.of(recipe), build_datasets(recipe), torch.device("cpu"), log=quiet
    )
    assert all(torch.equal(first.logits[name], second.logits[name]) for name in first.logits)


def test_the_cuda_step_settings_run_on_cpu():
    """bfloat16 autocast and channels_last, forced on CPU: the code a GPU runs, run here first."""
    settings = StepSettings.for_device(torch.device("cpu"), cuda_path=True)
    assert settings.autocast and settings.channels_last
    assert not StepSettings.for_device(torch.device("cpu"), precision="float32").autocast
    recipe, model, report = tiny("masks.steps=3", "masks.eval_every=3")
    start = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name in {layer.name for layer in report.masked}
    }
    result = learn_masks(
        model,
        report,
        MaskLearning.of(recipe),
        build_datasets(recipe),
        torch.device("cpu"),
        log=quiet,
        settings=settings,
    )
    assert result.steps == 3 and all(torch.isfinite(logits).all() for logits in result.logits.values())
    conv = next(module for module in masked_modules(model).values() if module.weight.dim() == 4)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(module.weight, start[name]) for name, module in masked_modules(model).items())
    # the step itself: under autocast the model's output is bfloat16, and the loss still trains
    dense = settings.prepare_model(build_network(recipe))
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    images = settings.prepare_images(torch.randn(8, *recipe.input_shape), torch.device("cpu"))
    loss, output = train_step(
        dense.train(), images, torch.randint(0, 10, (8,)), cross_entropy_loss(), optimizer, settings=settings
    )
    assert output.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_precision_auto_is_bfloat16_only_where_it_is_faster(monkeypatch):
    """auto: bfloat16 autocast on CUDA and on CPUs whose flags name AMX bf16 tiles or AVX512-BF16, float32
    elsewhere; an explicit precision wins; a wrong one is refused in one line."""
    import pipeline.training as training

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(training, "cpu_has_bf16_units", lambda: False)
    assert not StepSettings.for_device(cpu).autocast and StepSettings.for_device(cuda).autocast
    assert StepSettings.for_device(cpu, precision="bfloat16").autocast
    assert StepSettings.for_device(cpu).describe() == "float32, channels_last"  # channels_last: faster on CPUs
    assert StepSettings.for_device(cuda, precision="float32").describe() == "float32"
    monkeypatch.setattr(training, "cpu_has_bf16_units", lambda: True)
    assert StepSettings.for_device(cpu).autocast and StepSettings.for_device(cpu).channels_last
    assert not StepSettings.for_device(cuda, precision="float32").autocast
    with pytest.raises(PipelineError, match="training precision 'fp16'"):
        StepSettings.for_device(cpu, precision="fp16")


def test_bf16_detection_reads_the_cpu_flags(tmp_path):
    from pipeline.training import cpu_has_bf16_units

    for flags, expected in (
        ("fpu avx512f amx_bf16 amx_tile amx_int8", True),
        ("fpu avx512f avx512_bf16", True),
        ("fpu avx2 fma", False),
        ("fpu avx512f avx512bw", False),
    ):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_bf16_units(str(cpuinfo)) is expected
    assert cpu_has_bf16_units(str(tmp_path / "missing")) is False


def test_pretraining_leaves_the_mask_validation_split_out():
    """The demo's dense model never trains on the images mask training validates on."""
    from pipeline.data.splits import mask_split, split_training_images, without_mask_validation

    recipe, _, _ = tiny()
    data = build_datasets(recipe)
    pretrain_images = without_mask_validation(data, recipe.masks)
    _, validation = split_training_images(data, recipe.masks)
    held_out = mask_split(len(data.train), recipe.masks)[1]
    assert validation is not None and len(validation) == len(held_out) > 0
    assert set(pretrain_images.indices).isdisjoint(held_out)
    assert len(pretrain_images) + len(held_out) == len(data.train)


def test_train_masks_cuda_path_flag_and_record(tmp_path):
    code = main(
        [
            "train-masks",
            "--model",
            "tiny_resnet",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--cuda-path",
            "--set",
            "data.synthetic_size=128",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "tiny_resnet" / "train_masks.json").read_text())
    assert summary["steps"] == 2 and summary["budget_steps"] == 2 and summary["stop_reason"] is None
    assert "masks.ckpt" in summary["files"]


def test_loader_workers_fit_the_machine():
    in_memory = TensorImageDataset(
        torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), [0.5], [0.5]
    )
    assert loader_workers(in_memory, 4) == 0  # whole batches from memory: workers would only copy them

    class Files(torch.utils.data.Dataset):  # no __getitems__: one file per item, as an image folder
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.zeros(1), 0

    assert loader_workers(Files(), 4) == min(4, usable_cores() - 1)
    assert loader_workers(Files(), 0) == 0
    loader = make_loader(Files(), batch_size=4, workers=4)
    assert loader.num_workers == loader_workers(Files(), 4)
    assert loader.persistent_workers == (loader.num_workers > 0)


def test_bench_masks_reads_the_rule_without_cooldown_off_one_run(tmp_path):
    code = main(
        [
            "bench-masks",
            "--model",
            "tiny_resnet",
            "--out",
            str(tmp_path),
            "--set",
            "masks.steps=20",
            "--set",
            "masks.eval_every=2",
            "--set",
            "masks.stop_changed=0.5",
            "--set",
            "masks.stop_patience=3",
            "--set",
            "masks.cooldown=0",
            "--set",
            "data.synthetic_size=128",
        ]
    )
    assert code == 0
    entry = json.loads((tmp_path / "tiny_resnet" / "bench_masks.json").read_text())
    assert entry["full_budget"]["step"] == 20 and entry["plateau"]["step"] < 20
    assert entry["plateau"]["seconds"] < entry["full_budget"]["seconds"]
    stop = PlateauRule(3, 0.5, entry["validation_images"]).first_stop(entry["history"])
    assert entry["history"][stop]["step"] == entry["plateau"]["step"] == entry["settled"]["step"]
    assert all("kept_test_top1" in point for point in entry["history"]) and "plateau_history" not in entry
    assert "| tiny_resnet | 20 | plateau, no cooldown (read off) |" in (tmp_path / "bench-masks.md").read_text()
    assert (tmp_path / "bench-masks.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_masks_runs_the_rule_with_its_cooldown_beside_the_full_budget(tmp_path):
    code = main(
        [
            "bench-masks",
            "--model",
            "tiny_resnet",
            "--out",
            str(tmp_path),
            "--set",
            "masks.steps=60",
            "--set",
            "masks.eval_every=2",
            "--set",
            "masks.stop_changed=0",
            "--set",
            "masks.stop_patience=2",
            "--set",
            "masks.lr=0.5",
            "--set",
            "masks.cooldown=0.2",
            "--set",
            "data.synthetic_size=256",
        ]
    )
    assert code == 0
    entry = json.loads((tmp_path / "tiny_resnet" / "bench_masks.json").read_text())
    plateau = entry["plateau"]
    assert entry["full_budget"]["step"] == 60 and plateau["cooldown_start"] is not None
    assert plateau["step"] == plateau["cooldown_start"] + 12 and "annealed" in plateau["reason"]
    assert entry["prefix_matches"] is True and entry["plateau_history"][-1]["step"] == plateau["step"]
    assert plateau["time_ratio"] == pytest.approx(plateau["seconds"] / entry["full_budget"]["seconds"])
    table = (tmp_path / "bench-masks.md").read_text()
    assert "| tiny_resnet | 60 | plateau + cooldown (the recipe's rule) |" in table and "no cooldown" in table


def test_bench_masks_labels_a_rule_run_that_stopped_without_its_cooldown(tmp_path):
    """With a cooldown configured, a run whose argmax settles by itself stops at the plateau: the table says so
    instead of naming a cooldown that never ran."""
    code = main(
        [
            "bench-masks",
            "--model",
            "tiny_resnet",
            "--out",
            str(tmp_path),
            "--set",
            "masks.steps=20",
            "--set",
            "masks.eval_every=2",
            "--set",
            "masks.stop_changed=0.5",
            "--set",
            "masks.stop_patience=3",
            "--set",
            "masks.cooldown=0.2",
            "--set",
            "data.synthetic_size=128",
        ]
    )
    assert code == 0
    entry = json.loads((tmp_path / "tiny_resnet" / "bench_masks.json").read_text())
    assert entry["plateau"]["cooldown_start"] is None and entry["plateau"]["step"] == entry["settled"]["step"]
    table = (tmp_path / "bench-masks.md").read_text()
    assert "plateau, settled (the recipe's rule)" in table and "plateau + cooldown" not in table


def test_evaluation_batches_take_the_models_memory_format():
    """evaluate() feeds channels_last batches to a channels_last model (faster on CPUs) and NCHW batches to an
    NCHW one, with the same accuracy either way."""
    from pipeline.recipe.nets import SmallResNet
    from pipeline.training import evaluate, has_channels_last_convs

    torch.manual_seed(0)
    model = SmallResNet(10, widths=(8, 16, 32), stem_stride=2).eval()
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    seen = []
    model.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride(1) == 1))
    assert not has_channels_last_convs(model)
    plain = evaluate(model, data, 16, torch.device("cpu"))
    assert seen and not any(seen)
    StepSettings(channels_last=True).prepare_model(model)
    assert has_channels_last_convs(model)
    seen.clear()
    channels_last = evaluate(model, data, 16, torch.device("cpu"))
    assert seen and all(seen)
    assert abs(channels_last["top1"] - plain["top1"]) <= 2.5  # one image of 40: only a near tie may flip
