#!/usr/bin/env bash
# SSDlite320 from random initialisation on the built-in synthetic set, on this machine's CPU:
# the convergence benchmark of docs/benchmarks.md. Usage: bench/train_synth.sh [OUT_DIR] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/synth-bench}"
epochs="${2:-14}"
data="$out/data"
rm -rf "$out" && mkdir -p "$out"
uv run --frozen ssd data synth --out "$data" --images 2000 --val-images 300 --seed 0
start=$(date +%s)
uv run --frozen ssd train --model ssdlite320_mobilenet_v3_large --data "$data" --epochs "$epochs" \
    --batch-size 32 --lr 0.05 --precise-bn 8 --workers 1 --out "$out/run"
end=$(date +%s)
echo "training wall time: $((end - start)) s"
tail -n 1 "$out/run/metrics.jsonl"
