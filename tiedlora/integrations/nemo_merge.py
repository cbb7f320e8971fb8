"""Fold a NeMo 2 Tied-LoRA adapter checkpoint into a full NeMo 2 checkpoint (like ``llm.peft.merge_lora``).

NeMo's own ``llm.peft.merge_lora`` refuses a checkpoint trained with :class:`TiedLoRA` ("LoRA
config not found in checkpoint"): it accepts only its own ``LoRA``. This module does the same
job for every tiedlora preset (lora, vera, tl1 ... tl7)::

    python -m tiedlora.integrations.nemo_merge \\
        --adapter nemo_runs/llama2_7b_tl6/checkpoints/<name>-last --output /ckpt/llama2_7b_tl6_merged

    from tiedlora.integrations.nemo_merge import merge_adapter
    merge_adapter("nemo_runs/.../checkpoints/<name>-last", "/ckpt/llama2_7b_tl6_merged")

What an adapter checkpoint of ``llm.finetune(..., peft=TiedLoRA(...))`` holds, and what is read::

    ADAPTER/context/io.json                   the run's context: the model (config, tokenizer) and
                                              model.model_transform, the TiedLoRA with its fields
    ADAPTER/weights/adapter_metadata.json     {"model_ckpt_path": the base checkpoint}
    ADAPTER/weights/                          the adapter tensors (megatron dist-checkpoint)

and what is written: ``OUTPUT/weights`` (every tensor of the base, with

    W_l  <-  W_l + s · diag(v_l) · B · diag(u_l) · A          s = alpha / r

in every adapted linear, computed in fp32 by :func:`tiedlora.peft.delta.delta_weight` and rounded
once to the weight's dtype) and ``OUTPUT/context`` (the same model with no ``model_transform``),
so NeMo restores it as a plain model: ``llm.finetune`` / ``llm.train`` with
``RestoreConfig(path=OUTPUT)``, ``llm.generate(path=OUTPUT)``, ``io.load_context(OUTPUT)``.

Like NeMo's merge it runs in one process on the CPU at TP=1 (the adapter checkpoint reloads
at any TP size), in the model's own precision (``params_dtype`` of the recorded config).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from tiedlora.integrations.nemo import TiedLoRA, TiedLoRALinear, mcore_chunks

__all__ = ["AdapterCheckpointError", "fold_adapters_", "inspect_adapter_checkpoint", "load_adapted_model",
           "merge_adapter", "restore_model", "save_merged"]

META_FILE = "adapter_metadata.json"  # NeMo's ADAPTER_META_FILENAME, under weights/


class AdapterCheckpointError(ValueError):
    """The path given is not a NeMo 2 Tied-LoRA adapter checkpoint (the message says why)."""


# ----------------------------------------------------------------------------- reading
def _context_and_weights(path: Path) -> Tuple[Path, Path]:
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import ckpt_to_weights_subdir

    return ckpt_to_context_subdir(path), ckpt_to_weights_subdir(path, is_saving=False)


def inspect_adapter_checkpoint(adapter: Path | str, base: Optional[Path | str] = None) -> Tuple[TiedLoRA, Path]:
    """The ``TiedLoRA`` recorded in a NeMo 2 adapter checkpoint and the base checkpoint it names.

    ``base`` (optional) replaces the base path recorded in ``weights/adapter_metadata.json``
    (e.g. when the base was moved). Raises :class:`AdapterCheckpointError` or
    ``FileNotFoundError`` naming the path when ``adapter`` is not a NeMo 2 checkpoint, is a full
    model (no adapter metadata), was trained with another PEFT (NeMo's ``LoRA``: use
    ``llm.peft.merge_lora``), or when the base checkpoint is missing.
    """
    from nemo.lightning import io

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: no such checkpoint directory")
    context, weights = _context_and_weights(adapter)
    if not (context / "io.json").is_file():
        raise AdapterCheckpointError(
            f"--adapter {adapter}: not a NeMo 2 checkpoint (no {context / 'io.json'}); pass a checkpoint "
            "directory written by llm.finetune, e.g. <log_dir>/<name>/checkpoints/<name>-...-last")
    meta_path = weights / META_FILE
    if not meta_path.is_file():
        raise AdapterCheckpointError(
            f"--adapter {adapter}: not an adapter checkpoint (no {meta_path}); it holds a full model "
            "(written by llm.train or by a merge), which has nothing to merge")
    cfg = io.load_context(context, subpath="model.model_transform", build=False)
    target = getattr(cfg, "__fn_or_cls__", None)
    if target is None or not (isinstance(target, type) and issubclass(target, TiedLoRA)):
        name = ("nothing" if target is None
                else f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}")
        hint = (" NeMo's own LoRA checkpoints merge with nemo.collections.llm.peft.merge_lora."
                if name.startswith("nemo.") else "")
        raise AdapterCheckpointError(
            f"--adapter {adapter}: its context ({context / 'io.json'}) records model.model_transform = {name}, "
            f"not tiedlora.integrations.nemo.TiedLoRA; this merge folds TiedLoRA adapters only.{hint}")
    peft = io.load_context(context, subpath="model.model_transform")
    try:
        recorded = json.loads(meta_path.read_text())["model_ckpt_path"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterCheckpointError(f"{meta_path}: expected a JSON object with \"model_ckpt_path\" ({e!r})") from None
    base_path = Path(base) if base is not None else Path(recorded)
    if not base_path.is_dir():
        if base is not None:
            raise FileNotFoundError(f"--base {base_path}: no such base checkpoint directory")
        raise FileNotFoundError(f"--adapter {adapter}: its base checkpoint {base_path} (named by {meta_path}) does "
                                "not exist; pass the base's new place with --base (merge_adapter(..., base=...))")
    return peft, base_path


def restore_model(model, path: Path | str):
    """A CPU trainer (TP=1, no optimizer) holding ``model`` with its weights restored from ``path``.

    NeMo's restore path (``RestoreConfig(path=...)``, what ``llm.finetune`` uses for its base),
    set up without fitting, as NeMo's ``merge_lora`` does. Returns the trainer; the model is
    ``trainer.model``, frozen, in the TESTING state.
    """
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo import lightning as nl
    from nemo.lightning import _strategy_lib

    from tiedlora.integrations import nemo_compat

    nemo_compat.install()
    model.config.perform_initialization = False  # every weight comes from the checkpoint
    trainer = nl.Trainer(devices=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                         strategy=nl.MegatronStrategy(ddp="pytorch", setup_optimizers=False,
                                                      ckpt_async_save=False, ckpt_parallel_load=False))
    strategy = trainer.strategy
    strategy.restore_config = nl.RestoreConfig(path=str(path), load_model_state=True, load_optim_state=False)
    strategy._setup_optimizers = False
    trainer.ckpt_path = None
    strategy.connect(model)
    strategy.setup_environment()
    if not model.state_dict():
        with _strategy_lib.megatron_cpu_init_context(model.config):
            model.configure_model()
    strategy.setup(trainer)  # restores the weights
    trainer.state.fn = TrainerFn.TESTING
    strategy.setup_megatron_parallel(trainer=trainer)
    strategy.trainer = trainer
    model.trainer = trainer
    return trainer


def load_adapted_model(adapter: Path | str, base: Optional[Path | str] = None):
    """A NeMo trainer holding the base model with the adapter of ``adapter`` applied and loaded.

    The steps of NeMo's ``merge_lora``, with the TiedLoRA transform: the model is rebuilt from
    the adapter checkpoint's context without its PEFT, the base weights are restored from the
    base checkpoint, the ``TiedLoRA`` recorded in the context is applied (tied factors on
    ``<chunk>.tied_adapters``) and the adapter tensors are loaded from ``adapter/weights``.
    Returns ``(trainer, peft)``; ``trainer.model`` is the adapted NeMo model (frozen, CPU, TP=1).
    """
    from nemo.lightning import io

    from tiedlora.integrations import nemo_compat

    nemo_compat.install()
    adapter = Path(adapter)
    peft, base_path = inspect_adapter_checkpoint(adapter, base)
    context, weights = _context_and_weights(adapter)
    model = io.load_context(context, subpath="model")
    model.model_transform, model.__io__.model_transform = None, None  # the merged model has no PEFT
    trainer = restore_model(model, base_path)
    strategy = trainer.strategy

    peft(model)
    metadata = strategy.unwrapped_checkpoint_io.load_content_metadata(weights)
    wanted = {k: v for k, v in strategy.megatron_parallel.sharded_state_dict(metadata=metadata).items()
              if peft.adapter_key_filter(k)}
    if not wanted:
        raise RuntimeError(f"TiedLoRA({peft.peft_config.name!r}) put no adapter into the model restored from "
                           f"{base_path}")
    state = strategy.checkpoint_io.load_checkpoint(weights, sharded_state_dict=wanted)
    strategy.load_model_state_dict(state, strict=False)
    return trainer, peft


# ----------------------------------------------------------------------------- merging
@torch.no_grad()
def fold_adapters_(model: nn.Module) -> List[str]:
    """Fold every TiedLoRA adapter of a NeMo model into its base weight, in place, and unwrap it.

    ``W <- round(W + ΔW)`` with ΔW from :func:`tiedlora.merge.adapter_delta` in fp32 (one
    rounding to the weight's dtype). Afterwards the model holds no adapter tensor, no tied-factor
    owner and no wrapper. Returns the names of the weights that changed.
    """
    from tiedlora.merge import fold_wrapped_

    return [f"{name}.weight" for chunk in mcore_chunks(model)
            for name, _ in fold_wrapped_(chunk, TiedLoRALinear, "to_wrap")]


def save_merged(trainer, output: Path | str) -> Path:
    """Write ``trainer``'s (merged, plain) model as a NeMo 2 checkpoint: ``weights/`` + ``context/``."""
    from megatron.core import dist_checkpointing
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import TrainerContext, ckpt_to_weights_subdir

    output = Path(output)
    state = trainer.strategy.megatron_parallel.sharded_state_dict()
    leftover = [k for k in state if ".adapter." in k or "tied_adapters" in k]
    if leftover:
        raise RuntimeError(f"adapter tensors left in the merged model: {leftover[:4]}")
    weights = ckpt_to_weights_subdir(output, is_saving=True)
    weights.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(weights), content_metadata=trainer.strategy.sharded_state_dict_metadata)
    model = trainer.model
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model.tokenizer, AutoTokenizer):
            # As NeMo's merge_lora does: a Hugging Face tokenizer is saved again and reloaded, and
            # io_dump copies its files into OUTPUT/context (so the temporary folder may go).
            model.tokenizer.save_pretrained(tmp)
            model.tokenizer = AutoTokenizer(tmp)
        if hasattr(model, "__io__") and hasattr(model.tokenizer, "__io__"):
            model.__io__.tokenizer = model.tokenizer.__io__
        TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(output), yaml_attrs=["model"])
    return output


def merge_adapter(adapter: Path | str, output: Path | str, base: Optional[Path | str] = None) -> Path:
    """Merge a NeMo 2 TiedLoRA adapter checkpoint into a full NeMo 2 checkpoint at ``output``.

    ``adapter``: a checkpoint directory written by ``llm.finetune(..., peft=TiedLoRA(...))``;
    ``base`` overrides the base checkpoint recorded in it. ``output`` must not exist yet.
    """
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"--output {output}: already exists; choose a new path")
    trainer, _ = load_adapted_model(adapter, base)  # checks the input first (inspect_adapter_checkpoint)
    fold_adapters_(trainer.model)
    return save_merged(trainer, output)


# ------------------------------------------------------------------------ command line
def main(argv: Optional[List[str]] = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m tiedlora.integrations.nemo_merge",
        description="Fold a NeMo 2 TiedLoRA adapter checkpoint into a full NeMo 2 checkpoint "
                    "(what llm.peft.merge_lora does for NeMo's LoRA).")
    parser.add_argument("--adapter", required=True, help="adapter checkpoint directory written by llm.finetune")
    parser.add_argument("--output", required=True, help="new directory for the merged NeMo 2 checkpoint")
    parser.add_argument("--base", default=None,
                        help="base checkpoint (default: the one recorded in ADAPTER/weights/adapter_metadata.json)")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter, args.output, args.base)
    print(f"[tiedlora] merged {args.adapter} into its base -> {out}")
    return out


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
