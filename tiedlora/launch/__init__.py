"""Launching fine-tunes on clusters: Slurm sbatch scripts and job arrays, pyxis containers, preemption.

* :mod:`tiedlora.launch.cluster` - the cluster description (``conf/launcher/<name>.yaml``), typed.
* :mod:`tiedlora.launch.sbatch` - renders the sbatch scripts (every user value ``shlex.quote``-d).
* :mod:`tiedlora.launch.hydra_slurm` - ``hydra/launcher=slurm``: hydra-submitit-launcher driven by
  the same cluster description, with distributed env export and requeue on preemption.
* :mod:`tiedlora.submit` - the command line: ``python -m tiedlora.submit ...``.

Shell launchers for torchrun (no scheduler) live in ``launch/`` at the repository root.
"""
