#!/usr/bin/env bash
# The retrain-and-re-export job: train on DATA (the built-in synthetic set when DATA is empty
# or absent), export the best checkpoint over MODEL_OUT. `ssd export` verifies the artifact and
# renames it into place, so a detector watching MODEL_OUT (SSD_MODEL_POLL_S) swaps to it
# without downtime, and never sees a broken file.
set -euo pipefail
model="${SSD_TRAIN_MODEL:-ssdlite320_mobilenet_v3_large}"
data="${SSD_TRAIN_DATA:-/data/synth}"
runs="${SSD_TRAIN_RUNS:-/runs}"
out="${SSD_MODEL_OUT:-/models/model.onnx}"
epochs="${SSD_TRAIN_EPOCHS:-40}"
device="${SSD_TRAIN_DEVICE:-cpu}"
run="$runs/$(date -u +%Y%m%dT%H%M%SZ)"

if [ ! -e "$data" ] || [ -z "$(ls -A "$data" 2>/dev/null)" ]; then
    ssd data synth --out "$data" --images 2000 --val-images 300 --seed 0
fi
extra=()
if [ "$device" = "cuda" ]; then extra+=(--amp); fi
ssd train --model "$model" --data "$data" --epochs "$epochs" --batch-size 16 --lr 0.05 \
    --precise-bn 16 --device "$device" --out "$run" "${extra[@]}"
ssd export --checkpoint "$run/best.pt" --out "$out"
