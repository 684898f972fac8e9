"""The built-in demo architectures (`arch = "builtin:<name>"` in a recipe)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (two 3x3 convs, identity or 1x1 projection shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for 28x28 grayscale input: 3x3 stem, three stages of basic blocks, GAP, fc.

    Module names follow torchvision's ResNet (conv1, bn1, layer1.., fc) so the same
    layer rules and reports read the same for the demo and for ImageNet models.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (1, 1, 1),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_ch = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fmnist_resnet18(num_classes: int, stem_stride: int = 2) -> nn.Module:
    """torchvision's ResNet-18 for 1x28x28 input: a 3x3 stem (1 input channel) and no max-pool,
    everything else (module names included) unchanged, so torchvision's layer names apply.

    The stem's stride 2 puts layer1 at 14x14: a stride-1 stem (28x28) costs 4x the compute, too
    much to pretrain within `make engine`'s 30 minutes on 2 CPU cores (models/fmnist_resnet18.py)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, stem_stride, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


# `builtin:<name>` source specs
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "small_resnet": lambda num_classes: SmallResNet(num_classes, widths=(48, 96, 192), stem_stride=2),
    # A few thousand weights: for tests and smoke runs of every stage in seconds.
    "tiny_resnet": lambda num_classes: SmallResNet(num_classes, widths=(8, 16, 32), stem_stride=2),
    "fmnist_resnet18": fmnist_resnet18,
}
