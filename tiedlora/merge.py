"""Fold a trained adapter into its base model and save it in the base's own format.

For every adapted linear layer l (docs/design.md, 'The method')::

    W_l  <-  W_l + s · diag(v_l) · B · diag(u_l) · A          s = alpha / r

computed on each rank's shard (any TP size): on a column-parallel target B and v are
sharded like W's rows (with fc1's stride 2), on a row-parallel target A is sharded like W's
columns, so the shard of ΔW is formed from local factors alone. The merged model computes
exactly what the adapted one did (without dropout) at no extra cost, and is written back as
the format it came from: a TP=1 ``.nemo`` (NeMo key names, every other member copied) or a
Hugging Face model directory (safetensors). Tensors that no adapter touched are copied bit
for bit from the source checkpoint.

One process merges at TP=1; under torchrun the merge runs at TP = number of processes.

Usage::

    python -m tiedlora.merge --adapter outputs/run/checkpoints/step_0000400 \\
        --output /data/gpt2b_tl6_merged.nemo \\
        model=gpt2b_001 model.checkpoint=/data/GPT-2B-001_bf16_tp1.nemo
    python -m tiedlora.merge --adapter outputs/run/best/adapter.safetensors \\
        --output /data/llama2_7b_tl6_merged model=llama2_7b model.checkpoint=/data/Llama-2-7b-hf
    torchrun --nproc_per_node 2 -m tiedlora.merge ... (same arguments)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from tiedlora import compat
from tiedlora.config import ModelConfig, ParallelConfig
from tiedlora.dist import barrier, is_rank0
from tiedlora.files import warn_if_run_dir_held
from tiedlora.peft.delta import delta_weight


# ------------------------------------------------------------------------- the merge
def adapter_delta(adapter) -> torch.Tensor:
    """This rank's shard of ΔW (:func:`tiedlora.peft.delta.delta_weight`), in fp32.

    Column target: B (d_out/tp, r), v (d_out/tp,), A (r, d_in)   -> (d_out/tp, d_in)
    Row target:    B (d_out, r),    v (d_out,),    A (r, d_in/tp) -> (d_out, d_in/tp)
    """
    return delta_weight(adapter.factor("A"), adapter.factor("B"), adapter.u, adapter.v, adapter.scale)


@torch.no_grad()
def fold_wrapped_(chunk: nn.Module, wrapper: type, base_attr: str) -> List[Tuple[str, nn.Module]]:
    """Fold the ΔW of every ``wrapper`` module of ``chunk`` into the weight of the linear it wraps
    (``getattr(module, base_attr)``), in fp32 with one rounding to the weight's dtype, and put
    that linear back in the wrapper's place; drop the chunk's tied-factor owner and PEFT config.
    Returns (name, wrapper) of each folded module. Shared by tiedlora's own merge and the NeMo
    merge, whose wrappers differ only in class and attribute name."""
    folded = []
    for name, mod in [(n, m) for n, m in chunk.named_modules() if isinstance(m, wrapper)]:
        weight = getattr(mod, base_attr).weight
        delta = adapter_delta(mod.adapter)
        if tuple(delta.shape) != tuple(weight.shape):
            raise RuntimeError(f"{name}: ΔW shard {tuple(delta.shape)} != weight shard {tuple(weight.shape)}")
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        parent_name, attr = name.rsplit(".", 1)
        setattr(chunk.get_submodule(parent_name), attr, getattr(mod, base_attr))
        folded.append((name, mod))
    for attr in ("tied_adapters", "peft_config"):
        if hasattr(chunk, attr):
            delattr(chunk, attr)
    return folded


@torch.no_grad()
def merge_adapters_(chunks: List[nn.Module] | nn.Module) -> List[str]:
    """Fold every adapter into its base weight, in place, and unwrap the adapted linears.

    Returns the canonical names (``decoder.layers.{i}.<module>.weight``, i global) of the
    weights that changed. Afterwards the chunks hold no adapter tensors.
    """
    from tiedlora.convert.layout import layer_name
    from tiedlora.peft.layer import AdaptedLinear

    chunks = chunks if isinstance(chunks, list) else [chunks]
    return [layer_name(mod.adapter.layer_number - 1, mod.adapter.target)
            for chunk in chunks for _, mod in fold_wrapped_(chunk, AdaptedLinear, "base")]


# ------------------------------------------------------------------ adapter checks
def check_adapter_model(meta: dict, model_cfg: ModelConfig, where: str) -> None:
    """Refuse an adapter trained on another architecture (its metadata names the base)."""
    from tiedlora.convert.layout import ARCH_FIELDS, CheckpointFormatError

    try:
        saved = json.loads(meta.get("model") or "{}")
    except json.JSONDecodeError:
        saved = {}
    diffs = [f"{f}: adapter {saved[f]!r} vs model {getattr(model_cfg, f)!r}"
             for f in ARCH_FIELDS if f in saved and saved[f] != getattr(model_cfg, f)]
    if "num_attention_heads" in saved:
        groups = saved.get("num_query_groups") or saved["num_attention_heads"]
        if groups != (model_cfg.num_query_groups or model_cfg.num_attention_heads):
            diffs.append(f"num_query_groups: adapter {groups!r} vs model "
                         f"{model_cfg.num_query_groups or model_cfg.num_attention_heads!r}")
    if diffs:
        raise CheckpointFormatError(f"{where} was trained on another base model: " + "; ".join(diffs))


def resolve_adapter(path: os.PathLike | str) -> Path:
    """An adapter file; a checkpoint directory holding one; or a run directory (its latest)."""
    from tiedlora.checkpoint import ADAPTER_FILE, latest_checkpoint

    path = Path(path)
    if path.is_dir() and not (path / ADAPTER_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"--adapter {path}: no {ADAPTER_FILE} and no checkpoints/latest here")
        path = latest
    return path / ADAPTER_FILE if path.is_dir() else path


# -------------------------------------------------------------------------- pipeline
def merge_checkpoint(adapter: os.PathLike | str, model_cfg: ModelConfig, output: os.PathLike | str,
                     parallel: Optional[ParallelConfig] = None) -> Path:
    """Build the base (``model_cfg.checkpoint``), apply and load the adapter, merge, save.

    Collective: every rank of an initialised megatron parallel state calls it; rank 0
    writes ``output`` (a ``.nemo`` file for NeMo bases, a directory for Hugging Face ones).
    """
    from tiedlora.checkpoint import load_adapter
    from tiedlora.convert import read_source, save_merged
    from tiedlora.convert.layout import gather_full, load_source
    from tiedlora.models.gpt import build_model_chunks
    from tiedlora.peft import apply_peft, load_adapter_state_dict

    parallel = parallel or ParallelConfig()
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"--output {output}: already exists; choose a new path")
    _, source = read_source(model_cfg)  # checks model_cfg against the checkpoint
    adapter = resolve_adapter(adapter)
    tensors, peft_cfg, meta = load_adapter(adapter)
    check_adapter_model(meta, model_cfg, str(adapter))
    chunks = build_model_chunks(model_cfg, parallel)
    load_source(chunks, source, model_cfg, str(model_cfg.checkpoint))
    del source
    for chunk in chunks:
        apply_peft(chunk, peft_cfg)
    load_adapter_state_dict(chunks, tensors)
    names = merge_adapters_(chunks)
    merged = gather_full(chunks, names)
    if is_rank0():
        save_merged(model_cfg.checkpoint, output, merged, model_cfg)
    barrier()
    return output


# ------------------------------------------------------------------------------- CLI
def model_from_overrides(overrides: List[str]) -> ModelConfig:
    """``model=<preset>`` and ``model.<field>=<value>`` Hydra overrides -> ModelConfig."""
    from tiedlora.config import compose, to_object

    bad = [o for o in overrides if not o.lstrip("+~").startswith("model")]
    if bad:
        raise ValueError(f"only model=<preset> / model.<field>=<value> overrides are accepted, got {bad}")
    return to_object(compose("params", overrides)).model


def parse_args(argv: Optional[List[str]], prog: str, description: str, output_help: str, doc: str):
    """``--adapter``, ``--output`` and model overrides of an adapter command (merge, export);
    ``doc``: the module docstring, whose ``Usage::`` part becomes the help's examples.
    Returns (arguments, the ModelConfig the overrides compose)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="examples:" + doc.split("Usage::", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True,
                   help="adapter.safetensors, a checkpoint directory holding one, or a run's "
                        "output directory (its checkpoints/latest)")
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("overrides", nargs="*",
                   help="model=<preset> model.checkpoint=<path> [model.<field>=<value> ...]")
    args = p.parse_args(argv)
    if not any(o.split("=")[0] == "model.checkpoint" for o in args.overrides):
        p.error("model.checkpoint=<path> is required")
    return args, model_from_overrides(args.overrides)


def main(argv: Optional[List[str]] = None) -> Path:
    from tiedlora.convert import checkpoint_format, model_config_from_checkpoint
    from tiedlora.dist import detect_env, init_distributed, shutdown

    args, model_cfg = parse_args(argv, "python -m tiedlora.merge",
                                 "Fold a Tied-LoRA adapter into its base model (same format out).",
                                 "merged .nemo file (NeMo base) or new directory (Hugging Face base)", __doc__)
    if detect_env().rank == 0:
        warn_if_run_dir_held(args.adapter, "adapter")
    checkpoint_format(model_cfg.checkpoint)  # fail early on a bad path
    if not any(o.startswith("model.params_dtype=") for o in args.overrides):
        # merge in the checkpoint's own precision: untouched tensors stay bit-exact
        model_cfg.params_dtype = model_config_from_checkpoint(model_cfg.checkpoint).params_dtype
    compat.install()  # CPU machines: megatron-core's CUDA-only calls go to the CPU
    owns_dist = not dist.is_initialized()
    parallel = ParallelConfig(tp=int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(parallel)
    rank = dist.get_rank()
    try:
        out = merge_checkpoint(args.adapter, model_cfg, args.output, parallel)
    finally:
        if owns_dist:
            shutdown()
    if rank == 0:
        print(f"[tiedlora] merged {resolve_adapter(args.adapter)} into {model_cfg.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
