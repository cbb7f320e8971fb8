"""GPU check: TL6 fine-tuning throughput, peak memory and MFU on a GPT-2B-001-shaped model.

What runs: ``conf/model/gpt2b_001.yaml`` (24 layers, hidden 2048, FFN 5440 SwiGLU, 16 heads,
RoPE 0.5, layernorm1p, vocabulary 256000, bf16 base) with ``model.checkpoint=null`` (random
weights: speed does not depend on them), ``conf/peft/tl6.yaml`` (rank 8 on ``linear_qkv``,
the paper's setting), TP = PP = DP = 1, and the step of ``tiedlora.finetune`` without the
data pipeline: megatron-core's schedule with the per-token loss under bf16 autocast
(``forward_backward``), ``finalize_adapter_grads``, ``clip_adapter_grads``, fused AdamW over
the adapter tensors only. Batches are random token ids, every token supervised.

    python bench/gpu_check.py                  # one H200: about a minute, mostly model set-up
    python bench/gpu_check.py --rank 128 --micro-batch-size 4 --out gpu_check.json
    python bench/gpu_check.py --tiny           # CPU: the tiny model, a few seconds (CI test)
    python bench/gpu_check.py --compare-attention   # te vs sdpa vs local: logits and adapter grads

``--compare-attention`` builds a 2-layer GPT-2B-001-shaped model (layernorm1p, RoPE 0.5,
SwiGLU) in fp32 once per attention backend (``local``, ``sdpa``, and ``te`` where
transformer-engine imports) with identical base weights (TE's fused layernorm weights are
mapped from the local spec's norms) and identical TL6 adapters on all four targets, and
compares each backend's logits and adapter gradients with ``local``'s (JSON; exit status 1
beyond tolerance). It is what verifies the ``te`` path, which has no CPU test.

Prints one JSON object (also written to ``--out``): tokens/s over the timed steps, peak
memory (CUDA: ``max_memory_allocated``/``max_memory_reserved``; CPU: peak RSS), model FLOPs
per step, achieved TFLOP/s and MFU against ``--peak-tflops`` (default 989: H200 SXM bf16
dense; on CPU MFU is reported only when ``--peak-tflops`` is given).

Model FLOPs of one optimizer step (T tokens in the step, s sequence length, L layers,
a = heads x head_dim, A_l = the adapter matrices' sizes)::

    N_mm   = L * (h*q + a*h + h*f1 + f*h) + h*V      frozen matmul weights a token passes:
                                                      q fused-QKV width, f1 fc1 width (2*FFN
                                                      with SwiGLU), f FFN, V padded vocabulary
    N_ad   = L * sum over targets of r*(d_in + d_out) adapter matmul weights per token
                                                      (a tied A/B counts once per use)
    FLOPs  = 4*N_mm*T  +  12*L*s*a*T  +  6*N_ad*T

The frozen matmuls cost 2 FLOPs per weight and token forward and 2 backward (activation
gradient only: no weight gradient for a frozen weight), hence 4*N_mm*T instead of full
fine-tuning's 6*N*T. The attention core (Q·Kᵀ and P·V, counted dense as in Megatron's and
PaLM's MFU, i.e. without halving for the causal mask) costs 4*s*a per token and layer
forward and twice that backward: 12*L*s*a*T. Adapters get weight gradients too: 6*N_ad*T.
Norms, softmax, activations, embeddings lookups and u/v scalings are not counted; the input
gradient of the first layer's QKV projection, which autograd skips, is (under 0.5% of the
total for GPT-2B-001). N_mm and N_ad are checked against the parameters of the model built.

Note: the model uses the attention backend of its config (``model.attention_backend``,
default ``sdpa``: megatron-core's local linears with torch's fused attention, the same code
path as on CPU); ``model.attention_backend=te`` as an override runs transformer-engine's
layers instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny CPU model (conf/model/tiny.yaml), small batches")
    p.add_argument("--preset", default="tl6", help="conf/peft preset (default tl6)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=None, help="comma-separated targets (default: the preset's)")
    p.add_argument("--seq-length", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-micro-batches", type=int, default=None,
                   help="micro-batches per optimizer step (default 4; tiny: 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"device peak for MFU (default on CUDA: {H200_BF16_DENSE_TFLOPS}, H200 bf16 dense)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--compare-attention", action="store_true",
                   help="compare attention backends' logits and adapter gradients instead of timing")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.num_layers=12")
    a = p.parse_args(argv)
    a.seq_length = a.seq_length or (64 if a.tiny else 2048)
    a.num_micro_batches = a.num_micro_batches or (2 if a.tiny else 4)
    for f in ("seq_length", "micro_batch_size", "num_micro_batches", "steps", "rank"):
        if getattr(a, f) < 1:
            p.error(f"--{f.replace('_', '-')} must be >= 1")
    return a


def configs(args):
    from tiedlora.config import compose, to_object

    ov = [f"model={'tiny' if args.tiny else 'gpt2b_001'}", "model.checkpoint=null",
          f"peft={args.preset}", f"peft.rank={args.rank}"]
    if args.targets:
        ov.append(f"peft.target_modules=[{args.targets}]")
    cfg = to_object(compose("params", ov + list(args.overrides)))
    if args.seq_length > cfg.model.seq_length:
        raise SystemExit(f"--seq-length {args.seq_length} > model.seq_length={cfg.model.seq_length}")
    return cfg.model, cfg.peft


def flops_terms(model_cfg, peft_cfg) -> dict:
    """N_mm and N_ad of the docstring, from the configs."""
    h, L = model_cfg.hidden_size, model_cfg.num_layers
    per_layer = sum(din * dout for din, dout in (model_cfg.target_shape(t) for t in
                    ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")))
    n_mm = L * per_layer + h * model_cfg.padded_vocab_size()
    n_ad = L * sum(peft_cfg.rank * sum(model_cfg.target_shape(t)) for t in peft_cfg.target_modules)
    attn = model_cfg.head_dim * model_cfg.num_attention_heads
    return {"n_mm": n_mm, "n_ad": n_ad, "attn_width": attn}


def step_flops(terms: dict, L: int, seq: int, tokens: int) -> float:
    return 4.0 * terms["n_mm"] * tokens + 12.0 * L * seq * terms["attn_width"] * tokens + 6.0 * terms["n_ad"] * tokens


def counted_terms(model) -> dict:
    """N_mm and N_ad counted on the built model (the docstring formula must match them)."""
    from tiedlora.peft.model import adapter_modules

    n_mm = 0
    for name, p in model.named_parameters():
        if name.endswith(("linear_qkv.base.weight", "linear_proj.base.weight", "linear_fc1.base.weight",
                          "linear_fc2.base.weight", "linear_qkv.weight", "linear_proj.weight",
                          "linear_fc1.weight", "linear_fc2.weight", "output_layer.weight")):
            n_mm += p.numel()
    if getattr(model, "share_embeddings_and_output_weights", False):
        n_mm += model.embedding.word_embeddings.weight.numel()
    n_ad = 0
    for ad in adapter_modules(model):
        n_ad += ad.factor("A").numel() + ad.factor("B").numel()
    return {"n_mm": n_mm, "n_ad": n_ad}


def random_batches(vocab: int, mbs: int, seq: int, n: int, step: int):
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).unsqueeze(0).expand(mbs, seq).contiguous()})
    return out


# TE's fused layernorm-linears own the norms that the local spec keeps as separate modules
_TE_NAMES = ((".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
             (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"))
COMPARE_TOL = {"atol": 2e-4, "rtol": 2e-3}  # fp32; GPU kernels differ in summation order


def _copy_base(src_state: dict, dst, te: bool) -> None:
    state = {}
    for name, t in src_state.items():
        if name.endswith("_extra_state"):
            continue
        if te:
            for a, b in _TE_NAMES:
                name = name.replace(a, b)
        state[name] = t
    missing, unexpected = dst.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise AssertionError(f"base weights do not map: missing {missing}, unexpected {unexpected}")


def compare_attention(args) -> dict:
    """Logits and adapter gradients of every available attention backend against ``local``."""
    from tiedlora.config import compose, to_object
    from tiedlora.dist import init_distributed, set_seed, shutdown
    from tiedlora.models.attention import te_available
    from tiedlora.config import ParallelConfig
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import adapter_parameters, adapter_state_dict, apply_peft, load_adapter_state_dict

    owns_process_group = not torch.distributed.is_initialized()
    init_distributed(ParallelConfig(), seed=1234)
    ov = ["model=tiny" if args.tiny else "model=gpt2b_001", "model.checkpoint=null",
          "model.num_layers=2", "model.params_dtype=float32", "peft=tl6", f"peft.rank={args.rank}",
          "peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"]
    cfg = to_object(compose("params", ov + list(args.overrides)))
    backends = ["local", "sdpa"] + (["te"] if te_available() else [])
    seq = min(args.seq_length, 512)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (args.micro_batch_size, seq + 1), generator=g)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    x, y = ids[:, :-1].to(dev), ids[:, 1:].to(dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(args.micro_batch_size, -1)
    ref_base, adapters, out = None, None, {}
    for backend in backends:
        set_seed(1234)
        model_cfg = dataclasses.replace(cfg.model, attention_backend=backend)
        model = build_gpt_model(model_cfg)
        if ref_base is None:  # the local model's base weights, before adapters wrap the linears
            ref_base = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        else:
            _copy_base(ref_base, model, te=backend == "te")
        apply_peft(model, cfg.peft)
        if adapters is None:  # deterministic non-zero adapters, the same for every backend
            gen = torch.Generator().manual_seed(5)
            adapters = {k: (torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if k.endswith((".u", ".v")) else 0.0))
                        for k, v in adapter_state_dict(model).items()}
        load_adapter_state_dict(model, adapters)
        logits = model(x, pos, None)
        model(x, pos, None, labels=y).float().mean().backward()
        out[backend] = (logits.detach().float().cpu(),
                        {n: p.grad.detach().float().cpu() for n, p in adapter_parameters(model).items()})
    ref_logits, ref_grads = out["local"]
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "backends": backends, "tolerance": COMPARE_TOL, "seq_length": seq, "ok": True}
    for backend in backends[1:]:
        logits, grads = out[backend]
        worst = {"logits": (logits - ref_logits).abs().max().item()}
        ok = torch.allclose(logits, ref_logits, **COMPARE_TOL)
        for n, gr in ref_grads.items():
            scale = max(1.0, gr.abs().max().item())
            worst[n] = (grads[n] - gr).abs().max().item() / scale
            ok &= torch.allclose(grads[n], gr, atol=COMPARE_TOL["atol"] * scale, rtol=COMPARE_TOL["rtol"])
        result[backend] = {"ok": bool(ok), "max_abs_diff_logits": worst.pop("logits"),
                           "max_rel_diff_adapter_grad": max(worst.values()),
                           "worst_adapter_tensor": max(worst, key=worst.get)}
        result["ok"] &= bool(ok)
    if "te" not in backends:
        result["te"] = "not checked: transformer_engine does not import here"
    if owns_process_group:
        shutdown()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_attention:
        result = compare_attention(args)
        text = json.dumps(result, indent=2)
        print(text, flush=True)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if not result["ok"]:
            raise SystemExit(1)
        return result
    from tiedlora import compat
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.config import ParallelConfig
    from tiedlora.models.gpt import build_model_chunks
    from tiedlora.peft import apply_peft, finalize_adapter_grads
    from tiedlora.config import OptimConfig
    from tiedlora.peft.model import trainable_params
    from tiedlora.training import build_optimizer, clip_adapter_grads, forward_backward, sync_tied_copies

    model_cfg, peft_cfg = configs(args)
    on_gpu = compat.cuda_available()
    t0 = time.time()
    owns_process_group = not torch.distributed.is_initialized()  # else: called in-process (tests)
    init_distributed(ParallelConfig(), seed=1234)
    chunks = build_model_chunks(model_cfg, ParallelConfig())
    for c in chunks:
        apply_peft(c, peft_cfg)
    setup_s = time.time() - t0
    terms = flops_terms(model_cfg, peft_cfg)
    counted = counted_terms(chunks[0])
    if (counted["n_mm"], counted["n_ad"]) != (terms["n_mm"], terms["n_ad"]):
        raise AssertionError(f"FLOPs formula does not describe the model: formula {terms}, counted {counted}")
    optim_cfg = OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, grad_clip=1.0)
    optimizer = build_optimizer(trainable_params(chunks), optim_cfg)
    autocast = torch.bfloat16 if on_gpu and model_cfg.params_dtype != "float32" else None
    tokens_per_step = args.micro_batch_size * args.seq_length * args.num_micro_batches
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    losses, times = [], []
    for step in range(args.warmup + args.steps):
        micro = random_batches(model_cfg.vocab_size, args.micro_batch_size, args.seq_length,
                               args.num_micro_batches, step)
        start = time.perf_counter()
        for c in chunks:
            c.zero_grad(set_to_none=True)
        loss_sum, toks = forward_backward(chunks, micro, autocast_dtype=autocast)
        finalize_adapter_grads(chunks, num_tokens=toks)
        clip_adapter_grads(chunks, optim_cfg.grad_clip)
        optimizer.step()
        sync_tied_copies(chunks)
        if on_gpu:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss_sum / max(toks, 1))

    step_s = sum(times) / len(times)
    flops = step_flops(terms, model_cfg.num_layers, args.seq_length, tokens_per_step)
    peak = args.peak_tflops if args.peak_tflops is not None else (H200_BF16_DENSE_TFLOPS if on_gpu else None)
    achieved = flops / step_s / 1e12
    if on_gpu:
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        device = torch.cuda.get_device_name()
    else:
        memory = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        device = "cpu"
    result = {
        "device": device, "model": model_cfg.name, "params_dtype": model_cfg.params_dtype,
        "autocast": str(autocast).replace("torch.", "") if autocast else None,
        "preset": peft_cfg.name, "rank": peft_cfg.rank, "targets": list(peft_cfg.target_modules),
        "trainable_params": sum(r.param.numel() for r in trainable_params(chunks)),
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
        "num_micro_batches": args.num_micro_batches, "tokens_per_step": tokens_per_step,
        "timed_steps": args.steps, "step_time_s": step_s, "tokens_per_s": tokens_per_step / step_s,
        **memory, "model_flops_per_step": flops, "flops_terms": terms,
        "achieved_tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "losses": losses, "setup_s": setup_s,
    }
    if owns_process_group:
        shutdown()
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main()
