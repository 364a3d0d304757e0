"""The supplementary Fig. 5 view of a pruning: per block, the width of Q, K, V and the FFN
as a ratio to the block's input embedding dim, before and after pruning."""

from __future__ import annotations

import os
from pathlib import Path

PARTS = ("Q", "K", "V", "FFN")


def block_ratios(widths: dict, embed_dims: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per attention block (``blocks1.0``): Q, K and V (summed over heads) and FFN (mean of
    the block's two FFNs) widths over the block's embed dim. ``widths`` is
    ``groups.model_widths``; ``embed_dims`` the embed dim of each attention block."""
    ratios = {}
    for block, dim in embed_dims.items():
        heads = widths[f"{block}.mixer.m.attn"]
        qk = sum(h[0] for h in heads)
        ffn = (widths[f"{block}.ffn0.m"] + widths[f"{block}.ffn1.m"]) / 2
        ratios[block] = {"Q": qk / dim, "K": qk / dim, "V": sum(h[1] for h in heads) / dim, "FFN": ffn / dim}
    return ratios


def fig5(original: dict, pruned: dict, embed_dims: dict[str, int]) -> list[dict]:
    """Rows ``{"block", "embed_dim", "original": {Q, K, V, FFN}, "pruned": {...}}``."""
    before, after = block_ratios(original, embed_dims), block_ratios(pruned, embed_dims)
    return [{"block": b, "embed_dim": embed_dims[b], "original": before[b], "pruned": after[b]} for b in embed_dims]


def plot_fig5(rows: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars per block and part: light the original ratio, dark after pruning."""
    from ..charts import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, len(PARTS), figsize=(4 * len(PARTS), 3.2), sharey=False)
    x = range(len(rows))
    for ax, part in zip(axes, PARTS):
        ax.bar([i - 0.2 for i in x], [r["original"][part] for r in rows], 0.4, label="original", color="#9ecae1")
        ax.bar([i + 0.2 for i in x], [r["pruned"][part] for r in rows], 0.4, label="pruned", color="#08519c")
        ax.set_title(part)
        ax.set_xticks(list(x), [r["block"].replace("blocks", "") for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("channels / embed dim")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
