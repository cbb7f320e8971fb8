"""Worker: the NeMo 2 flow a user runs, on CPU (one process, gloo).

    python tests/nemo/flow_worker.py base OUT_DIR               tiny base checkpoint (llm.train, full model)
    python tests/nemo/flow_worker.py finetune BASE OUT_DIR STEPS
                                                                 llm.finetune with TiedLoRA("tl6")

Each stage writes ``OUT_DIR/result.json``: the checkpoint directories it wrote and the
training loss of every step. finetune also writes the adapter (tiedlora's safetensors) when
training starts and ends, ``adapter_{start,end}_<global step>.safetensors``, and the final
one exported as a Hugging Face PEFT LoRA, ``hf_peft_<global step>/``. Run finetune
again on the same OUT_DIR with more STEPS and NeMo's AutoResume continues from the last
checkpoint there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from tiedlora.integrations import nemo_compat
from tiedlora.integrations.nemo import TiedLoRA

SEQ, MBS, GBS = 32, 2, 4
LR = 3e-3


def tokenizer():
    from nemo.collections.common.tokenizers.bytelevel_tokenizers import ByteLevelTokenizer

    return ByteLevelTokenizer()


def model():
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    cfg = llm.GPTConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, seq_length=SEQ,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        position_embedding_type="rope", add_bias_linear=False, share_embeddings_and_output_weights=False,
        transformer_layer_spec=local_layer_spec, use_cpu_initialization=True,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        cross_entropy_loss_fusion=False, make_vocab_size_divisible_by=128,
        hidden_dropout=0.0, attention_dropout=0.0)
    return llm.GPTModel(cfg, tokenizer=tokenizer())


def data():
    """NeMo's mock pretraining data (deterministic per sample index) with an attention mask,
    and a position that checkpoints save and resume restores.

    Without transformer-engine the model needs an explicit mask; NeMo 2.7.3's MockDataModule
    passes ``create_attention_mask`` into the dataset's ``seed`` slot, so it is set here by name.
    MockDataModule keeps no position either: ``state_dict`` / ``load_state_dict`` /
    ``train_dataloader`` below follow NeMo's FineTuningDataModule, which does.
    """
    from nemo.collections import llm
    from nemo.collections.llm.gpt.data.mock import _MockGPTDataset

    class MaskedMockData(llm.MockDataModule):
        def setup(self, stage: str = "") -> None:
            make = lambda name, n: _MockGPTDataset(self.tokenizer, name, n, self.seq_length,
                                                   create_attention_mask=True)
            self._train_ds = make("train", self.num_train_samples)
            self._validation_ds = make("valid", self.num_val_samples)
            self._test_ds = make("test", self.num_test_samples)

        def state_dict(self):
            sampler = self.data_sampler
            return {"consumed_samples": sampler.compute_consumed_samples(
                self.trainer.global_step - sampler.init_global_step)}

        def load_state_dict(self, state):
            from megatron.core.num_microbatches_calculator import update_num_microbatches

            sampler = self.data_sampler
            sampler.init_consumed_samples = sampler.prev_consumed_samples = state["consumed_samples"]
            update_num_microbatches(consumed_samples=state["consumed_samples"], consistency_check=False)
            sampler.if_first_step = 1

        def train_dataloader(self):
            self.data_sampler.init_global_step = self.trainer.global_step
            return super().train_dataloader()

    return MaskedMockData(seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GBS,
                          tokenizer=tokenizer(), num_train_samples=10_000, num_val_samples=8,
                          num_test_samples=8, num_workers=0)


class Losses(Callback):
    """The training loss of every step, by global step (1-based after the step)."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[int(trainer.global_step)] = float(torch.as_tensor(loss).float().mean())


class AdapterFiles(Callback):
    """The adapter in tiedlora's format before the first step and when training ends.

    NeMo applies the PEFT transform (and restores a resumed adapter) when the training epoch
    starts, so the first batch is the earliest point where the adapter exists.
    """

    def __init__(self, peft: TiedLoRA, out: Path):
        self.peft, self.out, self.started = peft, out, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.started:
            self.started = True
            self.peft.save_adapter(trainer.model, self.out / f"adapter_start_{trainer.global_step}.safetensors")

    def on_train_end(self, trainer, pl_module):
        from tiedlora.integrations.nemo import export_peft

        self.peft.save_adapter(trainer.model, self.out / f"adapter_end_{trainer.global_step}.safetensors")
        export_peft(self.peft, trainer.model, self.out / f"hf_peft_{trainer.global_step}")


def trainer(steps: int, callbacks=()):
    from nemo import lightning as nl

    losses = Losses()
    t = nl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=1, limit_val_batches=0,
        num_sanity_val_steps=0, val_check_interval=None, enable_progress_bar=False,
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     ckpt_async_save=False, ckpt_parallel_load=False,
                                     ddp="megatron"),
        plugins=nl.MegatronMixedPrecision(precision="32"),
        callbacks=[losses, *callbacks])
    return t, losses


def optim():
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl

    return nl.MegatronOptimizerModule(config=OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=False))


def logger(out: Path, name: str, every: int):
    from nemo import lightning as nl

    return nl.NeMoLogger(log_dir=str(out), name=name, use_datetime_version=False,
                         ckpt=nl.ModelCheckpoint(save_last=True, every_n_train_steps=every, save_top_k=-1,
                                                 monitor="reduced_train_loss"))


def stage_base(out: Path):
    from nemo.collections import llm

    nemo_compat.install()  # no TiedLoRA here to do it
    t, losses = trainer(1)
    llm.train(model=model(), data=data(), trainer=t, log=logger(out, "base", every=1), optim=optim(),
              tokenizer="data")
    return {"losses": losses.losses}


def stage_finetune(base: Path, out: Path, steps: int):
    from nemo import lightning as nl
    from nemo.collections import llm

    peft = TiedLoRA("tl6", rank=4, alpha=8)
    t, losses = trainer(steps, [AdapterFiles(peft, out)])
    llm.finetune(model=model(), data=data(), trainer=t, optim=optim(), log=logger(out, "tl6", every=2),
                 peft=peft,
                 resume=nl.AutoResume(restore_config=nl.RestoreConfig(path=str(base)),
                                      resume_if_exists=True, resume_ignore_no_checkpoint=True))
    return {"losses": losses.losses}


def main(stage: str, *args: str) -> None:
    if stage == "base":
        out = Path(args[0])
        result = stage_base(out)
    elif stage == "finetune":
        base, out, steps = Path(args[0]), Path(args[1]), int(args[2])
        result = stage_finetune(base, out, steps)
        prev = out / "result.json"  # a resumed run adds its steps to the first run's
        if prev.exists():
            result["losses"] = {**json.loads(prev.read_text())["losses"], **result["losses"]}
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    result["checkpoints"] = sorted(str(p) for p in out.rglob("*consumed_samples=*") if p.is_dir())
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
