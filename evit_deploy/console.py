"""Rich rendering for people: progress of stages and tasks, result tables, and the output
of a command (its JSON, its tables, its warnings)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .progress import Reporter, Task

out = Console()
err = Console(stderr=True)


class RichReporter(Reporter):
    """Stages as a spinner then a timed check line; tasks as progress bars; on stderr so
    that stdout stays clean for results."""

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet
        self._status = None

    def stage_started(self, name, detail):
        if not self.quiet:
            self._status = err.status(f"{name} {detail}".strip() + " …")
            self._status.start()

    def stage_finished(self, name, detail, seconds, ok):
        if self._status is not None:
            self._status.stop()
            self._status = None
        if not self.quiet:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            err.print(f"{mark} {name:<9} {detail:<40} [dim]{seconds:6.1f} s[/]")

    @contextmanager
    def task(self, description: str, total: float | None = None):
        if self.quiet:
            yield Task(description, total)
            return
        if self._status is not None:   # a bar inside a stage replaces its spinner
            self._status.stop()
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=err, transient=False) as progress:
            task_id = progress.add_task(description, total=total, info="")
            task = _RichTask(description, total, progress, task_id)
            yield task
        if self._status is not None:
            self._status.start()

    def info(self, message):
        super().info(message)
        if not self.quiet:
            err.print(f"  {message}")

    def warn(self, message):
        self.warnings.append(message)
        err.print(f"[bold yellow]warning:[/] {message}")


class _RichTask(Task):
    def __init__(self, description, total, progress: Progress, task_id):
        super().__init__(description, total)
        self._progress = progress
        self._id = task_id

    def update(self, **kwargs):
        super().update(**kwargs)
        info = "  ".join(f"{k}: {v}" for k, v in self.fields.items())
        self._progress.update(self._id, completed=self.completed, description=self.description,
                              total=self.total, info=info)


def table(title: str | None, columns: list[str], rows: list[list], *, justify_right: set[int] = frozenset()) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        # Folded, not cut with an ellipsis: in a narrow terminal (a CI log) a figure wraps
        # onto a second line rather than losing its last digits.
        t.add_column(col, justify="right" if i in justify_right else "left", overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def parity_table(report) -> Group:
    """Per-output metrics of a parity report, with the verdict: the artifact's error and
    the fp32 noise of the input closest to its bound, both against the exact answer."""
    def sci(v):
        return "" if v is None else f"{v:.2e}"

    # One column per output (a classifier has one, a detector five): narrow enough for a
    # CI log.
    outputs = report.outputs
    rows = [
        ["max error", *(sci(o.max_rel) for o in outputs)],
        ["  worst input", *(o.worst_input or "" for o in outputs)],
        ["  fp32 noise there", *(sci(o.noise_rel) for o in outputs)],
        ["  ratio", *("" if o.ratio is None else f"{o.ratio:.2f}" for o in outputs)],
        ["  limit there", *(sci(o.limit) for o in outputs)],
        ["min cosine", *(f"{o.min_cosine:.6f}" for o in outputs)],
        ["gain", *("" if o.gain_error is None else f"1 ± {o.gain_error:.2e}" for o in outputs)],
        ["top-1 agree", *("" if o.top1_checked is None else f"{o.top1_agree}/{o.top1_checked}"
                          + (f" ({o.top1_ties} near-ties)" if o.top1_ties else "") for o in outputs)],
        ["top-5 overlap", *("" if o.top5_overlap is None else f"{o.top5_overlap:.2f}" for o in outputs)],
        ["verdict", *("[green]pass[/]" if o.passed else "[red]FAIL[/]" for o in outputs)],
    ]
    on = f" on {report.cpu['model']}" if report.cpu else ""
    heading = Text(f"Parity of {report.artifact} — {report.runtime}{on}, {report.precision}.\nErrors against the "
                   f"exact answer ({report.exact_answer}), relative to the output scale. Tolerance: "
                   f"{report.tolerance.describe()}.", style="italic")
    t = table(None, ["", *(o.name for o in outputs)], rows, justify_right=set(range(1, len(outputs) + 1)))
    parts = [heading, t]
    if report.extra:
        parts.append(Text("; ".join(_extra_text(k, v) for k, v in report.extra.items()), style="dim"))
    return Group(*parts)


def _extra_text(key: str, value) -> str:
    """A target's extra report facts on one line (nested tables one level deep, lists left out)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    if isinstance(value, dict):
        inner = ", ".join(f"{k} {fmt(v)}" for k, v in value.items() if not isinstance(v, (list, dict)))
        return f"{key}: {inner}"
    return f"{key}: {fmt(value)}"


def predictions_table(predictions, title: str | None = None) -> Table:
    rows = []
    for pred in predictions:
        for rank, (idx, label, prob) in enumerate(pred.top, 1):
            rows.append([pred.source if rank == 1 else "", rank, label, idx, f"{prob * 100:.2f}%"])
    return table(title, ["input", "#", "class", "index", "probability"], rows, justify_right={1, 3, 4})


def eval_table(result) -> Table:
    """One row per artifact (and the reference's accuracy when the images are labelled)."""
    labelled = result.images.labels is not None

    def pct(v):
        return "" if v is None else f"{v * 100:.1f}%"

    # Narrow enough for a CI log: the runtimes, paths and absolute errors are in the JSON.
    columns = ["artifact", "precision", "top-1 agree", "top-5 overlap", "max logit error"]
    if labelled:
        columns += ["top-1", "top-5", "top-1 drop"]
    rows = []
    for r in result.records:
        row = [Path(r.artifact).name, r.precision, pct(r.top1_agreement), pct(r.top5_overlap),
               f"{r.max_rel_error:.2e}"]
        if labelled:
            row += [pct(r.top1_accuracy), pct(r.top5_accuracy),
                    "" if r.top1_drop is None else f"{r.top1_drop * 100:+.1f} pts"]
        rows.append(row)
    if labelled:
        seen = set()
        for r in result.records:
            if r.model not in seen:
                seen.add(r.model)
                rows.append([f"PyTorch {r.model}", "fp32", "", "", "",
                             pct(r.reference_top1_accuracy), pct(r.reference_top5_accuracy), ""])
    images = result.images
    title = (f"{len(images.paths)} images from {images.source}; labels: {images.labels_source or 'none'}. "
             f"Against the fp32 PyTorch model; max logit error relative to its largest logit.")
    return table(title, columns, rows, justify_right=set(range(2, len(columns))))


def show(result, json_out: str | None) -> None:
    """What every command does with its result (a :class:`~evit_deploy.targets.CommandResult`):
    its data to ``--json FILE`` (``-``: stdout, which then carries nothing else), its
    tables for people, its warnings on stderr; then the error it holds, if any, is raised.
    A table that is a ``str`` is printed as plain text: a path a script reads must not wrap."""
    if json_out is not None and result.data is not None:
        text = json.dumps(result.data, indent=2, default=str) + "\n"
        if json_out == "-":
            sys.stdout.write(text)
        else:
            from .fsutil import write_text_atomic
            write_text_atomic(json_out, text)
    if json_out != "-":
        for item in result.tables:
            if isinstance(item, str):
                print(item)
            else:
                out.print(item)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    error = getattr(result, "error", None)
    if error is not None:
        raise error


def models_table(rows: list[dict]) -> Table:
    return table("EfficientViT family (params after BN folding, MACs at 224×224, counted on our model)",
                 ["model", "resolution", "params (M)", "MACs (M)", "paper top-1 (%)"],
                 [[r["model"], r["resolution"], f"{r['params_m']:.2f}", f"{r['macs_m']:.1f}",
                   f"{r['paper_top1']:.1f}"] for r in rows], justify_right={1, 2, 3, 4})


def info_tables(data: dict, img_size: int) -> list[Table]:
    """The stages of one model, then its counts before and after BN folding."""
    u, f = data["unfused"], data["fused"]
    return [table(f"{data['display_name']} at {img_size}×{img_size} (patch 16, key dim 16)",
                  ["stage", "resolution", "dim", "depth", "heads", "Q kernels", "window"],
                  [[s["stage"], s["resolution"], s["embed_dim"], s["depth"], s["heads"],
                    ",".join(map(str, s["kernels"])), f"{s['window']}×{s['window']}"] for s in data["stages"]],
                  justify_right={2, 3, 4}),
            table(None, ["", "params", "conv", "linear", "batchnorm", "MACs"],
                  [["unfused", f"{u['params'] / 1e6:.3f} M", u["conv"], u["linear"], u["batchnorm"], ""],
                   ["BN folded", f"{f['params'] / 1e6:.3f} M", f["conv"], f["linear"], f["batchnorm"],
                    f"{data['macs'] / 1e6:.1f} M"]], justify_right={1, 2, 3, 4, 5}),
            *([widths_table(data["widths"])] if data.get("widths") else [])]


def run_table(result) -> Table:
    """A classifier's top-k, or for other models each output's shape and range."""
    title = f"{result.description.display_name} — {result.runtime}"
    if result.predictions:
        return predictions_table(result.predictions, title=title)
    docs = {s.name: s.doc for s in result.description.outputs}
    return table(title, ["output", "shape", "min", "mean", "max", ""],
                 [[name, "×".join(map(str, v.shape)), f"{v.min():.4g}", f"{v.mean():.4g}", f"{v.max():.4g}",
                   docs.get(name, "")] for name, v in result.outputs.items()], justify_right={2, 3, 4})


def targets_table(infos) -> Table:
    rows = []
    for i in infos:
        status = "[green]ready[/]" if i.usable else (
            f"[red]broken: {i.error}[/]" if i.error else f"[yellow]pip install {' '.join(i.missing)}[/]")
        rows.append([i.name, i.produces, " ".join(i.precisions), ", ".join(i.requires), status, i.source])
    return table("Export targets", ["target", "produces", "--precision", "needs", "status", "entry point"], rows)


def devices_table(devices) -> Table:
    return table("Devices", ["device", "target", "options", "description"],
                 [[d.name, d.target, " ".join(f"{k}={v}" for k, v in d.options.items()), d.description]
                  for d in devices])


def bench_tables(result) -> list:
    """Throughput per model and backend beside the paper's, then each rejected backend."""
    from .models.registry import resolve_name

    s = result.settings
    backends = s["backends"]
    rows = []
    for model in dict.fromkeys(r.model for r in result.records):
        spec = resolve_name(model.split("@")[0])          # efficientvit_m4@pruned: a checkpoint of M4's family
        recs = {r.backend: r for r in result.records if r.model == model}
        cells = []
        for b in backends:
            r = recs[b]
            if r.rejected:
                cells.append("[red]rejected[/] (below)")
                continue
            ratio = "" if b == s["baseline"] or r.ratio_to_baseline is None else \
                f" ({(r.ratio_to_baseline - 1) * 100:+.1f}%)"
            flag = " [yellow]noisy[/]" if r.noisy else ""
            notes = "".join(f" [red]({note})[/]" for note in r.notes)
            # A checkpoint of a family member (a pruned M4) beside that member: its speed-up.
            original = next((o for o in result.records if o.model == model.split("@")[0] and o.backend == b
                             and o.images_per_s), None) if "@" in model else None
            versus = f", {r.images_per_s / original.images_per_s:.2f}× {spec.short_name.upper()}" if original else ""
            cells.append(f"{r.images_per_s:.0f}{ratio}{versus}{flag}{notes}")
        paper = spec.paper
        label = spec.short_name.upper() + (f" ({model.split('@')[1]})" if "@" in model else "")
        # The paper's figures are the unpruned member's: not a checkpoint's of other widths.
        rows.append([label, "—", *cells, "—"] if "@" in model else
                    [label, f"{paper.top1:.1f}", *cells,
                     f"{paper.cpu_torch_ips:.0f} → {paper.cpu_tvm_ips:.0f} "
                     f"({(paper.cpu_tvm_ips / paper.cpu_torch_ips - 1) * 100:+.1f}%)"])
        mem = [f"{recs[b].peak_rss_mb:.0f} MB" if recs[b].peak_rss_mb else "" for b in backends]
        if any(mem):
            rows.append(["  peak RSS", "", *mem, ""])
    title = (f"Throughput (images/s), batch {s['batch']}, {s['threads']} thread(s), BN folded, fp32 unless the "
             f"backend names a precision; ratios vs {s['baseline']} — {result.host['model']}")
    rejected = [Text.from_markup(f"[red]rejected[/] {r.model} {r.backend}: {r.rejected}")
                for r in result.records if r.rejected]
    return [table(title, ["model", "paper top-1", *backends, "paper Xeon E5-2690 v4: torch → TVM"], rows,
                  justify_right=set(range(1, len(backends) + 2))), *rejected]


def profile_tables(results) -> list[Table]:
    """Per backend: time by operator category, then by block where the runtime keeps blocks."""
    tables = []
    for r in results:
        tables.append(table(f"{r.model} on {r.backend}: {r.total_ms:.1f} ms per batch of {r.batch}, "
                            f"{r.memory_bound_share * 100:.0f}% memory-bound",
                            ["operator category", "bound", "ms", "share"],
                            [[c["category"], c["bound"], f"{c['ms']:.2f}", f"{c['share'] * 100:.1f}%"]
                             for c in r.by_category], justify_right={2, 3}))
        if r.by_block:
            tables.append(table(None, ["block", "ms", "share", "memory-bound within block"],
                                [[b["block"], f"{b['ms']:.2f}", f"{b['share'] * 100:.1f}%",
                                  "" if b["memory_bound_share"] is None else f"{b['memory_bound_share'] * 100:.0f}%"]
                                 for b in r.by_block], justify_right={1, 2, 3}))
    return tables


#: How a build status shows, by its text (this module sits below the build package).
_BUILD_STYLES = {"built": "green", "up to date": "dim", "built, unverified here": "yellow"}


def build_table(result, file: Path) -> Table:
    rows = []
    for r in result.records:
        parity = r.parity or {}
        worst = max((o["max_rel"] for o in parity.get("outputs", []) if isinstance(o["max_rel"], float)),
                    default=None)
        style = "red" if r.status.failed else _BUILD_STYLES.get(r.status.value, "green")
        status = f"[{style}]{r.status.value}[/]"
        rows.append([f"{r.artifact}/{r.model.rsplit('_', 1)[-1]}", r.target, status,
                     f"{r.size / 1e6:.1f} MB" if r.size is not None else "",
                     f"{worst:.1e}" if worst is not None else "", parity.get("precision", ""),
                     (r.error or "")[:80]])
    return table(f"Build of {file} → {result.manifest}", ["artifact", "target", "status", "size",
                                                          "max rel err", "precision", "error"], rows)


def doctor_tables(report) -> list[Table]:
    """Host, packages, each target's findings, and the verdict on each artifact given."""
    host = report.host
    rows = []
    for t in report.targets:
        for i, f in enumerate(t.findings):
            mark = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "error": "[red]error[/]"}[f.level]
            rows.append([t.name if i == 0 else "", "[green]usable[/]" if t.usable and i == 0 else
                         ("[red]unusable[/]" if i == 0 else ""), mark, f.message, f.advice])
    tables = [table("Host", ["", ""], [["CPU", host["model"]],
                                       ["cores", f"{host['usable_cores']} usable of {host['logical_cores']} logical"],
                                       ["vector extensions", " ".join(host["vector_extensions"]) or "none found"],
                                       ["OS", host["os"]]]),
              table("Packages", ["package", "version"],
                    [[k, v or "[yellow]not installed[/]"] for k, v in report.versions.items()]),
              table("Targets", ["target", "status", "", "finding", "advice"], rows)]
    if report.artifacts:
        tables.append(table("Artifacts on this CPU", ["artifact", "target", "", "verdict"],
                            [[a.path, a.target, "[green]ok[/]" if a.as_verified else "[red]no[/]", a.verdict]
                             for a in report.artifacts]))
    return tables


_OUTCOME_STYLES = {"chosen": "bold green", "runner-up": "green", "admissible": "", "dropped": "red",
                   "refused": "dim", "not tried": "yellow"}


def optimize_tables(result) -> list:
    """Every candidate: outcome, speed against the baseline, agreement, size; why the others
    lost; the build entry that rebuilds the winner."""
    from .optimizer import build_toml

    s = result.settings
    rows = []
    order = list(_OUTCOME_STYLES)
    for c in sorted(result.candidates, key=lambda c: (order.index(c.outcome.value), -(c.images_per_s or 0))):
        style = _OUTCOME_STYLES[c.outcome.value]
        speed = f"{c.images_per_s:.0f}" if c.images_per_s else ""
        ratio = f"{c.ratio_to_baseline:.2f}×" if c.ratio_to_baseline else ""
        agreement = f"{c.eval['top1_agreement']:.3f}" if c.eval else ""
        rows.append([c.backend, f"[{style}]{c.outcome.value}[/]" if style else c.outcome.value, speed,
                     ratio + (" [yellow]noisy[/]" if c.noisy else ""), agreement,
                     f"{c.bytes / 1e6:.1f} MB" if c.bytes else "", (c.reason or "")[:90]])
    title = (f"optimize {result.model}: batch {s['batch']}, {s['threads']} thread(s), {s['objective']}; "
             f"{s['budget_text']}; ratios vs {s['baseline']} fp32 — {result.machine['model']}")
    found = [table(title, ["candidate", "outcome", "images/s", "× baseline", "top-1 agr.", "size", "why"], rows,
                   justify_right={2, 3, 4, 5})]
    if result.build_entry:
        found.append(f"Winner: {result.artifact}\nTo rebuild it in CI (build file):\n" + build_toml(result.build_entry))
    return found


# -- pruning -------------------------------------------------------------------------------

def widths_table(widths: dict) -> Table:
    """A pruned model's widths per module (``evit-deploy info --weights``)."""
    rows = []
    for module, width in widths.items():
        if isinstance(width, int):
            rows.append([module, "hidden", str(width)])
        else:
            rows.append([module, "Q/K per head", ",".join(str(h[0]) for h in width)])
            rows.append([module, "V per head", ",".join(str(h[1]) for h in width)])
    return table("pruned widths", ["module", "", "channels"], rows)


def _fig5_table(rows: list[dict]) -> Table:
    parts = ("Q", "K", "V", "FFN")
    return table("channels / embed dim per block (supplementary Fig. 5): original → pruned",
                 ["block", "dim", *parts],
                 [[r["block"], r["embed_dim"], *(f"{r['original'][p]:.2f} → {r['pruned'][p]:.2f}" for p in parts)]
                  for r in rows], justify_right={1})


def importance_tables(result: dict) -> list:
    """Renderables: groups by importance share, then the Fig. 5 ratios."""
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


def prune_tables(result: dict) -> list:
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
