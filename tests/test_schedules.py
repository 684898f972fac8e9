import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.splits import holdout_split
from pipeline.errors import PipelineError
from pipeline.masks.patterns import magnitude_indices, pattern_table
from pipeline.masks.schedules import (
    BestMasks,
    PlateauRule,
    distillation_loss,
    epochs_for_budget,
    feature_distillation_loss,
    keep_masks,
    prior_logits,
    sampling_probabilities,
    steps_per_epoch,
    temperature,
    warmup_cosine_factor,
    warmup_steps,
)


def test_budget_gives_epochs_for_any_dataset_size():
    assert steps_per_epoch(1400, 64) == 21
    assert epochs_for_budget(2100, 1400, 64) == pytest.approx(100.0)
    assert epochs_for_budget(2100, 60000, 128) == pytest.approx(2100 / 468)
    assert epochs_for_budget(100, 60000, 128, world_size=2) == pytest.approx(100 / 234)
    with pytest.raises(PipelineError, match="fewer than one batch"):
        steps_per_epoch(50, 64)
    with pytest.raises(PipelineError, match="at least 1"):
        epochs_for_budget(0, 1000, 10)


def test_warmup_then_cosine_reaches_the_final_factor_on_the_last_step():
    total, warm = 100, warmup_steps(100, 0.05)
    assert warm == 5
    factors = [warmup_cosine_factor(step, total, warm, final=0.1) for step in range(total)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # monotone decay after warm-up
    assert factors[5 + 47] == pytest.approx(0.55, abs=0.02)  # half-way down the cosine
    assert warmup_steps(1) == 0 and warmup_steps(10, 0.0) == 0
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total, warm, 0.1))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.4)


@pytest.mark.parametrize("schedule", ["linear", "exponential", "cosine"])
def test_temperature_runs_from_start_to_end_over_the_budget(schedule):
    values = [temperature(step, 50, 1.0, 0.1, schedule) for step in range(50)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert temperature(7, 50, 0.5, 0.1, "constant") == 0.5
    with pytest.raises(PipelineError, match="tau_schedule"):
        temperature(0, 5, 1.0, 0.1, "bogus")


def _history(scores, changed):
    return [{"step": 10 * i, "top1": score, "changed": share} for i, (score, share) in enumerate(zip(scores, changed))]


def test_plateau_rule_needs_no_rise_beyond_one_image_and_a_settled_argmax():
    rule = PlateauRule(patience=3, changed=0.001, validation_images=1000)  # one image = 0.1 pt
    assert rule.resolution == pytest.approx(0.1)
    # +0.1 pt (one image) is within the split's resolution: not a rise; +0.2 pt is
    history = _history(
        [50.0, 60.0, 60.1, 60.0, 60.1, 60.3, 60.4, 60.3, 60.4], [0.0, 0.2, 0.01, 0.0005, 0.0002, 0.0001, 0.0, 0.0, 0.0]
    )
    assert rule.stale(history[:5]) == 3
    assert rule.reason(history[:4]) is None  # 2 stale evaluations only
    assert "plateau" in rule.reason(history[:5])  # 3 stale, argmax settled
    assert rule.first_stop(history) == 4
    # the same scores while the argmax still moves: no stop
    moving = _history([50.0, 60.0, 60.1, 60.0, 60.1], [0.0, 0.2, 0.01, 0.01, 0.01])
    assert rule.first_stop(moving) is None
    # a rise of two images restarts the count
    assert rule.stale(history) == 3  # 60.3 at index 5 rose 0.2 over 60.1's reference 60.0
    assert rule.first_stop(history[5:]) == 3


def test_plateau_rule_resolution_follows_the_validation_split():
    small = PlateauRule(patience=2, changed=0.01, validation_images=200)  # one image = 0.5 pt
    history = _history([80.0, 80.5, 81.0, 81.0, 81.5], [0.0] * 5)
    assert small.first_stop(history) == 4  # 81.0 rose beyond one image (0.5 pt) over 80.0; 81.5 does not over 81.0
    large = PlateauRule(patience=2, changed=0.01, validation_images=10000)
    assert large.first_stop(history) is None
    for bad in (
        {"patience": 0, "changed": 0.1, "validation_images": 10},
        {"patience": 2, "changed": 1.5, "validation_images": 10},
        {"patience": 2, "changed": 0.1, "validation_images": 0},
    ):
        with pytest.raises(PipelineError):
            PlateauRule(**bad)


def test_best_masks_never_fall_below_the_start():
    best = BestMasks()
    start = {"a": torch.tensor([1, 2])}
    assert best.update(80.0, 0, start) and not best.beat_start
    assert not best.update(79.0, 100, {"a": torch.tensor([3, 3])})
    assert not best.update(80.0, 200, {"a": torch.tensor([4, 4])})  # a tie keeps the older masks
    assert torch.equal(best.indices["a"], start["a"]) and not best.beat_start
    assert best.update(81.5, 300, {"a": torch.tensor([5, 5])}) and best.beat_start and best.step == 300


def test_kept_masks_are_the_final_ones_unless_they_fall_below_the_prior():
    best = BestMasks()
    start, better, final = {"a": torch.tensor([1, 2])}, {"a": torch.tensor([5, 5])}, {"a": torch.tensor([0, 4])}
    best.update(80.0, 0, start)
    best.update(81.5, 300, better)
    kept = keep_masks("final", best, final, 900, 80.0)  # a tie with the prior keeps the final masks
    assert kept.indices is final and (kept.step, kept.score, kept.why) == (900, 80.0, "final")
    kept = keep_masks("final", best, final, 900, 79.9)
    assert kept.indices is best.indices and (kept.step, kept.score) == (300, 81.5) and "below the prior" in kept.why
    kept = keep_masks("best", best, final, 900, 85.0)
    assert kept.indices is best.indices and (kept.step, kept.score) == (300, 81.5)
    kept = keep_masks("final", BestMasks(), final, 900, None)  # no validation split: nothing to choose with
    assert kept.indices is final and kept.score is None and kept.step == 900


def test_holdout_split_is_disjoint_seeded_and_complete():
    train, val = holdout_split(100, 15, seed=3)
    assert len(val) == 15 and sorted(train + val) == list(range(100))
    assert holdout_split(100, 15, seed=3) == (train, val) and holdout_split(100, 15, seed=4)[1] != val
    with pytest.raises(PipelineError):
        holdout_split(10, 10, 0)


def test_distillation_loss_is_scaled_kl_and_zero_for_equal_logits():
    torch.manual_seed(0)
    teacher, student = torch.randn(8, 10), torch.randn(8, 10, requires_grad=True)
    assert float(distillation_loss(teacher, teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    loss = distillation_loss(student, teacher, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    with pytest.raises(PipelineError):
        distillation_loss(student, teacher, 0.0)


def test_feature_distillation_is_the_mean_relative_error_over_layers():
    torch.manual_seed(0)
    teacher = [torch.randn(4, 8, 5, 5), torch.randn(4, 16)]
    assert float(feature_distillation_loss([t.clone() for t in teacher], teacher)) == 0.0
    # layer 0 off by 10% of its norm everywhere, layer 1 exact: the mean of 0.01 and 0
    student = [teacher[0] * 1.1, teacher[1].clone().requires_grad_()]
    assert float(feature_distillation_loss(student, teacher).detach()) == pytest.approx(0.005, rel=1e-5)
    # each layer weighs alike whatever its scale: scaling one layer's outputs and targets changes nothing
    scaled = feature_distillation_loss([student[0] * 1000, student[1]], [teacher[0] * 1000, teacher[1]])
    assert float(scaled.detach()) == pytest.approx(0.005, rel=1e-4)
    wrong = [teacher[0], teacher[1] + 1.0]
    wrong[1].requires_grad_()
    feature_distillation_loss(wrong, teacher).backward()
    assert float(wrong[1].grad.abs().sum()) > 0
    with pytest.raises(PipelineError, match="one teacher output per student layer"):
        feature_distillation_loss(student[:1], teacher)


def test_prior_logits_rank_patterns_by_overlap_with_the_prior_mask():
    torch.manual_seed(1)
    weight = torch.randn(4, 8, 3, 3)
    prior = magnitude_indices(weight, 2, 4)  # [4, 3, 3, 2]
    logits = prior_logits(prior, 2, 4, strength=6.0)  # [6, 4, 3, 3, 2]
    assert logits.shape == (6, *prior.shape)
    assert torch.equal(logits.argmax(0), prior)
    assert torch.allclose(logits.sum(0), torch.zeros(prior.shape), atol=1e-6)  # centred
    table = pattern_table(2, 4)
    overlaps = (table @ table[prior[0, 0, 0, 0]]).tolist()  # shared kept positions per pattern
    values = logits[:, 0, 0, 0, 0].tolist()
    for a, b in itertools.product(range(6), range(6)):
        assert (overlaps[a] > overlaps[b]) == (values[a] > values[b] + 1e-9)
    assert float(prior_logits(prior, 2, 4, 0.0).abs().max()) == 0.0


def test_logit_scaling():
    logits = torch.tensor([[1.0], [0.0]])  # two patterns, one block
    noise = torch.tensor([[0.0], [0.5]])
    low = sampling_probabilities(logits, noise, tau=1.0, scale=1.0)
    high = sampling_probabilities(logits, noise, tau=1.0, scale=10.0)
    assert torch.allclose(low.sum(0), torch.ones(1)) and float(high[0, 0]) > float(low[0, 0])
