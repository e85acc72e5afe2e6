#!/usr/bin/env bash
# Everything one GPU session checks, in one go (the device time is short): the throughput
# comparison of gpu_check.sh, then the quickstart recipe on CUDA to see it learn there.
#   benches/gpu_session.sh [TRAINER_BINARY]     (results under $OUT when set)
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-device-bin/trainer}"
OUT="${OUT:-/tmp/gpu-session}"; mkdir -p "$OUT"; export OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
STEPS="${STEPS:-30}" timeout "${CHECK_TIMEOUT:-420}" bash "$HERE/gpu_check.sh" "$BIN" 2>&1 | tee "$OUT/gpu_check.log" | tail -40
echo "== quickstart on CUDA (bf16-mixed, 600 steps)"
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 120 "$BIN" run "$HERE/../configs/quickstart.toml" \
    --set run.out_dir=\"/tmp/qs-cuda\" --set run.device=cuda --set run.precision=bf16-mixed \
    2>&1 | tail -14 | tee "$OUT/quickstart-cuda.log"
cp /tmp/qs-cuda/summary.json "$OUT/quickstart-cuda.summary.json" 2>/dev/null || true
