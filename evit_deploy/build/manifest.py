"""``manifest.json``: what a build made from what, read back to skip what is up to date.

Its format is read by other tools (CI scripts, artifact stores): a change to it is a new
:data:`MANIFEST_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from .. import __version__
from ..fsutil import deterministic_zip, tree_sha256, tree_size, write_json_atomic
from ..hostinfo import cpu_info
from .record import BuildRecord

MANIFEST = "manifest.json"
#: 2: ``verdict`` may be "incomplete", with the artifacts not built yet in ``pending``.
MANIFEST_VERSION = 2


def read_manifest(path: Path) -> dict[tuple[str, str], BuildRecord]:
    """The records of a previous build by (artifact, model); none if there is no readable one."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
        records = [BuildRecord.from_dict(r) for r in data.get("artifacts", [])]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return {}    # an unreadable manifest only means everything is rebuilt
    return {r.key: r for r in records}


def artifacts_sha256(records: Iterable[BuildRecord]) -> str:
    """What was shipped, independent of timings and status wording: its path and hash pairs."""
    shipped = sorted((f["path"], f["sha256"]) for r in records for f in r.files or [])
    return hashlib.sha256(json.dumps(shipped).encode()).hexdigest()


def manifest(build_file: Path, records: Iterable[BuildRecord], versions: dict, pending: Iterable[str] = ()) -> dict:
    """The manifest of ``records``; ``pending``: the artifacts ("name/model") the build has
    still to make (written after each artifact, so that a build stopped half-way, by
    Ctrl-C or a crash, says "incomplete" rather than passing on what it finished)."""
    body = sorted(records, key=lambda r: r.key)
    pending = sorted(pending)
    if any(r.status.failed for r in body):
        verdict = "fail"
    elif pending:
        verdict = "incomplete"
    else:
        verdict = "pass" if body else "fail"
    found = {"manifest_version": MANIFEST_VERSION, "evit_deploy": __version__, "build_file": str(build_file),
             "verdict": verdict, "artifacts_sha256": artifacts_sha256(body), "versions": versions,
             "host": cpu_info(), "artifacts": [r.to_dict() for r in body]}
    if pending:
        found["pending"] = pending
    return found


def write_manifest(path: Path, build_file: Path, records: Iterable[BuildRecord], versions: dict,
                   pending: Iterable[str] = ()) -> Path:
    return write_json_atomic(path, manifest(build_file, records, versions, pending))


def artifact_files(artifact, out_dir: Path) -> dict:
    """The manifest's facts about a published artifact's files (paths relative to ``out_dir``):
    ``path``, ``size``, ``sha256``, ``files`` and, for a directory, ``zip``."""
    # Hashed once each: the artifact itself is the last of its files.
    files = [{"path": f.relative_to(out_dir).as_posix(), "size": tree_size(f), "sha256": tree_sha256(f)}
             for f in artifact.files]
    main = files[-1]
    archive = artifact.path.with_name(artifact.path.name + ".zip")
    # The size is what an app ships: the artifact and the files it needs (an OpenVINO .bin,
    # a TVM description), not the zip that is the same package in another form.
    shipped = sum(record["size"] for f, record in zip(artifact.files, files) if f != archive)
    facts = {"path": main["path"], "size": shipped, "sha256": main["sha256"], "files": files}
    if artifact.path.is_dir():
        # Artifact stores want one file: a zip whose bytes depend only on the contents
        # (unless the target already wrote one beside the artifact).
        if archive not in artifact.sidecars:
            deterministic_zip(artifact.path, archive)
        facts["zip"] = {"path": archive.relative_to(out_dir).as_posix(), "size": archive.stat().st_size,
                        "sha256": tree_sha256(archive)}
    return facts


def files_intact(out_dir: Path, record: BuildRecord) -> bool:
    """Whether every file a record lists is still there with its recorded contents."""
    for f in record.files or []:
        p = out_dir / f["path"]
        if not p.exists() or tree_sha256(p) != f["sha256"]:
            return False
    return bool(record.files)
