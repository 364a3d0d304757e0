"""Synthetic weights: seeded, with the statistics of trained networks, for models without a
checkpoint (commands default to them) and for tests.

Two recipes. :func:`randomize_weights` is what commands use when no weights are given:
every layer matters and the BN statistics are calibrated on seeded images, so an
exported artifact is checked on a model that behaves like a trained one.
:func:`realistic_weights` draws every tensor from distributions observed in trained
checkpoints, without calibration: BN statistics that do not match the activations,
as a fine-tuned checkpoint's may not, which is what puts fp32 arithmetic's own rounding
at 1e-4 of the output scale on some inputs (the parity engine must not mistake that
for an error of the artifact).
"""

from __future__ import annotations

import torch
from torch import nn

from .efficientvit import LocalWindowAttention, Residual

DEFAULT_SEED = 0


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = DEFAULT_SEED, calibration_size: int = 224) -> nn.Module:
    """Seeded synthetic weights in which every layer matters.

    The training initialisation zeroes the last BN gain of every residual branch, so an
    untrained model is nearly the identity and a broken attention or FFN in an exported
    artifact would go unnoticed. Here every BN gets a random gain and shift, the bias
    tables and the classifier are random, and BN running statistics are calibrated on
    seeded noise. Residual branches end with small gains, as in trained networks: a
    model whose branches all have unit gain is chaotic, and its fp32 result would differ
    from its own fp64 result by more than any parity tolerance.
    """

    gen = torch.Generator().manual_seed(seed)
    branch_ends = set()
    for module in model.modules():
        if isinstance(module, Residual):
            norms = [m for m in module.m.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            branch_ends.add(id(norms[-1]))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            low, high = (0.05, 0.25) if id(module) in branch_ends else (0.3, 0.6)
            module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape, generator=gen))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            module.reset_running_stats()
            module.momentum = None          # calibrate with a cumulative average
        elif isinstance(module, nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features ** 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        elif hasattr(module, "attention_biases"):
            module.attention_biases.copy_(torch.randn(module.attention_biases.shape, generator=gen) * 0.5)
    was_training = model.training
    dtype = next(model.parameters()).dtype
    threads = torch.get_num_threads()
    # The statistics must not depend on the machine: one thread (a fixed reduction order)
    # and float64, so that a reference rebuilt elsewhere has the same float32 weights.
    torch.set_num_threads(1)
    model.train().double()
    windows = [m for m in model.modules() if isinstance(m, LocalWindowAttention)]
    for m in windows:
        m.pad_mode = "replicate"
    size = calibration_size
    white = torch.randn(4, 3, size, size, generator=gen)
    # Smooth noise: natural images are mostly low-frequency, white noise is not.
    smooth = torch.nn.functional.interpolate(torch.randn(8, 3, size // 16, size // 16, generator=gen) * 1.5,
                                             size=(size, size), mode="bilinear", align_corners=False)
    # Large flat areas of one colour (a wall, the sky) shift every channel at once.
    smooth[4:] = smooth[4:] * 0.3 + (torch.rand(4, 3, 1, 1, generator=gen) * 4 - 2)
    try:
        model(torch.cat([white, smooth]).double())
    finally:
        torch.set_num_threads(threads)
        for m in windows:
            m.pad_mode = "constant"
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
            # A channel that the noise barely excites (a ReLU that rarely fires) would
            # get a near-zero variance and amplify rounding error hundreds of times.
            module.running_var.clamp_(min=0.1 * float(module.running_var.median()))
    model.train(was_training)
    return model


@torch.no_grad()
def realistic_weights(model: nn.Module, seed: int = DEFAULT_SEED) -> nn.Module:
    """Seeded weights with the statistics of a trained EfficientViT, in place.

    BN running variance U(0.5, 1.5), running mean and every bias N(0, 0.02²), BN gain
    N(0.8, 0.1²); convolution and linear weights N(0, 1/fan_in); attention bias tables
    N(0, 0.5²).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, mean=0.0, std=1.0):
        return torch.randn(shape, generator=gen) * std + mean

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
            module.running_mean.copy_(normal(module.running_mean.shape, std=0.02))
            module.weight.copy_(normal(module.weight.shape, 0.8, 0.1))
            module.bias.copy_(normal(module.bias.shape, std=0.02))
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = module.weight
            if isinstance(module, nn.Linear):
                fan_in = weight.shape[1]
            elif isinstance(module, nn.ConvTranspose2d):
                fan_in = weight.shape[0] // module.groups * weight[0, 0].numel()
            else:
                fan_in = weight[0].numel()
            weight.copy_(normal(weight.shape, std=fan_in ** -0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, std=0.02))
        elif hasattr(module, "attention_biases"):
            module.attention_biases.copy_(normal(module.attention_biases.shape, std=0.5))
    return model
