"""The ``.mlpackage`` directory: finding its parts, writing it byte-reproducibly, zipping it.

A package is ``Manifest.json`` plus ``Data/``; the manifest names the root model file
(``com.apple.CoreML/model.mlmodel``, the protobuf spec) and the weights directory, each
under an item identifier. coremltools makes those identifiers random UUIDs; here they
are derived from the item's content, so the same model gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ...errors import BadInputError

MANIFEST = "Manifest.json"
DATA = "Data"
MODEL_FILE = "com.apple.CoreML/model.mlmodel"
WEIGHTS_DIR = "com.apple.CoreML/weights"
WEIGHT_FILE = "weight.bin"
MODEL_PATH_PREFIX = "@model_path/"      # how a program names files beside its spec

# Any fixed namespace works: it only has to be the same on every run.
_ID_NAMESPACE = uuid.UUID("6f0e4c1a-3b9d-5e2f-8a47-0c1d2e3f4a5b")


def model_file(package: Path) -> Path:
    """The spec file the manifest names as the package's root model."""
    package = Path(package)
    manifest = package / MANIFEST
    if not package.is_dir() or not manifest.is_file():
        raise BadInputError(f"{package} is not an .mlpackage (no {MANIFEST})")
    try:
        data = json.loads(manifest.read_text("utf-8"))
        item = data["itemInfoEntries"][data["rootModelIdentifier"]]
        relative = item["path"]
    except (ValueError, KeyError, TypeError):
        raise BadInputError(f"{manifest} is not a valid Core ML package manifest") from None
    return inside(package / DATA, relative, what=f"the model named by {manifest}")


def inside(root: Path, relative: str, *, what: str) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (packages are untrusted input)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise BadInputError(f"{what} ({relative}) points outside the package")
    return path


def resolve_program_file(spec_file: Path, file_name: str) -> Path:
    """The file a program's ``BlobFileValue`` names (``@model_path/weights/weight.bin``)."""
    if not file_name.startswith(MODEL_PATH_PREFIX):
        raise BadInputError(f"weight file '{file_name}' is not relative to the model (@model_path/)")
    return inside(spec_file.parent, file_name[len(MODEL_PATH_PREFIX):], what="a weight file")


def read_spec(package: Path):
    """The package's ``Model`` protobuf."""
    from .quiet_import import proto

    Model_pb2, _ = proto()
    path = model_file(package)
    if not path.is_file():
        raise BadInputError(f"{package}: the model file {path.name} is missing")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError
        raise BadInputError(f"{path} is not a Core ML model specification") from None
    return spec


def _item_id(kind: str, content: bytes) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, kind + hashlib.sha256(content).hexdigest())).upper()


def write_package(path: Path, spec, weight_file: Path | None) -> Path:
    """Write ``spec`` and its weight file as a package at ``path`` (a new directory).

    Protobuf maps (metadata, op attributes) are serialised in sorted order and files get
    fixed permissions, so the same spec and weights give the same bytes.
    """
    path = Path(path)
    model_bytes = spec.SerializeToString(deterministic=True)
    model_path = path / DATA / MODEL_FILE
    weights_path = path / DATA / WEIGHTS_DIR
    weights_path.mkdir(parents=True)
    model_path.write_bytes(model_bytes)
    weights_bytes = b""
    if weight_file is not None and Path(weight_file).is_file():
        shutil.copyfile(weight_file, weights_path / WEIGHT_FILE)
        weights_bytes = (weights_path / WEIGHT_FILE).read_bytes()
    model_id, weights_id = _item_id("model", model_bytes), _item_id("weights", weights_bytes)
    manifest = {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            model_id: {"author": "com.apple.CoreML", "description": "CoreML Model Specification",
                       "name": "model.mlmodel", "path": MODEL_FILE},
            weights_id: {"author": "com.apple.CoreML", "description": "CoreML Model Weights",
                         "name": "weights", "path": WEIGHTS_DIR},
        },
        "rootModelIdentifier": model_id,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", "utf-8")
    for item in [path, *path.rglob("*")]:
        os.chmod(item, 0o755 if item.is_dir() else 0o644)
    return path


def package_files(package: Path) -> list[Path]:
    """Every file of a package, in a fixed (sorted, relative-path) order."""
    package = Path(package)
    return sorted((p for p in package.rglob("*") if p.is_file()), key=lambda p: p.relative_to(package).as_posix())


def package_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in package_files(package))


def zip_package(package: Path, destination: Path) -> Path:
    """A deterministic zip of ``package`` (entries under ``<name>.mlpackage/``), written atomically."""
    from ...fsutil import deterministic_zip

    return deterministic_zip(package, destination)
