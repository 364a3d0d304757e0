"""What the scripts in ``benchmarks/`` share: realistic checkpoints, held-out images,
agreement figures and their JSON output. Not used by the commands."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np


def parser(doc: str | None, *, models=("m0", "m4")) -> argparse.ArgumentParser:
    """An argument parser with the arguments every benchmark takes: models and ``--json``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(models))
    p.add_argument("--json", type=Path, help="write the results to FILE")
    return p


def quiet() -> None:
    """Converters' deprecation notices are not what a benchmark reports."""
    warnings.filterwarnings("ignore")


def write_json(path: Path | None, data) -> None:
    if path is not None:
        from .fsutil import write_text_atomic
        write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def realistic_checkpoint(model: str, seed: int, path: Path) -> Path:
    """A checkpoint of ``model`` with realistic synthetic weights
    (:func:`~evit_deploy.models.synthetic.realistic_weights`)."""
    import torch

    from .models import create_model
    from .models.synthetic import realistic_weights

    torch.save({"model": realistic_weights(create_model(model), seed).state_dict()}, path)
    return path


def held_out_images(spec, count: int = 64, input_format: str = "normalized") -> np.ndarray:
    """``count`` seeded crops of the bundled photos, with other seeds than calibration's."""
    from .calibration import _default_set
    from .preprocess import to_input

    images = _default_set(spec, seed=1).images
    while len(images) < count:
        images = np.concatenate([images, _default_set(spec, seed=len(images)).images])
    return to_input(images[:count], spec, input_format)


def agreement(out: np.ndarray, ref: np.ndarray) -> dict:
    """Top-1 agreement, top-5 overlap, lowest cosine and largest error (relative to the
    reference's scale) of logits ``out`` against ``ref``."""
    cosine = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    top5 = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(out, ref)]
    return {"top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "top5_overlap": float(np.mean(top5)),
            "min_cosine": float(cosine.min()), "max_rel_error": float(np.abs(out - ref).max() / np.abs(ref).max())}


def batched(run, x: np.ndarray, batch: int) -> np.ndarray:
    """``run`` (one batch -> logits) over ``x`` in batches."""
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(function) -> None:
    """Run a benchmark's ``main`` and exit with its status."""
    sys.exit(function())
