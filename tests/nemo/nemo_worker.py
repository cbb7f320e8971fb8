"""Worker: NeMo's TiedLoRA transform vs tiedlora's apply_peft on a tiny GPTModel (CPU, gloo).

Run under torchrun with 1 process (TP=1) or 2 (TP=2, with and without sequence parallel):

    torchrun --nproc_per_node 2 tests/nemo/nemo_worker.py OUT.pt CKPT_DIR [OTHER_CKPT_DIR]

Rank 0 saves to OUT.pt:
  "<preset>/sp<0|1>": logits, loss and gathered adapter gradients of both paths, the
      trainable parameter names, NeMo's adapter-state keys and the optimizer's parameters;
  "ckpt/<preset>/<route>": adapter tensors after a checkpoint round trip, and
  "ckpt/<preset>/expected": the tensors that were saved.
Every rank writes NeMo checkpoints under CKPT_DIR; with OTHER_CKPT_DIR (NeMo checkpoints
written by a run at another TP size) they are loaded here too ("ckpt/<preset>/cross_tp").
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ALL_TARGETS, batch, perturb, preset, targets_override, tiny_model_cfg  # noqa: E402

from tiedlora import compat  # noqa: E402
from tiedlora.checkpoint import load_adapter, save_adapter  # noqa: E402
from tiedlora.dist import init_distributed, set_seed, shutdown  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from tiedlora.peft import adapter_state_dict, apply_peft, finalize_adapter_grads, load_adapter_state_dict  # noqa: E402

from tiedlora.integrations.nemo import TiedLoRA  # noqa: E402

PRESETS = ["lora", "vera", "tl6"]
ALPHA = 16
SEED = 7
PERTURB_SEED, OTHER_SEED = 11, 99


def nemo_peft(name: str) -> TiedLoRA:
    return TiedLoRA(name, target_modules=ALL_TARGETS, alpha=ALPHA)


def build_ours(name: str, parallel: ParallelConfig):
    set_seed(SEED)
    cfg = preset(name, target_modules=targets_override(ALL_TARGETS), alpha=ALPHA)
    return apply_peft(build_gpt_model(tiny_model_cfg(), parallel), cfg), cfg


def build_nemo(name: str, parallel: ParallelConfig):
    set_seed(SEED)
    peft = nemo_peft(name)
    model = peft(build_gpt_model(tiny_model_cfg(), parallel))
    return model, peft


def step(model, grads_of):
    """Full logits (no grad), then loss + backward; adapter gradients by layout-free name."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids, pos, labels = batch(s=16)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(ids, pos, None))
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    finalize_adapter_grads(model)
    return {"logits": logits.clone(), "loss": loss.detach().clone(), "grads": grads_of(model)}


def optimizer_params(model):
    """Parameters in megatron-core's optimizer (what NeMo's MegatronOptimizerModule builds)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    with compat.cuda_to_cpu():
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4), [ddp])
    ids = {id(p): p for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names.get(i, "?") for i in ids), sum(p.numel() for p in ids.values())


def compare_paths(results, tp: int, sp: bool) -> None:
    parallel = ParallelConfig(tp=tp, sp=sp)
    for name in PRESETS:
        ours, _ = build_ours(name, parallel)
        perturb(ours, seed=PERTURB_SEED)
        a = step(ours, lambda m: adapter_state_dict(m, grads=True))
        model, peft = build_nemo(name, parallel)
        perturb(model, seed=PERTURB_SEED)
        b = step(model, lambda m: peft.adapter_state_dict(m, grads=True))
        entry = {"ours": a, "nemo": b}
        if not sp:
            fresh, peft = build_nemo(name, parallel)
            entry["trainable"] = [n for n, p in fresh.named_parameters() if p.requires_grad]
            entry["nemo_state_keys"] = [k for k in fresh.state_dict() if peft.adapter_key_filter(k)]
            sharded = fresh.sharded_state_dict()
            entry["nemo_sharded_keys"] = sorted(
                {getattr(v, "key", k) for k, v in sharded.items() if peft.adapter_key_filter(k)})
            entry["optimizer_names"], entry["optimizer_numel"] = optimizer_params(fresh)
            entry["tied_refs"] = [  # (target.factor, storage) as each wrapped layer sees it
                (f"{m.adapter.target}.{f}", m.adapter.factor(f).data_ptr())
                for m in fresh.modules() if hasattr(m, "to_wrap")
                for f in ("A", "B") if getattr(m.adapter, f) is None]
        results[f"{name}/sp{int(sp)}"] = entry


# ------------------------------------------------------------------ checkpoints
def nemo_io(peft: TiedLoRA):
    """NeMo's PEFT checkpoint IO: WrappedAdapterIO around MegatronCheckpointIO (dist ckpt)."""
    from nemo.lightning.io.pl import MegatronCheckpointIO
    from nemo.lightning.pytorch.callbacks.peft import WrappedAdapterIO

    return WrappedAdapterIO(MegatronCheckpointIO(save_ckpt_format="torch_dist"), peft=peft)


def nemo_save(model, peft: TiedLoRA, path: Path) -> None:
    """As MegatronStrategy.save_checkpoint + WrappedAdapterIO do during llm.finetune."""
    checkpoint = {"state_dict": {}, "sharded_state_dict": model.sharded_state_dict(prefix="module.")}
    nemo_io(peft).save_checkpoint(checkpoint, path)
    dist.barrier()


def nemo_load(model, peft: TiedLoRA, path: Path) -> None:
    """As PEFT.apply_transform does on resume: adapter keys only, then load_state_dict."""
    sharded = {k: v for k, v in model.sharded_state_dict(prefix="module.").items()
               if peft.adapter_key_filter(k)}
    state = nemo_io(peft).load_checkpoint(path, sharded_state_dict={"state_dict": sharded})
    plain = {k[len("module."):]: v for k, v in state["state_dict"].items()}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert not unexpected, unexpected
    adapter_missing = [k for k in missing if peft.adapter_key_filter(k)]
    assert not adapter_missing, adapter_missing


def checkpoints(results, tp: int, root: Path, other: Path | None) -> None:
    parallel = ParallelConfig(tp=tp)
    for name in PRESETS:
        # NeMo -> tiedlora: save through NeMo, reload through NeMo, export to our format,
        # load into apply_peft's model.
        model, peft = build_nemo(name, parallel)
        expected = perturb(model, seed=PERTURB_SEED)
        nemo_dir = root / f"nemo_{name}_tp{tp}"
        nemo_save(model, peft, nemo_dir)
        model2, peft2 = build_nemo(name, parallel)
        perturb(model2, seed=OTHER_SEED)
        nemo_load(model2, peft2, nemo_dir)
        ours_file = root / f"from_nemo_{name}_tp{tp}.safetensors"
        peft2.save_adapter(model2, ours_file)
        tensors, cfg, _ = load_adapter(ours_file)
        ours, _ = build_ours(name, parallel)
        load_adapter_state_dict(ours, tensors)
        got_nemo_to_ours = adapter_state_dict(ours)

        # tiedlora -> NeMo: our file into a NeMo model, save through NeMo, reload.
        ours, cfg = build_ours(name, parallel)
        perturb(ours, seed=PERTURB_SEED)
        ours_file = root / f"ours_{name}_tp{tp}.safetensors"
        tensors = adapter_state_dict(ours)
        if dist.get_rank() == 0:
            save_adapter(ours_file, tensors, cfg)
        dist.barrier()
        model3, peft3 = build_nemo(name, parallel)
        peft3.load_adapter(model3, ours_file)
        nemo_dir = root / f"nemo_from_ours_{name}_tp{tp}"
        nemo_save(model3, peft3, nemo_dir)
        model4, peft4 = build_nemo(name, parallel)
        perturb(model4, seed=OTHER_SEED)
        nemo_load(model4, peft4, nemo_dir)
        entry = {"expected": expected, "nemo_to_ours": got_nemo_to_ours,
                 "ours_to_nemo": peft4.adapter_state_dict(model4)}

        if other is not None:  # a NeMo checkpoint written at another TP size
            model5, peft5 = build_nemo(name, parallel)
            perturb(model5, seed=OTHER_SEED)
            nemo_load(model5, peft5, next(other.glob(f"nemo_{name}_tp*")))
            entry["cross_tp"] = peft5.adapter_state_dict(model5)
        results[f"ckpt/{name}"] = entry


def main(out: str, root: str, other: str | None = None) -> None:
    world = int(os.environ["WORLD_SIZE"])
    init_distributed(ParallelConfig(tp=world), seed=SEED)
    results = {"tp": world}
    for sp in ([False, True] if world > 1 else [False]):
        compare_paths(results, world, sp)
    checkpoints(results, world, Path(root), Path(other) if other else None)
    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    compat.install()  # once, at process start
    main(*sys.argv[1:])
