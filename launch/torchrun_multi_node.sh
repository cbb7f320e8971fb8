#!/usr/bin/env bash
# Fine-tune on several machines: run this once per node; the ranks meet at a c10d rendezvous.
#   by hand, on every node:  launch/torchrun_multi_node.sh --nnodes 2 --master-addr node0 parallel.tp=8 ...
#   (or NNODES=2 MASTER_ADDR=node0 launch/torchrun_multi_node.sh ...)
#   under Slurm, one task per node:  srun --ntasks-per-node=1 launch/torchrun_multi_node.sh ...
#   (nodes, first host and rendezvous id come from SLURM_JOB_NUM_NODES, SLURM_JOB_NODELIST, SLURM_JOB_ID;
#    launch/slurm_torchrun.sbatch does this)
# Leading --nnodes/--nproc-per-node/--master-addr/--master-port N set the rendezvous; every other
# argument is a Hydra override, forwarded unchanged.
set -euo pipefail

# ---- edit these -------------------------------------------------------------------------------
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}      # processes per node: one per GPU
MASTER_ADDR=${MASTER_ADDR:-}                                              # empty: first host of the Slurm job
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-tiedlora}}
ENTRY=${ENTRY:-tiedlora.finetune}
PYTHON=${PYTHON:-python}
# -----------------------------------------------------------------------------------------------

while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes|--nproc-per-node|--master-addr|--master-port)
      [ $# -ge 2 ] || { echo "$0: $1 needs a value" >&2; exit 2; }
      case "$1" in --nnodes) NNODES=$2 ;; --nproc-per-node) NPROC=$2 ;;
                   --master-addr) MASTER_ADDR=$2 ;; --master-port) MASTER_PORT=$2 ;; esac
      shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$MASTER_ADDR" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
NPROC=${NPROC:-0}; [ "$NPROC" -ge 1 ] || NPROC=1

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" -m "$ENTRY" "$@"
