"""``evit-deploy profile``: where the time goes, as in the paper's runtime profiling.

The paper (supplementary Section A) splits inference time into compute-bound operations
(convolutions, matrix multiplies) and memory-bound ones (reshapes, transposes, copies,
element-wise ops, normalisation, softmax), and relates the memory-bound share to the
attention layers. This module measures the same split for any backend that can report
per-operator times, and attributes time to the network's blocks where the backend keeps
track of which module an operator came from.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends import BackendSpec, check_target_options, random_inputs
from .errors import BadInputError
from .hostinfo import cpu_info, package_versions
from .models.registry import resolve_name
from .progress import QuietReporter, Reporter
from .targets.base import OpTime

COMPUTE, MEMORY = "compute-bound", "memory-bound"

#: (category, bound, operator-name pattern); first match wins. Names are lower-cased
#: aten ops (torch), ONNX op types (onnxruntime) or fused kernel names (TVM).
CATEGORIES = [
    ("convolution", COMPUTE, r"conv"),
    ("matrix multiply", COMPUTE, r"matmul|gemm|\bmm\b|bmm|addmm|linear|dense|batch_matmul"),
    ("softmax", MEMORY, r"softmax"),
    ("normalisation", MEMORY, r"batch_?norm|layer_?norm|instance_?norm|group_?norm"),
    ("reshape / transpose / copy", MEMORY,
     r"reshape|view|transpose|permute|contiguous|copy|clone|concat|\bcat\b|split|chunk|slice|pad|gather|index"
     r"|expand|flatten|squeeze|unsqueeze|layout_transform|reorder|strided|select|shape|identity|cast|to_copy|_to\b"),
    ("reduction / pooling", MEMORY, r"mean|reduce|pool|sum"),
    ("element-wise", MEMORY, r"add|mul|sub|div|relu|sigmoid|clip|clamp|hardswish|gelu|tanh|exp|where|neg|sqrt"),
]
OTHER = ("other", MEMORY)

#: Blocks of EfficientViT, from the module that an operator ran in.
BLOCKS = ("patch embedding", "attention", "FFN", "depthwise", "downsampling", "head")


def categorize(op: str) -> tuple[str, str]:
    name = op.lower()
    for category, bound, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category, bound
    return OTHER


def block_of_module(path: str, module) -> str | None:
    """The block kind of a module of EfficientViT (by its type and place), or None."""
    from torch import nn

    from .models.efficientvit import FFN, ConvNorm, LocalWindowAttention, PatchMerging, Residual

    if path in ("patch_embed",):
        return "patch embedding"
    if path in ("head", "head_dist"):
        return "head"
    if isinstance(module, PatchMerging):
        return "downsampling"
    if isinstance(module, Residual):
        inner = module.m
        if isinstance(inner, LocalWindowAttention):
            return "attention"
        if isinstance(inner, FFN):
            return "FFN"
        if isinstance(inner, (ConvNorm, nn.Conv2d)):
            return "depthwise"
    return None


def block_map(model) -> dict[str, str]:
    """Module path -> block kind for every block-level module of a model."""
    return {path: kind for path, module in model.named_modules()
            if path and (kind := block_of_module(path, module)) is not None}


@dataclass
class ProfileResult:
    model: str
    backend: str
    batch: int
    threads: int
    iterations: int
    total_ms: float                           # per iteration, sum of operator times
    by_category: list[dict]
    by_block: list[dict]
    top_ops: list[dict]
    host: dict = field(default_factory=cpu_info)
    versions: dict = field(default_factory=package_versions)

    @property
    def memory_bound_share(self) -> float:
        return sum(c["share"] for c in self.by_category if c["bound"] == MEMORY)

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bound_share": self.memory_bound_share,
                "compute_bound_share": 1 - self.memory_bound_share}


def summarise(ops: list[OpTime], *, model: str, backend: str, batch: int, threads: int,
              iterations: int) -> ProfileResult:
    total = sum(o.seconds for o in ops) or 1e-12
    categories: dict[tuple[str, str], float] = {}
    blocks: dict[str, dict] = {}
    by_name: dict[str, float] = {}
    for op in ops:
        category, bound = categorize(op.name)
        categories[(category, bound)] = categories.get((category, bound), 0.0) + op.seconds
        if op.block is not None:
            b = blocks.setdefault(op.block, {COMPUTE: 0.0, MEMORY: 0.0})
            b[bound] += op.seconds
        by_name[op.name] = by_name.get(op.name, 0.0) + op.seconds
    by_category = [{"category": c, "bound": b, "ms": s / iterations * 1000, "share": s / total}
                   for (c, b), s in sorted(categories.items(), key=lambda kv: -kv[1])]
    attributed = sum(v[COMPUTE] + v[MEMORY] for v in blocks.values())
    by_block = []
    for kind in [*BLOCKS, *(k for k in blocks if k not in BLOCKS)]:
        if kind in blocks:
            b = blocks[kind]
            t = b[COMPUTE] + b[MEMORY]
            by_block.append({"block": kind, "ms": t / iterations * 1000, "share": t / total,
                             "memory_bound_share": b[MEMORY] / t if t else 0.0})
    if blocks and total - attributed > 1e-9:
        by_block.append({"block": "(not attributed)", "ms": (total - attributed) / iterations * 1000,
                         "share": (total - attributed) / total, "memory_bound_share": None})
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    top_ops = [{"op": n, "ms": s / iterations * 1000, "share": s / total, "category": categorize(n)[0]}
               for n, s in top]
    return ProfileResult(model, backend, batch, threads, iterations, total / iterations * 1000,
                         by_category, by_block, top_ops)


# -- backends ------------------------------------------------------------------------------

def _torch_ops(model, x, iterations: int, threads: int) -> list[OpTime]:
    """aten operator self-times, attributed to blocks through record_function scopes."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(threads)
    kinds = block_map(model)
    modules = dict(model.named_modules())
    scopes = []

    def enter(kind):
        def hook(module, args):
            scope = record_function(f"block::{kind}")
            scope.__enter__()
            scopes.append(scope)
        return hook

    def leave(module, args, output):
        scopes.pop().__exit__(None, None, None)

    handles = []
    for path, kind in kinds.items():
        handles.append(modules[path].register_forward_pre_hook(enter(kind)))
        handles.append(modules[path].register_forward_hook(leave))
    try:
        with torch.no_grad():
            for _ in range(2):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iterations):
                    model(x)
    finally:
        for h in handles:
            h.remove()
    ops = []
    for event in prof.events():
        if not event.name.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        block, parent = None, event.cpu_parent
        while parent is not None:
            if parent.name.startswith("block::"):
                block = parent.name.removeprefix("block::")
                break
            parent = parent.cpu_parent
        ops.append(OpTime(event.name.removeprefix("aten::"), event.self_cpu_time_total / 1e6, block))
    return ops


def profile(model: str, backend: str = "torch", *, batch: int = 16, threads: int = 1, img_size: int = 224,
            iterations: int = 10, weights=None, target_options: dict | None = None,
            reporter: Reporter | None = None) -> ProfileResult:
    """Per-operator-category and per-block time of one model on one backend
    (:mod:`evit_deploy.backends`)."""
    reporter = reporter or Reporter()
    name = resolve_name(model).name
    check_target_options(target_options)
    spec = BackendSpec.parse(backend, target_options)
    if spec.runtime == "torch":
        import torch

        from .models import create_model

        net = create_model(name, "random" if weights is None else weights, fuse=True, img_size=img_size)
        x = torch.rand(batch, 3, img_size, img_size)
        with reporter.stage("profile", f"{name} torch"):
            ops = _torch_ops(net, x, iterations, threads)
        return summarise(ops, model=name, backend=backend, batch=batch, threads=threads, iterations=iterations)
    if spec.is_torch or not spec.get_target().supports_profiling():
        raise BadInputError(f"backend '{backend}' cannot report per-operator times")
    tgt = spec.get_target()
    with tempfile.TemporaryDirectory(prefix="evit-profile-") as tmp:
        with reporter.stage("export", f"{name} {tgt.name}"):
            result = spec.export(name, batch=batch, img_size=img_size, weights=weights, out_dir=Path(tmp),
                                 reporter=QuietReporter())
        with reporter.stage("profile", f"{name} {backend}"):
            ops = tgt.profile_ops(result.artifact.path, random_inputs(result.artifact.description, batch),
                                  threads=threads, iterations=iterations, blocks=_ModuleBlocks(name, img_size))
    return summarise(ops, model=name, backend=backend, batch=batch, threads=threads, iterations=iterations)


class _ModuleBlocks(Mapping):
    """:func:`block_map` of a model, made on first use: runtimes that do not attribute
    operators to blocks never read it, and the model is built once however many
    backends profile it."""

    def __init__(self, model: str, img_size: int):
        self.model, self.img_size = model, img_size
        self._blocks: dict[str, str] | None = None

    def _map(self) -> dict[str, str]:
        if self._blocks is None:
            self._blocks = _model_blocks(self.model, self.img_size)
        return self._blocks

    def __getitem__(self, path: str) -> str:
        return self._map()[path]

    def __iter__(self):
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())


@functools.lru_cache(maxsize=None)
def _model_blocks(model: str, img_size: int) -> dict[str, str]:
    from .models import create_model

    # The module tree, not the weights: no checkpoint to load.
    return block_map(create_model(model, None, fuse=True, img_size=img_size))


# -- chart ---------------------------------------------------------------------------------

def plot(results: list[ProfileResult], path: str | os.PathLike) -> Path:
    """Two panels like the paper's runtime breakdown: time per operator category (compute-
    bound vs memory-bound) and per block, one bar per backend."""
    from .charts import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 2.6 + 0.8 * len(results)), dpi=120)
    labels = [f"{r.backend}\n{r.total_ms:.1f} ms" for r in results]
    categories = [c for c, _, _ in CATEGORIES] + [OTHER[0]]
    compute_colors = iter(plt.cm.Blues([0.8, 0.6]))
    memory_colors = iter(plt.cm.Oranges([0.9, 0.75, 0.6, 0.45, 0.3, 0.2]))
    colors = {c: next(compute_colors) if b == COMPUTE else next(memory_colors, (0.7, 0.7, 0.7, 1))
              for c, b, _ in CATEGORIES}
    colors[OTHER[0]] = (0.6, 0.6, 0.6, 1)
    for i, r in enumerate(results):
        left = 0.0
        shares = {c["category"]: c["share"] for c in r.by_category}
        for c in categories:
            if shares.get(c):
                axes[0].barh(i, shares[c] * 100, left=left, color=colors[c], label=c if i == 0 else None)
                left += shares[c] * 100
        axes[0].text(101, i, f"memory-bound {r.memory_bound_share * 100:.0f}%", va="center", fontsize=8)
    axes[0].set_yticks(range(len(results)), labels)
    axes[0].set_xlim(0, 130)
    axes[0].set_xlabel("% of operator time")
    axes[0].set_title("Operator categories (blue: compute-bound, orange: memory-bound)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.45, -0.3), ncol=4, frameon=False)
    block_colors = dict(zip([*BLOCKS, "(not attributed)"], plt.cm.tab10(range(len(BLOCKS) + 1))))
    for i, r in enumerate(results):
        left = 0.0
        for b in r.by_block:
            axes[1].barh(i, b["share"] * 100, left=left, color=block_colors.get(b["block"], (0.5, 0.5, 0.5, 1)),
                         label=b["block"] if b["block"] not in axes[1].get_legend_handles_labels()[1] else None)
            left += b["share"] * 100
        if not r.by_block:
            axes[1].text(1, i, "this backend fuses operators across blocks: no per-block times", va="center", fontsize=8)
    axes[1].set_yticks(range(len(results)), labels)
    axes[1].set_xlim(0, 100)
    axes[1].set_xlabel("% of operator time")
    axes[1].set_title("Blocks", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)
    model = resolve_name(results[0].model).display_name
    fig.suptitle(f"{model} runtime profile, batch {results[0].batch}, {results[0].threads} thread(s)", fontsize=10)
    return save_png(fig, path)

