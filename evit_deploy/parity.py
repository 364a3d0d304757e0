"""The parity engine: one way, for every target, to prove an artifact computes what
PyTorch computes.

The reference is the model *before* BN folding, in fp32. The inputs are seeded noise
images plus real photos, all turned into model inputs by the same numpy preprocessing
(:mod:`evit_deploy.preprocess`), so an artifact with baked-in normalisation is checked
against an independent implementation of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .description import ModelDescription
from .errors import BadInputError, EvitError
from .preprocess import Preprocessing, to_input
from .samples import SampleImage, sample_inputs


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one precision class.

    ``max_rel`` bounds the largest absolute error relative to the reference's scale (its
    largest magnitude); ``top1`` says on which inputs the arg-max must agree ("all",
    "photos" or "none"). Inputs whose reference top-1 and top-2 are closer than twice the
    artifact's error on that input are near-ties, whose order is not checked.
    """

    max_rel: float
    min_cosine: float
    top1: str = "all"

    def override(self, **changes) -> "Tolerance":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel=1e-4, min_cosine=0.99999, top1="all"),
    # fp16 arithmetic keeps ~3 significant digits; through ~40 layers errors of a few
    # percent of the logit range are normal, but predictions on real photos must hold.
    "fp16": Tolerance(max_rel=5e-2, min_cosine=0.999, top1="photos"),
    # Palettised / int8 weights: a lossy compression whose quality is what is measured.
    "compressed": Tolerance(max_rel=0.25, min_cosine=0.98, top1="none"),
}


@dataclass
class OutputMetrics:
    name: str
    scale: float
    max_abs: float
    max_rel: float
    min_cosine: float
    top1_agree: int | None = None
    top1_checked: int | None = None
    top1_ties: int | None = None
    top5_overlap: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class InputResult:
    name: str
    kind: str
    reference_top1: int | None = None
    artifact_top1: int | None = None
    reference_label: str | None = None
    artifact_label: str | None = None
    margin: float | None = None


@dataclass
class ParityReport:
    artifact: str
    target: str
    runtime: str
    precision: str
    tolerance: Tolerance
    outputs: list[OutputMetrics]
    inputs: list[InputResult]
    model: str = ""
    weights: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[str]:
        return [f"{o.name}: {f}" for o in self.outputs for f in o.failures]

    def summary(self) -> str:
        if self.passed:
            worst = max(self.outputs, key=lambda o: o.max_rel)
            return (f"parity ok ({self.precision}, {self.runtime}): max error {worst.max_rel:.2e} of "
                    f"output scale, cosine >= {min(o.min_cosine for o in self.outputs):.6f}")
        return f"parity FAILED ({self.precision}, {self.runtime}): " + "; ".join(self.failures)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["failures"] = self.failures
        for out, metrics in zip(data["outputs"], self.outputs):
            out["passed"] = metrics.passed
        return _finite(data)


def _finite(obj):
    """JSON has no NaN/inf: report them as strings rather than write invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# -- running -------------------------------------------------------------------------------

def reference_outputs(reference, inputs: list[SampleImage], spec: Preprocessing) -> dict[str, np.ndarray]:
    """Outputs of the PyTorch reference on numpy-normalised inputs, by output position."""
    import torch

    x = to_input(np.stack([p.image for p in inputs]), spec, "normalized")
    results: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(x), 8):
            out = reference(torch.from_numpy(x[start:start + 8]))
            out = out if isinstance(out, (tuple, list)) else (out,)
            results.append([o.float().numpy() for o in out])
    return {str(i): np.concatenate([r[i] for r in results]) for i in range(len(results[0]))}


# -- comparing -----------------------------------------------------------------------------

def compare_output(name: str, ref: np.ndarray, out: np.ndarray, kinds: list[str],
                   tolerance: Tolerance, classify: bool) -> tuple[OutputMetrics, list[tuple]]:
    ref = ref.astype(np.float64)
    out = out.astype(np.float64)
    if ref.shape != out.shape:
        m = OutputMetrics(name, float("nan"), float("nan"), float("nan"), float("nan"))
        m.failures.append(f"shape {out.shape} differs from the reference's {ref.shape}")
        return m, []
    scale = float(np.abs(ref).max()) or 1.0
    err = np.abs(out - ref)
    max_abs = float(err.max()) if np.isfinite(out).all() else float("inf")
    flat_r, flat_o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    denom = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_o, axis=1)
    cos = np.where(denom > 0, (flat_r * flat_o).sum(1) / np.maximum(denom, 1e-300), 1.0)
    metrics = OutputMetrics(name, scale, max_abs, max_abs / scale, float(np.nan_to_num(cos, nan=-1).min()))
    if not metrics.max_rel <= tolerance.max_rel:
        metrics.failures.append(f"max error {metrics.max_rel:.3g} of output scale > {tolerance.max_rel:g}")
    if not metrics.min_cosine >= tolerance.min_cosine:
        metrics.failures.append(f"cosine similarity {metrics.min_cosine:.6f} < {tolerance.min_cosine}")
    per_input = []
    if classify:
        order_r = np.argsort(-ref, axis=1)
        order_o = np.argsort(-out, axis=1)
        margin = ref[np.arange(len(ref)), order_r[:, 0]] - ref[np.arange(len(ref)), order_r[:, 1]]
        # A swap of two classes closer than the artifact's own error on that input is
        # not evidence of a wrong artifact (that error is judged by max_rel above).
        tie = margin <= 2 * err.reshape(len(err), -1).max(axis=1)
        checked = [k == "photo" or k == "user" or tolerance.top1 == "all" for k in kinds]
        if tolerance.top1 == "none":
            checked = [False] * len(kinds)
        agree = order_r[:, 0] == order_o[:, 0]
        considered = [c and not t for c, t in zip(checked, tie)]
        metrics.top1_checked = int(sum(considered))
        metrics.top1_agree = int(sum(a for a, c in zip(agree, considered) if c))
        metrics.top1_ties = int(sum(c and t for c, t in zip(checked, tie)))
        metrics.top5_overlap = float(np.mean([len(set(a[:5]) & set(b[:5])) / 5
                                              for a, b in zip(order_r, order_o)]))
        if metrics.top1_agree < metrics.top1_checked:
            metrics.failures.append(f"top-1 differs on {metrics.top1_checked - metrics.top1_agree} "
                                    f"of {metrics.top1_checked} inputs")
        per_input = [(int(order_r[i, 0]), int(order_o[i, 0]), float(margin[i])) for i in range(len(ref))]
    return metrics, per_input


def compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], description: ModelDescription,
            inputs: list[SampleImage], tolerance: Tolerance) -> tuple[list[OutputMetrics], list[InputResult]]:
    kinds = [p.kind for p in inputs]
    labels = description.labels
    results = [InputResult(p.name, p.kind) for p in inputs]
    metrics = []
    for i, spec in enumerate(description.outputs):
        ref = reference[str(i)]
        classify = labels is not None and ref.ndim == 2 and ref.shape[1] == len(labels) and ref.shape[1] > 1
        m, per_input = compare_output(spec.name, ref, outputs[spec.name], kinds, tolerance, classify)
        metrics.append(m)
        for res, (r, o, margin) in zip(results, per_input):
            res.reference_top1, res.artifact_top1, res.margin = r, o, margin
            res.reference_label, res.artifact_label = labels[r], labels[o]
    return metrics, results


def verify_outputs(*, target, path, description: ModelDescription, reference, artifact: str,
                   precision: str | None = None, tolerance: Tolerance | None = None,
                   images_dir=None, noise: int = 4, seed: int = 0) -> ParityReport:
    """Run an artifact and its reference on the parity inputs and judge the difference."""
    precision = precision or description.extra.get("precision", "fp32")
    if tolerance is None:
        if precision not in TOLERANCES:
            raise BadInputError(f"no default tolerance for precision '{precision}'; pass one explicitly")
        tolerance = TOLERANCES[precision]
    inputs = sample_inputs(description.preprocessing, images_dir=images_dir, noise=noise, seed=seed)
    ref = reference_outputs(reference, inputs, description.preprocessing)
    x = to_input(np.stack([p.image for p in inputs]), description.preprocessing, description.input_format)
    try:
        out = {k: np.asarray(v, np.float32) for k, v in target.run_batched(path, x, description).items()}
        missing = [o.name for o in description.outputs if o.name not in out]
        if missing:
            raise ValueError(f"it does not produce the outputs its description lists: {missing}")
        metrics, per_input = compare(ref, out, description, inputs, tolerance)
    except EvitError:
        raise
    except Exception as exc:  # an artifact that cannot even run fails parity
        failed = OutputMetrics("(run)", float("nan"), float("nan"), float("nan"), float("nan"))
        failed.failures.append(f"the artifact failed to run: {str(exc).strip().splitlines()[0]}")
        metrics, per_input = [failed], [InputResult(p.name, p.kind) for p in inputs]
    report = ParityReport(artifact=str(artifact), target=target.name, runtime=target.runtime_name(path),
                          precision=precision, tolerance=tolerance, outputs=metrics, inputs=per_input,
                          model=description.model, weights=description.weights)
    report.extra.update(target.parity_extras(path, report))
    return report

