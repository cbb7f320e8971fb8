"""Typed configuration schemas, registered with Hydra's ConfigStore.

YAML under ``conf/`` is data composed onto these dataclasses; unknown keys and wrong
types are rejected by OmegaConf (naming the full key), and each dataclass's
``__post_init__`` rejects bad values naming the field and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from tiedlora.models.gpt import ModelConfig, ParallelConfig
from tiedlora.peft.config import PeftConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

_REGISTERED = False


def register_configs() -> None:
    """Register every schema once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from tiedlora.params import ParamsConfig

    cs = ConfigStore.instance()
    cs.store(name="params_schema", node=ParamsConfig)
    try:
        from tiedlora.finetune import FinetuneConfig
    except ImportError:  # pragma: no cover - finetune not built yet in minimal installs
        FinetuneConfig = None
    if FinetuneConfig is not None:
        cs.store(name="finetune_schema", node=FinetuneConfig)
    _REGISTERED = True


def to_object(cfg: DictConfig | Any) -> Any:
    """Structured DictConfig -> dataclass instances (runs every ``__post_init__``)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


def compose(config_name: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose a primary config from ``conf/`` outside ``@hydra.main`` (tests, tools)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=overrides or [])


__all__ = ["CONF_DIR", "ModelConfig", "ParallelConfig", "PeftConfig", "compose",
           "register_configs", "to_object"]
