"""Useful tokens per second in training, packed vs unpacked, on SQuAD-like lengths.

    python bench/packing.py                      # CPU: 6-layer LLaMA-style model, 2 threads (~10 min)
    python bench/packing.py --tiny --rounds 1    # seconds; a smoke run
    python bench/packing.py --device cuda --gpu-shapes   # ~1.1B LLaMA-style in bf16, on a GPU

Examples: prompt + answer lengths drawn from a log-normal with mean 230 and standard
deviation 100 tokens, clipped to [40, 1024] (SQuAD v1.1 context, question and answer with a
32k-piece tokenizer: median about 210, 99th percentile about 560), of which the last 3-12
tokens (the answer and EOS) are supervised; random token ids. Every configuration trains on
the same examples, ``--global-batch`` per optimizer step:

    unpacked        micro-batches of --micro-batch examples right-padded to the longest of
                    each (a multiple of 8): what tiedlora runs at pipeline-parallel size 1
    unpacked, PP    the same micro-batches padded to the longest example of the step: the
                    one shape per step that pipeline parallelism needs
    packed          data.packing: each step's examples placed whole (first_fit_shuffle) into
                    packs of at most --pack-length tokens, each cut after its examples (to a
                    multiple of 8), thd attention per example: what tiedlora runs at PP size 1
    packed, PP      the same packs, each --pack-length tokens long: what it runs under PP

One optimizer step is the loop of ``tiedlora.finetune`` without its I/O: megatron-core's
schedule with the per-token loss (``forward_backward``), ``finalize_adapter_grads``,
``clip_adapter_grads`` and AdamW over a TL6 r=8 adapter on ``linear_qkv``. Useful tokens
are the prompt and answer tokens of the step (padding excluded), divided by its time.
Configurations are interleaved round by round; medians and ratios are taken within the run
(``best round``: the ratio of the fastest rounds, which another process disturbs least).

Memory (``--memory``, default on): peak memory of one training step at the *same
micro-batch token count*, each configuration in a fresh process on CPU (peak RSS) or after
``reset_peak_memory_stats`` on CUDA: --pack-length // 512 examples of 512 tokens as one pack
against the same examples as as many rows.

``--gpu-shapes``: a TinyLlama-1.1B-shaped model (22 layers, hidden 2048, 32 heads / 4
key-value groups, FFN 5632, vocabulary 32000), bf16 weights under bf16 autocast, global
batch 128, micro-batch 4, pack length 2048. Needs torch, megatron-core, hydra/omegaconf
(no transformer-engine, apex or transformers).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, lognormal_lengths, start, sync, where  # noqa: E402

SHAPES = {  # ModelConfig fields
    "cpu": dict(num_layers=6, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, vocab_size=32000),
    "gpu": dict(num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32,
                num_query_groups=4, vocab_size=32000, params_dtype="bfloat16"),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, vocab_size=512),
}
CONFIGS = ("unpacked", "unpacked, PP", "packed", "packed, PP")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpu-shapes", action="store_true", help="~1.1B LLaMA-style model in bf16 (see above)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, short examples (smoke run)")
    p.add_argument("--global-batch", type=int, default=None, help="examples per optimizer step (default 32; gpu 128)")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per unpacked micro-batch")
    p.add_argument("--pack-length", type=int, default=None, help="tokens per pack (default 2048; tiny 256)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory comparison")
    p.add_argument("--json", default=None, help="also write every time and ratio here")
    p.add_argument("--memory-of", default=None, choices=CONFIGS, help=argparse.SUPPRESS)  # internal: one process
    args = p.parse_args(argv)
    args.shape = "tiny" if args.tiny else "gpu" if args.gpu_shapes else "cpu"
    if args.global_batch is None:
        args.global_batch = 128 if args.gpu_shapes else 8 if args.tiny else 32
    if args.pack_length is None:
        args.pack_length = 256 if args.tiny else 2048
    return args


def example_lengths(n: int, args, seed: int) -> list:
    """Prompt + answer lengths (module docstring); tiny: a quarter of them."""
    mean, std, lo, hi = (230, 100, 40, 1024) if args.shape != "tiny" else (58, 25, 10, 256)
    return lognormal_lengths(n, mean, std, lo, min(hi, args.pack_length), seed)


def make_examples(n: int, vocab: int, args, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in example_lengths(n, args, seed):
        answer = int(torch.randint(3, 13, (1,), generator=g))
        out.append({"input_ids": torch.randint(0, vocab, (length + 1,), generator=g).tolist(),
                    "loss_mask": [0] * (length + 1 - answer) + [1] * answer})
    return out


def micro_batches(kind: str, examples: list, args) -> list:
    from tiedlora.data.packing import pack_micro_batches
    from tiedlora.data.sft import collate

    mb = args.micro_batch
    lists = [list(range(k, min(k + mb, len(examples)))) for k in range(0, len(examples), mb)]
    if kind.startswith("packed"):
        return pack_micro_batches(examples, list(range(len(examples))), 0, args.pack_length,
                                  "first_fit_shuffle", seed=1234, multiple_of=None if kind == "packed, PP" else 8)
    if kind == "unpacked, PP":
        longest = max(len(e["input_ids"]) - 1 for e in examples)
        return [collate([examples[i] for i in il], 0, 8, -(-longest // 8) * 8) for il in lists]
    return [collate([examples[i] for i in il], 0, 8) for il in lists]


def build(args):
    from tiedlora.config import ModelConfig, ParallelConfig, compose, to_object
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import apply_peft
    from tiedlora.peft.model import trainable_params
    from tiedlora.training import build_optimizer

    cfg = ModelConfig(name=f"bench_{args.shape}", seq_length=max(args.pack_length, 1024), **SHAPES[args.shape])
    model = build_gpt_model(cfg, ParallelConfig())
    peft = to_object(compose("params", ["peft=tl6", "peft.rank=8"])).peft
    apply_peft(model, peft)
    model.train()
    optim = to_object(compose("finetune", [])).optim
    return model, build_optimizer(trainable_params([model]), optim), optim, cfg


def train_step(model, optimizer, optim_cfg, batches, autocast):
    from tiedlora.peft import finalize_adapter_grads
    from tiedlora.training import clip_adapter_grads, forward_backward, global_tokens

    n_tokens = global_tokens(batches)
    model.zero_grad(set_to_none=True)
    loss, _ = forward_backward([model], batches, autocast_dtype=autocast)
    finalize_adapter_grads([model], num_tokens=n_tokens)
    clip_adapter_grads([model], optim_cfg.grad_clip)
    optimizer.step()
    return loss


def memory_rows(args) -> tuple[int, int]:
    """(examples, tokens each) of the memory comparison's micro-batch: pack_length tokens."""
    per = 512 if args.pack_length >= 1024 else args.pack_length // 4
    return max(1, args.pack_length // per), per


def peak_memory_gb(args, model, optimizer, optim_cfg, autocast, kind: str, vocab: int) -> float:
    """Peak memory of one step on a micro-batch of pack_length tokens: ``rows`` examples of
    ``per`` tokens, as one pack or as ``rows`` right-padded rows (no padding either way)."""
    from tiedlora.data.packing import collate_packed
    from tiedlora.data.sft import collate

    rows, per = memory_rows(args)
    g = torch.Generator().manual_seed(99)
    examples = [{"input_ids": torch.randint(0, vocab, (per + 1,), generator=g).tolist(),
                 "loss_mask": [0] * (per - 7) + [1] * 8} for _ in range(rows)]
    batch = [collate_packed(examples, 0, rows * per) if kind == "packed" else collate(examples, 0, 8, per)]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, optim_cfg, batch, autocast)
        sync(args.device)
        return torch.cuda.max_memory_allocated() / 2 ** 30
    train_step(model, optimizer, optim_cfg, batch, autocast)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def main(argv=None) -> dict:
    args = parse_args(argv)
    start(args.device, args.threads)
    from tiedlora.dist import set_seed, shutdown

    set_seed(0)
    autocast = torch.bfloat16 if args.device == "cuda" else None
    t0 = time.perf_counter()
    model, optimizer, optim_cfg, cfg = build(args)
    build_s = time.perf_counter() - t0
    vocab = cfg.vocab_size
    if args.memory_of:  # internal: one configuration's peak memory, in this fresh process
        print(json.dumps({"peak_gb": peak_memory_gb(args, model, optimizer, optim_cfg, autocast, args.memory_of,
                                                    vocab)}))
        shutdown()
        return {}
    steps = args.rounds * args.steps + 1
    data = [make_examples(args.global_batch, vocab, args, seed=s) for s in range(steps)]
    real = [sum(len(e["input_ids"]) - 1 for e in d) for d in data]
    every = [x for d in data for x in (len(e["input_ids"]) - 1 for e in d)]
    print(f"model: {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{cfg.params_dtype}) on {where(args.device, args.threads)}; built in {build_s:.0f} s; "
          f"torch {torch.__version__}")
    print(f"examples: {len(every)} of {min(every)}-{max(every)} tokens (mean {statistics.mean(every):.0f}, "
          f"median {statistics.median(every):.0f}); {args.global_batch} per step, micro-batch {args.micro_batch} "
          f"unpacked, packs of {args.pack_length}; {args.rounds} round(s) x {args.steps} step(s) after a warm-up")
    batches = {kind: [micro_batches(kind, d, args) for d in data] for kind in CONFIGS}
    for kind in CONFIGS:  # warm-up step on the first data
        train_step(model, optimizer, optim_cfg, batches[kind][0], autocast)
    times = {kind: [] for kind in CONFIGS}
    for r in range(args.rounds):
        for kind in CONFIGS:
            sync(args.device)
            t = time.perf_counter()
            for s in range(args.steps):
                train_step(model, optimizer, optim_cfg, batches[kind][1 + r * args.steps + s], autocast)
            sync(args.device)
            times[kind].append(time.perf_counter() - t)
    tokens_per_round = [sum(real[1 + r * args.steps + s] for s in range(args.steps)) for r in range(args.rounds)]
    print(f"\n{'configuration':<16}{'micro-batches':>14}{'padding':>9}{'step s':>9}{'spread':>8}"
          f"{'useful tok/s':>14}{'÷ unpacked':>12}{'best round':>12}")
    med_rate, best_rate = {}, {}
    result = {"args": vars(args), "configs": {}}
    for kind in CONFIGS:
        rates = [n / t for n, t in zip(tokens_per_round, times[kind])]
        med_rate[kind], best_rate[kind] = statistics.median(rates), max(rates)
        computed = sum(b["tokens"].numel() for d in batches[kind][1:] for b in d)
        pad = 1 - sum(real[1:]) / computed
        n_mb = statistics.mean(len(d) for d in batches[kind][1:])
        step = statistics.median(times[kind]) / args.steps
        spread = (max(times[kind]) - min(times[kind])) / statistics.median(times[kind]) if args.rounds > 1 else 0.0
        print(f"{kind:<16}{n_mb:>14.1f}{pad:>9.1%}{step:>9.2f}{spread:>8.1%}{med_rate[kind]:>14,.0f}"
              f"{med_rate[kind] / med_rate['unpacked']:>12.3f}{best_rate[kind] / best_rate['unpacked']:>12.3f}")
        result["configs"][kind] = {"times": times[kind], "useful_tokens_per_s": med_rate[kind],
                                   "best_useful_tokens_per_s": best_rate[kind], "padding": pad,
                                   "micro_batches_per_step": n_mb}
    targets = [("packed ÷ unpacked useful tokens/s ≥ 1.5", med_rate["packed"] / med_rate["unpacked"], 1.5, "ge"),
               ("packed, PP ÷ unpacked, PP useful tokens/s ≥ 1.5", med_rate["packed, PP"] / med_rate["unpacked, PP"],
                1.5, "ge")]
    if args.memory:
        peaks = {}
        for kind in ("unpacked", "packed"):
            if args.device == "cuda":
                peaks[kind] = peak_memory_gb(args, model, optimizer, optim_cfg, autocast, kind, vocab)
            else:  # a fresh process each: RSS only grows
                cmd = [sys.executable, __file__, "--memory-of", kind, "--threads", str(args.threads),
                       "--pack-length", str(args.pack_length)] + (["--tiny"] if args.tiny else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                peaks[kind] = json.loads(out.strip().splitlines()[-1])["peak_gb"]
        rows, per = memory_rows(args)
        print(f"\npeak memory of one step at {rows * per} tokens per micro-batch "
              f"({'CUDA max allocated' if args.device == 'cuda' else 'peak RSS, fresh process'}): "
              f"unpacked {rows} x {per}: {peaks['unpacked']:.2f} GiB, packed 1 x {rows * per}: "
              f"{peaks['packed']:.2f} GiB")
        targets.append(("packed ÷ unpacked peak memory ≤ 1", peaks["packed"] / peaks["unpacked"], 1.0, "le"))
        result["peak_gb"] = peaks
    return finish(result, targets, args.json)


if __name__ == "__main__":
    main()
