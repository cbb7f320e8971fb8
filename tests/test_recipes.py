"""The paper's recipe grid (recipes/ only): generated files in sync with
tiedlora/recipes.py; every recipe composes with Hydra and validates, with the paper's
settings (docs/design.md, 'Training settings of the paper'), the model / task / preset /
rank its path names and a layout that fits one 8-GPU node; each model's grid.yaml
multirun expresses the same grid.
"""

import dataclasses
import itertools
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import yaml

from helpers import PRESETS, ROOT
from tiedlora import recipes as gen
from tiedlora.config import CONF_DIR, register_configs, to_object

# The paper's training defaults (docs/design.md, 'Training settings of the paper'),
# written out here, not read from the generator
PAPER_OPTIM = {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 50, "weight_decay": 0.01, "betas": [0.9, 0.98],
               "grad_clip": 1.0}
PAPER_TRAINER = {"global_batch_size": 128, "micro_batch_size": 4, "val_check_interval": 200,
                 "early_stopping_patience": 10}
TASKS = ["squad", "dialogsum", "hellaswag", "iwslt2017_de_en", "gsm8k"]
RANKS = [2, 8, 32, 128]
# model -> its presets: the paper's two bases with all nine, LLaMA-3.1-8B with LoRA, VeRA and TL6
MODELS = {"gpt2b_001": PRESETS, "llama2_7b": PRESETS, "llama3_8b": ["lora", "vera", "tl6"]}
GPUS = 8
CHECKPOINTS = {"GPT2B_001": "/ckpt/GPT-2B-001_bf16_tp1.nemo", "LLAMA2_7B": "/ckpt/Llama-2-7b-hf",
               "LLAMA3_8B": "/ckpt/Llama-3.1-8B"}
ENV = {"gpt2b_001": "GPT2B_001", "llama2_7b": "LLAMA2_7B", "llama3_8b": "LLAMA3_8B"}  # the variable each model's recipes read
GRID = [f"{m}/{t}/{p}_r{r}" for m, presets in MODELS.items() for t in TASKS for p in presets for r in RANKS]


# ------------------------------------------------------------------ composition helpers
def _compose(config_dir: str, name: str, overrides=(), hydra_node: bool = False):
    """Hydra's compose API, searching ``config_dir`` then conf/ (as ``--config-dir`` does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                       return_hydra_config=hydra_node)


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(to_object(cfg))


def _paths(d: dict, prefix: str = "") -> set:
    return set().union(*[_paths(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k} for k, v in d.items()])


def _compose_folder(folder: str) -> dict:
    """{recipe id: (config dict, None) or (None, error)} for every recipe of one folder.

    The first rank of each preset is composed by Hydra's compose API. Its siblings at the
    other ranks have the same defaults list and set the same keys in their own body (the
    last, ``_self_``, entry; checked here), so each is composed by merging its body onto
    that composition -- Hydra's last step -- and validated like the first.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    GlobalHydra.instance().clear()
    out = {}
    with initialize_config_dir(config_dir=folder, version_base="1.3"):
        for preset in MODELS[Path(folder).parent.name]:
            first = None
            for rank in RANKS:
                f = Path(folder) / f"{preset}_r{rank}.yaml"
                rid = f"{Path(folder).parent.name}/{Path(folder).name}/{f.stem}"
                try:
                    body = yaml.safe_load(f.read_text())
                    defaults = body.pop("defaults")
                    if first is None:
                        cfg = compose(config_name=f.stem, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]"])
                        first = (cfg, defaults, _paths(body))
                    else:
                        assert (defaults, _paths(body)) == first[1:], f"{f.name} is not {preset}_r{RANKS[0]} + rank"
                        cfg = OmegaConf.merge(first[0], body)
                    out[rid] = (dataclasses.asdict(to_object(cfg)), None)
                except Exception as e:  # noqa: BLE001 - reported by the test of that recipe
                    out[rid] = (None, f"{type(e).__name__}: {e}")
    return out


@pytest.fixture(scope="module")
def composed():
    """Every recipe composed once: folders split over the CPU cores (forked workers)."""
    saved = {k: os.environ.get(k) for k in CHECKPOINTS}
    os.environ.update(CHECKPOINTS)
    try:
        folders = sorted(str(p) for p in (ROOT / "recipes").glob("*/*") if p.is_dir())
        with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            results = {}
            for part in pool.map(_compose_folder, folders):
                results.update(part)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


# ----------------------------------------------------------------------------- tests
def test_generated_files_match_the_generator():
    assert gen.drift() == [], "run `python -m tiedlora.recipes` and commit the result"


def test_drift_check_catches_edits_missing_and_stale_files(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    shutil.copytree(ROOT / "conf" / "sweep", tmp_path / "conf" / "sweep")
    assert gen.drift(tmp_path) == []
    edited = tmp_path / "recipes/gpt2b_001/squad/tl6_r8.yaml"
    edited.write_text(edited.read_text().replace("rank: 8", "rank: 16"))
    (tmp_path / "recipes/llama2_7b/gsm8k/vera_r2.yaml").unlink()
    (tmp_path / "recipes/llama2_7b/gsm8k/tl9_r2.yaml").write_text("# old\n")
    (tmp_path / "recipes/llama2_7b/grid_old.yaml").write_text("# old\n")
    (tmp_path / "conf/sweep/paper_settings.yaml").write_text(
        (ROOT / "conf/sweep/paper_settings.yaml").read_text().replace("lr: 1.0e-4", "lr: 2.0e-4"))
    assert gen.drift(tmp_path) == [
        "recipes/README.md", "recipes/gpt2b_001/squad/tl6_r8.yaml", "recipes/llama2_7b/gsm8k/vera_r2.yaml",
        "recipes/llama2_7b/grid_old.yaml (stale)", "recipes/llama2_7b/gsm8k/tl9_r2.yaml (stale)"]
    assert gen.write(tmp_path) == 5 and gen.drift(tmp_path) == []
    assert not (tmp_path / "recipes/llama2_7b/gsm8k/tl9_r2.yaml").exists()


def test_grid_is_complete_and_uses_existing_groups():
    found = sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix()
                   for p in (ROOT / "recipes").glob("*/*/*.yaml"))
    assert found == sorted(GRID) and len(found) == 2 * 180 + 60
    for group, names in (("model", list(MODELS)), ("task", TASKS), ("peft", PRESETS)):
        assert all((CONF_DIR / group / f"{n}.yaml").is_file() for n in names), group
    for path in (ROOT / "recipes").glob("*/*/*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_" and all(line.startswith("#") for line in lines[1:4]), path


@pytest.mark.parametrize("rid", GRID)
def test_recipe_composes_and_validates(composed, rid):
    cfg, error = composed[rid]
    assert error is None, f"recipes/{rid}.yaml: {error}"
    model, task, stem = rid.split("/")
    preset, rank = stem.rsplit("_r", 1)
    assert (cfg["model"]["name"], cfg["task"]["name"], cfg["peft"]["name"], cfg["peft"]["rank"]) == \
        (model, task, preset, int(rank))
    flags = yaml.safe_load((CONF_DIR / "peft" / f"{preset}.yaml").read_text())
    assert all(cfg["peft"][f]["trainable"] == flags[f]["trainable"] for f in "ABuv")
    assert cfg["peft"]["target_modules"] == ["linear_qkv"]  # the paper adapts QKV only
    assert {k: cfg["optim"][k] for k in PAPER_OPTIM} == PAPER_OPTIM
    assert {k: cfg["trainer"][k] for k in PAPER_TRAINER} == PAPER_TRAINER
    t = cfg["task"]
    assert (t["max_length"], t["answer_only_loss"], t["data_dir"], t["eval_split"]) == (2048, True, f"data/{task}", "test")
    assert t["add_bos"] == model.startswith("llama")
    assert cfg["model"]["checkpoint"] == CHECKPOINTS[ENV[model]]
    assert cfg["output_dir"] == f"outputs/paper/{rid}"
    # the layout fits one node of 8 GPUs and the global batch splits evenly over it
    par, m = cfg["parallel"], cfg["model"]
    assert GPUS % (par["tp"] * par["pp"]) == 0
    dp = GPUS // (par["tp"] * par["pp"])
    assert PAPER_TRAINER["global_batch_size"] % (PAPER_TRAINER["micro_batch_size"] * dp) == 0
    assert m["num_attention_heads"] % par["tp"] == 0 and m["num_layers"] % par["pp"] == 0
    assert par["sp"] == (par["tp"] > 1)


def test_missing_checkpoint_names_the_variable_and_key(monkeypatch):
    monkeypatch.delenv("LLAMA2_7B", raising=False)
    cfg = _compose(str(ROOT / "recipes/llama2_7b/squad"), "tl6_r8")
    with pytest.raises(Exception, match=r"(?s)Environment variable 'LLAMA2_7B' not found.*model\.checkpoint"):
        _as_dict(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_grid_file_is_the_same_grid_as_the_recipes(model, monkeypatch):
    for k, v in CHECKPOINTS.items():
        monkeypatch.setenv(k, v)
    cfg = _compose(str(ROOT / "recipes" / model), "grid", hydra_node=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    points = {f"{model}/{t}/{p}_r{r}" for t, p, r in itertools.product(params["task"], params["peft"], params["peft.rank"])}
    assert set(params) == {"task", "peft", "peft.rank"}
    assert points == {rid for rid in GRID if rid.startswith(model + "/")}
    for task, preset, rank in (("hellaswag", "vera", 32), ("gsm8k", MODELS[model][-1], 2)):  # one job == its recipe
        job = _compose(str(ROOT / "recipes" / model), "grid", [f"task={task}", f"peft={preset}",
                                                               f"peft.rank={rank}"])
        recipe = _compose(str(ROOT / "recipes" / model / task), f"{preset}_r{rank}")
        assert _as_dict(job) == _as_dict(recipe)


def test_lr_sweep_on_a_recipe(monkeypatch):
    monkeypatch.setenv("GPT2B_001", CHECKPOINTS["GPT2B_001"])
    cfg = _compose(str(ROOT / "recipes/gpt2b_001/squad"), "tl6_r8", ["+sweep=lr"], hydra_node=True)
    assert cfg.hydra.sweeper._target_.endswith("LRBracketSweeper")  # brackets: tests/test_lr_sweep.py
    assert list(cfg.hydra.sweeper.lrs) == [3e-5, 1e-4, 3e-4] and not cfg.hydra.sweeper.allow_edge
    d = _as_dict(_compose(str(ROOT / "recipes/gpt2b_001/squad"), "tl6_r8", ["+sweep=lr", "optim.lr=3e-4"]))
    assert d["output_dir"] == "outputs/lr_sweep/gpt2b_001/squad/tl6_r8_lr0.0003"
    plain = _as_dict(_compose(str(ROOT / "recipes/gpt2b_001/squad"), "tl6_r8", ["optim.lr=3e-4"]))
    assert {**d, "output_dir": None} == {**plain, "output_dir": None}


def test_recipe_from_the_command_line():
    """The documented command: ``--config-dir`` adds the recipe's folder; conf/ is always searched."""
    env = {**os.environ, "LLAMA2_7B": "/ckpt/llama"}
    res = subprocess.run([sys.executable, "-m", "tiedlora.finetune", "--config-dir", "recipes/llama2_7b/gsm8k",
                          "--config-name", "tl3_r32", "trainer.max_steps=7", "--cfg", "job", "--resolve"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    assert (cfg["model"]["name"], cfg["model"]["checkpoint"], cfg["peft"]["name"], cfg["peft"]["rank"]) == \
        ("llama2_7b", "/ckpt/llama", "tl3", 32)
    assert (cfg["task"]["name"], cfg["parallel"]["tp"], cfg["trainer"]["max_steps"], cfg["optim"]["lr"]) == \
        ("gsm8k", 2, 7, 1e-4)
    assert cfg["output_dir"] == "outputs/paper/llama2_7b/gsm8k/tl3_r32"
