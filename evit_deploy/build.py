"""``evit-deploy build``: a declarative build file → verified artifacts + a manifest.

The build file (TOML) lists models and the artifacts to make of them::

    [build]
    out = "dist"                 # optional; --out overrides
    images = "photos/"           # optional extra parity inputs
    eval_images = "val/"         # optional: images the eval gates run on (default: the
                                 # bundled photos); DIR/<synset>/*.JPEG gives labels
    eval_labels = "val.txt"      # optional labels file (see evaluate.read_labels_file)

    [models.m2]
    weights = "weights/efficientvit_m2.pth"   # a file (relative to this file), "official",
                                              # or absent for seeded synthetic weights

    [[artifact]]
    name = "ios"                 # output subdirectory (default: the profile or target)
    profile = "iphone11-a13"     # or: target = "coreml"
    models = ["m2"]              # default: every model
    min_top1_agreement = 0.99    # optional eval gates: top-1 agreement with fp32 PyTorch,
    max_top1_drop = 0.005        # and (labelled images) the top-1 accuracy it may lose
    [artifact.options]           # overrides the profile's options
    compress = "palettize8"

The whole file is validated before any work. Every artifact is verified by the parity
engine, then judged by its eval gates (:mod:`evit_deploy.evaluate`); an artifact that
fails either is moved to ``<name>.rejected/``. ``dist/manifest.json`` records what was
built from what, and a re-run skips artifacts whose inputs and files are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BadInputError, EvitError, ExportError, ParityError, first_line
from .fsutil import deterministic_zip, ensure_output_dir, publish, remove, write_json_atomic
from .hostinfo import cpu_info, package_versions
from .models.registry import resolve_name
from .plan import merge_options, plan_export, trace_plan
from .progress import Reporter
from .targets import get_target

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

BUILD_KEYS = {"out": str, "images": str, "seed": int, "eval_images": str, "eval_labels": str}
MODEL_KEYS = {"weights": str, "img_size": int, "num_classes": int, "distillation": bool}
#: Eval gates an artifact entry may set: fractions in [0, 1].
GATES = ("min_top1_agreement", "max_top1_drop")
ARTIFACT_KEYS = {"name": str, "target": str, "profile": str, "models": list, "options": dict,
                 "batch": int, "dynamic_batch": bool, **{gate: float for gate in GATES}}


@dataclass
class ModelEntry:
    key: str                      # as written in the file, e.g. "m2"
    name: str                     # canonical, efficientvit_m2
    weights: str | None           # resolved path, "official" or None (random-init)
    options: dict                 # img_size, num_classes, distillation


@dataclass
class ArtifactEntry:
    name: str
    target: str
    profile: str | None
    models: list[str]             # keys of [models]
    options: dict                 # the entry's own (the profile's come first, see plan.merge_options)
    batch: int | None = None      # None: the target's choice (plan.plan_export)
    dynamic_batch: bool = False
    gates: dict = field(default_factory=dict)     # GATES the entry sets


@dataclass
class BuildFile:
    path: Path
    out: Path
    images: Path | None
    seed: int
    models: dict[str, ModelEntry]
    artifacts: list[ArtifactEntry]
    eval_images: Path | None = None
    eval_labels: Path | None = None


class _Problems:
    """Collects every problem of a build file, each with its line where it can be found."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.items: list[str] = []

    def line_of(self, key: str | None, table: str | None = None, occurrence: int = 0) -> int | None:
        """Line of ``key`` inside the ``occurrence``-th ``[table]``/``[[table]]`` (or of the
        header itself when ``key`` is None)."""
        start, end = 0, len(self.lines)
        if table is not None:
            header = re.compile(rf"^\s*\[+\s*{re.escape(table)}\s*\]+")
            starts = [i for i, line in enumerate(self.lines) if header.match(line)]
            if len(starts) <= occurrence:
                return None
            start = starts[occurrence]
            if key is None:
                return start + 1
            end = next((i for i in range(start + 1, len(self.lines)) if self._ends_table(self.lines[i], table)),
                       len(self.lines))
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        return next((i + 1 for i in range(start, end) if pattern.match(self.lines[i])), None)

    @staticmethod
    def _ends_table(line: str, table: str) -> bool:
        """A header that is not one of ``table``'s own sub-tables ends it."""
        found = re.match(r"^\s*(\[+)\s*([^\]]+?)\s*\]", line)
        return bool(found) and (len(found[1]) == 2 or not found[2].startswith(table + "."))

    def add(self, message: str, key: str | None = None, table: str | None = None, occurrence: int = 0) -> None:
        line = self.line_of(key, table, occurrence) if (key or table) else None
        self.items.append(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise BadInputError(f"{len(self.items)} problem(s) in the build file:\n  " + "\n  ".join(self.items))


def _check_keys(problems: _Problems, data: dict, schema: dict, where: str, table: str | None,
                occurrence: int = 0) -> None:
    import difflib
    for key, value in data.items():
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(f"unknown key '{key}' in {where}{hint}", key, table, occurrence)
        elif schema[key] is float and isinstance(value, int) and not isinstance(value, bool):
            continue                                   # TOML writes 1.0 as 1 as readily
        elif not isinstance(value, schema[key]) or (schema[key] is int and isinstance(value, bool)):
            problems.add(f"'{key}' in {where} must be a {schema[key].__name__}, got {value!r}", key, table, occurrence)


def load_build_file(path: str | os.PathLike) -> BuildFile:
    """Parse and validate a build file; every problem is reported at once."""
    from .device_profiles import load_device_profile

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"build file not found: {path}")
    text = path.read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path}: invalid TOML: {exc}") from None
    problems = _Problems(path, text)
    base = path.parent
    _check_keys(problems, data, {"build": dict, "models": dict, "artifact": list}, "the file", None)
    build = data.get("build", {}) if isinstance(data.get("build"), dict) else {}
    _check_keys(problems, build, BUILD_KEYS, "[build]", "build")
    images = Path(base, build["images"]) if isinstance(build.get("images"), str) else None
    if images is not None and not images.is_dir():
        problems.add(f"images directory not found: {images}", "images", "build")
    eval_images = Path(base, build["eval_images"]) if isinstance(build.get("eval_images"), str) else None
    eval_labels = Path(base, build["eval_labels"]) if isinstance(build.get("eval_labels"), str) else None
    for key, found in (("eval_images", eval_images and eval_images.is_dir()),
                       ("eval_labels", eval_labels and eval_labels.is_file())):
        if build.get(key) is not None and not found:
            problems.add(f"{key} not found: {Path(base, build[key])}", key, "build")

    models: dict[str, ModelEntry] = {}
    raw_models = data.get("models", {}) if isinstance(data.get("models"), dict) else {}
    if not raw_models:
        problems.add("no [models.<name>] table: nothing to build")
    for key, spec in raw_models.items():
        table = f"models.{key}"
        try:
            name = resolve_name(key).name
        except BadInputError as exc:
            problems.add(str(exc), None, table)
            continue
        if not isinstance(spec, dict):
            problems.add(f"[{table}] must be a table", None, table)
            continue
        _check_keys(problems, spec, MODEL_KEYS, f"[{table}]", table)
        weights = spec.get("weights")
        if isinstance(weights, str) and weights != "official":
            weights = str(Path(base, weights))
            if not Path(weights).is_file():
                problems.add(f"weights file not found: {weights}", "weights", table)
        options = {k: v for k, v in spec.items() if k in ("img_size", "num_classes", "distillation")}
        if options.get("img_size", 224) % 16 or options.get("img_size", 224) <= 0:
            problems.add(f"img_size must be a positive multiple of 16, got {options['img_size']}", "img_size", table)
        models[key] = ModelEntry(key, name, weights, options)

    artifacts: list[ArtifactEntry] = []
    raw_artifacts = data.get("artifact", []) if isinstance(data.get("artifact"), list) else []
    if not raw_artifacts:
        problems.add("no [[artifact]] entries: nothing to build")
    for i, entry in enumerate(raw_artifacts):
        where = f"[[artifact]] #{i + 1}"
        if not isinstance(entry, dict):
            problems.add(f"{where} must be a table")
            continue
        _check_keys(problems, entry, ARTIFACT_KEYS, where, "artifact", i)
        target, profile = entry.get("target"), entry.get("profile")
        options = entry.get("options", {}) if isinstance(entry.get("options"), dict) else {}
        if profile is not None:
            try:
                prof = load_device_profile(profile)
            except BadInputError as exc:
                problems.add(f"{where}: {exc}", "profile", "artifact", i)
                continue
            if target is not None and target != prof.target:
                problems.add(f"{where}: profile '{profile}' is for target '{prof.target}', not '{target}'",
                             "target", "artifact", i)
                continue
            target = prof.target
        if target is None:
            problems.add(f"{where} needs 'target' or 'profile'", None, "artifact", i)
            continue
        try:
            tgt = get_target(target)
        except BadInputError as exc:
            problems.add(f"{where}: {exc}", "target", "artifact", i)
            continue
        try:
            merge_options(target, options, profile=profile, source=where)   # as the export will see them
        except BadInputError as exc:
            problems.add(str(exc), None, "artifact", i)
        if entry.get("dynamic_batch") and not tgt.supports_dynamic_batch:
            problems.add(f"{where}: target '{tgt.name}' does not support dynamic_batch", "dynamic_batch", "artifact", i)
        names = entry.get("models", list(models))
        for m in names if isinstance(names, list) else []:
            if m not in models:
                problems.add(f"{where}: model '{m}' is not defined in a [models.{m}] table", "models", "artifact", i)
        gates = {g: float(entry[g]) for g in GATES if isinstance(entry.get(g), (int, float))}
        for gate, value in gates.items():
            if not 0.0 <= value <= 1.0:
                problems.add(f"{where}: {gate} is a fraction between 0 and 1, got {value}", gate, "artifact", i)
        artifacts.append(ArtifactEntry(entry.get("name") or profile or tgt.name, tgt.name, profile,
                                       [m for m in names if m in models] if isinstance(names, list) else [],
                                       options, entry.get("batch"), entry.get("dynamic_batch", False), gates))
    seen: dict[tuple, str] = {}
    for a in artifacts:
        for m in a.models:
            key = (a.name, m)
            if key in seen:
                problems.add(f"two [[artifact]] entries named '{a.name}' build model '{m}': give them distinct names")
            seen[key] = a.name
    if not problems.items and any("max_top1_drop" in a.gates for a in artifacts):
        from .evaluate import eval_images as find_eval_images
        try:
            if find_eval_images(eval_images, eval_labels).labels is None:
                problems.add("max_top1_drop needs labelled eval images: set [build] eval_images to a "
                             "DIR/<synset>/ folder, or eval_labels to a labels file", "max_top1_drop", "artifact")
        except BadInputError as exc:
            problems.add(str(exc), "eval_labels" if eval_labels else "eval_images", "build")
    problems.raise_if_any()
    out = Path(base, build["out"]) if isinstance(build.get("out"), str) else base / "dist"
    return BuildFile(path, out, images, build.get("seed", 0), models, artifacts, eval_images, eval_labels)


# -- hashing -------------------------------------------------------------------------------

def tree_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory as its sorted relative paths and contents."""
    from .models.checkpoint import sha256_file

    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def tree_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _inputs_key(model: ModelEntry, art: ArtifactEntry, build: BuildFile, weights_id: str, versions: dict) -> str:
    """Everything an artifact is made from; equal keys mean a rebuild would be redundant."""
    # Options naming files or directories (a tuning database, say) count by content.
    files = {key: tree_sha256(path) for key, value in art.options.items()
             if (path := _option_path(value, build.path.parent)) is not None}
    record = {"model": model.name, "model_options": model.options, "weights": weights_id,
              "target": art.target, "profile": art.profile, "options": art.options, "files": files,
              "batch": art.batch, "dynamic_batch": art.dynamic_batch, "seed": build.seed,
              "images": tree_sha256(build.images) if build.images else None, "versions": versions}
    if art.gates:
        record["gates"] = art.gates
        record["eval"] = [tree_sha256(p) if p else None for p in (build.eval_images, build.eval_labels)]
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _weights_id(model: ModelEntry, seed: int) -> str:
    from .models.checkpoint import official_weights_path, sha256_file
    if model.weights is None:
        return f"random-init:{seed}"
    if model.weights == "official":
        return sha256_file(official_weights_path(resolve_name(model.name)))
    return sha256_file(model.weights)


# -- building ------------------------------------------------------------------------------

@dataclass
class BuildResult:
    records: list[dict]
    manifest: Path
    counts: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"].startswith("failed")]


def _option_path(value, base: Path) -> Path | None:
    """The file or directory an option value names, relative to the build file, if any."""
    if isinstance(value, str) and value and Path(base, value).exists():
        return Path(base, value)
    return None


def _resolve_options_paths(options: dict, base: Path) -> dict:
    return {k: str(path) if (path := _option_path(v, base)) is not None else v for k, v in options.items()}


def build(path: str | os.PathLike, *, out: str | os.PathLike | None = None, jobs: int = 1,
          reporter: Reporter | None = None) -> BuildResult:
    """Build every artifact of a build file into ``out``, verify each, write the manifest."""
    reporter = reporter or Reporter()
    spec = load_build_file(path)
    out_dir = ensure_output_dir(Path(out) if out is not None else spec.out)
    manifest_path = out_dir / MANIFEST
    previous = _load_manifest(manifest_path)
    versions = package_versions()
    jobs_list = [(spec.models[m], art) for art in spec.artifacts for m in art.models]
    records: dict[str, dict] = {}

    def save():
        write_json_atomic(manifest_path, _manifest(spec, list(records.values()), versions))

    pending = []
    for model, art in jobs_list:
        weights_id = _weights_id(model, spec.seed)
        key = _inputs_key(model, art, spec, weights_id, versions)
        old = previous.get((art.name, model.name))
        if old and old.get("inputs_sha256") == key and _files_intact(out_dir, old):
            records[f"{art.name}/{model.name}"] = {**old, "status": "up to date"}
            continue
        pending.append((model, art, weights_id, key))
    if jobs > 1 and len(pending) > 1:
        records.update(_build_parallel(spec, pending, out_dir, jobs, reporter, save, records))
    else:
        with reporter.task("build", total=len(pending)) as task:
            traces: dict = {}
            for model, art, weights_id, key in pending:
                task.update(description=f"{art.name}/{model.key}")
                record = _build_one(spec, model, art, weights_id, key, out_dir, reporter, traces)
                records[f"{art.name}/{model.name}"] = record
                save()
                task.update(advance=1)
    save()
    result = BuildResult(list(records.values()), manifest_path)
    result.counts = {s: sum(r["status"] == s for r in result.records)
                     for s in ("built", "up to date", "failed parity", "failed gate", "failed export")}
    return result


def _build_parallel(spec, pending, out_dir, jobs, reporter, save, records) -> dict:
    """Build in worker processes, one per model, so that each model is traced once per
    input format (the same trace serves all of its artifacts)."""
    import concurrent.futures
    import multiprocessing

    by_model: dict[str, list] = {}
    for item in pending:
        by_model.setdefault(item[0].key, []).append(item)
    ctx = multiprocessing.get_context("spawn")
    done: dict[str, dict] = {}
    with reporter.task("build", total=len(pending)) as task, \
            concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_build_group, str(spec.path), [(m.key, a.name, w, k) for m, a, w, k in items],
                               str(out_dir)) for items in by_model.values()]
        try:
            for future in concurrent.futures.as_completed(futures):
                for record in future.result():
                    done[f"{record['artifact']}/{record['model']}"] = record
                    records[f"{record['artifact']}/{record['model']}"] = record
                    task.update(advance=1)
                save()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return done


def _build_group(build_path: str, items: list[tuple], out_dir: str) -> list[dict]:
    """Worker-process entry point: build one model's artifacts."""
    spec = load_build_file(build_path)
    arts = {a.name: a for a in spec.artifacts}
    traces: dict = {}
    return [_build_one(spec, spec.models[m], arts[a], w, k, Path(out_dir), Reporter(), traces)
            for m, a, w, k in items]


def _build_one(spec: BuildFile, model: ModelEntry, art: ArtifactEntry, weights_id: str, key: str,
               out_dir: Path, reporter: Reporter, traces: dict) -> dict:
    from .api import export_traced

    record = {"artifact": art.name, "model": model.name, "target": art.target, "profile": art.profile,
              "options": art.options,
              "weights": weights_id.split(":")[0] if weights_id.startswith("random-init") else weights_id,
              "seed": spec.seed if model.weights is None else None, "batch": art.batch,
              "dynamic_batch": art.dynamic_batch, "inputs_sha256": key}
    start = time.perf_counter()
    try:
        plan = plan_export(model.name, art.target, profile=art.profile,
                           options=_resolve_options_paths(art.options, spec.path.parent), batch=art.batch,
                           dynamic_batch=art.dynamic_batch, weights=model.weights, seed=spec.seed, **model.options)
        record.update(options=plan.options_dict(), batch=plan.batch, reproducible=plan.target.reproducible,
                      **({"reproducibility": plan.target.reproducibility_note} if not plan.target.reproducible
                         else {}))
        for note in plan.notes:
            reporter.info(f"{art.name}/{model.key}: {note}")
        if plan.trace_key not in traces:
            with reporter.stage("trace", f"{model.key} ({plan.input_format})"):
                traces[plan.trace_key] = trace_plan(plan)
            for warning in traces[plan.trace_key].warnings:
                reporter.warn(f"{model.key}: {warning}")
        target_dir = ensure_output_dir(out_dir / art.name)
        result = export_traced(traces[plan.trace_key], plan, target_dir, images=spec.images, reporter=reporter)
        record["parity"] = _parity_summary(result.report)
        if art.gates:
            record["eval"] = _judge_gates(spec, art, result.artifact, traces[plan.trace_key].reference, reporter)
            if record["eval"]["failures"]:
                rejected = _reject(result.artifact, record["eval"])
                record.update(status="failed gate", error=f"{'; '.join(record['eval']['failures'])} (the artifact "
                                                          f"was moved to {rejected.relative_to(out_dir).as_posix()})")
                return _finish(record, start)
        # Which CPUs compute it as verified, and the one it was verified on (not in the file:
        # its bytes would then depend on the machine that built it).
        record.update(status="built", **_artifact_facts(result.artifact, out_dir),
                      cpu={**result.artifact.description.extra.get("cpu", {}), "verified_on": result.report.cpu})
    except ParityError as exc:
        record.update(status="failed parity", error=str(exc), parity=_parity_summary(exc.report))
    except EvitError as exc:
        record.update(status="failed export", error=str(exc))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a converter crash fails this artifact, not the build
        record.update(status="failed export", error=f"{type(exc).__name__}: {first_line(exc)}")
    return _finish(record, start)


def _finish(record: dict, start: float) -> dict:
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _judge_gates(spec: BuildFile, art: ArtifactEntry, artifact, reference, reporter: Reporter) -> dict:
    """Evaluate a verified artifact over the build's eval images and check its gates."""
    from .evaluate import Evaluated, eval_images, evaluate

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


def _reject(artifact, report: dict) -> Path:
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


def _artifact_facts(artifact, out_dir: Path) -> dict:
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


def _parity_summary(report) -> dict | None:
    if report is None:
        return None
    return {"passed": report.passed, "precision": report.precision, "runtime": report.runtime,
            "tolerance": dataclasses.asdict(report.tolerance),
            "exact_answer": report.exact_answer,
            "outputs": [{"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel,
                         "fp32_noise_rel": o.noise_rel, "ratio": o.ratio, "limit": o.limit,
                         "worst_input": o.worst_input, "min_cosine": o.min_cosine, "gain_error": o.gain_error,
                         "top1": None if o.top1_checked is None else f"{o.top1_agree}/{o.top1_checked}",
                         "top5_overlap": o.top5_overlap} for o in report.outputs],
            "failures": report.failures, "extra": report.extra}


def _files_intact(out_dir: Path, record: dict) -> bool:
    for f in record.get("files", []):
        p = out_dir / f["path"]
        if not p.exists() or tree_sha256(p) != f["sha256"]:
            return False
    return bool(record.get("files"))


def _load_manifest(path: Path) -> dict[tuple[str, str], dict]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
        return {(r["artifact"], r["model"]): r for r in data.get("artifacts", [])}
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}    # an unreadable manifest only means everything is rebuilt


def _manifest(spec: BuildFile, records: list[dict], versions: dict) -> dict:
    body = sorted(records, key=lambda r: (r["artifact"], r["model"]))
    verdict = "pass" if body and all(r["status"] in ("built", "up to date") for r in body) else "fail"
    # What was shipped, independent of timings and status wording: path and hash pairs.
    shipped = sorted((f["path"], f["sha256"]) for r in body for f in r.get("files", []))
    digest = hashlib.sha256(json.dumps(shipped).encode()).hexdigest()
    return {"manifest_version": MANIFEST_VERSION, "evit_deploy": __version__, "build_file": str(spec.path),
            "verdict": verdict, "artifacts_sha256": digest, "versions": versions, "host": cpu_info(),
            "artifacts": body}


def exit_status(result: BuildResult) -> EvitError | None:
    """The error a failed build exits with: parity failures take precedence."""
    if any(r["status"] in ("failed parity", "failed gate") for r in result.records):
        return ParityError(f"{len(result.failed)} artifact(s) failed; see {result.manifest}")
    if result.failed:
        return ExportError(f"{len(result.failed)} artifact(s) failed to export; see {result.manifest}")
    return None
