"""A task's data files (``conf/task/*.yaml`` describes the task: :class:`tiedlora.config.TaskConfig`).

A task is NeMo SFT JSONL (``train``/``validation``/``test`` files in ``data_dir``) plus
how to prompt and score it. Embedded miniature tasks name a ``generator`` from
:mod:`tiedlora.data.mini_tasks`; their files are generated deterministically on first
use into ``data_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from tiedlora.config import SPLITS, TaskConfig
from tiedlora.files import file_lock


def prepare_files(task: TaskConfig) -> Dict[str, Path]:
    """Paths of the task's split files, generating embedded tasks when missing.

    Safe to call from every process at once: generation runs under a file lock beside the
    data folder (call it before the process group exists, so no rank waits in a barrier).
    """
    d = task.resolved_data_dir()
    files = {s: d / f"{s}.jsonl" for s in SPLITS}
    if task.generator is not None and not all(p.is_file() for p in files.values()):
        from tiedlora.data.mini_tasks import write_task

        with file_lock(d.parent / f".{d.name}.lock"):
            if not all(p.is_file() for p in files.values()):
                write_task(task.generator, d, task.num_train, task.num_validation, task.num_test,
                           task.data_seed)
    missing = [str(p) for s, p in files.items() if not p.is_file() and (s != "test" or task.eval_split == "test")]
    if missing:
        raise FileNotFoundError(
            f"task {task.name!r}: missing data file(s) {missing}; prepare them first "
            f"(python -m tiedlora.prepare_data task={task.name}) or set task.data_dir")
    return files


def read_task_data(task: TaskConfig, splits=("train", "validation")) -> dict:
    """Every split the run reads (``splits`` and the evaluation split), read and checked
    line by line: ``{"files": {split: path}, split: records, ...}``. Called before any base
    weights are loaded, so a mistake in the data is reported at once."""
    from tiedlora.data.sft import read_jsonl

    files = prepare_files(task)
    out = {"files": files}
    for split in dict.fromkeys((*splits, task.eval_split)):
        out[split] = read_jsonl(files[split])
    return out
