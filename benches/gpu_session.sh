#!/usr/bin/env bash
# Everything one GPU session checks, in one go (the device time is short):
#   1. the throughput comparison of gpu_check.sh (trainer vs PyTorch eager and torch.compile);
#   2. the quickstart on CUDA in bf16-mixed (it must learn there too);
#   3. short CUDA smoke runs of the other methods: LoRA on the exported quickstart, GaLore
#      (SVD through cuSOLVER), a Switch MoE, and the ResNet classify quickstart.
#   benches/gpu_session.sh [TRAINER_BINARY]     (results under $OUT when set)
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="$(cd "$(dirname "${1:-device-bin/trainer}")" && pwd)/$(basename "${1:-device-bin/trainer}")"
OUT="${OUT:-/tmp/gpu-session}"; mkdir -p "$OUT"; export OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
STEPS="${STEPS:-30}" timeout "${CHECK_TIMEOUT:-300}" bash "$HERE/gpu_check.sh" "$BIN" 2>&1 | tee "$OUT/gpu_check.log" | tail -14
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
W=/tmp/gpu-smoke; rm -rf "$W"; mkdir -p "$W"; cd "$W"
smoke() {  # name args...
    local name=$1; shift
    echo "== $name"
    if timeout 120 "$BIN" "$@" > "$OUT/$name.log" 2>&1; then
        grep -E "valid loss|top1|tokens/s|peak memory|error" "$OUT/$name.log" | tail -4
    else
        echo "FAILED ($name):"; tail -5 "$OUT/$name.log"
    fi
}
smoke quickstart-cuda run "$ROOT/configs/quickstart.toml" --set run.device=cuda --set run.precision=bf16-mixed
cp runs/quickstart/summary.json "$OUT/quickstart-cuda.summary.json" 2>/dev/null
"$BIN" export runs/quickstart --to hf runs/quickstart-hf > /dev/null 2>&1
smoke lora-cuda run "$ROOT/configs/lora_finetune.toml" --set run.device=cuda --set run.precision=bf16-mixed --set train.max_steps=60
smoke galore-cuda run "$ROOT/configs/quickstart.toml" --set run.device=cuda --set run.out_dir=runs/galore \
    --set 'optim={kind="galore_adamw", lr=3e-3, rank=32, update_proj_gap=50, scale=0.25}' --set train.max_steps=120
smoke moe-cuda run "$ROOT/configs/moe_switch.toml" --set run.device=cuda --set run.precision=bf16-mixed --set train.max_steps=120
smoke classify-cuda run "$ROOT/configs/classify_quickstart.toml" --set run.device=cuda --set run.precision=bf16-mixed
for f in runs/*/summary.json; do cp "$f" "$OUT/$(basename "$(dirname "$f")").summary.json"; done
