"""Tuning databases: MetaSchedule's JSON records plus what they were made for.

A database is a directory::

    evit-tuning.json               target, TVM version, graph pipeline, and per model/input
                                   shape: tasks, trials, time, estimated latency, runs
    database_workload.json         MetaSchedule's JSON database: one kernel per line
    database_tuning_record.json    one measured schedule per line
    logs/                          one log per tuning run

One directory holds one target; several models (and input shapes) can share it. The
records are appended a line at a time, so a run stopped by Ctrl-C or a crash leaves every
finished line behind; the metadata file is replaced atomically.

Two ways in. ``tune`` opens a database for writing (:meth:`TuningDatabase.open_or_create`):
a last line cut short by a crash is dropped from the file, and MetaSchedule appends to
the files. Everything else reads it (:meth:`TuningDatabase.open`): once, into memory,
ignoring a cut-short last line and changing no byte of the directory, so that planning
an export (which asks the database for its target, its batch and its records) leaves it
as it found it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import BadInputError
from ...fsutil import exclusive_lock, write_json_atomic, write_text_atomic
from ..sessions import files_key
from .target_string import to_classic

META_FILE = "evit-tuning.json"
#: Held (flock) by the one ``tune`` writing the database.
LOCK_FILE = ".evit-tuning.lock"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
FORMAT = "evit-deploy-tvm-tuning/1"


def versions() -> dict:
    import tvm
    import tvm_ffi

    from ... import __version__
    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__, "evit_deploy": __version__}


def model_key(model: str, input_shape, precision: str = "fp32") -> str:
    """How a database names a model's tuning runs: ``efficientvit_m4 16x3x224x224`` (and
    `` bf16`` after it for the bf16 kernels, which are others)."""
    key = f"{model} {'x'.join(str(d) for d in input_shape)}"
    return key if precision == "fp32" else f"{key} {precision}"


@dataclass
class TuningDatabase:
    path: Path
    meta: dict
    #: Read-only: the record files' intact lines as read when opened (file name -> text).
    #: None: open for tuning, MetaSchedule reads and appends to the files themselves.
    snapshot: dict[str, str] | None = None
    #: Open for tuning: the lock file this process holds (:func:`_hold`).
    lock: object | None = None

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, path, target: dict, *, graph: str) -> "TuningDatabase":
        """The database at ``path`` for ``target``, created if the directory is new or
        empty; refuses one made for another target."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BadInputError(f"tuning database {path} exists and is not a directory")
        if (path / META_FILE).is_file():
            db = cls(path, _read_meta(path))
            db.check_target(target)
            db.lock = _hold(path)
            db.repair()
            return db
        if path.is_dir() and any(path.iterdir()):
            raise BadInputError(f"{path} is not empty and is not an evit-deploy tuning database "
                                f"(no {META_FILE}); choose a new directory with --db")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create the tuning database {path}: {exc.strerror}") from None
        meta = {"format": FORMAT, "target": target, "target_string": to_classic(target), "graph": graph,
                "created": _now(), "versions": versions(), "models": {}}
        db = cls(path, meta)
        db.save_meta()
        db.lock = _hold(path)
        return db

    def close(self) -> None:
        """Let another ``tune`` write the database (the OS does it too when the process ends)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @classmethod
    def open(cls, path) -> "TuningDatabase":
        """An existing database, read-only (for export, or to start a tune from): its files
        are read once, here, and never written; a last line cut short by a crash is left
        out (``tune`` drops it from the file)."""
        path = Path(path)
        meta = _read_meta(path)
        snapshot = {name: "".join(line + "\n" for line in lines) for name, (_, lines, _) in _intact(path).items()}
        return cls(path, meta, snapshot)

    # -- what it was made for -----------------------------------------------------------------
    @property
    def target(self) -> dict:
        return self.meta["target"]

    def check_target(self, target: dict, *, allow_mismatch: bool = False) -> bool:
        """Refuse (or, with ``allow_mismatch``, report) a database made for another target.

        Returns whether the targets are the same.
        """
        if dict(self.target) == dict(target):
            return True
        if allow_mismatch:
            return False
        raise BadInputError(
            f"tuning database {self.path} was made for TVM target '{to_classic(self.target)}', not "
            f"'{to_classic(target)}': its schedules are tuned for another CPU or thread count. Tune for "
            f"this target, pass --tvm-target '{to_classic(self.target)}', or force it with --db-any-target")

    def version_mismatch(self) -> str | None:
        made = self.meta.get("versions", {}).get("tvm")
        now = versions()["tvm"]
        return None if made in (None, now) else f"tuning database {self.path} was made with TVM {made}, this is {now}"

    def graph_mismatch(self, current: str) -> str | None:
        """Why the database's kernels may not be this evit-deploy's: :data:`graph.VERSION`
        names the graph pipeline, whose kernels are the database's keys."""
        made = self.meta.get("graph")
        if made in (None, current):
            return None
        return (f"tuning database {self.path} was made for graph pipeline '{made}', this evit-deploy prepares "
                f"'{current}' (kernels that changed have no record)")

    def models(self) -> dict:
        return self.meta.get("models", {})

    # -- MetaSchedule ---------------------------------------------------------------------------
    def ms_database(self):
        """The records as a MetaSchedule database: the files themselves when open for
        tuning (new records are appended to them), else the lines read when opened."""
        from tvm.s_tir.meta_schedule.database import JSONDatabase

        # MetaSchedule looks up the tensor intrinsics a record names as it reads it:
        # importing the schedules registers the fixed ones, the AMX ones (one per shape)
        # are registered from the names the records hold.
        from .schedules import amx_intrinsics

        file = self.path / RECORD_FILE
        records = self.snapshot[RECORD_FILE] if self.snapshot is not None else (
            file.read_text("utf-8", errors="replace") if file.is_file() else "")
        amx_intrinsics.register_named_in(records)
        if self.snapshot is None:
            return JSONDatabase(path_workload=str(self.path / WORKLOAD_FILE),
                                path_tuning_record=str(self.path / RECORD_FILE), allow_missing=True)
        # MetaSchedule reads JSON databases from files only, all of them when it opens
        # one: a private copy of the lines read, deleted once loaded.
        with tempfile.TemporaryDirectory(prefix="evit-tuning-") as tmp:
            for name, text in self.snapshot.items():
                (Path(tmp) / name).write_text(text, "utf-8")
            return JSONDatabase(path_workload=str(Path(tmp) / WORKLOAD_FILE),
                                path_tuning_record=str(Path(tmp) / RECORD_FILE), allow_missing=False)

    def record_count(self) -> int:
        if self.snapshot is not None:
            return self.snapshot[RECORD_FILE].count("\n")
        path = self.path / RECORD_FILE
        if not path.is_file():
            return 0
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())

    def repair(self) -> int:
        """Drop a last line cut short by a crash (MetaSchedule refuses to load it): what
        ``tune`` does before it appends to the files.

        Returns the number of lines dropped. A broken line that is not the last one is not
        a crash artefact: that is reported, not silently removed.
        """
        dropped = 0
        for name, (text, lines, cut) in _intact(self.path).items():
            if cut or not text.endswith("\n") and lines:
                dropped += cut
                write_text_atomic(self.path / name, "".join(line + "\n" for line in lines))
        return dropped

    def cut_short(self) -> Path | None:
        """A record file whose last line was cut short (an append that failed part-way),
        if any: MetaSchedule's appends report no error."""
        for name in (WORKLOAD_FILE, RECORD_FILE):
            path = self.path / name
            try:
                with path.open("rb") as f:
                    if f.seek(0, os.SEEK_END) == 0:
                        continue
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        return path
            except FileNotFoundError:
                continue
        return None

    # -- bookkeeping --------------------------------------------------------------------------
    def save_meta(self) -> None:
        write_json_atomic(self.path / META_FILE, self.meta)

    def update_model(self, key: str, **fields) -> dict:
        entry = self.meta.setdefault("models", {}).setdefault(key, {"runs": []})
        entry.update(fields)
        return entry

    def measured_on_cpus(self) -> set[str]:
        """The CPUs (model names) this database's schedules were measured on; empty when
        it does not know (runs measured over RPC, or made before this was recorded)."""
        return {run["cpu"]["model"] for entry in self.models().values() for run in entry.get("runs", [])
                if isinstance(run.get("cpu"), dict) and run["cpu"].get("model")}

    def add_run(self, key: str, run: dict) -> None:
        entry = self.update_model(key)
        entry.setdefault("runs", []).append(run)


def _hold(path: Path):
    """An exclusive lock on the database ``path`` for one ``tune``: MetaSchedule numbers
    kernels by their line in the workload file, so two runs appending at once would point
    records at the wrong kernels."""
    return exclusive_lock(path / LOCK_FILE, f"tuning database {path} is being written by another `evit-deploy "
                                            f"tune`: wait for it to finish, or tune into another --db")


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {META_FILE}"
        raise BadInputError(f"tuning database {path} {what}: make one with `evit-deploy tune`")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{meta_path} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("target"), dict):
        raise BadInputError(f"{meta_path} is not an evit-deploy tuning database (format {FORMAT})")
    meta.setdefault("models", {})
    return meta


def _intact(path: Path) -> dict[str, tuple[str, list[str], int]]:
    """For each record file of the database ``path``: its text, its intact lines, and how
    many were left out: a last line cut short (a crash, a full disk), and the records of a
    workload whose line was (MetaSchedule refuses records of a workload it does not have)."""
    found = {}
    for name in (WORKLOAD_FILE, RECORD_FILE):
        file = path / name
        text = file.read_text("utf-8", errors="replace") if file.is_file() else ""
        lines, cut = _intact_lines(file, text)
        found[name] = (text, [line for line in lines if line.strip()], cut)
    workloads = len(found[WORKLOAD_FILE][1])
    text, records, cut = found[RECORD_FILE]
    kept = [line for line in records if _workload_index(line) in range(workloads)]
    found[RECORD_FILE] = (text, kept, cut + len(records) - len(kept))
    return found


def _intact_lines(path: Path, text: str) -> tuple[list[str], int]:
    """The lines of a record file without a last line cut short by a crash, and how many
    were left out (0 or 1). Damage elsewhere is refused."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    bad = [i for i, line in enumerate(lines) if line.strip() and not _is_json(line)]
    if bad and bad != [len(lines) - 1]:
        raise BadInputError(f"tuning database file {path} is damaged at line {bad[0] + 1} "
                            f"(not a truncated last line); restore it or start a new database")
    if bad:
        lines.pop()
    return lines, len(bad)


def database_files(path) -> tuple[Path, ...]:
    path = Path(path)
    return tuple(path / name for name in (META_FILE, WORKLOAD_FILE, RECORD_FILE))


class ReadOnce:
    """Databases opened read-only, each read once while its files stay unchanged: planning
    one export asks for its database up to five times (options, batch, target, CPU needs,
    export)."""

    def __init__(self):
        self._opened: dict[str, tuple[tuple, TuningDatabase]] = {}

    def __call__(self, path) -> TuningDatabase:
        key = files_key(database_files(path))
        found = self._opened.get(str(Path(path).resolve()))
        if found is None or found[0] != key:
            found = self._opened[str(Path(path).resolve())] = (key, TuningDatabase.open(path))
        return found[1]


def _workload_index(record: str) -> int | None:
    """The workload a record line (``[index, ...]``, already checked to be JSON) is of."""
    found = _RECORD_START.match(record)
    return int(found.group(1)) if found else None


_RECORD_START = re.compile(r"\s*\[\s*(\d+)\s*,")


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def default_path(target: dict) -> Path:
    from .target_string import slug
    return Path("tvm-tuning") / slug(target)
