#!/usr/bin/env bash
# GPU checks of the data paths added for issue 14, for a CUDA box with PyTorch 2.11 but no Rust:
# a prebuilt trainer binary in device-bin/trainer and, in device-bin/sft-example, the example
# that configs/sft/make_sft_example.py makes (with device-bin/sft-cpu-*.jsonl: the CPU losses of
# the same runs, made by this script with DEVICE=cpu).
#
#   benches/gpu_data_check.sh            # OUT=dir keeps the results
#
# What runs:
#   1. trainer info (fails unless CUDA is seen);
#   2. the GPT-2-small-sized Llama of benches/gpu_llama.toml, bf16-mixed, on byte documents of
#      random lengths made by `trainer tokenize --docs line` (so the file has a document index):
#      plain windows (SDPA's causal kernels) and `data.document_mask = true` (an explicit
#      per-document mask): tokens/s and peak memory of each, i.e. what the mask costs;
#   3. chat fine-tuning (configs/sft_chat.toml on the example) in fp32 on CUDA, packed and padded,
#      20 steps: the losses against the CPU's (same recipe, same seed), and bf16-mixed packed.
# About 2 minutes on an H200.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/device-bin/trainer}"
EX="${EX:-$ROOT/device-bin/sft-example}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
WORK="${WORK:-${TMPDIR:-/tmp}/trainer-gpu-data}"
OUT="${OUT:-$WORK/out}"
mkdir -p "$WORK" "$OUT"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$WORK"
rm -rf runs && mkdir -p runs
ln -sfn "$EX" runs/sft-example

echo "== 1. trainer info"
"$BIN" info | tee "$OUT/info.txt"

if [[ "$DEVICE" == cuda ]]; then
    echo "== 2. document masks on the GPT-2-small-sized Llama"
    "$PY" - <<'PY'
import random
rng = random.Random(0)
alphabet = "abcdefghijklmnopqrstuvwxyz     .,\n"
with open("docs.txt", "w") as f:
    for _ in range(12000):
        n = rng.randint(50, 1500)
        f.write("".join(rng.choice(alphabet[:-1]) for _ in range(n)) + "\n")
PY
    "$BIN" tokenize docs.txt --tokenizer bytes --docs line --out docs.bin --force | tee "$OUT/tokenize.txt"
    for mask in false true; do
        "$BIN" run "$HERE/gpu_llama.toml" \
            --set 'data.train={kind="tokens", path="docs.bin"}' --set "data.document_mask=$mask" \
            --set "run.out_dir=runs/mask-$mask" --set train.max_steps=40 --set train.log_every=5 \
            --set train.eval_every=1000 --set train.checkpoint_every=1000 \
            > "$OUT/llama-mask-$mask.log" 2>&1 || { echo "mask=$mask failed"; tail -5 "$OUT/llama-mask-$mask.log"; }
        cp runs/mask-$mask/summary.json "$OUT/llama-mask-$mask-summary.json" 2>/dev/null
        "$PY" -c "import json; s=json.load(open('runs/mask-$mask/summary.json')); print('document_mask=$mask', 'tokens/s', round(s['tokens_per_s']), 'peak GiB', round(s['peak_memory_bytes'] / 2**30, 2), 'mfu', s.get('mfu'), 'loss', round(s['final_train_loss'], 4))" 2>&1 | tee -a "$OUT/table.txt"
    done
fi

echo "== 3. chat fine-tuning on $DEVICE against the CPU"
SFT="$ROOT/configs/sft_chat.toml"
COMMON=(--set train.max_steps=20 --set train.log_every=1 --set train.eval_every=20
        --set train.checkpoint_every=20 --set schedule.warmup_steps=2 --set "run.device=$DEVICE")
for packing in true false; do
    "$BIN" run "$SFT" "${COMMON[@]}" --set "data.packing=$packing" --set run.precision=fp32 \
        --set "run.out_dir=runs/sft-$packing" > "$OUT/sft-$DEVICE-$packing.log" 2>&1 \
        || { echo "sft packing=$packing failed"; tail -5 "$OUT/sft-$DEVICE-$packing.log"; }
    cp "runs/sft-$packing/metrics.jsonl" "$OUT/sft-$DEVICE-$packing.jsonl"
done
if [[ "$DEVICE" == cuda ]]; then
    "$BIN" run "$SFT" "${COMMON[@]}" --set run.precision=bf16-mixed --set run.out_dir=runs/sft-bf16 \
        > "$OUT/sft-cuda-bf16.log" 2>&1 || echo "sft bf16-mixed failed"
    cp runs/sft-bf16/metrics.jsonl "$OUT/sft-cuda-bf16.jsonl"
    "$PY" - "$OUT" "$ROOT/device-bin" <<'PY' | tee -a "$OUT/table.txt"
import json, sys
out, cpu_dir = sys.argv[1], sys.argv[2]
def losses(path):
    rows = [json.loads(l) for l in open(path)]
    return [r["loss"] for r in rows if "lr" in r]
for packing in ["true", "false"]:
    gpu = losses(f"{out}/sft-cuda-{packing}.jsonl")
    cpu = losses(f"{cpu_dir}/sft-cpu-{packing}.jsonl")
    worst = max(abs(a - b) / abs(b) for a, b in zip(gpu, cpu))
    print(f"sft packing={packing} fp32: {len(gpu)} steps, max relative difference CUDA vs CPU {worst:.2e}, last {gpu[-1]:.5f} vs {cpu[-1]:.5f}")
bf16 = losses(f"{out}/sft-cuda-bf16.jsonl")
cpu = losses(f"{cpu_dir}/sft-cpu-true.jsonl")
print(f"sft packed bf16-mixed: last loss {bf16[-1]:.5f} (fp32 CPU {cpu[-1]:.5f}), max relative difference {max(abs(a-b)/abs(b) for a,b in zip(bf16,cpu)):.2e}")
PY
fi
echo "results in $OUT"
