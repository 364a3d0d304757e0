"""Parameter and multiply-accumulate counts, measured on the model itself."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> int:
    """Multiply-accumulates of one forward pass of a single image.

    torch's FLOP counter counts convolutions and matrix products (including attention's
    QK^T and AV) at two FLOPs per multiply-accumulate, which is the paper's convention.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, 3, *input_size, dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_layers(model: nn.Module) -> dict[str, int]:
    """How many modules of each deploy-relevant kind the model holds."""
    kinds = {"conv": nn.Conv2d, "linear": nn.Linear, "batchnorm": nn.modules.batchnorm._BatchNorm}
    return {name: sum(isinstance(m, cls) for m in model.modules()) for name, cls in kinds.items()}
