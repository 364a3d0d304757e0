"""First-order Taylor importance of every prunable channel group (Molchanov et al., CVPR
2019; EfficientViT supplementary Sec. B).

Removing a channel changes the loss by about ``-Σ a·∂L/∂a`` summed over the positions of
its activation ``a`` (and over every place where the group's channels act); a channel's
importance is the absolute value of that sum, accumulated over the images one by one.

With labels the loss is the cross-entropy against them. Without, it is the divergence
from the unpruned model's own predictions; the soft KL divergence of a model to itself
has a zero gradient, so its top-1 predictions are the targets (cross-entropy against
them is the KL divergence to those one-hot predictions).

Where each group's activations are read (see :mod:`.groups` for what a group is):
Q after the query's depthwise conv, K from the QKV projection, V at the input of the
output projection plus, when it feeds the next head, at that head's input (the split
channel it is added to goes with it), FFN hidden channels after the ReLU, patch-merging
channels at the squeeze-excite input (a zero there is a removed channel everywhere).
A head's Q and K are pruned together; their importance is the mean of Q's and K's (to
first order each measures the removal of the same ``q_j k_j`` product).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..models.efficientvit import FFN, CascadedGroupAttention, EfficientViT, PatchMerging
from ..progress import Reporter
from .groups import Group, prunable_groups


@dataclass
class GroupImportance:
    group: Group
    scores: torch.Tensor                 # per channel: what pruning ranks
    parts: dict[str, torch.Tensor] = field(default_factory=dict)   # "q" and "k" scores of a qk group

    @property
    def total(self) -> float:
        return float(self.scores.sum())


class _Taps:
    """Forward hooks that keep, per group, the activations whose a·∂L/∂a it sums."""

    def __init__(self, model: EfficientViT):
        self.sites: list[tuple[str, torch.Tensor, slice]] = []   # (group key + part, tensor, channels)
        self.handles = []
        for path, module in model.named_modules():
            if isinstance(module, FFN):
                self._hook(module.act, [(f"{path}:ffn", slice(None))])
            elif isinstance(module, PatchMerging):
                self._hook(module.se, [(f"{path}:expansion", slice(None))], pre=True)
            elif isinstance(module, CascadedGroupAttention):
                self._attention(path, module)

    def _hook(self, module, sites, pre=False):
        def keep(tensor):
            for key, channels in sites:
                self.sites.append((key, tensor, channels))

        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda m, args: keep(args[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda m, args, out: keep(out)))

    def _attention(self, path, attn: CascadedGroupAttention):
        offset = 0
        proj_sites = []
        for i, (qk, v) in enumerate(zip(attn.qk_dims, attn.v_dims)):
            self._hook(attn.dws[i], [(f"{path}:qk{i}/q", slice(None))])
            self._hook(attn.qkvs[i], [(f"{path}:qk{i}/k", slice(qk, 2 * qk))])
            if i > 0:     # the cascade: head i's input carries head i-1's V
                self._hook(attn.qkvs[i], [(f"{path}:v{i - 1}", slice(None))], pre=True)
            proj_sites.append((f"{path}:v{i}", slice(offset, offset + v)))
            offset += v
        self._hook(attn.proj, proj_sites, pre=True)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def taylor_importance(model: EfficientViT, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                      reporter: Reporter | None = None) -> list[GroupImportance]:
    """Per-channel Taylor importance of every group of ``model`` (eval mode, unchanged),
    over ``images`` (N x 3 x H x W, normalised) and their ``labels`` (N class indices)."""
    reporter = reporter or Reporter()
    groups = prunable_groups(model)
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    taps = _Taps(model)
    try:
        with reporter.task("Taylor importance", total=len(images)) as task:
            for n in range(len(images)):
                taps.sites.clear()
                with torch.enable_grad():
                    logits = model(images[n:n + 1])
                    target = labels[n:n + 1] if labels is not None else logits.detach().argmax(1)
                    loss = F.cross_entropy(logits, target)
                    tensors = list({id(t): t for _, t, _ in taps.sites}.values())
                    grads = dict(zip(map(id, tensors), torch.autograd.grad(loss, tensors)))
                image: dict[str, torch.Tensor] = {}
                for key, tensor, channels in taps.sites:
                    # Σ over batch (one image's windows) and positions of a·g, per channel.
                    contribution = (tensor * grads[id(tensor)])[:, channels].detach()
                    contribution = contribution.transpose(0, 1).reshape(contribution.shape[1], -1).sum(1)
                    image[key] = image.get(key, 0) + contribution
                for key, value in image.items():
                    sums[key] = sums.get(key, 0) + value.abs().double()
                task.update(advance=1)
    finally:
        taps.remove()
        model.train(was_training)
    result = []
    for group in groups:
        if group.kind == "qk":
            parts = {p: sums[f"{group.key}/{p}"] for p in ("q", "k")}
            result.append(GroupImportance(group, (parts["q"] + parts["k"]) / 2, parts))
        else:
            result.append(GroupImportance(group, sums[group.key]))
    return result
