#!/usr/bin/env bash
# Train a VP-Detector localizer on several GPUs and nodes with PyTorch DDP.
#
# One process per GPU (torchrun); each trains on its own shard of every epoch's
# crops, gradients are averaged by DistributedDataParallel, and only rank 0
# prints progress and writes MODEL.pt, MODEL.last.pt, MODEL.log.csv and
# MODEL.curves.png. --batch-size is per process: the effective batch is
# BATCH_SIZE x number of processes.
#
# Under Slurm, one torchrun per node is started with srun; the nodes meet at the
# first node of the job (c10d rendezvous), so no node needs to know its rank:
#     sbatch --nodes 2 examples/train_ddp.sh
# One machine, all its GPUs:
#     GPUS=4 bash examples/train_ddp.sh
# Several machines without Slurm (the same command on each, MASTER_ADDR = one of them):
#     NNODES=2 MASTER_ADDR=node01 bash examples/train_ddp.sh
# An interrupted run continues where it stopped (from MODEL.last.pt):
#     RESUME=1 sbatch --nodes 2 examples/train_ddp.sh
# DRY_RUN=1 prints the command instead of running it.
#
# Settings (environment variables, defaults in brackets): DATA_DIR [data/simulated]
# holding SHREC-layout folders model_0 ... model_N (the last validates; e.g. from
# `vpdetect simulate`), OUT [models/localizer.pt], STAGE [localizer], GPUS [per node:
# Slurm's count, else nvidia-smi's], EPOCHS [500], STEPS_PER_EPOCH [100],
# BATCH_SIZE [4], CROP_SIZE [64], WORKERS [4], SEED [0], TRAIN_ARGS [more
# `vpdetect train` options], MASTER_PORT [29500].
#SBATCH --job-name=vpdetect-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=vpdetect-train_%j.out
set -euo pipefail

DATA_DIR=${DATA_DIR:-data/simulated}
OUT=${OUT:-models/localizer.pt}
STAGE=${STAGE:-localizer}
EPOCHS=${EPOCHS:-500}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-100}
BATCH_SIZE=${BATCH_SIZE:-4}
CROP_SIZE=${CROP_SIZE:-64}
WORKERS=${WORKERS:-4}
SEED=${SEED:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -n "${SLURM_JOB_ID:-}" ]; then
    NNODES=${SLURM_NNODES:-1}
    # the whole list is read (no `| head`: under pipefail a closed pipe is SIGPIPE, exit 141)
    NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${NODES%%$'\n'*}
    GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-1}}
else
    NNODES=${NNODES:-1}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
[ "$GPUS" -ge 1 ] 2>/dev/null || GPUS=1  # no GPU: one CPU process (gloo)

# The last folder validates; all the others train.
mapfile -t FOLDERS < <(find "$DATA_DIR" -mindepth 1 -maxdepth 1 -type d -name 'model_*' | sort -V)
if [ "${#FOLDERS[@]}" -lt 2 ]; then
    echo "need at least two model_* folders in $DATA_DIR (training + validation)" >&2
    exit 2
fi
DATA_ARGS=()
for folder in "${FOLDERS[@]:0:${#FOLDERS[@]}-1}"; do DATA_ARGS+=(--data "$folder"); done
DATA_ARGS+=(--val "${FOLDERS[-1]}")
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
[ "${RESUME:-0}" = 1 ] && EXTRA+=(--resume)

# --no-python: torchrun starts the `vpdetect` console script itself in each process.
COMMAND=(
    torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-vpdetect}"
    --no-python vpdetect train "$STAGE" "${DATA_ARGS[@]}" --out "$OUT"
    --epochs "$EPOCHS" --steps-per-epoch "$STEPS_PER_EPOCH" --batch-size "$BATCH_SIZE"
    --crop-size "$CROP_SIZE" --lr 1e-3 --lr-step 80 --amp --workers "$WORKERS" --seed "$SEED"
    "${EXTRA[@]}"
)
if [ -n "${SLURM_JOB_ID:-}" ]; then
    # Recent Slurm no longer hands sbatch's --cpus-per-task on to srun: say it again.
    SRUN=(srun --nodes "$NNODES" --ntasks-per-node 1)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
    COMMAND=("${SRUN[@]}" "${COMMAND[@]}")
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${COMMAND[@]}"
    echo
    exit 0
fi
mkdir -p "$(dirname "$OUT")"
exec "${COMMAND[@]}"
