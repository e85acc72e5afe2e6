#!/usr/bin/env bash
# Peak resident memory of loading model weights: `trainer eval --init SOURCE` of one batch of 32
# tokens under /usr/bin/time -v, for
#   - tiny: a 4.1M-parameter Llama (the process and libtorch, without a model to speak of);
#   - hf-bf16, hf-fp32: a ~134M-parameter Llama in the Hugging Face format, bf16 (2 shards) and
#     fp32 (3 shards), as save_pretrained writes them at max_shard_size 200MB
#     (benches/make_hf_llama.py); the model is fp32 in memory (512 MiB);
#   - checkpoint: a trainer checkpoint (one fp32 model.safetensors) of the same model, written by
#     a 1-step run from hf-fp32.
#
#   benches/mmap_load.sh TRAINER_BINARY [WORK_DIR]
#
# Needs a Python with torch and transformers ($TRAINER_PYTHON, else python3) and libtorch on the
# library path (scripts/env.sh). WORK_DIR keeps the checkpoints between runs (so two binaries
# can be compared on the same files). Prints one line per source: its size on disk and the
# process's maximum resident set.
set -euo pipefail
trainer="$(realpath "$1")"
work="$(realpath -m "${2:-$(mktemp -d)}")"
python="${TRAINER_PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$work"
cd "$work"
# 4096 token ids below the vocabulary (32000), as uint16.
"$python" -c "import random, struct; random.seed(0); open('tokens.bin', 'wb').write(struct.pack('<4096H', *[random.randrange(32000) for _ in range(4096)]))"
[[ -f tiny/config.json ]] || "$python" "$here/make_hf_llama.py" tiny --dtype fp32 --tiny >&2
for dtype in bf16 fp32; do
    [[ -f llama-$dtype/config.json ]] || "$python" "$here/make_hf_llama.py" llama-$dtype --dtype $dtype >&2
done
if [[ ! -f run-ckpt/checkpoints/step-00000001/model.safetensors ]]; then
    cat > ckpt.toml <<'TOML'
[run]
name = "mmap-load"
out_dir = "run-ckpt"
threads = 1

[init]
from = "hf:llama-fp32"

[data]
seq_len = 32
train = { kind = "tokens", path = "tokens.bin" }

[optim]
kind = "adamw"
lr = 1e-4

[schedule]
kind = "constant"

[train]
batch_size = 1
max_steps = 1
checkpoint_every = 1
TOML
    rm -rf run-ckpt
    "$trainer" run ckpt.toml > run.log 2>&1
fi
for source in tiny:hf:tiny hf-bf16:hf:llama-bf16 hf-fp32:hf:llama-fp32 \
    checkpoint:run-ckpt/checkpoints/step-00000001; do
    name="${source%%:*}" init="${source#*:}"
    dir="${init#hf:}"
    OMP_NUM_THREADS=1 /usr/bin/time -v "$trainer" eval --init "$init" --data tokens.bin \
        --seq-len 32 --batch-size 1 --batches 1 --device cpu --json \
        > "eval-$name.json" 2> "time-$name.txt"
    rss_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "time-$name.txt")
    wall=$(awk -F'): ' '/Elapsed \(wall clock\)/ {print $2}' "time-$name.txt")
    weights=$(ls "$dir"/model*.safetensors)
    echo "$name: $(du -cm $weights | tail -1 | cut -f1) MB in $(echo "$weights" | wc -l) file(s), peak RSS $((rss_kib / 1024)) MiB, wall $wall, $(cat "eval-$name.json")"
done
