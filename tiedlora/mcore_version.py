"""Refuse a megatron-core that shards SwiGLU's fc1 in a way tiedlora cannot use.

tiedlora supports megatron-core 0.16.x (docs/versions.md). The one difference to 0.15.x
that changes results: from 0.16 on, ``MLP`` builds a gated (SwiGLU) ``linear_fc1`` with
``stride=2``, so tensor-parallel rank r holds ``[gate_r; up_r]`` and the weight carries
``partition_stride = 2``. megatron-core 0.15.x builds it with stride 1: rank 0 gets the
first half of ``[gate; up]`` (all gate rows), and everything that shards or gathers by
``partition_stride`` -- our checkpoint loaders, adapter exports, the CPU initialisation of
the full matrix -- then puts the wrong rows on each rank. No error follows, only a model
that at TP>1 computes a different function than at TP=1. So the model builder checks the
attribute and stops with a message instead.
"""

from __future__ import annotations

SUPPORTED = ">=0.16,<0.17"


def megatron_core_version() -> str:
    """The installed megatron-core's version, read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:  # e.g. a source tree on PYTHONPATH
        return "unknown"


def check_gated_fc1_stride(model) -> None:
    """Raise RuntimeError if a gated ``linear_fc1`` weight is not sharded with stride 2.

    ``model`` is a megatron-core GPTModel chunk; chunks without decoder layers pass.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "gated_linear_unit", False):
        return
    for name, param in model.named_parameters():
        if not name.endswith("mlp.linear_fc1.weight"):
            continue
        stride = getattr(param, "partition_stride", None)
        if stride is None:
            return  # built without initialisation (meta device): megatron sets no TP attributes
        if stride != 2:
            raise RuntimeError(
                f"megatron-core {megatron_core_version()} builds SwiGLU's {name} with "
                f"partition_stride={stride} (expected 2: each tensor-parallel rank holds "
                f"[gate_r; up_r]). With it, tensor-parallel runs silently compute another "
                f"model. tiedlora needs megatron-core{SUPPORTED}: "
                f"pip install 'megatron-core{SUPPORTED}', or use the container named in "
                f"docs/versions.md.")
        return
