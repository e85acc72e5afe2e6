"""Reference side of tests/tokenize.rs: the Python `tokenizers` library on the same corpus.

    python tokenize_reference.py train_bpe OUT_DIR VOCAB CORPUS...
        -> OUT_DIR/tokenizer.json, a byte-level BPE (GPT-2's pre-tokenizer) trained on the files
           with the special token <|endoftext|>, and OUT_DIR/tokenizer_config.json naming it the
           eos_token.
    python tokenize_reference.py encode TOKENIZER_JSON EOS MODE OUT.bin INPUT...
        -> the ids `trainer tokenize` must write: each document encoded with
           Tokenizer.encode_batch(docs, add_special_tokens=False), the EOS id after each (EOS
           "none": nothing), as little-endian uint16 (uint32 when the vocabulary exceeds 65536).
           MODE: "line" (each non-empty line of a text file, without its "\\n"), "file" (a whole
           file) or "jsonl:FIELD" (each non-blank line's FIELD). Prints {"documents", "tokens"}.
    python tokenize_reference.py to_parquet IN.jsonl OUT.parquet [CODEC]
        -> the records of IN.jsonl as a Parquet table written by pyarrow (CODEC: snappy, the
           default of pyarrow and Hugging Face datasets, or zstd, gzip, lz4, none).
"""
import json
import sys

import numpy as np
import tokenizers


def train_bpe(out_dir, vocab, corpus):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=int(vocab), special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train(corpus, trainer)
    tok.save(f"{out_dir}/tokenizer.json")
    with open(f"{out_dir}/tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)


def documents(mode, inputs):
    docs = []
    for path in inputs:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if mode == "file":
            docs.append(text)
        elif mode == "line":
            docs += text.split("\n")
        else:
            field = mode.split(":", 1)[1]
            docs += [json.loads(line)[field] for line in text.split("\n") if line.strip()]
    return [d for d in docs if d]


def encode(tokenizer_json, eos, mode, out, inputs):
    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    docs = documents(mode, inputs)
    eos_ids = [] if eos == "none" else [tok.token_to_id(eos)]
    ids = []
    for e in tok.encode_batch(docs, add_special_tokens=False):
        ids += e.ids + eos_ids
    dtype = np.uint16 if tok.get_vocab_size(with_added_tokens=True) <= 65536 else np.uint32
    np.asarray(ids, dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tofile(out)
    print(json.dumps({"documents": len(docs), "tokens": len(ids)}))


def to_parquet(jsonl, out, codec="snappy"):
    import pyarrow
    import pyarrow.parquet
    records = [json.loads(line) for line in open(jsonl, encoding="utf-8") if line.strip()]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), out, compression=codec,
                                row_group_size=max(1, len(records) // 3))


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "train_bpe":
        train_bpe(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "to_parquet":
        to_parquet(*sys.argv[2:])
    elif len(sys.argv) >= 7 and sys.argv[1] == "encode":
        encode(*sys.argv[2:6], sys.argv[6:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
