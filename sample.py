"""
Continue a prompt with a trained checkpoint and write what came out: a 24 kHz WAV of prompt + continuation,
the tokens (.npy) and a PNG of the log-mel spectrogram with the prompt boundary drawn.

    python sample.py --out_dir out-hybrid-music --prompt some.wav --seconds 10
    python sample.py --out_dir out-gpt-s-music --num_samples 4 --top_k 100   # prompt: a crop of the val split
    python sample.py --out_dir out-hybrid-music --bench                       # tokens/s and realtime factor

The hybrid needs the mel slice of every token it makes. They come from the model's own output: each new token
is decoded to audio by the decoder of the tokenizer that made the data, run incrementally (StreamingDecoder:
one token's work per step, and exactly the audio a decode of the whole output gives), and audio.log_mel
reads the slice. --mel_window W instead decodes the newest W tokens from scratch every step: slower, and an
approximation. Every hybrid run prints how far its slices are from those of the whole output decoded at once.
The decoding runs in a process of its own (MelProcess), on one core while the model runs on another: the shift by
2 means a token's own slice is first needed one step later, so the two overlap fully (generate below).
"""
import argparse
import math
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib
matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch

from audio import (FRAME_RATE, HOP, SAMPLE_RATE, WIN, StreamingDecoder, load_tokenizer, log_mel, normalise_mel,
                   read_meta, to_model_rate, without_onednn)
from checks import (Parser, UserError, check_device, check_same_data, check_writable, data_fingerprint,
                    run_script)
from whisper_gpt import load_checkpoint, open_split

WORKER_SILENCE = 300  # seconds without a reply before the mel worker counts as stuck (a slice takes milliseconds)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="run folder holding ckpt_best.pt / ckpt_latest.pt (required)")
    p.add_argument("--ckpt", choices=("best", "latest"), default="best", help="which checkpoint of the run "
                   "(default: %(default)s)")
    p.add_argument("--prompt", default=None, help="audio file to continue (default: a crop of the val split)")
    p.add_argument("--prompt_seconds", type=float, default=3.0, help="seconds of prompt, at most "
                   "(default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of audio to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits; 0 = always the likeliest "
                   "token (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens only "
                   "(default: all)")
    p.add_argument("--top_p", type=float, default=None, help="sample among the fewest tokens whose probability "
                   "sums to p (default: all)")
    p.add_argument("--num_samples", type=int, default=1, help="samples, generated as one batch "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="sample i draws from a generator seeded seed + i "
                   "(default: %(default)s)")
    p.add_argument("--mel_window", type=int, default=0, help="hybrid: 0 = stream the decoder (exact); W = decode "
                   "the newest W tokens from scratch each step (an approximation, for comparison) "
                   "(default: %(default)s)")
    p.add_argument("--mel_worker", choices=("process", "thread"), default="process", help="hybrid: decode for "
                   "the mel slices in a process of its own (on its own core) or in a thread beside the model "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the model and the tokenizer run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's "
                   "choice, less the one the hybrid's mel worker process takes)")
    p.add_argument("--sample_dir", default=None, help="where to write (default: --out_dir)")
    p.add_argument("--data_dir", default=None, help="the data folder whose tokenizer (and val split, for the prompt) "
                   "to use; it must hold the data the run was trained on (default: the run's own)")
    p.add_argument("--bench", action="store_true", help="print tokens/s and realtime factor, decoding included "
                   "(default: off)")
    args = p.parse_args(argv)
    if not all(math.isfinite(v) for v in (args.seconds, args.prompt_seconds, args.temperature, args.top_p or 1)):
        p.error("--seconds, --prompt_seconds, --temperature and --top_p must be numbers, not nan or inf")
    if args.num_samples < 1:
        p.error(f"--num_samples must be at least 1, got {args.num_samples}")
    # the tokens continue_prompt generates, and the most a prompt may have (read_audio, prompt_from_val)
    for flag, seconds, tokens in (("--seconds", args.seconds, round(args.seconds * FRAME_RATE)),
                                  ("--prompt_seconds", args.prompt_seconds, int(args.prompt_seconds * FRAME_RATE))):
        if seconds <= 0:
            p.error(f"{flag} must be positive, got {seconds:g}")
        if tokens < 1:
            p.error(f"{flag} {seconds:g} is shorter than one token (1/{FRAME_RATE} s)")
    if args.mel_window and args.mel_window < WIN // HOP:
        p.error(f"--mel_window must be 0 or at least {WIN // HOP} tokens (one mel window)")
    if args.temperature < 0:
        p.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top_k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    try:
        check_device(args.device)
    except UserError as e:
        p.error(str(e))
    return args


# -----------------------------------------------------------------------------
# the run and the prompt

def load_run(out_dir, ckpt, device, data_dir=None):
    """(model, config, data_dir, tokenizer, meta) from a run folder: the checkpoint names its data, and a data_dir
    given instead must hold the same data (a tokenizer made again would turn the prompt into other tokens)."""
    path = os.path.join(out_dir, f"ckpt_{ckpt}.pt")
    if not os.path.isfile(path):
        other = "latest" if ckpt == "best" else "best"
        has_other = os.path.isfile(os.path.join(out_dir, f"ckpt_{other}.pt"))
        raise UserError(f"no checkpoint at {path}: " + (
            f"the run has ckpt_{other}.pt, so pass --ckpt {other}" if has_other else
            f"train one first (python whisper_gpt.py --out_dir {out_dir}) or pass the --out_dir of a run"))
    model, config, saved = load_checkpoint(path, device)
    model.eval()
    data_dir = data_dir or config.data_dir or os.path.join("data", config.dataset)
    meta = read_meta(data_dir)
    if saved.get("data"):  # the fingerprint of the data it was trained on (runs before it have none)
        check_same_data(saved["data"], data_fingerprint(data_dir, meta), f"the run in {out_dir}")
    if meta.get("vocab_size") != config.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {meta.get('vocab_size')} tokens and the model of {path} "
                        f"reads {config.vocab_size}: not the data the run was trained on; pass its --data_dir")
    tokenizer = load_tokenizer(data_dir, device)
    return model, config, data_dir, tokenizer, meta


def read_audio(path, max_seconds):
    """An audio file -> (S,) float32 mono at 24 kHz, at most max_seconds, S a multiple of HOP."""
    if not os.path.isfile(path):
        raise UserError(f"--prompt {path}: no such file")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # (S, channels)
    except sf.LibsndfileError as e:
        raise UserError(f"--prompt {path} is not audio that soundfile can read "
                        f"({e.error_string.rstrip('.')}): give a wav, flac, ogg or mp3 file") from None
    if not np.isfinite(wav).all():  # EnCodec would make token 0 of them, and the mel nan
        raise UserError(f"--prompt {path} has {int((~np.isfinite(wav)).sum()):,} non-finite samples (nan or inf): "
                        "give a clean audio file")
    wav = to_model_rate(wav, sr)  # (S,) mono at 24 kHz, whole tokens
    n = min(len(wav), int(max_seconds * SAMPLE_RATE)) // HOP * HOP
    if n == 0:
        raise UserError(f"{path}: shorter than one token ({HOP} samples at 24 kHz): give a longer --prompt")
    return wav[:n].contiguous()


def prompt_from_audio(wav, tokenizer, meta, device):
    """tokens (1, T) and normalised mel (1, T, 64) of read_audio's wav (S,), as prepare.py would have made them."""
    wav = wav.to(device)[None]  # (1, S)
    tokens = tokenizer.encode(wav)  # (1, T)
    mel = normalise_mel(log_mel(wav), meta)  # (1, T, 64)
    return tokens, mel.float()


def prompt_from_val(data_dir, meta, max_seconds, device, hybrid):
    """tokens (1, T) and mel (1, T, 64) (None unless hybrid) of a fixed crop of the val split: the middle of
    the first val file long enough (else the longest one): a crop never spans two files, every run gets it."""
    n = int(max_seconds * FRAME_RATE)
    files = [f for f in meta["files"] if f["split"] == "val"]
    if not files:
        raise UserError(f"{data_dir}/meta.json lists no val files: pass --prompt some.wav")
    f = next((f for f in files if f["frames"] >= n), max(files, key=lambda f: f["frames"]))
    n = min(n, f["frames"])
    start = f["offset"] + (f["frames"] - n) // 2
    tokens, mel = open_split(data_dir, "val", meta["n_mels"] if hybrid else 0)
    tokens = torch.from_numpy(tokens[start:start + n].astype(np.int64))[None].to(device)  # (1, T)
    if hybrid:
        mel = torch.from_numpy(mel[start:start + n].astype(np.float32))[None].to(device)  # (1, T, 64)
    print(f"prompt: {n / FRAME_RATE:.2f} s from val file {f['path']} (tokens {start}..{start + n})",
          flush=True)
    return tokens, mel


# -----------------------------------------------------------------------------
# the hybrid's mel slices of its own output

def decoded_mel(tokenizer, meta, tokens):
    """Normalised log-mel (B, T, 64) of the audio the tokenizer decodes tokens (B, T) to: the reference path."""
    return normalise_mel(log_mel(tokenizer.decode(tokens)), meta).float()


class DecodedMel:
    """mel_fn for WhisperGPT.generate: the normalised mel slice of the last token, from the model's own output
    decoded to audio. window=0: exact, with StreamingDecoder fed the new tokens only. window=W: the newest W
    tokens decoded from scratch every step by tokenizer.decode (its context cut to W tokens: an approximation).
    Every slice returned is kept by token index, to be checked against the reference path afterwards."""

    def __init__(self, tokenizer, meta, window=0):
        self.tokenizer, self.meta, self.window = tokenizer, meta, window
        self.slices = {}  # token index -> (B, 64)
        self.stream, self.fed, self.pieces = None, None, []

    def __call__(self, tokens):
        if self.window:
            recent = self.tokenizer.decode(tokens[:, -self.window:])  # (B, W * HOP)
        else:
            self.feed(tokens)
            recent = torch.cat(self.pieces[-WIN // HOP:], dim=1)  # (B, >= WIN) past the start
        # only the last WIN samples enter the last slice: the mel of those alone, its last row
        mel = log_mel(recent[:, -WIN:])  # (B, <= 3, 64)
        last = normalise_mel(mel[:, -1], self.meta).float()  # (B, 64)
        self.slices[tokens.size(1) - 1] = last
        return last

    def feed(self, tokens):
        """Stream the tokens (B, n) not fed yet. Starts afresh when tokens do not extend those fed before."""
        n = 0 if self.fed is None else self.fed.size(1)
        if self.fed is None or tokens.size(1) <= n or not torch.equal(tokens[:, :n], self.fed):
            self.stream, self.pieces, n = StreamingDecoder(self.tokenizer), [], 0
        self.pieces.append(self.stream(tokens[:, n:]))  # (B, (len - n) * HOP)
        self.fed = tokens.clone()

    def audio(self):
        """All the audio streamed so far, (B, n * HOP)."""
        return torch.cat(self.pieces, dim=1)

    def error_against(self, reference):
        """Mean and max |slice returned - reference slice|, and how many slices; reference (B, T, 64) from
        decoded_mel."""
        if not self.slices:
            return float("nan"), float("nan"), 0
        diff = torch.stack([(s - reference[:, t]).abs() for t, s in sorted(self.slices.items())])
        return diff.mean().item(), diff.max().item(), len(self.slices)


def serve_mel(conn, data_dir, meta, window, threads, device):
    """The mel worker process: a DecodedMel of its own, answering ("method", args) requests until None comes."""
    try:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        mel_fn = DecodedMel(load_tokenizer(data_dir, device), meta, window)
        conn.send((True, mel_fn.tokenizer.name))
    except Exception as e:  # the parent raises it: a worker that cannot start must not hang the run
        conn.send((False, f"{type(e).__name__}: {e}"))
        return
    while (request := conn.recv()) is not None:
        method, args = request
        try:
            args = [torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a for a in args]
            result = getattr(mel_fn, method)(*args)
            conn.send((True, result.cpu().numpy() if torch.is_tensor(result) else result))
        except Exception as e:
            conn.send((False, f"{type(e).__name__}: {e}"))


class MelProcess:
    """DecodedMel in a process of its own, so that decoding runs on one core while the model runs on another.
    In a thread the two mostly take turns: both are hundreds of small torch ops a token, and the Python side of
    every op holds the GIL. Same methods and same results as DecodedMel; the worker loads the tokenizer itself
    (load_tokenizer on the run's data folder), so it decodes with the model that made the data."""

    def __init__(self, data_dir, meta, window=0, threads=1, device="cpu"):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: forking a process that has run torch's
        self.conn, child = ctx.Pipe()                # thread pools is unsafe
        self.process = ctx.Process(target=serve_mel, daemon=True,
                                   args=(child, data_dir, meta, window, threads, device))
        self.process.start()
        child.close()
        self.receive()  # the worker is ready (or raises why not)

    def receive(self):
        """The worker's next reply. A dead worker closes the pipe (EOFError); a stuck one is stopped after
        WORKER_SILENCE seconds: either way one error with its cause, never a hang."""
        if not self.conn.poll(WORKER_SILENCE):
            self.process.kill()
            raise RuntimeError(f"the mel worker process sent nothing for {WORKER_SILENCE} s: stopped it")
        try:
            ok, result = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the mel worker process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"mel worker: {result}")
        return torch.from_numpy(result) if isinstance(result, np.ndarray) else result

    def send(self, method, *args):  # tensors travel as numpy arrays: pickling those is ~10x cheaper
        self.conn.send((method, [a.cpu().numpy() if torch.is_tensor(a) else a for a in args]))

    def call(self, method, *args):
        self.send(method, *args)
        return self.receive()

    def __call__(self, tokens):
        return self.call("__call__", tokens)

    def submit(self, tokens):
        """Start the slice of the newest token and return at once; .result() of what comes back waits for it.
        generate uses this instead of a thread: the pipe is the queue, and the model keeps the GIL to itself."""
        self.send("__call__", tokens)
        return self  # one request is in flight at a time, so its answer is the next reply

    def result(self):
        return self.receive()

    def feed(self, tokens):
        return self.call("feed", tokens)

    def audio(self):
        return self.call("audio")

    def error_against(self, reference):
        return self.call("error_against", reference)

    def close(self):
        if self.process.is_alive():
            self.conn.send(None)
        self.process.join(timeout=10)
        self.conn.close()


# -----------------------------------------------------------------------------
# writing the samples

def write_wav(path, audio):
    tmp = path + ".tmp.wav"  # soundfile picks the format from the suffix
    sf.write(tmp, audio, SAMPLE_RATE, subtype="FLOAT")
    os.replace(tmp, path)


def write_npy(path, array):
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_spectrogram(path, mel, boundary_s, title):
    """mel (T, 64) log-mel, not normalised -> PNG with time in seconds and the prompt boundary drawn."""
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    seconds = mel.shape[0] / FRAME_RATE
    im = ax.imshow(mel.T, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
    ax.axvline(boundary_s, color="cyan", linewidth=1.5, label=f"prompt ends ({boundary_s:.2f} s)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax, label="ln mel power")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_samples(sample_dir, idx, audio, n_prompt, title):
    """Per sample i: sample_i.wav (prompt + continuation), sample_i.npy (all tokens; the first n_prompt are
    the prompt's) and sample_i.png."""
    os.makedirs(sample_dir, exist_ok=True)
    boundary_s = n_prompt / FRAME_RATE
    mels = log_mel(audio).cpu().numpy()  # (B, T, 64)
    for i in range(idx.size(0)):
        stem = os.path.join(sample_dir, f"sample_{i}")
        write_wav(stem + ".wav", audio[i].cpu().numpy())
        write_npy(stem + ".npy", idx[i].cpu().numpy().astype(np.uint16))  # as the memmaps
        write_spectrogram(stem + ".png", mels[i], boundary_s, title)
        print(f"sample {i}: {stem}.wav ({audio.size(1) / SAMPLE_RATE:.2f} s; prompt ends at "
              f"{boundary_s:.2f} s = token {n_prompt}), {stem}.npy, {stem}.png", flush=True)


# -----------------------------------------------------------------------------

def generate(model, tokenizer, meta, tokens, mel, n_new, args, mel_fn=None):
    """Continue tokens (B, T) by n_new tokens and decode to audio. Returns idx (B, T + n_new), audio
    (B, (T + n_new) * HOP), the hybrid's mel_fn (None for GPT) and the seconds it all took. The hybrid's
    mel_fn: a DecodedMel in this process unless one (or a MelProcess) is given."""
    hybrid = model.config.hybrid
    if hybrid and mel_fn is None:
        mel_fn = DecodedMel(tokenizer, meta, args.mel_window)
    generators = [torch.Generator(tokens.device).manual_seed(args.seed + i) for i in range(len(tokens))]
    t0 = time.perf_counter()
    # oneDNN sets each call up (~15 us for the GELU of 256 numbers): at one token a step that costs more than the
    # arithmetic, and the one-token step runs ~10% faster on the plain CPU kernels
    with without_onednn(), ThreadPoolExecutor(max_workers=1) as pool:
        # The newest token's slice is first read one step later (the shift by 2), so it is made while the model
        # runs: by the worker process (MelProcess.submit) or else on a thread (started only when first used)
        submit = getattr(mel_fn, "submit", None) or (lambda idx: pool.submit(mel_fn, idx))
        idx = model.generate(tokens, n_new, mel=mel if hybrid else None, mel_fn=submit if hybrid else None,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generators)
    if hybrid and not args.mel_window:
        mel_fn.feed(idx)  # the stream has decoded all but the last token already
        audio = mel_fn.audio()
    else:
        audio = tokenizer.decode(idx)  # (B, S): the whole output at once
    return idx, audio, mel_fn, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.sample_dir or args.out_dir, "--sample_dir")  # before the work, not after it
    # EnCodec's decoder runs many times slower on denormal floats on a CPU. The flag belongs to a thread, and the
    # threads torch makes from now on copy it.
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prompt = read_audio(args.prompt, args.prompt_seconds) if args.prompt else None  # a bad one fails before loading
    model, config, data_dir, tokenizer, meta = load_run(args.out_dir, args.ckpt, args.device, args.data_dir)
    run = os.path.basename(os.path.normpath(args.out_dir))
    mel_fn = None
    if config.hybrid and args.mel_worker == "process":
        mel_fn = MelProcess(data_dir, meta, args.mel_window, threads=1, device=args.device)
        if not args.threads:  # one core is the worker's: more threads than cores stall each other at every op
            torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    try:
        continue_prompt(args, prompt, model, config, data_dir, tokenizer, meta, run, mel_fn)
    finally:
        if mel_fn is not None:
            mel_fn.close()


def continue_prompt(args, prompt, model, config, data_dir, tokenizer, meta, run, mel_fn):
    if tokenizer.offline:
        print(f"note: tokenizer {tokenizer.name} is the offline stand-in (random-weight EnCodec): its decoder "
              "makes noise-like audio, so what you hear is NOT meaningful without the real EnCodec weights.",
              flush=True)
    if prompt is not None:
        tokens, mel = prompt_from_audio(prompt, tokenizer, meta, args.device)
        print(f"prompt: {tokens.size(1) / FRAME_RATE:.2f} s of {args.prompt}", flush=True)
    else:
        tokens, mel = prompt_from_val(data_dir, meta, args.prompt_seconds, args.device, config.hybrid)
    B, n_prompt, n_new = args.num_samples, tokens.size(1), round(args.seconds * FRAME_RATE)
    tokens, mel = tokens.expand(B, -1), None if mel is None else mel.expand(B, -1, -1)
    idx, audio, mel_fn, seconds = generate(model, tokenizer, meta, tokens, mel, n_new, args, mel_fn)
    if args.bench:
        where = f", mel worker: {args.mel_worker}" if config.hybrid else ""
        print(f"bench {run}: {B} x {n_new} tokens in {seconds:.2f} s, audio decoding included, "
              f"{torch.get_num_threads()} model threads{where} | {B * n_new / seconds:.1f} tokens/s | realtime factor "
              f"{B * n_new / FRAME_RATE / seconds:.2f} (above 1 is faster than realtime)", flush=True)
    if mel_fn is not None:
        mean, worst, n = mel_fn.error_against(decoded_mel(tokenizer, meta, idx))
        how = f"last {args.mel_window} tokens decoded per step" if args.mel_window else "streamed decoder"
        print(f"hybrid mel slices ({how}) against the whole output decoded at once: mean |diff| {mean:.2e}, "
              f"max {worst:.2e} (normalised units, {n} generated slices)", flush=True)
    title = (f"{run}: {n_prompt / FRAME_RATE:.2f} s prompt + {n_new / FRAME_RATE:.2f} s generated "
             f"(tokenizer {tokenizer.name})")
    write_samples(args.sample_dir or args.out_dir, idx, audio, n_prompt, title)


if __name__ == "__main__":
    run_script(main)
