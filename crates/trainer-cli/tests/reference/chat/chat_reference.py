"""Reference renders of real chat templates by transformers, for the Rust (minijinja) renderer.

    python chat_reference.py                  -> writes expected.json next to this file
    python chat_reference.py --check-minijinja
        -> also renders every case with the `minijinja` Python package (the Rust minijinja
           engine with pycompat, set up as crates/trainer/src/data/chat.rs sets it up) and
           reports any difference from transformers; needs `pip install minijinja`
           (not needed to produce expected.json).

For each template file (TEMPLATES) and each conversation of conversations.json this calls
transformers' own `tokenizer.apply_chat_template(messages, chat_template=TEMPLATE_TEXT,
tokenize=False, add_generation_prompt=False, **EXTRA_KWARGS[template])` on a
PreTrainedTokenizerFast built in-process (a tiny WordLevel vocabulary that holds the model's
special tokens; only `bos_token` / `eos_token` reach the templates), and for conversations whose
last message is a user turn also with `add_generation_prompt=True`.

expected.json:
    {template_file: {key: {"add_generation_prompt": bool, "text": str}
                        | {"add_generation_prompt": bool, "error": str}}}
where key is the conversation name (add_generation_prompt=False) or
"<conversation name>+gen" (add_generation_prompt=True; only for conversations ending with a user
turn). "error" is the message of the exception the template raised (raise_exception).

Deterministic and offline: nothing is downloaded, and the Llama 3 template gets
`date_string="26 Jul 2024"` so that it never calls strftime_now.
"""
import json
import os
import sys

try:
    import jinja2
    import transformers
    from tokenizers import Tokenizer, models
except ImportError as e:  # pragma: no cover
    print(f"missing Python package: {e}; install scripts/requirements-test.txt", file=sys.stderr)
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))

# template file -> the special tokens its model's tokenizer_config.json declares.
TEMPLATES = {
    "llama3.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "chatml_qwen2.5.jinja": {"eos_token": "<|im_end|>"},
    "gemma.jinja": {"bos_token": "<bos>", "eos_token": "<eos>"},
}

# template file -> extra keyword arguments of apply_chat_template (template variables).
EXTRA_KWARGS = {
    "llama3.jinja": {"date_string": "26 Jul 2024"},
    "chatml_qwen2.5.jinja": {},
    "gemma.jinja": {},
}

GEN_SUFFIX = "+gen"


def make_tokenizer(special):
    """A PreTrainedTokenizerFast whose special tokens are the model's."""
    vocab = {"[UNK]": 0}
    for tok in special.values():
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special)


def read_text(name):
    with open(os.path.join(HERE, name), encoding="utf-8", newline="") as f:
        return f.read()


def cases(conversations):
    """(key, messages, add_generation_prompt) for every render to record."""
    for conv in conversations:
        yield conv["name"], conv["messages"], False
        if conv["messages"][-1]["role"] == "user":
            yield conv["name"] + GEN_SUFFIX, conv["messages"], True


def render_transformers(tokenizer, template, messages, add_generation_prompt, extra):
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        return {"add_generation_prompt": add_generation_prompt, "error": str(e)}
    assert isinstance(text, str), type(text)
    return {"add_generation_prompt": add_generation_prompt, "text": text}


def build_expected(conversations):
    expected = {}
    for name, special in TEMPLATES.items():
        template = read_text(name)
        tokenizer = make_tokenizer(special)
        out = {}
        for key, messages, gen in cases(conversations):
            out[key] = render_transformers(tokenizer, template, messages, gen, EXTRA_KWARGS[name])
        expected[name] = out
    return expected


def check_minijinja(conversations, expected):
    """Render every case with minijinja (pycompat) set up as the Rust renderer is; report diffs."""
    import datetime

    import minijinja

    def raise_exception(msg):
        raise RuntimeError(msg)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    bad = 0
    for name, special in TEMPLATES.items():
        env = minijinja.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                                    pycompat=True)
        env.add_function("raise_exception", raise_exception)
        env.add_function("strftime_now", strftime_now)
        env.add_filter("tojson", tojson)
        env.add_template("chat", read_text(name))
        for key, messages, gen in cases(conversations):
            want = expected[name][key]
            ctx = dict(special, messages=messages, add_generation_prompt=gen, **EXTRA_KWARGS[name])
            try:
                got = {"add_generation_prompt": gen, "text": env.render_template("chat", **ctx)}
            except Exception as e:  # minijinja wraps the raised message in its own error text
                msg = str(e)
                if "error" in want and want["error"] in msg:
                    msg = want["error"]
                got = {"add_generation_prompt": gen, "error": msg}
            if got != want:
                bad += 1
                print(f"DIFF {name} {key}:\n  transformers: {want!r}\n  minijinja:    {got!r}")
    print(f"minijinja check: {bad} difference(s)")
    return bad


def main():
    with open(os.path.join(HERE, "conversations.json"), encoding="utf-8") as f:
        conversations = json.load(f)
    expected = build_expected(conversations)
    path = os.path.join(HERE, "expected.json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(expected, f, ensure_ascii=False, indent=2)
        f.write("\n")
    errors = [(t, k, v["error"]) for t, d in expected.items() for k, v in d.items() if "error" in v]
    print(f"wrote {path} (transformers {transformers.__version__}, jinja2 {jinja2.__version__})")
    for t, k, msg in errors:
        print(f"  {t} {k}: error: {msg}")
    if "--check-minijinja" in sys.argv[1:]:
        if check_minijinja(conversations, expected):
            sys.exit(1)


if __name__ == "__main__":
    main()
