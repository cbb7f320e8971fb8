"""Adapter config: presets carry exactly the flags of docs/design.md, 'Presets';
bad values name field and value."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from helpers import PRESETS, preset
from tiedlora.config import CONF_DIR, compose, to_object
from tiedlora.peft import FactorConfig, PeftConfig

# docs/design.md, 'Presets': (A trainable, A tied, B trainable, B tied, u trainable, v trainable)
TABLE = {
    "lora": (True, False, True, False, False, False),
    "vera": (False, True, False, True, True, True),
    "tl1": (False, True, True, True, True, True),
    "tl2": (False, True, True, True, False, True),
    "tl3": (False, True, True, True, False, False),
    "tl4": (False, True, True, True, True, False),
    "tl5": (True, True, True, True, False, False),
    "tl6": (True, True, True, True, True, True),
    "tl7": (True, True, True, True, False, True),
}


def test_preset_files_are_exactly_the_table():
    assert sorted(p.stem for p in (CONF_DIR / "peft").glob("*.yaml")) == sorted(TABLE)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_flags(name):
    c = preset(name)
    got = (c.A.trainable, c.A.tied, c.B.trainable, c.B.tied, c.u.trainable, c.v.trainable)
    assert got == TABLE[name]
    assert c.name == name and c.target_modules == ["linear_qkv"] and c.rank == 8


@pytest.mark.parametrize("name", PRESETS)
def test_preset_starts_at_delta_zero_with_one_trainable_zero(name):
    c = preset(name)
    zeros = [f for f in "ABuv" if c.resolved_init(f) in ("zeros", 0.0)]
    assert len(zeros) == 1 and getattr(c, zeros[0]).trainable


def test_vera_u_starts_at_point_one():
    assert preset("vera").resolved_init("u") == 0.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"peft.rank=0"),
    (dict(rank=-3), r"peft.rank=-3"),
    (dict(alpha=-1.0), r"peft.alpha=-1.0"),
    (dict(dropout=1.5), r"peft.dropout=1.5"),
    (dict(target_modules=["linear_qkvv"]), r"unknown target 'linear_qkvv'"),
    (dict(target_modules=[]), r"peft.target_modules=\[\]"),
    (dict(target_modules=["linear_qkv", "linear_qkv"]), r"duplicate"),
    (dict(u=FactorConfig(tied=True)), r"peft.u.tied=True"),
    (dict(v=FactorConfig(tied=True)), r"peft.v.tied=True"),
    (dict(u=FactorConfig(init="gaussian")), r"peft.u.init='gaussian'"),
    # B zero (v frozen) and u zero: a saddle
    (dict(v=FactorConfig(trainable=False), u=FactorConfig(init="zeros")), r"saddle"),
    # v frozen at zero: never trains
    (dict(v=FactorConfig(trainable=False, init="zeros")), r"peft.v.init='zeros' with peft.v.trainable=False"),
    # nothing at zero: ΔW != 0 at step 0
    (dict(v=FactorConfig(init="ones")), r"no factor starts at zero"),
    (dict(A=FactorConfig(trainable=False), B=FactorConfig(trainable=False),
          u=FactorConfig(trainable=False), v=FactorConfig(trainable=False)), r"every factor is frozen"),
])
def test_bad_values_name_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeftConfig(**kwargs)


def test_bad_override_through_hydra_names_the_key():
    with pytest.raises(Exception, match="peft.rank=0"):
        to_object(compose("params", ["peft=tl6", "peft.rank=0"]))
    with pytest.raises((ConfigCompositionException, ValidationError), match="rnk"):
        compose("params", ["peft.rnk=4"])


def test_target_absent_from_model_is_rejected(mp1):
    import torch

    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import apply_peft
    from helpers import tiny_model_cfg

    model = build_gpt_model(tiny_model_cfg())
    for layer in model.decoder.layers:  # a model without MLP blocks
        layer.mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="'linear_fc1' is not present in transformer layer 1"):
        apply_peft(model, preset("tl6", target_modules="[linear_qkv,linear_fc1]"))


def test_formula_matches_issue_numbers():
    shapes = {"linear_qkv": (2048, 6144)}
    assert preset("lora").trainable_count(shapes, 24) == 1_572_864
    assert preset("tl6").trainable_count(shapes, 24) == 213_184
