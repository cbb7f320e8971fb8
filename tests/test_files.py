"""Atomic writes, strict JSON, refused writes and the locks (tiedlora.files): a failed write
leaves the previous content and no temporary file behind; one run holds an output folder."""

import errno
import json
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from pathlib import Path

import pytest

from tiedlora.errors import UserError, WriteFailed
from tiedlora.files import (RUN_LOCK, RunDirBusy, append_line, atomic_write, atomic_write_text, file_lock,
                            lock_run_dir, run_dir_holder, staged, staged_dir, to_json)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_staged_files_are_renamed_only_when_the_block_succeeds(tmp_path):
    with staged(tmp_path / "a.txt") as tmp:
        tmp.write_text("new")
        assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "a.txt").read_text() == "new"


def test_staged_dir_publishes_whole_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(FileExistsError, match="already exists"):
        with staged_dir(out):
            pass
    with staged_dir(out, replace=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["y"]


def _hold(path, log, tag):
    with file_lock(path):
        with open(log, "a") as f:
            f.write(f"{tag}+")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"{tag}-")


def test_file_lock_serialises_processes(tmp_path):
    lock, log = tmp_path / ".lock", tmp_path / "log"
    procs = [mp.get_context("fork").Process(target=_hold, args=(lock, log, t)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    text = log.read_text()
    assert text in ("a+a-b+b-", "b+b-a+a-"), text


# --------------------------------------------------------------------- strict JSON
def test_to_json_refuses_nan_and_infinity_naming_the_key():
    assert json.loads(to_json({"a": [1.5, None]})) == {"a": [1.5, None]}
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(RuntimeError, match=r"non-finite number as JSON, at 'metrics.rougeL.1'"):
            to_json({"metrics": {"rougeL": [0.0, bad]}})


# ------------------------------------------------------------ the storage refuses a write
def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_becomes_one_message_and_leaves_the_old_content(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def half_then_full(tmp):
        Path(tmp).write_text("hal")
        _enospc()

    with pytest.raises(WriteFailed) as e:
        atomic_write(target, half_then_full, "write results.json")
    msg = str(e.value)
    assert msg.startswith(f"could not write {target} (write results.json): No space left on device [ENOSPC]; ")
    assert msg.endswith("left on its file system") and e.value.path == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_full_disk_inside_a_staged_folder_names_the_final_path(tmp_path):
    final = tmp_path / "checkpoints" / "step_0000008"
    with pytest.raises(WriteFailed) as e:
        with staged_dir(final, operation="save a checkpoint") as tmp:
            atomic_write(tmp / "state.safetensors", _enospc, "save a checkpoint")
    assert f"could not write {final / 'state.safetensors'} (save a checkpoint)" in str(e.value)
    assert ".step_0000008." not in str(e.value) and e.value.path == str(final / "state.safetensors")
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no temporary folder left


def test_other_os_errors_keep_their_meaning(tmp_path):
    def missing(_):
        raise FileNotFoundError(errno.ENOENT, "No such file", "/nope")

    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "x", missing)


def _append_over_the_limit(path, limit):
    """In a child: a file-size limit the write crosses halfway (the kernel writes part, then EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        append_line(path, "x" * 400, "append a metrics line")
    except WriteFailed as e:
        os._exit(5 if "could not write" in str(e) and "[EFBIG]" in str(e) else 1)
    os._exit(0)


def test_a_failed_append_is_cut_back_to_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}')
    size = path.stat().st_size
    child = mp.get_context("fork").Process(target=_append_over_the_limit, args=(path, size + 100))
    child.start()
    child.join(30)
    assert child.exitcode == 5
    assert path.read_text() == '{"step": 1}\n'  # the 100 bytes that made it were cut off again


# ----------------------------------------------------------------- one run per folder
def _hold_run_dir(folder, conn, env):
    os.environ.update(env)
    lock = lock_run_dir(folder)
    conn.send(lock.holder)
    conn.recv()  # until told (or killed)
    lock.release()
    conn.send("released")


class _Holder:
    def __init__(self, folder, **env):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hold_run_dir, args=(folder, child, env))
        self.proc.start()
        self.info = self.conn.recv()

    def release(self):
        self.conn.send("go")
        assert self.conn.recv() == "released"
        self.proc.join(10)


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    held = _Holder(tmp_path / "run", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3", SLURM_JOB_ID="80")
    t0 = time.monotonic()
    with pytest.raises(RunDirBusy) as e:
        lock_run_dir(tmp_path / "run")
    assert time.monotonic() - t0 < 5  # at once (one second of retries at most)
    assert f"output_dir {tmp_path / 'run'} is in use by another run (pid {held.proc.pid} on " in str(e.value)
    assert f"started {held.info['started']}, Slurm job 77_3)" in str(e.value)
    assert run_dir_holder(tmp_path / "run" / "best" / "adapter.safetensors") == (tmp_path / "run", held.info)
    held.release()
    assert run_dir_holder(tmp_path / "run") is None
    lock = lock_run_dir(tmp_path / "run")  # free again
    assert json.loads((tmp_path / "run" / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    held = _Holder(tmp_path / "run")
    os.kill(held.proc.pid, signal.SIGKILL)
    held.proc.join(10)
    lock_run_dir(tmp_path / "run").release()


def test_a_run_waits_for_the_lock_up_to_its_limit(tmp_path):
    held = _Holder(tmp_path / "run", SLURM_JOB_ID="12")
    told = []
    threading.Timer(1.5, held.release).start()
    t0 = time.monotonic()
    lock = lock_run_dir(tmp_path / "run", wait_s=30, on_wait=told.append)
    assert 1.0 < time.monotonic() - t0 < 20
    assert len(told) == 1 and "Slurm job 12" in told[0] and "waiting up to 30 s" in told[0]
    lock.release()
    held = _Holder(tmp_path / "run")
    with pytest.raises(RunDirBusy, match="after waiting 2 s"):
        lock_run_dir(tmp_path / "run", wait_s=2)
    held.release()


def test_a_file_system_without_flock_is_refused_with_the_override_named(tmp_path, monkeypatch):
    from tiedlora import files

    def no_flock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    with pytest.raises(UserError, match="refuses flock .*Lustre: -o flock.*trainer.lock=false"):
        lock_run_dir(tmp_path / "run")
    assert run_dir_holder(tmp_path / "run") is None  # a reader says nothing when it cannot tell
