#!/usr/bin/env bash
# Fine-tune on one machine with one process per GPU (or CPU ranks on gloo) through torchrun.
#   launch/torchrun_single_node.sh parallel.tp=2 peft=tl6 peft.rank=8
#   NPROC=8 launch/torchrun_single_node.sh model=gpt2b_001 model.checkpoint=/data/GPT-2B-001_bf16_tp1.nemo \
#       task=squad parallel.tp=2 parallel.pp=2
#   ENTRY=tiedlora.evaluate launch/torchrun_single_node.sh output_dir=outputs/squad/gpt2b_001_tl6_r8
# Every argument is a Hydra override, forwarded unchanged to the entry point.
set -euo pipefail

# ---- edit these -------------------------------------------------------------------------------
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}  # processes: one per GPU
NPROC=${NPROC:-0}; [ "$NPROC" -ge 1 ] || NPROC=1                           # no GPU: 1 (set NPROC=2 for TP=2 on CPU)
ENTRY=${ENTRY:-tiedlora.finetune}                                         # or tiedlora.evaluate
PYTHON=${PYTHON:-python}
# -----------------------------------------------------------------------------------------------

exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m "$ENTRY" "$@"
