#!/usr/bin/env python3
"""The Python side of benches/tokenize_compare.sh: HF `tokenizers` doing what `trainer tokenize`
does, so that the two can be compared for equal ids and for speed.

  tokenize_reference.py train-bpe CORPUS... --vocab N --out DIR/tokenizer.json
      train a GPT-2-style byte-level BPE (ByteLevel pre-tokenizer without prefix space, ByteLevel
      decoder, "<|endoftext|>" as id 0 and as a special added token) on the corpora (whole
      files, as `tokenizers` reads them: line by line); also writes DIR/tokenizer_config.json
      with "eos_token": "<|endoftext|>". Deterministic: the same files give the same bytes at
      any thread count (checked in the output JSON line's sha256).
  tokenize_reference.py encode --tokenizer T --docs line|file --eos TOKEN|none|default
                               --out IDS.bin [--idx IDS.idx] --threads N CORPUS...
      read the documents as `trainer tokenize` does (--docs line: each non-empty line without
      its "\\n"; --docs file: each non-empty file), encode them with
      Tokenizer.encode_batch(docs, add_special_tokens=False), append the EOS id after each,
      write little-endian uint16 ids (uint32 when the vocabulary with added tokens exceeds
      65536) and, with --idx, the u64 document starts followed by the total. Prints one JSON
      line: "seconds"/"tokens_per_s" end to end (tokenizer load + read + encode + write,
      as the trainer's summary times it), "encode_seconds"/"encode_tokens_per_s" (the
      encode_batch call alone), the parts, and the CPU time of the encode call
      ("encode_cores" = CPU seconds / wall seconds: how many threads really worked).
      Threads: RAYON_NUM_THREADS=N and TOKENIZERS_PARALLELISM=true are set before `tokenizers`
      is imported (its Rust core runs encode_batch on rayon's global pool, sized by
      RAYON_NUM_THREADS when it starts); both are echoed in the output line.
      --api encode_batch_fast: the variant without offsets (what the trainer calls per document).
  tokenize_reference.py compare A.bin B.bin --dtype uint16|uint32 [--tokenizer T] [--context K]
      exit 0 and print the token count when the files hold the same ids; else print the first
      differing position with K ids of context on both sides (decoded with --tokenizer) and
      exit 1.
  tokenize_reference.py check-idx OUT.idx --docs line|file [--tokens N] [--ref REF.idx] CORPUS...
      check a document index: n_docs + 1 little-endian u64, starting at 0, non-decreasing,
      ending at N; n_docs equal to the corpus's non-empty documents (lines or files); equal to
      REF.idx when given. Exit 1 with the reason otherwise.
  tokenize_reference.py annotate JSON_FILE [KEY=VALUE...] [--monitor MON.json]
      print JSON_FILE (an object, or the last JSON line of a log) as one line with the fields
      added (values parsed as JSON where they parse, else strings) and MON.json under "monitor".
  tokenize_reference.py table RESULTS.jsonl
      the Markdown table of tokenize_compare.sh: medians per (corpus, docs, threads).
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# documents, as the trainer reads them

def read_documents(paths, docs):
    """The non-empty documents of the files, in order, and the number of bytes read.

    Mirrors trainer's corpus reader for text files: --docs line splits on b"\\n" only (a "\\r"
    stays in the line), strict UTF-8; empty documents are skipped."""
    out, n_bytes = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        n_bytes += len(data)
        if docs == "file":
            pieces = [data]
        else:
            pieces = data.split(b"\n")
        for raw in pieces:
            if raw:
                out.append(raw.decode("utf-8"))  # strict, like the trainer
    return out, n_bytes


def count_documents(paths, docs):
    n = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if docs == "file":
            n += 1 if data else 0
        else:
            n += sum(1 for raw in data.split(b"\n") if raw)
    return n


def tokenizer_file(arg):
    return os.path.join(arg, "tokenizer.json") if os.path.isdir(arg) else arg


def default_eos(arg):
    """eos_token of the tokenizer_config.json beside the tokenizer (as the trainer resolves it)."""
    d = arg if os.path.isdir(arg) else os.path.dirname(arg) or "."
    cfg = os.path.join(d, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos


def set_threads(n):
    """Must run before `import tokenizers`: rayon reads RAYON_NUM_THREADS when its global pool
    starts, at the first parallel call."""
    os.environ["RAYON_NUM_THREADS"] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


# ---------------------------------------------------------------------------------------------
# train-bpe

def cmd_train_bpe(a):
    set_threads(a.threads or (os.cpu_count() or 1))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    import tokenizers

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=a.vocab,
        min_frequency=a.min_frequency,
        special_tokens=[EOT],  # first: id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.perf_counter()
    tok.train(a.corpus, trainer)
    seconds = time.perf_counter() - t0
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(a.out, pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT,
                   "eos_token": EOT, "unk_token": EOT, "model_max_length": 1024}, f, indent=2)
        f.write("\n")
    eot = tok.token_to_id(EOT)
    if eot != 0:
        sys.exit(f"train-bpe: {EOT} got id {eot}, expected 0")
    with open(a.out, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    print(json.dumps({"tokenizer": a.out, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                      "eos_id": eot, "train_seconds": round(seconds, 3), "sha256": sha,
                      "tokenizers_version": tokenizers.__version__,
                      "rayon_num_threads": os.environ["RAYON_NUM_THREADS"]}))


# ---------------------------------------------------------------------------------------------
# encode

def cmd_encode(a):
    from array import array

    import numpy as np

    set_threads(a.threads)
    t_start = time.perf_counter()
    if a.tokenizer == "bytes":
        tok, vocab, version = None, 256, None
    else:
        import tokenizers
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tokenizer_file(a.tokenizer))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        version = tokenizers.__version__
    eos_name = default_eos(a.tokenizer) if a.eos == "default" and tok else (
        None if a.eos in ("none", "default") else a.eos)
    eos_id = None
    if eos_name is not None:
        if tok is None:
            sys.exit("encode: bytes have no room for an EOS token; use --eos none")
        eos_id = tok.token_to_id(eos_name)
        if eos_id is None:
            sys.exit(f"encode: the tokenizer has no token {eos_name!r}")
    t_loaded = time.perf_counter()

    docs, input_bytes = read_documents(a.corpus, a.docs)
    t_read = time.perf_counter()

    c0 = time.process_time()
    if tok is None:
        encodings = [list(d.encode("utf-8")) for d in docs]
    elif a.api == "encode_batch_fast":
        encodings = tok.encode_batch_fast(docs, add_special_tokens=False)
    else:
        encodings = tok.encode_batch(docs, add_special_tokens=False)
    c1 = time.process_time()
    t_encoded = time.perf_counter()

    # ids out of the Encoding objects (each .ids builds a Python list), EOS after each document
    flat = array("I")
    starts = array("Q", [0])
    for e in encodings:
        flat.extend(e if tok is None else e.ids)
        if eos_id is not None:
            flat.append(eos_id)
        starts.append(len(flat))
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    ids = np.frombuffer(flat, dtype=np.uint32)
    t_converted = time.perf_counter()

    ids.astype("<u2" if dtype == "uint16" else "<u4").tofile(a.out)
    if a.idx:
        np.frombuffer(starts, dtype=np.uint64).astype("<u8").tofile(a.idx)
    t_end = time.perf_counter()

    tokens = len(flat)
    total = t_end - t_start
    enc = t_encoded - t_read
    print(json.dumps({
        "side": "python", "api": a.api if tok is not None else "bytes",
        "threads": a.threads,
        "rayon_num_threads": os.environ["RAYON_NUM_THREADS"],
        "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        "tokenizers_version": version,
        "dtype": dtype, "tokens": tokens, "documents": len(docs), "input_bytes": input_bytes,
        "vocab_size": vocab, "eos_id": eos_id,
        "seconds": round(total, 4), "tokens_per_s": round(tokens / total, 1),
        "encode_seconds": round(enc, 4), "encode_tokens_per_s": round(tokens / enc, 1),
        "encode_cores": round((c1 - c0) / enc, 2),
        "load_seconds": round(t_loaded - t_start, 4), "read_seconds": round(t_read - t_loaded, 4),
        "convert_seconds": round(t_converted - t_encoded, 4),
        "write_seconds": round(t_end - t_converted, 4),
    }))


# ---------------------------------------------------------------------------------------------
# compare / check-idx

def cmd_compare(a):
    import numpy as np

    dt = np.dtype("<u2" if a.dtype == "uint16" else "<u4")
    for p in (a.a, a.b):
        if os.path.getsize(p) % dt.itemsize:
            print(f"{p}: {os.path.getsize(p)} bytes is not a whole number of {a.dtype} ids")
            sys.exit(1)
    x, y = np.fromfile(a.a, dtype=dt), np.fromfile(a.b, dtype=dt)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    if len(x) == len(y) and len(diff) == 0:
        print(json.dumps({"equal": True, "tokens": int(len(x))}))
        return
    first = int(diff[0]) if len(diff) else n
    k = a.context
    lo, hi = max(first - k, 0), first + k + 1
    tok = None
    if a.tokenizer and a.tokenizer != "bytes":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tokenizer_file(a.tokenizer))

    def show(name, v):
        ctx = [int(t) for t in v[lo:hi]]
        line = f"  {name}: ids[{lo}:{min(hi, len(v))}] = {ctx}"
        if tok is not None:
            pieces = [tok.id_to_token(t) for t in ctx]
            line += f"\n  {' ' * len(name)}  tokens = {pieces}"
            line += f"\n  {' ' * len(name)}  text   = {tok.decode(ctx, skip_special_tokens=False)!r}"
        print(line)

    print(f"DIFFERENT: {a.a} has {len(x)} ids, {a.b} has {len(y)}; "
          f"{len(diff)} of the first {n} positions differ; first difference at {first}"
          + ("" if len(diff) else " (one file is a prefix of the other)"))
    if first < n:
        print(f"  at {first}: {int(x[first])} vs {int(y[first])}")
    show("A", x)
    show("B", y)
    sys.exit(1)


def cmd_check_idx(a):
    import numpy as np

    size = os.path.getsize(a.idx)
    fail = []
    if size % 8 or size < 16:
        fail.append(f"{size} bytes: not at least two u64 values")
        starts = np.zeros(0, dtype="<u8")
    else:
        starts = np.fromfile(a.idx, dtype="<u8")
    n_docs = len(starts) - 1
    if len(starts):
        if starts[0] != 0:
            fail.append(f"first value {int(starts[0])}, not 0")
        if np.any(np.diff(starts.astype(np.int64)) < 0):
            fail.append("decreasing")
        if a.tokens is not None and int(starts[-1]) != a.tokens:
            fail.append(f"last value {int(starts[-1])}, not the {a.tokens} tokens")
    expected = count_documents(a.corpus, a.docs) if a.corpus else None
    if expected is not None and n_docs != expected:
        fail.append(f"{n_docs} documents, but the corpus has {expected} non-empty "
                    f"{'lines' if a.docs == 'line' else 'files'}")
    if a.ref:
        ref = np.fromfile(a.ref, dtype="<u8")
        if len(ref) != len(starts) or np.any(ref != starts):
            n = min(len(ref), len(starts))
            d = np.flatnonzero(ref[:n] != starts[:n])
            at = int(d[0]) if len(d) else n
            fail.append(f"differs from {a.ref} ({len(ref) - 1} documents) first at document {at}")
    print(json.dumps({"idx": a.idx, "documents": n_docs, "expected_documents": expected,
                      "ok": not fail, "problems": fail}))
    if fail:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# annotate / table (for the shell script)

def _parse_value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v


def cmd_annotate(a):
    with open(a.json_file) as f:
        text = f.read().strip()
    try:
        row = json.loads(text)
    except ValueError:  # a log: its last JSON line
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        if not lines:
            sys.exit(f"annotate: no JSON in {a.json_file}")
        row = json.loads(lines[-1])
    for kv in a.fields:
        k, _, v = kv.partition("=")
        row[k] = _parse_value(v)
    if a.monitor:
        with open(a.monitor) as f:
            row["monitor"] = json.load(f)
    print(json.dumps(row))


def cmd_table(a):
    rows = []
    with open(a.results) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    groups = {}
    for r in rows:
        key = (r["corpus"], r["docs_mode"], int(r["bench_threads"]))
        groups.setdefault(key, {"trainer": [], "python": []})[r["side"]].append(r)

    def med(v):
        return statistics.median(v) if v else float("nan")

    def fmt(v):
        return "-" if v != v else f"{v:,.0f}"

    apis = sorted({r.get("api", "encode_batch") for r in rows if r["side"] == "python"})
    api = "/".join(apis) or "encode_batch"
    print(f"| corpus | docs | threads | tokens | trainer tokens/s | python {api} tokens/s "
          "| python end-to-end tokens/s | trainer / python e2e | trainer / python encode "
          "| ids equal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (corpus, docs, threads), g in groups.items():
        t, p = g["trainer"], g["python"]
        tr = med([r["tokens"] / r["seconds"] for r in t])
        pe = med([r["encode_tokens_per_s"] for r in p])
        pt = med([r["tokens_per_s"] for r in p])
        tokens = (t or p)[0]["tokens"]
        checks = [r.get("ids_equal") for r in t]
        equal = "yes" if checks and all(c is True for c in checks) else (
            "-" if not checks or all(c is None for c in checks) else "**NO**")
        ratio_e2e = f"{tr / pt:.2f}x" if t and p else "-"
        ratio_enc = f"{tr / pe:.2f}x" if t and p else "-"
        print(f"| {corpus} | {docs} | {threads} | {tokens:,} | {fmt(tr)} | {fmt(pe)} | {fmt(pt)} "
              f"| {ratio_e2e} | {ratio_enc} | {equal} |")
    n = max((len(g["trainer"]) + len(g["python"])) // 2 for g in groups.values()) if groups else 0
    print()
    print(f"Medians of {n} runs per side. trainer: tokens / the `seconds` of its OUT.json "
          "(load + read + encode + write, in the process). python end-to-end: the same span "
          f"(tokenizer load + read + {api} + ids out + write); python {api}: that "
          "call alone. Process start-up (and Python's imports) are in neither; the whole "
          "processes' wall times are in the JSON lines (`monitor.wall_s`).")


# ---------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train-bpe")
    s.add_argument("corpus", nargs="+")
    s.add_argument("--vocab", type=int, required=True)
    s.add_argument("--out", required=True, help="the tokenizer.json to write")
    s.add_argument("--min-frequency", type=int, default=2)
    s.add_argument("--threads", type=int, default=0, help="RAYON_NUM_THREADS (0: all cores)")
    s.set_defaults(fn=cmd_train_bpe)

    s = sub.add_parser("encode")
    s.add_argument("corpus", nargs="+")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json, its directory, or bytes")
    s.add_argument("--docs", choices=["line", "file"], default="file")
    s.add_argument("--eos", default="default",
                   help="the token after each document; none; default: eos_token of the "
                        "tokenizer_config.json beside the tokenizer")
    s.add_argument("--out", required=True)
    s.add_argument("--idx", help="also write the u64 document index here")
    s.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    s.add_argument("--api", choices=["encode_batch", "encode_batch_fast"], default="encode_batch")
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("compare")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--dtype", choices=["uint16", "uint32"], required=True)
    s.add_argument("--tokenizer", help="decode the context around a difference")
    s.add_argument("--context", type=int, default=8)
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("check-idx")
    s.add_argument("idx", metavar="OUT.idx")
    s.add_argument("corpus", nargs="*")
    s.add_argument("--docs", choices=["line", "file"], default="file")
    s.add_argument("--tokens", type=int)
    s.add_argument("--ref")
    s.set_defaults(fn=cmd_check_idx)

    s = sub.add_parser("annotate")
    s.add_argument("json_file")
    s.add_argument("fields", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--monitor")
    s.set_defaults(fn=cmd_annotate)

    s = sub.add_parser("table")
    s.add_argument("results")
    s.set_defaults(fn=cmd_table)

    # Each subcommand parses its own arguments intermixed, so that options may stand between
    # positionals (check-idx OUT.idx --docs line CORPUS...).
    if len(sys.argv) < 2 or sys.argv[1] not in sub.choices:
        p.parse_args()  # usage / --help / the error
    a = sub.choices[sys.argv[1]].parse_intermixed_args(sys.argv[2:])
    a.fn(a)


if __name__ == "__main__":
    main()
