"""Every YAML under conf/ composes with the primary configs that use its group, and validates."""

from pathlib import Path

import pytest
import yaml

from tiedlora.config import CONF_DIR, compose, to_object

PRIMARIES = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
GROUP_FILES = sorted(p for p in CONF_DIR.glob("*/*.yaml"))


def _groups_of(primary: str) -> set:
    defaults = yaml.safe_load((CONF_DIR / f"{primary}.yaml").read_text()).get("defaults", [])
    return {next(iter(d)) for d in defaults if isinstance(d, dict) and "override" not in next(iter(d))}


CASES = [(prim, f) for f in GROUP_FILES for prim in PRIMARIES if f.parent.name in _groups_of(prim)]
# Groups composed on demand with '+group=option' (not in any defaults list).
APPENDED = {"sweep": "finetune"}
CASES += [(APPENDED[f.parent.name], f) for f in GROUP_FILES if f.parent.name in APPENDED]
# Cluster descriptions read by tiedlora.submit / hydra/launcher=slurm (tested in test_launch*).
NOT_HYDRA_GROUPS = set(CONF_DIR.glob("launcher/*.yaml"))


def test_every_group_file_is_used_by_a_primary():
    covered = {f for _, f in CASES} | NOT_HYDRA_GROUPS
    assert covered == set(GROUP_FILES), sorted(str(f) for f in set(GROUP_FILES) - covered)


@pytest.mark.parametrize("primary", PRIMARIES)
def test_primary_composes(primary):
    to_object(compose(primary))


@pytest.mark.parametrize("primary, path", CASES, ids=[f"{p}:{f.parent.name}/{f.stem}" for p, f in CASES])
def test_group_file_composes(primary, path: Path, monkeypatch):
    # recipes and paper sweeps read the checkpoint locations from the environment
    monkeypatch.setenv("GPT2B_001", "/ckpt/GPT-2B-001_bf16_tp1.nemo")
    monkeypatch.setenv("LLAMA2_7B", "/ckpt/Llama-2-7b-hf")
    plus = "+" if path.parent.name in APPENDED else ""
    cfg = to_object(compose(primary, [f"{plus}{path.parent.name}={path.stem}"]))
    assert cfg is not None


@pytest.mark.parametrize("path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_yaml_opens_with_comment_header(path: Path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and lines[1].startswith("#"), f"{path}: needs a 2-4 line comment header"


PRESETS = sorted(p.stem for p in (CONF_DIR / "peft").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_carries_its_rate_and_a_run_uses_it(preset):
    """optim.lr is null in conf/finetune.yaml: a run takes its preset's rate (peft.lr), and says so."""
    cfg = to_object(compose("finetune", [f"peft={preset}"]))
    rate = yaml.safe_load((CONF_DIR / "peft" / f"{preset}.yaml").read_text())["lr"]
    assert isinstance(rate, float) and rate > 0
    assert cfg.optim.lr == rate and cfg.lr_source == "peft.lr"
    assert cfg.optim.min_lr <= cfg.optim.lr


def test_an_explicit_rate_wins_over_the_presets():
    cfg = to_object(compose("finetune", ["peft=tl6", "optim.lr=5e-4"]))
    assert cfg.optim.lr == 5e-4 and cfg.lr_source == "optim.lr"
    cfg = to_object(compose("finetune", ["peft=tl6", "peft.lr=7e-3"]))  # the preset's, changed
    assert cfg.optim.lr == 7e-3 and cfg.lr_source == "peft.lr"


def test_no_rate_anywhere_is_named():
    with pytest.raises(ValueError, match=r"optim.lr is null and preset 'tl6' carries no rate \(peft.lr\)"):
        to_object(compose("finetune", ["peft=tl6", "peft.lr=null"]))
    with pytest.raises(ValueError, match=r"optim.min_lr=0.5: must be in \[0, the peak rate 0.03 \(peft.lr of preset"):
        to_object(compose("finetune", ["peft=tl6", "optim.min_lr=0.5"]))
