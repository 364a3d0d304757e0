"""Building family members and loading their weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (config_for, fit_state_dict, is_timm_layout, load_state_dict, official_weights_path,
                         read_checkpoint, read_state_dict, timm_to_official)
from .efficientvit import EfficientViT, EfficientViTConfig
from .fuse import fuse as fuse_bn
from .synthetic import DEFAULT_SEED, randomize_weights
from ..errors import BadInputError
from .registry import resolve_name



@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from (what an artifact's description records)."""

    weights_sha256: str | None      # SHA-256 of the checkpoint file; None unless loaded from one
    init_seed: int | None           # seed of synthetic or initial weights; None when loaded
    neck_pretrained: bool | None = None   # detection: whether the FPN neck came from the checkpoint


def build_model(name: str, *, num_classes: int = 1000, img_size: int | None = 224,
                distillation: bool = False, config: EfficientViTConfig | None = None) -> EfficientViT:
    """An untrained family member (default initialisation, global RNG), in train mode;
    ``config`` gives it pruned widths (see :func:`.checkpoint.config_for`)."""
    spec = resolve_name(name)
    if img_size is not None and (img_size <= 0 or img_size % 16):
        raise BadInputError(f"img_size must be a positive multiple of 16, got {img_size}")
    if num_classes < 0:
        raise BadInputError(f"num_classes must be 0 (no head) or more, got {num_classes}")
    return EfficientViT(config or EfficientViTConfig.from_spec(spec), img_size=img_size, num_classes=num_classes,
                        distillation=distillation)


RANDOM = "random"


def build_detector(name: str, *, neck: str = "maskrcnn") -> nn.Module:
    """An untrained backbone + FPN (default initialisation, global RNG), in train mode."""
    from .detection import NECKS, EfficientViTFPN

    spec = resolve_name(name)
    if neck not in NECKS:
        from ..errors import unknown_name
        raise unknown_name("neck", neck, NECKS)
    return EfficientViTFPN(EfficientViTConfig.from_spec(spec), neck=neck)


def load_detector_weights(model: nn.Module, path: str | os.PathLike, *, name: str) -> tuple[str, bool]:
    """Load a detection checkpoint (MMDetection layout: ``backbone.*``, ``neck.*``) or a
    classification one into the detector of family member ``name``; returns the file's
    SHA-256 and whether the neck was loaded.

    From a classification checkpoint only the backbone is loaded: the head is dropped, the
    bias tables are resized to the detector's windows, and the neck keeps its
    initialisation.
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
        neck_pretrained = True
    else:
        state, _ = classification_to_backbone(timm_to_official(raw) if is_timm_layout(raw) else raw, model)
        state.update({k: v for k, v in own.items() if k.startswith("neck.")})
        neck_pretrained = False
    model.load_state_dict(fit_state_dict(model, state, str(path), name=name), strict=True)
    return sha, neck_pretrained


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

    ``task="detection"`` builds the backbone + FPN (``neck`` "maskrcnn" or "retinanet")
    for any input size; it outputs one feature map per FPN level. Classification
    checkpoints load into its backbone (see :func:`load_detector_weights`).
    :func:`load_model` also says where the weights came from.
    """
    return load_model(name, weights, fuse=fuse, num_classes=num_classes, img_size=img_size,
                      distillation=distillation, seed=seed, task=task, neck=neck)[0]


def load_model(name: str, weights: str | os.PathLike | Mapping | None = None, *,
               fuse: bool = False, num_classes: int = 1000, img_size: int = 224,
               distillation: bool = False, seed: int = DEFAULT_SEED, task: str = "classification",
               neck: str = "maskrcnn") -> tuple[torch.nn.Module, Provenance]:
    """:func:`create_model`, and the :class:`Provenance` of the weights it holds."""
    if task not in ("classification", "detection"):
        raise BadInputError(f"unknown task '{task}'; valid: classification, detection")
    spec = resolve_name(name)
    detection = task == "detection"
    file = weights is not None and not isinstance(weights, Mapping) and str(weights) != RANDOM
    if file and str(weights) == "official":
        weights = official_weights_path(spec)
    config = None
    if file and not detection:
        # Read first: a pruned checkpoint says which widths to build.
        raw, sha, architecture = read_checkpoint(Path(weights))
        config = config_for(spec, architecture, str(weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (build_detector(name, neck=neck) if detection else
                 build_model(name, num_classes=num_classes, img_size=img_size, distillation=distillation,
                             config=config))
    sha, neck_pretrained = (sha if config is not None else None), None
    if str(weights) == RANDOM and not isinstance(weights, Mapping):
        randomize_weights(model, seed, img_size)
    elif isinstance(weights, Mapping):
        model.load_state_dict(fit_state_dict(model, weights, "state dict", name=spec.name), strict=True)
    elif detection and weights is not None:
        sha, neck_pretrained = load_detector_weights(model, Path(weights), name=spec.name)
    elif weights is not None:
        load_state_dict(model, raw, sha, Path(weights), name=spec.name)
    init_seed = seed if weights is None or str(weights) == RANDOM or detection else None
    model.eval()
    if fuse:
        fuse_bn(model)
    return model, Provenance(sha, init_seed, neck_pretrained)
