#!/usr/bin/env python3
"""Plain-PyTorch reference for the trainer's Llama benchmark.

The same model as crates/trainer/src/models/transformer.rs (Llama family) and the same training
step as crates/trainer/src/train/pretrain.rs, written the way one would in PyTorch:

- token embedding, n_layers x [RMSNorm -> q/k/v/o attention with RoPE (rotate-half) and
  scaled_dot_product_attention(is_causal, enable_gqa) -> residual; RMSNorm -> SwiGLU MLP ->
  residual], final RMSNorm, lm_head (untied unless --tie); no biases; normal(0, 0.02) init;
- RMSNorm as transformers' LlamaRMSNorm: normalise in fp32, cast back, scale by the weight;
- loss: cross-entropy of the logits upcast to fp32, mean over tokens;
- AdamW (torch.optim.AdamW): weight decay on everything except norms and the token embedding,
  betas (0.9, 0.95), eps 1e-8, constant lr; grad-norm clipping with
  torch.nn.utils.clip_grad_norm_ (max norm 1.0, like the trainer's train.clip_grad_norm);
- precision: fp32; bf16-mixed = fp32 weights and optimizer, forward under
  torch.autocast(bfloat16) (as the trainer's bf16-mixed); bf16 = weights, grads and optimizer
  state in bfloat16 (as the trainer's bf16);
- batches: random token ids of shape [batch, seq + 1] drawn up front on the CPU (a pool of 16),
  copied to the device each step, as the trainer copies its prefetched CPU batches.

Timing: steps 1..warmup are warm-up; tokens/s is measured over steps warmup+1..steps with a
device synchronisation at both ends (the trainer's steady-state figure likewise leaves out its
first log windows). Model TFLOP/s uses the trainer's formula (TransformerConfig::
train_flops_per_token): 6 * (parameters other than the token embedding) + 12 * n_layers *
d_model * seq per token.

Prints one JSON line on stdout (and appends it to --out when given).
"""

import argparse
import json
import math
import os
import platform
import resource
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="total optimizer steps, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--log-every", type=int, default=0,
                   help="also time windows of this many steps after warm-up (for spread); 0: off")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16-mixed", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default mode)")
    p.add_argument("--adamw", default="auto", choices=["auto", "single", "foreach", "fused"],
                   help="torch.optim.AdamW implementation; auto: single-tensor (foreach=False) "
                        "on the CPU, fused=True on CUDA")
    p.add_argument("--zero-grad", default="none", choices=["none", "zero"],
                   help="optimizer.zero_grad(set_to_none=True) (torch's default) or zero in place "
                        "(what the trainer does)")
    p.add_argument("--tie", action="store_true", help="tie lm_head to the token embedding")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm; 0: no clipping")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU")
    p.add_argument("--label", default="pytorch", help="name put in the JSON line")
    p.add_argument("--out", default=None, help="also append the JSON line to this file")
    a = p.parse_args(argv)
    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.d_model % a.heads or a.heads % a.kv_heads or (a.d_model // a.heads) % 2:
        p.error("d_model must divide by heads, heads by kv-heads, and the head size must be even")
    if not 0 <= a.warmup_steps < a.steps:
        p.error("need 0 <= --warmup-steps < --steps")
    return a


def main(argv=None):
    a = parse_args(argv)
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    hd = a.d_model // a.heads

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            dtype = x.dtype
            xf = x.float()
            var = xf.pow(2).mean(-1, keepdim=True)
            return self.weight * (xf * torch.rsqrt(var + self.eps)).to(dtype)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(a.d_model, a.heads * hd, bias=False)
            self.k_proj = nn.Linear(a.d_model, a.kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(a.d_model, a.kv_heads * hd, bias=False)
            self.o_proj = nn.Linear(a.heads * hd, a.d_model, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, a.heads, hd).transpose(1, 2)
            k = self.k_proj(x).view(b, t, a.kv_heads, hd).transpose(1, 2)
            v = self.v_proj(x).view(b, t, a.kv_heads, hd).transpose(1, 2)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=a.kv_heads != a.heads)
            return self.o_proj(y.transpose(1, 2).contiguous().view(b, t, a.heads * hd))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(a.d_model, a.d_ff, bias=False)
            self.up_proj = nn.Linear(a.d_model, a.d_ff, bias=False)
            self.down_proj = nn.Linear(a.d_ff, a.d_model, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(a.d_model, a.norm_eps)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(a.d_model, a.norm_eps)
            self.mlp = Mlp()

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(a.vocab, a.d_model)
            self.layers = nn.ModuleList(Block() for _ in range(a.layers))
            self.norm = RMSNorm(a.d_model, a.norm_eps)
            self.lm_head = nn.Linear(a.d_model, a.vocab, bias=False)
            if a.tie:
                self.lm_head.weight = self.embed_tokens.weight
            for m in self.modules():  # transformers' _init_weights: normal(0, 0.02)
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
            # RoPE tables [seq, hd] in fp32, frequencies repeated over both halves.
            inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
            freqs = torch.outer(torch.arange(a.seq).float(), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

        def forward(self, idx, targets):
            t = idx.shape[1]
            x = self.embed_tokens(idx)
            cos, sin = self.cos[:t], self.sin[:t]
            for layer in self.layers:
                x = layer(x, cos, sin)
            logits = self.lm_head(self.norm(x))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))

    model = Llama().to(device)
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.train()

    # Same FLOPs accounting as the trainer: every parameter except the token embedding.
    n_params = sum(p.numel() for p in model.parameters())
    n_no_embed = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    flops_per_token = 6.0 * n_no_embed + 12.0 * a.layers * a.d_model * a.seq

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if ("norm" in n or n == "embed_tokens.weight") else decay).append(p)
    impl = a.adamw
    if impl == "auto":
        impl = "fused" if cuda else "single"
    opt_kw = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **opt_kw)

    step_fn_model = torch.compile(model) if a.compile else model
    autocast = a.dtype == "bf16-mixed"

    gen = torch.Generator().manual_seed(a.seed)
    pool = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen) for _ in range(16)]

    def train_step(i):
        batch = pool[i % len(pool)].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if autocast:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = step_fn_model(inputs, targets)
        else:
            loss = step_fn_model(inputs, targets)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=a.zero_grad == "none")
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    tokens_per_step = a.batch * a.seq
    t_start = time.perf_counter()
    for i in range(a.warmup_steps):
        loss = train_step(i)
    sync()
    warm_s = time.perf_counter() - t_start
    windows = []
    t0 = w0 = time.perf_counter()
    for i in range(a.warmup_steps, a.steps):
        loss = train_step(i)
        done = i + 1 - a.warmup_steps
        if a.log_every and done % a.log_every == 0:
            loss.item()  # synchronises, like the trainer's log rows
            now = time.perf_counter()
            windows.append(a.log_every * tokens_per_step / (now - w0))
            w0 = now
    final_loss = loss.item()
    sync()
    elapsed = time.perf_counter() - t0
    measured = a.steps - a.warmup_steps
    tokens_per_s = measured * tokens_per_step / elapsed
    tflops = flops_per_token * tokens_per_s / 1e12

    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"

    row = {
        "impl": a.label,
        "compile": a.compile,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "adamw": impl,
        "zero_grad": a.zero_grad,
        "shape": {"vocab": a.vocab, "d_model": a.d_model, "layers": a.layers, "heads": a.heads,
                  "kv_heads": a.kv_heads, "d_ff": a.d_ff, "seq": a.seq, "batch": a.batch,
                  "tie": a.tie},
        "params": n_params,
        "params_no_embed": n_no_embed,
        "flops_per_token": flops_per_token,
        "steps": a.steps,
        "warmup_steps": a.warmup_steps,
        "warmup_seconds": round(warm_s, 3),
        "measured_seconds": round(elapsed, 3),
        "tokens_per_s": tokens_per_s,
        "window_tokens_per_s": [round(w, 1) for w in windows],
        "model_tflops_per_s": tflops,
        "mfu": tflops / a.peak_tflops if a.peak_tflops else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "final_loss": final_loss,
    }
    if not math.isfinite(final_loss):
        print(f"error: loss is {final_loss}", file=sys.stderr)
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
