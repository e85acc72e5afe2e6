#!/usr/bin/env bash
# GPU check and throughput comparison, for a CUDA box with PyTorch 2.11 but no Rust: runs a
# prebuilt trainer binary and the plain-PyTorch reference (benches/reference_llama.py) on the
# GPT-2-small-sized Llama of benches/gpu_llama.toml, and prints a table of tokens/s, model
# TFLOP/s, MFU and peak memory.
#
#   benches/gpu_check.sh [TRAINER_BINARY]        # default device-bin/trainer
#
# What runs (STEPS optimizer steps each, the first WARMUP_ROWS * LOG_EVERY left out of tokens/s):
#   1. `trainer info` (fails unless the binary sees CUDA)
#   2. trainer, precision bf16-mixed (fp32 master weights, autocast bf16)
#   3. trainer, precision bf16 (bf16 weights, grads and AdamW state)
#   4. reference eager, bf16-mixed, torch.optim.AdamW(fused=True) (the trainer's optim.fused)
#   5. reference eager, bf16-mixed, fused AdamW, zero_grad(set_to_none=False): grads kept and
#      zeroed in place as the trainer does (torch's default frees them), to attribute a gap in
#      speed or peak memory
#   6. reference eager, pure bf16, fused AdamW
#   7. reference torch.compile, bf16-mixed, fused AdamW (skip with COMPILE=0)
# About 3 minutes on an H100 (torch.compile's first compilation is most of it).
#
# Environment: STEPS (40), LOG_EVERY (5), WARMUP_ROWS (2), BATCH (16), PEAK_TFLOPS (989: H100
# SXM dense bf16; 756 for H100 PCIe), PYTHON (python3), WORK (scratch, default
# ${TMPDIR:-/tmp}/trainer-gpu-bench; the trainer's final checkpoints, ~2 GB, go there), COMPILE
# (1), OUT (if set: results.jsonl, results.md, logs, trainer metrics/summaries are written there).
# For a smoke test of the script itself without a GPU: DEVICE=cpu RECIPE=<a tiny recipe> COMPILE=0.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-device-bin/trainer}"
STEPS="${STEPS:-40}"
LOG_EVERY="${LOG_EVERY:-5}"
WARMUP_ROWS="${WARMUP_ROWS:-2}"
BATCH="${BATCH:-16}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
PY="${PYTHON:-python3}"
WORK="${WORK:-${TMPDIR:-/tmp}/trainer-gpu-bench}"
COMPILE="${COMPILE:-1}"
RECIPE="${RECIPE:-$HERE/gpu_llama.toml}"
DEVICE="${DEVICE:-cuda}"
WARMUP_STEPS=$((WARMUP_ROWS * LOG_EVERY))

die() { echo "error: $*" >&2; exit 1; }
(( STEPS > WARMUP_STEPS )) || die "STEPS ($STEPS) must exceed WARMUP_ROWS * LOG_EVERY ($WARMUP_STEPS)"
[[ -x "$BIN" ]] || die "no executable trainer binary at $BIN (usage: $0 [TRAINER_BINARY])"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

mkdir -p "$WORK"
LOGS="$WORK/logs"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    LOGS="$OUT/logs"
fi
mkdir -p "$LOGS"
RESULTS="${OUT:-$WORK}/results.jsonl"
: > "$RESULTS"

# ---- libtorch of this box's PyTorch -------------------------------------------------------
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
    || die "$PY cannot import torch"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== python torch"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing="$(ldd "$BIN" 2>/dev/null | grep 'not found' || true)"
[[ -z "$missing" ]] || { echo "$missing"; die "the trainer binary misses shared libraries (above)"; }

# ---- trainer info -------------------------------------------------------------------------
echo "== trainer info"
"$BIN" info | tee "$LOGS/trainer-info.txt" || die "trainer info failed"
if [[ "$DEVICE" == cuda* ]]; then
    grep -q '^cuda available: true' "$LOGS/trainer-info.txt" || die "the trainer does not see CUDA"
fi

shape() { sed -n "s/^$1 *= *\([0-9]*\).*/\1/p" "$RECIPE" | head -1; }
VOCAB=$(shape vocab_size); D_MODEL=$(shape d_model); LAYERS=$(shape n_layers)
HEADS=$(shape n_heads); KV_HEADS=$(shape n_kv_heads); D_FF=$(shape d_ff); SEQ=$(shape seq_len)

# ---- data: random uint16 ids < vocab ------------------------------------------------------
TOKENS="$WORK/tokens-$VOCAB.bin"
N_TOKENS=4000000
if [[ ! -f "$TOKENS" || "$(stat -c %s "$TOKENS")" != "$((2 * N_TOKENS))" ]]; then
    "$PY" "$HERE/bench_util.py" tokens "$TOKENS" "$N_TOKENS" "$VOCAB" || die "writing $TOKENS"
fi
echo "== shape: vocab $VOCAB d_model $D_MODEL layers $LAYERS heads $HEADS/$KV_HEADS d_ff $D_FF" \
     "seq $SEQ batch $BATCH; $STEPS steps, first $WARMUP_STEPS left out; peak $PEAK_TFLOPS TFLOP/s"

FAILED=()

# ---- trainer runs -------------------------------------------------------------------------
run_trainer() {  # name precision
    local name=$1 precision=$2 dir="$WORK/$1"
    rm -rf "$dir"
    echo "== trainer $precision"
    local t0=$SECONDS
    if ! timeout 240 "$BIN" --log-level info run "$RECIPE" \
            --set "run.out_dir=\"$dir\"" \
            --set "data.train.path=\"$TOKENS\"" \
            --set "run.precision=\"$precision\"" \
            --set "run.device=\"$DEVICE\"" \
            --set "run.peak_tflops=$PEAK_TFLOPS" \
            --set "train.batch_size=$BATCH" \
            --set "train.max_steps=$STEPS" \
            --set "train.log_every=$LOG_EVERY" \
            > "$LOGS/$name.log" 2>&1; then
        tail -5 "$LOGS/$name.log"
        FAILED+=("$name")
        return
    fi
    tail -9 "$LOGS/$name.log" | sed 's/^/   /'
    if [[ -n "${OUT:-}" ]]; then
        cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
        cp "$dir/summary.json" "$OUT/$name.summary.json"
    fi
    local row
    if row=$("$PY" "$HERE/bench_util.py" steady "$dir" --skip-rows "$WARMUP_ROWS" --label trainer \
            --peak-tflops "$PEAK_TFLOPS"); then
        echo "$row" >> "$RESULTS"
        echo "   steady: $row" | cut -c1-400
    else
        FAILED+=("$name")
    fi
    echo "   ($((SECONDS - t0)) s)"
}

run_reference() {  # name extra-args...
    local name=$1; shift
    echo "== reference $name"
    local t0=$SECONDS
    if timeout 300 "$PY" "$HERE/reference_llama.py" \
            --vocab "$VOCAB" --d-model "$D_MODEL" --layers "$LAYERS" --heads "$HEADS" \
            --kv-heads "$KV_HEADS" --d-ff "$D_FF" --seq "$SEQ" --batch "$BATCH" \
            --steps "$STEPS" --warmup-steps "$WARMUP_STEPS" --log-every "$LOG_EVERY" \
            --device "$DEVICE" --peak-tflops "$PEAK_TFLOPS" --out "$RESULTS" "$@" \
            > "$LOGS/$name.log" 2>&1; then
        tail -1 "$LOGS/$name.log" | cut -c1-400 | sed 's/^/   /'
    else
        tail -5 "$LOGS/$name.log"
        FAILED+=("$name")
    fi
    echo "   ($((SECONDS - t0)) s)"
}

run_trainer trainer-bf16-mixed bf16-mixed
run_trainer trainer-bf16 bf16
run_reference ref-eager-bf16-mixed --dtype bf16-mixed --adamw fused --label pytorch
run_reference ref-eager-bf16-mixed-zero-grad --dtype bf16-mixed --adamw fused --zero-grad zero \
    --label "pytorch (zero_grad in place)"
run_reference ref-eager-bf16 --dtype bf16 --adamw fused --label pytorch
if [[ "$COMPILE" == 1 ]]; then
    run_reference ref-compile-bf16-mixed --dtype bf16-mixed --adamw fused --compile --label pytorch
fi

# ---- table --------------------------------------------------------------------------------
echo
echo "== results ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); batch $BATCH x seq $SEQ;" \
     "steady state over steps $((WARMUP_STEPS + 1))..$STEPS; MFU against $PEAK_TFLOPS TFLOP/s)"
"$PY" "$HERE/bench_util.py" table "$RESULTS" | tee "${OUT:-$WORK}/results.md"
echo "results: $RESULTS"
if (( ${#FAILED[@]} )); then
    echo "FAILED: ${FAILED[*]} (logs in $LOGS)"
    exit 1
fi
