import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cli import main
from pipeline.data.datasets import SyntheticDataset
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.eligibility import find_layers
from pipeline.masks.methods import MethodContext, compute_masks
from pipeline.masks.patterns import magnitude_indices
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network
from pipeline.verify.certify import BoundPropagator, certify_masks, infinity_norm, lemma_terms
from tests.nm_fixtures import dense_weights_file

DEVICE = torch.device("cpu")


def setup(seed=0, weights=None):
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(seed)
    model = build_network(recipe).eval()
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    report = find_layers(model, recipe.input_shape, 4, classifier="fc")
    result = compute_masks("magnitude", MethodContext(recipe, model, report, log=lambda _: None))
    data = SyntheticDataset(48, recipe.input_shape, 10, seed=3)
    return recipe, result.dense_state_dict, result.artifact, data


def run(recipe, state, artifact, data, updated=None):
    return certify_masks(lambda: build_network(recipe), state, artifact, data, 16, DEVICE, updated_state=updated)


def test_every_bound_holds_on_a_tiny_resnet_with_batchnorm_statistics(tmp_path):
    recipe, state, artifact, data = setup(weights=dense_weights_file(tmp_path))
    updated = {k: v + 0.02 * torch.randn_like(v) if k.endswith("weight") else v for k, v in state.items()}
    report = run(recipe, state, artifact, data, updated)
    per = report["per_sample"]
    for part in (
        report["lemma_3_4"],
        report["lemma_3_5"],
        report["updated"]["lemma_3_4"],
        report["updated"]["lemma_3_6"],
    ):
        assert 0.0 <= part["certified_share"] <= 1.0
        assert part["bound_holds_share"] == 1.0  # measured ||f~ - f||_inf of the logits never exceeds the bound
        assert part["violations"] == 0
    assert bool((per["actual"] <= per["lemma_3_4"] * (1 + 1e-6)).all())
    assert bool((per["actual_reused"] <= per["lemma_3_6"] * (1 + 1e-6)).all())
    assert bool((per["actual_probability"] <= per["actual"]).all())  # softmax is 1-Lipschitz
    assert (per["lemma_3_5"] >= per["lemma_3_4"]).all()  # ||W|| >= ||(1 - B) W||: any mask is never easier
    assert report["lemma_3_5"]["certified_share"] <= report["lemma_3_4"]["certified_share"]
    assert bool((per["gamma"] <= 0.5).all()) and 0.0 <= report["prediction_unchanged_share"] <= 1.0


def test_lemma_3_6_without_an_update_is_lemma_3_5():
    """U = 0: the reuse bound's terms (||W|| + ||U||, Lipschitz ||V|| = ||W||) are Lemma 3.5's."""
    recipe, state, artifact, data = setup(2)
    report = run(recipe, state, artifact, data, dict(state))
    per = report["per_sample"]
    assert torch.allclose(per["lemma_3_6"], per["lemma_3_5"], rtol=1e-9)
    assert torch.equal(per["agree_reused"], per["agree"])


def chain(seed=0):
    """A bias-free chain f = L3 relu L2 relu L1: the paper's compositional classifier exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False)
    ).eval()


def test_single_masked_layer_gives_the_papers_formulas():
    """Masking only layer j = 2 (index 2): the propagated bound is eq. 30 of the proof,
    ||D|| ||x_(j-1)|| prod_(i > j) ||W_i||, below the lemma's closed form ||D|| ||x|| prod_(i != j) ||W_i||
    (valid here: no biases), and above the measured change."""
    model = chain()
    weights = [model[i].weight.detach() for i in (0, 2, 4)]
    mask = LayerMask("2", [8, 12], 2, 4, magnitude_indices(weights[1], 2, 4)).mask()
    x = torch.randn(32, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    bounds = {name: lemma_terms(modules, state, {"2": mask}, lemma) for name, lemma in [("3.4", "3.4"), ("3.5", "3.5")]}
    update = 0.05 * torch.randn(8, 12)
    updated = dict(state, **{"2.weight": state["2.weight"] + update})
    bounds["3.6"] = lemma_terms(modules, state, {"2": mask}, "3.6", updated)
    logits, errors = BoundPropagator(model, bounds).run(x)
    hidden = F.relu(x @ weights[0].T)  # x_(j-1)
    size, size_x = hidden.abs().amax(1).double(), x.abs().amax(1).double()
    pruned, after = infinity_norm(weights[1] * (1 - mask)), infinity_norm(weights[2])
    assert torch.allclose(errors["3.4"], pruned * size * after)
    assert torch.allclose(errors["3.5"], infinity_norm(weights[1]) * size * after)
    assert torch.allclose(errors["3.6"], (infinity_norm(weights[1]) + infinity_norm(update)) * size * after)
    closed = pruned * size_x * infinity_norm(weights[0]) * after
    assert bool((errors["3.4"] <= closed * (1 + 1e-9)).all())
    masked = model[4](F.relu(hidden @ (weights[1] * mask).T))
    reused = model[4](F.relu(hidden @ ((weights[1] + update) * mask).T))
    assert bool(((masked - logits).abs().amax(1) <= errors["3.4"]).all())
    assert bool(((reused - logits).abs().amax(1) <= errors["3.6"]).all())


def test_lemma_3_5_covers_arbitrary_masks_not_only_nm():
    model = chain(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"0": torch.ones(12, 16), "2": torch.ones(8, 12)}
    bound = lemma_terms(dict(model.named_modules()), state, masks, "3.5")
    x = torch.randn(64, 16)
    logits, errors = BoundPropagator(model, {"any": bound}).run(x)
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        masked = nn.Sequential(*[m for m in chain(1)]).eval()
        for index in ("0", "2"):
            layer = masked[int(index)]
            keep = (torch.rand(layer.weight.shape, generator=generator) < 0.3).float()
            layer.weight.data *= keep
        with torch.no_grad():
            assert bool(((masked(x) - logits).abs().amax(1) <= errors["any"]).all())


def test_infinity_norm_of_a_convolution_is_its_unfolded_matrix_norm():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    for stride, padding in [(1, 1), (2, 1), (1, 0)]:

        def conv(x, stride=stride, padding=padding):
            return F.conv2d(x, weight, stride=stride, padding=padding)

        matrix = torch.autograd.functional.jacobian(conv, torch.zeros(1, 4, 7, 7, dtype=torch.float64))
        exact = float(matrix.reshape(-1, 4 * 49).abs().sum(1).max())
        assert exact == pytest.approx(infinity_norm(weight), rel=1e-5)  # an interior output sees the whole kernel
    assert infinity_norm(torch.tensor([-3.0, 2.0])) == pytest.approx(3.0, rel=1e-5)


def test_exactly_sparse_weights_are_certified_wherever_the_prediction_is_defined():
    recipe, state, artifact, data = setup(1)
    sparse = apply_masks(state, artifact)
    exact = run(recipe, sparse, artifact, data)  # the masks prune nothing: the Lemma 3.4 bound is zero
    assert float(exact["per_sample"]["lemma_3_4"].max()) == 0.0
    assert exact["lemma_3_4"]["certified_share"] == float((exact["per_sample"]["gamma"] > 0).double().mean())
    assert exact["lemma_3_5"]["certified_share"] < exact["lemma_3_4"]["certified_share"]
    noisy = {
        k: v + 1e-9 * torch.randn_like(v) * (v == 0) if k.endswith("weight") and v.dim() > 1 else v
        for k, v in sparse.items()
    }
    near = run(recipe, noisy, artifact, data)  # the bound is ~1e6 x the measured change on random weights
    assert 0.5 < near["lemma_3_4"]["certified_share"] <= 1.0
    assert near["lemma_3_4"]["violations"] == 0 and near["lemma_3_4"]["bound_holds_share"] == 1.0


def test_certify_stage_writes_fractions(tmp_path, capsys):
    recipe, state, artifact, _ = setup()
    masks = tmp_path / "masks.pt"
    MaskArtifact(recipe.name, recipe.arch, "magnitude", artifact.layers).save(masks)
    assert main(["certify", "--model", "tiny_resnet", "--out", str(tmp_path), "--masks", str(masks)]) == 0
    summary = json.loads((tmp_path / "tiny_resnet" / "certify.json").read_text())
    for key in ("lemma_3_4", "lemma_3_5"):
        assert 0.0 <= summary[key]["certified_share"] <= 1.0
    assert "worst-case" in summary["note"]
    assert (tmp_path / "tiny_resnet" / "certify.md").is_file()
    assert main(["certify", "--model", "tiny_resnet", "--out", str(tmp_path / "none")]) == 2
    assert "no masks" in capsys.readouterr().err
