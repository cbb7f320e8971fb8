"""Base models: megatron-core GPTModel built from a :class:`ModelConfig`."""

from tiedlora.models.gpt import ModelConfig, build_gpt_model, transformer_config

__all__ = ["ModelConfig", "build_gpt_model", "transformer_config"]
