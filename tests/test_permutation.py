import copy

import torch
from torch import nn

from pipeline.masks.artifact import apply_masks
from pipeline.masks.eligibility import find_layers
from pipeline.masks.methods import MethodContext, compute_masks, dense_for_artifact, kept_share
from pipeline.masks.patterns import is_nm
from pipeline.masks.permutation import channel_spaces, kept_magnitude, output_difference, search_permutation
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network


def tiny(seed=0):
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(seed)
    model = build_network(recipe)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():  # BatchNorm with non-trivial statistics and affine parameters
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(c, generator=generator))
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.2)
    return recipe, model.eval()


def context(recipe, model):
    report = find_layers(model, recipe.input_shape, 4, classifier=recipe.classifier)
    return MethodContext(recipe, model, report, log=lambda _: None)


def test_permuted_model_computes_the_same_function_and_keeps_more():
    recipe, model = tiny()
    ctx = context(recipe, model)
    original = copy.deepcopy(model.state_dict())
    permuted = compute_masks("permuted", ctx)
    magnitude = compute_masks("magnitude", ctx)
    assert permuted.artifact.meta["permutations"], "nothing was permuted"
    assert output_difference(copy.deepcopy(model), original, permuted.dense_state_dict, recipe.input_shape) <= 1e-5
    assert any(not torch.equal(original[k], permuted.dense_state_dict[k]) for k in original)
    assert kept_share(permuted.dense_state_dict, permuted.artifact) >= kept_share(
        magnitude.dense_state_dict, magnitude.artifact
    )
    assert kept_share(permuted.dense_state_dict, permuted.artifact) > kept_share(original, magnitude.artifact) + 1e-3
    # the model itself is untouched, and bake can rebuild the permuted weights from the original ones
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    rebuilt = dense_for_artifact(original, permuted.artifact)
    assert all(torch.equal(rebuilt[k], permuted.dense_state_dict[k]) for k in original)
    sparse = apply_masks(rebuilt, permuted.artifact)
    assert all(is_nm(sparse[f"{layer.name}.weight"], 2, 4) for layer in permuted.artifact.layers)


def test_residual_adds_tie_producers_and_consumers():
    recipe, model = tiny()
    spaces, reads, _ = channel_spaces(model, recipe.input_shape)
    stream = next(space for space in spaces if "layer2.0.conv2" in space.producers)
    assert set(stream.producers) == {"layer2.0.conv2", "layer2.0.downsample.0"}
    assert {"layer3.0.conv1", "layer3.0.downsample.0"} <= set(stream.consumers)
    assert {"layer2.0.bn2", "layer2.0.downsample.1"} <= set(stream.holders)
    assert not stream.fixed
    first = next(space for space in spaces if "conv1" in space.consumers)
    assert first.fixed == "network input"
    logits = next(space for space in spaces if "fc" in space.producers)
    assert "network output" in logits.fixed


class Concat(nn.Module):
    """A branch joined by torch.cat: the consumer's channels cannot be reordered by this module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], 1))
        return self.out(torch.relu(self.inner(torch.relu(y)))).mean((2, 3))


def test_unknown_ops_are_skipped_with_a_reason():
    torch.manual_seed(0)
    recipe = get_recipe("tiny_resnet")
    recipe.input_shape = [4, 8, 8]
    model = Concat().eval()
    report = find_layers(model, recipe.input_shape, 4, classifier="none")
    result = compute_masks("permuted", MethodContext(recipe, model, report, log=lambda _: None))
    skipped = result.artifact.meta["permutation_skipped"]
    assert "cat" in skipped["mix"]
    assert "network input" in skipped["a"]
    assert "inner" not in skipped and "out" not in skipped
    assert output_difference(copy.deepcopy(model), model.state_dict(), result.dense_state_dict, [4, 8, 8]) <= 1e-5


def test_search_improves_and_never_regresses():
    torch.manual_seed(5)
    matrix = torch.rand(32, 40) ** 3
    order, stats = search_permutation(matrix, 2, 4)
    assert sorted(order.tolist()) == list(range(32))
    assert stats["kept_after"] == kept_magnitude(matrix, order, 2, 4)
    assert stats["kept_after"] > stats["kept_before"]
    windowed, wstats = search_permutation(matrix, 2, 4, window=3, passes=2, escapes=0)
    assert wstats["kept_after"] >= wstats["kept_before"]
