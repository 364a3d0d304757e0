"""Importance and pruning of a family member's checkpoint over a folder of images: what
``api.importance`` and ``api.prune`` do, returning records."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import BadInputError
from ..fsutil import ensure_output_file
from ..progress import Reporter


@dataclass
class ImportanceResult:
    model: str
    weights_sha256: str | None
    images: int
    loss: str                          # what the importance was measured on
    keep_macs: float | None
    keep_params: float | None
    groups: list[dict]                 # per group: block, group, channels, importance, share, kept
    fig5: list[dict]                   # supplementary Fig. 5: per block Q, K, V, FFN ratios
    macs: int
    params: int
    planned_macs: int
    planned_params: int
    plot: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    model: str
    source_sha256: str | None
    loss: str                          # what the importance was measured on
    path: str
    sha256: str
    keep_macs: float | None
    keep_params: float | None
    macs: int
    params: int
    pruned_macs: int
    pruned_params: int
    widths: dict
    fig5: list[dict]
    finetune_steps: int
    agreement: float                   # top-1 agreement with the unpruned model on the images, after pruning
    agreement_finetuned: float | None  # ... and after distillation
    losses: list[float] = field(default_factory=list)   # KL to the unpruned model: before distillation, after each step

    def to_dict(self) -> dict:
        return asdict(self)


def check_budget(keep_macs: float | None, keep_params: float | None, *, default_macs: float | None = None):
    if keep_macs is None and keep_params is None:
        if default_macs is None:
            raise BadInputError("give a budget: --keep-macs SHARE and/or --keep-params SHARE (e.g. 0.7)")
        keep_macs = default_macs
    for flag, value in (("--keep-macs", keep_macs), ("--keep-params", keep_params)):
        if value is not None and not 0 < value <= 1:
            raise BadInputError(f"{flag} is the share of the original to keep, in (0, 1]; got {value}")
    return keep_macs, keep_params


def _load(model: str, weights, images, labels, img_size: int):
    import numpy as np
    import torch

    from ..evaluation import eval_images
    from ..models.factory import load_model
    from ..preprocess import Preprocessing, preprocess_file

    if weights is None:
        raise BadInputError("pruning needs the weights to prune: give --weights FILE")
    found = eval_images(images, labels)
    spec = Preprocessing.for_size(img_size)
    x = torch.from_numpy(np.concatenate([preprocess_file(p, spec) for p in found.paths]))
    y = torch.as_tensor(found.labels) if labels is not None and found.labels is not None else None
    net, provenance = load_model(model, weights, img_size=img_size)
    return net, provenance.weights_sha256, x, y


def _records(importance, kept: dict[str, list[int]]) -> list[dict]:
    total = sum(item.total for item in importance) or 1.0
    rows = []
    for item in importance:
        g = item.group
        row = {"block": g.block, "module": g.module, "group": g.label, "kind": g.kind, "head": g.head,
               "channels": g.channels, "kept": len(kept[g.key]), "importance": item.total,
               "share": item.total / total}
        for part, scores in item.parts.items():
            row[f"importance_{part}"] = float(scores.sum())
        rows.append(row)
    return rows


def _embed_dims(net) -> dict[str, int]:
    from ..models.efficientvit import EfficientViTBlock

    return {path: m.dw0.m.c.in_channels for path, m in net.named_modules() if isinstance(m, EfficientViTBlock)}


def importance(model: str, weights, images, *, labels=None, keep_macs: float | None = None,
               keep_params: float | None = None, img_size: int = 224, plot: str | os.PathLike | None = None,
               multiple_of: int = 8, reporter: Reporter | None = None) -> ImportanceResult:
    """Taylor importance of every prunable group of ``model`` (loaded from ``weights``) over
    the images below ``images`` (labelled by the ``labels`` file, if any), and which
    channels a pruning to the budget (default ``keep_macs=0.7``) would keep, as
    :func:`prune` with the same ``multiple_of`` keeps them."""
    from .figure import fig5, plot_fig5
    from .groups import model_widths
    from .groups import remove_channels
    from .importance import taylor_importance
    from .prune import size_of

    keep_macs, keep_params = check_budget(keep_macs, keep_params, default_macs=0.7)
    _check_multiple(multiple_of)
    net, sha, x, y = _load(model, weights, images, labels, img_size)
    scores = taylor_importance(net, x, y, reporter=reporter)
    kept = _plan(net, scores, keep_macs, keep_params, multiple_of)
    pruned = remove_channels(net, kept)
    macs, params = size_of(net)
    planned_macs, planned_params = size_of(pruned)
    rows = fig5(model_widths(net), model_widths(pruned), _embed_dims(net))
    result = ImportanceResult(net_name(model), sha, len(x), _loss_name(y), keep_macs, keep_params,
                              _records(scores, kept), rows, macs, params, planned_macs, planned_params)
    if plot is not None:
        title = f"{result.model}: channels / embed dim, original and at {_budget_text(keep_macs, keep_params)}"
        result.plot = str(plot_fig5(rows, plot, title))
    return result


def _check_multiple(multiple_of: int) -> None:
    """Refuse a ``--multiple-of`` below 1 before any model is loaded."""
    if multiple_of < 1:
        raise BadInputError(f"--multiple-of must be 1 or more, got {multiple_of}")


def _plan(net, scores, keep_macs, keep_params, multiple: int):
    from .prune import plan

    try:
        return plan(net, scores, keep_macs=keep_macs, keep_params=keep_params, multiple=multiple)
    except ValueError as exc:
        raise BadInputError(f"cannot prune to {_budget_text(keep_macs, keep_params)}: {exc}") from None


def _budget_text(keep_macs, keep_params) -> str:
    parts = ([f"{keep_macs:g} of the MACs"] if keep_macs is not None else []) + \
            ([f"{keep_params:g} of the parameters"] if keep_params is not None else [])
    return " and ".join(parts)


def _loss_name(labels) -> str:
    return "cross-entropy (labels)" if labels is not None else "cross-entropy to own top-1 (no labels)"


def net_name(model: str) -> str:
    from ..models import resolve_name
    return resolve_name(model).name


def prune(model: str, weights, images, out, *, labels=None, keep_macs: float | None = None,
          keep_params: float | None = None, finetune_steps: int = 0, img_size: int = 224, multiple_of: int = 8,
          reporter: Reporter | None = None) -> PruneResult:
    """Prune ``model`` (from ``weights``) to the budget by Taylor importance over the images
    below ``images``, recover by ``finetune_steps`` of distillation from the unpruned model
    on the same images, and write the checkpoint ``out`` (it records its widths, so that
    ``--weights out`` alone rebuilds the model). ``multiple_of``: every group keeps a
    multiple of that many channels (or all of them), for the runtimes' blocked kernels."""
    from ..fsutil import sha256_file
    from ..models.checkpoint import write_checkpoint
    from .figure import fig5
    from .groups import model_widths, remove_channels
    from .importance import taylor_importance
    from .prune import agreement, distill, size_of

    keep_macs, keep_params = check_budget(keep_macs, keep_params)
    if finetune_steps < 0:
        raise BadInputError(f"--finetune-steps must be 0 or more, got {finetune_steps}")
    _check_multiple(multiple_of)
    ensure_output_file(out)               # before the slow work, not after it
    reporter = reporter or Reporter()
    net, sha, x, y = _load(model, weights, images, labels, img_size)
    scores = taylor_importance(net, x, y, reporter=reporter)
    pruned = remove_channels(net, _plan(net, scores, keep_macs, keep_params, multiple_of))
    before = agreement(pruned, net, x)
    losses = distill(pruned, net, x, finetune_steps, reporter=reporter) if finetune_steps else []
    after = agreement(pruned, net, x) if finetune_steps else None
    name = net_name(model)
    with reporter.stage("write", str(out)):
        path = write_checkpoint(out, pruned, name)
    macs, params = size_of(net)
    pruned_macs, pruned_params = size_of(pruned)
    return PruneResult(name, sha, _loss_name(y), str(path), sha256_file(path), keep_macs, keep_params, macs, params,
                       pruned_macs, pruned_params, pruned.config.widths_dict(),
                       fig5(model_widths(net), model_widths(pruned), _embed_dims(net)), finetune_steps,
                       before, after, losses)
