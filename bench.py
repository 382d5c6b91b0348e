"""
Time training steps of a model on random data and print tokens/s (and, on a GPU, the model FLOPs utilisation).
--reference times the same token-only GPT built from PyTorch's textbook layers instead: the ratio of the two
is how much this project's model code gains over the plain way of writing it.

    python bench.py --steps 5 --batch_size 16                    # GPT-S
    python bench.py --steps 5 --batch_size 16 --reference        # the textbook GPT-S
    python bench.py --steps 5 --batch_size 16 --hybrid           # the hybrid
    python bench.py --steps 5 --batch_size 16 --n_embd 256 --n_head 16   # GPT-L
    python bench.py --steps 2 --batch_size 8 --profile           # where GPT-S's step time goes, op by op
    python bench.py --steps 3 --batch_size 8 --rounds 3          # before / after the CPU speed-up, interleaved

Its other flags are whisper_gpt.py's.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import whisper_gpt
from checks import Parser, UserError, run_script
from whisper_gpt import MLP, MODEL_FIELDS, WhisperGPT, add_config_flags, autocast_context, config_from, model_name, say

H100_BF16_PEAK = 989e12  # FLOP/s, dense, H100 SXM


def textbook_gpt(c):
    """The reference: the same token-only GPT built from PyTorch's own textbook layers
    (nn.TransformerEncoderLayer with a causal mask, learned positions), with no care for speed."""
    layer = nn.TransformerEncoderLayer(c.n_embd, c.n_head, 4 * c.n_embd, c.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)

    class TextbookGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
            self.stack = nn.TransformerEncoder(layer, c.n_layer, enable_nested_tensor=False)
            self.ln_f, self.head = nn.LayerNorm(c.n_embd), MLP(c.n_embd, c.dense, c.vocab_size)

        def forward(self, idx, mel=None, targets=None):
            T = idx.size(1)
            mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
            x = self.stack(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)), mask=mask, is_causal=True)
            logits = self.head(self.ln_f(x))  # (B, T, vocab)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return TextbookGPT()


def flops_per_token(c, params):
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6 per parameter plus attention's 12 L T d."""
    attn = c.n_layer * c.n_embd + (c.mel_layer * c.n_embd // 2 if c.hybrid else 0)
    return 6 * params + 12 * attn * c.block_size


def setup(c, reference=False):
    """(model, its parameter count, a step function) for timing: Adam as whisper_gpt.py trains, random tokens and mel."""
    if reference and c.hybrid:
        raise UserError("--reference times the textbook token-only GPT; drop --hybrid")
    torch.manual_seed(c.seed)
    model = (textbook_gpt(c) if reference else WhisperGPT(c)).to(c.device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, fused=c.device.startswith("cuda"))
    if c.compile:
        model = torch.compile(model)
    ctx = autocast_context(c)
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
    """Where a training step's time goes: torch.profiler over `steps` steps (after one warm-up), the `top` ops by
    self CPU time (the time inside each op itself, not in the ops it calls), printed as a table."""
    _, _, step = setup(c)
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if c.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    say(f"profile {model_name(c)}: {steps} steps of batch {c.batch_size} x {c.block_size} | {c.device} {c.dtype}")
    say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def bench(c, steps=20, reference=False):
    """Time `steps` training steps (after 3 warm-up steps) on random tokens and mel; print and return tokens/s."""
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
    name = "textbook nn.TransformerEncoder GPT" if reference else model_name(c)
    line = f"bench {name}: {params:,} params | batch {c.batch_size} x {c.block_size} | {c.device} {c.dtype}"
    line += f" | {steps} steps in {dt:.2f} s | {tok_s:,.0f} tokens/s"
    if c.device.startswith("cuda"):
        line += f" | MFU {flops_per_token(c, params) * tok_s / H100_BF16_PEAK:.1%} of H100 bf16 peak"
    say(line)
    return tok_s


def compare(c, steps, rounds):
    """Before and after this project's CPU speed-up (a head narrower than whisper_gpt.CPU_HEAD padded to it), and the
    textbook reference, timed in turn for `rounds` rounds, so that the machine's drift hits all three alike; prints
    each round's tokens/s and the median ratios."""
    kept = whisper_gpt.CPU_HEAD
    runs = {kind: [] for kind in ["before", "after"] + ([] if c.hybrid else ["reference"])}
    for _ in range(rounds):
        for kind, times in runs.items():
            whisper_gpt.CPU_HEAD = 0 if kind == "before" else kept  # 0: every head runs unpadded, as before
            try:
                times.append(bench(c, steps, reference=kind == "reference"))
            finally:
                whisper_gpt.CPU_HEAD = kept
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(runs[a], runs[b]))
    line = f"compare {model_name(c)} ({c.dtype}, {rounds} rounds, interleaved): after / before {ratio('after', 'before'):.2f}x"
    if not c.hybrid:
        line += f", after / textbook reference {ratio('after', 'reference'):.2f}x"
    say(line)


def parse_args(argv=None):
    """(Config, steps, reference, profile, rounds) from the command line: whisper_gpt.py's flags and this script's
    own."""
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps timed, after 3 warm-up steps")
    parser.add_argument("--reference", action="store_true", help="time the textbook nn.TransformerEncoder GPT "
                        "of the same shape instead")
    parser.add_argument("--rounds", type=int, default=0, help="time the model before and after the CPU speed-up "
                        "and the textbook reference, interleaved, this many rounds, and print the ratios (0: off)")
    parser.add_argument("--profile", action="store_true", help="print where the time of --steps steps goes "
                        "(torch.profiler, ops by self CPU time) instead of timing them")
    add_config_flags(parser, MODEL_FIELDS + ("batch_size", "lr", "device", "dtype", "compile", "seed"))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.profile and args.reference:
        parser.error("--profile profiles this project's model: drop --reference")
    if args.rounds < 0:
        parser.error(f"--rounds must be 0 (off) or more, got {args.rounds}")
    return config_from(args), args.steps, args.reference, args.profile, args.rounds


def main(argv=None):
    c, steps, reference, prof, rounds = parse_args(argv)
    if prof:
        profile(c, steps)
    elif rounds:
        compare(c, steps, rounds)
    else:
        bench(c, steps, reference)


if __name__ == "__main__":
    run_script(main)
