"""Fine-tune a Tied-LoRA adapter on a megatron-core GPT: data -> train -> checkpoints -> eval.

With no arguments this runs the embedded CPU default: the mini base model (pretrained on
generated text, shipped with the package), TL6 at rank 8, on the miniature dialogue-summarisation task, and
prints the metric before and after, the trainable parameters and their share of LoRA's,
and the wall time.

Single process (CPU or one GPU)::

    python -m tiedlora.finetune
    python -m tiedlora.finetune task=mini_sum peft=lora peft.rank=4 trainer.max_steps=300

Several presets in one go (Hydra multirun; prints a comparison table at the end)::

    python -m tiedlora.finetune -m peft=lora,vera,tl6

Tensor / pipeline / data parallel on one node (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m tiedlora.finetune parallel.tp=2
    torchrun --nproc_per_node 8 -m tiedlora.finetune model=gpt2b_001 \
        model.checkpoint=/data/GPT-2B-001_bf16_tp1.nemo task=squad parallel.tp=2 parallel.pp=2

Several nodes (one torchrun per node; or ``srun`` without torchrun, see launch/)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $MASTER_ADDR:29500 -m tiedlora.finetune ...

Everything lands in ``output_dir``: ``config.yaml``, ``metrics.jsonl`` (one JSON object
per optimizer step), ``tb/`` (TensorBoard), ``checkpoints/`` (resumable, keep-last-k),
``adapter.safetensors`` (the evaluated adapter), ``predictions.jsonl`` and
``results.json``. Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from omegaconf import MISSING, OmegaConf

from tiedlora import checkpoint as ckpt
from tiedlora.models.gpt import ModelConfig, ParallelConfig
from tiedlora.peft.config import PeftConfig
from tiedlora.tasks import TaskConfig
from tiedlora.training import CheckpointConfig, OptimConfig, TrainerConfig


@dataclass
class EvalConfig:
    before: bool = True  # score the un-adapted base first (ΔW = 0 at step 0)
    after: bool = True  # score the trained adapter at the end
    limit: int = 0  # examples to score (0: the whole split)
    batch_size: int = 16  # prompts decoded together
    use_best: bool = True  # evaluate the adapter with the best validation loss


@dataclass
class FinetuneConfig:
    model: ModelConfig = MISSING
    peft: PeftConfig = MISSING
    task: TaskConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"
    adapter: Optional[str] = None  # evaluate only: adapter file (default: <output_dir>/adapter.safetensors)


# ------------------------------------------------------------------------- set-up
def resolve_base(model_cfg: ModelConfig):
    """(weights path or None, tokenizer path or None); ``builtin:mini`` is the base shipped in the package."""
    if model_cfg.checkpoint is None:
        return None, model_cfg.tokenizer
    if model_cfg.checkpoint.startswith("builtin:"):
        from tiedlora import mini_base

        if model_cfg.checkpoint != mini_base.BUILTIN:
            raise ValueError(f"model.checkpoint={model_cfg.checkpoint!r}: the only builtin is {mini_base.BUILTIN!r}")
        weights, tok = mini_base.shipped(model_cfg)
        return weights, model_cfg.tokenizer or tok
    path = Path(model_cfg.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"model.checkpoint={str(path)!r}: no such file or directory")
    tok = model_cfg.tokenizer
    if tok is None and path.suffix != ".safetensors":
        from tiedlora.convert import tokenizer_path

        tok = tokenizer_path(path)
    return path, tok


def load_tokenizer(path, model_cfg: ModelConfig):
    from tiedlora.data.tokenizers import build_tokenizer

    hint = ("set model.tokenizer=/path/to/tokenizer.model (SentencePiece) or "
            "model.tokenizer=/path/to/folder (one holding tokenizer.json)")
    if path is None:
        raise ValueError(f"model {model_cfg.name!r}: no tokenizer; {hint}")
    p = Path(path)
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"tokenizer folder {p} holds no tokenizer.json or tokenizer_config.json; {hint}")
    kind = "sentencepiece" if p.suffix == ".model" else "huggingface"
    tok = build_tokenizer(kind, str(p))
    # Ids at or above model.vocab_size would land on the padding rows megatron adds to the
    # embedding table: they train there, but no exported (Hugging Face, .nemo) model has them.
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {p} has {tok.vocab_size} tokens but model.vocab_size="
                         f"{model_cfg.vocab_size}: the model has no embedding row for ids "
                         f"{model_cfg.vocab_size}..{tok.vocab_size - 1}; use the base model's own "
                         "tokenizer (model.tokenizer=...) or set model.vocab_size to the checkpoint's")
    return tok


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, parallel: ParallelConfig, weights):
    """Model chunks of this rank: base weights loaded, then adapters applied."""
    from tiedlora.models.gpt import build_model_chunks
    from tiedlora.models.io import load_base
    from tiedlora.peft import apply_peft

    chunks = build_model_chunks(model_cfg, parallel)
    if weights is not None:
        if Path(weights).suffix == ".safetensors":
            load_base(chunks, weights, model_cfg)
        else:
            from tiedlora.convert import load_base_checkpoint

            load_base_checkpoint(chunks, model_cfg, parallel)
    for c in chunks:
        apply_peft(c, peft_cfg)
    return chunks


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _say(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


def _prepare_task(task: TaskConfig):
    """Task files (generated under a file lock, before the process group exists)."""
    from tiedlora.mini_base import _lock
    from tiedlora.tasks import prepare_files

    d = task.resolved_data_dir()
    with _lock(d.parent / f".{d.name}.lock"):
        return prepare_files(task)


def _read_task_data(task: TaskConfig, splits=("train", "validation")) -> dict:
    """Every split the run reads (``splits`` and the evaluation split), read and checked
    line by line: ``{"files": {split: path}, split: records, ...}``. Called before any base
    weights are loaded, so a mistake in the data is reported at once."""
    from tiedlora.data.sft import read_jsonl

    files = _prepare_task(task)
    out = {"files": files}
    for split in dict.fromkeys((*splits, task.eval_split)):
        out[split] = read_jsonl(files[split])
    return out


def _param_counts(chunks, model_cfg: ModelConfig, peft_cfg: PeftConfig) -> dict:
    shapes = {t: model_cfg.target_shape(t) for t in peft_cfg.target_modules}
    trainable = peft_cfg.trainable_count(shapes, model_cfg.num_layers)
    lora = peft_cfg.lora_count(shapes, model_cfg.num_layers)
    return {"trainable_params": trainable, "lora_trainable_params": lora,
            "share_of_lora": trainable / lora}


# ----------------------------------------------------------------------- evaluation
def _evaluate(chunks, tokenizer, task: TaskConfig, records, model_cfg, eval_cfg: EvalConfig):
    from tiedlora.evaluate import evaluate_task

    if len(chunks) > 1 or (dist.is_initialized() and _pp() > 1):
        return None, None
    return evaluate_task(chunks[0], tokenizer, task, records, model_cfg.padded_vocab_size(),
                         limit=eval_cfg.limit, batch_size=eval_cfg.batch_size, progress=_is_rank0())


def _pp() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def _fmt_metrics(m: Optional[dict]) -> str:
    return "n/a" if not m else ", ".join(f"{k}={v:.1f}" for k, v in m.items())


# --------------------------------------------------------------------------- train
def run_finetune(cfg: FinetuneConfig) -> dict:
    """The whole job; returns the results dict (also written to results.json)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from megatron.core import parallel_state as ps

    from tiedlora.data.sft import MicroBatchSampler, SFTDataset, collate
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.peft import adapter_state_dict, finalize_adapter_grads, load_adapter_state_dict
    from tiedlora.training import (PreemptionFlag, build_optimizer, clip_adapter_grads,
                                   forward_backward, global_tokens, load_training_state_tensors,
                                   lr_at, optimizer_params, reduce_loss, sync_tied_copies,
                                   training_state_tensors, truncate_metrics, write_jsonl_line)

    t_start = time.time()
    out = Path(cfg.output_dir)
    # ---- data first: a bad line is reported before minutes of loading base weights
    records = _read_task_data(cfg.task)
    weights, tok_path = resolve_base(cfg.model)
    tokenizer = load_tokenizer(tok_path, cfg.model)
    max_len = min(cfg.task.max_length, cfg.model.seq_length)
    ds_kw = dict(tokenizer=tokenizer, template=cfg.task.template, max_length=max_len,
                 add_bos=cfg.task.add_bos, add_eos=cfg.task.add_eos,
                 answer_only_loss=cfg.task.answer_only_loss)
    files = records["files"]
    train_ds = SFTDataset(files["train"], records=records["train"], **ds_kw)
    val_ds = SFTDataset(files["validation"], records=records["validation"], **ds_kw)
    eval_records = records[cfg.task.eval_split]

    # ---- model
    init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    rank0 = _is_rank0()
    preempt = PreemptionFlag(cfg.trainer.preempt_signals)
    chunks = build_model(cfg.model, cfg.peft, cfg.parallel, weights)
    counts = _param_counts(chunks, cfg.model, cfg.peft)

    # ---- batching
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    sampler = MicroBatchSampler(len(train_ds), cfg.trainer.global_batch_size,
                                cfg.trainer.micro_batch_size, dp_rank, dp, cfg.trainer.seed)
    pad_mult = 8 * cfg.parallel.tp if cfg.parallel.sp else 8
    fixed_shape = cfg.parallel.pp > 1  # pipeline p2p needs one shape for all micro-batches

    def batches_of(ds, index_lists):
        length = None
        if fixed_shape:
            longest = max(len(ds[i]["input_ids"]) - 1 for il in index_lists for i in il)
            length = -(-longest // pad_mult) * pad_mult
        return [collate([ds[i] for i in il], tokenizer.pad_id, pad_mult, length) for il in index_lists]

    # ---- optimizer, state
    params = optimizer_params(chunks)
    optimizer = build_optimizer(params, cfg.optim)
    autocast = None
    if torch.cuda.is_available() and cfg.trainer.precision in ("auto", "bf16"):
        autocast = torch.bfloat16
    state = {"step": 0, "best_val": None, "bad_checks": 0, "best_step": None,
             "metrics_before": None, "train_time": 0.0, "tokens": 0, "stopped_early": False}
    metrics_path = out / "metrics.jsonl"
    latest = ckpt.latest_checkpoint(out) if cfg.checkpoint.resume else None
    if latest is not None:
        tensors, saved_cfg, meta = ckpt.load_adapter(latest)
        ckpt.check_compatible(saved_cfg, cfg.peft, where=str(latest / ckpt.ADAPTER_FILE))
        load_adapter_state_dict(chunks, tensors)
        ts, trainer_state = ckpt.load_trainer_state(latest / ckpt.STATE_FILE)
        state.update(trainer_state)
        exact = load_training_state_tensors(chunks, optimizer, ts)
        sampler.load_state_dict(state.pop("sampler"))
        _say(f"[tiedlora] resumed from {latest} at step {state['step']}"
             + ("" if exact else " (world size changed: RNG states re-seeded)"))
        if rank0:
            truncate_metrics(metrics_path, state["step"])
    elif rank0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    _barrier()

    def save_checkpoint(step: int):
        adapter = adapter_state_dict(chunks)
        tstate = training_state_tensors(chunks, optimizer)
        meta = {**state, "step": step, "sampler": sampler.state_dict()}
        if rank0:
            def write(d: Path):
                ckpt.save_adapter(d / ckpt.ADAPTER_FILE, adapter, cfg.peft, asdict(cfg.model), {"step": step})
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tstate.items()}, str(d / ckpt.STATE_FILE),
                          metadata={"trainer": json.dumps(meta)})
            ckpt.commit_checkpoint(out, step, write, cfg.checkpoint.keep_last)
        _barrier()

    def validation_loss() -> float:
        for c in chunks:
            c.eval()
        mbs = cfg.trainer.micro_batch_size
        lists = [list(range(i, min(i + mbs, len(val_ds)))) for i in range(0, len(val_ds), mbs)]
        if cfg.trainer.limit_val_batches:
            lists = lists[:cfg.trainer.limit_val_batches]
        mine = lists[dp_rank::dp] or lists[:1]
        with torch.no_grad():
            loss_sum, toks = forward_backward(chunks, batches_of(val_ds, mine), forward_only=True,
                                              autocast_dtype=autocast)
        for c in chunks:
            c.train()
        return reduce_loss(loss_sum, toks)

    # ---- metric before training (the adapted model at step 0 is the base: ΔW = 0)
    if cfg.eval.before and state["metrics_before"] is None:
        state["metrics_before"], _ = _evaluate(chunks, tokenizer, cfg.task, eval_records, cfg.model, cfg.eval)
        _say(f"[tiedlora] before fine-tuning: {_fmt_metrics(state['metrics_before'])}")

    # ---- the loop
    writer = SummaryWriter(str(out / "tb")) if rank0 else None
    max_steps = cfg.trainer.max_steps
    # A live bar on a terminal; plain log lines every trainer.log_every steps otherwise (Slurm logs).
    tty = sys.stderr.isatty()
    bar = tqdm(total=max_steps, initial=state["step"], disable=not (rank0 and tty), dynamic_ncols=True,
               desc=f"{cfg.task.name} {cfg.peft.name} r={cfg.peft.rank}")
    step = first_step = state["step"]
    t_loop = time.time()
    while step < max_steps and not state["stopped_early"]:
        t0 = time.time()
        micro = batches_of(train_ds, next(sampler))
        n_tokens = global_tokens(micro)
        for c in chunks:
            c.zero_grad(set_to_none=True)
        loss_sum, toks = forward_backward(chunks, micro, autocast_dtype=autocast)
        finalize_adapter_grads(chunks, num_tokens=n_tokens)
        grad_norm = clip_adapter_grads(chunks, cfg.optim.grad_clip)
        lr = lr_at(step, cfg.optim, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        sync_tied_copies(chunks)
        step += 1
        loss = reduce_loss(loss_sum, toks)
        seen = sum(int((b["tokens"] != tokenizer.pad_id).sum()) for b in micro) * dp
        dt = time.time() - t0
        state["tokens"] += seen
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": seen / dt, "step_time_s": dt}

        if cfg.trainer.val_check_interval and (step % cfg.trainer.val_check_interval == 0 or step == max_steps):
            val = validation_loss()
            record["val_loss"] = val
            best = state["best_val"]
            if best is None or val < best - cfg.trainer.early_stopping_min_delta:
                state.update(best_val=val, best_step=step, bad_checks=0)
                best_sd = adapter_state_dict(chunks)
                if rank0:
                    ckpt.save_adapter(out / "best" / ckpt.ADAPTER_FILE, best_sd, cfg.peft,
                                      asdict(cfg.model), {"step": step, "val_loss": val})
            else:
                state["bad_checks"] += 1
            patience = cfg.trainer.early_stopping_patience
            if patience and state["bad_checks"] >= patience:
                state["stopped_early"] = True

        state["train_time"] += dt
        state["step"] = step
        if rank0:
            write_jsonl_line(metrics_path, record)
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / dt:,.0f}", refresh=False)
            if not tty and (step % cfg.trainer.log_every == 0 or step == max_steps):
                extra = f" val_loss={record['val_loss']:.4f}" if "val_loss" in record else ""
                elapsed = time.time() - t_loop
                eta = elapsed / max(1, step - first_step) * (max_steps - step)
                print(f"step {step}/{max_steps} loss={loss:.4f} lr={lr:.2e} tok/s={seen / dt:,.0f}"
                      f"{extra} eta={eta:.0f}s", flush=True)

        stop = preempt.agreed()
        every = cfg.checkpoint.every_n_steps
        if stop or state["stopped_early"] or step == max_steps or (every and step % every == 0):
            save_checkpoint(step)
        if stop:
            _say(f"[tiedlora] {preempt.hit or 'signal'} received: checkpoint saved at step {step}; "
                 f"exiting with status {cfg.trainer.preempt_exit_code} (rerun to resume)")
            bar.close()
            if writer:
                writer.close()
            shutdown()
            sys.exit(cfg.trainer.preempt_exit_code)
        if state["stopped_early"]:
            _say(f"[tiedlora] early stopping at step {step}: no validation improvement in "
                 f"{cfg.trainer.early_stopping_patience} checks")
            break
    bar.close()
    preempt.disarm()
    train_wall = time.time() - t_loop

    # ---- final adapter and evaluation
    chosen = "last"
    if cfg.eval.use_best and (out / "best" / ckpt.ADAPTER_FILE).is_file():
        tensors, _, _ = ckpt.load_adapter(out / "best" / ckpt.ADAPTER_FILE)
        load_adapter_state_dict(chunks, tensors)
        chosen = f"best (step {state['best_step']}, val loss {state['best_val']:.4f})"
    final_sd = adapter_state_dict(chunks)
    if rank0:
        ckpt.save_adapter(out / ckpt.ADAPTER_FILE, final_sd, cfg.peft, asdict(cfg.model),
                          {"step": step, "selected": chosen})
    t_eval = time.time()
    metrics_after, rows = (None, None)
    if cfg.eval.after:
        metrics_after, rows = _evaluate(chunks, tokenizer, cfg.task, eval_records, cfg.model, cfg.eval)
    eval_time = time.time() - t_eval
    results = {
        "task": cfg.task.name, "model": cfg.model.name, "preset": cfg.peft.name, "rank": cfg.peft.rank,
        **counts, "metrics": metrics_after, "metrics_before": state["metrics_before"],
        "steps": step, "best_val_loss": state["best_val"], "best_step": state["best_step"],
        "stopped_early": state["stopped_early"], "adapter": str(out / ckpt.ADAPTER_FILE),
        "adapter_selected": chosen, "train_time_s": round(state["train_time"], 1),
        "tokens_per_s": round(state["tokens"] / max(state["train_time"], 1e-9), 1),
        "eval_time_s": round(eval_time, 1), "wall_time_s": round(time.time() - t_start, 1),
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp, "sp": cfg.parallel.sp},
    }
    if rank0:
        if rows is not None:
            ckpt.atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        ckpt.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        writer.close()
        _print_summary(results, train_wall)
    _barrier()
    shutdown()
    return results


def _print_summary(r: dict, train_wall: float) -> None:
    print("\n" + "=" * 72)
    print(f"tiedlora fine-tune  task={r['task']}  model={r['model']}  preset={r['preset']}  r={r['rank']}")
    print(f"trainable parameters: {r['trainable_params']:,} "
          f"({100 * r['share_of_lora']:.1f}% of LoRA's {r['lora_trainable_params']:,} at r={r['rank']})")
    before, after = r["metrics_before"] or {}, r["metrics"] or {}
    for k in (after or before):
        b = f"{before[k]:.1f}" if k in before else "n/a"
        a = f"{after[k]:.1f}" if k in after else "n/a"
        print(f"{k:>10}: before {b:>6}  ->  after {a:>6}")
    if not after and r["layout"]["pp"] > 1:  # not when eval.after=false at pp=1
        print("evaluation skipped (pipeline parallel): python -m tiedlora.evaluate "
              f"output_dir={Path(r['adapter']).parent} parallel.pp=1 parallel.vpp=null")
    print(f"steps: {r['steps']}{' (early stop)' if r['stopped_early'] else ''}; adapter: {r['adapter_selected']}")
    print(f"wall time: {r['wall_time_s']:.0f} s (training {train_wall:.0f} s at "
          f"{r['tokens_per_s']:,.0f} tokens/s, evaluation {r['eval_time_s']:.0f} s)")
    print(f"results: {Path(r['adapter']).parent / 'results.json'}")
    print("=" * 72, flush=True)


def run_evaluation(cfg: FinetuneConfig) -> dict:
    """Evaluate a saved adapter (``python -m tiedlora.evaluate``)."""
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.peft import load_adapter_state_dict

    t0 = time.time()
    out = Path(cfg.output_dir)
    if cfg.parallel.pp > 1:
        raise ValueError(f"parallel.pp={cfg.parallel.pp}: evaluation runs with parallel.pp=1 "
                         "(adapters are layout-independent)")
    adapter_path = Path(cfg.adapter) if cfg.adapter else out / ckpt.ADAPTER_FILE
    tensors, saved_peft, meta = ckpt.load_adapter(adapter_path)
    records = _read_task_data(cfg.task, splits=())[cfg.task.eval_split]  # data before weights
    weights, tok_path = resolve_base(cfg.model)
    tokenizer = load_tokenizer(tok_path, cfg.model)
    init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    chunks = build_model(cfg.model, saved_peft, cfg.parallel, weights)
    load_adapter_state_dict(chunks, tensors)
    metrics, rows = _evaluate(chunks, tokenizer, cfg.task, records, cfg.model, cfg.eval)
    previous = {}
    if (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
    results = {**previous, "task": cfg.task.name, "model": cfg.model.name, "preset": saved_peft.name,
               "rank": saved_peft.rank, **_param_counts(chunks, cfg.model, saved_peft),
               "metrics": metrics, "adapter": str(adapter_path),
               "steps": json.loads(meta.get("step", "null")) if "step" in meta else previous.get("steps"),
               "eval_time_s": round(time.time() - t0, 1)}
    results.setdefault("wall_time_s", results["eval_time_s"])
    if _is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        ckpt.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        print(f"{cfg.task.name} {saved_peft.name} r={saved_peft.rank}: {_fmt_metrics(metrics)}  "
              f"-> {out / 'results.json'}", flush=True)
    shutdown()
    return results


# ------------------------------------------------------------------------- hydra
class ComparisonTable:
    """Hydra callback: after a multirun, print one row per job from its results.json."""

    def __init__(self):
        self.dirs: List[str] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED:  # failed job: reported once, elsewhere
            return
        value = job_return.return_value
        if isinstance(value, dict) and value.get("adapter"):
            self.dirs.append(str(Path(value["adapter"]).parent))

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.dirs:
            from tiedlora.report import render, load_results

            print("\n" + render(load_results(self.dirs)), flush=True)

    # Hydra's Callback protocol
    def on_run_start(self, config, **kwargs):
        pass

    def on_run_end(self, config, **kwargs):
        pass

    def on_multirun_start(self, config, **kwargs):
        pass

    def on_job_start(self, config, **kwargs):
        pass


def main() -> None:
    """The command line (exits; a user's mistake ends with one message: tiedlora.cli)."""
    from tiedlora.cli import hydra_main
    from tiedlora.config import to_object
    from tiedlora.launch.hydra_slurm import register as register_slurm_launcher

    register_slurm_launcher()  # hydra/launcher=slurm (conf/launcher clusters; needs the `slurm` extra)

    @hydra_main("finetune")
    def _run(dcfg):
        return run_finetune(to_object(dcfg))

    _run()


if __name__ == "__main__":
    main()
