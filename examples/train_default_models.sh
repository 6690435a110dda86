#!/usr/bin/env bash
# Reproducible recipe for vpdetect's bundled default models (`make models`).
#
# 1. simulate a training set (shrec21 preset, fixed seeds) and a validation tomogram;
# 2. train the default localizer and classifier with `vpdetect train`;
# 3. copy the weights (each carries its model card) into vpdetect/models/.
#
# On a GPU the paper-sized nets are trained (localizer w=2 d=49 M=7, classifier
# w=2 d=100 M=5, 64^3 crops); on a CPU a smaller recipe that a 2-core machine
# trains in about 70 minutes. The model cards record which recipe, hardware and time.
#
# Environment: RECIPE=auto|gpu|cpu (default auto), WORK=folder (default work_models),
# VPDETECT=command (default .venv/bin/vpdetect), INSTALL=1 to copy into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
VPDETECT=${VPDETECT:-.venv/bin/vpdetect}
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-work_models}
RECIPE=${RECIPE:-auto}
INSTALL=${INSTALL:-1}
if [[ "$RECIPE" == auto ]]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        RECIPE=gpu
    else
        RECIPE=cpu
    fi
fi
echo "recipe: $RECIPE"

# Seeds 101 (training, model_0..5) and 202 (validation) are reserved for training;
# the demo uses seed 7, never seen in training.
SHAPE=(256 256 128)
SLAB=100
mkdir -p "$WORK"
[[ -f "$WORK/train/model_5/simulation.json" ]] ||
    "$VPDETECT" simulate "$WORK/train" --n-tomograms 6 --preset shrec21 --shape "${SHAPE[@]}" \
        --slab-thickness "$SLAB" --seed 101
[[ -f "$WORK/val/model_0/simulation.json" ]] ||
    "$VPDETECT" simulate "$WORK/val" --n-tomograms 1 --preset shrec21 --shape "${SHAPE[@]}" \
        --slab-thickness "$SLAB" --seed 202

TRAIN=()
for d in "$WORK"/train/model_*; do TRAIN+=(--data "$d"); done

if [[ "$RECIPE" == gpu ]]; then
    LOC_ARCH=(--width 2 --depth 49 --max-dilation 7 --crop-size 64 --batch-size 8)
    LOC_SCHEDULE=(--epochs 120 --steps-per-epoch 50 --lr 1e-3 --lr-step 80)
    CLS_ARCH=(--width 2 --depth 100 --max-dilation 5 --crop-size 40 --batch-size 16)
    CLS_SCHEDULE=(--epochs 160 --steps-per-epoch 50 --lr 1e-3 --lr-step 80)
else
    # The bundled CPU models: localizer 46 epochs (about 70 min on one loaded core),
    # classifier 60 epochs (about 40 min); 20 steps an epoch, lr x0.1 after epoch 45.
    LOC_ARCH=(--width 2 --depth 20 --max-dilation 7 --crop-size 40 --batch-size 4 --threads 1)
    LOC_SCHEDULE=(--epochs 46 --steps-per-epoch 20 --lr 1e-3 --lr-step 45)
    CLS_ARCH=(--width 2 --depth 30 --max-dilation 5 --crop-size 24 --batch-size 8 --threads 1)
    CLS_SCHEDULE=(--epochs 60 --steps-per-epoch 20 --lr 1e-3 --lr-step 45)
fi

# Continue an interrupted run (MODEL.last.pt) instead of starting over.
resume_flag() { [[ -f "${1%.pt}.last.pt" ]] && echo --resume || echo --overwrite; }

# The two trainings are independent: run them side by side (one thread each on CPU).
"$VPDETECT" train localizer "${TRAIN[@]}" --val "$WORK/val/model_0" --out "$WORK/localizer.pt" \
    "${LOC_ARCH[@]}" "${LOC_SCHEDULE[@]}" --particle-share 0.7 --val-crops 8 --seed 1 "$(resume_flag "$WORK/localizer.pt")" \
    > "$WORK/train_localizer.log" 2>&1 &
LOC_PID=$!
"$VPDETECT" train classifier "${TRAIN[@]}" --val "$WORK/val/model_0" --out "$WORK/classifier.pt" \
    "${CLS_ARCH[@]}" "${CLS_SCHEDULE[@]}" --particle-share 0.95 --val-crops 16 --seed 2 "$(resume_flag "$WORK/classifier.pt")" \
    > "$WORK/train_classifier.log" 2>&1 &
CLS_PID=$!
wait "$LOC_PID"
wait "$CLS_PID"
tail -n 3 "$WORK/train_localizer.log" "$WORK/train_classifier.log"

# Choose the localizer's post-processing (threshold, bandwidth, merge radius, minimum
# size) on the validation tomogram; the card keeps them as localize's defaults.
"$VPDETECT" tune "$WORK/localizer.pt" --data "$WORK/val/model_0"

if [[ "$INSTALL" == 1 ]]; then
    cp "$WORK/localizer.pt" vpdetect/models/localizer.pt
    cp "$WORK/classifier.pt" vpdetect/models/classifier.pt
    "$VPDETECT" info vpdetect/models/localizer.pt
    "$VPDETECT" info vpdetect/models/classifier.pt
fi
