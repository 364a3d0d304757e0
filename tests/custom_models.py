"""Models that are not EfficientViT, for the ``--model package.module:factory`` path."""

import torch
from torch import nn


def mobile_cnn() -> nn.Module:
    """A small MobileNet-style classifier (depthwise-separable blocks, 10 classes)."""
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin), nn.ReLU6(),
                             nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU6())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), block(16, 32, 2), block(32, 64, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model
