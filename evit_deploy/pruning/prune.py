"""Pruning to a budget: remove the least important channels until the model has the
requested share of the original MACs (or parameters), then optionally recover by
distillation from the unpruned model.

Ranking: each group's channel scores are divided by the group's mean score (torch-pruning's
default ``mean`` group normalisation), so that groups with different activation scales
compete on equal terms, and channels are removed in order of that score across the whole
model; every group keeps at least its most important channel (no head, FFN or patch
merging disappears). The number of channels removed is the smallest that meets the
budget, found by search with MACs and parameters counted on the model itself
(:mod:`..models.counting`; on the meta device that would be slower: its kernels are Python).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models.counting import count_macs, count_parameters
from ..models.efficientvit import EfficientViT
from ..progress import Reporter
from .importance import GroupImportance


def _size(model: EfficientViT, kept: dict[str, int]) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` with the groups narrowed to ``kept`` widths."""
    from .groups import model_widths

    widths = model_widths(model)
    modules = dict(model.named_modules())
    for key, count in kept.items():
        module, kind = key.split(":")
        if kind in ("ffn", "expansion"):
            widths[module] = count
            continue
        head = int(kind[2:] if kind.startswith("qk") else kind[1:])
        heads = [list(h) for h in widths[module]]
        if kind.startswith("qk"):
            heads[head][0] = count
        else:
            heads[head][1] = count
            split = modules[module].qkvs[0].c.in_channels
            if head + 1 < len(heads):     # which split channels the next head reads does not change the size
                heads[head + 1][2:] = list(range(count)) if count != split else []
        widths[module] = tuple(tuple(h) for h in heads)
    size = model.img_size or 224
    with torch.random.fork_rng(devices=[]):     # initialisation must not move the caller's RNG
        shape = EfficientViT(model.config.with_widths(widths), img_size=model.img_size,
                             num_classes=model.num_classes, distillation=model.distillation)
    return count_macs(shape, (size, size)), count_parameters(shape)


def size_of(model: EfficientViT) -> tuple[int, int]:
    """(MACs of one image at the model's input size, parameters) of ``model``."""
    return _size(model, {})


def plan(model: EfficientViT, importance: list[GroupImportance], *, keep_macs: float | None = None,
         keep_params: float | None = None, multiple: int = 1) -> dict[str, list[int]]:
    """The channels to keep per group (by :attr:`Group.key`) so that the model has at most
    ``keep_macs`` of its MACs and ``keep_params`` of its parameters. With ``multiple`` > 1,
    each group keeps a multiple of it (or all its channels): onnxruntime's blocked (NCHWc)
    convolutions take only channel counts that are multiples of their block (8 with AVX2,
    16 with AVX-512) and run the others through a slower path."""
    macs, params = size_of(model)
    order = []           # (normalised score, group key, channel), removable channels only
    for item in importance:
        scores = item.scores.double()
        normalised = scores / scores.mean().clamp_min(1e-30)
        best = int(scores.argmax())
        order.extend((float(s), item.group.key, c) for c, s in enumerate(normalised) if c != best)
    order.sort()
    widths = {item.group.key: item.group.channels for item in importance}

    def kept_widths(removed: int) -> dict[str, int]:
        counts = dict(widths)
        for _, key, _ in order[:removed]:
            counts[key] -= 1
        return {key: min(widths[key], -(-count // multiple) * multiple) for key, count in counts.items()}

    def excess(removed: int) -> float:
        """How far above the budget (> 0) or within it (<= 0) removing ``removed`` leaves the model."""
        m, p = _size(model, kept_widths(removed))
        return max(m / macs - keep_macs if keep_macs is not None else -1.0,
                   p / params - keep_params if keep_params is not None else -1.0)

    # The smallest ``removed`` within budget: interpolation between the bounds (size falls
    # almost linearly with channels removed), bisection when that fails to halve them.
    low, high = 0, len(order)
    e_low, e_high = excess(low), excess(high)
    if e_high > 0:
        raise ValueError("the budget is below what keeping one channel per group allows")
    if e_low <= 0:
        high = 0
    bisect = False
    while high - low > 1:
        guess = (low + high) // 2 if bisect else low + round((high - low) * e_low / (e_low - e_high))
        mid = min(max(guess, low + 1), high - 1)
        e_mid = excess(mid)
        width = high - low
        if e_mid <= 0:
            high, e_high = mid, e_mid
        else:
            low, e_low = mid, e_mid
        bisect = not bisect and (high - low) * 2 > width
    counts = kept_widths(high)
    removed: dict[str, set[int]] = {}
    for _, key, channel in order:           # each group loses its least important channels
        if widths[key] - len(removed.get(key, ())) > counts[key]:
            removed.setdefault(key, set()).add(channel)
    return {key: [c for c in range(widths[key]) if c not in removed.get(key, ())] for key in widths}


def agreement(student: EfficientViT, teacher: EfficientViT, images: torch.Tensor) -> float:
    """Share of ``images`` on which both models predict the same class."""
    with torch.no_grad():
        return float((student(images).argmax(1) == teacher(images).argmax(1)).double().mean())


def distill(student: EfficientViT, teacher: EfficientViT, images: torch.Tensor, steps: int, *,
            batch: int = 8, lr: float = 1e-5, reporter: Reporter | None = None) -> list[float]:
    """Recover ``student`` by ``steps`` AdamW steps on the KL divergence to ``teacher``'s
    predictions over ``images`` (no labels needed). BatchNorm statistics stay frozen
    (eval mode): a handful of images would make poor ones. On so few images a step can
    overshoot, so the student keeps the weights with the lowest loss over all the images
    (possibly its own). Returns that loss before the first step and after each."""
    reporter = reporter or Reporter()
    student.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        targets = F.log_softmax(teacher(images), 1)
    gen = torch.Generator().manual_seed(0)

    def loss_on(pick):
        return F.kl_div(F.log_softmax(student(images[pick]), 1), targets[pick], log_target=True,
                        reduction="batchmean")

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_on(torch.arange(len(images))))

    losses = [full_loss()]
    best = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.enable_grad(), reporter.task("distillation", total=steps) as task:
        for _ in range(steps):
            loss = loss_on(torch.randperm(len(images), generator=gen)[:batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(full_loss())
            if losses[-1] < min(losses[:-1]):
                best = {k: v.clone() for k, v in student.state_dict().items()}
            task.update(advance=1)
    student.load_state_dict(best)
    return losses
