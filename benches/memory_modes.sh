#!/usr/bin/env bash
# Per-rank memory of the memory-saving modes, measured (issue 15's table): the same model
# (benches/configs/cpu_llama.toml unless RECIPE says otherwise) trained a few steps with
# run.shard none/optimizer/gradients at 1, 2 and 4 processes (optimizer and gradients on whole
# tensors and with run.shard_layout = "flat"), full (without and with block
# recomputation, next to none with block recomputation) at 2 and 4, and train.recompute none/selective/block with the
# chunked or whole loss in one process. Prints rank 0's parameter, gradient and optimizer-state
# bytes (summary.json, counted from the tensors; the gradients as held at the last update) and its peak memory (CPU: peak resident set;
# CUDA: the allocator's peak), with tokens/s, as a Markdown table; rows in $WORK/rows.jsonl.
#
#   benches/memory_modes.sh [TRAINER_BINARY]      (default target/release/trainer)
#   DEVICE=cuda RECIPE=benches/gpu_llama.toml NPROCS="1" benches/memory_modes.sh device-bin/trainer
#
# Environment: RECIPE, DEVICE (cpu), VOCAB (8192), STEPS (6), BATCH (8), THREADS (1 per process
# on the CPU), NPROCS ("1 2 4"), PYTHON (python3), WORK (/tmp/trainer-memory-modes), EXTRA
# (space-separated --set overrides for every case, e.g. a larger model), ONLY (a grep -E pattern:
# run only the cases whose label matches).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-target/release/trainer}"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
RECIPE="${RECIPE:-$HERE/configs/cpu_llama.toml}"
DEVICE="${DEVICE:-cpu}"
VOCAB="${VOCAB:-8192}"
STEPS="${STEPS:-6}"
BATCH="${BATCH:-8}"
THREADS="${THREADS:-1}"
NPROCS="${NPROCS:-1 2 4}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/trainer-memory-modes}"
mkdir -p "$WORK"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
TOKENS="$WORK/tokens-$VOCAB.bin"
[[ -f "$TOKENS" ]] || "$PY" "$HERE/bench_util.py" tokens "$TOKENS" 2000000 "$VOCAB"
ROWS="$WORK/rows.jsonl"; : > "$ROWS"
# label | processes | extra --set overrides (space-separated)
CASES=()
for n in $NPROCS; do
  CASES+=("shard none|$n|run.shard=\"none\"")
  [[ "$n" != 1 ]] && CASES+=("shard optimizer|$n|run.shard=\"optimizer\""
                            "shard gradients|$n|run.shard=\"gradients\""
                            "shard optimizer, flat|$n|run.shard=\"optimizer\" run.shard_layout=\"flat\""
                            "shard gradients, flat|$n|run.shard=\"gradients\" run.shard_layout=\"flat\""
                            "shard none, recompute block|$n|run.shard=\"none\" train.recompute=\"block\""
                            "shard full|$n|run.shard=\"full\""
                            "shard full, recompute block|$n|run.shard=\"full\" train.recompute=\"block\""
                            "shard full, recompute block, no prefetch|$n|run.shard=\"full\" train.recompute=\"block\" run.shard_prefetch=false")
done
CASES+=("recompute none, loss chunk 0|1|train.recompute=\"none\" train.loss_chunk_tokens=0"
        "recompute none, loss chunk 4096|1|train.recompute=\"none\""
        "recompute selective, loss chunk 4096|1|train.recompute=\"selective\""
        "recompute block, loss chunk 4096|1|train.recompute=\"block\""
        "recompute block, loss chunk 1024|1|train.recompute=\"block\" train.loss_chunk_tokens=1024")
i=0
for case in "${CASES[@]}"; do
  IFS='|' read -r label nproc extra <<< "$case"
  [[ -n "${ONLY:-}" ]] && ! grep -qE "$ONLY" <<< "$label" && continue
  extra="$extra ${EXTRA:-}"
  i=$((i + 1)); dir="$WORK/case-$i"; rm -rf "$dir"
  args=("$RECIPE" --set "run.out_dir=\"$dir\"" --set "data.train={kind=\"tokens\", path=\"$TOKENS\", dtype=\"uint16\"}"
        --set "model.vocab_size=$VOCAB" --set "run.device=\"$DEVICE\"" --set "run.threads=$THREADS"
        --set "train.max_steps=$STEPS" --set "train.batch_size=$BATCH" --set "train.log_every=2")
  for s in $extra; do args+=(--set "$s"); done
  echo "== $label, $nproc process(es)" >&2
  if [[ "$nproc" == 1 ]]; then cmd=("$BIN" run "${args[@]}"); else cmd=("$BIN" launch --nproc "$nproc" "${args[@]}"); fi
  if ! "${cmd[@]}" > "$dir.log" 2>&1; then
    echo "FAILED ($label, $nproc):" >&2; tail -3 "$dir.log" >&2; continue
  fi
  "$PY" - "$dir/summary.json" "$label" "$nproc" >> "$ROWS" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
keep = ["params", "param_bytes", "held_param_bytes", "held_grad_bytes", "optimizer_state_bytes", "peak_memory_bytes",
        "peak_memory_kind", "tokens_per_s", "final_train_loss"]
print(json.dumps({"case": sys.argv[2], "nproc": int(sys.argv[3]), **{k: s.get(k) for k in keep}}))
PYEOF
done
"$PY" - "$ROWS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mib = lambda b: "-" if b is None else f"{b / 2**20:.1f} MiB"
print("| case | processes | params held at the update | grads held at the update | optimizer state | bytes/param (params + grads + optimizer) | peak memory (rank 0) | tokens/s | final loss |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    per = (r["held_param_bytes"] + r["held_grad_bytes"] + r["optimizer_state_bytes"]) / r["params"]
    print(f"| {r['case']} | {r['nproc']} | {mib(r['held_param_bytes'])} | {mib(r['held_grad_bytes'])} | "
          f"{mib(r['optimizer_state_bytes'])} | {per:.2f} | {mib(r['peak_memory_bytes'])} ({r['peak_memory_kind']}) | "
          f"{r['tokens_per_s']:,.0f} | {r['final_train_loss']:.6f} |")
PYEOF
