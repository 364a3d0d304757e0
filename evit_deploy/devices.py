"""Devices: declarative descriptions of what artifacts are deployed on (TOML).

The repository's ``devices/`` directory is shipped inside the package as
``evit_deploy.device_files``. A device file names a target, the export options that suit
the device, facts about it, and the paper's figures for it where there are some::

    name = "iphone11-a13"
    description = "..."
    target = "coreml"
    [device]   soc = "Apple A13 Bionic", os = "iOS 16", ...
    [options]  options of the target, as for `evit-deploy export --target coreml`
    [paper]    latency_ms = { m2 = 5.23 }  or  throughput_ips = { m0 = 228 }
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import BadInputError, unknown_name

TOP_LEVEL = {"name": str, "description": str, "target": str, "options": dict, "device": dict, "paper": dict}
DEVICE_KEYS = {"name": str, "soc": str, "cpu": str, "cores": int, "os": str, "memory_gb": (int, float),
               "notes": str}
PAPER_KEYS = {"latency_ms", "throughput_ips", "throughput_tvm_ips", "batch", "threads", "source"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    target: str
    options: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    paper: dict = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "description": self.description,
                "options": self.options, "device": self.device, "paper": self.paper}


def device_dir() -> Path:
    return Path(str(resources.files("evit_deploy.device_files")))


def list_devices() -> list[Device]:
    return [load_device(p) for p in sorted(device_dir().glob("*.toml"))]


def _type_name(tp) -> str:
    return " or ".join(t.__name__ for t in tp) if isinstance(tp, tuple) else tp.__name__


def load_device(name_or_path: str | Path) -> Device:
    """A built-in device by name (``iphone11-a13``) or a TOML file by path, validated."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = device_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise unknown_name("device", str(name_or_path), [p.stem for p in sorted(device_dir().glob("*.toml"))])
    elif not path.is_file():
        raise BadInputError(f"device file not found: {path}")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path}: invalid TOML: {exc}") from None
    return validate_device(data, path)


def validate_device(data: dict, path: Path) -> Device:
    problems = []
    for key, value in data.items():
        if key not in TOP_LEVEL:
            problems.append(f"unknown key '{key}' (valid: {', '.join(TOP_LEVEL)})")
        elif not isinstance(value, TOP_LEVEL[key]):
            problems.append(f"'{key}' must be a {'table' if TOP_LEVEL[key] is dict else _type_name(TOP_LEVEL[key])}")
    for key in ("name", "target"):
        if key not in data:
            problems.append(f"missing required key '{key}'")
    for key, value in data.get("device", {}).items() if isinstance(data.get("device"), dict) else []:
        if key not in DEVICE_KEYS:
            problems.append(f"unknown key 'device.{key}' (valid: {', '.join(DEVICE_KEYS)})")
        elif not isinstance(value, DEVICE_KEYS[key]) or isinstance(value, bool):
            problems.append(f"'device.{key}' must be {_type_name(DEVICE_KEYS[key])}, got {value!r}")
        elif key == "cores" and value < 1:
            problems.append(f"'device.cores' must be at least 1, got {value}")
    problems += _paper_problems(data.get("paper", {}))
    if problems:
        raise BadInputError(f"{path}: " + "; ".join(problems))
    if data["name"] != path.stem:
        raise BadInputError(f"{path}: name '{data['name']}' must match the file name '{path.stem}'")
    from .targets import get_target
    try:
        target_cls = type(get_target(data["target"]))
    except BadInputError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    options = data.get("options", {})
    target_cls.parse_options(options, source=str(path))    # raises on unknown keys / bad values
    return Device(data["name"], data.get("description", ""), data["target"], dict(options),
                  dict(data.get("device", {})), dict(data.get("paper", {})), path)


def _paper_problems(paper) -> list[str]:
    from .models.registry import MODELS
    if not isinstance(paper, dict):
        return []
    problems = []
    shorts = {s.short_name for s in MODELS.values()}
    for key, value in paper.items():
        if key not in PAPER_KEYS:
            problems.append(f"unknown key 'paper.{key}' (valid: {', '.join(sorted(PAPER_KEYS))})")
        elif isinstance(value, dict):
            for model, figure in value.items():
                if model not in shorts:
                    problems.append(f"'paper.{key}.{model}' is not a model (valid: {', '.join(sorted(shorts))})")
                elif not isinstance(figure, (int, float)) or isinstance(figure, bool) or figure <= 0:
                    problems.append(f"'paper.{key}.{model}' must be a positive number, got {figure!r}")
    return problems
