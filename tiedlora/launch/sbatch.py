"""sbatch scripts for fine-tuning sweeps: one job per run, or one job array with a ``%K`` throttle.

What one generated training script does (``<sweep>/slurm/train.sbatch``)::

    #SBATCH --nodes, --ntasks-per-node (= GPUs), --gpus-per-node, --time, --signal=USR1@lead,
    #SBATCH --requeue, --open-mode=append, --array=0-(N-1)%K
    MASTER_ADDR = first host of the job, MASTER_PORT from the job id
    ARGS = the overrides of array index $SLURM_ARRAY_TASK_ID     (a case statement, all quoted)
    TIEDLORA_OUTPUT_DIR = its output folder; ARGS has output_dir=${oc.env:TIEDLORA_OUTPUT_DIR}
    srun [pyxis flags] python -m tiedlora.finetune "${ARGS[@]}"  (one rank per task; tiedlora.dist
                                                                  reads SLURM_PROCID/NTASKS/LOCALID)
    exit status 3 (checkpoint saved on the signal) -> scontrol requeue $SLURM_JOB_ID
                                                   -> the rerun resumes from output_dir/checkpoints

Every value that comes from a user (paths, overrides, cluster fields) is passed through
``shlex.quote``, so spaces, quotes, ``$(...)`` and ``;`` arrive as literal text; the output
folder goes through the environment, so no Hydra or YAML parser ever reads it.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from tiedlora.launch.cluster import ClusterConfig

# The output folder reaches the program through the environment, untouched by any parser: the
# override below is plain text for bash (single-quoted), Hydra and YAML alike.
OUTPUT_DIR_ENV = "TIEDLORA_OUTPUT_DIR"
OUTPUT_DIR_OVERRIDE = "output_dir=${oc.env:%s}" % OUTPUT_DIR_ENV

_SIMPLE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def hydra_quote(value: str) -> str:
    """A Hydra override value (and OmegaConf dotlist value) that parses back to exactly ``value``."""
    if "${" in value:
        raise ValueError(f"{value!r}: '${{' would be read as an interpolation; rename the path")
    if _SIMPLE.match(value) and not re.match(r"^[-+]?\d", value) and value.lower() not in (
            "null", "true", "false", "nan", "inf"):
        return value
    if '"' not in value and "\\" not in value:
        return f'"{value}"'  # read the same by Hydra's grammar and by YAML (tiedlora.evaluate)
    # Hydra's quoted strings: backslashes are literal except before a quote or at the end
    body = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{body}'"


def slurm_filename(path: str) -> str:
    """A path for --output: Slurm expands ``%`` patterns, so a literal ``%`` is written ``%%``."""
    return path.replace("%", "%%")


def q(value) -> str:
    return shlex.quote(str(value))


@dataclass
class JobSpec:
    """One run of the sweep: its index in the array, a readable name, its output dir and argv."""

    index: int
    name: str
    output_dir: str
    args: List[str]  # after `python -m <entry>`
    overrides: List[str] = field(default_factory=list)  # the sweep overrides alone (for reports)
    recipe: Optional[str] = None


def sbatch_header(cluster: ClusterConfig, *, job_name: str, log_pattern: str, array: Optional[str],
                  preemptible: bool) -> List[str]:
    """``#SBATCH`` lines; ``log_pattern`` is a Slurm filename pattern (``%j``; literal ``%`` as ``%%``)."""
    tasks = 1 if cluster.torchrun else cluster.ntasks_per_node
    cpus = cluster.cpus_per_task
    if cluster.torchrun and cpus:
        cpus *= cluster.ntasks_per_node  # one torchrun task holds the CPUs of all its ranks
    opts = [("job-name", job_name), ("partition", cluster.partition), ("account", cluster.account),
            ("qos", cluster.qos), ("nodes", cluster.nodes), ("ntasks-per-node", tasks),
            ("gpus-per-node", cluster.gpus_per_node or None), ("cpus-per-task", cpus),
            ("mem", cluster.mem), ("time", cluster.time), ("output", log_pattern),
            ("open-mode", "append"), ("array", array)]
    if preemptible:
        opts.append(("signal", f"{cluster.signal}@{cluster.signal_lead_s}"))
    lines = [f"#SBATCH --{k}={q(v)}" for k, v in opts if v is not None]
    if preemptible and cluster.requeue:
        lines.append("#SBATCH --requeue")
    lines += [f"#SBATCH {q(opt)}" for opt in cluster.extra_sbatch]
    return lines


def launch_command(cluster: ClusterConfig, python: str, entry: str) -> List[str]:
    """The srun (and torchrun) words before the per-job arguments, already shell-quoted."""
    srun = ["srun", "--kill-on-bad-exit=1"]
    if cluster.torchrun:
        srun += ["--ntasks-per-node=1", '--ntasks="$SLURM_JOB_NUM_NODES"']
    srun += [q(a) for a in cluster.srun_args] + [q(a) for a in cluster.container_flags()]
    if cluster.torchrun:
        return srun + [q(python), "-m", "torch.distributed.run", '--nnodes="$SLURM_JOB_NUM_NODES"',
                       f"--nproc-per-node={cluster.ntasks_per_node}", "--rdzv-backend=c10d",
                       '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
                       "-m", q(entry)]
    return srun + [q(python), "-m", q(entry)]


def render_script(cluster: ClusterConfig, jobs: Sequence[JobSpec], *, kind: str, entry: str, python: str,
                  job_name: str, log_dir: str, array: bool, sweep_dir: str) -> str:
    """The sbatch script for ``jobs`` (several jobs: a job array, one per index)."""
    preemptible = kind == "train"
    if array:
        last = max(j.index for j in jobs)
        spec = f"{','.join(str(j.index) for j in jobs)}" if len(jobs) != last + 1 else f"0-{last}"
        array_opt = f"{spec}%{cluster.array_parallelism}"
        log = f"{slurm_filename(log_dir)}/{kind}-%A_%a.out"
    else:
        assert len(jobs) == 1
        array_opt = None
        log = f"{slurm_filename(log_dir)}/{kind}-{jobs[0].name}-%j.out"
    out = ["#!/bin/bash",
           f"# Generated by `python -m tiedlora.submit` at {time.strftime('%Y-%m-%d %H:%M:%S')}: {kind} "
           f"script of {len(jobs)} job(s).",
           f"# Sweep folder: {sweep_dir!r} (sweep.json lists the jobs; "
           "`python -m tiedlora.submit status <sweep folder>` reports them).",
           "# Regenerate it with the submit command instead of editing it.",
           *sbatch_header(cluster, job_name=job_name, log_pattern=log, array=array_opt,
                          preemptible=preemptible),
           "set -uo pipefail", ""]
    if cluster.setup:
        out += ["# cluster set-up (launcher.setup)", *cluster.setup, ""]
    for k, v in cluster.env.items():
        out.append(f"export {k}={q(v)}")
    out += ["# rendezvous of the ranks (tiedlora/dist.py, torchrun): first node of the job, port from the job id",
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            "export MASTER_ADDR",
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))", "",
            'case "${SLURM_ARRAY_TASK_ID:-%d}" in' % jobs[0].index]
    for j in jobs:
        out.append(f"  {j.index}) {OUTPUT_DIR_ENV}={q(j.output_dir)}; ARGS=({' '.join(q(a) for a in j.args)}) ;;")
    out += ['  *) echo "[tiedlora] no job for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", f"export {OUTPUT_DIR_ENV}", "",
            'echo "[tiedlora] $(date "+%F %T") job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} '
            'on ${SLURM_JOB_NODELIST}: ' + f'{entry} ${{ARGS[*]}} (output_dir: ${OUTPUT_DIR_ENV})"',
            " ".join(launch_command(cluster, python, entry)) + ' "${ARGS[@]}"',
            "rc=$?"]
    if preemptible and cluster.requeue:
        code = cluster.preempt_exit_code
        out += [f"# {code} = trainer.preempt_exit_code: a checkpoint was saved on the signal -> run again",
                f'if [ "$rc" -eq {code} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {cluster.max_requeues} ]; then',
                '  echo "[tiedlora] $(date "+%F %T") checkpoint saved after a signal: requeueing job $SLURM_JOB_ID"',
                '  scontrol requeue "$SLURM_JOB_ID"  # ends this script; the rerun resumes from the checkpoint',
                "fi"]
    out += ['echo "[tiedlora] $(date "+%F %T") exit status $rc"', 'exit "$rc"', ""]
    return "\n".join(out)
