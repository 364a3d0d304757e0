"""The public Python API: everything the CLI does, as functions returning data.

Functions here never print; they report progress through a :class:`Reporter` and raise
:class:`~evit_deploy.errors.EvitError` subclasses for problems the user can act on.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cpufeatures import CpuNeeds, inexact_message, judge, needs_of, require_runnable
from .description import ModelDescription
from .errors import BadInputError, EvitError, ExportError, ParityError, first_line
from .fsutil import (artifact_room_error, ensure_output_dir, output_error, publish, publish_together, remove,
                     write_json_atomic)
from .parity import ParityReport, Tolerance, verify_outputs
from .preprocess import preprocess_file
from .progress import Reporter
from .plan import ExportPlan, device_argument, plan_export, trace_plan
from .targets import Artifact, target_for_artifact

@dataclass
class ExportResult:
    artifact: Artifact
    report: ParityReport | None
    timings: dict[str, float] = field(default_factory=dict)


def export(model: str = "m0", target: str | None = "onnx", *, out_dir: str | Path = ".",
           weights=None, options=None, device: str | None = None, cli_args: list[str] | None = None,
           batch: int | None = None, dynamic_batch: bool = False, img_size: int = 224, num_classes: int = 1000,
           distillation: bool = False, input_size: tuple[int, int] | None = None, seed: int = 0,
           task: str = "classification", neck: str = "maskrcnn",
           verify: bool = True, images=None, tolerance: Tolerance | None = None,
           reporter: Reporter | None = None, profile: str | None = None) -> ExportResult:
    """Trace ``model``, export it for ``target`` into ``out_dir`` and prove parity.

    The artifact appears under its final name only after it passed parity (or with
    ``verify=False``). On a parity failure the files are kept in
    ``<out_dir>/<name>.rejected/`` with the report, and :class:`ParityError` is raised.
    ``batch=None`` is the target's choice (a TVM export takes the batch its tuning database
    was made for), else 1. See :func:`~evit_deploy.plan.plan_export` for the options;
    ``profile`` is the deprecated name of ``device``.
    """
    device = device_argument(device, profile)
    plan = plan_export(model, target, options=options, device=device, cli_args=cli_args, batch=batch,
                       dynamic_batch=dynamic_batch, weights=weights, img_size=img_size, num_classes=num_classes,
                       distillation=distillation, input_size=input_size, task=task, neck=neck, seed=seed)
    return export_plan(plan, out_dir, verify=verify, images=images, tolerance=tolerance, reporter=reporter)


def export_plan(plan: ExportPlan, out_dir: str | Path, *, verify: bool = True, images=None,
                tolerance: Tolerance | None = None, reporter: Reporter | None = None) -> ExportResult:
    """Carry out an export plan: trace, export, verify (see :func:`export`)."""
    reporter = reporter or Reporter()
    for note in plan.notes:
        reporter.info(note)
    cpu_needs(plan, verify)
    out = ensure_output_dir(out_dir)
    with reporter.stage("trace", plan.request.model):
        traced = trace_plan(plan)
    for warning in traced.warnings:
        reporter.warn(warning)
    return export_traced(traced, plan, out, verify=verify, images=images, tolerance=tolerance, reporter=reporter)


def export_traced(traced, plan: ExportPlan, out_dir: Path, *, verify: bool = True, images=None,
                  tolerance: Tolerance | None = None, reporter: Reporter | None = None) -> ExportResult:
    """Export an already traced model (plans with the same ``trace_key`` can share one trace)."""
    reporter = reporter or Reporter()
    tgt, opts = plan.target, plan.options
    needs = cpu_needs(plan, verify)
    description = traced.description.with_extra(
        target=tgt.name, precision=plan.precision, options=plan.options_dict(),
        cpu=needs.to_dict(),
        # Stored under its earlier name: artifacts already made carry it so.
        **({"profile": plan.device} if plan.device else {}))
    traced = dataclasses.replace(traced, description=description)
    final = out_dir / tgt.artifact_name(description, opts)
    staging = out_dir / f".evit-staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        with reporter.stage("export", tgt.name):
            try:
                artifact = tgt.export(traced, opts, staging / final.name, reporter)
            except ExportError as exc:
                # A converter's native writer says "Compilation error" or "iostream error"
                # where Python says "no space left"; the least an artifact holds is its
                # weights in int8.
                raise artifact_room_error(final, traced.weight_bytes() // 4, directory=staging) or exc
        report = None
        if verify:
            with reporter.stage("verify", tgt.runtime_name(artifact.path)):
                # The artifact's own description: a target may take input differently from
                # the trace (Core ML's image input takes 0..255 pixels, for instance).
                report = verify_outputs(target=tgt, path=artifact.path, description=artifact.description,
                                        reference=traced.reference, artifact=str(final),
                                        tolerance=tolerance, images_dir=images)
            if not report.passed:
                rejected = out_dir / f"{final.name}.rejected"
                write_json_atomic(staging / "parity-report.json", report.to_dict())
                remove(rejected)
                publish(staging, rejected)
                raise ParityError(f"{report.summary()}; the artifact was not written under "
                                  f"{final.name} (kept for inspection in {rejected})", report)
        # Sidecars first: the primary file appears last.
        published = publish_together((f, out_dir / f.name) for f in artifact.files)
        artifact = dataclasses.replace(artifact, path=published[-1], sidecars=tuple(published[:-1]))
        return ExportResult(artifact, report, dict(reporter.timings))
    except OSError as exc:
        # A full disk or a permission problem half-way: the staging area is discarded
        # and what was under the final name before stays as it was.
        error = output_error(exc, final)
        if error is None:
            raise
        raise error from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def cpu_needs(plan: ExportPlan, verify: bool) -> CpuNeeds:
    """What the planned artifact needs of a CPU; with ``verify``, a :class:`BadInputError`
    (before any work) when this CPU cannot run it as it would be verified: parity proven
    here would not hold, or the check would crash."""
    needs = plan.target.cpu_needs(plan.options)
    verdict = judge(needs)
    if verify and not (verdict.runs and verdict.exact):
        raise BadInputError(f"{plan.target.name} artifact with these options: {verdict.summary()}, so its parity "
                            f"cannot be proven on this machine; export it on a CPU that has what it needs, or pass "
                            f"--no-verify here and `evit-deploy verify` it there")
    return needs


def _read_artifact(path: Path) -> tuple[object, ModelDescription]:
    if not path.exists():
        raise BadInputError(f"artifact not found: {path}")
    tgt = target_for_artifact(path)
    tgt.check_available(for_run=True)
    return tgt, tgt.read_description(path)


def inspect_artifact(path: str | Path) -> tuple[object, ModelDescription]:
    """The target that reads ``path`` and the description stored in it; a
    :class:`BadInputError` if its code needs instructions this CPU lacks (it would crash)."""
    tgt, description = _read_artifact(Path(path))
    require_runnable(needs_of(description), str(path))
    return tgt, description


def cpu_verdict(path: str | Path):
    """Whether this CPU runs the artifact at ``path`` as it was verified
    (:class:`~evit_deploy.cpufeatures.CpuVerdict`), and its description."""
    description = _read_artifact(Path(path))[1]
    return judge(needs_of(description)), description


def verify(artifact: str | Path, *, weights=None, images=None, tolerance: Tolerance | None = None,
           any_cpu: bool = False, reporter: Reporter | None = None) -> ParityReport:
    """Check an existing artifact against the PyTorch model its metadata names.

    Returns the report; ``report.passed`` is the verdict. An artifact whose kernels are
    exact only on other CPUs (full-range int8 without VNNI here) is refused with a
    :class:`BadInputError`, since its verdict here would not be the one that holds where
    it ships; ``any_cpu`` checks what it computes here anyway.
    """
    from .errors import CheckpointError
    from .tracing import build_reference, unused_weights

    reporter = reporter or Reporter()
    path = Path(artifact)
    tgt, description = inspect_artifact(path)
    if (reason := unused_weights(description, weights)) is not None:
        # Checked against its own weights it would pass, and say nothing of these.
        raise CheckpointError(f"{path} cannot be verified against {weights}: {reason} (export it again with "
                              f"--weights {weights})")
    verdict = judge(needs_of(description))
    if not verdict.exact:
        if not any_cpu:
            raise BadInputError(f"{inexact_message(verdict, str(path))}; verify it on a CPU that has one (or pass "
                                f"--any-cpu to check what it computes here)")
        reporter.warn(inexact_message(verdict, str(path)))
    with reporter.stage("reference", description.model):
        reference = build_reference(description, weights)
    with reporter.stage("verify", tgt.runtime_name(path)):
        report = verify_outputs(target=tgt, path=path, description=description, reference=reference,
                                artifact=str(path), tolerance=tolerance, images_dir=images)
    return report


def evaluate(artifacts, *, images=None, labels=None, weights=None, reporter: Reporter | None = None):
    """Run artifacts and the fp32 PyTorch reference over an image folder (default: the
    bundled photos) and measure what each artifact keeps: top-1 agreement, top-5 overlap,
    logit error, and with labels (synset folders or a labels file) top-1/top-5 accuracy.

    ``weights`` is the checkpoint the artifacts were made from (they must share it, or be
    made from synthetic weights). Returns an :class:`~evit_deploy.evaluation.EvalResult`.
    """
    from .evaluation import Evaluated, check_classifier, eval_images
    from .evaluation import evaluate as run_evaluation
    from .tracing import build_reference, unused_weights

    reporter = reporter or Reporter()
    paths = file_list(artifacts)
    if not paths:
        raise BadInputError("no artifacts given")
    chosen = eval_images(images, labels)
    references: dict[tuple, object] = {}
    entries = []
    for path in paths:
        tgt, description = inspect_artifact(path)
        verdict = judge(needs_of(description))
        if not verdict.exact:
            reporter.warn(inexact_message(verdict, str(path)))
        check_classifier(path, description)
        if (reason := unused_weights(description, weights)) is not None:
            reporter.warn(f"{path} is compared with the model it was made from: {reason}")
        if chosen.labels is not None and len(description.labels) != 1000:
            raise BadInputError(f"the labels are ImageNet classes; {path} has {len(description.labels)} classes")
        key = (description.model, description.weights, description.seed, repr(sorted(description.model_options.items())))
        if key not in references:
            with reporter.stage("reference", description.model):
                references[key] = build_reference(description, weights)
        entries.append(Evaluated(path, tgt, description, references[key]))
    return run_evaluation(entries, chosen, reporter=reporter)


@dataclass
class Prediction:
    source: str
    top: list[tuple[int, str, float]]       # (class index, label, probability)

    def to_dict(self) -> dict:
        return {"input": self.source,
                "top": [{"index": i, "label": label, "probability": p} for i, label, p in self.top]}


@dataclass
class RunResult:
    description: ModelDescription
    outputs: dict[str, np.ndarray]
    predictions: list[Prediction]
    runtime: str
    warnings: list[str] = field(default_factory=list)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels, k: int, sources: list[str]) -> list[Prediction]:
    probs = softmax(logits)
    preds = []
    for src, p in zip(sources, probs):
        idx = np.argsort(-p)[:k]
        preds.append(Prediction(src, [(int(i), labels[i] if labels else str(i), float(p[i])) for i in idx]))
    return preds


def file_list(paths) -> list[Path]:
    """``paths`` as a list of paths: one path (a string or ``Path``) or any iterable of them."""
    import os

    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def load_inputs(paths, description: ModelDescription) -> tuple[np.ndarray, list[str]]:
    """Images (preprocessed as the description says) and ``.npy`` tensors, stacked, with
    the source of each item."""
    arrays, sources = [], []
    spec = description.input
    for p in file_list(paths):
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise BadInputError(f"{p} is not a readable .npy file ({exc})") from None
            if arr.ndim == 3:
                arr = arr[None]
            if tuple(arr.shape[1:]) != tuple(spec.shape[1:]):
                raise BadInputError(f"{p} has shape {arr.shape}; the artifact takes "
                                    f"N x {'x'.join(map(str, spec.shape[1:]))}")
            arrays.append(arr.astype(spec.dtype))
            sources += [str(p) if len(arr) == 1 else f"{p}[{i}]" for i in range(len(arr))]
        else:
            arrays.append(preprocess_file(p, description.preprocessing, description.input_format))
            sources.append(str(p))
    if not arrays:
        raise BadInputError("no inputs given")
    return np.concatenate(arrays), sources


def run(artifact: str | Path, inputs, *, top: int = 5) -> RunResult:
    """Run an artifact with its own runtime on image files or ``.npy`` tensors.

    Torch is never imported here for ONNX and TVM artifacts.
    """
    path = Path(artifact)
    tgt, description = inspect_artifact(path)
    verdict = judge(needs_of(description))
    warnings = [] if verdict.exact else [inexact_message(verdict, str(path))]
    x, sources = load_inputs(inputs, description)
    try:
        outputs = tgt.run_batched(path, x, description)
    except EvitError:
        raise
    except Exception as exc:  # the runtime refused the artifact: it does not match its description
        raise BadInputError(f"{path} failed to run: {first_line(exc)}") from None
    predictions = []
    first = outputs[description.outputs[0].name]
    if description.labels is not None and first.ndim == 2:
        predictions = top_k(first, description.labels, top, sources)
    return RunResult(description, outputs, predictions, tgt.runtime_name(path), warnings)


# -- the model family ----------------------------------------------------------------------

def models_overview() -> list[dict]:
    """Every family member with its parameters (after BN folding) and MACs at 224x224, as
    counted on our model (stored in the registry; a test recounts them), beside the
    paper's figures. Torch-free."""
    from .models import MODELS

    rows = []
    for spec in MODELS.values():
        rows.append({"model": spec.name, "display_name": spec.display_name, "resolution": 224,
                     "params_m": spec.counts.params / 1e6, "macs_m": spec.counts.macs / 1e6,
                     "paper_top1": spec.paper.top1, "paper_params_m": spec.paper.params_m,
                     "paper_macs_m": spec.paper.macs_m})
    return rows


def model_info(name: str, *, img_size: int = 224, weights=None) -> dict:
    """Architecture summary of one member: stages, widths, heads, kernels, windows and counts;
    with ``weights``, of the model they hold (a pruned checkpoint's ``widths`` per module)."""
    from .models import create_model, resolve_name
    from .models.counting import count_layers, count_macs, count_parameters

    spec = resolve_name(name)
    model = create_model(spec.name, weights, img_size=img_size)
    stages = []
    for i, blocks in enumerate([model.blocks1, model.blocks2, model.blocks3]):
        attn = [m for m in blocks.modules() if type(m).__name__ == "LocalWindowAttention"]
        res = model.feature_resolutions[i]
        stages.append({"stage": i + 1, "resolution": f"{res}x{res}", "embed_dim": spec.embed_dim[i],
                       "depth": spec.depth[i], "heads": spec.num_heads[i],
                       "kernels": list(spec.kernels[:spec.num_heads[i]]),
                       "window": attn[0].window_resolution if attn else None,
                       "downsample": i > 0})
    unfused = {"params": count_parameters(model), **count_layers(model)}
    from .models.fuse import fuse
    fuse(model)
    fused = {"params": count_parameters(model), **count_layers(model)}
    return {"model": spec.name, "display_name": spec.display_name, "img_size": img_size,
            "patch_size": 16, "key_dim": 16, "stages": stages, "macs": count_macs(model, (img_size, img_size)),
            "unfused": unfused, "fused": fused, "paper": dataclasses.asdict(spec.paper),
            "widths": model.config.widths_dict()}


def importance(model: str, weights, images, *, labels=None, keep_macs: float | None = None,
               keep_params: float | None = None, img_size: int = 224, plot=None, multiple_of: int = 8,
               reporter: Reporter | None = None):
    """First-order Taylor importance of every prunable channel group of ``model`` loaded
    from ``weights``, over the images below ``images`` (cross-entropy against ``labels``, a
    labels file, else against the model's own top-1), and the widths a pruning to the
    budget would leave (supplementary Fig. 5; a PNG at ``plot``). See
    :func:`evit_deploy.pruning.run.importance`."""
    from .pruning.run import importance as run
    return run(model, weights, images, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
               img_size=img_size, plot=plot, multiple_of=multiple_of, reporter=reporter)


def prune(model: str, weights, images, out, *, labels=None, keep_macs: float | None = None,
          keep_params: float | None = None, finetune_steps: int = 0, img_size: int = 224, multiple_of: int = 8,
          reporter: Reporter | None = None):
    """Taylor-prune ``model`` to ``keep_macs`` of its MACs (and/or ``keep_params`` of its
    parameters), optionally distil it from the unpruned model on the same images, and
    write the checkpoint ``out``, which records its widths (``--weights out`` alone
    rebuilds it). See :func:`evit_deploy.pruning.run.prune`."""
    from .pruning.run import prune as run
    return run(model, weights, images, out, labels=labels, keep_macs=keep_macs, keep_params=keep_params,
               finetune_steps=finetune_steps, img_size=img_size, multiple_of=multiple_of, reporter=reporter)


def predict(model: str, images, *, weights=None, top: int = 5, img_size: int = 224,
            distillation: bool = False, seed: int = 0, reporter: Reporter | None = None) -> list[Prediction]:
    """Classify image files with the PyTorch model (standard evaluation preprocessing)."""
    import torch

    from .labels import imagenet_labels
    from .models import create_model
    from .preprocess import Preprocessing

    if weights is None:
        (reporter or Reporter()).warn(f"no weights given: using a RANDOM initialisation (seed {seed}); the "
                                      "predictions mean nothing")
    net = create_model(model, "random" if weights is None else weights, img_size=img_size,
                       distillation=distillation, seed=seed)
    spec = Preprocessing.for_size(img_size)
    paths = file_list(images)
    if not paths:
        raise BadInputError("no images given")
    x = np.concatenate([preprocess_file(p, spec) for p in paths])
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    return top_k(logits, imagenet_labels(), top, [str(p) for p in paths])
