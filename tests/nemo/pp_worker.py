"""Worker: ``llm.finetune`` with ``TiedLoRA("tl6")`` at pipeline-parallel size 1 or 2 (CPU, gloo).

    torchrun --nproc_per_node PP tests/nemo/pp_worker.py OUT_DIR PP STEPS

The model, data and optimizer are flow_worker.py's (a 2-layer GPT, TL6 r=4 on the fused
QKV projection, NeMo's mock data). The frozen base is not restored from a checkpoint: its
weights are filled from a generator keyed by each tensor's *global* name (layer number, not
position on the stage) before the transform, so PP=1 and PP=2 start from the same model.
Each rank writes ``OUT_DIR/rank<r>.pt``: the losses and gradient norms it saw, the full adapter (tiedlora's
layout-independent names) before the first and after the last step, and its own copies of
the tied factors. NeMo writes its final adapter checkpoint under ``OUT_DIR/pp<PP>``.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch
from lightning.pytorch import Callback

import flow_worker as fw
from tiedlora.integrations.nemo import TiedLoRA, mcore_chunks
from tiedlora.peft.model import iter_adapter_params


def _fill(t: torch.Tensor, key: str) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if t.dim() == 1:  # norms: around one
        t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
    else:
        t.copy_(0.05 * torch.randn(t.shape, generator=g))


class LayoutFreeBase(Callback):
    """Base weights keyed by global layer number, so every pipeline layout holds one model."""

    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            for chunk in mcore_chunks(trainer.model):
                named = {}
                for layer in chunk.decoder.layers:
                    for n, p in layer.named_parameters():
                        named[id(p)] = f"layer{layer.layer_number}.{n}"
                for n, p in chunk.named_parameters():
                    _fill(p, named.get(id(p), n))


class Record(Callback):
    def __init__(self, peft: TiedLoRA, out: Path):
        self.peft, self.out = peft, out
        self.result = {"losses": {}, "grad_norms": {}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "init" not in self.result:
            self.result["init"] = self.peft.adapter_state_dict(trainer.model)  # collective

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.result["losses"][int(trainer.global_step)] = float(torch.as_tensor(loss).float().mean())
        # megatron's norm over the model-parallel group, as NeMo's strategy logs it
        self.result["grad_norms"][int(trainer.global_step)] = float(trainer.callback_metrics["grad_norm"])

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        self.result["final"] = self.peft.adapter_state_dict(trainer.model)  # collective
        self.result["copies"] = [
            {r.name: r.param.detach().float().clone() for r in iter_adapter_params(c) if r.tied}
            for c in mcore_chunks(trainer.model)]
        self.result["shared"] = [
            {r.name: bool(getattr(r.param, "shared", False)) for r in iter_adapter_params(c) if r.tied}
            for c in mcore_chunks(trainer.model)]
        torch.save(self.result, self.out / f"rank{dist.get_rank()}.pt")


def main(out: str, pp: str, steps: str) -> None:
    from nemo import lightning as nl
    from nemo.collections import llm

    out_dir, pp, steps = Path(out), int(pp), int(steps)
    peft = TiedLoRA("tl6", rank=4, alpha=8)
    record = Record(peft, out_dir)
    trainer = nl.Trainer(
        accelerator="cpu", devices=pp, max_steps=steps, log_every_n_steps=1, limit_val_batches=0,
        num_sanity_val_steps=0, val_check_interval=None, enable_progress_bar=False,
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp,
                                     pipeline_dtype=torch.float32, ckpt_async_save=False,
                                     ckpt_parallel_load=False, ddp="megatron"),
        plugins=nl.MegatronMixedPrecision(precision="32"),
        callbacks=[LayoutFreeBase(), record])
    llm.finetune(model=fw.model(), data=fw.data(), trainer=trainer, optim=fw.optim(), peft=peft,
                 log=fw.logger(out_dir, f"pp{pp}", every=steps))


if __name__ == "__main__":
    main(*sys.argv[1:])
