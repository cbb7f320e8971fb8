"""Building what a run needs from its config: base weights, tokenizer, model chunks.

Shared by fine-tuning (:mod:`tiedlora.finetune`) and evaluation (:mod:`tiedlora.evaluate`),
so both see the same base model with the same adapters::

    weights, tok_path = resolve_base(cfg.model)          # before the process group exists
    tokenizer = load_tokenizer(tok_path, cfg.model)
    chunks = build_model(cfg.model, cfg.peft, cfg.parallel, weights)   # after it exists
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from torch import nn

from tiedlora.config import ModelConfig, ParallelConfig, PeftConfig


def resolve_base(model_cfg: ModelConfig) -> Tuple[Optional[Path], Optional[str]]:
    """(weights path or None, tokenizer path or None); ``builtin:mini`` is the base shipped in the package."""
    if model_cfg.checkpoint is None:
        return None, model_cfg.tokenizer
    if model_cfg.checkpoint.startswith("builtin:"):
        from tiedlora import mini_base

        if model_cfg.checkpoint != mini_base.BUILTIN:
            raise ValueError(f"model.checkpoint={model_cfg.checkpoint!r}: the only builtin is {mini_base.BUILTIN!r}")
        weights, tok = mini_base.shipped(model_cfg)
        return weights, model_cfg.tokenizer or tok
    path = Path(model_cfg.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"model.checkpoint={str(path)!r}: no such file or directory")
    tok = model_cfg.tokenizer
    if tok is None and path.suffix != ".safetensors":
        from tiedlora.convert import tokenizer_path

        tok = tokenizer_path(path)
    return path, tok


def load_tokenizer(path, model_cfg: ModelConfig):
    from tiedlora.data.tokenizers import build_tokenizer

    hint = ("set model.tokenizer=/path/to/tokenizer.model (SentencePiece) or "
            "model.tokenizer=/path/to/folder (one holding tokenizer.json)")
    if path is None:
        raise ValueError(f"model {model_cfg.name!r}: no tokenizer; {hint}")
    p = Path(path)
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"tokenizer folder {p} holds no tokenizer.json or tokenizer_config.json; {hint}")
    kind = "sentencepiece" if p.suffix == ".model" else "huggingface"
    tok = build_tokenizer(kind, str(p))
    # Ids at or above model.vocab_size would land on the padding rows megatron adds to the
    # embedding table: they train there, but no exported (Hugging Face, .nemo) model has them.
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {p} has {tok.vocab_size} tokens but model.vocab_size="
                         f"{model_cfg.vocab_size}: the model has no embedding row for ids "
                         f"{model_cfg.vocab_size}..{tok.vocab_size - 1}; use the base model's own "
                         "tokenizer (model.tokenizer=...) or set model.vocab_size to the checkpoint's")
    return tok


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, parallel: ParallelConfig, weights) -> List[nn.Module]:
    """Model chunks of this rank: base weights loaded, then adapters applied."""
    from tiedlora.models.gpt import build_model_chunks
    from tiedlora.convert.base_file import load_base
    from tiedlora.peft import apply_peft

    chunks = build_model_chunks(model_cfg, parallel)
    if weights is not None:
        if Path(weights).suffix == ".safetensors":
            load_base(chunks, weights, model_cfg)
        else:
            from tiedlora.convert import load_base_checkpoint

            load_base_checkpoint(chunks, model_cfg, parallel)
    for c in chunks:
        apply_peft(c, peft_cfg)
    return chunks


def param_counts(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> dict:
    """Trainable adapter parameters of the preset, LoRA's at the same rank, and the share."""
    shapes = {t: model_cfg.target_shape(t) for t in peft_cfg.target_modules}
    trainable = peft_cfg.trainable_count(shapes, model_cfg.num_layers)
    lora = peft_cfg.lora_count(shapes, model_cfg.num_layers)
    return {"trainable_params": trainable, "lora_trainable_params": lora,
            "share_of_lora": trainable / lora}
