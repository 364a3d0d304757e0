"""Batch-norm folding for deployment."""

from __future__ import annotations

from torch import nn

from .efficientvit import ConvNorm, NormLinear


def fuse(model: nn.Module) -> nn.Module:
    """Fold every Conv+BN and BN+Linear pair into one Conv2d/Linear, in place.

    Afterwards the module tree holds no BatchNorm, so the deployed graph has no
    normalisation ops and each convolution carries its own bias.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, (ConvNorm, NormLinear)):
            setattr(model, name, child.fuse())
        else:
            fuse(child)
    return model


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
