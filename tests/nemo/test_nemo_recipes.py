"""TiedLoRA in NeMo 2's fine-tuning recipes (tiedlora.integrations.nemo_recipes), built on CPU.

A recipe is a nemo_run ``Partial`` of ``llm.finetune``; building one runs nothing. The recipe
from :func:`finetune_recipe` must be NeMo's own ``lora`` recipe with ``peft`` swapped for a
TiedLoRA (and the two model fields TiedLoRA needs), field for field.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed")
run = pytest.importorskip("nemo_run", reason="nemo_run is not installed")

import fiddle as fdl  # noqa: E402

MODEL = "llama2_7b"  # the paper's LLaMA-2-7B
RECIPE_ARGS = dict(name="tl6_test", num_nodes=2, num_gpus_per_node=4, dir="/tmp/never_written")
SWAPPED_MODEL_FIELDS = ("transformer_layer_spec", "persist_layer_norm")


def _nemo_lora_recipe():
    from nemo.collections.llm.recipes import llama2_7b

    return llama2_7b.finetune_recipe(peft_scheme="lora", **RECIPE_ARGS)


def _undo_swap(ours, ref):
    """``ours`` with peft and the swapped model fields set back to what ``ref`` has."""
    ours.peft = ref.peft
    for field in SWAPPED_MODEL_FIELDS:
        if field in ref.model.config.__arguments__:
            setattr(ours.model.config, field, getattr(ref.model.config, field))
        else:
            delattr(ours.model.config, field)
    return ours


@pytest.mark.nemo
def test_recipe_is_nemos_lora_recipe_with_tiedlora():
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    from tiedlora.integrations.nemo import TiedLoRA
    from tiedlora.integrations.nemo_recipes import finetune_recipe

    ours, ref = finetune_recipe(MODEL, preset="tl6", rank=8, **RECIPE_ARGS), _nemo_lora_recipe()
    assert fdl.get_callable(ref.peft).__name__ == "LoRA"
    assert fdl.get_callable(ours.peft) is TiedLoRA
    assert ours.peft.__arguments__ == {"preset": "tl6", "rank": 8}
    peft = fdl.build(ours.peft)
    cfg = peft.peft_config
    assert (cfg.name, cfg.rank, cfg.target_modules) == ("tl6", 8, ["linear_qkv"])
    assert all((getattr(cfg, f).trainable, getattr(cfg, f).tied) == (True, f in "AB") for f in "ABuv")
    assert ours.model.config.transformer_layer_spec is local_layer_spec
    assert ours.model.config.persist_layer_norm is False
    assert ours != ref  # the comparison below sees the swap
    assert _undo_swap(ours, ref) == ref  # every other field is NeMo's lora recipe's


@pytest.mark.nemo
def test_recipe_passes_adapter_fields():
    from tiedlora.integrations.nemo_recipes import finetune_recipe

    recipe = finetune_recipe(MODEL, preset="vera", rank=32, target_modules=["linear_qkv", "linear_fc1"],
                             alpha=64, dropout=0.1, dropout_position="post", **RECIPE_ARGS)
    cfg = fdl.build(recipe.peft).peft_config
    assert (cfg.name, cfg.rank, cfg.alpha, cfg.target_modules) == ("vera", 32, 64, ["linear_qkv", "linear_fc1"])
    assert (cfg.dropout, cfg.dropout_position) == (0.1, "post")
    assert not cfg.A.trainable and cfg.A.tied and cfg.u.trainable


@pytest.mark.nemo
@pytest.mark.parametrize("kwargs,words", [
    (dict(model="no_such_model"), "nemo.collections.llm.recipes.no_such_model"),
    (dict(model=MODEL, preset="tl9"), "preset='tl9'"),
    (dict(model=MODEL, rank=0), "rank"),
    (dict(model=MODEL, peft_scheme="lora"), "peft_scheme='lora'"),
])
def test_recipe_refuses_bad_input(kwargs, words):
    from tiedlora.integrations.nemo_recipes import finetune_recipe

    with pytest.raises(ValueError) as e:
        finetune_recipe(**kwargs)
    assert words in str(e.value)


@pytest.mark.nemo
def test_cli_factory_is_registered_for_nemo_run():
    """``nemo llm finetune --factory llama2_7b_tiedlora``: the factory resolves under llm.finetune."""
    import tiedlora.integrations.nemo_recipes as recipes
    from nemo.collections.llm.api import finetune

    from tiedlora.integrations.nemo import TiedLoRA

    assert MODEL in recipes.CLI_MODELS
    factory = run.cli.resolve_factory(finetune, f"{MODEL}_tiedlora")
    recipe = factory(preset="tl1", rank=2, num_nodes=1)
    assert fdl.get_callable(recipe) is finetune
    assert fdl.get_callable(recipe.peft) is TiedLoRA
    assert fdl.build(recipe.peft).peft_config.name == "tl1" and recipe.peft.rank == 2
