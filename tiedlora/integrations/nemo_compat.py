"""What NeMo 2.7 + megatron-core 0.16 need for ``llm.finetune`` to run (CPU and GPU).

Every patch below names the NeMo / megatron-core version and line it addresses, checks
that the thing it works around is really there (feature detection, not version
numbers), and leaves NeMo alone otherwise. :func:`install` applies them once;
``TiedLoRA(...)`` calls it when it is constructed, which is before ``llm.finetune`` sets
up its logger, parallel state and base restore (the PEFT's own callback hooks run too
late for those). Call it yourself when you drive NeMo without a ``TiedLoRA``.

Any machine:

* ``optimizer_keywords`` -- NeMo 2.7.x ``nemo/lightning/_strategy_lib.py``
  (``setup_megatron_optimizer``, line 712 in 2.7.3) calls ``get_megatron_optimizer(...,
  no_weight_decay_cond=, scale_lr_cond=, lr_mult=)``; megatron-core 0.16 removed those
  keywords in favour of ``config_overrides`` (``Dict[ParamKey, ParamGroupOverride]``).
  When the installed signature lacks ``no_weight_decay_cond``, megatron-core's
  ``get_megatron_optimizer`` is wrapped to translate them: all three at NeMo's defaults
  (None, None, 1.0) pass nothing, which is megatron-core's standard grouping (no weight
  decay on biases and 1-D tensors, the same rule 0.15 applied); a callable becomes a
  ``ParamKey`` predicate with ``wd_mult=0`` / ``lr_mult``.
* ``logger_without_resiliency_ext`` -- NeMo 2.7.3 ``nemo/lightning/nemo_logger.py``
  (lines 208 and 253) tests ``isinstance(callback, lcp.LocalCheckpointCallback)`` where
  ``lcp`` is a placeholder for the optional ``nvidia_resiliency_ext``; when that package is
  missing the test raises ``UnavailableError`` for every checkpoint callback. Nothing can
  be an instance of a class that is not installed, so the placeholder is replaced by one
  whose ``LocalCheckpointCallback`` matches nothing; using NeMo's local-checkpoint feature
  itself still needs the package (NeMo says so when it is used).

Without CUDA only (each a no-op when ``torch.cuda.is_available()``):

* tiedlora's own CPU layer for megatron-core (:func:`tiedlora.compat.install`):
  ``torch.cuda.current_device`` in megatron's layers, its RNG tracker, ...;
* ``rng_tracker_seed`` -- NeMo 2.7.3 ``nemo/lightning/megatron_init.py`` line 238 seeds
  megatron's model-parallel RNG tracker only ``if torch.cuda.device_count() > 0``; on the
  CPU the tracker stays empty and the first dropout or TP init fails. The wrapper seeds it
  with NeMo's own rule (seed + 100 · pipeline rank);
* ``ddp_side_stream`` -- NeMo 2.7.3 ``nemo/lightning/megatron_parallel.py`` line 617 wraps
  DDP set-up in ``torch.cuda.stream(torch.cuda.Stream())``; that module's ``torch`` gets a
  view whose ``cuda.Stream()`` is None (``torch.cuda.stream(None)`` is a no-op);
* ``optimizer_on_cpu`` -- megatron-core 0.16.1 ``optimizer/optimizer.py`` (line 907 and
  473-485: ``device='cuda'`` loss-scale tensors), ``utils.py`` (line 1207, the local L2
  norm) and ``optimizer/clip_grads.py`` (lines 90-207): the optimizer's construction and
  NeMo's ``McoreDistributedOptimizer`` methods run where ``device='cuda'`` means the CPU;
  ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` (line 167) and is
  replaced, in ``optimizer.py``'s namespace, by the same scaling of CPU gradients; under
  bf16/fp16 mixed precision ``Float16OptimizerWithFloat16Params`` (``optimizer.py`` lines
  671 and 690) sorts parameters by ``param.type()`` and refuses any but ``torch.cuda.*`` names,
  so inside those calls a CPU tensor's ``type()`` gives its CUDA name;
* ``data_on_cpu`` -- NeMo 2.7.3 ``nemo/collections/llm/gpt/model/base.py`` line 103
  (``gpt_data_step``: ``.cuda(non_blocking=True)`` on every batch tensor) and
  ``nemo/lightning/pytorch/plugins/data_sampler.py`` lines 192 and 212 (``pin_memory=True``
  then ``.to("cuda")``), and ``nemo/lightning/pytorch/strategies/megatron_strategy.py``
  lines 801-888 (the same for the logged step, loss and grad norm): ``GPTModel.data_step``
  (LLaMA's too), ``MegatronDataSampler.on_megatron_step_end`` and ``MegatronStrategy``'s
  ``training_step`` / ``optimizer_step`` run where those mean the CPU;
* ``checkpoint_device`` -- NeMo 2.7.3 ``nemo/lightning/io/pl.py`` line 495
  (``_fix_tensors_device``) asserts an initialised CUDA context when a checkpoint (the
  base, or a resumed adapter) is loaded and moves tensors to the current CUDA device; on
  the CPU there is nothing to move.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, List, Optional

import torch

_APPLIED: List[str] = []


def applied() -> List[str]:
    """Names of the patches :func:`install` applied in this process (for tests and logs)."""
    return list(_APPLIED)


def install() -> List[str]:
    """Apply every patch this NeMo / megatron-core needs (idempotent); returns their names."""
    for name, patch in _PATCHES:
        if name not in _APPLIED and patch():
            _APPLIED.append(name)
    return applied()


# ------------------------------------------------------------------- any machine
def _optimizer_keywords() -> bool:
    import megatron.core.optimizer as mopt

    original = mopt.get_megatron_optimizer
    if "no_weight_decay_cond" in inspect.signature(original).parameters:
        return False  # megatron-core <= 0.15 still takes NeMo's keywords

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, no_weight_decay_cond: Optional[Callable] = None,
                               scale_lr_cond: Optional[Callable] = None, lr_mult: float = 1.0, **kwargs):
        if no_weight_decay_cond is not None or scale_lr_cond is not None:
            if kwargs.get("config_overrides") is not None or args:
                raise TypeError("get_megatron_optimizer: pass either config_overrides or NeMo's "
                                "no_weight_decay_cond/scale_lr_cond, not both")
            kwargs["config_overrides"] = legacy_config_overrides(
                config, no_weight_decay_cond, scale_lr_cond, lr_mult)
        return original(config, model_chunks, *args, **kwargs)

    get_megatron_optimizer.__tiedlora_patch__ = "optimizer_keywords"
    mopt.get_megatron_optimizer = get_megatron_optimizer
    return True


def legacy_config_overrides(config, no_weight_decay_cond: Optional[Callable],
                            scale_lr_cond: Optional[Callable], lr_mult: float) -> dict:
    """megatron-core 0.16 ``config_overrides`` equal to 0.15's three keywords.

    0.15: a parameter gets no weight decay when ``no_weight_decay_cond(name, param)`` (default:
    biases and 1-D tensors), and ``lr_mult`` when ``scale_lr_cond(name, param)``.
    """
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    if no_weight_decay_cond is None:
        overrides = dict(get_standard_config_overrides(config))  # 0.15's default rule
    else:
        overrides = {ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="nemo_no_weight_decay_cond", fn=lambda p, n: bool(no_weight_decay_cond(n, p)))):
            {"wd_mult": 0.0}}
    if scale_lr_cond is not None:
        overrides[ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="nemo_scale_lr_cond", fn=lambda p, n: bool(scale_lr_cond(n, p))))] = {"lr_mult": float(lr_mult)}
    return overrides


def _logger_without_resiliency_ext() -> bool:
    from nemo.lightning import nemo_logger

    if getattr(nemo_logger, "HAVE_RES", True):
        return False

    class LocalCheckpointCallback:  # stands for nvidia_resiliency_ext's class: never instantiated
        """Placeholder: nvidia_resiliency_ext is not installed, so no callback is one of these."""

    nemo_logger.lcp = types.SimpleNamespace(LocalCheckpointCallback=LocalCheckpointCallback)
    return True


# --------------------------------------------------------------------- CPU only
def _cpu() -> bool:
    return not torch.cuda.is_available()


def _tiedlora_cpu() -> bool:
    from tiedlora import compat

    return _cpu() and compat.install()


def _rng_tracker_seed() -> bool:
    from nemo.lightning import megatron_init

    if not _cpu() or "torch.cuda.device_count() > 0" not in inspect.getsource(megatron_init._set_random_seed):
        return False
    original = megatron_init._set_random_seed

    @functools.wraps(original)
    def _set_random_seed(seed_):
        from megatron.core import tensor_parallel

        original(seed_)
        from tiedlora import compat

        compat.install()
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed_ + 100 * megatron_init.get_pipeline_model_parallel_rank())

    megatron_init._set_random_seed = _set_random_seed
    return True


class _CpuMode(torch.overrides.TorchFunctionMode):
    """Inside it, ``device='cuda'``, ``.cuda()``, ``.to('cuda')`` and ``pin_memory=True`` all
    mean the CPU, and ``tensor.type()`` names the CUDA type (``torch.cuda.FloatTensor`` for a
    CPU fp32 tensor: megatron's mixed-precision optimizer sorts parameters by that name).
    Used only around the few NeMo / megatron calls listed in this module."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)) \
                and torch.device(args[1]).type == "cuda":
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _run_on_cpu(owner, name: str) -> None:
    """Replace ``owner.name`` by the same callable run inside :class:`_CpuMode`."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with _CpuMode():
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


class _TorchWithoutStreams(types.ModuleType):
    """``torch`` for one NeMo module: ``torch.cuda.Stream()`` is None, everything else is torch
    (``torch.cuda.stream(None)`` is torch's own no-op context)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = types.SimpleNamespace(
            **{k: getattr(torch.cuda, k) for k in dir(torch.cuda) if not k.startswith("__")})
        self.cuda.Stream = lambda *a, **k: None

    def __getattr__(self, name):
        return getattr(torch, name)


def _ddp_side_stream() -> bool:
    from nemo.lightning import megatron_parallel

    if not _cpu() or "torch.cuda.Stream()" not in inspect.getsource(megatron_parallel):
        return False
    megatron_parallel.torch = _TorchWithoutStreams()
    return True


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """megatron-core's gradient clipping by a given total norm, for CPU tensors."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _optimizer_on_cpu() -> bool:
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import clip_grads, optimizer
    from nemo.core.optim.mcore_optim import McoreDistributedOptimizer

    if not _cpu() or "torch.cuda.FloatTensor" not in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32):
        return False
    _run_on_cpu(mopt, "get_megatron_optimizer")  # device='cuda' scalars built in __init__
    for method in ("step", "zero_grad", "state_dict", "load_state_dict", "sharded_state_dict"):
        _run_on_cpu(McoreDistributedOptimizer, method)  # grad norm, clipping, loss scale
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    return True


def _data_on_cpu() -> bool:
    from nemo.collections.llm.gpt.model import base
    from nemo.lightning.pytorch.plugins.data_sampler import MegatronDataSampler
    from nemo.lightning.pytorch.strategies.megatron_strategy import MegatronStrategy

    if not _cpu() or ".cuda(non_blocking=True)" not in inspect.getsource(base.gpt_data_step):
        return False
    _run_on_cpu(base.GPTModel, "data_step")
    _run_on_cpu(MegatronDataSampler, "on_megatron_step_end")
    _run_on_cpu(MegatronStrategy, "training_step")
    _run_on_cpu(MegatronStrategy, "optimizer_step")
    return True


def _checkpoint_device() -> bool:
    from nemo.lightning.io import pl as nemo_pl

    if not _cpu() or "torch.cuda.is_initialized()" not in inspect.getsource(nemo_pl._fix_tensors_device):
        return False
    nemo_pl._fix_tensors_device = lambda ckpt: ckpt
    return True


_PATCHES = [
    ("optimizer_keywords", _optimizer_keywords),
    ("logger_without_resiliency_ext", _logger_without_resiliency_ext),
    ("tiedlora_cpu", _tiedlora_cpu),
    ("rng_tracker_seed", _rng_tracker_seed),
    ("ddp_side_stream", _ddp_side_stream),
    ("optimizer_on_cpu", _optimizer_on_cpu),
    ("data_on_cpu", _data_on_cpu),
    ("checkpoint_device", _checkpoint_device),
]

