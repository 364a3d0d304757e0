"""The ``importance`` and ``prune`` commands: plain functions from parsed arguments to a
result dict, and Rich renderings of those dicts (the CLI wires them in)."""

from __future__ import annotations

from pathlib import Path


def importance_command(model: str, *, weights: str | None, images: str, labels: str | None = None,
                       keep_macs: float | None = None, keep_params: float | None = None,
                       plot: str | None = None, img_size: int = 224, reporter=None) -> dict:
    from .. import api

    return api.importance(model, weights, images, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
                          plot=plot, img_size=img_size, reporter=reporter).to_dict()


def prune_command(model: str, *, weights: str | None, images: str, out: str, labels: str | None = None,
                  keep_macs: float | None = None, keep_params: float | None = None, finetune_steps: int = 0,
                  img_size: int = 224, reporter=None) -> dict:
    from .. import api

    return api.prune(model, weights, images, Path(out), labels=labels, keep_macs=keep_macs,
                     keep_params=keep_params, finetune_steps=finetune_steps, img_size=img_size,
                     reporter=reporter).to_dict()


def widths_table(widths: dict):
    """A pruned model's widths per module (``evit-deploy info --weights``)."""
    from ..console import table

    rows = []
    for module, width in widths.items():
        if isinstance(width, int):
            rows.append([module, "hidden", str(width)])
        else:
            rows.append([module, "Q/K per head", ",".join(str(h[0]) for h in width)])
            rows.append([module, "V per head", ",".join(str(h[1]) for h in width)])
    return table("pruned widths", ["module", "", "channels"], rows)


def _fig5_table(rows: list[dict]):
    from ..console import table

    parts = ("Q", "K", "V", "FFN")
    return table("channels / embed dim per block (supplementary Fig. 5): original → pruned",
                 ["block", "dim", *parts],
                 [[r["block"], r["embed_dim"], *(f"{r['original'][p]:.2f} → {r['pruned'][p]:.2f}" for p in parts)]
                  for r in rows], justify_right={1})


def render_importance(result: dict) -> list:
    """Renderables: groups by importance share, then the Fig. 5 ratios."""
    from ..console import table

    rows = [[g["block"], g["group"], g["channels"], g["kept"], f"{g['importance']:.3g}", f"{100 * g['share']:.2f}"]
            for g in result["groups"]]
    budget = " and ".join(f"{v:g} of the {k}" for k, v in (("MACs", result["keep_macs"]),
                                                            ("parameters", result["keep_params"])) if v is not None)
    groups = table(f"{result['model']}: Taylor importance over {result['images']} images ({result['loss']}); "
                   f"kept at {budget}", ["block", "group", "channels", "kept", "importance", "share (%)"],
                   rows, justify_right={2, 3, 4, 5})
    summary = (f"MACs {result['macs'] / 1e6:.1f} M → {result['planned_macs'] / 1e6:.1f} M, "
               f"params {result['params'] / 1e6:.2f} M → {result['planned_params'] / 1e6:.2f} M"
               + (f"; chart: {result['plot']}" if result.get("plot") else ""))
    return [groups, _fig5_table(result["fig5"]), summary]


def render_prune(result: dict) -> list:
    from ..console import table

    def ratio(a, b):
        return f"{b / a:.3f}"

    rows = [["MACs", f"{result['macs'] / 1e6:.1f} M", f"{result['pruned_macs'] / 1e6:.1f} M",
             ratio(result["macs"], result["pruned_macs"])],
            ["parameters", f"{result['params'] / 1e6:.3f} M", f"{result['pruned_params'] / 1e6:.3f} M",
             ratio(result["params"], result["pruned_params"])]]
    agree = f"top-1 agreement with the unpruned model: {100 * result['agreement']:.1f}%"
    if result["agreement_finetuned"] is not None:
        agree += (f", {100 * result['agreement_finetuned']:.1f}% after {result['finetune_steps']} "
                  f"distillation steps")
    return [table(f"{result['model']} pruned → {result['path']}", ["", "original", "pruned", "ratio"], rows,
                  justify_right={1, 2, 3}), _fig5_table(result["fig5"]), agree]
