"""Tied-LoRA adapters: config, layers on megatron-core, application to a GPTModel."""

from tiedlora.config import FACTORS, TARGETS, FactorConfig, PeftConfig
from tiedlora.peft.grads import finalize_adapter_grads
from tiedlora.peft.layer import AdaptedLinear, TiedFactors, TiedLoRAAdapter
from tiedlora.peft.model import (
    AdapterParam,
    adapter_parameters,
    adapter_state_dict,
    apply_peft,
    declare_trainable,
    iter_adapter_params,
    load_adapter_state_dict,
    trainable_params,
)

__all__ = [
    "FACTORS", "TARGETS", "FactorConfig", "PeftConfig", "AdaptedLinear", "TiedFactors",
    "TiedLoRAAdapter", "adapter_parameters", "adapter_state_dict", "apply_peft",
    "declare_trainable", "finalize_adapter_grads", "iter_adapter_params", "load_adapter_state_dict",
    "AdapterParam", "trainable_params",
]
