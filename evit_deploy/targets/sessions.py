"""Loaded artifacts, reused while their files are unchanged: one cache for every target.

``verify`` reads a description and then runs the same artifact on many batches, ``run``
and ``eval`` likewise: loading (compiling, for OpenVINO; parsing a package, for the Core
ML reference executor) once matters. An artifact is often several files (a TVM library
and its description, an OpenVINO ``.xml`` and its ``.bin``, a Core ML package directory),
and changing any of them changes what runs, so the cache key covers all of them
(:meth:`Target.artifact_files <evit_deploy.targets.base.Target.artifact_files>`).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import BadInputError


def files_key(files: Iterable[Path]) -> tuple:
    """(path, modification time, size) of every file: equal keys, unchanged files."""
    key = []
    for f in files:
        f = Path(f)
        key.append((str(f.resolve()), *((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else (None, None))))
    return tuple(key)


def package_files(path: Path) -> tuple[Path, ...]:
    """A file, or every file of a directory artifact (a Core ML package)."""
    path = Path(path)
    return tuple(sorted(p for p in path.rglob("*") if p.is_file())) if path.is_dir() else (path,)


class SessionCache:
    """A runtime's loaded artifacts.

    ``load`` makes a session from a path (``load(path)`` for :meth:`cached`,
    ``load(path, threads=N)`` for :meth:`open`); it may be given as ``"package.module:name"``,
    imported when first needed, so that a target's module stays light. ``files`` lists the
    files an artifact is made of (default: the path itself, or a directory's files).
    :meth:`cached` keeps the last ``maxsize`` artifacts while their files are unchanged;
    :meth:`open` loads a fresh one (benchmarks, with their own thread count).
    """

    def __init__(self, load: Callable | str, files: Callable[[Path], Iterable[Path]] = package_files,
                 maxsize: int = 2):
        self._load = load
        self._files = files
        self._maxsize = maxsize
        self._entries: OrderedDict[tuple, object] = OrderedDict()

    def _loader(self) -> Callable:
        if isinstance(self._load, str):
            module, name = self._load.split(":")
            self._load = getattr(importlib.import_module(module), name)
        return self._load

    @staticmethod
    def _check(path) -> Path:
        path = Path(path)
        if not path.exists():
            raise BadInputError(f"artifact not found: {path}")
        return path

    def cached(self, path):
        path = self._check(path)
        key = files_key(self._files(path))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        session = self._loader()(path)
        self._entries[key] = session
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)
        return session

    def open(self, path, threads: int | None = None):
        return self._loader()(self._check(path), threads=threads)

    def clear(self) -> None:
        self._entries.clear()
