#!/usr/bin/env bash
# Continual pretraining, measured at small scale (Ibrahim et al. 2024, "Simple and Scalable
# Strategies to Continually Pre-train Large Language Models", in miniature). Prints a Markdown
# table of every model's loss on the held-out parts of corpus A and corpus B.
#
#   scripts/continual_forgetting.sh     # everything under runs/continual/; finished runs are
#                                       # skipped (6.5 minutes measured on a shared 2-core CPU)
#
# Data (generated here, nothing downloaded): A = the built-in corpus (Alice's Adventures in
# Wonderland), B = its ROT13 cipher (every letter shifted by 13: the same story in a "new
# language" whose byte statistics differ from A's). Each is split 90/10 into train and held-out.
#
# 1. pretrain on A (configs/continual/pretrain_a.toml: cosine 3e-3 -> 3e-4, 400 steps)
# 2. continue on B for 400 steps from the A model's weights (fresh AdamW state each time):
#    (a) no re-warm, no replay: constant LR at A's final LR 3e-4  (continue_b_constant.toml)
#    (b) re-warm to 3e-3 over 40 steps, re-decay to 3e-4 (cosine) (continue_b_rewarm.toml)
#    (c) as (b) with 5% of the sequences replayed from A          (continue_b_replay.toml)
# 3. (d) baseline: from scratch on A and B mixed 50/50, 800 steps: the same tokens as 1 + 2
#    (joint_ab.toml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$TRAINER_ROOT"
trainer=(scripts/trainer)
out=runs/continual
data=$out/data
mkdir -p "$data"

# The data: written once (deterministic).
if [[ ! -f "$data/b_valid.txt" ]]; then
    python3 - crates/trainer/data/wonderland.txt "$data" <<'PY'
import codecs, os, sys
text = open(sys.argv[1], encoding="utf-8").read()
rot13 = codecs.encode(text, "rot13")
cut = len(text) - (len(text) + 5) // 10  # the last tenth held out, as data.valid_fraction = 0.1
for name, t in (("a", text), ("b", rot13)):
    for split, part in (("train", t[:cut]), ("valid", t[cut:])):
        with open(os.path.join(sys.argv[2], f"{name}_{split}.txt"), "w", encoding="utf-8") as f:
            f.write(part)
PY
fi

run() { # recipe, run dir: train unless finished
    if [[ ! -f "$2/summary.json" ]]; then
        "${trainer[@]}" run "$1" --set "run.out_dir=$2" --resume auto
    fi
}

run configs/continual/pretrain_a.toml "$out/pretrain_a"
run configs/continual/continue_b_constant.toml "$out/continue_b_constant"
run configs/continual/continue_b_rewarm.toml "$out/continue_b_rewarm"
run configs/continual/continue_b_replay.toml "$out/continue_b_replay"
run configs/continual/joint_ab.toml "$out/joint_ab"

evaluate() { # model dir, text file -> loss over the whole file
    "${trainer[@]}" eval --init "$1" --data "$2" --seq-len 64 --json 2>/dev/null |
        python3 -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["loss"])'
}

sequences() { # run dir, sequences of A before it, of B when it has no mixture -> "A / B"
    python3 - "$@" <<'PY'
import json, os, sys
run, a_before, b_plain = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mix = json.load(open(os.path.join(run, "summary.json"))).get("mixture")
a, b = (mix["a"]["sequences"], mix["b"]["sequences"]) if mix else (0, b_plain)
print(f"{a_before + a} / {b}")
PY
}

echo
echo "| model | training sequences of A / B | held-out loss A | held-out loss B |"
echo "|---|---|---|---|"
# 400 steps x 16 sequences of 64 tokens per stage.
for row in \
    "pretrained on A|$out/pretrain_a|6400|0" \
    "(a) then B: no re-warm, no replay (constant 3e-4)|$out/continue_b_constant|6400|6400" \
    "(b) then B: re-warm to 3e-3, re-decay|$out/continue_b_rewarm|6400|6400" \
    "(c) then B: re-warm, re-decay, 5% replay of A|$out/continue_b_replay|6400|0" \
    "(d) baseline: A and B 50/50 from scratch|$out/joint_ab|0|0"; do
    IFS="|" read -r name dir a_before b_plain <<<"$row"
    echo "| $name | $(sequences "$dir" "$a_before" "$b_plain") | $(evaluate "$dir" "$data/a_valid.txt") | $(evaluate "$dir" "$data/b_valid.txt") |"
done
