"""tiedlora.integrations.nemo_compat: NeMo 2.7's optimizer keywords on megatron-core 0.16.

NeMo passes ``no_weight_decay_cond(name, param)``, ``scale_lr_cond(name, param)`` and
``lr_mult``; megatron-core 0.16 takes ``config_overrides``. The translated overrides must
give each parameter the weight-decay and learning-rate multipliers 0.15 gave it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

LR_MULT = 3.0


def _groups(model, overrides):
    """{parameter name: (wd_mult, lr_mult)} as megatron-core 0.16 groups them."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    groups = _get_param_groups([model], OptimizerConfig(lr=1e-3, weight_decay=0.1), overrides)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["wd_mult"], g["lr_mult"]) for g in groups for p in g["params"]}


@pytest.fixture(scope="module")
def single_process_group():
    pytest.importorskip("nemo.lightning", reason="NeMo 2 is not installed")
    import torch.distributed as dist

    from tiedlora.dist import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))


@pytest.mark.nemo
def test_install_translates_only_when_megatron_lacks_the_keyword():
    pytest.importorskip("nemo.lightning", reason="NeMo 2 is not installed")
    import inspect

    import megatron.core.optimizer as mopt

    from tiedlora.integrations import nemo_compat

    lacks = "no_weight_decay_cond" not in inspect.signature(mopt.get_megatron_optimizer).parameters
    nemo_compat.install()
    assert ("optimizer_keywords" in nemo_compat.applied()) == lacks
    assert lacks, "the pinned megatron-core 0.16.1 has no no_weight_decay_cond; update this test"
    nemo_compat.install()  # idempotent: wrapped once
    assert nemo_compat.applied().count("optimizer_keywords") == 1
    assert getattr(mopt.get_megatron_optimizer, "__tiedlora_patch__", None) == "optimizer_keywords"


@pytest.mark.nemo
def test_default_keywords_give_megatron_standard_groups(single_process_group):
    from megatron.core.optimizer import OptimizerConfig

    from tiedlora.integrations.nemo_compat import legacy_config_overrides

    model = _model()
    got = _groups(model, legacy_config_overrides(OptimizerConfig(lr=1e-3), None, None, 1.0))
    # 0.15's default: no weight decay on biases and 1-D tensors, lr_mult 1 everywhere
    assert got == {"0.weight": (1.0, 1.0), "0.bias": (0.0, 1.0), "1.weight": (0.0, 1.0),
                   "1.bias": (0.0, 1.0), "2.weight": (1.0, 1.0)}
    assert got == _groups(model, None)


@pytest.mark.nemo
def test_custom_conditions_become_param_keys(single_process_group):
    from megatron.core.optimizer import OptimizerConfig

    from tiedlora.integrations.nemo_compat import legacy_config_overrides

    seen = []

    def no_wd(name, param):  # NeMo's order: (name, param)
        seen.append((type(name), type(param)))
        return name.startswith("2.")

    def scale_lr(name, param):
        return param.dim() == 1

    got = _groups(_model(), legacy_config_overrides(OptimizerConfig(lr=1e-3), no_wd, scale_lr, LR_MULT))
    assert got == {"0.weight": (1.0, 1.0), "0.bias": (1.0, LR_MULT), "1.weight": (1.0, LR_MULT),
                   "1.bias": (1.0, LR_MULT), "2.weight": (0.0, 1.0)}
    assert set(seen) == {(str, nn.Parameter)}
