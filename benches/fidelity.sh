#!/usr/bin/env bash
# Small-scale fidelity of the low-rank methods (issue 4): the quickstart model (0.8M parameters,
# byte-level, built-in corpus, 600 steps, the quickstart's schedule) trained with
#   full-rank AdamW | GaLore-AdamW r32 | ReLoRA r32 (configs/relora.toml) | LoRA r32 from scratch
#   | AdamW and GaLore with 8-bit states (state_bits = 8)
# and the final validation loss of each. Rank 32 is a quarter of d_model (128).
#   benches/fidelity.sh            (CPU, about 8 minutes on 2 cores)
#   METHODS="adamw_8bit galore_8bit" benches/fidelity.sh     (a subset; WORK is kept then)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/trainer}"
WORK="${WORK:-$ROOT/target/benches/fidelity}"
THREADS="${THREADS:-2}"
METHODS="${METHODS:-adamw galore relora lora adamw_8bit galore_8bit}"
[[ "$METHODS" == "adamw galore relora lora adamw_8bit galore_8bit" ]] && rm -rf "$WORK"
mkdir -p "$WORK"; cd "$WORK"
common=(--set run.threads=$THREADS --set train.checkpoint_every=1000)
run() {  # name recipe extra-args...
    local name=$1 recipe=$2; shift 2
    [[ " $METHODS " == *" $name "* ]] || return 0
    rm -rf "$WORK/$name"
    echo "== $name" >&2
    "$BIN" run "$recipe" --set "run.out_dir=\"$WORK/$name\"" "${common[@]}" "$@" > "$WORK/$name.log" 2>&1
}
run adamw "$ROOT/configs/quickstart.toml"
run galore "$ROOT/configs/quickstart.toml" \
    --set 'optim={kind="galore_adamw", lr=1e-2, rank=32, update_proj_gap=100, scale=0.25, weight_decay=0.0}'
run relora "$ROOT/configs/relora.toml"
run lora "$ROOT/configs/quickstart.toml" \
    --set 'peft={kind="lora", rank=32, alpha=32, target=["self_attn.*", "mlp.*"]}'
run adamw_8bit "$ROOT/configs/quickstart.toml" --set optim.state_bits=8
run galore_8bit "$ROOT/configs/quickstart.toml" \
    --set 'optim={kind="galore_adamw", lr=1e-2, rank=32, update_proj_gap=100, scale=0.25, weight_decay=0.0, state_bits=8}'
python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
print("| method | trainable params | optimizer state | valid loss @100 | @300 | @600 (final) |")
print("|---|---:|---:|---:|---:|---:|")
for name in ["adamw", "galore", "relora", "lora", "adamw_8bit", "galore_8bit"]:
    if not os.path.exists(os.path.join(work, name, "summary.json")):
        continue
    s = json.load(open(os.path.join(work, name, "summary.json")))
    evals = {}
    for line in open(os.path.join(work, name, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("split") == "valid":
            evals[r["step"]] = r["loss"]
    print(f"| {name} | {s['trainable_params']:,} | {s['optimizer_state_bytes']:,} B | "
          f"{evals.get(100, float('nan')):.4f} | {evals.get(300, float('nan')):.4f} | {s['final_valid_loss']:.4f} |")
PY
