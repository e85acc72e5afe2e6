#!/usr/bin/env bash
# The GPU checks of multi-process training, determinism and 8-bit optimizer states, in one go
# (device time is short). For a CUDA box with PyTorch 2.11 and no Rust; build here first:
#   cargo build --release -p trainer-cli && cargo test --release -p torch-ext --test c10d --no-run
#   mkdir -p device-bin && cp target/release/trainer device-bin/ \
#     && cp "$(ls -t target/release/deps/c10d-* | grep -v '\.d$' | head -1)" device-bin/c10d-test
#   benches/gpu_dist_check.sh device-bin        (results under $OUT when set)
# What it checks:
#   1. `trainer info`: CUDA seen, NCCL compiled in;
#   2. the shim's c10d test on the GPU: a ProcessGroupNCCL of one rank all-reduces and broadcasts;
#   3. `trainer launch --nproc 1` on CUDA: the training loop through NCCL (torchrun-style group
#      of one). With `deterministic = true` its metrics must equal a plain single-process run's;
#   4. CUDA determinism: two runs with `deterministic = true` give the same metrics.jsonl
#      (wall-clock fields aside); two without it are compared too (reported, not required);
#   5. the speed cost of `deterministic = true` on the benchmark model (gpu_llama.toml);
#   6. peak GPU memory of 32-bit and 8-bit optimizer states (memory_compare.sh).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BINDIR="$(cd "${1:-device-bin}" && pwd)"
BIN="$BINDIR/trainer"
OUT="${OUT:-/tmp/gpu-dist}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# DEVICE=cpu PRECISION=fp32 QUICK_STEPS=20 SKIP_BIG=1 checks this script's mechanics without a GPU.
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:-bf16-mixed}"
QUICK_STEPS="${QUICK_STEPS:-200}"
BACKEND=Nccl; [[ "$DEVICE" == cpu ]] && BACKEND=Gloo
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
W=/tmp/gpu-dist-work; rm -rf "$W"; mkdir -p "$W/logs"; cd "$W"
# The device tool returns at most 8 files: $OUT keeps the results, $W/logs the rest.
LOGS="$W/logs"
FAILED=()
check() {  # name: records a failed check
    echo "FAILED: $1"; FAILED+=("$1")
}

echo "== 1. trainer info"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN" info | tee "$OUT/info.txt"
if [[ "$DEVICE" == cuda ]]; then
    grep -q '^cuda available: true' "$OUT/info.txt" || check "cuda not seen"
    grep -q '^nccl (multi-GPU): true' "$OUT/info.txt" || check "nccl not compiled in"
fi

echo "== 2. c10d test (NCCL group of one on the GPU)"
timeout 120 "$BINDIR/c10d-test" --nocapture --test-threads=1 2>&1 | tee "$LOGS/c10d.log" | tail -8
grep -q 'test result: ok. 2 passed' "$LOGS/c10d.log" || check "c10d test"
[[ "$DEVICE" == cuda ]] && grep -q 'skipped' "$LOGS/c10d.log" && check "c10d nccl test skipped"

# Quickstart model on the device, short: NAME, SUBCOMMAND (run | launch), then --set arguments.
quick() {
    local name=$1 sub=$2; shift 2
    local cmd=("$BIN" run)
    [[ "$sub" == launch ]] && cmd=("$BIN" launch --nproc 1)
    timeout 150 "${cmd[@]}" "$ROOT/configs/quickstart.toml" --set "run.out_dir=\"runs/$name\"" \
        --set "run.device=\"$DEVICE\"" --set "run.precision=\"$PRECISION\"" \
        --set "train.max_steps=$QUICK_STEPS" --set train.eval_every=100 "$@" > "$LOGS/$name.log" 2>&1 \
        || { tail -5 "$LOGS/$name.log"; check "$name"; return; }
    grep -E "valid loss|rank 0 of|Nccl" "$LOGS/$name.log" | tail -3
}
# metrics.jsonl without wall-clock fields, for comparing runs.
strip() { "$PY" -c '
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(json.dumps({k: v for k, v in row.items() if k not in ("tokens_per_s", "time", "elapsed_s", "wall_s", "mfu", "tflops", "step_time_s")}, sort_keys=True))
' "runs/$1/metrics.jsonl"; }
same() {  # a b label required
    if [[ ! -s "runs/$1/metrics.jsonl" || ! -s "runs/$2/metrics.jsonl" ]]; then
        echo "   $3: a run is missing"; check "$3"; return
    fi
    if cmp -s <(strip "$1") <(strip "$2"); then echo "   $3: identical metrics"
    else
        echo "   $3: metrics DIFFER: first differing row:"; diff <(strip "$1") <(strip "$2") | head -3 | cut -c1-300
        [[ "$4" == required ]] && check "$3"
    fi
}

echo "== 3/4. determinism and the NCCL training loop (quickstart model, 200 steps, bf16-mixed)"
quick det-a run --set run.deterministic=true
quick det-b run --set run.deterministic=true
quick nondet-a run
quick nondet-b run
# Several 1 MiB gradient buckets: the all-reduces start inside the backward pass (NCCL from
# autograd's device thread), as with several GPUs.
quick nccl-1 launch --set run.deterministic=true --set run.bucket_mb=1
grep -q "rank 0 of 1 ($BACKEND" "$LOGS/nccl-1.log" || check "nccl-1 did not join a $BACKEND group"
same det-a det-b "deterministic=true twice" required
same nondet-a nondet-b "deterministic=false twice" optional
same det-a nccl-1 "launch --nproc 1 ($BACKEND) vs single process" required
cp runs/det-a/summary.json "$OUT/quickstart-det.summary.json"; cp "$LOGS/nccl-1.log" "$OUT/"
if [[ "$DEVICE" == cuda && "$(nvidia-smi -L | wc -l)" == 1 ]]; then
    echo "== more processes than GPUs: a one-line error, no hang"
    timeout 90 "$BIN" launch --nproc 2 "$ROOT/configs/quickstart.toml" --set 'run.out_dir="runs/two"' \
        --set 'run.device="cuda"' > "$LOGS/nproc2.log" 2>&1
    echo "   exit $?"; grep -i "error" "$LOGS/nproc2.log" | head -3
    grep -q "LOCAL_RANK 1 but this machine has 1 CUDA device" "$LOGS/nproc2.log" || check "nproc 2 on one GPU"
fi

if [[ "${SKIP_BIG:-0}" == 1 ]]; then echo "(SKIP_BIG=1: steps 5 and 6 skipped)"; else
echo "== 5. cost of deterministic = true (gpu_llama.toml, bf16-mixed, batch 16 x 1024)"
TOKENS="$W/tokens.bin"; "$PY" "$HERE/bench_util.py" tokens "$TOKENS" 2000000 50304
for det in false true; do
    timeout 150 "$BIN" run "$HERE/gpu_llama.toml" --set "run.out_dir=\"runs/llama-det-$det\"" \
        --set "data.train.path=\"$TOKENS\"" --set train.max_steps=40 --set train.log_every=5 \
        --set "run.deterministic=$det" > "$LOGS/llama-det-$det.log" 2>&1 || { tail -5 "$LOGS/llama-det-$det.log"; check "llama-det-$det"; continue; }
    "$PY" "$HERE/bench_util.py" steady "runs/llama-det-$det" --skip-rows 2 --label "deterministic=$det" \
        --peak-tflops 989 | tee -a "$OUT/determinism-cost.jsonl" | cut -c1-300
done

echo "== 6. optimizer-state memory on the GPU (memory_compare.sh)"
OUT="$OUT" WORK="$W/mem" STEPS=10 METHODS="adamw adamw_8bit galore_adamw galore_8bit" \
    timeout 240 bash "$HERE/memory_compare.sh" "$BIN" 2>&1 | tee "$LOGS/memory.md" | tail -8
fi

echo
if (( ${#FAILED[@]} )); then echo "FAILED CHECKS: ${FAILED[*]}"; exit 1; fi
echo "ALL CHECKS PASSED"
