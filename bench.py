"""
Time training steps of a model on random data and print tokens/s, model FLOPs/s and their fraction
of this machine's peak (MFU; on a CPU the peak is its own matrix product, timed at start).
--reference times the same model built from PyTorch's textbook layers in float32 instead: the ratio
of the two is how much this project's model code gains over the plain way of writing it.

    python bench.py --steps 5 --batch_size 16                    # GPT-S
    python bench.py --steps 5 --batch_size 16 --reference        # the textbook GPT-S
    python bench.py --steps 5 --batch_size 16 --hybrid           # the hybrid
    python bench.py --steps 5 --batch_size 16 --n_embd 256 --n_head 16   # GPT-L
    python bench.py --steps 2 --batch_size 8 --profile           # where GPT-S's step time goes, op
    by op python bench.py --steps 3 --batch_size 8 --rounds 3          # before / after / bf16 /
    reference, interleaved python bench.py --steps 3 --batch_size 8 --rounds 3 --attention   # one
    layer's attention, before and after

Its other flags are whisper_gpt.py's.
"""

import argparse
import dataclasses
import functools
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import whisper_gpt
from checks import Parser, run_script
from whisper_gpt import (
    MLP,
    MODEL_FIELDS,
    WhisperGPT,
    add_config_flags,
    autocast_context,
    config_from,
    flops_per_token,
    model_name,
    sinusoids,
)

H100_BF16_PEAK = 989e12  # FLOP/s, dense, H100 SXM


def textbook_stack(width, n_head, n_layer, dropout):
    """A causal pre-norm stack of PyTorch's own textbook layers (nn.TransformerEncoderLayer), MLP
    4x, GELU."""
    layer = nn.TransformerEncoderLayer(
        width, n_head, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)


def textbook_gpt(c):
    """The reference: the same model (token-only or, with c.hybrid, the hybrid's two stacks) built
    from PyTorch's own textbook layers (nn.TransformerEncoder with a causal mask, learned token
    positions), with no care for speed."""

    class TextbookGPT(nn.Module):
        def __init__(self):
            super().__init__()
            tok_width = c.n_embd // 2 if c.hybrid else c.n_embd
            self.wte, self.wpe = (
                nn.Embedding(c.vocab_size, tok_width),
                nn.Embedding(c.block_size, tok_width),
            )
            # the mel half: per-slice MLP, sinusoids, causal layers, a final norm (whisper_gpt's)
            if c.hybrid:
                self.slice_mlp = MLP(c.n_mel, c.mel_hidden, tok_width)
                self.register_buffer(
                    "mel_pos", sinusoids(c.block_size, tok_width), persistent=False
                )
                self.mel_stack = textbook_stack(tok_width, c.mel_head, c.mel_layer, c.dropout)
                self.mel_ln = nn.LayerNorm(tok_width)
            self.stack = textbook_stack(c.n_embd, c.n_head, c.n_layer, c.dropout)
            self.ln_f, self.head = nn.LayerNorm(c.n_embd), MLP(c.n_embd, c.dense, c.vocab_size)

        def forward(self, idx, mel=None, targets=None):
            T = idx.size(1)
            mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            if c.hybrid:
                m = (
                    self.slice_mlp(F.pad(mel, (0, 0, 1, 0))[:, :T]) + self.mel_pos[:T]
                )  # the shift by 2
                x = torch.cat(
                    [x, self.mel_ln(self.mel_stack(m, mask=mask, is_causal=True))], dim=-1
                )
            logits = self.head(self.ln_f(self.stack(x, mask=mask, is_causal=True)))  # (B, T, vocab)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return TextbookGPT()


def setup(c, reference=False):
    """(model, its parameter count, a step function) for timing: Adam as whisper_gpt.py trains,
    random tokens and mel."""
    torch.manual_seed(c.seed)
    model = (textbook_gpt(c) if reference else WhisperGPT(c)).to(c.device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, fused=c.device.startswith("cuda"))
    if c.compile:
        model = torch.compile(model)
    ctx = (
        nullcontext() if reference else autocast_context(c)
    )  # the reference is the plain float32 model
    x = torch.randint(0, c.vocab_size, (c.batch_size, c.block_size), device=c.device)
    y = torch.randint(0, c.vocab_size, (c.batch_size, c.block_size), device=c.device)
    mel = torch.randn(c.batch_size, c.block_size, c.n_mel, device=c.device) if c.hybrid else None

    def step():
        with ctx:
            _, loss = model(x, mel, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, params, step


def profile(c, steps=2, top=12):
    """Where a training step's time goes: torch.profiler over `steps` steps (after one warm-up), the
    `top` ops by self CPU time (the time inside each op itself, not in the ops it calls), printed as
    a table."""
    _, _, step = setup(c)
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if c.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    print(
        f"profile {model_name(c)}: {steps} steps of batch {c.batch_size} x {c.block_size} | "
        f"{c.device} {c.dtype}"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def native_bf16():
    """Whether the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX-BF16, as /proc/cpuinfo names
    them; torch's own check, mkldnn's, says yes to any AVX-512 CPU, where bf16 is emulated), and the
    flags that say so."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(found), " ".join(found) or "no bf16 units"


@functools.cache
def cpu_peak(dtype):
    """FLOP/s of the head's matrix product, (6000 x 2048) @ (2048 x 1024), on this CPU at torch's
    thread count in dtype: best of 3 after a warm-up. The CPU's own peak for the work this model
    does most of."""
    a = torch.randn(6000, 2048, dtype=dtype)
    b = torch.randn(2048, 1024, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 6000 * 2048 * 1024 / best


def peak(c):
    """(FLOP/s, its name) that the MFU divides by: an H100's bf16 on a GPU; on the CPU, its matrix
    product timed in the precision the run multiplies in (bf16 only where the CPU has bf16 units,
    else fp32)."""
    if c.device.startswith("cuda"):
        return H100_BF16_PEAK, "H100 bf16 peak"
    dtype = torch.bfloat16 if c.dtype == "bfloat16" and native_bf16()[0] else torch.float32
    name = "bf16" if dtype is torch.bfloat16 else "fp32"
    return cpu_peak(dtype), f"this CPU's {name} matmul, {cpu_peak(dtype) / 1e9:.0f} GFLOP/s"


def bench(c, steps=20, reference=False):
    """Time `steps` training steps (after 3 warm-up steps) on random tokens and mel; print and
    return tokens/s."""
    model, params, step = setup(c, reference)
    sync = torch.cuda.synchronize if c.device.startswith("cuda") else (lambda: None)
    for i in range(3 + steps):
        if i == 3:
            sync()
            t0 = time.time()
        step()
    sync()
    dt = time.time() - t0
    tok_s = steps * c.batch_size * c.block_size / dt
    name = f"textbook {model_name(c)}" if reference else model_name(c)
    dtype = "float32" if reference else c.dtype
    flops, (top, top_name) = flops_per_token(c, params) * tok_s, peak(c)
    print(
        f"bench {name}: {params:,} params | batch {c.batch_size} x {c.block_size} | {c.device} "
        f"{dtype} | {steps} "
        f"steps in {dt:.2f} s | {tok_s:,.0f} tokens/s | {flops / 1e9:.1f} GFLOP/s model, MFU "
        f"{flops / top:.1%} of "
        f"{top_name}"
    )
    return tok_s


def torch_attention(q, k, v, dropout=0.0):
    """The attention whisper_gpt.py ran before cpu_attention (the 'before' of --rounds): torch's
    fused kernel, a head narrower than 16 zero-padded to 16 on the CPU (1.6x faster there than at
    8)."""
    d = q.size(-1)
    if q.device.type != "cpu" or d >= 16:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    q, k, v = (F.pad(t, (0, 16 - d)) for t in (q, k, v))  # (B, n_head, T, 16), zeros after head_dim
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=d**-0.5
    )[..., :d]


def compare(c, steps, rounds):
    """The textbook float32 reference, this model before cpu_attention (torch_attention), after it
    in float32, and after it with --dtype bfloat16, timed in turn for `rounds` rounds, so that the
    machine's drift hits all alike; prints each and the median ratios."""
    kept, fp32, bf16 = (
        whisper_gpt.causal_attention,
        dataclasses.replace(c, dtype="float32"),
        dataclasses.replace(c, dtype="bfloat16"),
    )
    kinds = {
        "reference": (fp32, True, kept),
        "before": (fp32, False, torch_attention),
        "after": (fp32, False, kept),
        "after bf16": (bf16, False, kept),
    }
    runs = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, (config, reference, attention) in kinds.items():
            whisper_gpt.causal_attention = attention
            try:
                runs[kind].append(bench(config, steps, reference))
            finally:
                whisper_gpt.causal_attention = kept
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=False))
    print(
        f"compare {model_name(c)} ({rounds} rounds, interleaved, {torch.get_num_threads()} "
        "threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, {native_bf16()[1]}): after / before "
        f"{ratio('after', 'before'):.2f}x"
        f" | over the textbook float32 reference: after {ratio('after', 'reference'):.2f}x, "
        f"after bf16 {ratio('after bf16', 'reference'):.2f}x"
    )
    return {kind: statistics.median(times) for kind, times in runs.items()}


def attention(c, steps, rounds):
    """Forward and backward of one layer's causal attention at the model's shape, (batch, n_head,
    block_size, n_embd // n_head), before (torch_attention) and after
    (whisper_gpt.causal_attention), in turn; ms of each."""
    B, H, T, d = c.batch_size, c.n_head, c.block_size, c.n_embd // c.n_head
    q, k, v = (torch.randn(B, H, T, d, device=c.device, requires_grad=True) for _ in range(3))
    ms = {torch_attention: [], whisper_gpt.causal_attention: []}
    for _ in range(rounds):
        for fn, times in ms.items():
            fn(q, k, v).sum().backward()  # a warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(q, k, v).sum().backward()
            times.append((time.perf_counter() - t0) / steps * 1000)
    before, after = (statistics.median(t) for t in ms.values())
    print(
        f"attention forward + backward of {B} x {H} heads x {T} x {d} ({c.device}, "
        f"{torch.get_num_threads()} threads, "
        f"{rounds} rounds in turn): before {before:.1f} ms, after {after:.1f} ms: "
        f"{before / after:.2f}x"
    )
    return before, after


def parse_args(argv=None):
    """(Config, steps, reference, profile, rounds) from the command line: whisper_gpt.py's flags and
    this script's own."""
    parser = Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps timed, after 3 warm-up steps")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="time the textbook nn.TransformerEncoder GPT of the same shape instead",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="time the textbook reference, the model before and "
        "after cpu_attention and after it in bf16, interleaved, this many rounds; print the ratios "
        "(0: off)",
    )
    parser.add_argument(
        "--attention",
        action="store_true",
        help="time one layer's attention (forward and "
        "backward) before and after cpu_attention instead, --rounds rounds (at least 1) in turn",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print where the time of --steps steps goes "
        "(torch.profiler, ops by self CPU time) instead of timing them",
    )
    add_config_flags(
        parser, MODEL_FIELDS + ("batch_size", "lr", "device", "dtype", "compile", "seed")
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.profile and args.reference:
        parser.error("--profile profiles this project's model: drop --reference")
    if args.rounds < 0:
        parser.error(f"--rounds must be 0 (off) or more, got {args.rounds}")
    return config_from(args), args.steps, args.reference, args.profile, args.rounds, args.attention


def main(argv=None):
    c, steps, reference, prof, rounds, attn = parse_args(argv)
    if attn:
        attention(c, steps, max(rounds, 1))
    elif prof:
        profile(c, steps)
    elif rounds:
        compare(c, steps, rounds)
    else:
        bench(c, steps, reference)


if __name__ == "__main__":
    run_script(main)
