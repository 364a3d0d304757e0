"""The Core ML target's reduced precisions, as coremltools pass pipelines given to the
final ``ct.convert``: W8A8 (``--precision int8``) and weight-only compression
(``--compress``). One module: both are a choice of passes over the same converted MIL
program and exclude each other (:func:`.convert.check_options`).

W8A8 ML programs: int8 activations and int8 weights (iOS 17 ``quantize``/``dequantize``).
coremltools' ``linear_quantize_activations`` measures activation ranges by running the
model with ``MLModel.predict``, which exists only on macOS. The ranges here are measured
by the reference executor instead, on the very program that is being quantized (saved
once without quantization), so an export works the same way on Linux and macOS.
Everything else is coremltools' own: the graph passes that
``linear_quantize_activations`` runs (``insert_prefix_quantize_dequantize_pair`` before
convolutions, linear layers, pooling and additions; ``insert_suffix_quantize_dequantize_pair``
after them; duplicate pairs removed), fed with those ranges, then
``linear_quantize_weights`` (int8, symmetric, per output channel).

Weight compression (``coremltools.optimize.coreml``): palettisation and int8 weights with
fp16 activations. Palettisation uses k-means lookup tables computed here: coremltools' own
k-means needs scikit-learn and is not reproducible across runs, while an export must give
the same bytes every time. The 1-D k-means below is exact Lloyd iteration over the
distinct weight values, started from evenly spaced quantiles, so it is deterministic and
fast.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from ...calibration import CalibrationSet
from . import package
from .quiet_import import coremltools

PREFIX_PASS = "compression::insert_prefix_quantize_dequantize_pair"
SUFFIX_PASS = "compression::insert_suffix_quantize_dequantize_pair"
WEIGHTS_PASS = "compression::linear_quantize_weights"
NEEDS = "iOS17"         # quantize / dequantize are iOS 17 ops


def activation_ranges(program, batches, input_name: str) -> dict[str, dict[str, float]]:
    """{variable: {"rmin", "rmax"}} over ``batches`` for the program's input and every
    float tensor an op produces, in the form coremltools' passes read."""
    ranges: dict[str, list[float]] = {}

    def observe(name: str, value) -> None:
        value = np.asarray(value) if not isinstance(value, (dict, list)) else None
        if value is None or value.dtype.kind != "f" or not value.size:
            return
        low, high = float(value.min()), float(value.max())
        seen = ranges.setdefault(name, [low, high])
        seen[0], seen[1] = min(seen[0], low), max(seen[1], high)

    for x in batches:
        x = np.asarray(x, np.float32)
        observe(input_name, x)
        program.run({input_name: x}, observe=observe)
    return {name: {"rmin": low, "rmax": high} for name, (low, high) in ranges.items()}


def share_concat_ranges(spec, ranges: dict[str, dict[str, float]]) -> None:
    """The inputs and output of a ``concat`` get one common range, as
    ``linear_quantize_activations`` does, so a quantized concat needs no requantization."""
    function = spec.mlProgram.functions["main"]
    groups: list[set[str]] = []
    for op in function.block_specializations[function.opset].operations:
        if op.type != "concat":
            continue
        names = {a.name for a in op.inputs["values"].arguments if a.name} | {o.name for o in op.outputs}
        for group in [g for g in groups if g & names]:
            names |= group
            groups.remove(group)
        groups.append(names)
    for group in groups:
        present = [ranges[n] for n in group if n in ranges]
        if not present:
            continue
        common = {"rmin": min(r["rmin"] for r in present), "rmax": max(r["rmax"] for r in present)}
        for name in group:
            if name in ranges:
                ranges[name] = dict(common)


def measure_ranges(mil, *, target, calibration: CalibrationSet, description) -> dict:
    """Activation ranges of the (unquantized) MIL program ``mil``, measured by the reference
    executor on the calibration images in the input format the package takes. ``mil`` is
    used up: the converter edits the program it is given."""
    from .reference import Program

    ct = coremltools()
    with tempfile.TemporaryDirectory(prefix="evit-coreml-calibrate-") as tmp:
        with contextlib.redirect_stderr(io.StringIO()):
            float_model = ct.convert(mil, convert_to="mlprogram", minimum_deployment_target=target,
                                     compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline.EMPTY,
                                     skip_model_load=True)
        spec = float_model.get_spec()
        weights = Path(float_model.weights_dir) / package.WEIGHT_FILE
        path = package.write_package(Path(tmp) / "float.mlpackage", spec, weights if weights.is_file() else None)
        program = Program(path)
        batches = calibration.batches(description.preprocessing, description.input_format, description.batch)
        ranges = activation_ranges(program, batches, description.input.name)
    share_concat_ranges(spec, ranges)
    return ranges


def w8a8_pipeline(ranges: dict):
    """coremltools' activation and weight quantization passes, configured for W8A8."""
    ct = coremltools()
    import coremltools.optimize.coreml as cto

    activations = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_tensor"))
    weights = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel"))
    pipeline = ct.PassPipeline(pass_names=[PREFIX_PASS, SUFFIX_PASS, "common::dequantize_quantize_pair_elimination",
                                           WEIGHTS_PASS, "common::dead_code_elimination"],
                               pipeline_name="evit-deploy w8a8")
    pipeline.set_options(PREFIX_PASS, {"config": activations, "activation_stats": ranges})
    pipeline.set_options(SUFFIX_PASS, {"config": activations, "activation_stats": ranges})
    pipeline.set_options(WEIGHTS_PASS, {"config": weights})
    return pipeline


# -- weight-only compression --------------------------------------------------------------

COMPRESS_MODES = ("none", "palettize8", "palettize6", "palettize4", "int8")
_ITERATIONS = 50


def kmeans_lut(weight: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``2**nbits``-entry lookup table for ``weight`` and each element's index into it."""
    flat = np.asarray(weight).reshape(-1).astype(np.float64)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    size = 1 << nbits
    cumulative = np.cumsum(counts) / counts.sum()
    start = np.searchsorted(cumulative, (np.arange(size) + 0.5) / size)
    centroids = np.unique(values[np.minimum(start, len(values) - 1)])
    for _ in range(_ITERATIONS):
        cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        total = np.bincount(cluster, weights=values * counts, minlength=len(centroids))
        members = np.bincount(cluster, weights=counts, minlength=len(centroids))
        updated = np.where(members > 0, total / np.maximum(members, 1), centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = np.sort(updated)
    cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    # Fewer distinct values than entries: the unused entries repeat the last centroid.
    lut = np.concatenate([centroids, np.full(size - len(centroids), centroids[-1])])
    return lut.astype(weight.dtype), cluster[inverse].astype(np.uint8)


def compression_pipeline(mode: str):
    """The coremltools pass pipeline that compresses a MIL program's weights, or None."""
    if mode == "none":
        return None
    ct = coremltools()
    import coremltools.optimize.coreml as cto

    if mode.startswith("palettize"):
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            mode="custom", lut_function=partial(kmeans_lut, nbits=int(mode[len("palettize"):]))))
        pass_name = "compression::palettize_weights"
    elif mode == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"))
        pass_name = "compression::linear_quantize_weights"
    else:
        raise ValueError(f"unknown compression mode {mode!r}")
    pipeline = ct.PassPipeline(pass_names=[pass_name, "common::dead_code_elimination"],
                               pipeline_name=f"evit-deploy {mode}")
    pipeline.set_options(pass_name, {"config": config})
    return pipeline
