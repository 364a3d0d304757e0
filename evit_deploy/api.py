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

from .description import ModelDescription
from .errors import BadInputError, ParityError
from .fsutil import ensure_output_dir, output_error, publish, remove, write_json_atomic
from .parity import ParityReport, Tolerance, verify_outputs
from .preprocess import preprocess_file
from .progress import Reporter
from .targets import Artifact, get_target, target_for_artifact
from .targets.base import options_to_dict, parse_cli_values

RANDOM_INIT_WARNING = ("no weights given: using a RANDOM initialisation (seed {seed}); the artifact "
                       "computes nothing useful and is marked random-init in its metadata")


@dataclass
class ExportResult:
    artifact: Artifact
    report: ParityReport | None
    timings: dict[str, float] = field(default_factory=dict)


def resolve_target_options(target: str | None, options=None, *, profile: str | None = None,
                           cli_args: list[str] | None = None):
    """(Target, parsed options, profile name) from a target name, a profile and options.

    Explicit options override the profile's; ``cli_args`` are raw ``--flag value`` pairs.
    """
    values: dict = {}
    if profile is not None:
        from .profiles import load_profile
        prof = load_profile(profile)
        if target is not None and target != prof.target:
            raise BadInputError(f"profile '{prof.name}' is for target '{prof.target}', not '{target}'")
        target = prof.target
        values.update(prof.options)
    if target is None:
        raise BadInputError("no target given: pass --target NAME or --profile NAME")
    tgt = get_target(target)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        values.update(options_to_dict(options))
    else:
        values.update(options or {})
    if cli_args:
        values.update(parse_cli_values(tgt.Options, cli_args, target=tgt.name))
    return tgt, tgt.parse_options(values), (profile and Path(profile).stem)


def export(model: str = "m0", target: str | None = "onnx", *, out_dir: str | Path = ".",
           weights=None, options=None, profile: str | None = None, cli_args: list[str] | None = None,
           batch: int | None = None, dynamic_batch: bool = False, img_size: int = 224, num_classes: int = 1000,
           distillation: bool = False, input_size: tuple[int, int] | None = None, seed: int = 0,
           task: str = "classification", neck: str = "maskrcnn",
           verify: bool = True, images=None, tolerance: Tolerance | None = None,
           reporter: Reporter | None = None) -> ExportResult:
    """Trace ``model``, export it for ``target`` into ``out_dir`` and prove parity.

    The artifact appears under its final name only after it passed parity (or with
    ``verify=False``). On a parity failure the files are kept in
    ``<out_dir>/<name>.rejected/`` with the report, and :class:`ParityError` is raised.
    ``batch=None`` is the target's choice (a TVM export takes the batch its tuning database
    was made for), else 1.
    """
    from .trace import trace

    reporter = reporter or Reporter()
    tgt, opts, profile_name = resolve_target_options(target, options, profile=profile, cli_args=cli_args)
    tgt.check_available()
    if dynamic_batch and not tgt.supports_dynamic_batch:
        raise BadInputError(f"target '{tgt.name}' does not support a dynamic batch; use --batch N")
    if batch is None and not dynamic_batch:
        chosen = tgt.default_batch(opts, str(model))
        if chosen is not None:
            batch, why = chosen
            reporter.info(f"batch {batch}: {why} (--batch N to change)")
    if batch is None:
        batch = 1
    out = ensure_output_dir(out_dir)
    with reporter.stage("trace", str(model)):
        traced = trace(model, weights, batch=batch, dynamic_batch=dynamic_batch, img_size=img_size,
                       num_classes=num_classes, distillation=distillation, seed=seed,
                       input_format=tgt.input_format(opts), input_size=input_size, task=task, neck=neck)
    if traced.description.random_init:
        reporter.warn(RANDOM_INIT_WARNING.format(seed=traced.description.seed))
    elif getattr(traced.reference, "neck_pretrained", True) is False:
        reporter.warn("the checkpoint is a classification one: the backbone is loaded, but the FPN neck keeps "
                      f"its seeded initialisation (seed {traced.description.seed})")
    return export_traced(traced, tgt, opts, out, profile=profile_name, verify=verify, images=images,
                         tolerance=tolerance, reporter=reporter)


def export_traced(traced, tgt, opts, out_dir: Path, *, profile: str | None = None, verify: bool = True,
                  images=None, tolerance: Tolerance | None = None,
                  reporter: Reporter | None = None) -> ExportResult:
    """Export an already traced model (several targets can share one trace)."""
    reporter = reporter or Reporter()
    description = traced.description.with_extra(
        target=tgt.name, precision=tgt.precision(opts), options=options_to_dict(opts),
        **({"profile": profile} if profile else {}))
    traced = dataclasses.replace(traced, description=description)
    final = out_dir / tgt.artifact_name(description, opts)
    staging = out_dir / f".evit-staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        with reporter.stage("export", tgt.name):
            artifact = tgt.export(traced, opts, staging / final.name)
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
        published = []
        for f in artifact.files:    # sidecars first: the primary file appears last
            publish(f, out_dir / f.name)
            published.append(out_dir / f.name)
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


def inspect_artifact(path: str | Path) -> tuple[object, ModelDescription]:
    """The target that reads ``path`` and the description stored in it."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"artifact not found: {path}")
    tgt = target_for_artifact(path)
    tgt.check_available(for_run=True)
    return tgt, tgt.read_description(path)


def verify(artifact: str | Path, *, weights=None, images=None, tolerance: Tolerance | None = None,
           reporter: Reporter | None = None) -> ParityReport:
    """Check an existing artifact against the PyTorch model its metadata names.

    Returns the report; ``report.passed`` is the verdict.
    """
    from .trace import build_reference

    reporter = reporter or Reporter()
    path = Path(artifact)
    tgt, description = inspect_artifact(path)
    with reporter.stage("reference", description.model):
        reference = build_reference(description, weights)
    with reporter.stage("verify", tgt.runtime_name(path)):
        report = verify_outputs(target=tgt, path=path, description=description, reference=reference,
                                artifact=str(path), tolerance=tolerance, images_dir=images)
    return report


@dataclass
class Prediction:
    source: str
    top: list[tuple[int, str, float]]       # (class index, label, probability)


@dataclass
class RunResult:
    description: ModelDescription
    outputs: dict[str, np.ndarray]
    predictions: list[Prediction]
    runtime: str


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


def load_inputs(paths, description: ModelDescription) -> tuple[np.ndarray, list[str]]:
    """Images (preprocessed as the description says) and ``.npy`` tensors, stacked, with
    the source of each item."""
    arrays, sources = [], []
    spec = description.input
    for p in map(Path, paths):
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
    x, sources = load_inputs(inputs, description)
    outputs = tgt.run_batched(path, x, description)
    predictions = []
    first = outputs[description.outputs[0].name]
    if description.labels is not None and first.ndim == 2:
        predictions = top_k(first, description.labels, top, sources)
    return RunResult(description, outputs, predictions, tgt.runtime_name(path))


# -- the model family ----------------------------------------------------------------------

def models_overview() -> list[dict]:
    """Every family member with measured parameters (after BN folding) and MACs at 224x224,
    beside the paper's figures."""
    from .models import MODELS, create_model
    from .models.counting import count_macs, count_parameters

    rows = []
    for spec in MODELS.values():
        model = create_model(spec.name, fuse=True)
        rows.append({"model": spec.name, "display_name": spec.display_name, "resolution": 224,
                     "params_m": count_parameters(model) / 1e6, "macs_m": count_macs(model) / 1e6,
                     "paper_top1": spec.paper.top1, "paper_params_m": spec.paper.params_m,
                     "paper_macs_m": spec.paper.macs_m})
    return rows


def model_info(name: str, *, img_size: int = 224) -> dict:
    """Architecture summary of one member: stages, widths, heads, kernels, windows and counts."""
    from .models import create_model, resolve_name
    from .models.counting import count_layers, count_macs, count_parameters

    spec = resolve_name(name)
    model = create_model(spec.name, img_size=img_size)
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
            "unfused": unfused, "fused": fused, "paper": dataclasses.asdict(spec.paper)}


def predict(model: str, images, *, weights=None, top: int = 5, img_size: int = 224,
            distillation: bool = False, seed: int = 0) -> list[Prediction]:
    """Classify image files with the PyTorch model (standard evaluation preprocessing)."""
    import torch

    from .labels import imagenet_labels
    from .models import create_model
    from .preprocess import Preprocessing

    net = create_model(model, "random" if weights is None else weights, img_size=img_size, distillation=distillation, seed=seed)
    spec = Preprocessing.for_size(img_size)
    paths = [Path(p) for p in images]
    if not paths:
        raise BadInputError("no images given")
    x = np.concatenate([preprocess_file(p, spec) for p in paths])
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    return top_k(logits, imagenet_labels(), top, [str(p) for p in paths])


def tune(model: str = "m0", target: str | dict = "native", **kwargs):
    """Tune ``model``'s kernels for a TVM target into a tuning database (``evit-deploy
    tune``); see :func:`evit_deploy.targets.tvm.tune.tune` for the options."""
    from .targets.tvm.tune import tune as tune_kernels
    return tune_kernels(model, target, **kwargs)
