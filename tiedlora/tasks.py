"""Task configuration (``conf/task/*.yaml``): data files, prompt, lengths, metric.

A task is NeMo SFT JSONL (``train``/``validation``/``test`` files in ``data_dir``) plus
how to prompt and score it. Embedded miniature tasks name a ``generator`` from
:mod:`tiedlora.data.mini_tasks`; their files are generated deterministically on first
use into ``data_dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from tiedlora.data.sft import PromptTemplate

KINDS = ("generate", "multiple_choice")
SPLITS = ("train", "validation", "test")


def cache_root() -> Path:
    """``$TIEDLORA_CACHE`` or ``~/.cache/tiedlora``."""
    return Path(os.environ.get("TIEDLORA_CACHE", Path.home() / ".cache" / "tiedlora"))


@dataclass
class TaskConfig:
    name: str = "mini_qa"
    kind: str = "generate"  # generate (greedy decoding) | multiple_choice (log-likelihood)
    metric: str = "squad"  # squad | rouge | bleu | accuracy | gsm8k (tiedlora.metrics)
    data_dir: Optional[str] = None  # holds {train,validation,test}.jsonl; None: cache for generated tasks
    generator: Optional[str] = None  # mini task generator; files are generated when missing
    num_train: int = 2000  # generated tasks only
    num_validation: int = 200
    num_test: int = 200
    data_seed: int = 0
    template: str = "{input} {output}"  # must end with {output}
    max_length: int = 2048  # tokens per training example (prompt truncated from the left)
    max_new_tokens: int = 64  # generation budget at evaluation
    add_bos: bool = False
    add_eos: bool = True
    answer_only_loss: bool = True
    eval_split: str = "test"  # split scored at the end (validation: for tasks without labels)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task.kind={self.kind!r}: expected one of {list(KINDS)}")
        from tiedlora.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"task.metric={self.metric!r}: expected one of {sorted(METRICS)}")
        try:
            PromptTemplate(self.template)
        except ValueError as e:
            raise ValueError(f"task.template: {e}") from None
        if self.eval_split not in SPLITS:
            raise ValueError(f"task.eval_split={self.eval_split!r}: expected one of {list(SPLITS)}")
        if self.data_dir is None and self.generator is None:
            raise ValueError(f"task {self.name!r}: set task.data_dir (a folder with train/validation/test.jsonl)")
        if self.generator is not None:
            from tiedlora.data.mini_tasks import TASKS

            if self.generator not in TASKS:
                raise ValueError(f"task.generator={self.generator!r}: expected one of {sorted(TASKS)}")
        for f in ("max_length", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"task.{f}={getattr(self, f)!r}: must be >= 1")

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        key = f"{self.generator}-n{self.num_train}-{self.num_validation}-{self.num_test}-s{self.data_seed}"
        return cache_root() / "tasks" / key


def prepare_files(task: TaskConfig) -> Dict[str, Path]:
    """Paths of the task's split files, generating embedded tasks when missing.

    Call on one rank (rank 0) and barrier before others read.
    """
    d = task.resolved_data_dir()
    files = {s: d / f"{s}.jsonl" for s in SPLITS}
    if task.generator is not None and not all(p.is_file() for p in files.values()):
        from tiedlora.data.mini_tasks import write_task

        write_task(task.generator, d, task.num_train, task.num_validation, task.num_test, task.data_seed)
    missing = [str(p) for s, p in files.items() if not p.is_file() and (s != "test" or task.eval_split == "test")]
    if missing:
        raise FileNotFoundError(
            f"task {task.name!r}: missing data file(s) {missing}; prepare them first "
            f"(python -m tiedlora.prepare_data task={task.name}) or set task.data_dir")
    return files
