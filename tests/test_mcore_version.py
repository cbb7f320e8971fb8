"""The megatron-core we run on shards SwiGLU's fc1 as [gate_r; up_r] (partition_stride 2),
and the model builder refuses one that does not (megatron-core 0.15.x: silently wrong TP)."""

import pytest

from helpers import tiny_model_cfg
from tiedlora.mcore_version import SUPPORTED, check_gated_fc1_stride, megatron_core_version
from tiedlora.models.gpt import build_gpt_model


def test_installed_megatron_core_is_a_supported_version():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    assert Version(megatron_core_version()) in SpecifierSet(SUPPORTED)


def test_swiglu_fc1_is_sharded_with_stride_two(mp1):
    model = build_gpt_model(tiny_model_cfg(activation="swiglu"))
    fc1 = [p for n, p in model.named_parameters() if n.endswith("mlp.linear_fc1.weight")]
    assert len(fc1) == tiny_model_cfg().num_layers
    assert all(p.partition_stride == 2 for p in fc1)


def test_stride_one_fc1_is_refused(mp1):
    model = build_gpt_model(tiny_model_cfg(activation="swiglu"))
    fc1 = next(p for n, p in model.named_parameters() if n.endswith("mlp.linear_fc1.weight"))
    fc1.partition_stride = 1  # what megatron-core 0.15.x builds
    with pytest.raises(RuntimeError, match=r"partition_stride=1 .*megatron-core>=0\.16,<0\.17"):
        check_gated_fc1_stride(model)


def test_gelu_fc1_is_not_checked(mp1):
    model = build_gpt_model(tiny_model_cfg(activation="gelu"))
    fc1 = next(p for n, p in model.named_parameters() if n.endswith("mlp.linear_fc1.weight"))
    assert fc1.partition_stride == 1
    check_gated_fc1_stride(model)
