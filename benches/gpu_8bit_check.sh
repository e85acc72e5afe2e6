#!/usr/bin/env bash
# GPU check of the 8-bit optimizer states' speed and memory, and a CUDA smoke run of loss-based
# reweighting (one device call):
#   benches/gpu_8bit_check.sh device-bin        (results under $OUT when set)
# 1. memory_compare.sh with fused AdamW, unfused AdamW (the same per-tensor update as the 8-bit
#    path, 32-bit states), 8-bit AdamW, GaLore and 8-bit GaLore on gpu_llama.toml;
# 2. the quickstart on CUDA, bf16-mixed, with [train.reweight] drop_highest 0.1 (must learn).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="$(cd "${1:-device-bin}" && pwd)/trainer"
OUT="${OUT:-/tmp/gpu-8bit}"; mkdir -p "$OUT"
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
W=/tmp/gpu-8bit-work; rm -rf "$W"; mkdir -p "$W"; cd "$W"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== 1. optimizer states: memory and speed (gpu_llama.toml, bf16-mixed, batch 16 x 1024, 20 steps)"
OUT="$OUT" WORK="$W/mem" STEPS=20 METHODS="adamw adamw_unfused adamw_8bit galore_adamw galore_8bit" \
    timeout 300 bash "$HERE/memory_compare.sh" "$BIN" 2>&1 | tee "$OUT/memory.md"
echo "== 2. quickstart on CUDA with [train.reweight] drop_highest 0.1"
timeout 120 "$BIN" run "$ROOT/configs/quickstart.toml" --set 'run.out_dir="runs/reweight"' \
    --set 'run.device="cuda"' --set 'run.precision="bf16-mixed"' --set train.max_steps=300 \
    --set 'train.reweight={rule="drop_highest", fraction=0.1}' > "$OUT/reweight.log" 2>&1 \
    || { tail -5 "$OUT/reweight.log"; echo "FAILED reweight"; exit 1; }
grep -E "valid loss" "$OUT/reweight.log" | tail -3
tail -3 runs/reweight/metrics.jsonl | cut -c1-400
