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
``results.json``. Rerunning the same command resumes from the latest checkpoint. One run
at a time: rank 0 holds ``output_dir/run.lock`` for the run's life, and a second run on the
folder stops at once (exit status 2) naming the first.

A step whose loss or gradient norm is NaN or infinite skips its optimizer step
(``trainer.nonfinite=skip``; ``raise`` stops at once); after ``trainer.max_skipped_steps``
skipped steps in a row the run stops as diverged (exit status 4, results.json with
``"status": "diverged"``, no adapter). A disk that fills up while saving ends the run with
one ``error:`` line and exit status 5; ``checkpoints/latest`` still names the last whole
checkpoint, and rerunning the command resumes from it.

The recipe reads top to bottom as three functions (torchtune's recipe shape):
:func:`setup` (data, process group, model, optimizer, resume), :func:`train` (the loop:
forward/backward, gradient sync, clip, step, validate, checkpoint) and :func:`save`
(choose and save the final adapter, evaluate, write results). ``docs/architecture.md``
follows one step through them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
from omegaconf import OmegaConf

from tiedlora import checkpoint as ckpt
from tiedlora import compat
from tiedlora.build import build_model, load_tokenizer, param_counts, resolve_base
from tiedlora.config import FinetuneConfig, TrainerConfig
from tiedlora.dist import (ProcessGroups, agree_on_rank0, detect_env, init_distributed, is_rank0, process_groups,
                           rank0_writes, shutdown)
from tiedlora.errors import RunDiverged, UserError, WriteFailed
from tiedlora.evaluate import evaluate_chunks, fmt_metrics
from tiedlora.files import RunLock, atomic_write_text, lock_run_dir, run_identity, to_json
from tiedlora.peft import adapter_state_dict, finalize_adapter_grads, load_adapter_state_dict
from tiedlora.peft.model import trainable_params
from tiedlora.tasks import read_task_data
from tiedlora.training import (PreemptionFlag, build_optimizer, clip_adapter_grads, finite_or_none, forward_backward,
                               global_tokens, lr_at, nonfinite_cause, reduce_loss, step_token_counts, sync_tied_copies,
                               truncate_metrics, write_jsonl_line)


def _say(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


@dataclass
class Run:
    """What :func:`setup` builds and :func:`train` / :func:`save` use."""

    cfg: FinetuneConfig
    out: Path
    groups: ProcessGroups
    tokenizer: object
    chunks: List[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    sampler: object
    train_ds: object
    val_ds: object
    eval_records: List[dict]
    batches_of: Callable  # (dataset, index lists) -> collated micro-batches
    autocast: Optional[torch.dtype]
    preempt: PreemptionFlag
    counts: dict
    t_start: float
    identity: dict  # who runs it (host, pid, start, Slurm job): the lock's holder, results.json's "run"
    # the loop's state, saved in every checkpoint; skipped_in_a_row too, so that a resumed run
    # stops after the same skipped step as an uninterrupted one would
    state: dict = field(default_factory=lambda: {
        "step": 0, "best_val": None, "bad_checks": 0, "best_step": None, "metrics_before": None,
        "train_time": 0.0, "tokens": 0, "computed_tokens": 0, "stopped_early": False, "skipped_steps": 0,
        "skipped_in_a_row": 0})

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def model_info(self) -> dict:
        return asdict(self.cfg.model)


# ------------------------------------------------------------------------- set-up
def lock_output_dir(trainer: TrainerConfig, out: Path) -> tuple[Optional[RunLock], Optional[Exception]]:
    """Rank 0 takes ``out/run.lock`` (``trainer.lock``), waiting ``trainer.lock_wait_s``, or
    ``trainer.requeue_lock_wait_s`` in a requeued Slurm job, whose previous run may still be
    ending. Returns (the lock, None) or (None, why not): the other ranks learn the outcome in
    :func:`setup`, once the process group exists, and all of them stop together. Other
    ranks return (None, None) at once."""
    if detect_env().rank != 0:
        return None, None
    if not trainer.lock:
        print(f"[tiedlora] trainer.lock=false: {out} is not locked; make sure no other run writes into it",
              flush=True)
        return None, None
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    wait = trainer.requeue_lock_wait_s if requeued else trainer.lock_wait_s
    try:
        return lock_run_dir(out, wait, on_wait=lambda msg: print(f"[tiedlora] {msg}", flush=True)), None
    except (UserError, WriteFailed) as e:
        return None, e


def describe_lr(cfg: FinetuneConfig) -> str:
    """Which peak rate the run uses and where it came from (printed at start)."""
    if cfg.lr_source == "optim.lr":
        return f"[tiedlora] lr {cfg.optim.lr:g} (optim.lr)"
    line = (f"[tiedlora] lr {cfg.optim.lr:g} (preset {cfg.peft.name}'s rate, peft.lr, chosen on the embedded mini "
            "base; override with optim.lr=...)")
    if cfg.model.name != "mini":
        line += (f"\n[tiedlora] note: model={cfg.model.name} is not the mini base that rate was chosen on: use a "
                 "recipe (recipes/, the paper's 1e-4) or choose one with +sweep=lr")
    return line


def setup(cfg: FinetuneConfig, lock: Optional[RunLock] = None, lock_refused: Optional[Exception] = None) -> Run:
    """Data first (no process group needed), then the process group, model, optimizer,
    and the latest checkpoint of ``cfg.output_dir`` when there is one. ``lock`` /
    ``lock_refused``: :func:`lock_output_dir`'s answer (rank 0's; every rank raises the refusal)."""
    from tiedlora.data.packing import check_fits, pack_micro_batches
    from tiedlora.data.sft import MicroBatchSampler, SFTDataset, collate

    t_start = time.time()
    compat.install()  # CPU machines: megatron-core's CUDA-only calls go to the CPU (no-op on GPU)
    out = Path(cfg.output_dir)
    # ---- data first: a bad line is reported before minutes of loading base weights
    records = read_task_data(cfg.task)
    weights, tok_path = resolve_base(cfg.model)
    tokenizer = load_tokenizer(tok_path, cfg.model)
    max_len = min(cfg.task.max_length, cfg.model.seq_length)
    ds_kw = dict(tokenizer=tokenizer, template=cfg.task.template, max_length=max_len,
                 add_bos=cfg.task.add_bos, add_eos=cfg.task.add_eos,
                 answer_only_loss=cfg.task.answer_only_loss)
    files = records["files"]
    train_ds = SFTDataset(files["train"], records=records["train"], **ds_kw)
    val_ds = SFTDataset(files["validation"], records=records["validation"], **ds_kw)

    # ---- model
    init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    lock_refused = agree_on_rank0(lock_refused)
    if lock_refused is not None:  # every rank stops with rank 0's message (printed by rank 0 only)
        raise lock_refused
    groups = process_groups()
    _say(describe_lr(cfg))
    preempt = PreemptionFlag(cfg.trainer.preempt_signals)
    chunks = build_model(cfg.model, cfg.peft, cfg.parallel, weights)

    # ---- batching
    sampler = MicroBatchSampler(len(train_ds), cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size,
                                groups.rank(groups.dp), groups.size(groups.dp), cfg.trainer.seed)
    pad_mult = 8 * cfg.parallel.tp if cfg.parallel.sp else 8
    pack_length = cfg.data.resolved_pack_length(cfg.task, cfg.model)
    if cfg.data.packing:
        check_fits(train_ds, pack_length)
        check_fits(val_ds, pack_length)
    fixed_shape = cfg.parallel.pp > 1  # pipeline p2p needs one shape for all micro-batches

    def batches_of(ds, index_lists):
        if cfg.data.packing:  # the same examples, whole, in packs of at most pack_length tokens
            indices = [i for il in index_lists for i in il]
            return pack_micro_batches(ds, indices, tokenizer.pad_id, pack_length, cfg.data.pack_algorithm,
                                      cfg.trainer.seed, multiple_of=None if fixed_shape else pad_mult)
        length = None
        if fixed_shape:
            longest = max(len(ds[i]["input_ids"]) - 1 for il in index_lists for i in il)
            length = -(-longest // pad_mult) * pad_mult
        return [collate([ds[i] for i in il], tokenizer.pad_id, pad_mult, length) for il in index_lists]

    autocast = None
    if torch.cuda.is_available() and cfg.trainer.precision in ("auto", "bf16"):
        autocast = torch.bfloat16
    run = Run(cfg=cfg, out=out, groups=groups, tokenizer=tokenizer, chunks=chunks,
              optimizer=build_optimizer(trainable_params(chunks), cfg.optim), sampler=sampler,
              train_ds=train_ds, val_ds=val_ds, eval_records=records[cfg.task.eval_split],
              batches_of=batches_of, autocast=autocast, preempt=preempt,
              counts=param_counts(cfg.model, cfg.peft), t_start=t_start,
              identity=lock.holder if lock is not None else run_identity())

    # ---- resume, or start a fresh metrics log
    resumed = ckpt.resume_training(out, chunks, run.optimizer, cfg.peft, groups) if cfg.checkpoint.resume else None
    if resumed is not None:
        latest, meta, exact = resumed
        run.state.update(meta)
        sampler.load_state_dict(run.state.pop("sampler"))
        _say(f"[tiedlora] resumed from {latest} at step {run.state['step']}"
             + ("" if exact else " (world size changed: RNG states re-seeded)"))

    def start_files():
        if resumed is not None:
            truncate_metrics(run.metrics_path, run.state["step"])
        else:
            out.mkdir(parents=True, exist_ok=True)
            run.metrics_path.unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)), "write the run's config")
    rank0_writes(start_files)
    return run


def validation_loss(run: Run) -> float:
    """Per-token loss on (up to ``trainer.limit_val_batches``) validation micro-batches."""
    cfg, groups = run.cfg, run.groups
    for c in run.chunks:
        c.eval()
    mbs = cfg.trainer.micro_batch_size
    lists = [list(range(i, min(i + mbs, len(run.val_ds)))) for i in range(0, len(run.val_ds), mbs)]
    if cfg.trainer.limit_val_batches:
        lists = lists[:cfg.trainer.limit_val_batches]
    mine = lists[groups.rank(groups.dp)::groups.size(groups.dp)] or lists[:1]
    with torch.no_grad():
        loss_sum, toks = forward_backward(run.chunks, run.batches_of(run.val_ds, mine), forward_only=True,
                                          autocast_dtype=run.autocast)
    for c in run.chunks:
        c.train()
    return reduce_loss(loss_sum, toks, groups)


def save_checkpoint(run: Run, step: int) -> None:
    ckpt.save_training_checkpoint(run.out, step, run.chunks, run.optimizer, run.cfg.peft, run.model_info(),
                                  {**run.state, "step": step, "sampler": run.sampler.state_dict()},
                                  run.cfg.checkpoint.keep_last, run.groups)


# --------------------------------------------------------------------------- train
def train(run: Run) -> float:
    """The loop, one optimizer step per iteration; returns its wall time in seconds.

    Exits the process (status ``trainer.preempt_exit_code``) after the checkpoint that a
    preemption signal asked for. A step with a non-finite loss or gradient norm skips its
    optimizer step (``trainer.nonfinite=skip``) and still counts as a step: the batch is
    consumed and the learning rate, a function of the step number, moves on. Raises
    :class:`~tiedlora.errors.RunDiverged` (after writing results.json with ``"status":
    "diverged"``) at the first such step under ``raise`` or after
    ``trainer.max_skipped_steps`` in a row, and :class:`~tiedlora.errors.WriteFailed` on
    every rank when rank 0 could not write this step's outputs.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    cfg, state, chunks, groups = run.cfg, run.state, run.chunks, run.groups
    rank0 = is_rank0()

    # metric before training (the adapted model at step 0 is the base: ΔW = 0)
    if cfg.eval.before and state["metrics_before"] is None:
        state["metrics_before"], _ = evaluate_chunks(chunks, run.tokenizer, cfg.task, run.eval_records,
                                                     cfg.model, cfg.eval, groups)
        _say(f"[tiedlora] before fine-tuning: {fmt_metrics(state['metrics_before'])}")

    writer = SummaryWriter(str(run.out / "tb")) if rank0 else None
    max_steps = cfg.trainer.max_steps
    # A live bar on a terminal; plain log lines every trainer.log_every steps otherwise (Slurm logs).
    tty = sys.stderr.isatty()
    bar = tqdm(total=max_steps, initial=state["step"], disable=not (rank0 and tty), dynamic_ncols=True,
               desc=f"{cfg.task.name} {cfg.peft.name} r={cfg.peft.rank}")

    def close():
        bar.close()
        if writer:
            writer.close()

    failed: List[WriteFailed] = []  # rank 0's refused writes of this step; all ranks agree at its end

    def rank0_try(write):
        try:
            write()
        except WriteFailed as e:
            failed.append(e)

    step = first_step = state["step"]
    t_loop = time.time()
    while step < max_steps and not state["stopped_early"]:
        t0 = time.time()
        micro = run.batches_of(run.train_ds, next(run.sampler))
        n_tokens = global_tokens(micro, groups)
        for c in chunks:
            c.zero_grad(set_to_none=True)
        loss_sum, toks = forward_backward(chunks, micro, autocast_dtype=run.autocast)
        finalize_adapter_grads(chunks, num_tokens=n_tokens, groups=groups)
        grad_norm = clip_adapter_grads(chunks, cfg.optim.grad_clip, groups)
        loss = reduce_loss(loss_sum, toks, groups)
        lr = lr_at(step, cfg.optim, max_steps)
        nonfinite = nonfinite_cause(loss, grad_norm)  # the same on every rank: both are reduced already
        if nonfinite is None:
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            run.optimizer.step()
            sync_tied_copies(chunks)
            state["skipped_in_a_row"] = 0
        else:
            state["skipped_steps"] += 1
            state["skipped_in_a_row"] += 1
        step += 1
        seen, computed = step_token_counts(micro, groups)  # prompt + answer tokens; with padding
        dt = time.time() - t0
        state["tokens"] += seen
        state["computed_tokens"] += computed
        record = {"step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
                  "tokens_per_s": seen / dt, "padding_fraction": 1 - seen / computed, "step_time_s": dt}
        if nonfinite:
            record.update(skipped=nonfinite, skipped_steps=state["skipped_steps"])
        failed.clear()
        if cfg.trainer.val_check_interval and (step % cfg.trainer.val_check_interval == 0 or step == max_steps):
            val = validation_loss(run)
            record["val_loss"] = finite_or_none(val)
            best = state["best_val"]
            # a finite loss also means finite adapter values: any NaN or inf in them reaches every output
            if math.isfinite(val) and (best is None or val < best - cfg.trainer.early_stopping_min_delta):
                state.update(best_val=val, best_step=step, bad_checks=0)
                best_sd = adapter_state_dict(chunks, groups=groups)
                if rank0:
                    rank0_try(lambda: ckpt.save_adapter(run.out / "best" / ckpt.ADAPTER_FILE, best_sd, cfg.peft,
                                                        run.model_info(), {"step": step, "val_loss": val},
                                                        "save the best adapter"))
            else:
                state["bad_checks"] += 1
            patience = cfg.trainer.early_stopping_patience
            if patience and state["bad_checks"] >= patience:
                state["stopped_early"] = True

        state["train_time"] += dt
        state["step"] = step
        if rank0:
            rank0_try(lambda: write_jsonl_line(run.metrics_path, record))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)
            skipped = f" skipped={state['skipped_steps']}" if state["skipped_steps"] else ""
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / dt:,.0f}", refresh=False,
                            **({"skipped": state["skipped_steps"]} if skipped else {}))
            if nonfinite and cfg.trainer.nonfinite == "skip":
                print(f"[tiedlora] step {step}: non-finite {nonfinite} (loss {loss:.4g}, grad norm "
                      f"{grad_norm:.4g}, lr {lr:.2e}): optimizer step skipped ({state['skipped_in_a_row']} in a "
                      f"row; trainer.max_skipped_steps={cfg.trainer.max_skipped_steps})", flush=True)
            if not tty and (step % cfg.trainer.log_every == 0 or step == max_steps):
                extra = f" val_loss={val:.4f}" if "val_loss" in record else ""
                elapsed = time.time() - t_loop
                eta = elapsed / max(1, step - first_step) * (max_steps - step)
                print(f"step {step}/{max_steps} loss={loss:.4f} lr={lr:.2e} tok/s={seen / dt:,.0f} "
                      f"pad={record['padding_fraction']:.0%}{extra}{skipped} eta={eta:.0f}s", flush=True)

        stop, write_failed = run.preempt.agreed(write_failed=bool(failed))
        if write_failed:
            close()
            raise failed[0] if failed else WriteFailed.elsewhere()
        if nonfinite and (cfg.trainer.nonfinite == "raise"
                          or state["skipped_in_a_row"] >= cfg.trainer.max_skipped_steps):
            close()
            _diverged(run, step, _nonfinite_message(run, step, nonfinite, loss, grad_norm, lr))
        every = cfg.checkpoint.every_n_steps
        if stop or state["stopped_early"] or step == max_steps or (every and step % every == 0):
            try:
                save_checkpoint(run, step)
            except RunDiverged as e:
                close()
                _diverged(run, step, str(e))
        if stop:
            _say(f"[tiedlora] {run.preempt.hit or 'signal'} received: checkpoint saved at step {step}; "
                 f"exiting with status {cfg.trainer.preempt_exit_code} (rerun to resume)")
            close()
            shutdown()
            sys.exit(cfg.trainer.preempt_exit_code)
        if state["stopped_early"]:
            _say(f"[tiedlora] early stopping at step {step}: no validation improvement in "
                 f"{cfg.trainer.early_stopping_patience} checks")
            break
    close()
    run.preempt.disarm()
    return time.time() - t_loop


def _nonfinite_message(run: Run, step: int, cause: str, loss: float, grad_norm: float, lr: float) -> str:
    t, o = run.cfg.trainer, run.cfg.optim
    why = (f"non-finite {cause} at step {step} (loss {loss:.4g}, gradient norm {grad_norm:.4g}, "
           f"learning rate {lr:.3g})")
    if t.nonfinite == "skip":
        n = run.state["skipped_in_a_row"]
        why += f"; {n} optimizer step{'s' if n > 1 else ''} skipped in a row (trainer.max_skipped_steps={n})"
    hints = [f"a lower optim.lr (now {o.lr:g})"]
    if not o.grad_clip:
        hints.append("gradient clipping (optim.grad_clip=1.0)")
    if not o.warmup_steps:
        hints.append("a warm-up (optim.warmup_steps)")
    if run.autocast is not None:
        hints.append("trainer.precision=fp32")
    return f"{why}. Try {', '.join(hints)}"


def _diverged(run: Run, step: int, why: str) -> None:
    """Record a diverged run (results.json with ``"status": "diverged"``; no adapter, no
    metrics; the last checkpoint stays ``latest``) and raise RunDiverged on every rank."""
    latest = ckpt.latest_checkpoint(run.out)
    last = f"; the last checkpoint, {latest.name}, is from before it" if latest is not None else ""
    results = {**_results_common(run), "status": "diverged", "metrics": None, "adapter": None,
               "diverged": {"step": step, "reason": why}}
    rank0_writes(lambda: atomic_write_text(run.out / "results.json", to_json(results, indent=2) + "\n",
                                           "write results.json of the diverged run"))
    raise RunDiverged(f"training diverged: {why}{last}. results.json says \"status\": \"diverged\"; "
                      "no adapter was written", results)


# ---------------------------------------------------------------------------- save
def _results_common(run: Run) -> dict:
    """What results.json says about a run however it ended."""
    cfg, state, groups = run.cfg, run.state, run.groups
    return {
        "task": cfg.task.name, "model": cfg.model.name, "preset": cfg.peft.name, "rank": cfg.peft.rank,
        "lr": cfg.optim.lr, "lr_source": cfg.lr_source, **run.counts,
        "metrics_before": state["metrics_before"], "steps": state["step"],
        "skipped_steps": state["skipped_steps"], "best_val_loss": state["best_val"], "best_step": state["best_step"],
        "stopped_early": state["stopped_early"], "output_dir": str(run.out), "run": run.identity,
        "train_time_s": round(state["train_time"], 1),
        "tokens_per_s": round(state["tokens"] / max(state["train_time"], 1e-9), 1),
        "padding_fraction": round(1 - state["tokens"] / max(state["computed_tokens"], 1), 4),
        "wall_time_s": round(time.time() - run.t_start, 1),
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": groups.size(groups.dp),
                   "sp": cfg.parallel.sp},
    }


def save(run: Run, train_wall: float) -> dict:
    """Choose the final adapter (best validation loss or last), save it as
    ``adapter.safetensors``, evaluate it, write ``results.json``; returns the results."""
    cfg, state, out, groups = run.cfg, run.state, run.out, run.groups
    chosen = "last"
    if cfg.eval.use_best and state["best_step"] is not None and (out / "best" / ckpt.ADAPTER_FILE).is_file():
        tensors, _, _ = ckpt.load_adapter(out / "best" / ckpt.ADAPTER_FILE)
        load_adapter_state_dict(run.chunks, tensors, groups=groups)
        chosen = f"best (step {state['best_step']}, val loss {state['best_val']:.4f})"
    # finite: loaded from best/ (load_adapter refuses non-finite values) or the last step's, which
    # the final checkpoint has just checked
    final_sd = adapter_state_dict(run.chunks, groups=groups)
    rank0_writes(lambda: ckpt.save_adapter(out / ckpt.ADAPTER_FILE, final_sd, cfg.peft, run.model_info(),
                                           {"step": state["step"], "selected": chosen}, "save the final adapter"))
    t_eval = time.time()
    metrics_after, rows = (None, None)
    if cfg.eval.after:
        metrics_after, rows = evaluate_chunks(run.chunks, run.tokenizer, cfg.task, run.eval_records,
                                              cfg.model, cfg.eval, groups)
    eval_time = time.time() - t_eval
    results = {**_results_common(run), "status": "completed", "metrics": metrics_after,
               "adapter": str(out / ckpt.ADAPTER_FILE), "adapter_selected": chosen,
               "eval_time_s": round(eval_time, 1)}

    def write():
        if rows is not None:
            atomic_write_text(out / "predictions.jsonl", "".join(to_json(r) + "\n" for r in rows),
                              "write the predictions")
        atomic_write_text(out / "results.json", to_json(results, indent=2) + "\n", "write results.json")
    rank0_writes(write)
    if is_rank0():
        _print_summary(results, train_wall)
    return results


def run_finetune(cfg: FinetuneConfig) -> dict:
    """The whole job; returns the results dict (also written to results.json). Rank 0 holds
    ``output_dir``'s lock from before the data is read until the results are written."""
    out = Path(cfg.output_dir)
    lock, refused = lock_output_dir(cfg.trainer, out)
    try:
        run = setup(cfg, lock, refused)
        train_wall = train(run)
        results = save(run, train_wall)
    except WriteFailed as e:
        latest = ckpt.latest_checkpoint(out) if (out / "checkpoints" / "latest").is_file() else None
        raise e.with_hint(f"checkpoints/latest still names {latest.name}: free space and rerun the same command "
                          "to resume from it" if latest else "free space and rerun the same command")
    finally:
        if lock is not None:
            lock.release()
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
    skipped = f", {r['skipped_steps']} skipped (non-finite)" if r["skipped_steps"] else ""
    print(f"steps: {r['steps']}{' (early stop)' if r['stopped_early'] else ''}{skipped}; "
          f"adapter: {r['adapter_selected']}")
    print(f"wall time: {r['wall_time_s']:.0f} s (training {train_wall:.0f} s at "
          f"{r['tokens_per_s']:,.0f} tokens/s, evaluation {r['eval_time_s']:.0f} s)")
    print(f"results: {Path(r['adapter']).parent / 'results.json'}")
    print("=" * 72, flush=True)



# ------------------------------------------------------------------------- hydra
class ComparisonTable:
    """Hydra callback: after a multirun, print one row per job from its results.json."""

    def __init__(self):
        self.dirs: List[str] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED:  # failed job: reported once, elsewhere
            return
        value = job_return.return_value  # results.json's content (a diverged job's too: tiedlora.cli)
        if isinstance(value, dict) and value.get("output_dir"):
            self.dirs.append(value["output_dir"])

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
