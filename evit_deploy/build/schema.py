"""The build file (TOML): what ``evit-deploy build`` reads, validated before any work.

It lists models and the artifacts to make of them::

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
    name = "ios"                 # output subdirectory (default: the device or target)
    device = "iphone11-a13"      # or: target = "coreml" ('profile', the earlier name, is accepted)
    models = ["m2"]              # default: every model
    min_top1_agreement = 0.99    # optional eval gates: top-1 agreement with fp32 PyTorch,
    max_top1_drop = 0.005        # and (labelled images) the top-1 accuracy it may lose
    [artifact.options]           # overrides the device's options
    compress = "palettize8"

    [[artifact]]
    from = "optimize.json"       # exactly what `evit-deploy optimize` chose (its target,
    models = ["m2"]              # options and batch), built on any machine; default models:
                                 # those of the model it was chosen for

Every problem of the file is reported at once, each with its file and line. Options are
checked as the export will see them (:func:`~evit_deploy.plan.merge_options`); the ones a
target declares as paths (:func:`~evit_deploy.targets.options.path_options`) are relative
to the build file. Torch-free.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInputError
from ..models.registry import resolve_name
from ..plan import merge_options
from ..targets import get_target
from ..targets.options import path_options

BUILD_KEYS = {"out": str, "images": str, "seed": int, "eval_images": str, "eval_labels": str}
MODEL_KEYS = {"weights": str, "img_size": int, "num_classes": int, "distillation": bool}
#: Eval gates an artifact entry may set: fractions in [0, 1].
GATES = ("min_top1_agreement", "max_top1_drop")
#: ``profile`` is the earlier name of ``device``, accepted for one release.
ARTIFACT_KEYS = {"name": str, "target": str, "device": str, "profile": str, "models": list, "options": dict,
                 "batch": int, "dynamic_batch": bool, "from": str, **{gate: float for gate in GATES}}
#: What an entry ``from = "optimize.json"`` takes from that file, so may not set itself.
CHOSEN_KEYS = ("target", "device", "profile", "options", "batch", "dynamic_batch")


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
    device: str | None
    models: list[str]             # keys of [models]
    options: dict                 # the entry's own, as written (the device's come first, see plan.merge_options)
    batch: int | None = None      # None: the target's choice (plan.plan_export)
    dynamic_batch: bool = False
    gates: dict = field(default_factory=dict)     # GATES the entry sets
    # The options the target declares as paths, resolved relative to the build file.
    paths: dict[str, Path] = field(default_factory=dict)
    # from = "optimize.json": that file, its SHA-256, and the choice it records.
    chosen_by: dict | None = None

    def export_options(self) -> dict:
        """The entry's options as the export takes them: paths resolved."""
        return _with_paths(self.options, self.paths)


def _with_paths(options: dict, paths: dict[str, Path]) -> dict:
    return {**options, **{key: str(path) for key, path in paths.items()}}


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

    def check_keys(self, data: dict, schema: dict, where: str, table: str | None, occurrence: int = 0) -> None:
        """Unknown keys (with the closest known one) and values of the wrong type."""
        for key, value in data.items():
            if key not in schema:
                close = difflib.get_close_matches(key, schema, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.add(f"unknown key '{key}' in {where}{hint}", key, table, occurrence)
            elif schema[key] is float and isinstance(value, int) and not isinstance(value, bool):
                continue                                   # TOML writes 1.0 as 1 as readily
            elif not isinstance(value, schema[key]) or (schema[key] is int and isinstance(value, bool)):
                self.add(f"'{key}' in {where} must be a {schema[key].__name__}, got {value!r}", key, table,
                         occurrence)

    def raise_if_any(self) -> None:
        if self.items:
            raise BadInputError(f"{len(self.items)} problem(s) in the build file:\n  " + "\n  ".join(self.items))


def _table(data: dict, key: str, kind: type):
    return data[key] if isinstance(data.get(key), kind) else kind()


def load_build_file(path: str | os.PathLike) -> BuildFile:
    """Parse and validate a build file; every problem is reported at once."""
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
    problems.check_keys(data, {"build": dict, "models": dict, "artifact": list}, "the file", None)
    build = _table(data, "build", dict)
    problems.check_keys(build, BUILD_KEYS, "[build]", "build")
    images = Path(base, build["images"]) if isinstance(build.get("images"), str) else None
    if images is not None and not images.is_dir():
        problems.add(f"images directory not found: {images}", "images", "build")
    eval_images = Path(base, build["eval_images"]) if isinstance(build.get("eval_images"), str) else None
    eval_labels = Path(base, build["eval_labels"]) if isinstance(build.get("eval_labels"), str) else None
    for key, found in (("eval_images", eval_images and eval_images.is_dir()),
                       ("eval_labels", eval_labels and eval_labels.is_file())):
        if build.get(key) is not None and not found:
            problems.add(f"{key} not found: {Path(base, build[key])}", key, "build")
    models = _models(problems, _table(data, "models", dict), base)
    artifacts = _artifacts(problems, _table(data, "artifact", list), models, base)
    if not problems.items and any("max_top1_drop" in a.gates for a in artifacts):
        _check_labelled(problems, eval_images, eval_labels)
    problems.raise_if_any()
    out = Path(base, build["out"]) if isinstance(build.get("out"), str) else base / "dist"
    return BuildFile(path, out, images, build.get("seed", 0), models, artifacts, eval_images, eval_labels)


def _models(problems: _Problems, raw: dict, base: Path) -> dict[str, ModelEntry]:
    if not raw:
        problems.add("no [models.<name>] table: nothing to build")
    models: dict[str, ModelEntry] = {}
    for key, spec in raw.items():
        table = f"models.{key}"
        try:
            name = resolve_name(key).name
        except BadInputError as exc:
            problems.add(str(exc), None, table)
            continue
        if not isinstance(spec, dict):
            problems.add(f"[{table}] must be a table", None, table)
            continue
        problems.check_keys(spec, MODEL_KEYS, f"[{table}]", table)
        weights = spec.get("weights")
        if isinstance(weights, str) and weights != "official":
            weights = str(Path(base, weights))
            if not Path(weights).is_file():
                problems.add(f"weights file not found: {weights}", "weights", table)
        options = {k: v for k, v in spec.items() if k in ("img_size", "num_classes", "distillation")}
        if options.get("img_size", 224) % 16 or options.get("img_size", 224) <= 0:
            problems.add(f"img_size must be a positive multiple of 16, got {options['img_size']}", "img_size", table)
        models[key] = ModelEntry(key, name, weights, options)
    return models


def _artifacts(problems: _Problems, raw: list, models: dict[str, ModelEntry], base: Path) -> list[ArtifactEntry]:
    if not raw:
        problems.add("no [[artifact]] entries: nothing to build")
    artifacts = [entry for i, item in enumerate(raw)
                 if (entry := _artifact(problems, item, i, models, base)) is not None]
    seen: set[tuple[str, str]] = set()
    for a in artifacts:
        for m in a.models:
            if (a.name, m) in seen:
                problems.add(f"two [[artifact]] entries named '{a.name}' build model '{m}': give them distinct names")
            seen.add((a.name, m))
    return artifacts


def _artifact(problems: _Problems, entry, i: int, models: dict[str, ModelEntry], base: Path) -> ArtifactEntry | None:
    """The ``i``-th ``[[artifact]]`` entry, or None when it names no usable target."""
    from ..devices import load_device

    where = f"[[artifact]] #{i + 1}"
    if not isinstance(entry, dict):
        problems.add(f"{where} must be a table")
        return None
    problems.check_keys(entry, ARTIFACT_KEYS, where, "artifact", i)
    chosen_by = None
    if isinstance(entry.get("from"), str):
        chosen_by = _optimize_choice(problems, entry, where, i, base)
        if chosen_by is None:
            return None
        entry = {**entry, **chosen_by["entry"]}
        if "models" not in entry:
            entry["models"] = [k for k, m in models.items() if m.name == chosen_by["model"]]
            if not entry["models"]:
                problems.add(f"{where}: {entry['from']} chose for model '{chosen_by['model']}', which no "
                             f"[models.<name>] table defines", "from", "artifact", i)
    device_key = "profile" if "profile" in entry else "device"
    if "profile" in entry and "device" in entry:
        problems.add(f"{where}: give 'device' once ('profile' is its earlier name)", "profile", "artifact", i)
        return None
    target, device = entry.get("target"), entry.get(device_key)
    options = _table(entry, "options", dict)
    if device is not None:
        try:
            found = load_device(device)
        except BadInputError as exc:
            problems.add(f"{where}: {exc}", device_key, "artifact", i)
            return None
        if target is not None and target != found.target:
            problems.add(f"{where}: device '{device}' is for target '{found.target}', not '{target}'",
                         "target", "artifact", i)
            return None
        target = found.target
    if target is None:
        problems.add(f"{where} needs 'target' or 'device'", None, "artifact", i)
        return None
    try:
        tgt = get_target(target)
    except BadInputError as exc:
        problems.add(f"{where}: {exc}", "target", "artifact", i)
        return None
    declared = path_options(tgt.Options)
    paths = {key: Path(base, value) for key, value in options.items()
             if key.replace("-", "_") in declared and isinstance(value, str) and value}
    try:
        merge_options(target, _with_paths(options, paths), device=device, source=where)  # as the export sees them
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
    return ArtifactEntry(entry.get("name") or device or tgt.name, tgt.name, device,
                         [m for m in names if m in models] if isinstance(names, list) else [],
                         options, entry.get("batch"), entry.get("dynamic_batch", False), gates, paths,
                         chosen_by and {k: v for k, v in chosen_by.items() if k != "entry"})


def _optimize_choice(problems: _Problems, entry: dict, where: str, i: int, base: Path) -> dict | None:
    """What the ``optimize.json`` an entry names chose: the target, options (paths relative
    to that file) and batch of its winner, with where it was chosen."""
    import json

    from ..fsutil import sha256_file

    path = Path(base, entry["from"])
    for key in CHOSEN_KEYS:
        if key in entry:
            problems.add(f"{where}: '{key}' comes from {entry['from']}: remove it, or 'from'", key, "artifact", i)
    try:
        data = json.loads(path.read_text("utf-8"))
        chosen = data["build_entry"]
        model, cpu = data["model"], data.get("machine", {}).get("model")
    except FileNotFoundError:
        problems.add(f"{where}: {path} not found (write it with `evit-deploy optimize ... --out DIR`)", "from",
                     "artifact", i)
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.add(f"{where}: {path} is not an optimize.json ({type(exc).__name__}: {exc})", "from", "artifact", i)
        return None
    if not isinstance(chosen, dict):
        problems.add(f"{where}: {path} records no winner: no candidate was right within its budget", "from",
                     "artifact", i)
        return None
    options = dict(chosen.get("options") or {})
    for key in path_options(get_target(chosen["target"]).Options) if chosen.get("target") else ():
        if isinstance(options.get(key), str):          # relative to optimize.json, as the build file's are to it
            options[key] = os.path.relpath(Path(path.parent, options[key]), base)
    return {"file": str(path), "sha256": sha256_file(path), "model": model, "cpu": cpu, "winner": data.get("winner"),
            "entry": {"name": entry.get("name") or chosen.get("name"), "target": chosen.get("target"),
                      "options": options, "batch": chosen.get("batch")}}


def _check_labelled(problems: _Problems, eval_images: Path | None, eval_labels: Path | None) -> None:
    """``max_top1_drop`` needs labels for the eval images."""
    from ..evaluation import eval_images as find_eval_images

    try:
        if find_eval_images(eval_images, eval_labels).labels is None:
            problems.add("max_top1_drop needs labelled eval images: set [build] eval_images to a "
                         "DIR/<synset>/ folder, or eval_labels to a labels file", "max_top1_drop", "artifact")
    except BadInputError as exc:
        problems.add(str(exc), "eval_labels" if eval_labels else "eval_images", "build")
