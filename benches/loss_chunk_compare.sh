#!/usr/bin/env bash
# The chunked language-model loss (train.loss_chunk_tokens) against the composite one (0), side
# by side in one session: tokens/s, peak memory and the final training loss of the same recipe,
# the runs interleaved (REPEAT rounds) and the median taken.
#
#   benches/loss_chunk_compare.sh [TRAINER_BINARY]       (default target/release/trainer)
#   DEVICE=cuda RECIPE=benches/gpu_llama.toml benches/loss_chunk_compare.sh device-bin/trainer
#
# Environment: RECIPE (benches/configs/cpu_llama.toml), DEVICE (cpu), VOCAB (32768: the logits
# of a 2048-position micro-batch are then 256 MiB in fp32), STEPS (10), REPEAT (3),
# CHUNKS ("0 4096 1024"), THREADS (2, CPU), PYTHON (python3), WORK (/tmp/trainer-chunk-bench),
# SET (one more --set for every run).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-target/release/trainer}"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
RECIPE="${RECIPE:-$HERE/configs/cpu_llama.toml}"
DEVICE="${DEVICE:-cpu}"
VOCAB="${VOCAB:-32768}"
STEPS="${STEPS:-10}"
REPEAT="${REPEAT:-3}"
CHUNKS="${CHUNKS:-0 4096 1024}"
THREADS="${THREADS:-2}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/trainer-chunk-bench}"
mkdir -p "$WORK"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
TOKENS="$WORK/tokens-$VOCAB.bin"
[[ -f "$TOKENS" ]] || "$PY" "$HERE/bench_util.py" tokens "$TOKENS" 2000000 "$VOCAB"
ROWS="$WORK/rows.jsonl"; : > "$ROWS"
for round in $(seq 1 "$REPEAT"); do
  for chunk in $CHUNKS; do
    dir="$WORK/chunk-$chunk-$round"; rm -rf "$dir"
    args=(run "$RECIPE" --set "run.out_dir=\"$dir\"" --set "data.train={kind=\"tokens\", path=\"$TOKENS\", dtype=\"uint16\"}"
          --set "model.vocab_size=$VOCAB" --set "run.device=\"$DEVICE\"" --set "run.threads=$THREADS"
          --set "train.max_steps=$STEPS" --set "train.loss_chunk_tokens=$chunk" --set "train.log_every=5")
    [[ -n "${SET:-}" ]] && args+=(--set "$SET")
    echo "== round $round, loss_chunk_tokens = $chunk" >&2
    if ! "$BIN" "${args[@]}" > "$dir.log" 2>&1; then
      echo "FAILED (chunk $chunk):" >&2; tail -3 "$dir.log" >&2; continue
    fi
    "$PY" - "$dir/summary.json" "$chunk" >> "$ROWS" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"chunk": int(sys.argv[2]), "tokens_per_s": s["tokens_per_s"],
                  "peak": s["peak_memory_bytes"], "kind": s["peak_memory_kind"],
                  "loss": s["final_train_loss"]}))
PYEOF
  done
done
"$PY" - "$ROWS" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
chunks = sorted({r["chunk"] for r in rows}, key=lambda c: (c != 0, -c))
base = None
print("| loss_chunk_tokens | tokens/s (median) | vs composite | peak memory (median) | final train loss |")
print("|---:|---:|---:|---:|---:|")
for c in chunks:
    rs = [r for r in rows if r["chunk"] == c]
    tps = statistics.median(r["tokens_per_s"] for r in rs)
    peak = statistics.median(r["peak"] for r in rs)
    if c == 0:
        base = tps
    rel = f"{tps / base:.3f}x" if base else "-"
    name = "0 (composite)" if c == 0 else str(c)
    print(f"| {name} | {tps:,.0f} | {rel} | {peak / 2**30:.2f} GiB ({rs[0]['kind']}) | {rs[0]['loss']:.6f} |")
PYEOF
