"""Building family members and loading their weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (fit_state_dict, is_timm_layout, load_checkpoint, official_weights_path, read_state_dict,
                         timm_to_official)
from .efficientvit import EfficientViT, EfficientViTConfig
from .fuse import fuse as fuse_bn
from ..errors import BadInputError
from .registry import resolve_name

DEFAULT_SEED = 0


def config_for(name: str) -> EfficientViTConfig:
    spec = resolve_name(name)
    return EfficientViTConfig(embed_dim=spec.embed_dim, depth=spec.depth,
                              num_heads=spec.num_heads, kernels=spec.kernels)


def build_model(name: str, *, num_classes: int = 1000, img_size: int | None = 224,
                distillation: bool = False) -> EfficientViT:
    """An untrained family member (default initialisation, global RNG), in train mode."""
    spec = resolve_name(name)
    if img_size is not None and (img_size <= 0 or img_size % 16):
        raise BadInputError(f"img_size must be a positive multiple of 16, got {img_size}")
    if num_classes < 0:
        raise BadInputError(f"num_classes must be 0 (no head) or more, got {num_classes}")
    model = EfficientViT(config_for(spec.name), img_size=img_size, num_classes=num_classes,
                         distillation=distillation)
    model.model_name = spec.name
    return model


RANDOM = "random"


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
    from .efficientvit import LocalWindowAttention, Residual

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


def build_detector(name: str, *, neck: str = "maskrcnn") -> nn.Module:
    """An untrained backbone + FPN (default initialisation, global RNG), in train mode."""
    from .detection import NECKS, EfficientViTFPN

    spec = resolve_name(name)
    if neck not in NECKS:
        from ..errors import unknown_name
        raise unknown_name("neck", neck, NECKS)
    model = EfficientViTFPN(config_for(spec.name), neck=neck)
    model.model_name = spec.name
    return model


def load_detector_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a detection checkpoint (MMDetection layout: ``backbone.*``, ``neck.*``) or a
    classification one into a detector; returns the file's SHA-256.

    From a classification checkpoint only the backbone is loaded: the head is dropped, the
    bias tables are resized to the detector's windows, and the neck keeps its
    initialisation (``model.neck_pretrained`` is False).
    """
    from .detection import classification_to_backbone, resize_bias_table

    raw, sha = read_state_dict(path)
    own = model.state_dict()
    if any(k.startswith("backbone.") for k in raw):
        # Detector heads (rpn_head, roi_head, bbox_head...) are not part of what we export.
        state = {k: v for k, v in raw.items() if k.startswith(("backbone.", "neck."))}
        for key, value in state.items():
            want = own.get(key)
            if key.endswith("attention_biases") and want is not None and value.shape != want.shape:
                state[key] = resize_bias_table(value, int(round(want.shape[1] ** 0.5)))
        model.neck_pretrained = True
    else:
        state, _ = classification_to_backbone(timm_to_official(raw) if is_timm_layout(raw) else raw, model)
        state.update({k: v for k, v in own.items() if k.startswith("neck.")})
        model.neck_pretrained = False
    model.load_state_dict(fit_state_dict(model, state, str(path)), strict=True)
    return sha


def create_model(name: str, weights: str | os.PathLike | Mapping | None = None, *,
                 fuse: bool = False, num_classes: int = 1000, img_size: int = 224,
                 distillation: bool = False, seed: int = DEFAULT_SEED, task: str = "classification",
                 neck: str = "maskrcnn") -> torch.nn.Module:
    """A family member in eval mode, ready for inference or export.

    ``weights`` is a checkpoint file (official, timm or safetensors layout), ``"official"``
    for the released ImageNet weights (downloaded once into torch.hub's cache), a state
    dict, ``"random"`` for seeded synthetic weights that exercise every layer (see
    :func:`randomize_weights`; what commands use when no weights are given), or ``None``
    for the training initialisation. ``seed`` makes both random choices reproducible.
    The result records where its weights came from in ``weights_sha256`` (None unless
    loaded from a file) and ``init_seed`` (None when weights were loaded).

    ``task="detection"`` builds the backbone + FPN (``neck`` "maskrcnn" or "retinanet")
    for any input size; it outputs one feature map per FPN level. Classification
    checkpoints load into its backbone (see :func:`load_detector_weights`).
    """
    if task not in ("classification", "detection"):
        raise BadInputError(f"unknown task '{task}'; valid: classification, detection")
    detection = task == "detection"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (build_detector(name, neck=neck) if detection else
                 build_model(name, num_classes=num_classes, img_size=img_size, distillation=distillation))
    model.weights_sha256 = None
    model.init_seed = seed if weights is None or str(weights) == RANDOM or detection else None
    if str(weights) == RANDOM and not isinstance(weights, Mapping):
        randomize_weights(model, seed, img_size)
    elif weights is not None:
        if isinstance(weights, Mapping):
            model.load_state_dict(fit_state_dict(model, weights, "state dict"), strict=True)
        else:
            if str(weights) == "official":
                weights = official_weights_path(resolve_name(name))
            if detection:
                model.weights_sha256 = load_detector_weights(model, Path(weights))
            else:
                model.weights_sha256 = load_checkpoint(model, Path(weights)).sha256
    model.eval()
    if fuse:
        fuse_bn(model)
    return model
