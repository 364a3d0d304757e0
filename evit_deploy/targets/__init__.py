"""Export targets, discovered through the ``evit_deploy.targets`` entry-point group.

A third-party package registers a target in its own ``pyproject.toml``::

    [project.entry-points."evit_deploy.targets"]
    mytarget = "my_package.module:MyTarget"
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import BadInputError, unknown_name
from .base import Artifact, Command, CommandResult, Finding, OpTime, Target
from .options import PRECISIONS, calibration_option, int8_kernels_option, option, precision_option

__all__ = ["Artifact", "Command", "CommandResult", "Finding", "OpTime", "Target", "option", "precision_option",
           "calibration_option", "int8_kernels_option",
           "PRECISIONS", "ENTRY_POINT_GROUP",
           "available_targets", "get_target", "target_for_artifact", "list_targets", "TargetInfo",
           "option_shortcuts"]

ENTRY_POINT_GROUP = "evit_deploy.targets"


@dataclass(frozen=True)
class TargetInfo:
    name: str
    produces: str
    requires: tuple[str, ...]        # pip packages
    missing: tuple[str, ...]         # pip packages not importable here
    source: str                      # the entry point's value
    error: str | None = None         # why the plug-in itself failed to load
    precisions: tuple[str, ...] = ()  # what --precision accepts (Target.precisions)

    @property
    def usable(self) -> bool:
        return self.error is None and not self.missing


@lru_cache(maxsize=1)
def _load_all() -> tuple[dict[str, type[Target]], dict[str, tuple[str, str]]]:
    loaded, broken = {}, {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Target)):
                raise TypeError(f"{ep.value} is not a subclass of evit_deploy.targets.Target")
            if getattr(cls, "name", None) != ep.name:
                raise TypeError(f"{ep.value} is named {getattr(cls, 'name', None)!r}, not {ep.name!r} as registered")
        except Exception as exc:  # a broken plug-in must not break the others
            broken[ep.name] = (ep.value, f"{type(exc).__name__}: {exc}")
            continue
        loaded[ep.name] = cls
    return loaded, broken


def available_targets() -> dict[str, type[Target]]:
    return dict(sorted(_load_all()[0].items()))


def get_target(name: str) -> Target:
    targets = available_targets()
    if name not in targets:
        broken = _load_all()[1]
        if name in broken:
            raise BadInputError(f"target '{name}' ({broken[name][0]}) failed to load: {broken[name][1]}")
        raise unknown_name("target", name, targets or ["(none registered: is evit-deploy installed?)"])
    return targets[name]()


def option_shortcuts() -> dict[str, tuple[str, str]]:
    """``{"--db": ("tvm", "db")}``: the short flags targets declare for ``bench`` and
    ``profile`` (see :attr:`Target.option_shortcuts`), to the target option each sets.

    Two targets declaring the same flag is the plug-ins' conflict: the flag is then left
    out (and must be written ``-O TARGET.KEY=VALUE``), never silently given to one of them.
    """
    owners: dict[str, list[tuple[str, str]]] = {}
    for name, cls in available_targets().items():
        for flag, option_name in cls.option_shortcuts.items():
            owners.setdefault(flag, []).append((name, option_name))
    return {flag: found[0] for flag, found in owners.items() if len(found) == 1}


def target_for_artifact(path: str | Path) -> Target:
    path = Path(path)
    for cls in available_targets().values():
        if cls().recognizes(path):
            return cls()
    suffixes = sorted({s for cls in available_targets().values() for s in cls.suffixes})
    raise BadInputError(f"{path} is not an artifact of a known target (expected {', '.join(suffixes)})")


def list_targets() -> list[TargetInfo]:
    loaded, broken = _load_all()
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    infos = []
    for name, cls in sorted(loaded.items()):
        requires = {**cls.requires, **cls.run_requires}
        infos.append(TargetInfo(name, cls.produces, tuple(sorted(set(requires.values()))),
                                tuple(sorted(set(cls.missing_packages().values()))), eps.get(name, ""),
                                precisions=cls.precisions()))
    for name, (value, error) in sorted(broken.items()):
        infos.append(TargetInfo(name, "?", (), (), value, error))
    return infos
