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
for batch in ${BATCHES-1 8}; do
    echo "== batch $batch x 1024"
    OUT="$W/out-$batch" WORK="$W/mem-$batch" RECIPE="$W/gpu_llama_noclip.toml" BATCH=$batch STEPS=15 \
        METHODS="adamw adamw_layerwise galore_8bit galore_8bit_layerwise" \
        timeout 240 bash "$HERE/memory_compare.sh" "$BIN" 2>&1 | tee "$OUT/memory-batch$batch.md"
    cp "$W/out-$batch/memory.jsonl" "$OUT/memory-batch$batch.jsonl" 2>/dev/null
done
# WIDE=1: a model whose weights, not its logits, dominate memory (d_model 2048, d_ff 5632,
# 16 heads, vocab 8192: 650M parameters), batch 1 x 1024: there the whole-step peak holds every
# gradient at the end of backward, which layer-wise updates never do.
if [[ "${WIDE:-1}" == 1 ]]; then
    sed -e 's/^d_model = 768/d_model = 2048/' -e 's/^d_ff = 2048/d_ff = 5632/' \
        -e 's/^n_heads = 12/n_heads = 16/' -e 's/^n_kv_heads = 12/n_kv_heads = 16/' \
        -e 's/^vocab_size = 50304/vocab_size = 8192/' -e 's/^keep_checkpoints = 1 .*/keep_checkpoints = 1/' \
        "$W/gpu_llama_noclip.toml" > "$W/wide.toml"
    echo "== wide model, batch 1 x 1024"
    OUT="$W/out-wide" WORK="$W/mem-wide" RECIPE="$W/wide.toml" BATCH=1 STEPS=${WIDE_STEPS:-6} \
        METHODS="${WIDE_METHODS:-adamw adamw_layerwise galore_8bit galore_8bit_layerwise}" \
        timeout 300 bash "$HERE/memory_compare.sh" "$BIN" 2>&1 | tee "$OUT/memory-wide.md"
    cp "$W/out-wide/memory.jsonl" "$OUT/memory-wide.jsonl" 2>/dev/null
fi
