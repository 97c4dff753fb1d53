#!/usr/bin/env bash
# The retrain-and-re-export job: train on DATA (the built-in synthetic set when DATA is empty
# or absent; a Label Studio project's export when SSD_LABELSTUDIO_PROJECT is set) with the
# training defaults, export the best checkpoint into the run folder, then
# promote it over MODEL_OUT only if it is not worse than the served model on DATA's validation
# split (by more than SSD_PROMOTE_MIN_DELTA of COCO mAP; SSD_PROMOTE_FORCE=1 replaces it anyway).
# `ssd promote` renames the artifact into place, so a detector watching MODEL_OUT
# (SSD_MODEL_POLL_S) swaps to it without downtime and never sees a broken file. A candidate that
# is kept out makes this job exit 1, saying why.
set -euo pipefail
model="${SSD_TRAIN_MODEL:-ssdlite320_mobilenet_v3_large}"
data="${SSD_TRAIN_DATA:-/data/synth}"
runs="${SSD_TRAIN_RUNS:-/runs}"
out="${SSD_MODEL_OUT:-/models/model.onnx}"
epochs="${SSD_TRAIN_EPOCHS:-40}"
device="${SSD_TRAIN_DEVICE:-cpu}"
min_delta="${SSD_PROMOTE_MIN_DELTA:-0}"
run="$runs/$(date -u +%Y%m%dT%H%M%SZ)"

extra=()
promote=(--over "$out" --min-delta "$min_delta")
if [ -n "${SSD_LABELSTUDIO_PROJECT:-}" ]; then
    # The project's corrected boxes (SSD_LABELSTUDIO_URL, SSD_LABELSTUDIO_TOKEN), one split: the
    # run holds out a seeded share, on which the gate compares the two models.
    data="$(ssd labelstudio export --project "$SSD_LABELSTUDIO_PROJECT" --out "$run/data")"
    promote+=(--val-fraction 0.1 --seed 0)
    extra+=(--val-fraction 0.1 --seed 0)
    # The served model's classes in its order, so that the candidate can replace it.
    if [ -e "$out" ]; then extra+=(--classes "$out"); fi
elif [ ! -e "$data" ] || [ -z "$(ls -A "$data" 2>/dev/null)" ]; then
    ssd data synth --out "$data" --images 2000 --val-images 300 --seed 0
fi
if [ "$device" = "cuda" ]; then extra+=(--amp); fi
ssd train --model "$model" --data "$data" --epochs "$epochs" --device "$device" --out "$run" "${extra[@]}"
ssd export --checkpoint "$run/best.pt" --out "$run/model.onnx"
promote+=(--data "$data")
if [ "${SSD_PROMOTE_FORCE:-0}" = "1" ]; then promote+=(--force); fi
ssd promote "$run/model.onnx" "${promote[@]}"
