"""The ``evit-deploy`` command line: parses arguments, calls :mod:`evit_deploy.api`, renders.

Heavy libraries are imported inside the commands that need them: ``run`` on an ONNX or
TVM artifact never imports torch.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, BadInputError, EvitError, first_line

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="EfficientViT (M0–M5) from PyTorch to ONNX, Core ML and TVM, with proven parity.")

_state = {"debug": False, "quiet": False}

EXIT_CODES_HELP = ("Exit codes: 0 ok, 1 internal error, 2 bad input, 3 export failed, 4 parity failed, "
                   "5 missing dependency, 6 output not writable, 130 interrupted.")


def _reporter():
    from .console import RichReporter
    return RichReporter(quiet=_state["quiet"])


def _write_json(path: str | None, data) -> None:
    """``--json FILE`` (or ``-`` for stdout)."""
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        from .fsutil import write_text_atomic
        write_text_atomic(path, text + "\n")


def _print(renderable) -> None:
    from .console import out
    out.print(renderable)


def _size(text: str | None) -> tuple[int, int] | None:
    """``224`` or ``256x192`` (height x width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise BadInputError(f"size must look like 224 or 256x192, got '{text}'") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0:
        raise BadInputError(f"size must look like 224 or 256x192, got '{text}'")
    return dims[0], dims[1]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, errors and results."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    _state["debug"] = debug
    _state["quiet"] = quiet
    if version:
        typer.echo(f"evit-deploy {__version__}")
        raise typer.Exit()


# -- model family --------------------------------------------------------------------------

@app.command()
def models(json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """List EfficientViT M0–M5: resolution, parameters and MACs (measured), paper top-1."""
    from . import api
    from .console import table

    rows = api.models_overview()
    _write_json(json_out, rows)
    if json_out != "-":
        _print(table("EfficientViT family (params after BN folding, MACs at 224×224, counted on our model)",
                     ["model", "resolution", "params (M)", "MACs (M)", "paper top-1 (%)"],
                     [[r["model"], r["resolution"], f"{r['params_m']:.2f}", f"{r['macs_m']:.1f}",
                       f"{r['paper_top1']:.1f}"] for r in rows], justify_right={1, 2, 3, 4}))


@app.command()
def info(model: str = typer.Argument(..., help="m0 … m5"),
         img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
         weights: Optional[str] = typer.Option(None, "--weights", help="A checkpoint: show the model it holds "
                                               "(a pruned one's widths)."),
         json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """Architecture summary of one model: stages, widths, heads, kernels, windows, counts."""
    from . import api
    from .console import table

    data = api.model_info(model, img_size=img_size, weights=weights)
    _write_json(json_out, data)
    if json_out == "-":
        return
    _print(table(f"{data['display_name']} at {img_size}×{img_size} (patch 16, key dim 16)",
                 ["stage", "resolution", "dim", "depth", "heads", "Q kernels", "window"],
                 [[s["stage"], s["resolution"], s["embed_dim"], s["depth"], s["heads"],
                   ",".join(map(str, s["kernels"])), f"{s['window']}×{s['window']}"] for s in data["stages"]],
                 justify_right={2, 3, 4}))
    u, f = data["unfused"], data["fused"]
    _print(table(None, ["", "params", "conv", "linear", "batchnorm", "MACs"],
                 [["unfused", f"{u['params'] / 1e6:.3f} M", u["conv"], u["linear"], u["batchnorm"], ""],
                  ["BN folded", f"{f['params'] / 1e6:.3f} M", f["conv"], f["linear"], f["batchnorm"],
                   f"{data['macs'] / 1e6:.1f} M"]], justify_right={1, 2, 3, 4, 5}))
    if data["widths"]:
        from .pruning.commands import widths_table
        _print(widths_table(data["widths"]))


@app.command()
def predict(model: str = typer.Argument(..., help="m0 … m5"),
            images: list[Path] = typer.Argument(..., help="Image files."),
            weights: Optional[str] = typer.Option(None, "--weights", help="Checkpoint file, or 'official'."),
            top: int = typer.Option(5, "--top", min=1),
            img_size: int = typer.Option(224, "--img-size"),
            distillation: bool = typer.Option(False, "--distillation", help="The checkpoint has a distillation head."),
            json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """Classify images with the PyTorch model (short side 256 bicubic, centre crop 224)."""
    from . import api
    from .console import predictions_table

    preds = api.predict(model, images, weights=weights, top=top, img_size=img_size, distillation=distillation,
                        reporter=_reporter())
    _write_json(json_out, [{"input": p.source, "top": [{"index": i, "label": lab, "probability": pr}
                                                       for i, lab, pr in p.top]} for p in preds])
    if json_out != "-":
        _print(predictions_table(preds))


# -- export / verify / run -----------------------------------------------------------------

def _target_options_epilog() -> str:
    from .targets import available_targets
    from .targets.options import describe_options

    from rich.markup import escape

    lines = ["Target options (after the common ones):"]
    for name, cls in available_targets().items():
        for flag, default, text in describe_options(cls.Options):
            # Escaped: rich would take "[coreml]" and "[fp16|fp32]" for markup and drop them.
            lines.append(escape(f"  [{name}] {flag} (default {default}): {text}"))
    return "\n\n".join(lines) + "\n\n" + EXIT_CODES_HELP


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog=_target_options_epilog())
def export(ctx: typer.Context,
           model_name: Optional[str] = typer.Argument(None, metavar="MODEL", help="m0 … m5"),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name (see `targets`)."),
           profile: Optional[str] = typer.Option(None, "--profile", help="Device profile (see `profiles`)."),
           out: Path = typer.Option(Path("."), "--out", "-o", help="Output directory."),
           weights: Optional[str] = typer.Option(None, "--weights", help="Checkpoint file, or 'official'."),
           model_spec: Optional[str] = typer.Option(None, "--model", help="Any nn.Module: package.module:factory."),
           input_size: Optional[str] = typer.Option(None, "--input-size", help="For --model: 224 or HxW."),
           batch: Optional[int] = typer.Option(None, "--batch", min=1,
                                               help="Static batch size \\[default: 1; TVM: the database's]."),
           dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Any batch size (if the target supports it)."),
           img_size: str = typer.Option("224", "--img-size",
                                        help="Input size, multiple of 16: 224, or HxW (e.g. 480x640) for detection."),
           task: str = typer.Option("classification", "--task", help="classification, or detection (backbone + FPN)."),
           neck: str = typer.Option("maskrcnn", "--neck", help="Detection neck: maskrcnn (strides 4-64) or retinanet (8-128)."),
           num_classes: int = typer.Option(1000, "--num-classes"),
           distillation: bool = typer.Option(False, "--distillation", help="The checkpoint has a distillation head."),
           no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check."),
           images: Optional[Path] = typer.Option(None, "--images", help="Add these images to the parity inputs."),
           json_out: Optional[str] = typer.Option(None, "--json", help="Write the parity report to FILE.")):
    """Export a model for a target and prove parity with PyTorch (unless --no-verify)."""
    from . import api
    from .console import err

    extra = list(ctx.args)
    if model_spec is not None and model_name is not None:
        # With --model there is no positional MODEL: what landed there is a target option.
        extra.insert(0, model_name)
        model_name = None
    model = model_spec or model_name
    if model is None:
        raise BadInputError("no model given: pass MODEL (m0 … m5) or --model package.module:factory")
    try:
        result = api.export(model, target, out_dir=out, weights=weights, profile=profile, cli_args=extra,
                            batch=batch, dynamic_batch=dynamic_batch, num_classes=num_classes,
                            distillation=distillation, input_size=_size(input_size) or _size(img_size),
                            task=task, neck=neck, verify=not no_verify, images=images, reporter=_reporter())
    except EvitError as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            _show_report(report, json_out)
        raise
    if result.report is not None:
        _show_report(result.report, json_out)
    elif not _state["quiet"]:
        err.print("[yellow]warning:[/] not verified (--no-verify): parity of this artifact is unproven")
    if json_out != "-":
        typer.echo(str(result.artifact.path))


def _show_report(report, json_out: str | None) -> None:
    """The parity table for people (unless quiet or JSON goes to stdout) and JSON if asked."""
    from .console import parity_table

    _write_json(json_out, report.to_dict())
    if json_out != "-" and (not _state["quiet"] or not report.passed):
        _print(parity_table(report))


@app.command()
def verify(artifact: Path = typer.Argument(..., help="An exported artifact."),
           weights: Optional[str] = typer.Option(None, "--weights", help="The checkpoint it was made from."),
           images: Optional[Path] = typer.Option(None, "--images", help="Add these images to the parity inputs."),
           max_rel: Optional[float] = typer.Option(None, "--max-rel", help="Override: a fixed bound on the error "
                                                   "(relative to the output scale) against the exact answer."),
           min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Override: min cosine similarity."),
           max_gain_error: Optional[float] = typer.Option(None, "--max-gain-error", help="Override: how far from 1 "
                                                          "the output's least-squares scale on the exact answer may be."),
           top1: Optional[str] = typer.Option(None, "--top1", help="Override: check top-1 on all|photos|none."),
           any_cpu: bool = typer.Option(False, "--any-cpu", help="Check an artifact whose kernels are exact only on "
                                        "other CPUs (full-range int8 without VNNI) anyway: the verdict then holds "
                                        "for this CPU only."),
           json_out: Optional[str] = typer.Option(None, "--json", help="Write the report to FILE ('-': stdout).")):
    """Check an existing artifact against the PyTorch model recorded in its metadata."""
    from . import api
    from .errors import ParityError
    from .parity import TOLERANCES

    tolerance = None
    if any(v is not None for v in (max_rel, min_cosine, max_gain_error, top1)):
        if top1 is not None and top1 not in ("all", "photos", "none"):
            raise BadInputError(f"--top1 must be all, photos or none, got '{top1}'")
        _, desc = api.inspect_artifact(artifact)
        base = TOLERANCES.get(desc.extra.get("precision", "fp32"), TOLERANCES["fp32"])
        tolerance = base.override(max_rel=max_rel, min_cosine=min_cosine, max_gain_error=max_gain_error, top1=top1)
    report = api.verify(artifact, weights=weights, images=images, tolerance=tolerance, any_cpu=any_cpu,
                        reporter=_reporter())
    _show_report(report, json_out)
    if not report.passed:
        raise ParityError(report.summary(), report)


@app.command()
def run(artifact: Path = typer.Argument(..., help="An exported artifact."),
        inputs: list[Path] = typer.Argument(..., help="Image files or .npy tensors."),
        top: int = typer.Option(5, "--top", min=1),
        save_outputs: Optional[Path] = typer.Option(None, "--save-outputs", help="Save raw outputs (.npy / .npz)."),
        json_out: Optional[str] = typer.Option(None, "--json", help="Write predictions to FILE ('-': stdout).")):
    """Run an artifact with its own runtime (no torch for ONNX and TVM) and print top-k."""
    from . import api
    from .console import predictions_table

    result = api.run(artifact, inputs, top=top)
    if result.warnings:
        from .console import err
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/] {warning}")
    if save_outputs is not None:
        _save_outputs(save_outputs, result.outputs)
    _write_json(json_out, [{"input": p.source, "top": [{"index": i, "label": lab, "probability": pr}
                                                       for i, lab, pr in p.top]} for p in result.predictions])
    if json_out == "-":
        return
    if result.predictions:
        _print(predictions_table(result.predictions, title=f"{result.description.display_name} — {result.runtime}"))
    else:
        from .console import table
        specs = {s.name: s.doc for s in result.description.outputs}
        _print(table(f"{result.description.display_name} — {result.runtime}", ["output", "shape", "min", "mean", "max", ""],
                     [[name, "×".join(map(str, v.shape)), f"{v.min():.4g}", f"{v.mean():.4g}", f"{v.max():.4g}",
                       specs.get(name, "")] for name, v in result.outputs.items()], justify_right={2, 3, 4}))


def _save_outputs(path: Path, outputs: dict) -> None:
    import io

    import numpy as np

    from .fsutil import atomic_path

    buf = io.BytesIO()
    if path.suffix == ".npz" or len(outputs) > 1:
        np.savez(buf, **outputs)
    else:
        np.save(buf, next(iter(outputs.values())))
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


@app.command(name="eval")
def eval_command(artifacts: list[Path] = typer.Argument(..., help="Exported classifier artifacts."),
                 images: Optional[Path] = typer.Option(None, "--images", help="Image folder, searched recursively "
                                                       "(ImageNet validation layout DIR/<synset>/*.JPEG gives labels); "
                                                       "default: the bundled photos."),
                 labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file: one 'IMAGE LABEL' per "
                                                       "line (class index, WordNet id or class name)."),
                 weights: Optional[str] = typer.Option(None, "--weights", help="The checkpoint the artifacts were made from."),
                 json_out: Optional[str] = typer.Option(None, "--json", help="Write the results to FILE ('-': stdout).")):
    """What each artifact keeps of the fp32 PyTorch model over an image folder: top-1
    agreement, top-5 overlap, logit error; top-1/top-5 accuracy when labelled."""
    from . import api
    from .console import err, eval_table

    result = api.evaluate(artifacts, images=images, labels=labels, weights=weights, reporter=_reporter())
    _write_json(json_out, result.to_dict())
    if json_out != "-":
        _print(eval_table(result))
    if not _state["quiet"]:
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/] {warning}")


@app.command()
def targets(json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """List export targets (built-in and plug-ins) and whether they are usable here."""
    from .console import table
    from .targets import list_targets

    infos = list_targets()
    _write_json(json_out, [{"name": i.name, "produces": i.produces, "requires": list(i.requires),
                            "missing": list(i.missing), "usable": i.usable, "source": i.source,
                            "error": i.error, "precisions": list(i.precisions)} for i in infos])
    if json_out == "-":
        return
    rows = []
    for i in infos:
        status = "[green]ready[/]" if i.usable else (
            f"[red]broken: {i.error}[/]" if i.error else f"[yellow]pip install {' '.join(i.missing)}[/]")
        rows.append([i.name, i.produces, " ".join(i.precisions), ", ".join(i.requires), status, i.source])
    _print(table("Export targets", ["target", "produces", "--precision", "needs", "status", "entry point"], rows))


@app.command()
def profiles(json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """List device profiles (the TOML files of targets/)."""
    from .console import table
    from .device_profiles import list_device_profiles

    profs = list_device_profiles()
    _write_json(json_out, [{"name": p.name, "target": p.target, "description": p.description,
                            "options": p.options, "device": p.device, "paper": p.paper} for p in profs])
    if json_out != "-":
        _print(table("Device profiles", ["profile", "target", "options", "description"],
                     [[p.name, p.target, " ".join(f"{k}={v}" for k, v in p.options.items()), p.description]
                      for p in profs]))


def _signature(function, *, drop: set[str] = frozenset(), extra: list | None = None):
    """``function``'s signature with resolved annotations (Typer reads them), without the
    parameters in ``drop`` and with ``extra`` ones appended."""
    import inspect
    import typing

    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    params = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for p in signature.parameters.values() if p.name not in drop]
    return signature.replace(parameters=params + list(extra or []), return_annotation=inspect.Signature.empty)


def _with_target_shortcuts(function):
    """Give a command the short flags targets declare for their options (TVM: ``--db DIR``
    is ``-O tvm.db=DIR``) as real options; ``function`` receives them as ``shortcuts``,
    ``{(target, option): value}``."""
    import functools
    import inspect
    import re

    from .targets import option_shortcuts

    names = {}
    extra = []
    for flag, (target, option) in sorted(option_shortcuts().items()):
        name = "shortcut_" + re.sub(r"\W", "_", flag.lstrip("-"))
        names[name] = (target, option)
        extra.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                                       default=typer.Option(None, flag, help=f"Same as -O {target}.{option}=VALUE.")))

    @functools.wraps(function)
    def run(**kwargs):
        values = {names[n]: kwargs.pop(n) for n in names}
        return function(**kwargs, shortcuts={k: v for k, v in values.items() if v is not None})

    run.__signature__ = _signature(function, drop={"shortcuts"}, extra=extra)
    return run


@app.command()
@_with_target_shortcuts
def bench(models: list[str] = typer.Argument(..., help="m0 … m5"),
          backends: str = typer.Option("torch,torch-jit,onnxruntime", "--backends", "-b",
                                       help="Comma-separated, or 'all' (torch, torch-jit, and each target's runtime); "
                                            "RUNTIME:PRECISION (onnxruntime:int8) times that precision; "
                                            "RUNTIME@LABEL (tvm@tuned) a variant with options -O TARGET@LABEL.KEY=VALUE."),
          batch: int = typer.Option(16, "--batch", min=1),
          threads: int = typer.Option(1, "--threads", min=1),
          rounds: int = typer.Option(5, "--rounds", min=1, help="Interleaved timing rounds."),
          round_seconds: float = typer.Option(1.0, "--round-seconds", min=0.0, help="Time per backend per round."),
          img_size: int = typer.Option(224, "--img-size"),
          option: Optional[list[str]] = typer.Option(None, "--option", "-O",
                                                     help="Export option for a target, TARGET.KEY=VALUE, or for one "
                                                          "variant, TARGET@LABEL.KEY=VALUE (repeatable)."),
          memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak RSS per backend."),
          artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Keep the exported artifacts (and "
                                                   "rejected ones) in DIR instead of a temporary directory."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Write records to FILE ('-': stdout)."),
          plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
          shortcuts: dict = None):
    """Throughput of each backend side by side (the paper's Table 3 protocol by default)."""
    from .backends import parse_backends
    from .bench import bench as run_bench
    from .bench import plot as write_plot

    result = run_bench(models, parse_backends(backends), batch=batch, threads=threads, img_size=img_size,
                       rounds=rounds, round_seconds=round_seconds, target_options=_target_options(option, shortcuts),
                       memory=memory, artifacts_dir=artifacts, reporter=_reporter())
    _write_json(json_out, result.to_dict())
    if plot is not None:
        write_plot(result, plot)
    if json_out != "-":
        _print(_bench_table(result))
        for r in result.records:
            if r.rejected:
                _print(f"[red]rejected[/] {r.model} {r.backend}: {r.rejected}")


def _target_options(pairs: list[str] | None, shortcuts: dict | None) -> dict:
    """``-O tvm.db=DIR`` pairs and target shortcuts (``{("tvm", "db"): "DIR"}``) ->
    ``{"tvm": {"db": "DIR"}}`` (validated by the target when the artifact is planned)."""
    options: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        target, dot, name = key.partition(".")
        if not sep or not dot or not target or not name:
            raise BadInputError(f"--option must look like TARGET.KEY=VALUE, got '{pair}'")
        options.setdefault(target, {})[name.replace("-", "_")] = value
    for (target, name), value in (shortcuts or {}).items():
        options.setdefault(target, {})[name] = value
    return options


def _bench_table(result):
    from .console import table
    from .models.registry import resolve_name

    s = result.settings
    backends = s["backends"]
    rows = []
    for model in dict.fromkeys(r.model for r in result.records):
        spec = resolve_name(model)
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
            cells.append(f"{r.images_per_s:.0f}{ratio}{flag}{notes}")
        paper = spec.paper
        rows.append([spec.short_name.upper(), f"{paper.top1:.1f}", *cells,
                     f"{paper.cpu_torch_ips:.0f} → {paper.cpu_tvm_ips:.0f} "
                     f"({(paper.cpu_tvm_ips / paper.cpu_torch_ips - 1) * 100:+.1f}%)"])
        mem = [f"{recs[b].peak_rss_mb:.0f} MB" if recs[b].peak_rss_mb else "" for b in backends]
        if any(mem):
            rows.append(["  peak RSS", "", *mem, ""])
    title = (f"Throughput (images/s), batch {s['batch']}, {s['threads']} thread(s), BN folded, fp32 unless the "
             f"backend names a precision; ratios vs {s['baseline']} — {result.host['model']}")
    return table(title, ["model", "paper top-1", *backends, "paper Xeon E5-2690 v4: torch → TVM"], rows,
                 justify_right=set(range(1, len(backends) + 2)))


@app.command(name="profile")
@_with_target_shortcuts
def profile_command(model: str = typer.Argument(..., help="m0 … m5"),
                    backend: Optional[list[str]] = typer.Option(None, "--backend", "-b",
                                                               help="torch, or the backend of a target that times its "
                                                                    "operators: onnxruntime, tvm, openvino, executorch "
                                                                    "(repeatable; default torch)."),
                    batch: int = typer.Option(16, "--batch", min=1),
                    threads: int = typer.Option(1, "--threads", min=1),
                    iterations: int = typer.Option(10, "--iterations", min=1),
                    img_size: int = typer.Option(224, "--img-size"),
                    option: Optional[list[str]] = typer.Option(None, "--option", "-O",
                                                               help="Export option for a target, TARGET.KEY=VALUE."),
                    json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout)."),
                    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
                    shortcuts: dict = None):
    """Where the time goes: compute- vs memory-bound operators, and time per block."""
    from .console import table
    from .profiler import plot as write_plot
    from .profiler import profile

    results = [profile(model, b, batch=batch, threads=threads, iterations=iterations, img_size=img_size,
                       target_options=_target_options(option, shortcuts), reporter=_reporter())
               for b in (backend or ["torch"])]
    _write_json(json_out, [r.to_dict() for r in results])
    if plot is not None:
        write_plot(results, plot)
    if json_out == "-":
        return
    for r in results:
        _print(table(f"{r.model} on {r.backend}: {r.total_ms:.1f} ms per batch of {r.batch}, "
                     f"{r.memory_bound_share * 100:.0f}% memory-bound",
                     ["operator category", "bound", "ms", "share"],
                     [[c["category"], c["bound"], f"{c['ms']:.2f}", f"{c['share'] * 100:.1f}%"] for c in r.by_category],
                     justify_right={2, 3}))
        if r.by_block:
            _print(table(None, ["block", "ms", "share", "memory-bound within block"],
                         [[b["block"], f"{b['ms']:.2f}", f"{b['share'] * 100:.1f}%",
                           "" if b["memory_bound_share"] is None else f"{b['memory_bound_share'] * 100:.0f}%"]
                          for b in r.by_block], justify_right={1, 2, 3}))


@app.command()
def build(file: Path = typer.Argument(Path("evit-deploy.toml"), help="The build file."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the file's \\[build] out)."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Models built in parallel processes."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Also write the manifest to FILE ('-': stdout).")):
    """Build, verify and record every artifact of a build file (skips what is up to date)."""
    from .build import Status, exit_status
    from .build import build as run_build
    from .console import table

    result = run_build(file, out=out, jobs=jobs, reporter=_reporter())
    if json_out is not None:
        _write_json(json_out, json.loads(result.manifest.read_text()))
    if json_out != "-":
        rows = []
        for r in result.records:
            parity = r.parity or {}
            worst = max((o["max_rel"] for o in parity.get("outputs", []) if isinstance(o["max_rel"], float)),
                        default=None)
            status = {Status.BUILT: "[green]built[/]", Status.UP_TO_DATE: "[dim]up to date[/]"}.get(
                r.status, f"[red]{r.status.value}[/]")
            rows.append([f"{r.artifact}/{r.model.rsplit('_', 1)[-1]}", r.target, status,
                         f"{r.size / 1e6:.1f} MB" if r.size is not None else "",
                         f"{worst:.1e}" if worst is not None else "", parity.get("precision", ""),
                         (r.error or "")[:80]])
        _print(table(f"Build of {file} → {result.manifest}", ["artifact", "target", "status", "size",
                                                                "max rel err", "precision", "error"], rows))
    error = exit_status(result)
    if error is not None:
        raise error


@app.command()
def doctor(artifacts: Optional[list[Path]] = typer.Argument(None, help="Artifacts: does this CPU run them as "
                                                                   "verified? (exit 2 if not)"),
           requested: Optional[list[str]] = typer.Option(None, "--target", "-t",
                                                        help="Fail (exit 5) unless this target is usable; repeatable."),
           json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """Versions, host CPU, whether each target works here (with advice), and whether this
    CPU runs the given artifacts as they were verified."""
    from .console import table
    from .doctor import doctor as run_doctor
    from .errors import MissingDependencyError

    report = run_doctor(requested, artifacts or ())
    _write_json(json_out, report.to_dict())
    if json_out != "-":
        host = report.host
        _print(table("Host", ["", ""], [["CPU", host["model"]], ["cores", f"{host['usable_cores']} usable of "
                                                                         f"{host['logical_cores']} logical"],
                                        ["vector extensions", " ".join(host["vector_extensions"]) or "none found"],
                                        ["OS", host["os"]]]))
        _print(table("Packages", ["package", "version"],
                     [[k, v or "[yellow]not installed[/]"] for k, v in report.versions.items()]))
        rows = []
        for t in report.targets:
            for i, f in enumerate(t.findings):
                mark = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "error": "[red]error[/]"}[f.level]
                rows.append([t.name if i == 0 else "", "[green]usable[/]" if t.usable and i == 0 else
                             ("[red]unusable[/]" if i == 0 else ""), mark, f.message, f.advice])
        _print(table("Targets", ["target", "status", "", "finding", "advice"], rows))
        if report.artifacts:
            _print(table("Artifacts on this CPU", ["artifact", "target", "", "verdict"],
                         [[a.path, a.target, "[green]ok[/]" if a.as_verified else "[red]no[/]", a.verdict]
                          for a in report.artifacts]))
    unusable = report.unusable(requested)
    if unusable:
        raise MissingDependencyError(f"requested target(s) not usable here: {', '.join(unusable)} "
                                     f"(see the advice above)")
    unfit = [f"{a.path}: {a.verdict}" for a in report.artifacts if not a.as_verified]
    if unfit:
        raise BadInputError("; ".join(unfit))


# -- commands of target plug-ins -----------------------------------------------------------

def _target_command(command):
    """A Typer command running a target's :class:`~evit_deploy.targets.Command`: its own
    parameters, plus ``--json``; the reporter is the CLI's, the result rendered as by
    every built-in command."""
    import inspect

    function = command.function
    json_option = inspect.Parameter("json_out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                                    default=typer.Option(None, "--json", help="Write the result to FILE ('-': stdout)."))

    def run(**kwargs):
        json_out = kwargs.pop("json_out")
        result = function(reporter=_reporter(), **kwargs)
        _write_json(json_out, result.data)
        if json_out != "-":
            for renderable in result.tables:
                _print(renderable)
        if result.warnings:
            from .console import err
            for warning in result.warnings:
                err.print(f"[yellow]warning:[/] {warning}")

    run.__signature__ = _signature(function, drop={"reporter"}, extra=[json_option])
    run.__doc__ = function.__doc__
    run.__name__ = command.name
    return run


def _add_target_commands() -> None:
    """Register the commands of every target plug-in (built-in names win: a plug-in cannot
    replace ``export``)."""
    from .targets import available_targets

    taken = {c.name or c.callback.__name__ for c in app.registered_commands}
    for cls in available_targets().values():
        for command in cls.commands():
            if command.name not in taken:
                app.command(name=command.name)(_target_command(command))
                taken.add(command.name)


_add_target_commands()


# -- pruning (evit_deploy/pruning/commands.py) ---------------------------------------------

def _pruning_command(function, render):
    """Register a pruning command: ``function`` returns the result dict, ``render`` draws it."""
    def run(json_out: Optional[str] = None, **kwargs):
        result = function(reporter=_reporter(), **kwargs)
        _write_json(json_out, result)
        if json_out != "-":
            for renderable in render(result):
                _print(renderable)
    return run


@app.command("importance")
def importance_cli(model: str = typer.Argument(..., help="m0 … m5"),
                   weights: str = typer.Option(..., "--weights", help="The checkpoint to score."),
                   images: str = typer.Option(..., "--images", help="A folder of images (searched recursively)."),
                   labels: Optional[str] = typer.Option(None, "--labels", help="A labels file (else: the model's "
                                                        "own top-1)."),
                   keep_macs: Optional[float] = typer.Option(None, "--keep-macs", help="Budget shown: share of MACs "
                                                             "to keep (default 0.7)."),
                   keep_params: Optional[float] = typer.Option(None, "--keep-params", help="... of parameters."),
                   plot: Optional[str] = typer.Option(None, "--plot", help="Write the Fig. 5 chart (PNG)."),
                   img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
                   json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """Taylor importance of every prunable channel group (heads' Q/K and V, FFNs, patch merging)."""
    from .pruning.commands import importance_command, render_importance
    _pruning_command(importance_command, render_importance)(
        model=model, weights=weights, images=images, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
        plot=plot, img_size=img_size, json_out=json_out)


@app.command("prune")
def prune_cli(model: str = typer.Argument(..., help="m0 … m5"),
              weights: str = typer.Option(..., "--weights", help="The checkpoint to prune."),
              images: str = typer.Option(..., "--images", help="A folder of images (searched recursively)."),
              out: str = typer.Option(..., "--out", help="The pruned checkpoint to write (.pth)."),
              keep_macs: Optional[float] = typer.Option(None, "--keep-macs", help="Share of MACs to keep, e.g. 0.7."),
              keep_params: Optional[float] = typer.Option(None, "--keep-params", help="Share of parameters to keep."),
              labels: Optional[str] = typer.Option(None, "--labels", help="A labels file for the importance."),
              finetune_steps: int = typer.Option(0, "--finetune-steps", help="Distillation steps from the unpruned "
                                                 "model on the images."),
              img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
              json_out: Optional[str] = typer.Option(None, "--json", help="Write JSON to FILE ('-': stdout).")):
    """Taylor-prune a checkpoint to a MAC/parameter budget; the file records its widths."""
    from .pruning.commands import prune_command, render_prune
    _pruning_command(prune_command, render_prune)(
        model=model, weights=weights, images=images, out=out, labels=labels, keep_macs=keep_macs,
        keep_params=keep_params, finetune_steps=finetune_steps, img_size=img_size, json_out=json_out)


# -- entry point ---------------------------------------------------------------------------

def invoke(argv: list[str]) -> int:
    """Run the CLI on ``argv``; every failure becomes a one-line message and an exit code."""
    debug = "--debug" in argv
    if not debug:
        # Deprecation notices from inside torch/coremltools/TVM are not actionable here.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    command = typer.main.get_command(app)
    try:
        # Standalone mode: Typer prints usage errors itself and exits 2, and turns
        # Ctrl-C into exit code 130; our own errors propagate to the handlers below.
        command.main(args=argv, prog_name="evit-deploy", standalone_mode=True)
        return 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL)
        if code == EXIT_INTERRUPTED:
            _error("interrupted", debug)
        return code
    except KeyboardInterrupt:
        _error("interrupted", debug)
        return EXIT_INTERRUPTED
    except EvitError as exc:
        _error(str(exc) or type(exc).__name__, debug)
        return exc.exit_code
    except Exception as exc:  # a bug: say so, briefly, unless --debug
        _error(f"internal error: {type(exc).__name__}: {first_line(exc)} "
               f"(run with --debug for the traceback)", debug)
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(invoke(sys.argv[1:]))


def _error(message: str, debug: bool) -> None:
    if debug:
        import traceback
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
