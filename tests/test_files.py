"""Atomic writes and the cross-process lock (tiedlora.files): a failed write leaves the
previous content and no temporary file behind."""

import multiprocessing as mp
import time

import pytest

from tiedlora.files import atomic_write, atomic_write_text, file_lock, staged, staged_dir


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
