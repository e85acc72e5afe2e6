#!/usr/bin/env bash
# GPU memory and speed of layer-wise updates ([optim] layerwise = true), one device call:
#   benches/gpu_layerwise_check.sh device-bin        (results under $OUT when set)
# memory_compare.sh on gpu_llama.toml without train.clip_grad_norm (layer-wise updates refuse
# it; the baselines run without it too), at BATCH (default 1) x 1024 tokens, where the gradients
# are a larger share of the peak than at batch 16: AdamW (fused) whole-step vs layer-wise, and
# 8-bit GaLore whole-step vs layer-wise (the GaLore paper's "8-bit GaLore, per-layer" setting).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$(cd "${1:-device-bin}" && pwd)/trainer"
OUT="${OUT:-/tmp/gpu-layerwise}"; mkdir -p "$OUT"
W=/tmp/gpu-layerwise-work; rm -rf "$W"; mkdir -p "$W"
grep -v '^clip_grad_norm' "$HERE/gpu_llama.toml" > "$W/gpu_llama_noclip.toml"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for batch in ${BATCHES:-1 8}; do
    echo "== batch $batch x 1024"
    OUT="$W/out-$batch" WORK="$W/mem-$batch" RECIPE="$W/gpu_llama_noclip.toml" BATCH=$batch STEPS=15 \
        METHODS="adamw adamw_layerwise galore_8bit galore_8bit_layerwise" \
        timeout 240 bash "$HERE/memory_compare.sh" "$BIN" 2>&1 | tee "$OUT/memory-batch$batch.md"
    cp "$W/out-$batch/memory.jsonl" "$OUT/memory-batch$batch.jsonl" 2>/dev/null
done
