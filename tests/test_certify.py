import json

import torch
import torch.nn.functional as F

from pipeline.verify.certify import certify_masks, conv_operator_norm, worst_pruned_norm
from pipeline.cli import main
from pipeline.data.datasets import SyntheticDataset
from pipeline.recipe.registry import get_recipe
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.eligibility import find_layers
from pipeline.masks.methods import MethodContext, compute_masks
from pipeline.recipe.weights import build_network

DEVICE = torch.device("cpu")


def setup(seed=0):
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(seed)
    model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, classifier="fc")
    result = compute_masks("magnitude", MethodContext(recipe, model, report, log=lambda _: None))
    data = SyntheticDataset(48, recipe.input_shape, 10, seed=3)
    return recipe, result.dense_state_dict, result.artifact, data


def run(recipe, state, artifact, data, updated=None):
    return certify_masks(lambda: build_network(recipe), state, artifact, data, 16, DEVICE, updated_state=updated)


def test_bounds_hold_and_are_ordered():
    recipe, state, artifact, data = setup()
    updated = {k: v + 0.02 * torch.randn_like(v) if k.endswith("weight") else v for k, v in state.items()}
    report = run(recipe, state, artifact, data, updated)
    per = report["per_sample"]
    for part in (report["lemma_3_4"], report["lemma_3_5"], report["updated"]["lemma_3_4"],
                 report["updated"]["lemma_3_6"]):
        assert 0.0 <= part["certified_share"] <= 1.0
        assert part["bound_holds_share"] == 1.0  # measured ||f~ - f|| never exceeds the bound
        assert part["violations"] == 0
    assert (per["lemma_3_5"] >= per["lemma_3_4"]).all()  # any masking is never easier than the given one
    assert (per["lemma_3_6"] >= per["lemma_3_4_updated"]).all()  # reuse bound >= direct bound on W'
    assert report["lemma_3_5"]["certified_share"] <= report["lemma_3_4"]["certified_share"]
    assert 0.0 <= report["prediction_unchanged_share"] <= 1.0


def test_nearly_sparse_weights_are_mostly_certified_and_never_wrongly():
    recipe, state, artifact, data = setup(1)
    sparse = apply_masks(state, artifact)
    exact = run(recipe, sparse, artifact, data)  # the masks prune nothing: the bound is zero
    assert float(exact["per_sample"]["lemma_3_4"].max()) == 0.0
    assert exact["lemma_3_4"]["certified_share"] == float((exact["per_sample"]["margin"] > 0).double().mean())
    assert exact["lemma_3_5"]["certified_share"] < exact["lemma_3_4"]["certified_share"]
    noisy = {k: v + 1e-4 * torch.randn_like(v) * (v == 0) if k.endswith("weight") and v.dim() > 1 else v
             for k, v in sparse.items()}
    near = run(recipe, noisy, artifact, data)
    assert 0.5 < near["lemma_3_4"]["certified_share"] < 1.0 + 1e-9
    assert near["lemma_3_4"]["violations"] == 0 and near["lemma_3_4"]["bound_holds_share"] == 1.0


def test_convolution_norm_bound_against_the_explicit_operator():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    for stride, padding in [(1, 1), (2, 1), (1, 0)]:
        def conv(x):
            return F.conv2d(x, weight, stride=stride, padding=padding)
        matrix = torch.autograd.functional.jacobian(conv, torch.zeros(1, 4, 7, 7, dtype=torch.float64))
        exact = float(torch.linalg.matrix_norm(matrix.reshape(-1, 4 * 49), ord=2))
        bound = conv_operator_norm(weight, (7, 7), stride, padding)
        assert exact <= bound <= 3.0 * float(weight.norm())  # sqrt(R*S) * ||W||_F is the crude bound
    pruned = weight * (torch.rand_like(weight) < 0.5)
    assert conv_operator_norm(weight, (7, 7), 1, 1) >= conv_operator_norm(weight[:, :, 1:2, 1:2], (7, 7), 1, 0) - 1e-9
    assert conv_operator_norm(pruned, (7, 7), 1, 1) <= conv_operator_norm(pruned.abs(), (7, 7), 1, 1) + 1e-9


def test_worst_case_pruned_norm_covers_every_mask():
    torch.manual_seed(1)
    weight = torch.randn(8, 8, 3, 3)
    pi = worst_pruned_norm(weight, 2, 4)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randint(0, 6, (8, 3, 3, 2), generator=generator)
        mask = LayerMask("x", [8, 8, 3, 3], 2, 4, indices).mask()
        assert conv_operator_norm(weight * (1 - mask), (6, 6), 1, 1) <= pi


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
