"""The built-in commands of ``evit-deploy``, written as a target's commands are: each a
function declaring its parameters as Typer does and returning a result
(:class:`Output`), which :mod:`evit_deploy.cli` writes as ``--json`` and shows for people
(:func:`evit_deploy.console.show`). The CLI fills in the keyword-only parameters:
``reporter`` (its progress display), ``quiet`` (``--quiet``) and ``shortcuts`` (the short
flags targets declare for their options, as ``{(target, option): value}``).

A new command is one function here under ``@command()`` returning
``Output(data for --json, console.<its renderer>(...))``, and that renderer in
:mod:`evit_deploy.console`; the CLI registers it in the order of this file.

Heavy libraries are imported inside the commands that need them: ``run`` on an ONNX or
TVM artifact never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from .errors import BadInputError, EvitError
from .targets import CommandResult

EXIT_CODES_HELP = ("Exit codes: 0 ok, 1 internal error, 2 bad input, 3 export failed, 4 parity failed, "
                   "5 missing dependency, 6 output not writable, 130 interrupted.")
JSON_HELP = "Write JSON to FILE ('-': stdout)."

#: (function, Typer settings plus ``json_help``) of every command, in the order of --help.
BUILT_IN: list[tuple] = []


@dataclass
class Output(CommandResult):
    """A command's result, and the error it exits with once the result is shown (a failed
    parity report is written and shown first)."""

    error: EvitError | None = None


def command(name: str | None = None, *, json_help: str = JSON_HELP, **settings):
    """Declare a built-in command (``settings`` as for ``typer.Typer.command``)."""
    def declare(function):
        BUILT_IN.append((function, {"name": name, "json_help": json_help, **settings}))
        return function
    return declare


def _size(text: str | None) -> tuple[int, int] | None:
    """``224`` or ``256x192`` (height x width)."""
    if text is None:
        return None
    try:
        dims = [int(p) for p in text.lower().split("x")]
    except ValueError:
        dims = []
    dims = dims * 2 if len(dims) == 1 else dims
    if len(dims) != 2 or min(dims) <= 0:
        raise BadInputError(f"size must look like 224 or 256x192, got '{text}'")
    return dims[0], dims[1]


def _renamed(value, old_value, name: str, old_name: str, reporter):
    """An option's value given by its new name or by its deprecated alias (kept one release)."""
    if old_value is None:
        return value
    if value is not None:
        raise BadInputError(f"give {name} once ({old_name} is its deprecated alias)")
    reporter.warn(f"{old_name} is deprecated and will be removed: use {name}")
    return old_value


# -- model family --------------------------------------------------------------------------

@command()
def models():
    """List EfficientViT M0–M5: resolution, parameters and MACs (measured), paper top-1."""
    from . import api
    from .console import models_table

    rows = api.models_overview()
    return Output(rows, [models_table(rows)])


@command()
def info(model: str = typer.Argument(..., help="m0 … m5"),
         img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
         weights: Optional[str] = typer.Option(None, "--weights", help="A checkpoint: show the model it holds "
                                               "(a pruned one's widths).")):
    """Architecture summary of one model: stages, widths, heads, kernels, windows, counts."""
    from . import api
    from .console import info_tables

    data = api.model_info(model, img_size=img_size, weights=weights)
    return Output(data, info_tables(data, img_size))


@command()
def predict(model: str = typer.Argument(..., help="m0 … m5"),
            images: list[Path] = typer.Argument(..., help="Image files."),
            weights: Optional[str] = typer.Option(None, "--weights", help="Checkpoint file, or 'official'."),
            top: int = typer.Option(5, "--top", min=1),
            img_size: int = typer.Option(224, "--img-size"),
            distillation: bool = typer.Option(False, "--distillation", help="The checkpoint has a distillation head."),
            *, reporter):
    """Classify images with the PyTorch model (short side 256 bicubic, centre crop 224)."""
    from . import api
    from .console import predictions_table

    preds = api.predict(model, images, weights=weights, top=top, img_size=img_size, distillation=distillation,
                        reporter=reporter)
    return Output([p.to_dict() for p in preds], [predictions_table(preds)])


# -- export / verify / run -----------------------------------------------------------------

def _target_options_epilog() -> str:
    from rich.markup import escape

    from .targets import available_targets
    from .targets.options import describe_options

    lines = ["Target options (after the common ones):"]
    for name, cls in available_targets().items():
        for flag, default, text in describe_options(cls.Options):
            # Escaped: rich would take "[coreml]" and "[fp16|fp32]" for markup and drop them.
            lines.append(escape(f"  [{name}] {flag} (default {default}): {text}"))
    return "\n\n".join(lines) + "\n\n" + EXIT_CODES_HELP


def _parity(report, quiet: bool, error: EvitError | None = None) -> Output:
    """A parity report: JSON, and its table unless quiet (a failure always shows)."""
    from .console import parity_table

    shown = not quiet or not report.passed
    return Output(report.to_dict(), [parity_table(report)] if shown else [], error=error)


@command(json_help="Write the parity report to FILE.", epilog=_target_options_epilog(),
         context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export(ctx: typer.Context,
           model_name: Optional[str] = typer.Argument(None, metavar="MODEL", help="m0 … m5"),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name (see `targets`)."),
           device: Optional[str] = typer.Option(None, "--device", help="Device whose export options to start "
                                                "from (see `devices`). --profile: its deprecated alias."),
           old_device: Optional[str] = typer.Option(None, "--profile", hidden=True, help="Deprecated alias of --device."),
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
           *, reporter, quiet):
    """Export a model for a target and prove parity with PyTorch (unless --no-verify)."""
    from . import api

    extra = list(ctx.args)
    if model_spec is not None and model_name is not None:
        # With --model there is no positional MODEL: what landed there is a target option.
        extra.insert(0, model_name)
        model_name = None
    model = model_spec or model_name
    if model is None:
        raise BadInputError("no model given: pass MODEL (m0 … m5) or --model package.module:factory")
    device = _renamed(device, old_device, "--device", "--profile", reporter)
    try:
        result = api.export(model, target, out_dir=out, weights=weights, device=device, cli_args=extra,
                            batch=batch, dynamic_batch=dynamic_batch, num_classes=num_classes,
                            distillation=distillation, input_size=_size(input_size) or _size(img_size),
                            task=task, neck=neck, verify=not no_verify, images=images, reporter=reporter)
    except EvitError as exc:
        if getattr(exc, "report", None) is None:
            raise
        return _parity(exc.report, quiet, exc)
    path = str(result.artifact.path)
    if result.report is not None:
        shown = _parity(result.report, quiet)
        return Output(shown.data, [*shown.tables, path])
    unproven = [] if quiet else ["not verified (--no-verify): parity of this artifact is unproven"]
    return Output(None, [path], unproven)


@command(json_help="Write the report to FILE ('-': stdout).")
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
           *, reporter, quiet):
    """Check an existing artifact against the PyTorch model recorded in its metadata."""
    from . import api
    from .errors import ParityError
    from .parity import default_tolerance

    tolerance = None
    if any(v is not None for v in (max_rel, min_cosine, max_gain_error, top1)):
        if top1 is not None and top1 not in ("all", "photos", "none"):
            raise BadInputError(f"--top1 must be all, photos or none, got '{top1}'")
        tolerance = default_tolerance(api.inspect_artifact(artifact)[1]).override(
            max_rel=max_rel, min_cosine=min_cosine, max_gain_error=max_gain_error, top1=top1)
    report = api.verify(artifact, weights=weights, images=images, tolerance=tolerance, any_cpu=any_cpu,
                        reporter=reporter)
    return _parity(report, quiet, None if report.passed else ParityError(report.summary(), report))


@command(json_help="Write predictions to FILE ('-': stdout).")
def run(artifact: Path = typer.Argument(..., help="An exported artifact."),
        inputs: list[Path] = typer.Argument(..., help="Image files or .npy tensors."),
        top: int = typer.Option(5, "--top", min=1),
        save_outputs: Optional[Path] = typer.Option(None, "--save-outputs", help="Save raw outputs (.npy / .npz).")):
    """Run an artifact with its own runtime (no torch for ONNX and TVM) and print top-k."""
    from . import api
    from .console import run_table

    result = api.run(artifact, inputs, top=top)
    if save_outputs is not None:
        _save_outputs(save_outputs, result.outputs)
    return Output([p.to_dict() for p in result.predictions], [run_table(result)], result.warnings)


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


@command(name="eval", json_help="Write the results to FILE ('-': stdout).")
def eval_command(artifacts: list[Path] = typer.Argument(..., help="Exported classifier artifacts."),
                 images: Optional[Path] = typer.Option(None, "--images", help="Image folder, searched recursively "
                                                       "(ImageNet validation layout DIR/<synset>/*.JPEG gives labels); "
                                                       "default: the bundled photos."),
                 labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file: one 'IMAGE LABEL' per "
                                                       "line (class index, WordNet id or class name)."),
                 weights: Optional[str] = typer.Option(None, "--weights", help="The checkpoint the artifacts were made from."),
                 *, reporter, quiet):
    """What each artifact keeps of the fp32 PyTorch model over an image folder: top-1
    agreement, top-5 overlap, logit error; top-1/top-5 accuracy when labelled."""
    from . import api
    from .console import eval_table

    result = api.evaluate(artifacts, images=images, labels=labels, weights=weights, reporter=reporter)
    return Output(result.to_dict(), [eval_table(result)], [] if quiet else result.warnings)


@command()
def targets():
    """List export targets (built-in and plug-ins) and whether they are usable here."""
    from .console import targets_table
    from .targets import list_targets

    infos = list_targets()
    return Output([{"name": i.name, "produces": i.produces, "requires": list(i.requires), "missing": list(i.missing),
                    "usable": i.usable, "source": i.source, "error": i.error, "precisions": list(i.precisions)}
                   for i in infos], [targets_table(infos)])


@command()
def devices():
    """List the devices whose export options `export --device` starts from (devices/*.toml)."""
    from .console import devices_table
    from .devices import list_devices

    found = list_devices()
    return Output([d.to_dict() for d in found], [devices_table(found)])


command(name="profiles", deprecated="Use `evit-deploy devices`.", help="Deprecated alias of `devices`.")(devices)


# -- bench / profile -----------------------------------------------------------------------

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


@command(json_help="Write records to FILE ('-': stdout).")
def bench(models: list[str] = typer.Argument(..., help="m0 … m5, or a checkpoint that records its architecture (a pruned one)"),
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
          plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
          *, shortcuts, reporter):
    """Throughput of each backend side by side (the paper's Table 3 protocol by default)."""
    from .backends import parse_backends
    from .bench import bench as run_bench
    from .bench import plot as write_plot
    from .console import bench_tables

    result = run_bench(models, parse_backends(backends), batch=batch, threads=threads, img_size=img_size,
                       rounds=rounds, round_seconds=round_seconds, target_options=_target_options(option, shortcuts),
                       memory=memory, artifacts_dir=artifacts, reporter=reporter)
    if plot is not None:
        write_plot(result, plot)
    return Output(result.to_dict(), bench_tables(result))


@command(name="profile")
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
                    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
                    *, shortcuts, reporter):
    """Where the time goes: compute- vs memory-bound operators, and time per block."""
    from .console import profile_tables
    from .profiler import plot as write_plot
    from .profiler import profile

    results = [profile(model, b, batch=batch, threads=threads, iterations=iterations, img_size=img_size,
                       target_options=_target_options(option, shortcuts), reporter=reporter)
               for b in (backend or ["torch"])]
    if plot is not None:
        write_plot(results, plot)
    return Output([r.to_dict() for r in results], profile_tables(results))


@command(json_help="Also write optimize.json's record to FILE ('-': stdout).")
def optimize(model: str = typer.Argument(..., help="m0 … m5, or package.module:factory"),
             out: Path = typer.Option(..., "--out", "-o", help="Output directory: the winner, optimize.json, "
                                      "optimize.png, and a cache a rerun reuses."),
             weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Checkpoint (default: synthetic)."),
             images: Optional[Path] = typer.Option(None, "--images", help="Images agreement is measured on (default: "
                                                   "the bundled photos); DIR/<synset>/… gives labels."),
             labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file for --images."),
             min_top1_agreement: Optional[float] = typer.Option(None, "--min-top1-agreement",
                                                                help="Top-1 agreement with fp32 a candidate must keep "
                                                                     "(default 0.99)."),
             max_top1_drop: Optional[float] = typer.Option(None, "--max-top1-drop",
                                                           help="Top-1 accuracy a candidate may lose, in points "
                                                                "(0.5 = half a point); needs labelled images."),
             batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Default 16 (throughput), 1 (latency)."),
             threads: int = typer.Option(1, "--threads", min=1),
             img_size: int = typer.Option(224, "--img-size"),
             input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW or N (a --model "
                                                      "package.module:factory needs it)."),
             targets: Optional[str] = typer.Option(None, "--targets", help="Comma-separated (default: all)."),
             precisions: Optional[str] = typer.Option(None, "--precisions", help="Comma-separated (default: all)."),
             time_budget: Optional[str] = typer.Option(None, "--time-budget", help="e.g. 20m: what was not tried by "
                                                       "then is listed."),
             tune: bool = typer.Option(False, "--tune", help="Also tune what can be tuned (TVM), for part of the "
                                       "budget."),
             objective: str = typer.Option("throughput", "--objective", help="throughput or latency."),
             rounds: int = typer.Option(5, "--rounds", min=1, help="Interleaved timing rounds."),
             *, reporter):
    """The fastest artifact that is right on this machine, chosen by measurement within an
    accuracy budget."""
    from .console import optimize_tables
    from .errors import ParityError
    from .optimizer import optimize as run_optimize

    result = run_optimize(model, out, weights=weights, images=images, labels=labels,
                          min_top1_agreement=min_top1_agreement,
                          max_top1_drop=None if max_top1_drop is None else max_top1_drop / 100, batch=batch,
                          threads=threads, img_size=img_size, input_size=_size(input_size), targets=_names(targets), precisions=_names(precisions),
                          time_budget=time_budget, tune=tune, objective=objective, rounds=rounds, reporter=reporter)
    error = None if result.winner else ParityError(f"no candidate is right within the budget "
                                                    f"({result.settings['budget_text']}): see {out}/optimize.json")
    return Output(result.to_dict(), optimize_tables(result), result.warnings, error=error)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


# -- pruning -------------------------------------------------------------------------------

@command()
def importance(model: str = typer.Argument(..., help="m0 … m5"),
               weights: str = typer.Option(..., "--weights", help="The checkpoint to score."),
               images: str = typer.Option(..., "--images", help="A folder of images (searched recursively)."),
               labels: Optional[str] = typer.Option(None, "--labels", help="A labels file (else: the model's own "
                                                    "top-1)."),
               keep_macs: Optional[float] = typer.Option(None, "--keep-macs", help="Budget shown: share of MACs to "
                                                         "keep (default 0.7)."),
               keep_params: Optional[float] = typer.Option(None, "--keep-params", help="... of parameters."),
               plot: Optional[str] = typer.Option(None, "--plot", help="Write the Fig. 5 chart (PNG)."),
               img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
               multiple_of: int = typer.Option(8, "--multiple-of", help="As prune's: every group keeps a multiple "
                                               "of N channels (or all)."),
               *, reporter):
    """Taylor importance of every prunable channel group (heads' Q/K and V, FFNs, patch merging)."""
    from . import api
    from .console import importance_tables

    result = api.importance(model, weights, images, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
                            plot=plot, img_size=img_size, multiple_of=multiple_of, reporter=reporter).to_dict()
    return Output(result, importance_tables(result))


@command()
def prune(model: str = typer.Argument(..., help="m0 … m5"),
          weights: str = typer.Option(..., "--weights", help="The checkpoint to prune."),
          images: str = typer.Option(..., "--images", help="A folder of images (searched recursively)."),
          out: Path = typer.Option(..., "--out", help="The pruned checkpoint to write (.pth)."),
          keep_macs: Optional[float] = typer.Option(None, "--keep-macs", help="Share of MACs to keep, e.g. 0.7."),
          keep_params: Optional[float] = typer.Option(None, "--keep-params", help="Share of parameters to keep."),
          labels: Optional[str] = typer.Option(None, "--labels", help="A labels file for the importance."),
          finetune_steps: int = typer.Option(0, "--finetune-steps", help="Distillation steps from the unpruned "
                                             "model on the images."),
          img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
          multiple_of: int = typer.Option(8, "--multiple-of", help="Every group keeps a multiple of N channels "
                                          "(or all): onnxruntime's blocked convolutions need 8 (AVX2) or 16 "
                                          "(AVX-512); 1: no rounding."),
          *, reporter):
    """Taylor-prune a checkpoint to a MAC/parameter budget; the file records its widths."""
    from . import api
    from .console import prune_tables

    result = api.prune(model, weights, images, out, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
                       finetune_steps=finetune_steps, img_size=img_size, multiple_of=multiple_of,
                       reporter=reporter).to_dict()
    return Output(result, prune_tables(result))


# -- build / doctor ------------------------------------------------------------------------

@command(json_help="Also write the manifest to FILE ('-': stdout).")
def build(file: Path = typer.Argument(Path("evit-deploy.toml"), help="The build file."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the file's \\[build] out)."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Models built in parallel processes."),
          *, reporter):
    """Build, verify and record every artifact of a build file (skips what is up to date)."""
    import json

    from .build import build as run_build
    from .build import exit_status
    from .console import build_table

    result = run_build(file, out=out, jobs=jobs, reporter=reporter)
    return Output(json.loads(result.manifest.read_text()), [build_table(result, file)], error=exit_status(result))


@command()
def doctor(artifacts: Optional[list[Path]] = typer.Argument(None, help="Artifacts: does this CPU run them as "
                                                                   "verified? (exit 2 if not)"),
           requested: Optional[list[str]] = typer.Option(None, "--target", "-t",
                                                        help="Fail (exit 5) unless this target is usable; repeatable.")):
    """Versions, host CPU, whether each target works here (with advice), and whether this
    CPU runs the given artifacts as they were verified."""
    from .console import doctor_tables
    from .doctor import doctor as run_doctor
    from .errors import MissingDependencyError

    report = run_doctor(requested, artifacts or ())
    unusable = report.unusable(requested)
    unfit = [f"{a.path}: {a.verdict}" for a in report.artifacts if not a.as_verified]
    error = (MissingDependencyError(f"requested target(s) not usable here: {', '.join(unusable)} "
                                    f"(see the advice above)") if unusable else
             BadInputError("; ".join(unfit)) if unfit else None)
    return Output(report.to_dict(), doctor_tables(report), error=error)
