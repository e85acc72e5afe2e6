#!/usr/bin/env bash
# `trainer tokenize` against Python HF `tokenizers` (benches/tokenize_reference.py): the same
# ids, and tokens per second at the same thread count.
#
#   benches/tokenize_compare.sh                           # target/release/trainer
#   benches/tokenize_compare.sh path/to/trainer
#   benches/tokenize_compare.sh --record                  # also write benches/results/tokenize-<host>-<date>.md
#   REPEATS=5 THREADS="1 2 4" benches/tokenize_compare.sh
#
# What it does: trains a GPT-2-style byte-level BPE (VOCAB=8000, "<|endoftext|>" = id 0, and
# its tokenizer_config.json names it as eos_token) on ../shared/data/wiki-fr-extract.txt and
# tinyshakespeare.txt with `tokenizers`, then for
#   - wiki-fr-extract.txt, --docs line (3076 documents, one paragraph per line) and
#   - tinyshakespeare.txt, --docs file (one 1.1 MB document: one thread does all the work on
#     both sides, whatever the thread count: a document is never split),
# at 1 thread and at all cores (`nproc`), REPEATS=3 times in alternating order, runs
#   trainer:  trainer tokenize CORPUS --out OUT.bin --tokenizer tokenizer.json --format text
#             --docs MODE --threads N --force     (EOS: its default, from tokenizer_config.json)
#   python:   tokenize_reference.py encode CORPUS --tokenizer tokenizer.json --docs MODE
#             --eos "<|endoftext|>" --threads N   (Tokenizer.encode_batch(docs,
#             add_special_tokens=False) under RAYON_NUM_THREADS=N, TOKENIZERS_PARALLELISM=true)
# and after every pair checks that both wrote the same ids (`compare`) and that the trainer's
# OUT.idx holds one start per non-empty document (non-empty lines for --docs line; one for
# --docs file), equal to the Python side's index.
#
# What it measures (medians of REPEATS; nothing is asserted on timings):
#   - trainer tokens/s: tokens / the "seconds" of the trainer's OUT.json (tokenizer load, read,
#     encode, write; inside the process, start-up not included);
#   - python encode_batch tokens/s: the encode_batch call alone;
#   - python end-to-end tokens/s: the same span as the trainer's (tokenizer load, read,
#     encode_batch, ids out of the Encoding objects, write; Python's start-up and imports not
#     included);
#   - ratio trainer / python, against each of the two.
# Every run's raw JSON line (with the process's wall and CPU seconds and the cores other
# processes used meanwhile, "monitor") goes to $WORK/results.jsonl; with --record the table and
# the lines are saved to benches/results/tokenize-<LABEL>-<date>.md (LABEL: the host name, or
# "cpu"). Exit status 1 when any pair's ids or index differ (after printing the table).
#
# Environment: VOCAB=8000 REPEATS=3 THREADS="1 $(nproc)" DATA=../shared/data PYTHON=.venv/bin/python
# WORK=(a new temporary directory, removed at the end unless KEEP=1) LABEL=(host name)
# PY_API=encode_batch (or encode_batch_fast: no offsets, what the trainer calls per document)
# WAIT_IDLE=1 (before each run wait up to IDLE_TIMEOUT=120 s for the CPUs to be idle, MAX_BUSY=0.15).
# LD_LIBRARY_PATH defaults to the venv's torch/lib (the trainer links libtorch).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECORD=0
TRAINER_ARG=""
for arg in "$@"; do
    case "$arg" in
        --record) RECORD=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z "$TRAINER_ARG" ]] || { echo "error: more than one binary given" >&2; exit 2; }
            TRAINER_ARG="$arg" ;;
    esac
done
# A binary given on the command line is relative to the caller's directory.
if [[ -n "$TRAINER_ARG" ]]; then
    case "$TRAINER_ARG" in
        /*) TRAINER_SRC="$TRAINER_ARG" ;;
        *) TRAINER_SRC="$PWD/$TRAINER_ARG" ;;
    esac
else
    TRAINER_SRC="$ROOT/target/release/trainer"
fi
cd "$ROOT"

VOCAB="${VOCAB:-8000}"
REPEATS="${REPEATS:-3}"
NPROC="$(nproc)"
if [[ -z "${THREADS:-}" ]]; then
    THREADS=1
    if (( NPROC > 1 )); then THREADS="1 $NPROC"; fi
fi
DATA="${DATA:-$ROOT/../shared/data}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WAIT_IDLE="${WAIT_IDLE:-1}"
MAX_BUSY="${MAX_BUSY:-0.15}"
IDLE_TIMEOUT="${IDLE_TIMEOUT:-120}"
EOS="<|endoftext|>"
PY_API="${PY_API:-encode_batch}"
REF=(benches/tokenize_reference.py)
if [[ -z "${LD_LIBRARY_PATH:-}" ]]; then
    export LD_LIBRARY_PATH="$ROOT/.venv/lib/python3.11/site-packages/torch/lib"
fi

# The corpora: file, docs mode (one case per line).
CASES=(
    "wiki-fr-extract.txt line"
    "tinyshakespeare.txt file"
)

[[ -x "$TRAINER_SRC" ]] || { echo "error: no trainer binary at $TRAINER_SRC (cargo build --release -p trainer-cli)" >&2; exit 1; }
[[ -x "$PY" ]] || { echo "error: no Python at $PY (set PYTHON)" >&2; exit 1; }
for c in "${CASES[@]}"; do
    f="$DATA/${c%% *}"
    [[ -f "$f" ]] || { echo "error: no corpus $f (set DATA)" >&2; exit 1; }
done
if ! "$TRAINER_SRC" tokenize --help > /dev/null 2>&1; then
    echo "error: $TRAINER_SRC has no working \`tokenize\` subcommand (rebuild it; LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    "$TRAINER_SRC" tokenize --help 2>&1 | head -5 >&2 || true
    exit 1
fi

KEPT=1
if [[ -n "${WORK:-}" ]]; then
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/tokenize-bench.XXXXXX")"
    if [[ "${KEEP:-0}" != 1 ]]; then
        KEPT=0
        trap 'rm -rf "$WORK"' EXIT
    fi
fi
WORK="$(cd "$WORK" && pwd)"
# A private copy: a rebuild of the binary during the benchmark must not change it.
TRAINER="$WORK/trainer"
cp "$TRAINER_SRC" "$TRAINER"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"

wait_idle() {
    [[ "$WAIT_IDLE" == 1 ]] || return 0
    local busy
    if ! busy=$("$PY" benches/bench_util.py wait-idle "$MAX_BUSY" "$IDLE_TIMEOUT"); then
        echo "   (CPUs still $busy busy after ${IDLE_TIMEOUT}s; running anyway)" >&2
    fi
}

json_field() {  # FILE FIELD: a top-level field of a JSON file (or of a log's last JSON line)
    "$PY" - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1]).read().strip()
try:
    row = json.loads(text)
except ValueError:
    row = json.loads([l for l in text.splitlines() if l.startswith("{")][-1])
print(row[sys.argv[2]])
EOF
}

echo "== training a byte-level BPE, vocab $VOCAB, on wiki-fr-extract.txt + tinyshakespeare.txt" >&2
TOK_DIR="$WORK/tokenizer"
TOK="$TOK_DIR/tokenizer.json"
"$PY" "${REF[@]}" train-bpe "$DATA/wiki-fr-extract.txt" "$DATA/tinyshakespeare.txt" \
    --vocab "$VOCAB" --out "$TOK" > "$WORK/train.json"
cat "$WORK/train.json" >&2

run_trainer() {  # CORPUS_PATH MODE THREADS
    local log="$WORK/trainer.log"
    wait_idle
    if ! "$PY" benches/bench_util.py monitor "$WORK/trainer.monitor.json" -- \
        "$TRAINER" tokenize "$1" --out "$WORK/trainer.bin" --tokenizer "$TOK" --format text \
        --docs "$2" --threads "$3" --force > "$log" 2>&1; then
        echo "error: trainer tokenize failed:" >&2
        cat "$log" >&2
        exit 1
    fi
}

run_python() {  # CORPUS_PATH MODE THREADS
    local log="$WORK/python.log"
    wait_idle
    if ! "$PY" benches/bench_util.py monitor "$WORK/python.monitor.json" -- \
        "$PY" "${REF[@]}" encode "$1" --tokenizer "$TOK" --docs "$2" --eos "$EOS" \
        --threads "$3" --api "$PY_API" --out "$WORK/python.bin" --idx "$WORK/python.idx" > "$log" 2> "$log.err"; then
        echo "error: tokenize_reference.py encode failed:" >&2
        cat "$log" "$log.err" >&2
        exit 1
    fi
}

MISMATCH=0
for c in "${CASES[@]}"; do
    file="${c%% *}"
    mode="${c##* }"
    corpus="$DATA/$file"
    name="${file%.txt}"
    for threads in $THREADS; do
        echo "== $file, --docs $mode, $threads thread(s), $REPEATS x (trainer, python)" >&2
        for rep in $(seq 1 "$REPEATS"); do
            # Alternate which side goes first, so that drift in the machine's load hits both alike.
            if (( rep % 2 )); then
                run_trainer "$corpus" "$mode" "$threads"; run_python "$corpus" "$mode" "$threads"
            else
                run_python "$corpus" "$mode" "$threads"; run_trainer "$corpus" "$mode" "$threads"
            fi
            dtype="$(json_field "$WORK/trainer.json" dtype)"
            tokens="$(json_field "$WORK/trainer.json" tokens)"
            equal=true
            idx_ok=true
            if ! "$PY" "${REF[@]}" compare "$WORK/python.bin" "$WORK/trainer.bin" --dtype "$dtype" \
                --tokenizer "$TOK" > "$WORK/compare.txt" 2>&1; then
                equal=false
                MISMATCH=1
                echo "   ids differ (A = python, B = trainer):" >&2
                sed 's/^/   /' "$WORK/compare.txt" >&2
            fi
            if ! "$PY" "${REF[@]}" check-idx "$WORK/trainer.idx" --docs "$mode" --tokens "$tokens" \
                --ref "$WORK/python.idx" "$corpus" > "$WORK/check-idx.txt" 2>&1; then
                idx_ok=false
                MISMATCH=1
                echo "   trainer.idx is wrong: $(cat "$WORK/check-idx.txt")" >&2
            fi
            fields=(corpus="$name" docs_mode="$mode" bench_threads="$threads" rep="$rep")
            "$PY" "${REF[@]}" annotate "$WORK/trainer.json" side=trainer "${fields[@]}" \
                ids_equal="$equal" idx_ok="$idx_ok" --monitor "$WORK/trainer.monitor.json" >> "$RESULTS"
            "$PY" "${REF[@]}" annotate "$WORK/python.log" "${fields[@]}" \
                --monitor "$WORK/python.monitor.json" >> "$RESULTS"
            "$PY" - "$RESULTS" <<'EOF' >&2
import json, sys
t, p = [json.loads(l) for l in open(sys.argv[1]).read().splitlines()[-2:]]
print(f"   rep {t['rep']}: trainer {t['tokens'] / t['seconds']:,.0f} tokens/s ({t['seconds']:.3f} s);"
      f" python {p['api']} {p['encode_tokens_per_s']:,.0f}, end-to-end {p['tokens_per_s']:,.0f}"
      f" tokens/s ({p['seconds']:.3f} s, encode on {p['encode_cores']} cores);"
      f" ids {'equal' if t['ids_equal'] else 'DIFFER'}, index {'ok' if t['idx_ok'] else 'WRONG'};"
      f" other processes: {t['monitor']['other_cores']} / {p['monitor']['other_cores']} cores")
EOF
        done
    done
done

TOKENIZERS_VERSION="$("$PY" -c 'import tokenizers; print(tokenizers.__version__)')"
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -1)"
HEADER="trainer tokenize vs Python tokenizers $TOKENIZERS_VERSION: BPE vocab $VOCAB, $NPROC cores (${CPU_MODEL:-unknown CPU}), median of $REPEATS; commit $COMMIT${DIRTY:+ (dirty tree)}, $(date +%F)"
TABLE="$("$PY" "${REF[@]}" table "$RESULTS")"

echo
echo "$HEADER"
echo
echo "$TABLE"
echo
if (( KEPT )); then
    echo "raw JSON lines: $RESULTS"
else
    echo "raw JSON lines: $RESULTS (removed at exit; KEEP=1 or WORK=DIR keeps them, --record saves them)"
fi

if (( RECORD )); then
    LABEL="${LABEL:-$(hostname -s 2>/dev/null || true)}"
    LABEL="$(printf '%s' "${LABEL:-cpu}" | tr -c 'A-Za-z0-9._-' '-')"
    mkdir -p benches/results
    OUT_MD="benches/results/tokenize-$LABEL-$(date +%F).md"
    [[ -e "$OUT_MD" ]] && OUT_MD="benches/results/tokenize-$LABEL-$(date +%F-%H%M%S).md"
    {
        echo "# $HEADER"
        echo
        echo "Command: \`benches/tokenize_compare.sh --record${TRAINER_ARG:+ $TRAINER_ARG}\`" \
             "(THREADS=\"$THREADS\" REPEATS=$REPEATS VOCAB=$VOCAB PY_API=$PY_API)"
        echo
        echo "$TABLE"
        echo
        echo "## Tokenizer training"
        echo
        echo '```json'
        cat "$WORK/train.json"
        echo '```'
        echo
        echo "## Runs (JSON lines)"
        echo
        echo '```jsonl'
        cat "$RESULTS"
        echo '```'
    } > "$OUT_MD"
    echo "recorded: $OUT_MD"
fi

if (( MISMATCH )); then
    echo "error: the trainer's ids or index differ from tokenizers' in some runs (see above)" >&2
    exit 1
fi
