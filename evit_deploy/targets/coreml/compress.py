"""Weight compression with ``coremltools.optimize.coreml``: palettisation and int8.

Palettisation uses k-means lookup tables computed here: coremltools' own k-means needs
scikit-learn and is not reproducible across runs, while an export must give the same
bytes every time. The 1-D k-means below is exact Lloyd iteration over the distinct weight
values, started from evenly spaced quantiles, so it is deterministic and fast.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .quiet_import import coremltools

MODES = ("none", "palettize8", "palettize6", "palettize4", "int8")
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
