"""Run megatron-core on a machine without CUDA (CPU + gloo).

megatron-core assumes a GPU in a handful of places: ``torch.cuda.current_device()`` is
used as a ``device=`` argument throughout, the tensor-parallel RNG tracker saves and
restores *CUDA* generator states, and the schedules, optimizer and gradient clipping
create small tensors with ``device="cuda"``. :func:`install` redirects exactly those
sites to the CPU. It is a no-op when CUDA is available, so the same code runs unchanged
in the NGC container.

It rebinds attributes of ``torch.cuda`` and of megatron-core modules for the whole
process, so it is never done behind a caller's back: every process calls :func:`install`
once, explicitly, as the first step of its set-up (``tiedlora.finetune.setup``,
``tiedlora.evaluate.run_evaluation``, the ``main`` of ``params``/``merge``/``mini_base``,
the test suite's ``conftest.py``, ``TiedLoRA(...)`` through ``tiedlora.integrations.nemo_compat``). Building a
model or a process group without it on a CPU machine fails at once with that advice
(:func:`require`) instead of deep inside megatron-core.

What is redirected (measured on megatron-core 0.16.1; why, and the traps: docs/design.md,
'Running megatron-core on CPU'):

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``
* ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` and
  ``CudaRNGStatesTracker.add`` -> the CPU default generator
* ``torch.cuda.manual_seed`` / ``manual_seed_all`` -> no-op (the CPU generator is seeded
  by ``torch.manual_seed``)
* ``torch.cuda.synchronize`` -> no-op
* the causal attention mask built with ``device="cuda"`` (``fused_softmax``) -> CPU
* ``device="cuda"`` tensor factories in the pipeline schedules and p2p communication
  (their module-level ``torch`` name is replaced by a thin proxy);
* ``weight.data.cuda()`` where a model with tied input/output embeddings (LLaMA-3.2-1B,
  the small Qwen2.5 models) makes its last pipeline stage's copy equal the first stage's
  (``LanguageModule.setup_embeddings_and_output_layer`` runs inside :func:`cuda_to_cpu`'s mode);
* anywhere else, inside :func:`cuda_to_cpu` (a torch function mode, for megatron's own
  optimizer and DDP wrappers, which tiedlora does not need for adapters).

Norms are not patched here: :mod:`tiedlora.models.norm` provides a norm that supports
sequence parallelism and zero-centred gamma without apex.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_INSTALLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device tensors should live on: the current CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def installed() -> bool:
    """Whether this process runs with the CPU redirections in place (False on GPU machines)."""
    return _INSTALLED


def require(what: str) -> None:
    """Refuse to go on without :func:`install` on a machine without CUDA."""
    if not _INSTALLED and not cuda_available():
        raise RuntimeError(
            f"{what} on a machine without CUDA needs tiedlora's CPU compatibility layer: call "
            "tiedlora.compat.install() once at the start of the process (the tiedlora commands do)")


def install() -> bool:
    """Install the CPU redirections once (idempotent). Returns True when they are active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if cuda_available():
        return False

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.synchronize = lambda device=None: None

    from megatron.core.tensor_parallel import random as mrandom

    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def _tracker_add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    from megatron.core.fusions import fused_softmax

    @functools.lru_cache(maxsize=8)
    def _causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    fused_softmax.get_default_causal_mask = _causal_mask

    from megatron.core.pipeline_parallel import p2p_communication, schedules

    schedules.torch = _CpuTorch()
    p2p_communication.torch = _CpuTorch()
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add

    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def _setup_embeddings_on_cpu(self):  # tied embeddings under PP: ``weight.data.cuda()``
        with _CudaToCpuMode():
            return setup(self)

    LanguageModule.setup_embeddings_and_output_layer = _setup_embeddings_on_cpu
    _INSTALLED = True
    return True


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: tensor factories asked for ``device="cuda"``
    get the CPU; everything else is torch itself. Patching a module's ``torch`` name keeps
    the model's own ops free of any per-call interception."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device='cuda'`` (and ``.cuda()``) to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1:
            target = args[1]
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
                args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Context in which megatron-core's hard-coded ``device='cuda'`` tensors go to the CPU.

    Inert on GPU machines. Used around the pipeline schedules and the optimizer step only,
    so the per-op cost of a torch function mode is not paid in the model's own layers.
    """
    if cuda_available():
        yield
        return
    require("megatron-core's optimizer or DDP")
    with _CudaToCpuMode():
        yield
