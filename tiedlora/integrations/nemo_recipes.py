"""TiedLoRA next to ``lora`` in NeMo 2's fine-tuning recipes (``nemo.collections.llm.recipes``).

NeMo's recipes take ``peft_scheme`` as a string and accept only their own names: each model's
``finetune_recipe`` tests ``peft_scheme.lower() in ['lora', 'dora']`` before it looks the class up
in ``llm.peft.PEFT_STR2CLS``, so no entry added to that table reaches them. Instead,
:func:`finetune_recipe` builds NeMo's own ``lora`` recipe for the model and swaps its ``peft``
for a :class:`~tiedlora.integrations.nemo.TiedLoRA`; everything else (trainer, data, optimizer,
learning rate, logging, resume) stays NeMo's::

    from tiedlora.integrations.nemo_recipes import finetune_recipe
    recipe = finetune_recipe("llama2_7b", preset="tl6", rank=8, name="llama2_7b_tl6", num_nodes=1)
    recipe.resume.restore_config.path = "/ckpt/llama2-7b-nemo2"     # any recipe field, as usual
    run.run(recipe, executor=run.LocalExecutor(ntasks_per_node=8, launcher="torchrun"))

Two fields of the model config change as well, because TiedLoRA needs them:
``transformer_layer_spec = local_layer_spec`` (TiedLoRA wraps megatron-core's
``ColumnParallelLinear`` / ``RowParallelLinear``; transformer-engine's fused layernorm-linear is
refused) and ``persist_layer_norm = False`` (the local spec's torch norm, used without apex,
refuses it).

For the NeMo-run command line, importing this module registers one factory per NeMo recipe
name listed in ``CLI_MODELS``, ``<model>_tiedlora``, under ``llm.finetune``. NeMo's ``nemo``
command loads ``workspace.py`` from the working directory, so a one-line
``import tiedlora.integrations.nemo_recipes`` there makes them available::

    nemo llm finetune --factory "llama2_7b_tiedlora(preset=tl1, rank=32)" --dryrun

The adapter is chosen through the factory's arguments (``preset``, ``rank``): NeMo-run's parser
does not read ``peft.preset=...`` overrides ("Unsupported type: Optional[str]": TiedLoRA's field
annotations are strings). This module has no ``from __future__ import annotations`` for the
same reason: the factories' annotations must be real types.
"""


import importlib
from typing import Any, Dict, List, Optional

from tiedlora.integrations.nemo import TiedLoRA

__all__ = ["CLI_MODELS", "finetune_recipe", "peft_config"]

# NeMo recipe modules that get a `<model>_tiedlora` command-line factory (the paper's LLaMA-2-7B
# first); finetune_recipe itself takes any recipe module that has a finetune_recipe.
CLI_MODELS = ("llama2_7b", "llama3_8b", "mistral_7b")


def peft_config(preset: Optional[str] = "tl6", **fields: Any):
    """``run.Config(TiedLoRA, preset=..., <fields that are not None>)``, checked by building it once."""
    import nemo_run as run

    fields = {k: v for k, v in fields.items() if v is not None}
    TiedLoRA(preset=preset, **fields)  # raises ValueError naming a bad preset or field now, not at launch
    return run.Config(TiedLoRA, preset=preset, **fields)


def finetune_recipe(model: str = "llama2_7b", preset: Optional[str] = "tl6", rank: Optional[int] = None,
                    alpha: Optional[float] = None, dropout: Optional[float] = None,
                    dropout_position: Optional[str] = None, target_modules: Optional[List[str]] = None, seed: Optional[int] = None,
                    A: Optional[Dict[str, Any]] = None, B: Optional[Dict[str, Any]] = None,
                    u: Optional[Dict[str, Any]] = None, v: Optional[Dict[str, Any]] = None,
                    **recipe_kwargs: Any):
    """NeMo's ``llm.recipes.<model>.finetune_recipe(peft_scheme="lora", **recipe_kwargs)`` with TiedLoRA.

    ``preset`` and the adapter fields are :class:`TiedLoRA`'s (``None`` keeps the preset's value:
    TL6 is the paper's recommended configuration, r=8 on the fused QKV projection).
    ``recipe_kwargs`` go to NeMo's recipe (``dir``, ``name``, ``num_nodes``,
    ``num_gpus_per_node``, ``seq_length``, ...). Returns NeMo's ``run.Partial`` of
    ``llm.finetune``.
    """
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    if "peft_scheme" in recipe_kwargs:
        raise ValueError(f"finetune_recipe(peft_scheme={recipe_kwargs['peft_scheme']!r}): the scheme is TiedLoRA "
                         "here; choose the adapter with preset=... (lora, vera, tl1 ... tl7)")
    try:
        module = importlib.import_module(f"nemo.collections.llm.recipes.{model}")
    except ModuleNotFoundError:
        raise ValueError(f"finetune_recipe(model={model!r}): NeMo has no recipe module "
                         f"nemo.collections.llm.recipes.{model}") from None
    if not hasattr(module, "finetune_recipe"):
        raise ValueError(f"finetune_recipe(model={model!r}): nemo.collections.llm.recipes.{model} has no "
                         "finetune_recipe")
    peft = peft_config(preset, rank=rank, alpha=alpha, dropout=dropout, dropout_position=dropout_position,
                       target_modules=target_modules, seed=seed, A=A, B=B, u=u, v=v)
    recipe = module.finetune_recipe(peft_scheme="lora", **recipe_kwargs)
    recipe.peft = peft
    recipe.model.config.transformer_layer_spec = local_layer_spec
    recipe.model.config.persist_layer_norm = False
    return recipe


def _register_cli_factories() -> None:
    """``<model>_tiedlora`` factories for ``nemo llm finetune --factory ...`` (NeMo-run)."""
    import nemo_run as run
    from nemo.collections.llm.api import finetune

    def make(model: str):
        def factory(dir: Optional[str] = None, name: str = "default", num_nodes: int = 1,
                    num_gpus_per_node: int = 8, preset: str = "tl6", rank: int = 8) -> run.Partial:
            return finetune_recipe(model, preset=preset, rank=rank, dir=dir, name=name, num_nodes=num_nodes,
                                   num_gpus_per_node=num_gpus_per_node)

        factory.__name__ = factory.__qualname__ = f"{model}_tiedlora"
        factory.__doc__ = f"NeMo's {model} fine-tuning recipe with TiedLoRA (default: TL6, r=8, fused QKV)."
        return factory

    for model in CLI_MODELS:
        run.cli.factory(target=finetune, name=f"{model}_tiedlora")(make(model))

_register_cli_factories()
