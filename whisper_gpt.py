"""
Whisper-GPT (Verma, 2024) in one file: the token-only GPT baselines (GPT-S, GPT-L) and the hybrid
that feeds a causal mel-spectrogram stack beside the EnCodec token embedding, trained by the paper's
recipe. The model comes first, then the data, evaluation and training loop, the command line last;
checks.py refuses a user's mistakes.

    python whisper_gpt.py --dataset music                           # GPT-S, the paper's baseline
    python whisper_gpt.py --dataset music --hybrid --n_embd 64      # the hybrid: 32 token + 32 mel
    python whisper_gpt.py --dataset music --n_embd 256 --n_head 16  # GPT-L
    torchrun --nproc_per_node 8 whisper_gpt.py ...                  # DDP, one process per GPU
"""

import argparse
import dataclasses
import glob
import inspect
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_attention
from audio import FRAME_RATE
from checks import (
    Parser,
    UserError,
    check_data,
    check_writable,
    load_torch_file,
    micro_batches,
    room_to_write,
    run_script,
    validate,
)
from decoding import DecodedSplit, load_decoder
from runlog import data_fingerprint, fmt, hold_folder, log_eval, log_event, plus_minus, write_atomic

# -----------------------------------------------------------------------------
# Configuration: one dataclass of defaults; argparse is generated from its fields.
GPU_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclasses.dataclass
class Config:
    # model (the defaults are the paper's baseline GPT-S, section 3.1)
    vocab_size: int = 1024  # EnCodec 24 kHz codebook 0; from the data's meta.json, not a flag
    block_size: int = 750  # context in tokens: 10 s at 75 tokens/s
    n_layer: int = 8  # decoder blocks of the main stack
    n_head: int = 8  # attention heads per block (GPT-L: 16)
    n_embd: int = 64  # width of the main stack (GPT-L: 256); hybrid: half tokens, half mel stack
    dense: int = 2048  # the dense layer between the last block and the 1024-way output
    dropout: float = 0.0  # the paper is silent; none
    hybrid: bool = False  # add the causal mel stack beside the token embedding (the paper's hybrid)
    n_mel: int = 64  # mel bins per slice; from the data's meta.json, not a flag
    mel_hidden: int = 2048  # per-slice MLP: n_mel -> mel_hidden -> n_embd // 2
    mel_layer: int = 6  # causal layers of the "Whisper-decoder" mel stack
    mel_head: int = 4  # the paper is silent; 4 heads keep GPT-S's head size of 8
    # data and output
    dataset: str = "music"  # the name prepare.py gave the data (data/<dataset>)
    data_dir: str = ""  # default: data/<dataset>; a resumed or evaluated run: its own data
    out_dir: str = ""  # default: out-<model>-<dataset>, e.g. out-gpt-s-music
    mel_source: str = "audio"  # hybrid: 'audio' (the paper's), 'decoded', 'prompt' or 'self'
    mel_weight: float = 1.0  # --mel_source self: the weight of its mel loss (L1) beside the NLL
    mel_noise: float = 0.0  # --mel_source self: std of the noise on the fed mel in training
    mel_feedback: bool = False  # --mel_source self: from a cut per crop on, train fed its own mel
    # The recipe: the paper's shape (Adam, constant, halved 40 % of the way in), scaled to the
    # default 1 h corpus on a 2-core CPU (NOTES.md, Training). The paper's: --epochs 25 --lr 2e-4
    # --batch_size 16 on 200 h.
    batch_size: int = 8  # crops per optimizer step in all, whatever the number of processes
    micro_batch: int = 0  # crops per forward pass and process (gradient accumulation); 0 = all
    epochs: int = 10  # passes over the train tokens (paper: 25)
    lr: float = 1e-3  # Adam's learning rate before it is halved (paper: 2e-4)
    lr_drop_at: float = 0.4  # the lr is halved after this fraction of the epochs (paper: 10 of 25)
    max_iters: int = 0  # stop after this many steps (a budget for short runs); 0 = the recipe's
    # evaluation and checkpoints
    eval_interval: int = 0  # steps between evals; 0 = once per epoch
    log_interval: int = 10  # steps between progress lines (loss, lr, tokens/s, ETA); 0 = none
    eval_windows: int = 200  # fixed val windows per eval in training (evenly spaced); 0 = all
    final_windows: int = 0  # val windows for --eval_only; 0 = all
    eval_only: bool = False  # print the table row of <out_dir>/ckpt_best.pt, then stop
    prompt_seconds: float = 3.0  # --eval_only: the continuation row's prompt (its audio); 0 = none
    continue_mel: str = ""  # the continuation's mel: decoded, none or self; default: the run's own
    init_from: str = "scratch"  # 'scratch' or 'resume' (from <out_dir>/ckpt_latest.pt)
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda, cuda:1, cpu, ...
    dtype: str = "bfloat16" if GPU_BF16 else "float32"  # autocast dtype; fp32: none
    compile: bool = False  # torch.compile the model (checkpoints still hold the plain module)
    seed: int = 1337  # model init and the crops of every step


# fmt: off
MODEL_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dense", "dropout",
                "hybrid", "n_mel", "mel_hidden", "mel_layer", "mel_head")
# fmt: on
FROM_DATA = ("vocab_size", "n_mel")  # fixed by the data (meta.json), so no flags
RECIPE_FIELDS = ("batch_size", "micro_batch", "seed", "lr", "lr_drop_at")  # a resume keeps them


def model_name(c):
    """The paper's name for a configuration: GPT-S, GPT-L, hybrid, or custom."""
    shape = {(8, 8, 64): "GPT-S", (8, 16, 256): "GPT-L"}.get(
        (c.n_layer, c.n_head, c.n_embd), "custom"
    )
    return "hybrid" if c.hybrid else shape


# -----------------------------------------------------------------------------
# The model: small modules first, then the two stacks, then the whole.
def sinusoids(length, dim):
    """Fixed sinusoidal positions (Vaswani et al.), (length, dim), for all three models."""
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2).float() / dim)  # (dim/2,)
    angle = torch.arange(length).float()[:, None] * inv_freq[None, :]  # (length, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # (length, dim)


class KVCache:
    """Keys and values of every attention layer (both stacks), written in place into whole-window
    buffers."""

    def __init__(self, n_layers, size):
        # per layer: (B, n_head, size, head_dim); positions 0..pos-1 are filled
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.size = size
        self.pos = 0  # tokens already in the cache = the position of the next token

    def update(self, layer, k, v):
        """Store k, v (B, n_head, T, head_dim) of the T new positions; return those of all positions
        so far."""
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(*k.shape[:2], self.size, k.size(3))
            self.v[layer] = v.new_empty(*v.shape[:2], self.size, v.size(3))
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, n_head, end, head_dim)


def causal_attention(q, k, v, dropout=0.0):
    """Causal attention of q, k, v (B, n_head, T, head_dim) -> (B, n_head, T, head_dim). On the CPU
    a head of at most cpu_attention.MAX_HEAD runs in cpu_attention's C kernel, in float32 whatever
    the autocast (there, bf16 attention is slower than fp32: NOTES.md, Speed); elsewhere, or without
    a C compiler, it is torch's own call."""
    if (
        q.device.type == "cpu"
        and q.size(-1) <= cpu_attention.MAX_HEAD
        and not dropout
        and cpu_attention.kernel()
    ):
        return cpu_attention.narrow_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). With a cache, x holds only the new positions after the cached
        ones."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_head, T_past + T, head_dim)
        past = k.size(2) - T
        dropout = self.dropout if self.training else 0.0
        if past == 0:  # the usual case: fused causal attention (flash attention on a GPU)
            y = causal_attention(q, k, v, dropout)
        # one new position after cached ones (generation): it sees them all, no mask needed
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # new positions after cached ones: each sees all the past and the new ones up to itself
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_in, n_hidden, n_out, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_in, n_hidden)
        self.c_proj = nn.Linear(n_hidden, n_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A causal decoder layer, pre-norm as GPT-2's: x + attn(ln(x)), then x + mlp(ln(x)), MLP 4x."""

    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, 4 * n_embd, n_embd, dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class MelStack(nn.Module):
    """The hybrid's mel stack, what the paper calls its "Whisper-decoder" (not decoding.Decoder,
    which turns tokens back into mel and audio): Whisper's encoder made causal and small. Each mel
    slice goes through a per-slice MLP (n_mel -> 2048 -> width), gets sinusoidal positions, then
    causal decoder layers."""

    def __init__(self, c):
        super().__init__()
        width = c.n_embd // 2
        self.slice_mlp = MLP(c.n_mel, c.mel_hidden, width)
        self.register_buffer("pos", sinusoids(c.block_size, width), persistent=False)
        self.blocks = nn.ModuleList(Block(width, c.mel_head, c.dropout) for _ in range(c.mel_layer))
        self.ln_post = nn.LayerNorm(width)  # as Whisper's encoder ends
        # --mel_source prompt: a slice with no mel (a NaN row, which no real mel row can be) is this
        self.no_mel = nn.Parameter(torch.zeros(width)) if c.mel_source == "prompt" else None

    def forward(self, mel_in, cache=None, first_layer=0):
        """mel_in (B, T, n_mel), already shifted: row t is mel slice t-1 -> (B, T, width)."""
        start = cache.pos if cache is not None else 0
        x = self.slice_mlp(mel_in if self.no_mel is None else mel_in.nan_to_num())
        if self.no_mel is not None:
            x = torch.where(mel_in.isnan().any(-1, keepdim=True), self.no_mel, x)
        x = x + self.pos[start : start + mel_in.size(1)]
        for i, block in enumerate(self.blocks):
            x = block(x, cache, first_layer + i)
        return self.ln_post(x)


class WhisperGPT(nn.Module):
    """GPT-S / GPT-L (token-only) or the hybrid, by config.hybrid."""

    def __init__(self, c):
        super().__init__()
        validate(c)
        self.config = c
        tok_width = c.n_embd // 2 if c.hybrid else c.n_embd
        self.wte = nn.Embedding(c.vocab_size, tok_width)
        self.register_buffer("pos", sinusoids(c.block_size, tok_width), persistent=False)
        # named mel, as the checkpoints' state-dict keys are
        self.mel = MelStack(c) if c.hybrid else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        # the paper's head: a dense layer of 2048 units, then the 1024-way output. It names no
        # activation between them; without one the two would collapse into a single linear map, so
        # GELU, as in the blocks.
        self.head = MLP(c.n_embd, c.dense, c.vocab_size)
        # --mel_source self: a head that predicts, at position t, mel slice t (the slice that ends
        # with token t, read by position t + 1): what the model is fed once the audio stops
        self.mel_head = MLP(c.n_embd, 4 * c.n_embd, c.n_mel) if c.mel_source == "self" else None
        self.last_mel = None  # the mel slices the last forward predicted (B, T, n_mel)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith((".attn.c_proj.weight", ".mlp.c_proj.weight")):
                p.data.normal_(
                    0.0, 0.02 / math.sqrt(2 * (c.n_layer + (c.mel_layer if c.hybrid else 0)))
                )
        # Inputs on equal footing (NOTES.md): the two input layers start at unit RMS, beside unit
        # sinusoids and the mel half's LayerNorm, or the weak input is noise to the blocks (GPT-2's
        # 0.02 hid the token ~35x).
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        if self.mel is not None:
            mlp = self.mel.slice_mlp
            # pre-activations: RMS 1
            nn.init.normal_(mlp.c_fc.weight, mean=0.0, std=1.0 / math.sqrt(c.n_mel))
            # out: RMS ~0.9
            nn.init.normal_(mlp.c_proj.weight, mean=0.0, std=math.sqrt(2.0 / c.mel_hidden))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def new_cache(self):
        c = self.config
        return KVCache(c.n_layer + (c.mel_layer if c.hybrid else 0), c.block_size)

    def forward(self, idx, mel=None, targets=None, cache=None):
        """idx (B, T) tokens, mel (B, T, n_mel) their slices, targets (B, T) -> logits (B, T,
        vocab), mean NLL or None. With a cache, idx holds only the new positions, mel the slices
        from the first (the newest unread)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.config.block_size}")
        x = self.wte(idx) + self.pos[start : start + T]  # (B, T, tok_width): the token half
        if self.config.hybrid:
            if mel is None or mel.size(0) != B or mel.size(1) < start + T - 1:
                raise ValueError("the hybrid needs mel (B, T, n_mel) aligned with idx (B, T)")
            # The paper's "shift by 2": position t predicts token t+1 and sees mel slices 0..t-1,
            # never slice t or later. So the mel stack reads the slices one step late, behind a zero
            # slice at position 0.
            fed = mel
            if self.training and targets is not None and self.config.mel_feedback:
                fed = self.own_mel(idx, mel)
            # (B, T, n_mel): row t is slice t-1
            mel_in = F.pad(fed, (0, 0, 1, 0))[:, start : start + T]
            if self.training and self.mel_head is not None and self.config.mel_noise:
                mel_in = mel_in + self.config.mel_noise * torch.randn_like(mel_in)  # CALM's remedy
            # (B, T, n_embd): token | mel
            x = torch.cat([x, self.mel(mel_in, cache, self.config.n_layer)], dim=-1)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        logits = self.head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        if self.mel_head is not None:
            self.last_mel = self.mel_head(x).float()  # (B, T, n_mel): slice t at position t
            if targets is not None:  # the mel loss, against the slices it was fed (start 0)
                self.mel_l1 = (self.last_mel - mel[:, :T].float()).abs().mean()
                loss = loss + self.config.mel_weight * self.mel_l1
        return logits, loss

    @torch.no_grad()
    def own_mel(self, idx, mel):
        """--mel_feedback: the audio's mel up to a cut drawn per crop, from it on the slices a first
        pass predicts (each from the audio's mel before it): what the model reads once it feeds
        itself, one step deep (the second pass of the remedies for exposure bias)."""
        self(idx, mel)
        B, T = idx.shape
        cut = torch.randint(0, T + 1, (B, 1, 1), device=idx.device)
        later = torch.arange(T, device=idx.device)[None, :, None] >= cut
        return torch.where(later, self.last_mel.to(mel.dtype), mel[:, :T])

    @torch.inference_mode()
    def generate(
        self,
        idx,
        max_new_tokens,
        mel=None,
        mel_fn=None,
        temperature=1.0,
        top_k=None,
        top_p=None,
        use_cache=True,
        generator=None,
        return_mel=False,
    ):
        """idx (B, T) -> (B, T + max_new_tokens). Hybrid: mel (B, T, n_mel) the prompt's slices;
        mel_fn(idx) gives the newest token's slice (B, n_mel), its decoded mel (decoding.Decoder),
        first read a step later (the shift); --mel_source self feeds its own prediction instead.
        generator: one, or one per row. Past block_size the window restarts on the newest
        block_size // 2 tokens (the paper is silent). return_mel: (idx, the mel it was fed)."""
        c = self.config
        start = max(0, idx.size(1) - c.block_size)  # first token of the window the model sees
        cache = None
        for step in range(max_new_tokens):
            if idx.size(1) - start > c.block_size:
                start, cache = idx.size(1) - c.block_size // 2, None
            if use_cache and cache is None:
                cache = self.new_cache()
            done = cache.pos if cache is not None else 0  # window positions already in the cache
            logits, _ = self(
                idx[:, start + done :], mel[:, start:] if c.hybrid else None, cache=cache
            )
            if self.mel_head is not None and mel.size(1) < idx.size(1):  # slice t, at position t
                mel = torch.cat([mel, self.last_mel[:, -1:].to(mel)], dim=1)
            # (B, 1)
            next_token = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token], dim=1)
            # the new token's slice, read by the next step's position
            if c.hybrid and self.mel_head is None and step < max_new_tokens - 1:
                mel = torch.cat([mel, mel_fn(idx).to(mel)[:, None, :]], dim=1)  # (B, T + 1, n_mel)
        return (idx, mel) if return_mel else idx


def flops_per_token(c, params):
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6 a parameter, plus 12 L T d."""
    attn = c.n_layer * c.n_embd + (c.mel_layer * c.n_embd // 2 if c.hybrid else 0)
    return 6 * params + 12 * attn * c.block_size


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next tokens (B, 1): temperature, then top-k, then nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep the smallest set whose mass reaches top_p
        drop = cum - sorted_logits.softmax(dim=-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):  # one generator per row
        return torch.cat(
            [
                torch.multinomial(p[None], 1, generator=g)
                for p, g in zip(probs, generator, strict=True)
            ]
        )
    return torch.multinomial(probs, 1, generator=generator)


def load_checkpoint(path, device="cpu"):
    """Rebuild the model from a checkpoint alone. Returns (model, config, checkpoint dict)."""
    if not os.path.isfile(path):  # the one line for a missing checkpoint, training or sampling
        folder, name = os.path.split(path)
        other = {"ckpt_best.pt": "latest", "ckpt_latest.pt": "best"}.get(name)
        fix = f"train one first (python whisper_gpt.py --out_dir {folder or '.'})"
        if other and os.path.isfile(os.path.join(folder, f"ckpt_{other}.pt")):
            fix = f"the run has ckpt_{other}.pt (sample.py reads it if you pass --ckpt {other})"
        raise UserError(f"no checkpoint at {path}: {fix}")
    ckpt = load_torch_file(path, device)
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("config"), dict)
        and isinstance(ckpt.get("model"), dict)
    ):
        raise UserError(
            f"{path} is a torch file but not a checkpoint of whisper_gpt.py (it has no model and "
            "config): pass the ckpt_best.pt or ckpt_latest.pt of a run folder"
        )
    # a field this file does not know is dropped
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in ckpt["config"].items() if k in fields})
    model = WhisperGPT(config).to(device)
    model.load_state_dict(ckpt["model"])
    return model, config, ckpt


def save_checkpoint(path, obj):
    """Write atomically: a file that has the final name is complete; a full disk is one line, the
    last whole checkpoint kept."""
    fix = (
        "free some space (or copy the run elsewhere), then resume the run from its last checkpoint"
    )
    with room_to_write(
        os.path.dirname(path) or ".", tensor_bytes(obj), fix, [glob.escape(path) + ".tmp"]
    ):
        # a file of ours, closed on error: a full disk's room is free again
        with write_atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)


def tensor_bytes(obj):
    """Bytes of the tensors in nested dicts and lists: about a checkpoint's size (the model and
    Adam's moments)."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    values = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    )
    return sum(map(tensor_bytes, values))


# -----------------------------------------------------------------------------
# Data: random crops of prepare.py's memmaps (check_data in checks.py checks them first); fixed val
# windows.
def open_split(data_dir, split, n_mel=0, mel_source="audio"):
    """tokens (N,), mel (N, n_mel) or None: memmaps opened per batch, as nanoGPT's (a kept one grows
    resident). mel_source 'decoded': the mel is the tokens' decoded mel (decoding.DecodedSplit: a
    crop's rows from its tokens)."""
    tokens = np.memmap(os.path.join(data_dir, f"{split}_tokens.bin"), dtype=np.uint16, mode="r")
    if not n_mel:
        return tokens, None
    if mel_source == "decoded":
        return tokens, DecodedSplit(tokens, load_decoder(data_dir))
    mel = np.memmap(os.path.join(data_dir, f"{split}_mel.bin"), dtype=np.float16, mode="r")
    return tokens, mel.reshape(-1, n_mel)  # (N, n_mel)


def get_batch(c, it, rank=0, world=1):
    """Process rank's share of step it's crops, seeded by (seed, step): the same at any world size
    or resume."""
    tokens, mel = open_split(c.data_dir, "train", c.n_mel if c.hybrid else 0, c.mel_source)
    share = c.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    rng = np.random.default_rng([c.seed, it])
    ix = rng.integers(0, len(tokens) - c.block_size, size=c.batch_size)
    x, y, mel = crops(c, tokens, mel, ix[mine])
    if c.mel_source == "prompt":  # the audio's mel up to a cut drawn per crop, no mel from it on
        cut = rng.integers(0, c.block_size + 1, size=c.batch_size)[mine]
        mel = fed_mel(mel, None, torch.from_numpy(cut).to(mel.device))
    return x, y, mel


def fed_mel(given, after, cut):
    """Which mel each position gets, the one rule for training and evaluation: window b reads given
    (B, T, n_mel), the mel of the audio it is given, up to row cut[b], and from it on the mel that
    generation has: after (B, T, n_mel), the decoded mel, or None: no mel (NaN rows)."""
    if given is None:  # a token-only model
        return None
    later = torch.arange(given.size(1), device=given.device)[None, :, None] >= cut[:, None, None]
    return torch.where(later, float("nan") if after is None else after, given)


def crops(c, tokens, mel, ix):
    """x (B, T), y (B, T) = x shifted by one, mel (B, T, n_mel) or None at offsets ix, on device."""
    x = np.stack([tokens[i : i + c.block_size] for i in ix]).astype(np.int64)
    y = np.stack([tokens[i + 1 : i + 1 + c.block_size] for i in ix]).astype(np.int64)
    m = (
        None
        if mel is None
        else np.stack([mel[i : i + c.block_size] for i in ix]).astype(np.float32)
    )
    if c.device.startswith("cuda"):  # through pinned memory, without waiting
        return [
            None if a is None else torch.from_numpy(a).pin_memory().to(c.device, non_blocking=True)
            for a in (x, y, m)
        ]
    return [None if a is None else torch.from_numpy(a).to(c.device) for a in (x, y, m)]


def val_windows(n_tokens, block_size, limit=0):
    """Starts of the fixed val windows, non-overlapping; limit > 0 keeps that many, evenly spaced,
    in every run."""
    starts = np.arange(0, n_tokens - block_size, block_size)
    if 0 < limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    return starts


def self_fed(model, x, given, prompt):
    """(logits (B, T, vocab), the mel fed (B, T, n_mel)) of windows x (B, T) whose mel is given's
    for slices 0..prompt-1 and the model's own prediction from slice prompt on, position by
    position as generate() feeds it (--mel_source self); the tokens stay x."""
    cache = model.new_cache()
    mel = given[:, :prompt]
    logits = [model(x[:, :prompt], mel, cache=cache)[0]]
    for t in range(prompt, x.size(1)):
        logits.append(model(x[:, t : t + 1], mel, cache=cache)[0])
        mel = torch.cat([mel, model.last_mel[:, -1:]], dim=1)  # slice t, read by position t + 1
    return torch.cat(logits, dim=1), mel[:, : x.size(1)]


BINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 7.0)  # seconds after a prompt: the continuation's bins


@dataclasses.dataclass
class EvalResult:
    nll: float  # mean NLL over all predicted positions (nats/token)
    acc: float  # top-1 accuracy
    tokens: int  # predicted positions
    windows: int
    se: float  # SE of nll over windows (std of the window means / sqrt(windows)); None for one
    window_nll: list  # each window's mean NLL, in order: two models pair window by window
    bin_nll: list = None  # a continuation: the mean NLL of each bin of BINS, all windows
    window_bin_nll: list = None  # ... and of each window (windows x bins)


def continuation_mel(c, trained):
    """(the mel of the given audio, the mel after it) that a run trained on trained's mel reads in
    a continuation: 'decoded' or None (no mel) after the prompt, --continue_mel or the run's own."""
    given = "decoded" if trained == "decoded" else "audio"
    own = {"prompt": "none", "self": "self"}.get(trained, "decoded")
    if c.continue_mel == "self" and trained != "self":
        raise UserError("--continue_mel self needs a run trained with --mel_source self")
    return given, c.continue_mel or own


@torch.no_grad()
def evaluate(model, c, limit, rank=0, world=1, prompt=0):
    """NLL ± SE and accuracy over the fixed val windows, r, r + world, ... on process r, then one
    all_reduce. model is never the DDP wrapper, whose own collectives would hang a process with
    fewer windows. Always in float32, whatever --dtype trains in. prompt > 0: the continuation of
    each window's first prompt tokens, the tokens true, the mel after them what generation has
    (continuation_mel); only the tokens after the prompt count, and each bin of BINS apart."""
    n_mel = c.n_mel if c.hybrid else 0
    given, after = c.mel_source, None
    if prompt:
        given, after = continuation_mel(c, model.config.mel_source)
    tokens, mel = open_split(c.data_dir, "val", n_mel, given)
    after_mel = open_split(c.data_dir, "val", n_mel, after)[1] if after == "decoded" else None
    starts = val_windows(len(tokens), c.block_size, limit)
    T = c.block_size
    first = max(prompt - 1, 0)  # the first position that counts: it predicts the prompt's next
    later = (np.arange(first, T) + 1 - prompt) / FRAME_RATE  # seconds after the prompt's end
    bin_of = torch.from_numpy(np.searchsorted(BINS[1:-1], later, side="right")).to(c.device)
    n_bins = len(BINS) - 1
    sums = torch.zeros(len(starts), 2 + n_bins, device=c.device, dtype=torch.float64)
    mine = np.arange(rank, len(starts), world)
    was_training = model.training
    model.eval()
    for b in range(0, len(mine), c.batch_size):
        rows = mine[b : b + c.batch_size]
        x, y, m = crops(c, tokens, mel, starts[rows])
        if prompt and after == "self":
            logits, m = self_fed(model, x, m, prompt)
        elif prompt:
            a = None if after_mel is None else crops(c, tokens, after_mel, starts[rows])[2]
            m = fed_mel(m, a, torch.full((len(rows),), prompt, device=c.device))
        if not (prompt and after == "self"):
            logits, _ = model(x, m)
        logits, y = logits[:, first:], y[:, first:]
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T - first)
        rows = torch.from_numpy(rows).to(c.device)
        sums[rows, 0] = nll.sum(1).double()
        sums[rows, 1] = (logits.argmax(-1) == y).sum(1).double()
        if prompt:
            by_bin = torch.zeros(len(rows), n_bins, device=c.device, dtype=torch.float64)
            sums[rows, 2:] = by_bin.index_add_(1, bin_of, nll.double())
    model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(sums)
    per_window = sums.cpu().numpy() / (T - first)  # every window predicts as many tokens; a sync
    nll = per_window[:, 0]
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else None  # None: JSON null
    # python floats, not numpy's: checkpoints hold them and load weights_only
    acc, n_tokens = float(per_window[:, 1].mean()), len(starts) * (T - first)
    result = EvalResult(float(nll.mean()), acc, n_tokens, len(starts), se, nll.tolist())
    if prompt:  # a bin the windows do not reach (a short block) is None
        counts = np.bincount(bin_of.cpu().numpy(), minlength=n_bins)
        bins = sums[:, 2:].cpu().numpy()[:, counts > 0] / counts[counts > 0]
        full = [[None] * n_bins for _ in range(len(starts))]
        for w, row in enumerate(bins):
            for k, v in zip(np.flatnonzero(counts), row, strict=True):
                full[w][k] = float(v)
        result.window_bin_nll = full
        means = dict(zip(np.flatnonzero(counts), bins.mean(0), strict=True))
        result.bin_nll = [float(means[k]) if k in means else None for k in range(n_bins)]
    return result


# -----------------------------------------------------------------------------
# Training: the set-up, then the paper's recipe in one flat loop, as nanoGPT's train.py.
def steps_per_epoch(c, n_train):
    """One epoch = as many crops as cover the train tokens once (paper, section 3)."""
    return max(1, math.ceil(math.ceil(n_train / c.block_size) / c.batch_size))


def get_lr(c, it, epoch_steps):
    """c.lr, halved after lr_drop_at of the epochs (paper: 2e-4 for 10 epochs of 25, then 1e-4)"""
    return c.lr if it // epoch_steps < round(c.lr_drop_at * c.epochs) else c.lr / 2


def launched_by_torchrun():
    return "RANK" in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process


def setup_distributed(c):
    """DDP when launched by torchrun; a single process otherwise, with nothing changed."""
    if not launched_by_torchrun():
        return 0, 0, 1
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    torch.distributed.init_process_group(backend="nccl" if c.device.startswith("cuda") else "gloo")
    if c.device.startswith("cuda"):
        c.device = f"cuda:{local_rank}"
        torch.cuda.set_device(c.device)
    return rank, local_rank, world


def autocast_context(c):
    """bf16 (or fp16) autocast on the device in use, the CPU included (so tests run that path)."""
    if c.dtype == "float32":
        return nullcontext()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    return torch.autocast(device_type="cuda" if c.device.startswith("cuda") else "cpu", dtype=dtype)


def resume_model(c, master):
    """(model, checkpoint) of ckpt_latest.pt (--eval_only: ckpt_best.pt), which fixes the model's
    flags and, for a resumed training, its recipe and mel."""
    path = os.path.join(c.out_dir, "ckpt_best.pt" if c.eval_only else "ckpt_latest.pt")
    model, saved, ckpt = load_checkpoint(path, c.device)

    def set_but_not(names, whose):  # flags given on the command line that differ from the run's
        return [
            f"--{name} {getattr(c, name)} ({whose}: {getattr(saved, name)})"
            for name in names
            if getattr(c, name) not in (getattr(saved, name), getattr(Config, name))
        ]

    ignored = set_but_not(MODEL_FIELDS, "the checkpoint's")
    if ignored and master:
        print(f"{path} fixes the model, so these flags are ignored: {', '.join(ignored)}")
    for name in MODEL_FIELDS:
        setattr(c, name, getattr(saved, name))
    changed = set_but_not(RECIPE_FIELDS, "the run's")
    if changed and not c.eval_only:
        raise UserError(
            f"{path} was trained with another recipe than {', '.join(changed)}: a resumed run goes "
            "on with its own (its log counts tokens and epochs by it): leave these flags out (more "
            "--epochs or --max_iters are fine), or train a new run"
        )
    for name in RECIPE_FIELDS if not c.eval_only else ():
        setattr(c, name, getattr(saved, name))
    # a run trains on with the mel it began with; --eval_only may feed another (the tables' rows)
    if not c.eval_only and c.mel_source != saved.mel_source:
        if master and c.mel_source != Config.mel_source:
            print(f"{path} was trained with --mel_source {saved.mel_source}, so it goes on with it")
        c.mel_source = saved.mel_source
    needed = ("iter",) if c.eval_only else ("iter", "optimizer", "best_val_nll")
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise UserError(
            f"{path} lacks {', '.join(missing)}: it is not a checkpoint that whisper_gpt.py can "
            f"{'evaluate' if c.eval_only else 'resume'}"
        )
    c.data_dir = run_data(c, saved)
    return model, ckpt


def run_data(c, saved):
    """The data folder a resumed or evaluated run reads: its own (the checkpoint's), unless
    --data_dir or a --dataset other than the run's names another (check_data refuses other data)."""
    if c.data_dir:
        return c.data_dir
    if c.dataset not in (saved.dataset, Config.dataset):
        return os.path.join("data", c.dataset)
    c.dataset = saved.dataset
    return own_data(saved)


def own_data(saved):
    """The data folder a run was trained on, by its checkpoint's config."""
    return saved.data_dir or os.path.join("data", saved.dataset)


def stop_if_diverged(c, what, value, step, saved):
    """Stop a run whose loss turned nan or inf before anything of it is logged or saved: one line
    naming the step, the last good checkpoint kept (a resume would only diverge the same way)."""
    if value is None or math.isfinite(value):
        return
    latest = os.path.join(c.out_dir, "ckpt_latest.pt")
    kept = f"{latest}, of step {saved}, is the last good checkpoint and is kept"
    raise UserError(
        f"{what} turned nan or inf at step {step}, so the training stopped; "
        f"{kept if saved is not None else 'no checkpoint was written'}: check the data, or train a "
        "new run with a lower --lr" + (" or --dtype bfloat16" if c.dtype == "float16" else "")
    )


def train(c):
    """Train the run in c.out_dir (with --eval_only: evaluate it), holding the folder's lock all
    along: one writer per run folder (under DDP the first process holds it for all)."""
    check_writable(c.out_dir, "--out_dir")
    with hold_folder(c.out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        rank, local_rank, world = setup_distributed(c)
        model, ckpt, meta, data = open_run(c, rank)
        if c.eval_only:
            return eval_only(model, c, meta, ckpt["iter"], rank, world)
        train_loop(c, model, ckpt, meta, data, rank, local_rank, world)


def open_run(c, rank):
    """What a training and --eval_only share: the seed, the model (resumed, evaluated, or None for
    a new run) with its checkpoint, and the data, checked against the run's. Returns (model, ckpt,
    meta, the data's fingerprint)."""
    torch.manual_seed(c.seed + rank)
    if c.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    latest = os.path.join(c.out_dir, "ckpt_latest.pt")
    if c.init_from == "scratch" and not c.eval_only and os.path.isfile(latest):
        raise UserError(
            f"{c.out_dir} already holds a run: continue it with --init_from resume, or pass "
            "another --out_dir (nothing was overwritten)"
        )
    resumed = c.init_from == "resume" or c.eval_only
    model, ckpt = resume_model(c, rank == 0) if resumed else (None, None)
    if c.mel_source == "decoded" and not c.hybrid:
        raise UserError(
            "--mel_source decoded is the mel fed to the hybrid's mel stack, and a token-only model "
            "has none: add --hybrid, or leave the flag out"
        )
    meta = check_data(c, None if ckpt is None else ckpt.get("data"))
    # in the log and every checkpoint: a run knows its data
    data = data_fingerprint(c.data_dir, meta)
    if c.hybrid and c.mel_source == "decoded":
        load_decoder(c.data_dir)  # a folder without its decoder is one line now, not at a batch
    return model, ckpt, meta, data


def train_loop(c, model, ckpt, meta, data, rank, local_rank, world):
    """The paper's recipe: random crops, Adam, the learning rate halved once; an eval and a
    checkpoint every epoch (or --eval_interval), a progress line every --log_interval steps."""
    master, gpu = rank == 0, c.device.startswith("cuda")
    micro, accum = micro_batches(c, world)  # of the run's own batch, where it is resumed
    epoch_steps = steps_per_epoch(c, meta["n_train"])
    max_iters = c.max_iters or c.epochs * epoch_steps
    if ckpt is not None and ckpt["iter"] >= max_iters:
        raise UserError(
            f"{c.out_dir} is finished (its checkpoint is of step {ckpt['iter']} of {max_iters}): "
            "evaluate it with --eval_only, or train it on with more --epochs or --max_iters"
        )

    # the model and Adam, new or as the checkpoint left them
    if model is None:
        model = WhisperGPT(c).to(c.device)
    raw_model = model  # the plain module: what checkpoints hold, whatever wraps it below
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, fused=gpu)
    # fp16 needs its loss scaled (its range is narrow); bf16 and fp32 do not: the scaler is a no-op
    scaler = torch.amp.GradScaler("cuda" if gpu else "cpu", enabled=c.dtype == "float16")
    start_iter, best_val, elapsed = 0, float("inf"), 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a GPU run's fused Adam resumes on a CPU, and back
            group["fused"], group["foreach"] = gpu, None
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val_nll"]
        elapsed = ckpt.get("elapsed_s", 0.0)
    del ckpt  # free the memory

    # the run's start: one line, and the log's first record
    name, params = model_name(c), raw_model.num_params()
    if master:
        print(
            f"{name}: {params:,} parameters | {meta['n_train']:,} train tokens, {epoch_steps} "
            f"steps/epoch of {c.batch_size} crops, {max_iters} steps | tokenizer "
            f"{meta.get('tokenizer')} | {c.device} {c.dtype} | DDP world {world}, {accum} x "
            f"{micro} crops per process and step"
        )
    start = {"event": "start", "model": name, "params": params, "dataset": c.dataset}
    start |= {"tokenizer": meta.get("tokenizer"), "baselines": meta.get("baselines")}
    start |= {"data": data, "config": dataclasses.asdict(c)}
    if master and c.init_from == "scratch":
        log_event(c.out_dir, start)
    if c.compile:
        model = torch.compile(model)
    eval_model = model  # evaluate() runs the plain or compiled module, never DDP's collectives
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if gpu else None)

    # the loop
    ctx = autocast_context(c)
    eval_every, tokens_per_step = c.eval_interval or epoch_steps, c.batch_size * c.block_size
    train_sum = torch.zeros((), device=c.device)  # summed on the device: no CPU-GPU sync per step
    # the first step whose loss was nan/inf
    first_bad = torch.tensor(max_iters + 1, device=c.device)
    saved = start_iter if c.init_from == "resume" else None  # the step of the last good checkpoint
    train_steps = log_steps = 0
    t0 = time.time() - elapsed  # a resumed run's clock goes on from its checkpoint's
    t_eval = t_log = time.time()
    x, y, mel = get_batch(c, start_iter, rank, world)
    for it in range(start_iter, max_iters + 1):
        lr = get_lr(c, it, epoch_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # evaluate and checkpoint (a resumed run skips its first: its checkpoint logged it)
        if (it % eval_every == 0 or it == max_iters) and not (
            it == start_iter and c.init_from == "resume"
        ):
            if world > 1:  # every process reaches this line at the same steps
                torch.distributed.all_reduce(train_sum)
                torch.distributed.all_reduce(first_bad, torch.distributed.ReduceOp.MIN)
            # a sync: the steps are done
            train_nll = train_sum.item() / world / train_steps if train_steps else None
            tok_s = train_steps * tokens_per_step / (time.time() - t_eval) if train_steps else None
            result = evaluate(eval_model, c, c.eval_windows, rank, world)
            stop_if_diverged(c, "the training loss", train_nll, first_bad.item(), saved)
            stop_if_diverged(c, "the val NLL", result.nll, it, saved)
            saved = it
            if master:
                elapsed = time.time() - t0
                log_eval(c, it, epoch_steps, lr, train_nll, tok_s, result, elapsed, start)
                best_val = min(best_val, result.nll)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
                state |= {"scaler": scaler.state_dict(), "config": dataclasses.asdict(c)}
                state |= {"iter": it, "epoch": it / epoch_steps, "val_nll": result.nll}
                state |= {"best_val_nll": best_val, "elapsed_s": elapsed, "data": data}
                save_checkpoint(os.path.join(c.out_dir, "ckpt_latest.pt"), state)
                if result.nll == best_val:
                    save_checkpoint(os.path.join(c.out_dir, "ckpt_best.pt"), state)
            train_sum.zero_()
            train_steps, t_eval = 0, time.time()
            log_steps, t_log = 0, t_eval  # the eval's time is not a step's
        if it == max_iters:
            break
        # one step: a process's share in micro-batches; DDP averages gradients on the last backward
        for k in range(accum):
            part = slice(k * micro, (k + 1) * micro)
            with model.no_sync() if world > 1 and k < accum - 1 else nullcontext():
                with ctx:
                    _, loss = model(x[part], None if mel is None else mel[part], y[part])
                if k == accum - 1:  # fetch the next batch while the GPU works
                    batch = get_batch(c, it + 1, rank, world)
                scaler.scale(loss / accum).backward()
            nll = loss.detach()  # the token NLL: a self-mel run's loss also holds its mel loss
            if raw_model.mel_head is not None:
                nll = nll - c.mel_weight * raw_model.mel_l1.detach()
            train_sum += nll / accum
            finite = loss.detach().isfinite()
            first_bad = torch.where(finite, first_bad, first_bad.clamp(max=it + 1))  # no sync
        x, y, mel = batch
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        train_steps += 1
        log_steps += 1
        if master and c.log_interval and (it + 1) % c.log_interval == 0:
            dt = (time.time() - t_log) / log_steps  # s/step since the last line or eval
            # one process of several stopping alone would hang the rest: the eval does
            if world == 1:
                stop_if_diverged(c, "the training loss", loss.item(), first_bad.item(), saved)
            print(
                f"step {it + 1:6d}/{max_iters} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{dt * 1000:6.0f} ms/step | {tokens_per_step / dt:9,.0f} tok/s | "
                f"ETA {(max_iters - it - 1) * dt / 60:5.1f} min"
            )
            log_steps, t_log = 0, time.time()
    if world > 1:
        torch.distributed.destroy_process_group()


def eval_only(model, c, meta, step, rank=0, world=1):
    """The paper's table row for the best checkpoint (params, NLL ± SE, accuracy, PPL), beside the
    count baselines. A look at fewer windows is logged as such: the tables only take all of them."""
    result = evaluate(model, c, c.final_windows, rank, world)
    every = len(val_windows(meta["n_val"], c.block_size))
    record = {"event": "eval_only", "params": model.num_params(), "val_nll": result.nll}
    record |= {"val_nll_se": result.se, "val_acc": result.acc, "val_ppl": math.exp(result.nll)}
    record |= {"n_windows": result.windows, "tokens": result.tokens, "iter": step}
    record |= {"window_nll": result.window_nll, "subset": result.windows < every}
    record |= {"mel_source": c.mel_source if c.hybrid else None}
    short = c.prompt_seconds * FRAME_RATE >= c.block_size  # the default's 3 s on a short window
    record |= {"continues": bool(c.prompt_seconds) and not short}  # a continuation row follows
    if rank == 0:
        subset = f" of {every}: a subset, which the tables never take" if record["subset"] else ""
        print(
            f"| model | params | NLL ± SE | accuracy | PPL |   ({result.windows} val windows"
            f"{subset}, {result.tokens:,} tokens, tokenizer {meta.get('tokenizer')}, checkpoint of "
            f"step {step})"
        )
        fed = f" ({c.mel_source} mel)" if c.hybrid else ""
        print(
            f"| {model_name(c)}{fed} | {model.num_params() / 1e6:.2f} M | {result.nll:.3f} "
            f"{plus_minus(result.se)} | {result.acc:.2%} | {math.exp(result.nll):.2f} |"
        )
        refs = meta.get("baselines")
        if refs:
            print(
                "count baselines of this val split (all val tokens, train counts, add-one): "
                f"unigram {refs['unigram_nll']:.3f}, bigram {refs['bigram_nll']:.3f}"
            )
        log_event(c.out_dir, record)
    if short and rank == 0:
        print(f"no continuation row: a window of {c.block_size} tokens is not longer than 3 s")
    elif c.prompt_seconds:
        record["continuation"] = eval_continuation(model, c, every, step, rank, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return record


def eval_continuation(model, c, every, step, rank=0, world=1):
    """The continuation row: each val window's first --prompt_seconds given (its tokens and its
    audio's mel), the rest as generation has it (the true tokens, the mel of continuation_mel):
    the NLL of the true continuation, per window and per bin of seconds after the prompt."""
    prompt = round(c.prompt_seconds * FRAME_RATE)
    result = evaluate(model, c, c.final_windows, rank, world, prompt)
    given, after = continuation_mel(c, model.config.mel_source) if c.hybrid else (None, None)
    record = {"event": "continuation", "prompt_seconds": c.prompt_seconds, "prompt": prompt}
    record |= {"mel_source": model.config.mel_source if c.hybrid else None, "given_mel": given}
    record |= {"continue_mel": after, "val_nll": result.nll, "val_nll_se": result.se}
    record |= {"val_acc": result.acc, "n_windows": result.windows, "tokens": result.tokens}
    record |= {"iter": step, "subset": result.windows < every, "bins": BINS}
    record |= {"bin_nll": result.bin_nll, "window_nll": result.window_nll}
    record |= {"window_bin_nll": result.window_bin_nll}
    if rank == 0:
        fed = f", {given} mel in the prompt, {after} after" if c.hybrid else ""
        print(
            f"continuation of {c.prompt_seconds:g} s prompts ({result.tokens:,} tokens{fed}): "
            f"NLL {result.nll:.3f} {plus_minus(result.se)}, accuracy {result.acc:.2%}"
        )
        cells = [
            f"{a:g}-{b:g} s {fmt(v, '.3f')}"
            for a, b, v in zip(BINS, BINS[1:], result.bin_nll, strict=False)
        ]
        print(f"  by seconds after the prompt: {' | '.join(cells)}")
        log_event(c.out_dir, record)
    return record


# -----------------------------------------------------------------------------
# The command line: a flag per field of Config; a user's mistake is one line (checks.py).
def add_config_flags(parser, names=None):
    """One flag per field of Config (or of those named) but those the data fixes; its comment is
    its --help."""
    field_line = r"^ {4}(\w+): [^\n]*?#\s*(.+)$"
    helps = dict(re.findall(field_line, inspect.getsource(Config), re.MULTILINE))
    for f in dataclasses.fields(Config):
        if f.name in FROM_DATA or names is not None and f.name not in names:
            continue
        boolean = f.type is bool or isinstance(f.default, bool)
        kind = {"action": argparse.BooleanOptionalAction} if boolean else {"type": type(f.default)}
        parser.add_argument(f"--{f.name}", default=f.default, help=helps[f.name], **kind)


def config_from(args):
    """The Config of parsed flags (others, such as bench.py's, left out), its defaults filled in."""
    fields = {f.name for f in dataclasses.fields(Config)}
    c = Config(**{k: v for k, v in vars(args).items() if k in fields})
    if c.init_from == "scratch" and not c.eval_only:  # a resumed or evaluated run: its own data
        c.data_dir = c.data_dir or os.path.join("data", c.dataset)
    c.out_dir = c.out_dir or f"out-{model_name(c).lower()}-{c.dataset}"
    validate(c)
    return c


def parse_args(argv=None):
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=formatter)
    add_config_flags(parser)
    return config_from(parser.parse_args(argv))


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # a redirected log shows each line as it is made
    train(parse_args(argv))


if __name__ == "__main__":
    run_script(main)
    if launched_by_torchrun():
        # all is written and the group destroyed: leave without the interpreter's shutdown, during
        # which gloo's threads, still letting go of the last all_reduce, abort it (1 in 210 runs)
        sys.stdout.flush()
        os._exit(0)
