import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import SyntheticDataset, build_datasets
from pipeline.errors import PipelineError
from pipeline.masks.activation_aware import (
    calibration_batches,
    indices_from_scores,
    input_channel_norms,
    input_hessians,
    obs_saliency,
    wanda_scores,
)
from pipeline.masks.eligibility import find_layers
from pipeline.masks.methods import CHANGES_WEIGHTS, MethodContext, compute_masks
from pipeline.masks.patterns import magnitude_indices, mask_from_indices, to_blocks
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network

CPU = torch.device("cpu")


def tiny_context(seed=0):
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(seed)
    model = build_network(recipe).eval()
    report = find_layers(model, recipe.input_shape, 4, classifier="fc")
    return MethodContext(recipe, model, report, data=build_datasets(recipe), log=lambda _: None)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_keep_two_of_every_four_input_channels_at_each_position(method):
    ctx = tiny_context()
    first = compute_masks(method, ctx)
    assert first.artifact.method == method and method not in CHANGES_WEIGHTS
    assert len(first.artifact.layers) == len(ctx.report.masked) > 0
    for layer in first.artifact.layers:
        kept = to_blocks(layer.mask(), 4).sum(-1)  # [K, R, S, C/4]: one count per (k, r, s, group)
        assert kept.shape == (layer.shape[0], *layer.shape[2:], layer.shape[1] // 4)
        assert bool((kept == 2).all())
    again = compute_masks(method, ctx)
    for a, b in zip(first.artifact.layers, again.artifact.layers):
        assert torch.equal(a.indices, b.indices)  # deterministic: same calibration images, same scores
    assert first.artifact.meta["calibration_images"] == min(256, len(ctx.data.train))
    for key, value in ctx.model.state_dict().items():
        assert torch.equal(first.dense_state_dict[key], value)  # weights frozen


def test_methods_need_calibration_images():
    ctx = tiny_context()
    ctx.data = None
    with pytest.raises(PipelineError, match="calibration images"):
        compute_masks("wanda", ctx)


def test_wanda_is_magnitude_when_all_channel_norms_are_equal_and_follows_the_norms_otherwise():
    torch.manual_seed(0)
    weight = torch.randn(8, 16, 3, 3)
    equal = indices_from_scores(wanda_scores(weight, torch.full((16,), 3.7)), 2, 4)
    assert torch.equal(equal, magnitude_indices(weight, 2, 4))
    norms = torch.ones(16)
    norms[::4] = 1e3  # the first channel of every group carries almost all the activation energy
    mask = mask_from_indices(indices_from_scores(wanda_scores(weight, norms), 2, 4), 2, 4)
    assert bool((mask[:, ::4] == 1).all())
    assert not torch.equal(mask, mask_from_indices(magnitude_indices(weight, 2, 4), 2, 4))


def test_sparsegpt_with_identity_hessian_is_magnitude():
    torch.manual_seed(1)
    weight = torch.randn(12, 32)
    saliency = obs_saliency(weight, torch.eye(32, dtype=torch.float64))
    assert torch.equal(indices_from_scores(saliency, 2, 4), magnitude_indices(weight, 2, 4))


def test_sparsegpt_conv_saliency_reads_the_unfolded_axis_c_r_s():
    """H diagonal with entry d_j at j = c*R*S + r*S + s: the saliency of weight (k, c, r, s) is
    w^2 * (d_j + damping), so with equal |w| the kept pair per group follows d at that (r, s)."""
    channels, size = 8, 3
    weight = torch.ones(4, channels, size, size)
    d = torch.rand(channels, size, size, generator=torch.Generator().manual_seed(2)) + 0.5
    saliency = obs_saliency(weight, torch.diag(d.flatten().double()), damping=0.0)
    assert torch.allclose(saliency[0], d.double())
    mask = indices_from_scores(saliency, 2, 4)
    expected = indices_from_scores(d.expand(4, -1, -1, -1), 2, 4)
    assert torch.equal(mask, expected)


def test_input_hessian_gives_the_output_error_of_a_weight_change():
    """||conv(x, D)||^2 / rows == sum((D H) * D) with D the weight change flattened as [K, C*R*S]."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    )
    images = [torch.randn(3, 4, 9, 9), torch.randn(2, 4, 9, 9)]
    model(images[0])
    hessians = input_hessians(model, ["0", "3"], images, CPU)
    change = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    outputs = torch.cat([F.conv2d(x.double(), change, stride=2, padding=1) for x in images])
    rows = outputs.shape[0] * outputs.shape[2] * outputs.shape[3]
    flat = change.reshape(6, -1)
    assert torch.allclose(outputs.pow(2).sum() / rows, ((flat @ hessians["0"]) * flat).sum(), rtol=1e-4)
    features = torch.cat([model[2](model[1](model[0](x))) for x in images]).double()
    assert torch.allclose(hessians["3"], features.T @ features / 5, rtol=1e-4, atol=1e-6)


def test_channel_norms_and_calibration_subset():
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False))
    x = torch.tensor([[[[3.0, 0.0]], [[1.0, 1.0]]]])  # channel 0: norm 3, channel 1: norm sqrt(2)
    norms = input_channel_norms(model, ["0"], [x, x], CPU)["0"]
    assert torch.allclose(norms, torch.tensor([18.0, 4.0], dtype=torch.float64).sqrt())
    data = SyntheticDataset(40, [1, 8, 8], 10, seed=0)
    batches = calibration_batches(data, images=20, batch_size=8, seed=5)
    assert [len(b) for b in batches] == [8, 8, 4]
    again = calibration_batches(data, images=20, batch_size=8, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat(batches), torch.cat(calibration_batches(data, images=20, seed=6)))
