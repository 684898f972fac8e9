import torch
from torch import nn

from pipeline.data.datasets import build_datasets
from pipeline.masks.activation_aware import damped, input_hessians
from pipeline.masks.adaprune import masked_least_squares, reconstruction_error, refit_kept_weights
from pipeline.masks.artifact import LayerMask, MaskArtifact
from pipeline.masks.eligibility import find_layers
from pipeline.masks.methods import CHANGES_WEIGHTS, MethodContext, compute_masks, masked_state
from pipeline.masks.patterns import magnitude_indices
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network

CPU = torch.device("cpu")


def test_masked_least_squares_matches_the_explicit_solution_per_row():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.1 * x[:, 1]  # correlated inputs: re-fitting has something to recover
    hessian = damped(x.T @ x / 200)
    weight = torch.randn(5, 16, generator=generator)
    indices = magnitude_indices(weight, 2, 4)
    mask = LayerMask("fc", [5, 16], 2, 4, indices).mask().bool()
    fitted = masked_least_squares(weight, mask, hessian, iterations=200, tolerance=1e-10)
    for row in range(5):
        kept = mask[row]
        a = hessian[kept][:, kept]
        b = (hessian @ weight[row].double())[kept]
        assert torch.allclose(fitted[row, kept].double(), torch.linalg.solve(a, b), atol=1e-3)
        assert bool((fitted[row, ~kept] == 0).all())


def test_refit_lowers_the_reconstruction_error_of_a_tiny_layer_and_keeps_the_mask():
    torch.manual_seed(1)
    layer = nn.Linear(32, 8, bias=False)
    model = nn.Sequential(layer)
    mixing = torch.randn(32, 32) * 0.3 + torch.eye(32)
    batches = [torch.randn(64, 32) @ mixing for _ in range(4)]
    indices = magnitude_indices(layer.weight.detach(), 2, 4)
    artifact = MaskArtifact("m", "a", "adaprune", [LayerMask("0", [8, 32], 2, 4, indices.clone())])
    weights, stats = refit_kept_weights(model, artifact, batches, CPU)
    refitted = weights["0.weight"]
    mask = artifact.layers[0].mask().bool()
    assert torch.equal(artifact.layers[0].indices, indices)  # the mask is not touched
    assert torch.equal(refitted[~mask], layer.weight.detach()[~mask])  # pruned entries keep their dense value
    assert not torch.equal(refitted[mask], layer.weight.detach()[mask])  # kept entries re-fitted
    assert stats["0"]["refitted"] < 0.8 * stats["0"]["masked"]
    inputs = torch.cat(batches)
    dense_out = inputs @ layer.weight.detach().T
    error_masked = ((inputs @ (layer.weight.detach() * mask).T) - dense_out).pow(2).mean()
    error_refit = ((inputs @ (refitted * mask).T) - dense_out).pow(2).mean()
    assert float(error_refit) < 0.8 * float(error_masked)
    hessian = input_hessians(model, ["0"], batches, CPU)["0"]
    assert abs(reconstruction_error(layer.weight.detach(), refitted * mask, hessian) - stats["0"]["refitted"]) < 1e-9


def test_adaprune_method_changes_only_kept_weights_of_masked_layers():
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(0)
    model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, classifier="fc")
    ctx = MethodContext(recipe, model, report, data=build_datasets(recipe), log=lambda _: None)
    result = compute_masks("adaprune", ctx)
    magnitude = compute_masks("magnitude", ctx)
    assert "adaprune" in CHANGES_WEIGHTS and result.artifact.meta["changes_weights"] is True
    masked_keys = {f"{layer.name}.weight" for layer in report.masked}
    original = model.state_dict()
    changed = {key for key, value in result.dense_state_dict.items() if not torch.equal(value, original[key])}
    assert changed and changed <= masked_keys
    for ours, theirs in zip(result.artifact.layers, magnitude.artifact.layers):
        assert torch.equal(ours.indices, theirs.indices)  # magnitude masks, unchanged
    for layer, stats in result.artifact.meta["reconstruction"].items():
        assert stats["refitted"] <= stats["masked"] + 1e-9, layer
    sparse = masked_state(result)
    for layer in result.artifact.layers:
        assert bool((sparse[f"{layer.name}.weight"][~layer.mask().bool()] == 0).all())
