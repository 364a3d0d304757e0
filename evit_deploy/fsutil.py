"""Writing files so that nothing half-written ever sits under a final name, and hashing
files and directories by their contents."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInputError, OutputError
from .progress import ctrl_c_deferred

_OUTPUT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a parent is not a directory",
                  errno.EEXIST: "exists and is not a directory",
                  errno.EFBIG: "larger than this process may write (ulimit -f)"}
#: Errors only a write can give: wherever one escapes, it is about the output.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def output_error(exc: OSError, path: os.PathLike | str, *, creating: bool = False) -> OutputError | None:
    """An :class:`OutputError` for OS errors that mean "cannot write here", else None.
    ``creating``: ``exc`` came from creating ``path`` or a file in it, where "no such file"
    means the location takes no new entries (a pseudo file system such as /proc)."""
    reason = _OUTPUT_ERRNOS.get(exc.errno)
    if reason is None and creating and exc.errno == errno.ENOENT:
        reason = "nothing can be created there" if Path(path).parent.exists() else "its directory does not exist"
    return OutputError(f"cannot write {path}: {reason}") if reason else None


def write_error(exc: BaseException) -> OutputError | None:
    """An :class:`OutputError` for an OS error that only writing can cause (a full disk, a
    quota, a read-only file system, a file size limit), wherever it was raised; else None."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return output_error(exc, exc.filename or "a file")
    return None


def room_error(directory: os.PathLike | str, nbytes: int, shown_as: os.PathLike | str | None = None
               ) -> OutputError | None:
    """An :class:`OutputError` if ``nbytes`` cannot be written in ``directory`` now, else
    None: tried by reserving them in a probe file, removed at once.

    For native writers (a linker, OpenVINO's serializer, MetaSchedule's appends) that
    report a full disk in their own words, or not at all."""
    probe = Path(directory) / f".evit-space-probe-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _reserve(fd, max(1, nbytes))
        finally:
            os.close(fd)
    except OSError as exc:
        return output_error(exc, shown_as or directory, creating=True)
    finally:
        probe.unlink(missing_ok=True)
    return None


def _reserve(fd: int, nbytes: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
        return
    chunk = bytes(1 << 20)              # macOS has no posix_fallocate: the bytes written out
    while nbytes > 0:
        nbytes -= os.write(fd, chunk[:nbytes])


def artifact_room_error(path: os.PathLike | str, nbytes: int, *, directory: os.PathLike | str | None = None
                        ) -> OutputError | None:
    """:func:`room_error` for an artifact ``path`` of at least ``nbytes``: in the directory it
    is written to (``directory``, a staging area, or its own), then in the temporary
    directory where converters and compilers put their intermediate files."""
    import tempfile

    temp = tempfile.gettempdir()
    return (room_error(directory or Path(path).parent, nbytes, shown_as=path)
            or room_error(temp, nbytes, shown_as=f"{temp} (where converters put their temporary files; TMPDIR "
                                                 f"moves them)"))


class Lock:
    """A held ``flock`` (:func:`exclusive_lock`): released by :meth:`close`, by leaving a
    ``with`` block, or by the end of the process, crashed or not (no stale lock)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close         # as a file object: dropped, it lets go

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exclusive_lock(path: os.PathLike | str, busy: str) -> Lock:
    """An exclusive ``flock`` for one writer on ``path``: a directory itself (nothing is
    added to it), or a file, created if need be. A :class:`BadInputError` saying ``busy``
    when another process holds it; where the file system cannot lock it (a directory on
    NFS, say), nothing is held."""
    import fcntl

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                                                      0o644)
    except OSError:
        return Lock(None)       # cannot be opened to lock (a folder this user may write but not list)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BadInputError(busy) from None
    except OSError:
        pass                    # no lock here (ENOLCK, EBADF, EOPNOTSUPP): go on without
    return Lock(fd)


def ensure_output_dir(path: os.PathLike | str) -> Path:
    """Create ``path`` if needed and check that files can be created in it."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"output location {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".evit-write-probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise output_error(exc, path, creating=True) or exc from None
    return path


def ensure_output_file(path: os.PathLike | str) -> Path:
    """Check, before the work that produces it, that the file ``path`` can be written:
    not a directory, its directory created if needed and writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    ensure_output_dir(path.parent)
    return path


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def publish(tmp: Path, final: Path) -> None:
    """Move a finished file or directory to its final name, replacing what was there.

    Files are replaced atomically. A directory cannot be swapped in one step, so the old
    one is first renamed aside: the final name holds either the old or the new complete
    tree, never a partial one (a Ctrl-C waits until both renames are done).
    """
    if tmp.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        with ctrl_c_deferred():
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
        remove(old)
    else:
        os.replace(tmp, final)


def publish_together(moves: Iterable[tuple[Path, Path]]) -> list[Path]:
    """:func:`publish` each (finished, final) pair, in order, as one step for Ctrl-C: an
    artifact of several files (a model and its weights) is never left half old, half new
    by an interrupt. Returns the final paths."""
    done = []
    with ctrl_c_deferred():
        for tmp, final in moves:
            publish(tmp, final)
            done.append(final)
    return done


def temp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(final: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; when the block succeeds it replaces ``final``.

    On any failure, including Ctrl-C, the temporary is removed and ``final`` is untouched.
    """
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        publish(tmp, final)
    except OSError as exc:
        remove(tmp)
        raise output_error(exc, final, creating=exc.filename == str(tmp)) or exc from None
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: os.PathLike | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: os.PathLike | str, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# A fixed timestamp (the earliest a zip can hold) so archives depend on contents only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def deterministic_zip(src_dir: os.PathLike | str, dst: os.PathLike | str) -> Path:
    """Zip a directory (as ``<dirname>/...``) atomically: entries sorted by path, dated
    1980-01-01, with fixed permissions, so the same tree always gives the same bytes."""
    import zipfile

    src_dir, dst = Path(src_dir), Path(dst)
    files = sorted((p for p in src_dir.rglob("*") if p.is_file()), key=lambda p: p.relative_to(src_dir).as_posix())
    with atomic_path(dst) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in files:
                info = zipfile.ZipInfo(f"{src_dir.name}/{path.relative_to(src_dir).as_posix()}", _ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3                      # unix, so the mode below is honoured
                info.external_attr = 0o100644 << 16
                archive.writestr(info, path.read_bytes(), compresslevel=9)
    return dst


def sha256_file(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory as its sorted relative paths and contents."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
