#!/usr/bin/env bash
# CPU throughput: the trainer against plain PyTorch (benches/reference_llama.py) on the same
# Llama shape (benches/configs/cpu_llama.toml), the same thread count and the same number of
# steps, in REPEATS alternating pairs. Prints both sides' steady-state tokens/s (median, min,
# max) and the ratio trainer/pytorch.
#
#   benches/cpu_compare.sh                     # THREADS=2 STEPS=30 REPEATS=3
#   THREADS=4 STEPS=40 REPEATS=5 benches/cpu_compare.sh
#
# Steady state, the same on both sides: the first WARMUP_ROWS * LOG_EVERY steps (default 2 * 5)
# are left out; the trainer's figure is the combined rate of its metrics.jsonl rows after the
# first WARMUP_ROWS (each row times LOG_EVERY steps); the reference times the same steps.
#
# Before each run the script waits (up to IDLE_TIMEOUT=900 s) until the machine's CPUs are idle
# (busy share <= MAX_BUSY=0.15; WAIT_IDLE=0 turns this off), and it records the cores that other
# processes used during each run ("other_cores"): on a small shared machine, OpenMP threads
# that share their cores slow down several-fold, and that, not the code, would be measured.
#
# Results: $WORK/results.jsonl (one line per run; WORK=target/benches/cpu) and the runs'
# directories and logs under $WORK.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

THREADS="${THREADS:-2}"
STEPS="${STEPS:-30}"
LOG_EVERY="${LOG_EVERY:-5}"
WARMUP_ROWS="${WARMUP_ROWS:-2}"
REPEATS="${REPEATS:-3}"
WORK="${WORK:-target/benches/cpu}"
WAIT_IDLE="${WAIT_IDLE:-1}"
MAX_BUSY="${MAX_BUSY:-0.15}"
IDLE_TIMEOUT="${IDLE_TIMEOUT:-900}"
RECIPE="benches/configs/cpu_llama.toml"
WARMUP_STEPS=$((WARMUP_ROWS * LOG_EVERY))
if (( STEPS <= WARMUP_STEPS )); then
    echo "error: STEPS ($STEPS) must exceed WARMUP_ROWS * LOG_EVERY ($WARMUP_STEPS)" >&2
    exit 2
fi

# Python with torch 2.11 (the project venv unless LIBTORCH/LIBTORCH_USE_PYTORCH say otherwise).
if [[ -z "${LIBTORCH:-}" && -x "$ROOT/.venv/bin/python" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
fi
PY="${PYTHON:-python3}"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== building target/release/trainer" >&2
cargo build --release --quiet -p trainer-cli
mkdir -p "$WORK"
# A private copy: a rebuild of target/release/trainer during the benchmark must not change it.
TRAINER="$WORK/trainer"
cp "$ROOT/target/release/trainer" "$TRAINER"
TOKENS="$WORK/tokens.bin"
N_TOKENS=2000000
if [[ ! -f "$TOKENS" || "$(stat -c %s "$TOKENS")" != "$((2 * N_TOKENS))" ]]; then
    echo "== writing $TOKENS ($N_TOKENS random uint16 ids < 8192)" >&2
    "$PY" benches/bench_util.py tokens "$TOKENS" "$N_TOKENS" 8192
fi

# The model shape, read from the recipe so that the two sides cannot drift apart.
shape() { sed -n "s/^$1 *= *\([0-9]*\).*/\1/p" "$RECIPE" | head -1; }
VOCAB=$(shape vocab_size); D_MODEL=$(shape d_model); LAYERS=$(shape n_layers)
HEADS=$(shape n_heads); KV_HEADS=$(shape n_kv_heads); D_FF=$(shape d_ff)
SEQ=$(shape seq_len); BATCH=$(shape batch_size)
LR=$(sed -n 's/^lr *= *\([0-9.e-]*\).*/\1/p' "$RECIPE" | head -1)

RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
echo "== $REPEATS x (trainer, pytorch): threads $THREADS, $STEPS steps, first $WARMUP_STEPS left out;" \
     "vocab $VOCAB d_model $D_MODEL layers $LAYERS heads $HEADS/$KV_HEADS d_ff $D_FF" \
     "seq $SEQ batch $BATCH, fp32" >&2

wait_idle() {
    [[ "$WAIT_IDLE" == 1 ]] || return 0
    local busy
    if ! busy=$("$PY" benches/bench_util.py wait-idle "$MAX_BUSY" "$IDLE_TIMEOUT"); then
        echo "   (CPUs still $busy busy after ${IDLE_TIMEOUT}s; running anyway)" >&2
    fi
}

run_trainer() {  # rep
    local rep=$1 dir="$WORK/trainer-$1" row
    rm -rf "$dir"
    wait_idle
    "$PY" benches/bench_util.py monitor "$dir.monitor.json" -- \
        "$TRAINER" --log-level warn run "$RECIPE" \
        --set "run.out_dir=\"$dir\"" \
        --set "data.train.path=\"$TOKENS\"" \
        --set "run.threads=$THREADS" \
        --set "train.max_steps=$STEPS" \
        --set "train.log_every=$LOG_EVERY" \
        > "$dir.log" 2>&1 || { cat "$dir.log" >&2; exit 1; }
    row=$("$PY" benches/bench_util.py steady "$dir" --skip-rows "$WARMUP_ROWS")
    "$PY" benches/bench_util.py record "$RESULTS" trainer "$rep" "$row" "$dir.monitor.json"
}

run_pytorch() {  # rep
    local rep=$1 log="$WORK/pytorch-$1.log" mon="$WORK/pytorch-$1.monitor.json"
    wait_idle
    "$PY" benches/bench_util.py monitor "$mon" -- \
        "$PY" benches/reference_llama.py \
        --vocab "$VOCAB" --d-model "$D_MODEL" --layers "$LAYERS" --heads "$HEADS" \
        --kv-heads "$KV_HEADS" --d-ff "$D_FF" --seq "$SEQ" --batch "$BATCH" --lr "$LR" \
        --steps "$STEPS" --warmup-steps "$WARMUP_STEPS" --log-every "$LOG_EVERY" \
        --device cpu --dtype fp32 --threads "$THREADS" ${REF_ARGS:-} \
        > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
    "$PY" benches/bench_util.py record "$RESULTS" pytorch "$rep" "$(tail -1 "$log")" "$mon"
}

for rep in $(seq 1 "$REPEATS"); do
    # Alternate which side goes first, so that drift in the machine's load hits both alike.
    if (( rep % 2 )); then run_trainer "$rep"; run_pytorch "$rep"; else run_pytorch "$rep"; run_trainer "$rep"; fi
done

echo
echo "CPU benchmark: $(nproc) cores ($(uname -m)), threads $THREADS, $STEPS steps (first $WARMUP_STEPS left out), $((BATCH * SEQ)) tokens/step"
"$PY" benches/bench_util.py compare "$RESULTS"
echo "results: $RESULTS"
