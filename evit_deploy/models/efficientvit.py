"""EfficientViT (Liu et al., "Memory Efficient Vision Transformer with Cascaded Group
Attention", CVPR 2023).

Module names and parameter shapes follow the officially released checkpoints
(``efficientvit_m{0..5}.pth``) so that they load with ``strict=True``; the short
attribute names (``c``, ``bn``, ``l``, ``m``) are therefore part of the format.

Differences from the reference implementation, all behaviour-preserving:

* the relative-position bias lookup is computed in ``forward`` instead of being cached
  on ``train(False)``: a cache goes stale when weights are loaded after ``.eval()``,
  does not follow ``.to()``, and is baked into a ``torch.export`` trace as a constant;
* window attention accepts any feature size (padding to whole windows), which the
  detection backbone needs; a classification model still checks its input size, since
  its stage-3 bias table is sized for the feature map of ``img_size``.
* attention heads take their channels by slicing and multiply with ``torch.bmm``
  (the reference uses ``chunk``, ``split`` and ``@``): the same arithmetic, but a trace
  that export delegates (ExecuTorch's XNNPACK) take whole.

A configuration may also carry per-module widths (``EfficientViTConfig.widths``), which is
how a structurally pruned model (:mod:`evit_deploy.pruning`) is expressed: per attention
head its Q/K and V dims, per FFN its hidden width, per patch merging its expansion width.
Without them every module has the released width and parameter shapes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EfficientViT", "EfficientViTConfig", "ConvNorm", "NormLinear"]


@dataclass(frozen=True)
class EfficientViTConfig:
    """Architecture hyper-parameters of one family member (paper Table 6)."""

    embed_dim: tuple[int, int, int]
    depth: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    kernels: tuple[int, ...]
    window_size: tuple[int, int, int] = (7, 7, 7)
    key_dim: tuple[int, int, int] = (16, 16, 16)
    patch_size: int = 16
    # Subsampling between stages: stage i+1 starts with a PatchMerging of stride 2.
    down_ops: tuple[tuple, ...] = field(default=(("subsample", 2), ("subsample", 2), ("",)))
    # Pruned widths as sorted (module path, width) pairs: an FFN or a patch merging (path
    # of the module) -> hidden width; a CascadedGroupAttention -> (qk, v, *reads) per head,
    # ``reads`` the channels of its split a head reads when not all (see the class).
    # Empty: the released widths.
    widths: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_spec(cls, spec) -> "EfficientViTConfig":
        """The configuration of a family member (a :class:`~.registry.ModelSpec`)."""
        return cls(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, kernels=spec.kernels)

    def with_widths(self, widths: dict) -> "EfficientViTConfig":
        """This architecture with the given per-module widths (see ``widths``)."""
        def frozen(value):
            return int(value) if isinstance(value, int) else tuple(tuple(int(n) for n in head) for head in value)
        return replace(self, widths=tuple(sorted((str(k), frozen(v)) for k, v in widths.items())))

    def widths_dict(self) -> dict:
        """``widths`` as a JSON-ready mapping."""
        return {k: v if isinstance(v, int) else [list(h) for h in v] for k, v in self.widths}


def _make_divisible(value: float, divisor: int = 8) -> int:
    # The released checkpoints were trained with timm's SqueezeExcite, which rounds the
    # reduced width to a multiple of 8 this way (round_limit=0: never bumped up).
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; ``fuse()`` folds them into one Conv2d."""

    def __init__(self, in_ch, out_ch, kernel_size=1, stride=1, padding=0, dilation=1,
                 groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding,
                                       dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch))
        # Zero-initialised BN gains make each residual branch start as the identity.
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class NormLinear(nn.Sequential):
    """BatchNorm1d followed by Linear (the classifier head); ``fuse()`` folds them."""

    def __init__(self, in_features, out_features, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_features))
        self.add_module("l", nn.Linear(in_features, out_features, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, linear = self.bn, self.l
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                          device=linear.weight.device, dtype=linear.weight.dtype)
        fused.weight.copy_(linear.weight * scale[None, :])
        bias = linear.weight @ shift
        if linear.bias is not None:
            bias = bias + linear.bias
        fused.bias.copy_(bias)
        return fused


class SqueezeExcite(nn.Module):
    """Channel gating with a ReLU bottleneck and a sigmoid gate (timm's ``SEModule``)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, reduced: int | None = None):
        super().__init__()
        # A pruned patch merging keeps the bottleneck width of the original one.
        reduced = reduced if reduced is not None else _make_divisible(channels * rd_ratio)
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Residual(nn.Module):
    """``x + m(x)``, with stochastic depth when training."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop)
            return x + self.m(x) * keep.div(1 - self.drop).detach()
        return x + self.m(x)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


def relative_position_index(resolution: int) -> tuple[torch.Tensor, int]:
    """Index of the bias-table entry for every (query, key) pair of a square window.

    Entries are shared by all pairs with the same (|dy|, |dx|); the table is ordered by
    first appearance, which for a row-major window is ``|dy| * resolution + |dx|``.
    """
    points = list(itertools.product(range(resolution), range(resolution)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over one ``resolution`` x ``resolution`` window.

    Head ``i`` sees its own channel split plus the output of head ``i-1``; its query goes
    through a depthwise conv with kernel ``kernels[i]``.

    ``head_widths`` gives each head's (Q/K dim, V dim, *reads) when pruned. A head whose
    predecessor's V lost channels reads only the matching channels of its own split
    (``reads``, ascending): the V channel and the split channel it is added to are one
    structural unit. They are taken as contiguous slices, which every target converts
    (Core ML's reference executor, for one, has no gather).
    """

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, kernels, head_widths=None):
        super().__init__()
        self.num_heads = num_heads
        # The scale of the trained model, whatever the heads' pruned Q/K widths.
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.resolution = resolution
        split = dim // num_heads
        head_widths = tuple(head_widths) if head_widths else ((key_dim, self.d),) * num_heads
        if len(head_widths) != num_heads:
            raise ValueError(f"{len(head_widths)} head widths for {num_heads} heads")
        self.qk_dims = tuple(h[0] for h in head_widths)
        self.v_dims = tuple(h[1] for h in head_widths)
        self.reads = tuple(tuple(h[2:]) or tuple(range(split)) for h in head_widths)
        in_dims = (split, *self.v_dims[:-1])
        if any(len(self.reads[i]) != in_dims[i] or max(self.reads[i]) >= split for i in range(num_heads)):
            raise ValueError("a head must read as many split channels as the previous head's V dim")
        self.qkvs = nn.ModuleList(
            ConvNorm(in_dims[i], self.qk_dims[i] * 2 + self.v_dims[i]) for i in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(q, q, kernels[i], 1, kernels[i] // 2, groups=q) for i, q in enumerate(self.qk_dims))
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(sum(self.v_dims), dim, bn_weight_init=0.0))
        idxs, num_offsets = relative_position_index(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        # Persistent: the released checkpoints contain it, so strict loading expects it.
        self.register_buffer("attention_bias_idxs", idxs, persistent=True)
        # Per head, the (start, stop) runs of the split channels it reads, when not all.
        self.read_runs = tuple(_runs(r) if len(r) != split else None for r in self.reads)

    def forward(self, x):
        B, C, H, W = x.shape
        # Looked up on every call (see module docstring): never stale, follows .to(),
        # and a trace sees the parameter, not a frozen copy.
        biases = self.attention_biases[:, self.attention_bias_idxs]
        # Channel slices and torch.bmm compute exactly what x.chunk, feat.split and `@`
        # do, but trace to slice and bmm only: `@` on 3-D tensors decomposes into
        # expand + view + bmm and chunk/split into split_with_sizes, which delegates such
        # as ExecuTorch's XNNPACK leave to slower portable kernels.
        c = C // self.num_heads
        feats_out = []
        feat = None
        for i, qkv in enumerate(self.qkvs):
            part = x[:, i * c:(i + 1) * c]
            if self.read_runs[i] is not None:
                part = torch.cat([part[:, a:b] for a, b in self.read_runs[i]], 1)
            feat = part if i == 0 else feat + part
            feat = qkv(feat)
            kd = self.qk_dims[i]
            q, k, v = feat[:, :kd], feat[:, kd:2 * kd], feat[:, 2 * kd:]
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = torch.bmm(q.transpose(1, 2), k) * self.scale + biases[i]
            attn = attn.softmax(dim=-1)
            feat = torch.bmm(v, attn.transpose(1, 2)).view(B, self.v_dims[i], H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


def _runs(channels) -> tuple[tuple[int, int], ...]:
    """Ascending channel indices as (start, stop) runs of consecutive ones."""
    runs = []
    for c in channels:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return tuple((a, b) for a, b in runs)


class LocalWindowAttention(nn.Module):
    """Cascaded group attention applied in non-overlapping windows.

    A feature map that exactly fits one window is attended directly; anything else is
    zero-padded to whole windows, attended window by window and cropped back, which is
    what the reference implementation does for feature maps larger than the window.
    """

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, window_resolution,
                 kernels, head_widths=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        # The window never exceeds the feature map it was built for (stage 3 at 224x224
        # is 4x4, so its window and bias table are 4x4, as in the released weights).
        self.window_resolution = min(window_resolution, resolution) if resolution else window_resolution
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio,
                                           self.window_resolution, kernels, head_widths)
        # Zero padding is the model's semantics. Synthetic-weight BN calibration switches to
        # edge replication, so that padded tokens do not masquerade as data in the statistics.
        self.pad_mode = "constant"

    def forward(self, x):
        B, C, H, W = x.shape
        ws = self.window_resolution
        if H == ws and W == ws:
            return self.attn(x)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b), mode=self.pad_mode)
        x = x.permute(0, 2, 3, 1)
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        # window partition: B(nH ws)(nW ws)C -> (B nH nW) C ws ws
        x = x.reshape(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws, ws, C)
        x = self.attn(x.permute(0, 3, 1, 2))
        # window reverse
        x = x.permute(0, 2, 3, 1).reshape(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return x.permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):
    """Sandwich block: depthwise residual, FFN, window attention, depthwise residual, FFN."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, window_resolution,
                 kernels, widths=None):
        super().__init__()
        widths = widths or _Widths(None, "")
        self.dw0 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn0 = Residual(FFN(dim, widths.get("ffn0.m", dim * 2)))
        self.mixer = Residual(LocalWindowAttention(dim, key_dim, num_heads, attn_ratio,
                                                   resolution, window_resolution, kernels,
                                                   widths.get("mixer.m.attn", None)))
        self.dw1 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.ffn1 = Residual(FFN(dim, widths.get("ffn1.m", dim * 2)))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class PatchMerging(nn.Module):
    """Stride-2 subsampling: pointwise expand, depthwise stride-2, squeeze-excite, project."""

    def __init__(self, dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim * 4
        self.conv1 = ConvNorm(dim, hidden, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = ConvNorm(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25, reduced=_make_divisible(dim * 4 * 0.25))
        self.conv3 = ConvNorm(hidden, out_dim, 1, 1, 0)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


def _residual_dw_ffn(dim: int, widths: "_Widths") -> nn.Sequential:
    return nn.Sequential(Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim)),
                         Residual(FFN(dim, widths.get("1.m", dim * 2))))


class _Widths:
    """The pruned widths of the modules under one block path, consumed as modules are built
    (what remains afterwards names no module of this architecture)."""

    def __init__(self, pending: dict | None, path: str):
        self.pending, self.path = pending, path

    def under(self, path: str) -> "_Widths":
        return _Widths(self.pending, path)

    def get(self, name: str, default):
        """The width of the module ``name`` below this path ("": the module at the path)."""
        if self.pending is None:
            return default
        return self.pending.pop(f"{self.path}.{name}" if name else self.path, default)


class EfficientViT(nn.Module):
    """EfficientViT classifier (``num_classes > 0``) or feature backbone (``num_classes=0``).

    ``img_size`` fixes the classifier's input resolution (a multiple of ``patch_size``).
    ``img_size=None`` builds a size-agnostic backbone whose every stage uses full
    ``window_size`` bias tables, as the detection models do.
    """

    def __init__(self, config: EfficientViTConfig, img_size: int | None = 224, in_chans: int = 3,
                 num_classes: int = 1000, distillation: bool = False):
        super().__init__()
        if img_size is not None and (img_size <= 0 or img_size % config.patch_size):
            raise ValueError(f"img_size must be a positive multiple of {config.patch_size}, got {img_size}")
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.distillation = distillation
        ed = config.embed_dim

        self.patch_embed = nn.Sequential(
            ConvNorm(in_chans, ed[0] // 8, 3, 2, 1), nn.ReLU(),
            ConvNorm(ed[0] // 8, ed[0] // 4, 3, 2, 1), nn.ReLU(),
            ConvNorm(ed[0] // 4, ed[0] // 2, 3, 2, 1), nn.ReLU(),
            ConvNorm(ed[0] // 2, ed[0], 3, 2, 1))

        resolution = img_size // config.patch_size if img_size is not None else None
        attn_ratio = [ed[i] / (config.key_dim[i] * config.num_heads[i]) for i in range(3)]
        stages: list[list[nn.Module]] = [[], [], []]
        widths = _Widths(dict(config.widths), "")

        def at(stage: int) -> _Widths:     # the widths of the next module of a stage
            return widths.under(f"blocks{stage + 1}.{len(stages[stage])}")

        self.feature_resolutions: list[int | None] = []
        for i in range(3):
            for _ in range(config.depth[i]):
                stages[i].append(EfficientViTBlock(ed[i], config.key_dim[i], config.num_heads[i],
                                                   attn_ratio[i], resolution,
                                                   config.window_size[i], config.kernels, at(i)))
            self.feature_resolutions.append(resolution)
            op = config.down_ops[i]
            if op[0] == "subsample":
                nxt = stages[i + 1]
                nxt.append(_residual_dw_ffn(ed[i], at(i + 1)))
                nxt.append(PatchMerging(ed[i], ed[i + 1], at(i + 1).get("", None)))
                if resolution is not None:
                    resolution = (resolution - 1) // op[1] + 1
                nxt.append(_residual_dw_ffn(ed[i + 1], at(i + 1)))
        if widths.pending:
            raise ValueError(f"widths for modules this architecture does not have: {', '.join(sorted(widths.pending))}")
        self.blocks1 = nn.Sequential(*stages[0])
        self.blocks2 = nn.Sequential(*stages[1])
        self.blocks3 = nn.Sequential(*stages[2])

        self.num_features = ed[-1]
        self.head = NormLinear(ed[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = NormLinear(ed[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x) -> list[torch.Tensor]:
        """Feature maps of the three stages (strides 16, 32, 64)."""
        x = self.patch_embed(x)
        f1 = self.blocks1(x)
        f2 = self.blocks2(f1)
        f3 = self.blocks3(f2)
        return [f1, f2, f3]

    def forward(self, x):
        if self.img_size is not None:
            h, w = x.shape[-2:]
            if h != self.img_size or w != self.img_size:
                raise ValueError(f"this model was built for {self.img_size}x{self.img_size} "
                                 f"input, got {h}x{w}")
        x = self.forward_features(x)[-1]
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.distillation:
            out, out_dist = self.head(x), self.head_dist(x)
            if self.training:
                return out, out_dist
            return (out + out_dist) / 2
        return self.head(x)
