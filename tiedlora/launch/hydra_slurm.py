"""``hydra/launcher=slurm``: Hydra multirun on Slurm through hydra-submitit-launcher, configured by
the same cluster description as ``python -m tiedlora.submit`` (``conf/launcher/<name>.yaml``)::

    python -m tiedlora.finetune -m hydra/launcher=slurm hydra.launcher.cluster=local peft=lora,tl6
    python -m tiedlora.finetune -m hydra/launcher=slurm hydra.launcher.cluster=ngc \\
        hydra.launcher.timeout_min=240 model=gpt2b_001 task=squad peft=lora,tl6 peft.rank=8,32

What it adds to the plugin's ``submitit_slurm``:

* every field left unset (``null``) comes from the cluster file: partition, account, nodes,
  tasks per node (= GPUs), GPUs, time, array throttle, signal lead time, set-up lines, extra
  sbatch options; ``srun_args`` (not in the plugin's schema) carries the pyxis container flags;
* in the job, before Hydra runs the task: the torch.distributed variables (MASTER_ADDR/PORT,
  RANK, WORLD_SIZE, LOCAL_RANK) are exported from Slurm's for multi-task jobs, all GPUs stay
  visible (megatron picks its device by local rank);
* preemption: submitit asks Slurm for USR2 before the time limit; it is forwarded to the training
  as the cluster's signal (USR1), the training saves a checkpoint and exits with status 3, and
  rank 0 requeues the job (``scontrol requeue``). The rerun resumes from the checkpoint in the
  same output_dir. Every task runs the Hydra job; only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tiedlora.launch.cluster import ClusterConfig, load_cluster

log = logging.getLogger(__name__)

try:  # the `slurm` extra: pip install 'tiedlora[slurm]'
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    SlurmQueueConf = SlurmLauncher = None

# Hydra instantiates launchers only from the `hydra_plugins` namespace: the class below is
# registered with Hydra's plugin registry under this module name (see register()). Only the
# submitting process needs it; the jobs run a plain importable SlurmJob.
_PLUGIN_MODULE = "hydra_plugins.tiedlora_slurm"

# plugin field <- cluster field (applied when the plugin field is None)
_FROM_CLUSTER = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes",
                 "tasks_per_node": "ntasks_per_node", "cpus_per_task": "cpus_per_task",
                 "array_parallelism": "array_parallelism", "signal_delay_s": "signal_lead_s"}

if SlurmQueueConf is not None:

    @dataclass
    class ClusterSlurmConf(SlurmQueueConf):
        """``SlurmQueueConf`` whose unset fields come from ``conf/launcher/<cluster>.yaml``."""

        _target_: str = f"{_PLUGIN_MODULE}.ClusterSlurmLauncher"
        cluster: str = "local"  # conf/launcher/<name>.yaml, or a path to such a YAML file
        timeout_min: Optional[int] = None  # None: the cluster's `time`
        tasks_per_node: Optional[int] = None
        nodes: Optional[int] = None
        signal_delay_s: Optional[int] = None
        array_parallelism: Optional[int] = None
        max_num_timeout: int = 0  # submitit's own requeue on timeouts (ours runs on exit status 3)
        srun_args: Optional[List[str]] = None  # None: the cluster's srun_args + container flags
        submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"


def launcher_params(params: Dict[str, Any], cluster: ClusterConfig) -> Dict[str, Any]:
    """The plugin's parameters with every unset one taken from ``cluster``."""
    p = dict(params)
    for key, src in _FROM_CLUSTER.items():
        if p.get(key) is None:
            p[key] = getattr(cluster, src)
    if p.get("gpus_per_node") is None and cluster.gpus_per_node:
        p["gpus_per_node"] = cluster.gpus_per_node
    if p.get("timeout_min") is None:
        p["timeout_min"] = cluster.timeout_min
    if p.get("srun_args") is None:
        p["srun_args"] = [*cluster.srun_args, *cluster.container_flags()]
    setup = list(p.get("setup") or [])
    p["setup"] = [*cluster.setup, *(f"export {k}={shlex.quote(v)}" for k, v in cluster.env.items()), *setup]
    extra = dict(p.get("additional_parameters") or {})
    if cluster.mem is not None:
        extra.setdefault("mem", cluster.mem)
    if cluster.requeue:
        extra.setdefault("requeue", True)
    for opt in cluster.extra_sbatch:
        key, eq, value = opt.lstrip("-").partition("=")
        extra.setdefault(key, value if eq else True)
    p["additional_parameters"] = extra
    return p


def _forward_signal(target: int):
    """Handler: pass submitit's preemption signal on to the training's handler (if installed)."""

    def handler(signum, frame):
        current = signal.getsignal(target)
        if callable(current):
            log.warning("signal %s: forwarded to the training as %s", signal.Signals(signum).name,
                        signal.Signals(target).name)
            current(target, frame)
        else:
            log.warning("signal %s before the training started: ignored", signal.Signals(signum).name)

    return handler


class SlurmJob:
    """What each Slurm task runs: the plugin's Hydra job, plus distributed env, signal and requeue."""

    def __init__(self, launcher, cluster: ClusterConfig):
        self.launcher = launcher  # the plugin's SlurmLauncher, set up (runs the Hydra job)
        self.cluster = cluster

    def __call__(self, *args):
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # megatron wants all GPUs visible: it picks the device by LOCAL_RANK
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        target = getattr(signal, "SIG" + self.cluster.signal)
        signal.signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), _forward_signal(target))
        try:
            return self.launcher(*args)
        except SystemExit as e:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            if (e.code == self.cluster.preempt_exit_code and self.cluster.requeue
                    and restarts < self.cluster.max_requeues and env.global_rank == 0):
                log.warning("checkpoint saved after a signal: requeueing job %s", env.job_id)
                print(f"[tiedlora] checkpoint saved after a signal: requeueing job {env.job_id}", flush=True)
                subprocess.run(["scontrol", "requeue", env.job_id], check=False, timeout=60)
            raise  # no result file: the submitting side keeps waiting for the rerun


if SlurmLauncher is not None:

    class ClusterSlurmLauncher(SlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher + cluster file, distributed env and requeue."""

        def __init__(self, cluster: str = "local", **params: Any) -> None:
            super().__init__(**params)  # resolves OmegaConf containers
            self.cluster_name = cluster
            self.cluster = load_cluster(cluster)
            self.params = launcher_params(self.params, self.cluster)

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            import submitit
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            assert self.config is not None and len(job_overrides) > 0
            params = dict(self.params)
            init = {"folder": params.pop("submitit_folder"),
                    "slurm_max_num_timeout": params.pop("max_num_timeout"),
                    "slurm_python": self.cluster.python}  # None: this interpreter
            executor = submitit.AutoExecutor(cluster="slurm", **init)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            log.info("Slurm sweep (cluster %s) in %s", self.cluster_name, sweep_dir)
            inner = SlurmLauncher()  # the plugin's own job runner (pickled into the job)
            inner.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
            job_params = []
            for idx, overrides in enumerate(job_overrides):
                idx += initial_job_idx
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                   Singleton.get_state()))
            jobs = executor.map_array(SlurmJob(inner, self.cluster), *zip(*job_params))
            return [j.results()[0] for j in jobs]

    ClusterSlurmLauncher.__module__ = _PLUGIN_MODULE


def register() -> bool:
    """Store ``hydra/launcher=slurm`` in Hydra's ConfigStore (False without the `slurm` extra)."""
    if SlurmQueueConf is None:
        return False
    from hydra.core.config_store import ConfigStore

    from hydra.core.plugins import Plugins

    ConfigStore.instance().store(group="hydra/launcher", name="slurm", node=ClusterSlurmConf,
                                 provider="tiedlora")
    Plugins.instance().register(ClusterSlurmLauncher)
    sys.modules.setdefault(_PLUGIN_MODULE, sys.modules[__name__])  # importable by that name here too
    return True


__all__ = ["SlurmJob", "launcher_params", "register"] + (["ClusterSlurmConf", "ClusterSlurmLauncher"]
                                             if SlurmQueueConf is not None else [])
