"""Rich rendering for people: progress of stages and tasks, and result tables."""

from __future__ import annotations

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
