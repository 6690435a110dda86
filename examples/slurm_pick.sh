#!/usr/bin/env bash
# Batch picking over many tomograms as a Slurm job array: one GPU per array task.
#
#     sbatch --array=0-9 examples/slurm_pick.sh "tomograms/*.mrc" picks/
#     sbatch --array=0-9 examples/slurm_pick.sh tomograms.txt picks/     # a list, one path a line
#
# Every task runs `vpdetect pick` on the whole input list; vpdetect keeps only
# its own part of the sorted list (shard SLURM_ARRAY_TASK_ID of
# SLURM_ARRAY_TASK_COUNT), so the N tasks of --array=0-(N-1) together pick every
# tomogram exactly once. Outputs land in OUT_DIR as <tomogram>.star with a
# provenance sidecar <tomogram>.star.json; a tomogram whose output and sidecar
# exist is skipped, so resubmitting the same array after a timeout or a node
# failure only does what is left (OVERWRITE=1 redoes everything). The job fails
# if any of its tomograms failed; the others are still picked.
#
# Without Slurm, set the array variables by hand (here: the first of two halves):
#     SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=2 bash examples/slurm_pick.sh "tomograms/*.mrc" picks/
#
# Settings (environment variables):
#     LOCALIZER, CLASSIFIER   model files (default: the bundled models)
#     FORMAT                  relion4 (default), relion5, csv or shrec
#     DEVICE                  auto (default: the task's GPU, else the CPU), cpu, cuda
#     PICK_ARGS               more `vpdetect pick` options, e.g. "--threshold 0.6 --tile 96"
#     VPDETECT                the vpdetect executable (default: vpdetect on PATH)
#     OVERWRITE=1             redo tomograms that already have outputs
#
# The folder for Slurm's own logs (logs/) must exist before sbatch; vpdetect's
# log of each task goes to OUT_DIR/logs/pick_<task>.log.
#SBATCH --job-name=vpdetect-pick
#SBATCH --array=0-9
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=08:00:00
#SBATCH --output=logs/vpdetect-pick_%A_%a.out
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 'TOMOGRAM_GLOB' | LIST.txt  OUT_DIR" >&2
    exit 2
fi
INPUTS=$1
OUT_DIR=$2
: "${SLURM_ARRAY_TASK_ID:?not in a Slurm array: set SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT}"
: "${SLURM_ARRAY_TASK_COUNT:?not in a Slurm array: set SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT}"
VPDETECT=${VPDETECT:-vpdetect}
FORMAT=${FORMAT:-relion4}
DEVICE=${DEVICE:-auto}

# A glob is passed to vpdetect as it is (quoted: vpdetect expands and sorts it, the
# same list in every task); a text file lists one tomogram a line (# comments allowed).
if [ -f "$INPUTS" ] && [[ "$INPUTS" != *.mrc && "$INPUTS" != *.rec ]]; then
    mapfile -t TOMOGRAMS < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$INPUTS")
    if [ "${#TOMOGRAMS[@]}" -eq 0 ]; then
        echo "$INPUTS lists no tomograms" >&2
        exit 2
    fi
else
    TOMOGRAMS=("$INPUTS")
fi

mkdir -p "$OUT_DIR/logs"
ARGS=(pick "${TOMOGRAMS[@]}" --output-dir "$OUT_DIR" --format "$FORMAT" --device "$DEVICE"
      --log-file "$OUT_DIR/logs/pick_${SLURM_ARRAY_TASK_ID}.log")
[ -n "${LOCALIZER:-}" ] && ARGS+=(--localizer "$LOCALIZER")
[ -n "${CLASSIFIER:-}" ] && ARGS+=(--classifier "$CLASSIFIER")
[ "${OVERWRITE:-0}" = 1 ] && ARGS+=(--overwrite)
read -r -a EXTRA <<< "${PICK_ARGS:-}"

echo "task ${SLURM_ARRAY_TASK_ID} of ${SLURM_ARRAY_TASK_COUNT} on $(hostname): $VPDETECT ${ARGS[*]} ${EXTRA[*]}" >&2
# No --shard: vpdetect reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT itself.
exec "$VPDETECT" "${ARGS[@]}" "${EXTRA[@]}"
