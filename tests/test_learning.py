"""learn_masks in-process on the tiny smoke model: best masks, prior, validation split, --unlabeled."""

import copy

import pytest
import torch

from pipeline.data.datasets import DataBundle, SyntheticDataset, build_datasets
from pipeline.masks.eligibility import find_layers
from pipeline.masks.learning import MaskLearning, learn_masks, split_training_images
from pipeline.masks.mask_step import AUTO_LOSS_UNLABELED, LayerOutputs, loss_terms, mask_loss
from pipeline.masks.patterns import magnitude_indices
from pipeline.recipe.config import apply_override
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network


def tiny(*overrides):
    recipe = get_recipe("tiny_resnet")
    for assignment in ("data.synthetic_size=256", "masks.checkpoint_every=0", *overrides):
        apply_override(recipe, assignment)
    torch.manual_seed(0)
    model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, [], [], recipe.classifier, False)
    return recipe, model, report


def test_a_destructive_run_keeping_the_best_masks_returns_the_prior_masks_and_says_so():
    """lr 50 scrambles the logits; with masks.keep = best the masks returned are the step-0 magnitude ones
    unless training found strictly better ones on the validation split, and `beat_prior` tells which."""
    recipe, model, report = tiny("masks.steps=6", "masks.lr=50", "masks.eval_every=2", "masks.keep=best")
    dense = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name in {layer.name for layer in report.masked}
    }
    result = learn_masks(
        model, report, MaskLearning.of(recipe), build_datasets(recipe), torch.device("cpu"), log=lambda _: None
    )
    assert [point["step"] for point in result.history] == [0, 2, 4, 6]
    scores = [point["top1"] for point in result.history]
    assert result.start_score == scores[0] and result.best_score == max(scores)
    assert result.best_step == result.history[scores.index(max(scores))]["step"]  # ties keep the older
    assert (result.kept_step, result.kept_score) == (result.best_step, result.best_score)
    assert result.beat_prior == (result.best_step > 0)
    if not result.beat_prior:
        assert all(torch.equal(result.indices[name], magnitude_indices(weight, 2, 4)) for name, weight in dense.items())
    assert any(point["changed"] > 0 for point in result.history[1:])  # the run did move the masks


@pytest.mark.parametrize(
    "scores, kept_step",
    [
        ([50.0, 60.0, 45.0, 55.0], 6),  # final above the prior: final
        ([50.0, 60.0, 45.0, 40.0], 2),
    ],
)  # below it: the best masks (step 2)
def test_the_final_masks_are_kept_unless_they_score_below_the_prior(monkeypatch, scores, kept_step):
    """masks.keep = final (the default) returns the argmax of the last logits, scored by the last evaluation;
    when that score is below the prior's at step 0, the best masks seen instead. The validation scores are
    scripted so that both branches are taken whatever the tiny model learns."""
    from pipeline.masks.gumbel import current_indices
    from pipeline.masks.learning import MaskTraining

    recipe, model, report = tiny("masks.steps=6", "masks.lr=50", "masks.eval_every=2", "masks.stop_patience=0")
    script = iter(scores)
    monkeypatch.setattr(MaskTraining, "validation_metrics", lambda self: {"top1": next(script)})
    seen = {}
    result = learn_masks(
        model,
        report,
        MaskLearning.of(recipe),
        build_datasets(recipe),
        torch.device("cpu"),
        log=lambda _: None,
        on_evaluation=lambda training, point: seen.update({point["step"]: current_indices(training.model)}),
    )
    assert [point["top1"] for point in result.history] == scores and result.best_step == 2
    assert result.kept_step == kept_step and result.kept_score == scores[kept_step // 2]
    assert any(not torch.equal(seen[2][name], seen[6][name]) for name in seen[6])  # the two candidates differ
    assert all(torch.equal(result.indices[name], seen[kept_step][name]) for name in seen[6])
    assert result.beat_prior and result.kept_why.startswith("final" if kept_step == 6 else "best: the final masks")


def test_validation_split_is_held_out_from_the_training_images_only():
    recipe, _, _ = tiny("masks.validation_images=1000", "masks.train_images=200")
    data = build_datasets(recipe)
    train, validation = split_training_images(data, recipe.masks)
    assert len(validation) == 40 and len(train) == 160  # at most a fifth of the 200-image subset
    assert validation.dataset is data.plain_train and train.dataset is data.train
    assert not set(validation.indices) & set(train.indices) and len(set(train.indices) | set(validation.indices)) == 200
    apply_override(recipe, "masks.validation_images=0")
    assert split_training_images(data, recipe.masks)[1] is None


class NoLabels(SyntheticDataset):
    """Images with labels no loss can use: cross-entropy on them raises."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.labels = torch.full_like(self.labels, 10**6)


def test_unlabeled_runs_distill_only_and_scores_agreement_with_the_dense_model():
    recipe, model, report = tiny("masks.steps=3", "masks.eval_every=3")
    data = build_datasets(recipe)
    unlabeled = DataBundle(
        NoLabels(256, recipe.input_shape, recipe.num_classes, 1), data.eval, "synthetic", "no labels", False
    )
    result = learn_masks(
        model, report, MaskLearning.of(recipe), unlabeled, torch.device("cpu"), unlabeled=True, log=lambda _: None
    )
    assert result.loss == AUTO_LOSS_UNLABELED and result.steps == 3
    assert "ce" not in loss_terms(result.loss)
    # step 0: the prior's masks against the dense model's own predictions (never the unusable labels)
    assert 0.0 < result.start_score <= 100.0


def test_kept_magnitude_regulariser_is_wired_into_the_loss():
    """From a uniform start, a dominant masks.kept_magnitude_weight ends with masks keeping more |w|
    than the same run without it (same seed, same batches)."""
    from pipeline.masks.patterns import mask_from_indices

    def kept_share(dense, indices):
        kept = sum(float((w.abs() * mask_from_indices(indices[name], 2, 4)).sum()) for name, w in dense.items())
        return kept / sum(float(w.abs().sum()) for w in dense.values())

    shares = {}
    for weight in (0.0, 1000.0):
        recipe, model, report = tiny(
            "masks.steps=20",
            "masks.prior=uniform",
            "masks.lr=0.5",
            "masks.eval_every=20",
            "masks.validation_images=0",
            f"masks.kept_magnitude_weight={weight}",
        )
        dense = {layer.name: model.get_submodule(layer.name).weight.detach().clone() for layer in report.masked}
        result = learn_masks(
            model, report, MaskLearning.of(recipe), build_datasets(recipe), torch.device("cpu"), log=lambda _: None
        )
        shares[weight] = kept_share(dense, result.indices)
    assert shares[1000.0] > shares[0.0] + 0.05


def test_layer_outputs_record_only_while_recording_and_in_layer_order():
    recipe, model, report = tiny()
    teacher = copy.deepcopy(model)
    names = [layer.name for layer in report.masked][::-1]
    images = torch.randn(2, *recipe.input_shape)
    outputs = LayerOutputs(model, teacher, names)
    model(images)
    assert outputs.outputs == ({}, {})  # evaluations keep nothing
    with outputs.recording():
        model(images)
        teacher(images)
    student, dense = outputs.take()
    assert [tuple(t.shape) for t in student] == [tuple(t.shape) for t in dense] and len(student) == len(names)
    assert all(torch.equal(s, t) for s, t in zip(student, dense))  # same weights, no masks yet
    assert outputs.outputs == ({}, {})
    outputs.remove()
    with outputs.recording():
        model(images)
    assert outputs.outputs == ({}, {})  # hooks gone


def test_features_term_pulls_the_masks_towards_the_dense_layer_outputs():
    """From a uniform start, distilling the masked layers' outputs (no labels, no logits) ends with a lower
    feature error than the prior's masks had, and the loss refuses to run without the outputs."""
    from pipeline.masks.gumbel import attach_masks, current_indices, use_argmax_masks

    recipe, model, report = tiny(
        "masks.steps=30",
        "masks.prior=uniform",
        "masks.lr=0.3",
        "masks.eval_every=30",
        "masks.validation_images=0",
        "masks.loss=features",
    )
    dense = copy.deepcopy(model)
    names = [layer.name for layer in report.masked]
    images = torch.stack([build_datasets(recipe).train[i][0] for i in range(64)])

    def feature_error(indices):
        masked = copy.deepcopy(model)
        use_argmax_masks(masked, indices)
        outputs = LayerOutputs(masked.eval(), dense, names)
        with torch.no_grad(), outputs.recording():
            masked(images)
            dense(images)
        return float(mask_loss(images.new_zeros(1, 1), None, None, "features", 1.0, outputs.take()))

    started = copy.deepcopy(model)
    attach_masks(started, report, 2, 4, "uniform", recipe.masks.prior_strength, recipe.masks.seed)
    start = current_indices(started)
    data = build_datasets(recipe)
    result = learn_masks(
        model, report, MaskLearning.of(recipe), data, torch.device("cpu"), unlabeled=True, log=lambda _: None
    )
    assert result.loss == "features"
    assert feature_error(result.indices) < 0.8 * feature_error(start)
    with pytest.raises(ValueError, match="layer outputs"):
        mask_loss(images.new_zeros(1, 1), None, None, "features", 1.0)


def test_loss_terms_add_up_and_pseudo_labels_are_the_dense_models_classes():
    import torch.nn.functional as F

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    ce = F.cross_entropy(student, labels)
    pseudo = F.cross_entropy(student, teacher.argmax(1))
    assert torch.allclose(mask_loss(student, labels, None, "ce", 1.0), ce)
    assert torch.allclose(mask_loss(student, None, teacher, "pseudo", 1.0), pseudo)
    distill = mask_loss(student, None, teacher, "distill", 1.0)
    assert torch.allclose(mask_loss(student, labels, teacher, "ce+pseudo+distill", 1.0), ce + pseudo + distill)
    assert loss_terms("ce+distill") == {"ce", "distill"}
