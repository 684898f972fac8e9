import torch
from torch import nn

from pipeline.masks.eligibility import find_layers
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network


def test_fmnist_resnet18_is_torchvision_resnet18_for_28x28_grayscale():
    recipe = get_recipe("fmnist_resnet18")
    model = build_network(recipe).eval()
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
        "fc",
    ]
    with torch.no_grad():
        assert model(torch.zeros(2, *recipe.input_shape)).shape == (2, 10)
    report = find_layers(model, recipe.input_shape, 4, classifier=recipe.classifier)
    skipped = {layer.name: layer.reason for layer in report.skipped}
    assert set(skipped) == {"conv1", "fc"} and "multiple of 4" in skipped["conv1"]
    assert len(report.masked) == 19 and report.masked_mac_fraction > 0.95
