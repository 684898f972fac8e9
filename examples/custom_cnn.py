"""An example of a user's own network for `--model python:examples.custom_cnn:build` (run from the repo root).

Any importable function that returns an nn.Module works; taking `num_classes` lets the pipeline size the head
from the weights file. Name the head with `--classifier head` (init-recipe) or `classifier = "head"` (recipe).
"""
from torch import nn


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(
        conv_bn(in_channels, 32, stride=2),
        conv_bn(32, 64, stride=2), conv_bn(64, 64),
        conv_bn(64, 128, stride=2), conv_bn(128, 128),
        conv_bn(128, 256, stride=2), conv_bn(256, 256),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, num_classes),
    )
