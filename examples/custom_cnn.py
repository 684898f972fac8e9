"""An example of a user's own network for `--model python:examples.custom_cnn:build` (run from the repo root).

Any importable function that returns an nn.Module works; taking `num_classes` lets the pipeline size the head
from the weights file. A python: source knows neither the head nor the input, so name them:

    python -m pipeline engine --model python:examples.custom_cnn:build --classifier head --input-size 224 \
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --weights my.pth --data /data/myset
"""

from torch import nn


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CustomCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 32, stride=2),
            conv_bn(32, 64, stride=2),
            conv_bn(64, 64),
            conv_bn(64, 128, stride=2),
            conv_bn(128, 128),
            conv_bn(128, 256, stride=2),
            conv_bn(256, 256),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CustomCNN(num_classes, in_channels)
