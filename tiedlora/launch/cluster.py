"""The cluster description: one YAML per cluster under ``conf/launcher/``, typed by :class:`ClusterConfig`.

``python -m tiedlora.submit launcher=<name> launcher.partition=gpu ...`` and
``python -m tiedlora.finetune -m hydra/launcher=slurm hydra.launcher.cluster=<name> ...`` both read
it, so partition, account, GPUs, container and signal lead time are written down once.
A path to a YAML file outside the repository works wherever a name does.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from tiedlora.errors import preempt_exit_code_problem

LAUNCHER_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "launcher"

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")  # sbatch --time forms
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ContainerConfig:
    """pyxis/enroot flags added to ``srun`` (Slurm sites with the pyxis plugin)."""

    image: Optional[str] = None  # --container-image: registry tag (nvcr.io#nvidia/nemo:26.02) or .sqsh file
    mounts: List[str] = field(default_factory=list)  # --container-mounts entries "SRC:DST[:FLAGS]"
    workdir: Optional[str] = None  # --container-workdir (the repository inside the container)


@dataclass
class ClusterConfig:
    """Where and how jobs run; every field is one sbatch/srun option or one line of the script."""

    partition: Optional[str] = None  # --partition (None: the cluster's default)
    account: Optional[str] = None  # --account
    qos: Optional[str] = None  # --qos
    nodes: int = 1  # --nodes
    gpus_per_node: int = 0  # --gpus-per-node (0: CPU-only cluster, no GPU request)
    ntasks_per_node: int = 1  # --ntasks-per-node: one task per GPU (srun starts the ranks)
    cpus_per_task: Optional[int] = None  # --cpus-per-task
    mem: Optional[str] = None  # --mem per node, e.g. "0" (all of it) or "200G"
    time: str = "01:00:00"  # --time limit per job ([D-]HH:MM:SS)
    array_parallelism: int = 16  # %K: array tasks running at once
    signal: str = "USR1"  # sent to the training before the time limit (--signal=SIG@lead)
    signal_lead_s: int = 300  # seconds before the limit: enough for one step + a checkpoint
    requeue: bool = True  # requeue the job when the training exits with preempt_exit_code
    max_requeues: int = 20  # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
    preempt_exit_code: int = 3  # = trainer.preempt_exit_code of the recipe
    torchrun: bool = False  # False: srun starts one task per GPU; True: one torchrun per node
    python: Optional[str] = None  # interpreter in the job (None: the one running the submit command)
    setup: List[str] = field(default_factory=list)  # shell lines run before srun (module load, ...)
    env: Dict[str, str] = field(default_factory=dict)  # variables exported in the job
    extra_sbatch: List[str] = field(default_factory=list)  # more sbatch options: "--exclusive", "--constraint=h100"
    srun_args: List[str] = field(default_factory=list)  # more srun options: "--mpi=pmix"
    container: ContainerConfig = field(default_factory=ContainerConfig)

    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"launcher.{name}={value!r}: {why}")

        for name in ("nodes", "ntasks_per_node", "array_parallelism"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be >= 1")
        for name in ("gpus_per_node", "signal_lead_s", "max_requeues"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            bad("cpus_per_task", self.cpus_per_task, "must be >= 1")
        if self.gpus_per_node and not self.torchrun and self.ntasks_per_node != self.gpus_per_node:
            bad("ntasks_per_node", self.ntasks_per_node,
                f"srun starts one rank per task: set it to gpus_per_node={self.gpus_per_node}")
        if not _TIME.match(self.time):
            bad("time", self.time, "expected [D-]HH:MM:SS, MM:SS or minutes")
        if not hasattr(signal, "SIG" + self.signal.removeprefix("SIG")):
            bad("signal", self.signal, "not a signal name (USR1, USR2, TERM, ...)")
        self.signal = self.signal.removeprefix("SIG")
        why = preempt_exit_code_problem(self.preempt_exit_code)
        if why:
            bad("preempt_exit_code", self.preempt_exit_code, why)
        for name in ("partition", "account", "qos", "mem", "time", "python"):
            _check_line(f"launcher.{name}", getattr(self, name))
        for i, opt in enumerate(self.extra_sbatch):
            _check_line(f"launcher.extra_sbatch[{i}]", opt)
            if not opt.startswith("-"):
                bad(f"extra_sbatch[{i}]", opt, 'an sbatch option such as "--exclusive" or "--constraint=h100"')
        for i, opt in enumerate(self.srun_args):
            _check_line(f"launcher.srun_args[{i}]", opt)
        for i, line in enumerate(self.setup):
            if "\n" in line:
                bad(f"setup[{i}]", line, "one shell line per entry")
        for k in self.env:
            if not _ENV_NAME.match(k):
                bad(f"env.{k}", self.env[k], "not a valid environment variable name")
        c = self.container
        for i, m in enumerate(c.mounts):
            if "," in m:
                bad(f"container.mounts[{i}]", m, "one mount per entry (pyxis joins them with commas)")

    @property
    def timeout_min(self) -> int:
        """--time in whole minutes (rounded up)."""
        days = 0
        t = self.time
        if "-" in t:
            d, t = t.split("-", 1)
            days = int(d)
        parts = [int(p) for p in t.split(":")]
        if len(parts) == 1:  # minutes (or D-HH)
            secs = parts[0] * (3600 if days else 60)
        elif len(parts) == 2:  # MM:SS (or D-HH:MM)
            secs = parts[0] * 3600 + parts[1] * 60 if days else parts[0] * 60 + parts[1]
        else:
            secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
        return -(-(days * 86400 + secs) // 60)

    def container_flags(self) -> List[str]:
        """The pyxis options for ``srun`` (empty without an image)."""
        c = self.container
        if not c.image:
            return []
        flags = [f"--container-image={c.image}"]
        if c.mounts:
            flags.append(f"--container-mounts={','.join(c.mounts)}")
        if c.workdir:
            flags.append(f"--container-workdir={c.workdir}")
        return flags


def _check_line(name: str, value: Optional[str]) -> None:
    """Values written on an ``#SBATCH`` line: no newline, no backslash (sbatch drops it)."""
    if value is not None and ("\n" in value or "\\" in value):
        raise ValueError(f"{name}={value!r}: newlines and backslashes cannot be passed to sbatch")


def available() -> List[str]:
    return sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))


def cluster_file(name: str) -> Path:
    """``local`` -> conf/launcher/local.yaml; an existing path is used as it is."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    f = LAUNCHER_DIR / f"{name}.yaml"
    if not f.is_file():
        raise ValueError(f"launcher={name!r}: no conf/launcher/{name}.yaml and no such YAML file "
                         f"(available: {', '.join(available())})")
    return f


def load_cluster(name: str = "local", overrides: Sequence[str] = ()) -> ClusterConfig:
    """The typed cluster config: ``conf/launcher/<name>.yaml`` plus ``key=value`` overrides."""
    schema = OmegaConf.structured(ClusterConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.load(cluster_file(name)))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)
