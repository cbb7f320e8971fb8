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
When the storage itself refuses (disk full, quota, read-only or failing file system), the
error becomes :class:`tiedlora.errors.WriteFailed`: one message naming the path, what it
was written for and the free space left, and exit status 5::

    with staged(path, "write results") as tmp: ...   # ENOSPC -> WriteFailed("could not write ...")
    append_line(run / "metrics.jsonl", to_json(record))  # cut back to whole lines on failure

JSON we write is strict (:func:`to_json`: no NaN or Infinity, which ``jq`` and JavaScript
reject). One run per output folder: :func:`lock_run_dir` takes an exclusive ``flock`` on
``<folder>/run.lock`` for the run's life (the kernel drops it when the process dies, so a
killed run leaves no stale lock) and records who holds it; :func:`run_dir_holder` tells a
reader (evaluate, merge, export) whether a live run holds a folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from tiedlora.errors import UserError, WriteFailed

# What the storage answers when it, not the program, refuses a write: these end a command
# with WriteFailed (exit status 5); other OSErrors (a missing folder, no permission) keep
# their usual meaning.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: os.PathLike | str) -> str:
    """Free space on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return _size(shutil.disk_usage(p).free)
    except OSError as e:
        return f"unknown ({e.strerror})"


@contextlib.contextmanager
def storage_errors(path: os.PathLike | str, operation: str) -> Iterator[None]:
    """Turn an OSError with which the storage refuses a write (:data:`STORAGE_ERRNOS`) into
    :class:`~tiedlora.errors.WriteFailed` naming ``path``, ``operation`` and the free space."""
    try:
        yield
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        code = errno.errorcode.get(e.errno, str(e.errno))
        raise WriteFailed(f"could not write {path} ({operation}): {e.strerror or e} [{code}]; "
                          f"{free_space(path)} left on its file system", str(path), operation) from e


@contextlib.contextmanager
def staged(path: os.PathLike | str, operation: str = "write") -> Iterator[Path]:
    """A temporary file beside ``path``; fsynced and renamed onto ``path`` on success.
    ``operation`` names the write in a :class:`~tiedlora.errors.WriteFailed` message."""
    path = Path(path)
    tmp = None
    try:
        with storage_errors(path, operation):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(tmp)
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: os.PathLike | str, write, operation: str = "write") -> Path:
    """``write(tmp_path: str)`` then fsync and rename onto ``path``; returns ``path``."""
    with staged(path, operation) as tmp:
        write(str(tmp))
    return Path(path)


def atomic_write_bytes(path: os.PathLike | str, data: bytes, operation: str = "write") -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), operation)


def atomic_write_text(path: os.PathLike | str, text: str, operation: str = "write") -> Path:
    """UTF-8 text, written atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), operation)


@contextlib.contextmanager
def staged_dir(path: os.PathLike | str, replace: bool = False, operation: str = "write") -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed onto ``path`` once the block succeeds.

    ``replace=True`` removes an existing ``path`` first (a rerun's checkpoint of the same
    step); otherwise an existing ``path`` is an error raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path}: already exists; choose a new path")
    tmp = None
    try:
        with storage_errors(path, operation):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, WriteFailed):  # name where it was going, not the deleted temporary folder
                e.args = (str(e).replace(str(tmp), str(path)),)
                e.path = e.path.replace(str(tmp), str(path))
        raise


def append_line(path: os.PathLike | str, line: str, operation: str = "append a line") -> None:
    """Append ``line`` and a newline to ``path``, flushed; a failed write is cut back off, so
    the file holds whole lines only (a JSONL reader never meets half a record)."""
    path = Path(path)
    with storage_errors(path, operation):
        # unbuffered: a buffered file would retry the unwritten rest at truncate() and close()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            rest = memoryview((line + "\n").encode("utf-8"))
            try:
                while rest:  # a short write is legal: write the rest, or fail
                    rest = rest[os.write(fd, rest):]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- JSON
def _nonfinite_at(obj, where: str = "") -> Optional[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite_at(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def to_json(obj, **kwargs) -> str:
    """``json.dumps`` that refuses NaN and Infinity (strict JSON: what ``jq``, JavaScript and
    other strict parsers accept). Every JSON text tiedlora writes goes through here; a value
    that can be non-finite is turned into ``null`` (or left out) by its writer first, so a
    non-finite number reaching this is a bug and raises ``RuntimeError`` naming its key."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        where = _nonfinite_at(obj)
        if where is None:
            raise
        raise RuntimeError(f"refusing to write a non-finite number as JSON, at {where!r}") from e


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


# ----------------------------------------------------------------- one run per folder
RUN_LOCK = "run.lock"  # inside a run's output folder; kept after the run (it holds no lock then)
_FLOCK_REFUSED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def run_identity() -> dict:
    """Who is running: host, pid, start time and Slurm job (``<array job>_<task>`` for an
    array task, else the job id; None outside Slurm). Recorded in the lock and results.json."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "slurm_job": job}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that did not say who it is"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return text + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")


def _read_holder(f) -> dict:
    try:
        f.seek(0)
        info = json.loads(f.read().decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunDirBusy(UserError):
    """Another live run holds the output folder (exit status 2)."""


class RunLock:
    """An exclusive ``flock`` on ``<folder>/run.lock``, held until :meth:`release` or the
    process ends (the kernel drops it then: a SIGKILLed run leaves no stale lock); keep a
    reference to it, as the file it holds open is closed (and the lock dropped) with it."""

    def __init__(self, folder: Path, f, holder: dict):
        self.folder, self._f, self.holder = folder, f, holder

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None


def lock_run_dir(folder: os.PathLike | str, wait_s: float = 0.0,
                 on_wait: Optional[Callable[[str], None]] = None) -> RunLock:
    """Take ``<folder>/run.lock`` for this process; wait up to ``wait_s`` seconds (at least one,
    so a reader's momentary check never fails a starting run) for another run to let it go.

    Raises :class:`RunDirBusy` naming the folder and the holder (host, pid, start time, Slurm
    job) when it stays held, and :class:`~tiedlora.errors.UserError` naming the override
    ``trainer.lock=false`` when the file system refuses ``flock`` (Lustre without the
    ``flock`` mount option, NFS without a lock manager). ``on_wait(message)`` is called once
    when the lock is busy and the wait begins.
    """
    folder = Path(folder)
    path = folder / RUN_LOCK
    with storage_errors(path, "create the run lock"):
        folder.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")  # not "w": truncating before the lock is ours would erase the holder
    deadline, told = time.monotonic() + max(wait_s, 1.0), False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno in _FLOCK_REFUSED:
                f.close()
                raise UserError(
                    f"{path}: the file system refuses flock ({e.strerror}), so tiedlora cannot make sure no "
                    "other run writes into this output_dir. Mount it with flock support (Lustre: -o flock; "
                    "NFS: a running lock manager, not -o nolock; see docs/slurm.md) or, if you are sure "
                    "no other run uses this folder, rerun with trainer.lock=false") from None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EINTR):
                f.close()
                raise
        now = time.monotonic()
        if now >= deadline:
            holder = _read_holder(f)
            f.close()
            waited = f" after waiting {wait_s:.0f} s" if wait_s >= 1 else ""
            raise RunDirBusy(f"output_dir {folder} is in use by another run ({describe_holder(holder)}){waited}. "
                             "Two runs in one folder would write the same metrics, checkpoints and results: "
                             "wait for it to end, stop it, or choose another output_dir")
        if not told and wait_s >= 1 and on_wait is not None:
            on_wait(f"output_dir {folder} is held by {describe_holder(_read_holder(f))}; "
                    f"waiting up to {wait_s:.0f} s for it to end")
            told = True
        time.sleep(min(0.5, deadline - now))
    holder = run_identity()
    with storage_errors(path, "record the run lock's holder"):
        f.seek(0)
        f.truncate()
        f.write((to_json(holder) + "\n").encode("utf-8"))
        f.flush()
    return RunLock(folder, f, holder)


def run_dir_holder(path: os.PathLike | str) -> Optional[tuple]:
    """(folder, holder) when ``path`` or one of its three nearest parents is an output folder
    that a live run holds (run.lock locked), else None. The check takes a shared lock for an
    instant; it never creates a lock file."""
    p = Path(path).absolute()
    for folder in [p, *list(p.parents)[:3]]:
        lock = folder / RUN_LOCK
        if not lock.is_file():
            continue
        try:
            with open(lock, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        return folder, _read_holder(f)
                    return None  # the file system cannot tell: say nothing
        except OSError:
            return None
        return None
    return None


def warn_if_run_dir_held(path: os.PathLike | str, what: str) -> None:
    """One ``warning:`` line on stderr when a live run holds the folder ``path`` is in."""
    held = run_dir_holder(path)
    if held is not None:
        folder, holder = held
        print(f"warning: {folder} is in use by a running fine-tune ({describe_holder(holder)}); "
              f"the {what} read from it may change while this command runs", file=sys.stderr, flush=True)


def read_results(path: Path) -> Optional[dict]:
    """A results.json as a dict; None when it is missing or not one JSON object."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return r if isinstance(r, dict) else None
