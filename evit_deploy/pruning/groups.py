"""The structurally prunable channel groups of an EfficientViT, and removing channels.

A group is a set of channels that can only go together (removing one channel of a group
means deleting the same index from every tensor listed for it):

* ``qk`` — one head's query/key dim ``j``: row ``j`` of Q and of K in the head's QKV
  projection, channel ``j`` of the query's depthwise conv (token interaction). Q and K of
  a head stay equally wide, since attention pairs ``q_j`` with ``k_j``;
* ``v`` — one head's value dim ``j``: the V row, the output projection's input column and,
  except for the last head, the channel of the next head's split that this V channel is
  added to in the cascade (that head then reads only the kept channels of its split);
* ``ffn`` — an FFN's hidden channel: first conv's row, second conv's column;
* ``expansion`` — a patch merging's expanded channel: the pointwise expansion, its
  depthwise stride-2 conv, the squeeze-excite input and gate, the projection's column.

Not prunable: the embedding dims of each stage (the residual stream: every block adds into
it) and the residual depthwise convs on them (``dw0``, ``dw1``), whose output channels
are written back into that stream, and the squeeze-excite bottleneck (kept at the width
of the trained model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.efficientvit import FFN, CascadedGroupAttention, EfficientViT, PatchMerging

KINDS = ("qk", "v", "ffn", "expansion")


@dataclass(frozen=True)
class Group:
    module: str          # path of the module that owns the channels
    kind: str            # one of KINDS
    head: int | None     # attention head, for "qk" and "v"
    channels: int        # current width

    @property
    def key(self) -> str:
        return f"{self.module}:{self.kind}" + (f"{self.head}" if self.head is not None else "")

    @property
    def block(self) -> str:
        """The top-level block (``blocks2.1``) the group belongs to."""
        return ".".join(self.module.split(".")[:2])

    @property
    def label(self) -> str:
        if self.kind in ("qk", "v"):
            return f"head {self.head} {'Q/K' if self.kind == 'qk' else 'V'}"
        if self.kind == "ffn":
            return f"FFN {self.module.split('.')[2]}" if self.module.count(".") > 2 else "FFN"
        return "patch-merging expansion"


def prunable_groups(model: EfficientViT) -> list[Group]:
    """Every group of ``model`` in module order."""
    groups = []
    for path, module in model.named_modules():
        if isinstance(module, FFN):
            groups.append(Group(path, "ffn", None, module.pw1.c.out_channels))
        elif isinstance(module, PatchMerging):
            groups.append(Group(path, "expansion", None, module.conv1.c.out_channels))
        elif isinstance(module, CascadedGroupAttention):
            for i in range(module.num_heads):
                groups.append(Group(path, "qk", i, module.qk_dims[i]))
                groups.append(Group(path, "v", i, module.v_dims[i]))
    return groups


def model_widths(model: EfficientViT) -> dict:
    """The per-module widths of ``model`` in the form of ``EfficientViTConfig.widths``."""
    widths = {}
    for path, module in model.named_modules():
        if isinstance(module, FFN):
            widths[path] = module.pw1.c.out_channels
        elif isinstance(module, PatchMerging):
            widths[path] = module.conv1.c.out_channels
        elif isinstance(module, CascadedGroupAttention):
            split = module.qkvs[0].c.in_channels
            widths[path] = tuple((q, v, *(r if len(r) != split else ())) for q, v, r in
                                 zip(module.qk_dims, module.v_dims, module.reads))
    return widths


_BN = ("weight", "bias", "running_mean", "running_var")


def _rows(state: dict, prefix: str, idx: torch.Tensor) -> None:
    """Keep output channels ``idx`` of ConvNorm ``prefix`` (conv rows and its BN)."""
    state[f"{prefix}.c.weight"] = state[f"{prefix}.c.weight"][idx]
    for name in _BN:
        state[f"{prefix}.bn.{name}"] = state[f"{prefix}.bn.{name}"][idx]


def _columns(state: dict, key: str, idx: torch.Tensor) -> None:
    state[key] = state[key][:, idx]


def remove_channels(model: EfficientViT, kept: dict[str, list[int]]) -> EfficientViT:
    """A new model (eval mode) holding only the ``kept`` channels (by :attr:`Group.key`;
    groups not named keep all theirs), with the weights of ``model`` for them."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    widths = model_widths(model)
    modules = dict(model.named_modules())
    for group in prunable_groups(model):
        idx = kept.get(group.key)
        if idx is None:
            continue
        idx = torch.as_tensor(sorted(idx), dtype=torch.long)
        if not 0 < len(idx) <= group.channels or int(idx.max()) >= group.channels:
            raise ValueError(f"cannot keep channels {idx.tolist()} of {group.key} ({group.channels} channels)")
        p = group.module
        if group.kind == "ffn":
            _rows(state, f"{p}.pw1", idx)
            _columns(state, f"{p}.pw2.c.weight", idx)
            widths[p] = len(idx)
        elif group.kind == "expansion":
            _rows(state, f"{p}.conv1", idx)
            _rows(state, f"{p}.conv2", idx)
            _columns(state, f"{p}.se.fc1.weight", idx)
            state[f"{p}.se.fc2.weight"] = state[f"{p}.se.fc2.weight"][idx]
            state[f"{p}.se.fc2.bias"] = state[f"{p}.se.fc2.bias"][idx]
            _columns(state, f"{p}.conv3.c.weight", idx)
            widths[p] = len(idx)
        else:
            _remove_head_channels(state, widths, modules[p], p, group, idx)
    config = model.config.with_widths(widths)
    pruned = EfficientViT(config, img_size=model.img_size, num_classes=model.num_classes,
                          distillation=model.distillation)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


def _remove_head_channels(state, widths, attn: CascadedGroupAttention, p: str, group: Group,
                          idx: torch.Tensor) -> None:
    # Widths are read from the state as it is being cut, so that Q/K and V of one head
    # (and V of neighbouring heads) can be removed one group after the other.
    i = group.head
    heads = [list(h) for h in widths[p]]
    qk, v = heads[i][:2]
    if group.kind == "qk":
        rows = torch.cat([idx, qk + idx, 2 * qk + torch.arange(v)])
        _rows(state, f"{p}.qkvs.{i}", rows)
        _rows(state, f"{p}.dws.{i}", idx)
        heads[i][0] = len(idx)
    else:
        rows = torch.cat([torch.arange(2 * qk), 2 * qk + idx])
        _rows(state, f"{p}.qkvs.{i}", rows)
        offset = sum(h[1] for h in heads[:i])
        keep = torch.cat([torch.arange(offset), offset + idx, torch.arange(offset + v, sum(h[1] for h in heads))])
        _columns(state, f"{p}.proj.1.c.weight", keep)
        if i + 1 < attn.num_heads:
            _columns(state, f"{p}.qkvs.{i + 1}.c.weight", idx)
            split = attn.qkvs[0].c.in_channels
            reads = heads[i + 1][2:] or list(range(split))
            heads[i + 1][2:] = [reads[j] for j in idx.tolist()] if len(idx) != split else []
        heads[i][1] = len(idx)
    widths[p] = tuple(tuple(h) for h in heads)
