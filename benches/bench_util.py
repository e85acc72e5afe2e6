#!/usr/bin/env python3
"""Helpers shared by benches/cpu_compare.sh and benches/gpu_check.sh (standard library only).

  bench_util.py tokens OUT N VOCAB [SEED]
      write N random little-endian uint16 token ids < VOCAB to OUT (the trainer's
      data.train kind = "tokens" format)
  bench_util.py steady RUN_DIR --skip-rows K [--label L] [--peak-tflops P]
      one JSON line for a trainer run: steady-state tokens/s over the metrics.jsonl train rows
      after the first K (the rows' windows have equal size, so the combined rate is total tokens
      over total time: the harmonic mean of the rows' rates), model TFLOP/s and MFU at that rate
      (FLOPs per token taken from summary.json, so the trainer's own formula), peak memory
  bench_util.py compare RESULTS.jsonl
      median, min and max tokens/s per side of a cpu_compare.sh run, and the trainer/pytorch
      ratio (of the medians, and the range over the pairs run back to back)
  bench_util.py wait-idle [MAX_BUSY [TIMEOUT [SAMPLE]]]
      wait until the CPUs are nearly idle (busy share <= MAX_BUSY, default 0.15, over SAMPLE s);
      exit 1 after TIMEOUT s (default 600)
  bench_util.py monitor OUT.json -- CMD...
      run CMD; write its wall and CPU seconds and the cores other processes used meanwhile
  bench_util.py record RESULTS.jsonl SIDE REP ROW_JSON MONITOR_JSON
      append a cpu_compare.sh run's row to RESULTS.jsonl
  bench_util.py table RESULTS.jsonl
      a Markdown table of tokens/s (also relative to the first PyTorch eager run of the same
      dtype), TFLOP/s, MFU and peak memory, one row per JSON line
"""

import json
import random
import statistics
import sys
from array import array


def cmd_tokens(argv):
    out, n, vocab = argv[0], int(argv[1]), int(argv[2])
    seed = int(argv[3]) if len(argv) > 3 else 1234
    if vocab > 65536:
        sys.exit("bench_util tokens: uint16 ids need vocab <= 65536")
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        ids = np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.uint16)
        ids.astype("<u2").tofile(out)
        return
    rng = random.Random(seed)
    ids = array("H", (rng.randrange(vocab) for _ in range(n)))
    if sys.byteorder != "little":
        ids.byteswap()
    with open(out, "wb") as f:
        ids.tofile(f)


def _opt(argv, name, default=None, cast=str):
    if name in argv:
        return cast(argv[argv.index(name) + 1])
    return default


def cmd_steady(argv):
    run_dir = argv[0]
    skip = _opt(argv, "--skip-rows", 0, int)
    label = _opt(argv, "--label", "trainer")
    peak = _opt(argv, "--peak-tflops", None, float)
    rows = []
    with open(f"{run_dir}/metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "tokens_per_s" in r and "split" not in r:
                rows.append(r)
    with open(f"{run_dir}/summary.json") as f:
        summary = json.load(f)
    adamw = None  # from the resolved recipe the trainer writes (optim.fused)
    try:
        import re
        with open(f"{run_dir}/config.toml") as f:
            m = re.search(r"^fused\s*=\s*(true|false)", f.read(), re.M)
        adamw = {"true": "fused", "false": "single"}.get(m.group(1)) if m else None
    except OSError:
        pass
    # Steady windows: equal-sized ones after the first `skip` (the last one may be shorter when
    # max_steps is not a multiple of log_every; weight every window by its tokens).
    kept = []
    prev_tokens = rows[skip - 1]["tokens"] if 0 < skip <= len(rows) else 0
    for r in rows[skip:]:
        kept.append((r["tokens"] - prev_tokens, r["tokens_per_s"]))
        prev_tokens = r["tokens"]
    if not kept:
        sys.exit(f"bench_util steady: {run_dir} has {len(rows)} log rows, none after the first {skip}")
    tokens = sum(t for t, _ in kept)
    seconds = sum(t / rate for t, rate in kept)
    tps = tokens / seconds
    flops_per_token = summary["model_tflops_per_s"] * 1e12 / summary["tokens_per_s"]
    tflops = flops_per_token * tps / 1e12
    peak = peak if peak is not None else (
        summary["model_tflops_per_s"] / summary["mfu"] if summary.get("mfu") else None)
    row = {
        "impl": label,
        "compile": False,
        "device": summary["device"],
        "dtype": summary["precision"],
        "adamw": adamw,
        "params": summary["params"],
        "flops_per_token": flops_per_token,
        "steps": summary["steps"],
        "skipped_rows": skip,
        "measured_tokens": tokens,
        "measured_seconds": round(seconds, 3),
        "tokens_per_s": tps,
        "window_tokens_per_s": [round(rate, 1) for _, rate in kept],
        "model_tflops_per_s": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "peak_memory_kind": summary.get("peak_memory_kind"),
        "summary_tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary.get("final_train_loss"),
    }
    print(json.dumps(row))


def _load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_compare(argv):
    rows = _load(argv[0])
    sides = {}
    for r in rows:
        sides.setdefault(r["side"], []).append(r)
    out = {}
    for side in ("trainer", "pytorch"):
        v = [r["tokens_per_s"] for r in sides.get(side, [])]
        if not v:
            sys.exit(f"bench_util compare: no {side} rows in {argv[0]}")
        med = statistics.median(v)
        out[side] = v
        other = [r.get("monitor", {}).get("other_cores") for r in sides[side]]
        runs = ", ".join(f"{x:.1f}" + (f" [others {o:.2f} cores]" if o is not None else "")
                         for x, o in zip(v, other))
        print(f"{side:8s} tokens/s: median {med:8.1f}   min {min(v):8.1f}   max {max(v):8.1f}   "
              f"spread {100 * (max(v) - min(v)) / med:4.1f}%   runs {runs}")
    ratio = statistics.median(out["trainer"]) / statistics.median(out["pytorch"])
    pairs = [t / p for t, p in zip(out["trainer"], out["pytorch"])]
    print(f"ratio trainer/pytorch: {ratio:.3f} (median of each side); "
          f"per back-to-back pair {min(pairs):.3f}..{max(pairs):.3f}")


def _fmt_bytes(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def cmd_table(argv):
    rows = _load(argv[0])
    # Baseline per dtype: the first PyTorch eager run with torch's default-path optimizer.
    base = {}
    for r in rows:
        if r.get("impl") == "pytorch" and not r.get("compile"):
            base.setdefault(r.get("dtype"), r["tokens_per_s"])
    print("| run | dtype | tokens/s | vs PyTorch eager | model TFLOP/s | MFU | peak memory |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        name = r.get("impl", "?") + (" (compile)" if r.get("compile") else "")
        if r.get("adamw"):
            name += f", AdamW {r['adamw']}"
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        kind = (r.get("peak_memory_kind") or "").replace("cuda_", "")
        mem = _fmt_bytes(r.get("peak_memory_bytes")) + (f" ({kind})" if kind else "")
        b = base.get(r.get("dtype"))
        rel = f"{r['tokens_per_s'] / b:.2f}x" if b else "-"
        print(f"| {name} | {r.get('dtype')} | {r['tokens_per_s']:,.0f} | {rel} | "
              f"{r['model_tflops_per_s']:.2f} | {mfu} | {mem} |")


def _cpu_jiffies():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # guest time is already counted in user
    return total - idle, total


def cmd_wait_idle(argv):
    """Waits until the machine's CPUs are nearly idle (busy share below MAX_BUSY over a SAMPLE-s
    window), at most TIMEOUT seconds; prints the busy share seen and exits 1 on timeout."""
    import time
    max_busy = float(argv[0]) if argv else 0.15
    timeout = float(argv[1]) if len(argv) > 1 else 600
    sample = float(argv[2]) if len(argv) > 2 else 3
    t0 = time.time()
    while True:
        b0, t0j = _cpu_jiffies()
        time.sleep(sample)
        b1, t1j = _cpu_jiffies()
        busy = (b1 - b0) / max(t1j - t0j, 1)
        if busy <= max_busy:
            print(f"{busy:.2f}")
            return
        if time.time() - t0 > timeout:
            print(f"{busy:.2f}")
            sys.exit(1)


def cmd_monitor(argv):
    """monitor OUT.json -- CMD...: runs CMD and writes its wall time, its CPU time and the CPU
    time taken by everything else on the machine meanwhile, in cores (contention)."""
    import os
    import resource
    import subprocess
    import time
    out, cmd = argv[0], argv[argv.index("--") + 1:]
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, tot0 = _cpu_jiffies()
    w0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - w0
    b1, tot1 = _cpu_jiffies()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    # /proc/stat counts all CPUs; scale jiffies to seconds of CPU.
    busy_s = (b1 - b0) / hz
    others = max(busy_s - child, 0.0) / max(wall, 1e-9)
    with open(out, "w") as f:
        json.dump({"wall_s": round(wall, 2), "cpu_s": round(child, 2),
                   "other_cores": round(others, 2), "cpus": ncpu}, f)
    sys.exit(rc)


def cmd_record(argv):
    """record RESULTS.jsonl SIDE REP ROW_JSON MONITOR_JSON: appends the run's row with its side,
    repetition and contention, and prints a line about it on stderr."""
    results, side, rep, row, mon = argv[:5]
    r = json.loads(row)
    with open(mon) as f:
        r.update(side=side, rep=int(rep), monitor=json.load(f))
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"   {side} rep {rep}: {r['tokens_per_s']:.1f} tokens/s (windows {r['window_tokens_per_s']};"
          f" other processes used {r['monitor']['other_cores']} cores meanwhile)", file=sys.stderr)


def main():
    cmds = {"tokens": cmd_tokens, "steady": cmd_steady, "compare": cmd_compare, "table": cmd_table,
            "wait-idle": cmd_wait_idle, "monitor": cmd_monitor, "record": cmd_record}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
