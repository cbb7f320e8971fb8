"""Base models: megatron-core GPTModel built from a :class:`ModelConfig`."""

from tiedlora.config import ModelConfig
from tiedlora.models.gpt import build_gpt_model, transformer_config

__all__ = ["ModelConfig", "build_gpt_model", "transformer_config"]
