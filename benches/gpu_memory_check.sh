#!/usr/bin/env bash
# GPU checks of the memory-saving modes (issue 15), for a CUDA box with PyTorch 2.11 but no Rust:
# a prebuilt trainer binary in device-bin/trainer (carry device-bin).
#
#   benches/gpu_memory_check.sh            # OUT=dir keeps the results
#
# What runs (about 3 minutes on an H200):
#   1. trainer info (fails unless CUDA is seen);
#   2. the GPT-2-small-sized Llama of benches/gpu_llama.toml, bf16-mixed, 30 steps each:
#      train.loss_chunk_tokens 0 (whole logits) / 4096 (default) / 1024, and train.recompute
#      "block" with the default chunk, and bf16 weights without and with fp32 master copies
#      (optim.master_weights): tokens/s, the allocator's peak memory and the final loss;
#   3. `trainer launch --nproc 1` through NCCL with run.shard = "optimizer", "gradients" (on
#      whole tensors and with run.shard_layout = "flat") and "full" (with block recomputation) against the plain single process (deterministic = true on
#      all): the same metrics expected (a group of one owns everything; this checks that the NCCL
#      broadcast, reduce, clipping and per-rank checkpoint paths run on CUDA). One GPU cannot
#      show the memory "full" saves: NCCL needs a GPU per rank. Then "full" without block
#      recomputation in pure bf16 against the plain bf16 run, and a plain run writing its
#      checkpoints in the background (pinned host copies): the same curve and files.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/device-bin/trainer}"
PY="${PYTHON:-python3}"
WORK="${WORK:-${TMPDIR:-/tmp}/trainer-gpu-memory}"
OUT="${OUT:-$WORK/out}"
STEPS="${STEPS:-30}"
mkdir -p "$WORK" "$OUT"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$WORK"
rm -rf runs && mkdir -p runs

echo "== 1. trainer info"
"$BIN" info | tee "$OUT/info.txt" || exit 1

VOCAB=$(sed -n 's/^vocab_size *= *\([0-9]*\).*/\1/p' "$HERE/gpu_llama.toml" | head -1)
[[ -f tokens.bin ]] || "$PY" "$HERE/bench_util.py" tokens tokens.bin 4000000 "$VOCAB"
common=(--set 'data.train={kind="tokens", path="tokens.bin", dtype="uint16"}' --set "train.max_steps=$STEPS"
        --set train.log_every=5 --set train.eval_every=1000 --set train.checkpoint_every=1000)
summary() { # name dir
    cp "$2/summary.json" "$OUT/$1-summary.json" 2>/dev/null
    "$PY" -c "import json; s=json.load(open('$2/summary.json')); print('| $1 | {:,.0f} | {:.2f} GiB | {:.6f} |'.format(s['tokens_per_s'], s['peak_memory_bytes'] / 2**30, s['final_train_loss']))" \
        2>&1 | tee -a "$OUT/table.md"
}
echo "| case | tokens/s | peak (allocator) | final train loss |" | tee "$OUT/table.md"
echo "|---|---:|---:|---:|" | tee -a "$OUT/table.md"

echo "== 2. chunked loss and block recomputation"
for case in "chunk0|train.loss_chunk_tokens=0" "chunk4096|train.loss_chunk_tokens=4096" \
            "chunk1024|train.loss_chunk_tokens=1024" "recompute-block|train.recompute=\"block\"" \
            "bf16|run.precision=\"bf16\"" "bf16-masters|run.precision=\"bf16\" optim.master_weights=true"; do
    IFS='|' read -r name sets <<< "$case"
    args=(); for s in $sets; do args+=(--set "$s"); done
    "$BIN" run "$HERE/gpu_llama.toml" "${common[@]}" --set "run.out_dir=runs/$name" "${args[@]}" \
        > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$OUT/$name.log"; }
    summary "$name" "runs/$name"
done

echo "== 3. run.shard through NCCL (one rank) against one plain process"
small=(--set train.max_steps=20 --set run.deterministic=true --set train.eval_every=10 --set train.checkpoint_every=10)
compare() { # plain-dir sharded-dir name
"$PY" - "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" <<'PY' 2>&1 | tee -a "$OUT/shard-nccl.txt"
import json, sys
def curve(p):
    return [(r.get("split"), r["step"], r["loss"]) for r in map(json.loads, open(p)) if "loss" in r]
a, b = curve(sys.argv[1]), curve(sys.argv[2])
worst = max((abs(x[2] - y[2]) / abs(x[2]) for x, y in zip(a, b)), default=float("nan"))
print(f"{sys.argv[3]}: rows {len(a)} vs {len(b)}; bitwise equal: {a == b}; max relative difference {worst:.3e}")
PY
}
for recompute in none block; do
    "$BIN" run "$HERE/gpu_llama.toml" "${common[@]}" "${small[@]}" --set run.out_dir=runs/plain-$recompute \
        --set "train.recompute=\"$recompute\"" > "$OUT/plain-$recompute.log" 2>&1 \
        || { echo "plain-$recompute failed"; tail -5 "$OUT/plain-$recompute.log"; }
done
for mode in optimizer gradients full optimizer-flat gradients-flat; do
    recompute=none; [[ $mode == full ]] && recompute=block
    # run.shard_layout = "flat": the NCCL reduce-scatter and all-gather of the buckets' slices.
    layout=tensors; [[ $mode == *-flat ]] && layout=flat
    "$BIN" launch --nproc 1 "$HERE/gpu_llama.toml" "${common[@]}" "${small[@]}" --set run.out_dir=runs/shard-$mode \
        --set "run.shard=\"${mode%-flat}\"" --set "run.shard_layout=\"$layout\"" \
        --set "train.recompute=\"$recompute\"" > "$OUT/shard-$mode.log" 2>&1 \
        || { echo "shard-$mode failed"; tail -5 "$OUT/shard-$mode.log"; }
    compare "runs/plain-$recompute" "runs/shard-$mode" "$mode (recompute $recompute)"
    ls "runs/shard-$mode/checkpoints/step-00000020" >> "$OUT/shard-nccl.txt" 2>&1
done
# "full" without block recomputation (the kept graphs refilled in the backward pass, the
# prelude's gathers on the autograd device thread), in pure bf16 (bf16-mixed refuses it).
for run in "plain-bf16|none" "shard-full-bf16|full"; do
    IFS='|' read -r name mode <<< "$run"
    "$BIN" launch --nproc 1 "$HERE/gpu_llama.toml" "${common[@]}" "${small[@]}" --set run.out_dir=runs/$name \
        --set 'run.precision="bf16"' --set "run.shard=\"$mode\"" --set 'train.recompute="none"' \
        > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$OUT/$name.log"; }
done
compare runs/plain-bf16 runs/shard-full-bf16 "full, bf16, no recomputation"
# Checkpoints written in the background (train.async_checkpoints) from pinned host copies of the
# GPU tensors: the same curve, and the step-10 files byte for byte those written at once.
"$BIN" run "$HERE/gpu_llama.toml" "${common[@]}" "${small[@]}" --set run.out_dir=runs/plain-async \
    --set train.async_checkpoints=true > "$OUT/plain-async.log" 2>&1 \
    || { echo "plain-async failed"; tail -5 "$OUT/plain-async.log"; }
compare runs/plain-none runs/plain-async "async checkpoints (pinned host copies)"
for f in model.safetensors optimizer.safetensors; do
    cmp "runs/plain-none/checkpoints/step-00000010/$f" "runs/plain-async/checkpoints/step-00000010/$f" \
        && echo "async checkpoint $f: byte for byte" | tee -a "$OUT/shard-nccl.txt"
done
