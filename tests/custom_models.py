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


def tiny_attention() -> nn.Module:
    """A patch convolution, one EfficientViT cascaded group attention over the whole 8x8
    map of a 64x64 input, and a 10-class head: the attention's products (q^T k, attn v)
    at a fraction of M0's size."""
    from evit_deploy.models.efficientvit import LocalWindowAttention

    model = nn.Sequential(nn.Conv2d(3, 32, 8, 8), nn.ReLU(),
                          LocalWindowAttention(32, 8, 2, 2, resolution=8, window_resolution=8, kernels=[3, 3]),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):     # the attention's output BN starts at zero
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            elif hasattr(m, "attention_biases"):
                m.attention_biases.normal_(0, 0.5)
    return model


# -- models whose own code is what fails, for one-line errors that say so ------------------

class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)


def failing_factory() -> nn.Module:
    raise ValueError()                   # no message: the error must still say something


class _DictOutput(_Conv):
    def forward(self, x):
        return {"scores": self.conv(x).mean((2, 3))}


def dict_output() -> nn.Module:
    return _DictOutput()


class _DataDependent(_Conv):
    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))     # torch.export cannot trace this


def data_dependent() -> nn.Module:
    return _DataDependent()


class _ClassIndex(_Conv):
    def forward(self, x):
        return self.conv(x).mean((2, 3)).argmax(1)


def class_index() -> nn.Module:
    """Returns int64 class indices, not scores."""
    return _ClassIndex()


class _Greedy(_Conv):
    def forward(self, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 98304000000 bytes.")


def greedy() -> nn.Module:
    """Needs more memory than any machine has."""
    return _Greedy()
