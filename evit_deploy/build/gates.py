"""Eval gates: a verified artifact evaluated over the build's eval images, and moved aside
when it loses more than its entry allows (see :mod:`evit_deploy.evaluation`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..fsutil import publish, remove, write_json_atomic
from ..progress import Reporter
from ..targets import get_target
from .schema import ArtifactEntry, BuildFile


def judge_gates(spec: BuildFile, art: ArtifactEntry, artifact, reference, reporter: Reporter) -> dict:
    """The eval figures of ``artifact``, its gates, and the ones it fails (``failures``)."""
    from ..evaluation import Evaluated, eval_images, evaluate

    images = eval_images(spec.eval_images, spec.eval_labels)
    target = get_target(artifact.target)
    result = evaluate([Evaluated(artifact.path, target, artifact.description, reference)], images, reporter=reporter)
    found = dataclasses.asdict(result.records[0])
    failures = []
    if "min_top1_agreement" in art.gates and found["top1_agreement"] < art.gates["min_top1_agreement"]:
        failures.append(f"top-1 agreement {found['top1_agreement']:.4f} < min_top1_agreement "
                        f"{art.gates['min_top1_agreement']:g} on {found['images']} images")
    if "max_top1_drop" in art.gates and found["top1_drop"] > art.gates["max_top1_drop"]:
        failures.append(f"top-1 accuracy drop {found['top1_drop']:.4f} > max_top1_drop "
                        f"{art.gates['max_top1_drop']:g} on {found['images']} images")
    found.pop("artifact")
    return {**found, **result.images.to_dict(), "gates": art.gates, "failures": failures,
            "passed": not failures}


def reject(artifact, report: dict) -> Path:
    """Move a published artifact that failed its gates to ``<name>.rejected/``, with the
    eval report: nothing that failed stays under a final name."""
    rejected = artifact.path.with_name(f"{artifact.path.name}.rejected")
    remove(rejected)
    staging = rejected.with_name(f".{rejected.name}.tmp")
    remove(staging)
    staging.mkdir()
    for f in artifact.files:
        os.replace(f, staging / f.name)
    write_json_atomic(staging / "eval-report.json", report)
    publish(staging, rejected)
    return rejected
