"""Writing files so that a crash never leaves half of one, and locking across processes.

Every file and folder tiedlora publishes (adapters, checkpoints, results, generated task
data, tokenizers, merged models, exported adapters) is written under a temporary name
in the destination's own folder, flushed to disk, and renamed into place: a rename
within one file system is atomic, so a reader sees the old content or the new, never a
mix. This module is the one place that does it::

    with staged("out/results.json") as tmp:      # tmp: a Path beside the target
        tmp.write_text(...)                      # renamed onto the target on success
    atomic_write_text("out/config.yaml", text)   # the same for one string
    with staged_dir("out/merged") as tmp:        # a folder, built whole, then renamed
        ...
    with file_lock(cache / ".build.lock"):       # one process at a time on this machine
        ...

On an exception the temporary file or folder is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged(path: os.PathLike | str) -> Iterator[Path]:
    """A temporary file beside ``path``; fsynced and renamed onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: os.PathLike | str, write) -> Path:
    """``write(tmp_path: str)`` then fsync and rename onto ``path``; returns ``path``."""
    with staged(path) as tmp:
        write(str(tmp))
    return Path(path)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    """UTF-8 text, written atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(path: os.PathLike | str, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed onto ``path`` once the block succeeds.

    ``replace=True`` removes an existing ``path`` first (a rerun's checkpoint of the same
    step); otherwise an existing ``path`` is an error raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path}: already exists; choose a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: os.PathLike | str) -> Iterator[None]:
    """Exclusive lock on ``path`` (created if missing) held for the block (``flock``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
