"""What an artifact is made from, as one hash: equal keys mean a rebuild would be redundant."""

from __future__ import annotations

import hashlib
import json

from ..fsutil import sha256_file, tree_sha256
from .schema import ArtifactEntry, BuildFile, ModelEntry


def inputs_key(model: ModelEntry, art: ArtifactEntry, build: BuildFile, weights_id: str, versions: dict) -> str:
    # The files and directories that options declared as paths name count by content.
    files = {key: tree_sha256(path) for key, path in art.paths.items() if path.exists()}
    # "profile": the device's earlier name, kept so that an upgrade does not rebuild everything.
    record = {"model": model.name, "model_options": model.options, "weights": weights_id,
              "target": art.target, "profile": art.device, "options": art.options, "files": files,
              "batch": art.batch, "dynamic_batch": art.dynamic_batch, "seed": build.seed,
              "images": tree_sha256(build.images) if build.images else None, "versions": versions}
    if art.gates:
        record["gates"] = art.gates
        record["eval"] = [tree_sha256(p) if p else None for p in (build.eval_images, build.eval_labels)]
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def weights_id(model: ModelEntry, seed: int) -> str:
    """The checkpoint's SHA-256, or ``random-init:SEED`` for seeded synthetic weights."""
    if model.weights is None:
        return f"random-init:{seed}"
    if model.weights == "official":
        from ..models.checkpoint import official_weights_path
        from ..models.registry import resolve_name
        return sha256_file(official_weights_path(resolve_name(model.name)))
    return sha256_file(model.weights)
