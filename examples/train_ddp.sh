#!/usr/bin/env bash
# Train a VP-Detector localizer on several GPUs and nodes with PyTorch DDP.
#
# One process per GPU (torchrun); each trains on its own shard of every epoch's
# crops, gradients are averaged by DistributedDataParallel, and only rank 0
# prints progress and writes MODEL.pt, MODEL.last.pt, MODEL.log.csv and
# MODEL.curves.png. --batch-size is per process: the effective batch is
# batch-size x number of processes.
#
# Single node, all its GPUs:
#     GPUS=4 examples/train_ddp.sh
# Several nodes (run the same command on every node; NODE_RANK differs):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 examples/train_ddp.sh   # on node01
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 examples/train_ddp.sh   # on node02
# Under Slurm (one task per node, e.g. `srun --nodes=2 --ntasks-per-node=1`):
#     NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID \
#     MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) examples/train_ddp.sh
# An interrupted job continues where it stopped: RESUME=1 examples/train_ddp.sh
#
# Training data: SHREC-layout folders, e.g. from
#     vpdetect simulate --help        (writes model_0 ... model_N)
set -euo pipefail

DATA_DIR=${DATA_DIR:-data/simulated}     # holds model_0 ... model_N
OUT=${OUT:-models/localizer.pt}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
EPOCHS=${EPOCHS:-500}
RESUME=${RESUME:-0}

[ "$GPUS" -ge 1 ] || GPUS=1
mkdir -p "$(dirname "$OUT")"

# The last folder validates; all the others train.
mapfile -t FOLDERS < <(find "$DATA_DIR" -mindepth 1 -maxdepth 1 -type d -name 'model_*' | sort -V)
if [ "${#FOLDERS[@]}" -lt 2 ]; then
    echo "need at least two model_* folders in $DATA_DIR (training + validation)" >&2
    exit 2
fi
TRAIN_ARGS=()
for folder in "${FOLDERS[@]:0:${#FOLDERS[@]}-1}"; do TRAIN_ARGS+=(--data "$folder"); done
VAL_ARGS=(--val "${FOLDERS[-1]}")

EXTRA=()
[ "$RESUME" = 1 ] && EXTRA+=(--resume)

# --no-python: torchrun starts the `vpdetect` console script itself in each process.
exec torchrun \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    --no-python vpdetect train localizer \
    "${TRAIN_ARGS[@]}" "${VAL_ARGS[@]}" \
    --out "$OUT" \
    --epochs "$EPOCHS" --steps-per-epoch 100 --batch-size 4 --crop-size 64 \
    --lr 1e-3 --lr-step 80 --amp --workers 4 --seed 0 \
    "${EXTRA[@]}"
