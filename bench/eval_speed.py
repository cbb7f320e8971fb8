"""Evaluation speed on real-shaped inputs: greedy decoding and multiple choice, side by side.

    python bench/eval_speed.py                      # CPU: 6-layer LLaMA-style model, 2 threads (~5 min)
    python bench/eval_speed.py --tiny --rounds 1    # seconds; a smoke run
    python bench/eval_speed.py --device cuda --gpu-shapes   # ~1.1B LLaMA-style in bf16, on a GPU

One random LLaMA-style model (``transformers.LlamaForCausalLM``, seeded) is converted into
ours (``tiedlora.convert``; a TL6 r=8 adapter on ``linear_qkv`` is applied, as evaluation
runs it), so both sides compute with the same weights. Configurations are interleaved
round by round and the median time of each is reported, with ratios taken within the run
(and the fastest round's, which another process on the machine disturbs least).

Greedy decoding: ``--prompts`` prompts whose lengths follow a SQuAD-like spread (a
log-normal with mean 160 and standard deviation 60 tokens, clipped to [48, 320]: about
what SQuAD v1.1 contexts with a question give with a 32k-piece tokenizer), random token
ids, ``--new-tokens`` tokens each (no EOS: every prompt decodes the full budget), batch
``--batch``:

    ours            tiedlora.generate.greedy_generate: length-sorted, left-padded batches
    ours before     what evaluation did before left padding: only prompts of equal length
                    batched together (each group through the same decoder, so no padding)
    HF sorted       transformers' generate, left padding + attention_mask, batches of --batch
                    in the same length-sorted order as ours
    HF as given     the same, batches in the prompts' own order (more padding)

Multiple choice: ``--questions`` questions of 24–256 prompt tokens (log-normal, mean 100)
with 4 choices of 8–40 tokens each:

    ours            tiedlora.generate.choice_logprobs: --batch sequences per forward pass
    one per pass    tiedlora.generate.continuation_logprobs, one question (4 sequences) per pass

``--gpu-shapes``: a TinyLlama-1.1B-shaped model (22 layers, hidden 2048, 32 heads / 4
key-value groups, FFN 5632, vocabulary 32000) in bf16, 48 prompts, 32 new tokens, batch 16,
one timed round. Needs only torch, megatron-core, hydra/omegaconf, transformers and
safetensors (no transformer-engine, no apex).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, lognormal_lengths, start, sync, where  # noqa: E402

SHAPES = {  # LlamaConfig fields
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                num_key_value_heads=12, vocab_size=32000),
    "gpu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpu-shapes", action="store_true", help="~1.1B LLaMA-style model in bf16 (see above)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and few prompts (smoke run)")
    p.add_argument("--prompts", type=int, default=None, help="prompts to decode (default 48; tiny 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per prompt (default 16; gpu-shapes 32)")
    p.add_argument("--batch", type=int, default=16, help="prompts (or scored sequences) per forward pass")
    p.add_argument("--questions", type=int, default=None, help="multiple-choice questions (default 32; tiny 6)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; gpu-shapes 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--skip", default="", help="comma-separated configurations not to run, e.g. 'ours before,HF as given'")
    p.add_argument("--json", default=None, help="also write every time and ratio here")
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else "gpu" if args.gpu_shapes else "cpu"
    defaults = {"tiny": (8, 6, 6, 1), "cpu": (48, 16, 32, 3), "gpu": (48, 32, 32, 1)}[shape]
    for name, value in zip(("prompts", "new_tokens", "questions", "rounds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shape = shape
    args.dtype = torch.bfloat16 if args.gpu_shapes else torch.float32
    return args


def random_ids(n: int, vocab: int, g: torch.Generator) -> list:
    return torch.randint(3, vocab, (n,), generator=g).tolist()  # 0-2: pad/bos/eos in LLaMA's vocabulary


def build_models(args):
    """(HF model, our adapted model, vocabulary size) with the same random base weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiedlora.config import ParallelConfig, compose, to_object
    from tiedlora.convert import load_base_checkpoint, model_config_from_checkpoint
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import apply_peft

    shape = SHAPES[args.shape]
    hcfg = LlamaConfig(**shape, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = LlamaForCausalLM(hcfg).to(args.dtype).eval()
    hf.generation_config.eos_token_id = None  # decode the full budget, as ours with eos_id=-1
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg = model_config_from_checkpoint(d)
        cfg = dataclasses.replace(cfg, params_dtype="bfloat16" if args.dtype == torch.bfloat16 else "float32")
        ours = build_gpt_model(cfg)
        load_base_checkpoint([ours], cfg, ParallelConfig())
    peft = to_object(compose("params", ["peft=tl6", "peft.rank=8"])).peft
    apply_peft(ours, peft)
    return hf, ours.eval(), shape["vocab_size"]


def decode_configs(args, hf, ours, vocab, prompts):
    from tiedlora.generate import greedy_generate

    n_new = args.new_tokens

    def run_ours():
        return greedy_generate(ours, prompts, n_new, eos_id=-1, vocab_size=vocab, batch_size=args.batch)

    def run_before():  # equal lengths only: each group decodes without padding
        groups = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        out = [None] * len(prompts)
        for idx in groups.values():
            for i, toks in zip(idx, greedy_generate(ours, [prompts[i] for i in idx], n_new, eos_id=-1,
                                                     vocab_size=vocab, batch_size=args.batch)):
                out[i] = toks
        return out

    def hf_batches(order):
        out = [None] * len(prompts)
        for k in range(0, len(order), args.batch):
            idx = order[k:k + args.batch]
            n = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), n, dtype=torch.long)
            mask = torch.zeros(len(idx), n, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, n - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, n - len(prompts[i]):] = 1
            with torch.no_grad():
                gen = hf.generate(ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=n_new,
                                  do_sample=False)
            for row, i in enumerate(idx):
                out[i] = gen[row, n:].tolist()
        return out

    by_length = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return {"ours": run_ours, "ours before": run_before,
            "HF sorted": lambda: hf_batches(by_length), "HF as given": lambda: hf_batches(list(range(len(prompts))))}


def choice_configs(args, ours, vocab, questions):
    from tiedlora.generate import choice_logprobs, continuation_logprobs

    return {"ours": lambda: choice_logprobs(ours, questions, vocab, batch_size=args.batch),
            "one per pass": lambda: [continuation_logprobs(ours, p, cs, vocab) for p, cs in questions]}


def timed(configs: dict, rounds: int, device: str, skip=()) -> tuple[dict, dict]:
    """Interleaved rounds: {name: [seconds per round]} and each configuration's last output."""
    times = {name: [] for name in configs if name not in skip}
    outputs = {}
    for _ in range(rounds):
        for name in times:
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = configs[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def report(title: str, times: dict, base: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{title}")
    print(f"{'configuration':<16}{'median s':>10}{'spread':>9}{'÷ ' + base:>14}{'min s':>9}{'÷ by min':>10}")
    for k, v in times.items():
        spread = (max(v) - min(v)) / med[k] if len(v) > 1 else 0.0
        print(f"{k:<16}{med[k]:>10.3f}{spread:>8.1%}{med[k] / med[base]:>14.3f}{min(v):>9.3f}"
              f"{min(v) / min(times[base]):>10.3f}")
    return med


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def main(argv=None) -> dict:
    args = parse_args(argv)
    start(args.device, args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_build = time.perf_counter()
    hf, ours, vocab = build_models(args)
    build_s = time.perf_counter() - t_build
    g = torch.Generator().manual_seed(1)
    prompt_lens = lognormal_lengths(args.prompts, 160, 60, 48, 320, seed=2)
    prompts = [random_ids(n, vocab, g) for n in prompt_lens]
    q_lens = lognormal_lengths(args.questions, 100, 40, 24, 256, seed=3)
    questions = [(random_ids(n, vocab, g), [random_ids(int(torch.randint(8, 41, (1,), generator=g)), vocab, g)
                                            for _ in range(4)]) for n in q_lens]
    print(f"model: {args.shape} ({sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters, "
          f"{str(args.dtype).replace('torch.', '')}) on {where(args.device, args.threads)}; built in "
          f"{build_s:.0f} s; torch {torch.__version__}")
    print(f"decoding: {len(prompts)} prompts of {min(prompt_lens)}-{max(prompt_lens)} tokens (mean "
          f"{statistics.mean(prompt_lens):.0f}, {len(set(prompt_lens))} distinct lengths), {args.new_tokens} new "
          f"tokens, batch {args.batch}; {args.rounds} timed round(s) after a warm-up")
    dec = decode_configs(args, hf, ours, vocab, prompts)
    mc = choice_configs(args, ours, vocab, questions)
    # warm-up (allocations, caches, kernel selection): the first batch of each configuration
    for cfgs in (decode_configs(args, hf, ours, vocab, prompts[:2]), choice_configs(args, ours, vocab, questions[:2])):
        timed(cfgs, 1, args.device, skip)
    dec_times, dec_out = timed(dec, args.rounds, args.device, skip)
    dec_med = report("greedy decoding", dec_times, "ours")
    if "HF sorted" in dec_out:
        print(f"identical outputs, ours vs HF sorted: {agreement(dec_out['ours'], dec_out['HF sorted']):.0%} "
              "of prompts (random weights: near-ties may flip under other batch shapes)")
    print(f"\nmultiple choice: {len(questions)} questions of {min(q_lens)}-{max(q_lens)} prompt tokens, "
          f"4 choices of 8-40 tokens; ours {args.batch} sequences per pass")
    mc_times, mc_out = timed(mc, args.rounds, args.device, skip)
    mc_med = report("multiple choice", mc_times, "ours")
    if len(mc_out) == 2:
        pick = [[max(range(4), key=s.__getitem__) for s in out] for out in (mc_out["ours"], mc_out["one per pass"])]
        print(f"same choice picked: {agreement(*pick):.0%} of questions")
    result = {"args": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
              "decode": {"times": dec_times, "median": dec_med}, "choice": {"times": mc_times, "median": mc_med}}
    targets = []
    if {"ours", "HF sorted"} <= set(dec_med):
        targets.append(("decoding: ours ÷ HF generate (sorted batches) ≤ 0.9", dec_med["ours"] / dec_med["HF sorted"],
                        0.9, "le"))
    if {"ours", "ours before"} <= set(dec_med):
        targets.append(("decoding: before ÷ ours ≥ 5 (a target on GPU shapes)", dec_med["ours before"] / dec_med["ours"],
                        5.0, "ge"))
    if len(mc_med) == 2:
        targets.append(("multiple choice: one per pass ÷ ours ≥ 3", mc_med["one per pass"] / mc_med["ours"], 3.0, "ge"))
    return finish(result, targets, args.json)


if __name__ == "__main__":
    main()
