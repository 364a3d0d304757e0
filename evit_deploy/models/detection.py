"""EfficientViT as a detection backbone with its FPN neck (paper, supplementary Section D).

The backbone's three stages (strides 16, 32, 64) feed an FPN. Because EfficientViT has no
stride-4 or stride-8 stage, 2x2 stride-2 transposed convolutions on the stride-16 lateral
make the finer levels:

* ``maskrcnn`` (Mask R-CNN): two transposed convs, five levels at strides 4, 8, 16, 32, 64;
* ``retinanet`` (RetinaNet): one transposed conv, plus a stride-2 3x3 conv on the last
  backbone feature, five levels at strides 8, 16, 32, 64, 128.

Module names follow MMDetection's ``EfficientViTFPN`` (``lateral_convs.i.conv``,
``fpn_convs.i.conv``, ``extra_trans_convs.i.conv``, ``extra_fpn_convs.i.conv``) so that
detection checkpoints in the MMDetection layout (``backbone.*``, ``neck.*``) load directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .efficientvit import EfficientViT, EfficientViTConfig

NECKS = ("maskrcnn", "retinanet")


@dataclass(frozen=True)
class NeckSpec:
    trans_convs: int        # transposed convs on the stride-16 lateral
    extra_convs: int        # stride-2 convs on the last backbone feature

    def strides(self, backbone_strides=(16, 32, 64)) -> list[int]:
        finer = [backbone_strides[0] >> (i + 1) for i in range(self.trans_convs)][::-1]
        coarser = [backbone_strides[-1] << (i + 1) for i in range(self.extra_convs)]
        return [*finer, *backbone_strides, *coarser]


NECK_SPECS = {"maskrcnn": NeckSpec(trans_convs=2, extra_convs=0),
              "retinanet": NeckSpec(trans_convs=1, extra_convs=1)}


def level_name(stride: int) -> str:
    """FPN level names by stride: p2 is stride 4, p6 stride 64."""
    return f"p{int(math.log2(stride))}"


class _ConvModule(nn.Module):
    """A convolution held as ``.conv``, as MMCV's ConvModule (no norm, no activation) is."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], out_channels: int = 256, neck: str = "maskrcnn"):
        super().__init__()
        spec = NECK_SPECS[neck]
        self.spec = spec
        self.lateral_convs = nn.ModuleList(_ConvModule(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_ConvModule(nn.Conv2d(out_channels, out_channels, 3, padding=1))
                                       for _ in in_channels)
        for i in range(spec.extra_convs):
            source = in_channels[-1] if i == 0 else out_channels     # "on_input", as in the paper
            self.fpn_convs.append(_ConvModule(nn.Conv2d(source, out_channels, 3, stride=2, padding=1)))
        self.extra_trans_convs = nn.ModuleList(
            _ConvModule(nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)) for _ in range(spec.trans_convs))
        self.extra_fpn_convs = nn.ModuleList(
            _ConvModule(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in range(spec.trans_convs))
        self.num_backbone_levels = len(in_channels)

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        # Finer levels from the stride-16 lateral; the finest comes first.
        extra_laterals = []
        previous = laterals[0]
        for trans in self.extra_trans_convs:
            previous = trans(previous)
            extra_laterals.insert(0, previous)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_backbone_levels)]
        source = inputs[-1]
        for i in range(self.spec.extra_convs):
            outs.append(self.fpn_convs[self.num_backbone_levels + i](source))
            source = outs[-1]
        finer = [conv(x) for conv, x in zip(self.extra_fpn_convs, extra_laterals)]
        return tuple(finer + outs)


class EfficientViTFPN(nn.Module):
    """Backbone (no classifier, any input size, full 7x7 windows in every stage) + FPN."""

    def __init__(self, config: EfficientViTConfig, neck: str = "maskrcnn", out_channels: int = 256):
        super().__init__()
        if neck not in NECK_SPECS:
            raise ValueError(f"unknown neck '{neck}'; valid: {', '.join(NECKS)}")
        self.backbone = EfficientViT(config, img_size=None, num_classes=0)
        self.neck = FPN(config.embed_dim, out_channels, neck)
        self.neck_name = neck
        self.out_channels = out_channels

    @property
    def strides(self) -> list[int]:
        return self.neck.spec.strides()

    @property
    def level_names(self) -> list[str]:
        return [level_name(s) for s in self.strides]

    def forward(self, x):
        return self.neck(self.backbone.forward_features(x))


def resize_bias_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """A (heads, S*S) relative-position bias table resized to (heads, size*size) bicubically.

    Entries are ordered ``|dy| * S + |dx|`` (see ``relative_position_index``), so the table
    is an S x S image per head.
    """
    heads, length = table.shape
    side = int(round(length ** 0.5))
    if side * side != length:
        raise ValueError(f"a bias table of {length} entries is not square")
    image = table.reshape(1, heads, side, side).float()
    resized = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    return resized.reshape(heads, size * size).to(table.dtype)


def classification_to_backbone(state_dict: dict, model: EfficientViTFPN) -> tuple[dict, list[str]]:
    """Map a classification state dict onto a detector's backbone.

    The classifier head is dropped; bias tables whose window differs (stage 3 is 4x4 in
    models trained at 224x224, 7x7 here) are resized bicubically; the index buffers are
    rebuilt by the model. Returns the backbone part of the state dict and the keys that
    were resized.
    """
    target = model.state_dict()
    out, resized = {}, []
    for key, value in state_dict.items():
        if key.startswith(("head.", "head_dist.")) or key.endswith("attention_bias_idxs"):
            continue
        full = f"backbone.{key}"
        want = target.get(full)
        if key.endswith("attention_biases") and want is not None and value.shape != want.shape \
                and value.shape[0] == want.shape[0]:
            value = resize_bias_table(value, int(round(want.shape[1] ** 0.5)))
            resized.append(full)
        out[full] = value
    return out, resized
