"""Process-group and megatron parallel-state set-up for torchrun, srun and plain python.

The distributed environment is read from, in order:

1. torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``);
2. Slurm's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of
   ``SLURM_JOB_NODELIST``) when a job step is started by ``srun`` without torchrun;
3. otherwise a single process on a free loopback port.

The backend is NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from tiedlora import compat
from tiedlora.config import ParallelConfig
from tiedlora.errors import WriteFailed


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``node[01-04,07],gpu9`` -> ``node01``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return "127.0.0.1"
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                       "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT") or 20000 + job % 20000), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def die_with_launcher() -> bool:
    """Under torchrun, make this worker die (SIGKILL) when its launcher dies.

    torchrun starts every worker in a session of its own (``start_new_session=True``), so
    when the launcher alone is killed (``kill -9`` of torchrun, an OOM kill) the workers
    are orphaned and keep training, writing metrics and checkpoints into the output
    directory that a rerun then resumes from, concurrently. Linux ``prctl``; a no-op
    elsewhere and without torchrun (Slurm's ``srun`` kills the whole step itself).
    Returns whether it is armed.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before we armed it
        os._exit(1)
    return True


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> DistEnv:
    """Initialise torch.distributed and megatron's parallel state for ``parallel``.

    Idempotent within a process only if called with the same layout.
    """
    from megatron.core import parallel_state as ps

    compat.require("init_distributed")
    env = detect_env()
    if not dist.is_initialized():
        die_with_launcher()
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if compat.cuda_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend="nccl" if compat.cuda_available() else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
        )
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp):
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp*parallel.pp="
            f"{parallel.tp * parallel.pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
    )
    set_seed(seed)
    return env


def set_seed(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker identically on every rank."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ groups and ranks
@dataclass(frozen=True)
class ProcessGroups:
    """The process groups of this rank, read once from megatron's parallel state.

    ``None`` stands for a group of one (a single process, or a size-1 dimension before
    any process group exists). Run-level code takes one of these and passes it on
    (adapter state dicts, gradient synchronisation, clipping, training state, evaluation)
    instead of asking megatron's globals at each use.
    """

    tp: object = None  # tensor parallel: shards of one layer
    pp: object = None  # pipeline parallel: stages of one model replica
    dp: object = None  # data parallel: replicas
    mp: object = None  # model parallel = tp x pp: one replica

    @staticmethod
    def size(group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def rank(group) -> int:
        return 0 if group is None else dist.get_rank(group)


def process_groups() -> ProcessGroups:
    """This rank's groups from megatron's parallel state (all ``None`` before it exists)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ProcessGroups()
    return ProcessGroups(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                         dp=ps.get_data_parallel_group(), mp=ps.get_model_parallel_group())


def is_rank0() -> bool:
    """The process that writes files and prints: global rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (an all-reduce; the flag itself on one process)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank0_writes(write: Callable[[], None]) -> None:
    """``write()`` on rank 0 while the other ranks wait; then every rank returns, or every rank
    raises :class:`~tiedlora.errors.WriteFailed` when rank 0's write failed (rank 0 its own,
    with the path; the others a quiet one), so a full disk ends all ranks with status 5
    instead of leaving them waiting in the next collective. Costs what a barrier costs."""
    failed = None
    if is_rank0():
        try:
            write()
        except WriteFailed as e:
            failed = e
    if any_rank(failed is not None):
        raise failed or WriteFailed.elsewhere()


def agree_on_rank0(outcome: Optional[str]) -> Optional[str]:
    """Rank 0's ``outcome`` (a message, or None) on every rank: one broadcast."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return outcome
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]
