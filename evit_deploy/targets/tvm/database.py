"""Tuning databases: MetaSchedule's JSON records plus what they were made for.

A database is a directory::

    evit-tuning.json               target, TVM version, graph pipeline, and per model/input
                                   shape: tasks, trials, time, estimated latency, runs
    database_workload.json         MetaSchedule's JSON database: one kernel per line
    database_tuning_record.json    one measured schedule per line
    logs/                          one log per tuning run

One directory holds one target; several models (and input shapes) can share it. The
records are appended a line at a time, so a run stopped by Ctrl-C or a crash leaves every
finished line behind; a line cut short by a crash is dropped when the database is next
opened. The metadata file is replaced atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import BadInputError
from ...fsutil import write_json_atomic, write_text_atomic
from .target_string import to_classic

META_FILE = "evit-tuning.json"
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

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, path, target: dict, *, graph: str) -> "TuningDatabase":
        """The database at ``path`` for ``target``, created if the directory is new or
        empty; refuses one made for another target."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BadInputError(f"tuning database {path} exists and is not a directory")
        if (path / META_FILE).is_file():
            db = cls.open(path)
            db.check_target(target)
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
        return db

    @classmethod
    def open(cls, path) -> "TuningDatabase":
        """An existing database (for export or to continue tuning)."""
        path = Path(path)
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
        db = cls(path, meta)
        db.repair()
        return db

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
        from tvm.s_tir.meta_schedule.database import JSONDatabase

        return JSONDatabase(path_workload=str(self.path / WORKLOAD_FILE),
                            path_tuning_record=str(self.path / RECORD_FILE), allow_missing=True)

    def record_count(self) -> int:
        path = self.path / RECORD_FILE
        if not path.is_file():
            return 0
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())

    def repair(self) -> int:
        """Drop a last line cut short by a crash (MetaSchedule refuses to load it).

        Returns the number of lines dropped. A broken line that is not the last one is not
        a crash artefact: that is reported, not silently removed.
        """
        dropped = 0
        for name in (WORKLOAD_FILE, RECORD_FILE):
            path = self.path / name
            if not path.is_file():
                continue
            text = path.read_text("utf-8", errors="replace")
            lines = text.split("\n")
            while lines and not lines[-1].strip():
                lines.pop()
            bad = [i for i, line in enumerate(lines) if line.strip() and not _is_json(line)]
            if not bad and text.endswith("\n") or not lines:
                continue
            if bad and bad != [len(lines) - 1]:
                raise BadInputError(f"tuning database file {path} is damaged at line {bad[0] + 1} "
                                    f"(not a truncated last line); restore it or start a new database")
            if bad:
                lines.pop()
                dropped += 1
            write_text_atomic(path, "".join(line + "\n" for line in lines))
        return dropped

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
