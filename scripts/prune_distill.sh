#!/usr/bin/env bash
# Prune, then distill, at small scale on the built-in corpus (Minitron's recipe in miniature),
# and GSM against magnitude pruning at the same density. Prints a Markdown table of the loss
# of every model on the held-out tenth of the corpus (the split every recipe here validates on).
#
#   scripts/prune_distill.sh            # everything under runs/prune_distill/ (about 15 minutes
#                                       # on a quiet 2-core CPU); finished steps are skipped
#
# 1. teacher: configs/quickstart.toml (4 layers, d_ff 352, 600 steps)
# 2. structured pruning to 3 layers (block importance), 2 of 4 heads (head importance) and d_ff
#    176 (MLP channel importance)
# 3. recovery, 200 steps each: fine-tune on labels (configs/prune_distill/finetune.toml) or
#    distill from the teacher (distill.toml)
# 4. unstructured at density 0.5: one-shot magnitude + 200 steps of momentum SGD
#    (magnitude_finetune.toml) vs 200 steps of GSM from the teacher, cut at the end (gsm.toml);
#    and magnitude + 200 steps of AdamW (magnitude_adamw.toml), the teacher's own optimizer
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$TRAINER_ROOT"
trainer=(scripts/trainer)
out=runs/prune_distill
mkdir -p "$out"

run() { # recipe, run dir, extra args: train unless finished
    local recipe=$1 dir=$2
    shift 2
    if [[ ! -f "$dir/summary.json" ]]; then
        "${trainer[@]}" run "$recipe" --set "run.out_dir=$dir" --resume auto "$@"
    fi
}
prune() { # out dir, args...
    local dir=$1
    shift
    if [[ ! -f "$dir/pruning.json" ]]; then
        rm -rf "$dir"
        "${trainer[@]}" prune --out "$dir" "$@"
    fi
}

run configs/quickstart.toml "$out/teacher"
prune "$out/pruned" --init "$out/teacher" --method structured --d-ff 176 --heads 2 --layers 3
prune "$out/magnitude" --init "$out/teacher" --method magnitude --sparsity 0.5
run configs/prune_distill/finetune.toml "$out/finetune"
run configs/prune_distill/distill.toml "$out/distill"
run configs/prune_distill/magnitude_finetune.toml "$out/magnitude_finetune"
run configs/prune_distill/gsm.toml "$out/gsm"
run configs/prune_distill/magnitude_adamw.toml "$out/magnitude_adamw"
# GSM with a tenth of the decay: the unselected weights shrink less, the kept ones too.
run configs/prune_distill/gsm.toml "$out/gsm_wd0.025" --set optim.weight_decay=0.025

# The held-out split: the last 10% of the built-in corpus (data.valid_fraction = 0.1).
corpus=crates/trainer/data/wonderland.txt
size=$(stat -c %s "$corpus")
valid=$(( (size + 5) / 10 ))
tail -c "$valid" "$corpus" > "$out/valid.txt"

evaluate() { # model dir -> loss
    "${trainer[@]}" eval --init "$1" --data "$out/valid.txt" --seq-len 128 --json 2>/dev/null |
        python3 -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["loss"])'
}
params() { # run or pruned dir -> "parameters | nonzero" of its newest checkpoint (stdlib only)
    python3 - "$1" <<'EOF'
import array, glob, json, os, struct, sys
d = sys.argv[1]
ckpt = sorted(glob.glob(os.path.join(d, "checkpoints", "step-*")))[-1]
with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
total = nonzero = 0
for name, t in header.items():
    if name == "__metadata__" or name.startswith("distill."):
        continue
    assert t["dtype"] == "F32", (name, t["dtype"])
    a = array.array("f", data[t["data_offsets"][0]:t["data_offsets"][1]])
    total += len(a)
    nonzero += sum(1 for x in a if x != 0.0)
print(f"{total:,} | {nonzero:,}")
EOF
}

echo
echo "| model | parameters | nonzero | held-out loss |"
echo "|---|---|---|---|"
for row in \
    "dense teacher (quickstart, 600 steps):$out/teacher" \
    "structured-pruned (3 layers, 2 of 4 heads, d_ff 176), no recovery:$out/pruned" \
    "structured-pruned + fine-tuned on labels (200 steps):$out/finetune" \
    "structured-pruned + distilled from the teacher (200 steps):$out/distill" \
    "magnitude 50%, no recovery:$out/magnitude" \
    "magnitude 50% + momentum SGD, lr 0.01 (200 steps):$out/magnitude_finetune" \
    "GSM density 0.5, lr 0.01 (200 steps, cut at the end):$out/gsm" \
    "GSM as above with weight_decay 0.025:$out/gsm_wd0.025" \
    "magnitude 50% + AdamW as finetune.toml (200 steps):$out/magnitude_adamw"; do
    name=${row%%:*}
    dir=${row#*:}
    echo "| $name | $(params "$dir") | $(evaluate "$dir") |"
done
