#!/usr/bin/env bash
# Memory of the low-rank methods, measured: the same model (benches/gpu_llama.toml, a
# GPT-2-small-sized Llama) trained a few steps with full AdamW, GaLore-AdamW, LoRA and LoRA-FA.
# Prints trainable parameters, gradient and optimizer-state bytes (from summary.json) and, on
# CUDA, the peak allocated memory and tokens/s, as a Markdown table.
#
#   benches/memory_compare.sh [TRAINER_BINARY]         (default device-bin/trainer)
#   DEVICE=cpu RECIPE=<tiny recipe> STEPS=3 benches/memory_compare.sh target/release/trainer
#
# Environment: STEPS (15), BATCH (16), RANK_GALORE (256), RANK_LORA (16), PYTHON (python3),
# WORK (/tmp/trainer-mem-bench), OUT (results written there when set), METHODS (all below),
# SET (one more --set override for every run, e.g. SET=data.seq_len=64 for a quick CPU count).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-device-bin/trainer}"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
RECIPE="${RECIPE:-$HERE/gpu_llama.toml}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-15}"
BATCH="${BATCH:-16}"
RANK_GALORE="${RANK_GALORE:-256}"
RANK_LORA="${RANK_LORA:-16}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/trainer-mem-bench}"
mkdir -p "$WORK"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
VOCAB=$(sed -n 's/^vocab_size *= *\([0-9]*\).*/\1/p' "$RECIPE" | head -1)
TOKENS="$WORK/tokens-$VOCAB.bin"
[[ -f "$TOKENS" ]] || "$PY" "$HERE/bench_util.py" tokens "$TOKENS" 2000000 "$VOCAB"
TARGETS='["q_proj", "k_proj", "v_proj", "o_proj", "mlp.*"]'
declare -A EXTRA=(
  [adamw]=""
  [galore_adamw]="optim={kind=\"galore_adamw\", lr=3e-4, rank=$RANK_GALORE, update_proj_gap=200, scale=0.25}"
  # gpu_llama.toml asks for the fused kernel, which needs 32-bit states; adamw_unfused is the
  # same per-tensor update as adamw_8bit with 32-bit states (the speed reference for 8-bit).
  [adamw_unfused]="optim={kind=\"adamw\", lr=3e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=false}"
  [adamw_8bit]="optim={kind=\"adamw\", lr=3e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=false, state_bits=8}"
  [galore_8bit]="optim={kind=\"galore_adamw\", lr=3e-4, rank=$RANK_GALORE, update_proj_gap=200, scale=0.25, state_bits=8}"
  # Layer-wise updates (each parameter stepped inside backward, its gradient freed at once);
  # they refuse train.clip_grad_norm: run them with a RECIPE without it (gpu_layerwise_check.sh).
  [adamw_layerwise]="optim={kind=\"adamw\", lr=3e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, fused=true, layerwise=true}"
  [galore_8bit_layerwise]="optim={kind=\"galore_adamw\", lr=3e-4, rank=$RANK_GALORE, update_proj_gap=200, scale=0.25, state_bits=8, layerwise=true}"
  [lora]="peft={kind=\"lora\", rank=$RANK_LORA, alpha=$((2 * RANK_LORA)), target=$TARGETS}"
  [lora_fa]="peft={kind=\"lora_fa\", rank=$RANK_LORA, alpha=$((2 * RANK_LORA)), target=$TARGETS}"
)
ROWS="$WORK/memory.jsonl"; : > "$ROWS"
for method in ${METHODS:-adamw adamw_8bit galore_adamw galore_8bit lora lora_fa}; do
  dir="$WORK/$method"; rm -rf "$dir"
  args=(run "$RECIPE" --set "run.out_dir=\"$dir\"" --set "data.train.path=\"$TOKENS\""
        --set "run.device=\"$DEVICE\"" --set "train.max_steps=$STEPS" --set "train.batch_size=$BATCH"
        --set "train.log_every=5")
  [[ -n "${EXTRA[$method]}" ]] && args+=(--set "${EXTRA[$method]}")
  [[ -n "${SET:-}" ]] && args+=(--set "$SET")
  echo "== $method" >&2
  if timeout 300 "$BIN" "${args[@]}" > "$WORK/$method.log" 2>&1; then
    "$PY" - "$dir/summary.json" "$method" >> "$ROWS" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
keep = ["params", "trainable_params", "param_bytes", "grad_bytes", "optimizer_state_bytes",
        "peak_memory_bytes", "peak_memory_kind", "tokens_per_s", "final_train_loss", "precision", "device"]
print(json.dumps({"method": sys.argv[2], **{k: s.get(k) for k in keep}}))
PYEOF
  else
    echo "FAILED $method:" >&2; tail -3 "$WORK/$method.log" >&2
  fi
done
"$PY" - "$ROWS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
base = next((r for r in rows if r["method"] == "adamw"), None)
print("| method | trainable params | grads | optimizer state | vs AdamW state | peak memory | tokens/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rel = "" if not base else f"{r['optimizer_state_bytes'] / base['optimizer_state_bytes']:.1%}"
    print(f"| {r['method']} | {r['trainable_params']:,} | {gib(r['grad_bytes'])} | {gib(r['optimizer_state_bytes'])} | {rel} | {gib(r['peak_memory_bytes'])} ({r['peak_memory_kind']}) | {r['tokens_per_s']:,.0f} |")
PYEOF
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; cp "$ROWS" "$OUT/"; fi
