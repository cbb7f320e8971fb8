"""Export a Tied-LoRA adapter as a standard per-layer LoRA in Hugging Face PEFT's format.

Tied-LoRA's update of layer l, ``ΔW_l = s · diag(v_l) · B · diag(u_l) · A``, is a rank-r
product, so it *is* a per-layer LoRA with (:func:`tiedlora.peft.delta.lora_factors`)::

    A_l = diag(u_l) · A          (r, d_in)      missing u_l: ones
    B_l = s · diag(v_l) · B      (d_out, r)     missing v_l: ones;  s = alpha / r

written with ``lora_alpha = r`` (PEFT's scaling alpha/r is then 1). megatron's fused
linears are split into LLaMA's modules, each keeping the same A_l and its block of rows
of B_l (a row block of B_l·A_l is that block of B_l times A_l)::

    linear_qkv  -> self_attn.q_proj, k_proj, v_proj   (B_l rows de-interleaved per query
                                                       group: [q heads of g; k_g; v_g])
    linear_proj -> self_attn.o_proj
    linear_fc1  -> mlp.gate_proj, up_proj              (B_l = [gate rows; up rows])
    linear_fc2  -> mlp.down_proj

Output: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ...), loadable with
``peft.PeftModel.from_pretrained(LlamaForCausalLM..., out_dir)``. The base must be a
Hugging Face LLaMA model: GPT-2B-001 (.nemo) has no transformers counterpart (fold its
adapter into the weights with ``python -m tiedlora.merge`` instead).

Usage::

    python -m tiedlora.export --adapter outputs/run/best/adapter.safetensors \\
        --output /data/llama2_7b_tl6_peft model=llama2_7b model.checkpoint=/data/Llama-2-7b-hf
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from tiedlora.files import staged_dir, to_json, warn_if_run_dir_held
from tiedlora.peft.delta import lora_factors
from tiedlora.config import ModelConfig
from tiedlora.config import PeftConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_MODULES = {  # megatron target -> (LLaMA block, modules in the order of B_l's row blocks)
    "linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attn", ("o_proj",)),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", ("down_proj",)),
}


class ExportError(ValueError):
    pass


def per_layer_lora(tensors: Dict[str, torch.Tensor], cfg: PeftConfig, model_cfg: ModelConfig
                   ) -> Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, target): (A_l, B_l)} in fp32 from a tiedlora adapter state dict.

    ``B_l @ A_l`` is layer l's full ΔW (megatron layout, TP=1), scale included.
    """
    out = {}
    for target in cfg.target_modules:
        d_in, d_out = model_cfg.target_shape(target)
        for i in range(model_cfg.num_layers):
            f = {}
            for name in ("A", "B"):
                key = f"layers.{i}.{target}.{name}"
                key = key if key in tensors else f"tied.{target}.{name}"
                if key not in tensors:
                    raise ExportError(f"adapter has no {name} for layer {i} {target} "
                                      f"(neither layers.{i}.{target}.{name} nor tied.{target}.{name})")
                f[name] = (key, tensors[key].float())
            for name, want in (("A", (cfg.rank, d_in)), ("B", (d_out, cfg.rank))):
                key, t = f[name]
                if tuple(t.shape) != want:
                    raise ExportError(f"adapter tensor {key} has shape {tuple(t.shape)}; "
                                      f"{model_cfg.name} needs {want} at rank {cfg.rank}")
            A, B = lora_factors(f["A"][1], f["B"][1], tensors.get(f"layers.{i}.{target}.u"),
                                tensors.get(f"layers.{i}.{target}.v"), cfg.scale)
            out[(i, target)] = (A.contiguous(), B.contiguous())
    extra = sorted(k for k in tensors if k.startswith("layers.")
                   and int(k.split(".")[1]) >= model_cfg.num_layers)
    if extra:
        raise ExportError(f"adapter has tensors for layers the model lacks: {extra[:5]}")
    return out


def _row_blocks(target: str, B: torch.Tensor, model_cfg: ModelConfig) -> List[torch.Tensor]:
    from tiedlora.convert.layout import split_fc1, split_qkv

    if target == "linear_qkv":
        return list(split_qkv(B, model_cfg))
    if target == "linear_fc1":
        if model_cfg.activation != "swiglu":
            raise ExportError("linear_fc1 maps to gate_proj/up_proj only for SwiGLU models")
        return list(split_fc1(B))
    return [B]


def peft_state_dict(tensors: Dict[str, torch.Tensor], cfg: PeftConfig, model_cfg: ModelConfig
                    ) -> Dict[str, torch.Tensor]:
    """Hugging Face PEFT LoRA tensors (LLaMA module names) of a tiedlora adapter."""
    out = {}
    for (i, target), (A, B) in per_layer_lora(tensors, cfg, model_cfg).items():
        block, modules = HF_MODULES[target]
        for module, B_part in zip(modules, _row_blocks(target, B, model_cfg)):
            p = f"base_model.model.model.layers.{i}.{block}.{module}"
            out[f"{p}.lora_A.weight"] = A.clone()
            out[f"{p}.lora_B.weight"] = B_part.contiguous()
    return out


def peft_config(cfg: PeftConfig, base_model_name_or_path: Optional[str]) -> dict:
    """``adapter_config.json`` of the exported LoRA (lora_alpha = r: PEFT scaling 1)."""
    modules = [m for t in cfg.target_modules for m in HF_MODULES[t][1]]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.rank,
        "lora_dropout": float(cfg.dropout),
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def export_peft(adapter: os.PathLike | str, model_cfg: ModelConfig, output: os.PathLike | str,
                base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``output/`` (adapter_config.json + adapter_model.safetensors); returns it.

    ``model_cfg.checkpoint``, when set, must be a Hugging Face LLaMA directory whose
    architecture matches ``model_cfg``; it is also the default ``base_model_name_or_path``.
    """
    from safetensors.torch import save_file

    from tiedlora.checkpoint import load_adapter
    from tiedlora.merge import check_adapter_model, resolve_adapter

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"--output {output}: already exists; choose a new directory")
    if model_cfg.checkpoint:
        from tiedlora.convert import checkpoint_format, model_config_from_checkpoint
        from tiedlora.convert.layout import check_model_matches

        fmt = checkpoint_format(model_cfg.checkpoint)
        if fmt != "hf_llama":
            raise ExportError(
                f"model.checkpoint={model_cfg.checkpoint}: a {fmt} base has no Hugging Face "
                "counterpart for PEFT to load; fold the adapter into it with python -m tiedlora.merge")
        check_model_matches(model_cfg, model_config_from_checkpoint(model_cfg.checkpoint),
                            str(model_cfg.checkpoint))
        base_model_name_or_path = base_model_name_or_path or str(model_cfg.checkpoint)
    adapter = resolve_adapter(adapter)
    tensors, cfg, meta = load_adapter(adapter)
    check_adapter_model(meta, model_cfg, str(adapter))
    state = peft_state_dict(tensors, cfg, model_cfg)
    with staged_dir(output) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(to_json(peft_config(cfg, base_model_name_or_path), indent=2) + "\n")
    return output


def main(argv: Optional[List[str]] = None) -> Path:
    from tiedlora.merge import parse_args, resolve_adapter

    args, model_cfg = parse_args(argv, "python -m tiedlora.export",
                                 "Export a Tied-LoRA adapter as a Hugging Face PEFT LoRA adapter.",
                                 "new directory for adapter_config.json + adapter_model.safetensors", __doc__)
    warn_if_run_dir_held(args.adapter, "adapter")
    out = export_peft(args.adapter, model_cfg, args.output)
    print(f"[tiedlora] exported {resolve_adapter(args.adapter)} as a PEFT LoRA adapter -> {out}")
    return out


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
