"""The parity engine: one way, for every target, to prove an artifact computes what
PyTorch computes.

The judge is the *exact answer*: the model before BN folding, evaluated in float64 on
the parity inputs (seeded noise images, the bundled photos, the user's images, all made
model inputs by the same numpy preprocessing, :mod:`evit_deploy.preprocess`, so an
artifact with baked-in normalisation is checked against an independent implementation of
it). Against that answer, fp32 arithmetic itself is not exact: PyTorch's own fp32 output
is off by 1e-7 to 3e-4 of the output scale depending on the weights and the input. A
fixed bound on the distance to PyTorch's fp32 output confuses the artifact's error with
the reference's (a correct ONNX export of a realistic M5 checkpoint was rejected that
way).

So the bound of an fp32 artifact follows the *fp32 noise* of each input: the largest
error, against the exact answer, of four fp32 evaluations in PyTorch (the unfused model,
the BN-folded one, and each with its weights perturbed by half a unit of fp32 rounding).
One evaluation is not enough: on an ill-conditioned input one fp32 rounding can land 50x
closer to the exact answer than another (measured: a realistic M5, noise-0: unfused fp32
3.8e-6, folded fp32 1.9e-4), and a correct artifact is then judged against luck. An
artifact's error on each input may be at most ``noise_factor`` x that noise, plus
``noise_floor``. Reduced-precision classes keep fixed bounds, also measured against the
exact answer. ``benchmarks/parity_noise.py`` measures the factor (README, "Parity").
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .cpufeatures import host_cpu
from .description import ModelDescription
from .errors import BadInputError, EvitError, first_line, is_out_of_memory, out_of_memory
from .preprocess import to_input
from .samples import SampleImage, sample_inputs


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one precision class; errors are relative to the output scale (the
    exact answer's largest magnitude) and measured against the exact answer.

    Either ``noise_factor`` (fp32: error on each input <= noise_factor x the fp32 noise of
    that input + ``noise_floor``) or ``max_rel`` (a fixed bound) applies.
    ``top1`` says on which inputs the arg-max must agree with the exact answer's ("all",
    "photos" or "none"); inputs whose exact top-1 and top-2 are closer than twice the
    artifact's error on that input are near-ties, whose order is not checked.
    ``max_gain_error`` bounds how far from 1 the gain may be: the least-squares scale of the
    artifact's output on the exact answer's. Rounding noise, however large on an
    ill-conditioned model, leaves the gain near 1; a wrong quantization scale or weight
    scales the output and moves it.
    ``judged`` says which inputs the error, cosine and gain bounds apply to: "all", or "images"
    (the photos and the user's images, not the seeded noise). int8 artifacts are judged
    on images: their activation ranges are calibrated on natural images, and white noise
    lies outside them by construction (every figure is still reported).
    """

    min_cosine: float
    top1: str = "all"
    max_rel: float | None = None
    noise_factor: float | None = None
    noise_floor: float = 0.0
    judged: str = "all"
    max_gain_error: float | None = None

    def judges(self, kind: str) -> bool:
        return self.judged == "all" or kind in ("photo", "user")

    def limits(self, noise: np.ndarray) -> np.ndarray:
        """The bound on the artifact's relative error for each input, given the fp32 noise
        (relative error) of each."""
        if self.max_rel is not None:
            return np.full(len(noise), self.max_rel)
        return self.noise_factor * np.asarray(noise) + self.noise_floor

    def describe(self) -> str:
        bound = (f"max rel {self.max_rel:g}" if self.max_rel is not None else
                 f"error <= {self.noise_factor:g} x fp32 noise + {self.noise_floor:g}")
        on = "" if self.judged == "all" else f" on {self.judged}"
        gain = "" if self.max_gain_error is None else f", gain 1 ± {self.max_gain_error:g}"
        return f"{bound}, cosine >= {self.min_cosine}{gain}{on}, top-1 on {self.top1}"

    def override(self, **changes) -> "Tolerance":
        changes = {k: v for k, v in changes.items() if v is not None}
        if "max_rel" in changes:              # a fixed bound replaces the relative one
            changes.setdefault("noise_factor", None)
        return replace(self, **changes)


#: Measured with benchmarks/parity_noise.py (M0-M5, three seeds of realistic weights,
#: exported to ONNX, Core ML fp32 and TVM: 54 artifacts x 8 inputs; README "Parity"): no
#: correct fp32 artifact was further from the exact answer than 2.24 x its input's fp32
#: noise. The bound allows twice that, rounded up.
NOISE_FACTOR_MEASURED = 2.24
NOISE_FACTOR = 5.0
#: For an input on which every fp32 evaluation happens to be nearly exact: about 8 units
#: of fp32 rounding of the output scale (the smallest noise measured was 4.9e-7).
NOISE_FLOOR = 1e-6

#: The fixed fp32 bound used when no exact answer can be computed (a custom model that
#: does not run in float64): PyTorch's fp32 answer is then the judge.
LEGACY_FP32_MAX_REL = 1e-4

TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.99999, top1="all", noise_factor=NOISE_FACTOR,
                      noise_floor=NOISE_FLOOR),
    # fp16 arithmetic keeps ~3 significant digits; through ~40 layers errors of a few
    # percent of the logit range are normal, but predictions on real photos must hold.
    "fp16": Tolerance(min_cosine=0.999, top1="photos", max_rel=5e-2),
    # Palettised / int8 weights: a lossy compression whose quality is what is measured.
    "compressed": Tolerance(min_cosine=0.98, top1="none", max_rel=0.25),
    # int8 (calibrated activations and weights), judged on the photos and the user's images:
    # benchmarks/precision_error.py measured correct int8 exports of M0-M5 with realistic
    # weights through every int8 target (ONNX, Core ML W8A8, OpenVINO, LiteRT, ExecuTorch;
    # default calibration): M0-M4 at most 0.070 of the output scale from the exact answer,
    # the ill-conditioned M5 up to 0.243, cosine >= 0.960, gain within 1 +- 0.094 (M5;
    # M0-M4 +- 0.046), two photos of M5 changing class. The bounds allow about twice that.
    # A fixed error bound loose enough for M5 lets a scale error through on the others,
    # so the gain bound is what catches a wrong scale; what int8 costs in predictions is
    # for `evit-deploy eval` and its build gates to judge.
    "int8": Tolerance(min_cosine=0.9, top1="none", max_rel=0.5, max_gain_error=0.2, judged="images"),
    # bf16 (8 bits of mantissa): the folded model entirely in bfloat16 in PyTorch, the most
    # a bf16 backend rounds, was 0.007-0.010 of the output scale away on M0-M4 and 0.137
    # (cosine 0.988) on the ill-conditioned realistic M5; one photo of M3 changed class.
    "bf16": Tolerance(min_cosine=0.97, top1="none", max_rel=0.3),
}


@dataclass
class OutputMetrics:
    """How far one output is from the exact answer, beside the fp32 noise of the inputs."""

    name: str
    scale: float                      # the exact answer's largest magnitude
    max_abs: float                    # the artifact's largest absolute error (on judged inputs)
    max_rel: float                    # ... relative to the scale (the worst input's)
    min_cosine: float                 # on judged inputs (Tolerance.judged)
    gain_error: float | None = None       # the largest |gain - 1| on judged inputs
    noise_rel: float | None = None        # the fp32 noise (relative error) of the worst input
    ratio: float | None = None            # the artifact's error / noise_rel on the worst input
    limit: float | None = None            # the bound on the worst input
    worst_input: str | None = None        # the input closest to (or furthest past) its bound
    top1_agree: int | None = None
    top1_checked: int | None = None
    top1_ties: int | None = None
    top5_overlap: float | None = None
    per_input: list[dict] = field(default_factory=list)   # input, artifact, fp32_noise, limit
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
    exact_answer: str = "float64"         # how the exact answer was computed
    extra: dict = field(default_factory=dict)
    cpu: dict | None = None               # the CPU it was checked on (model, features)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[str]:
        return [f"{o.name}: {f}" for o in self.outputs for f in o.failures]

    def summary(self) -> str:
        if self.passed:
            worst = max(self.outputs, key=lambda o: o.max_rel)
            closest = max(self.outputs, key=lambda o: max((r["artifact"] / r["limit"] for r in o.per_input
                                                            if r["limit"] > 0), default=0.0))
            bound = (f"; closest to its bound: '{closest.worst_input}' at {closest.ratio:.2f} x its fp32 noise"
                     if self.tolerance.max_rel is None and closest.ratio is not None else "")
            return (f"parity ok ({self.precision}, {self.runtime}): max error {worst.max_rel:.2e} of "
                    f"output scale against the exact answer{bound}, "
                    f"cosine >= {min(o.min_cosine for o in self.outputs):.6f}")
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

def reference_outputs(reference, x: np.ndarray, *, exact: bool = False) -> dict[str, np.ndarray]:
    """Outputs of the PyTorch reference on normalised inputs ``x``, by output position: in
    fp32, or with ``exact`` in float64 (a copy of the model; ``x`` as it is, since an
    artifact cannot know its input better than its float32 bits)."""
    import torch

    model, dtype = (copy.deepcopy(reference).double(), torch.float64) if exact else (reference, torch.float32)
    results: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(x), 8):
            out = model(torch.from_numpy(x[start:start + 8]).to(dtype))
            out = out if isinstance(out, (tuple, list)) else (out,)
            results.append([o.detach().numpy().astype(np.float64 if exact else np.float32) for o in out])
    return {str(i): np.concatenate([r[i] for r in results]) for i in range(len(results[0]))}


def perturbed(model, seed: int):
    """A copy of ``model`` whose parameters are moved by up to half a unit of fp32 rounding
    (seeded): another fp32 evaluation of the same function."""
    import torch

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.mul_(1 + 2.0 ** -24 * (torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1))
    return model


def fp32_evaluations(reference) -> list:
    """The fp32 models whose spread around the exact answer is the fp32 noise: the
    reference, its BN-folded form (what artifacts compute), and both perturbed."""
    from .models.fuse import fuse

    folded = fuse(copy.deepcopy(reference)).eval()
    return [reference, folded, perturbed(reference, 1), perturbed(folded, 2)]


def exact_and_noise(reference, x: np.ndarray) -> tuple[dict, list[dict], str]:
    """(exact answer, the fp32 evaluations' answers, how the exact one was made). A model
    that cannot run in float64 falls back to its fp32 answer as the judge."""
    fp32 = [reference_outputs(model, x) for model in fp32_evaluations(reference)]
    try:
        return reference_outputs(reference, x, exact=True), fp32, "float64"
    except Exception as exc:  # a custom module with float32-only code
        return fp32[0], fp32, f"float32 (float64 failed: {type(exc).__name__})"


# -- comparing -----------------------------------------------------------------------------

def _per_input_max(err: np.ndarray) -> np.ndarray:
    return err.reshape(len(err), -1).max(axis=1)


def compare_output(name: str, exact: np.ndarray, fp32: list[np.ndarray], out: np.ndarray, inputs: list[SampleImage],
                   tolerance: Tolerance, classify: bool) -> tuple[OutputMetrics, list[tuple]]:
    """Judge one output: ``exact`` is the exact answer, ``fp32`` the fp32 evaluations'
    answers (their largest distance to it, per input, is the fp32 noise)."""
    exact = exact.astype(np.float64)
    out = out.astype(np.float64)
    if exact.shape != out.shape:
        m = OutputMetrics(name, float("nan"), float("nan"), float("nan"), float("nan"))
        m.failures.append(f"shape {out.shape} differs from the reference's {exact.shape}")
        return m, []
    scale = float(np.abs(exact).max()) or 1.0
    err = np.abs(out - exact)
    finite = bool(np.isfinite(out).all())
    artifact_rel = _per_input_max(err) / scale if finite else np.full(len(out), np.inf)
    noise_rel = np.max([_per_input_max(np.abs(f.astype(np.float64) - exact)) for f in fp32], axis=0) / scale
    limits = tolerance.limits(noise_rel)
    judged = np.array([tolerance.judges(p.kind) for p in inputs])
    if not judged.any():
        raise BadInputError(f"the tolerance judges {tolerance.judged} only, and there are none among the inputs")
    worst = int(np.argmax(np.where(judged, artifact_rel / limits, -np.inf)))
    flat_r, flat_o = exact.reshape(len(exact), -1), out.reshape(len(out), -1)
    dot = (flat_r * flat_o).sum(1)
    denom = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_o, axis=1)
    cos = np.nan_to_num(np.where(denom > 0, dot / np.maximum(denom, 1e-300), 1.0), nan=-1)
    # The least-squares scale of the artifact's output on the exact one: rounding noise
    # leaves it near 1 however large the noise, a wrong scale or weight moves it.
    energy = (flat_r * flat_r).sum(1)
    gain = np.nan_to_num(np.where(energy > 0, dot / np.maximum(energy, 1e-300), 1.0), nan=np.inf)
    metrics = OutputMetrics(
        name, scale, float(err[judged].max()) if finite else float("inf"), float(artifact_rel[judged].max()),
        float(cos[judged].min()), gain_error=float(np.abs(gain[judged] - 1).max()), noise_rel=float(noise_rel[worst]),
        ratio=float(artifact_rel[worst] / noise_rel[worst]) if noise_rel[worst] > 0 else None,
        limit=float(limits[worst]), worst_input=inputs[worst].name,
        per_input=[{"input": p.name, "artifact": float(a), "fp32_noise": float(r), "limit": float(lim),
                    "cosine": float(c), "gain": float(g), "judged": bool(j)}
                   for p, a, r, lim, c, g, j in zip(inputs, artifact_rel, noise_rel, limits, cos, gain, judged)])
    if not artifact_rel[worst] <= limits[worst]:
        against = (f" ({metrics.ratio:.3g} x its fp32 noise {metrics.noise_rel:.2g})"
                   if tolerance.max_rel is None and metrics.ratio is not None else "")
        metrics.failures.append(f"max error {artifact_rel[worst]:.3g} of output scale on '{metrics.worst_input}'"
                                f"{against} > {limits[worst]:.3g}")
    if not metrics.min_cosine >= tolerance.min_cosine:
        metrics.failures.append(f"cosine similarity {metrics.min_cosine:.6f} < {tolerance.min_cosine}")
    if tolerance.max_gain_error is not None and not metrics.gain_error <= tolerance.max_gain_error:
        metrics.failures.append(f"gain {1 + metrics.gain_error:.3g} (the output's least-squares scale on the exact "
                                f"answer) is more than {tolerance.max_gain_error:g} away from 1")
    per_input = []
    if classify:
        order_r = np.argsort(-exact, axis=1)
        order_o = np.argsort(-out, axis=1)
        margin = exact[np.arange(len(exact)), order_r[:, 0]] - exact[np.arange(len(exact)), order_r[:, 1]]
        # A swap of two classes closer than the artifact's own error on that input is
        # not evidence of a wrong artifact (that error is judged above).
        tie = margin <= 2 * _per_input_max(err)
        kinds = [p.kind for p in inputs]
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
        per_input = [(int(order_r[i, 0]), int(order_o[i, 0]), float(margin[i])) for i in range(len(exact))]
    return metrics, per_input


def compare(exact: dict[str, np.ndarray], fp32: list[dict[str, np.ndarray]], outputs: dict[str, np.ndarray],
            description: ModelDescription, inputs: list[SampleImage],
            tolerance: Tolerance) -> tuple[list[OutputMetrics], list[InputResult]]:
    labels = description.labels
    results = [InputResult(p.name, p.kind) for p in inputs]
    metrics = []
    for i, spec in enumerate(description.outputs):
        ref = exact[str(i)]
        classify = labels is not None and ref.ndim == 2 and ref.shape[1] == len(labels) and ref.shape[1] > 1
        m, per_input = compare_output(spec.name, ref, [f[str(i)] for f in fp32], outputs[spec.name], inputs,
                                      tolerance, classify)
        metrics.append(m)
        for res, (r, o, margin) in zip(results, per_input):
            res.reference_top1, res.artifact_top1, res.margin = r, o, margin
            res.reference_label, res.artifact_label = labels[r], labels[o]
    return metrics, results


def precision_of(description: ModelDescription) -> str:
    """The precision class an artifact was exported in (fp32 for artifacts that predate it)."""
    return description.extra.get("precision", "fp32")


def default_tolerance(of: ModelDescription | str) -> Tolerance:
    """The tolerance a parity check applies by default to an artifact (its description) or
    a precision class; overrides go on top (:meth:`Tolerance.override`)."""
    precision = of if isinstance(of, str) else precision_of(of)
    if precision not in TOLERANCES:
        raise BadInputError(f"no default tolerance for precision '{precision}'; pass one explicitly")
    return TOLERANCES[precision]


def verify_outputs(*, target, path, description: ModelDescription, reference, artifact: str,
                   precision: str | None = None, tolerance: Tolerance | None = None,
                   images_dir=None, noise: int = 4, seed: int = 0) -> ParityReport:
    """Run an artifact and its reference on the parity inputs and judge the difference."""
    precision = precision or precision_of(description)
    tolerance = tolerance or default_tolerance(precision)
    inputs = sample_inputs(description.preprocessing, images_dir=images_dir, noise=noise, seed=seed)
    images = np.stack([p.image for p in inputs])
    exact, fp32, how = exact_and_noise(reference, to_input(images, description.preprocessing, "normalized"))
    if how != "float64" and tolerance.max_rel is None:
        tolerance = tolerance.override(max_rel=LEGACY_FP32_MAX_REL)
    x = to_input(images, description.preprocessing, description.input_format)
    try:
        out = {k: np.asarray(v, np.float32) for k, v in target.run_batched(path, x, description).items()}
        missing = [o.name for o in description.outputs if o.name not in out]
        if missing:
            raise ValueError(f"it does not produce the outputs its description lists: {missing}")
        metrics, per_input = compare(exact, fp32, out, description, inputs, tolerance)
    except EvitError:
        raise
    except Exception as exc:  # an artifact that cannot even run fails parity
        if is_out_of_memory(exc):                # ... unless it is this machine that cannot
            shape = "x".join(map(str, description.input.shape))
            raise out_of_memory(exc, f"running {os.path.basename(str(artifact))} (input {shape})") from exc
        failed = OutputMetrics("(run)", float("nan"), float("nan"), float("nan"), float("nan"))
        failed.failures.append(f"the artifact failed to run: {first_line(exc)}")
        metrics, per_input = [failed], [InputResult(p.name, p.kind) for p in inputs]
    report = ParityReport(artifact=str(artifact), target=target.name, runtime=target.runtime_name(path),
                          precision=precision, tolerance=tolerance, outputs=metrics, inputs=per_input,
                          model=description.model, weights=description.weights, exact_answer=how, cpu=host_cpu())
    report.extra.update(target.parity_extras(path))
    return report

