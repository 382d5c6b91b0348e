"""
Continue a prompt with a trained checkpoint and write what came out: a 24 kHz WAV of prompt +
continuation, the tokens (.npy) and a PNG of the log-mel spectrogram with the prompt boundary drawn.

    python sample.py --out_dir out-hybrid-music --prompt some.wav --seconds 10
    python sample.py --out_dir out-gpt-s-music --num_samples 4 --top_k 100   # prompt: a crop of the
    val split python sample.py --out_dir out-hybrid-music --bench                       # tokens/s
    and realtime factor

The hybrid needs the mel slice of every token it makes, and all it has is the tokens: it is fed
their decoded mel (decoding.Decoder, a token at a time by its stepper), as `whisper_gpt.py
--mel_source decoded` evaluates it. With the real EnCodec weights each new token is decoded to audio
by EnCodec's decoder run incrementally (StreamingDecoder: one token's work per step, and exactly the
audio a decode of the whole output gives), and audio.log_mel reads the slice; --mel_window W instead
decodes the newest W tokens from scratch every step (slower, an approximation). Offline, where
EnCodec's decoder has random weights, the stand-in decoder gives each token its mean mel slice over
the train split and the audio by Griffin-Lim. Every run prints how far the decoded mel (and the
audio's own) is from the prompt's original mel, and every hybrid run how far its slices are from the
whole output decoded at once.
"""

import argparse
import glob
import math
import os
import textwrap
import time

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch

from audio import (
    FRAME_RATE,
    HOP,
    SAMPLE_RATE,
    WIN,
    log_mel,
    normalise_mel,
    to_model_rate,
    unreadable,
)
from checks import (
    Parser,
    UserError,
    check_data,
    check_device,
    check_writable,
    file_kind,
    room_to_write,
    run_script,
)
from decoding import load_decoder, without_onednn
from runlog import write_atomic
from whisper_gpt import continuation_mel, load_checkpoint, open_split, own_data

AUDIO_FORMATS = {
    "wav": "FLOAT",
    "flac": "PCM_16",
    "ogg": "VORBIS",
}  # --audio_format: soundfile's subtype of each


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out_dir",
        required=True,
        help="run folder holding ckpt_best.pt / ckpt_latest.pt (required)",
    )
    p.add_argument(
        "--ckpt",
        choices=("best", "latest"),
        default="best",
        help="which checkpoint of the run (default: %(default)s)",
    )
    p.add_argument(
        "--prompt", default=None, help="audio file to continue (default: a crop of the val split)"
    )
    p.add_argument(
        "--prompt_seconds",
        type=float,
        default=3.0,
        help="seconds of prompt, at most (default: %(default)s)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="seconds of audio to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divides the logits; 0 = always the likeliest token (default: %(default)s)",
    )
    p.add_argument(
        "--top_k",
        type=int,
        default=None,
        help="sample among the k likeliest tokens only (default: all)",
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="sample among the fewest tokens whose probability sums to p (default: all)",
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=1,
        help="samples, generated as one batch (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1337,
        help="sample i draws from a generator seeded seed + i (default: %(default)s)",
    )
    p.add_argument(
        "--mel_window",
        type=int,
        default=0,
        help="hybrid with EnCodec's decoder: 0 = stream it "
        "(exact); W = decode the newest W tokens from scratch each step (an approximation, for "
        "comparison) (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model and the tokenizer run (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )
    p.add_argument("--sample_dir", default=None, help="where to write (default: --out_dir)")
    p.add_argument(
        "--audio_format",
        choices=tuple(AUDIO_FORMATS),
        default="wav",
        help="wav (32-bit float), flac "
        "(16 bit) or ogg (Vorbis: small, lossy) (default: %(default)s)",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="the data folder whose tokenizer (and val split, for the prompt) "
        "to use; it must hold the data the run was trained on (default: the run's own)",
    )
    p.add_argument(
        "--bench",
        action="store_true",
        help="print tokens/s and realtime factor, decoding included (default: off)",
    )
    args = p.parse_args(argv)
    if not all(
        math.isfinite(v)
        for v in (args.seconds, args.prompt_seconds, args.temperature, args.top_p or 1)
    ):
        p.error(
            "--seconds, --prompt_seconds, --temperature and --top_p must be numbers, not nan or inf"
        )
    if args.num_samples < 1:
        p.error(f"--num_samples must be at least 1, got {args.num_samples}")
    # the tokens continue_prompt generates, and the most a prompt may have (read_audio,
    # prompt_from_val)
    for flag, seconds, tokens in (
        ("--seconds", args.seconds, round(args.seconds * FRAME_RATE)),
        ("--prompt_seconds", args.prompt_seconds, int(args.prompt_seconds * FRAME_RATE)),
    ):
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
    """(model, config, data_dir, decoder, meta) from a run folder: the checkpoint names its data,
    and a data_dir given instead must hold the same data (a tokenizer made again would turn the
    prompt into other tokens). decoder: decoding.Decoder of the data's tokenizer (decoder.tokenizer
    is the tokenizer)."""
    # a missing checkpoint, other data, another vocabulary: the same one line as whisper_gpt.py's
    model, config, saved = load_checkpoint(os.path.join(out_dir, f"ckpt_{ckpt}.pt"), device)
    model.eval()
    config.data_dir = data_dir = data_dir or own_data(config)
    config.out_dir, config.eval_only = out_dir, True  # a trained model: check its vocabulary
    meta = check_data(config, saved.get("data"))
    return model, config, data_dir, load_decoder(data_dir, device), meta


def read_audio(path, max_seconds):
    """An audio file -> (S,) float32 mono at 24 kHz, at most max_seconds, S a multiple of HOP."""
    if not os.path.exists(path):
        raise UserError(f"--prompt {path}: no such file")
    kind = file_kind(path)  # before any open: reading a pipe waits for a writer, maybe for ever
    if kind:
        raise UserError(f"--prompt {path} is {kind}, not a file: give a wav, flac, ogg or mp3 file")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # (S, channels)
    except sf.LibsndfileError as e:
        raise UserError(
            f"--prompt {path} is {unreadable(e)}: give a wav, flac, ogg or mp3 file"
        ) from None
    if not np.isfinite(wav).all():  # EnCodec would make token 0 of them, and the mel nan
        raise UserError(
            f"--prompt {path} has {int((~np.isfinite(wav)).sum()):,} non-finite samples (nan or "
            "inf): "
            "give a clean audio file"
        )
    wav = to_model_rate(wav, sr)  # (S,) mono at 24 kHz, whole tokens
    n = min(len(wav), int(max_seconds * SAMPLE_RATE)) // HOP * HOP
    if n == 0:
        raise UserError(
            f"{path}: shorter than one token ({HOP} samples at 24 kHz): give a longer --prompt"
        )
    return wav[:n].contiguous()


def prompt_from_audio(wav, tokenizer, meta, device):
    """tokens (1, T) and normalised mel (1, T, 64) of read_audio's wav (S,), as prepare.py would
    have made them."""
    wav = wav.to(device)[None]  # (1, S)
    tokens = tokenizer.encode(wav)  # (1, T)
    mel = normalise_mel(log_mel(wav), meta)  # (1, T, 64)
    return tokens, mel.float()


def prompt_from_val(data_dir, meta, max_seconds, device):
    """tokens (1, T) and mel (1, T, 64) of a fixed crop of the val split: the middle of the first
    val file long enough (else the longest one): a crop never spans two files, every run gets it."""
    n = int(max_seconds * FRAME_RATE)
    files = [f for f in meta["files"] if f["split"] == "val"]
    if not files:
        raise UserError(f"{data_dir}/meta.json lists no val files: pass --prompt some.wav")
    f = next((f for f in files if f["frames"] >= n), max(files, key=lambda f: f["frames"]))
    n = min(n, f["frames"])
    start = f["offset"] + (f["frames"] - n) // 2
    tokens, mel = open_split(data_dir, "val", meta["n_mels"])
    tokens = torch.from_numpy(tokens[start : start + n].astype(np.int64))[None].to(device)  # (1, T)
    mel = torch.from_numpy(mel[start : start + n].astype(np.float32))[None].to(device)  # (1, T, 64)
    print(
        f"prompt: {n / FRAME_RATE:.2f} s from val file {f['path']} (tokens {start}..{start + n})",
        flush=True,
    )
    return tokens, mel


# -----------------------------------------------------------------------------
# how far the audio follows the tokens


def mel_report(decoder, tokens, mel, n_prompt, audio_out, seed=0):
    """Lines saying how far the audio follows the tokens: the prompt's decoded mel and the written
    audio's own mel against the prompt's original mel (mean |diff|, normalised units) beside random
    tokens' decoded mel, and how much the decoded mel moves from frame to frame in the continuation
    and in the prompt (0 for a drone). tokens (B, T) all of them, mel (B, n_prompt, 64) the prompt's
    original slices, audio_out (B, T * HOP)."""
    decoded = decoder.mel(tokens)  # (B, T, 64)
    g = torch.Generator().manual_seed(seed)
    vocab = decoder.tokenizer.codebook.size(0)
    random = decoder.mel(
        torch.randint(0, vocab, tokens[:, :n_prompt].shape, generator=g).to(tokens.device)
    )
    heard = normalise_mel(log_mel(audio_out[:, : n_prompt * HOP].cpu()), decoder.meta)
    mel = mel.cpu()

    def far(a):
        return (a.cpu() - mel).abs().mean().item()

    def moves(m):
        return (m[:, 1:] - m[:, :-1]).abs().mean().item() if m.size(1) > 1 else float("nan")

    return [
        f"decoder: {decoder.name}",
        f"  the prompt's decoded mel is {far(decoded[:, :n_prompt]):.3f} from its original mel, "
        "the written "
        f"audio's own mel {far(heard):.3f}; random tokens' decoded mel: {far(random):.3f} (mean "
        "|diff|, "
        "normalised units)",
        f"  the decoded mel moves {moves(decoded[:, n_prompt:]):.3f} a frame in the continuation, "
        f"{moves(decoded[:, :n_prompt]):.3f} in the prompt (mean |slice t+1 - slice t|; a drone: "
        "0)",
    ]


# -----------------------------------------------------------------------------
# writing the samples


def write_audio(path, audio):
    """audio (S,) at 24 kHz -> path, in the format its suffix names (wav: float, flac: 16 bit, ogg:
    Vorbis)."""
    suffix = os.path.splitext(path)[1]
    with write_atomic(path, suffix) as tmp:  # soundfile picks the format from the suffix
        sf.write(tmp, audio, SAMPLE_RATE, subtype=AUDIO_FORMATS[suffix[1:]])


def write_npy(path, array):
    with write_atomic(path, ".npy") as tmp:
        np.save(tmp, array)


def write_spectrogram(path, mel, boundary_s, title):
    """mel (T, 64) log-mel, not normalised -> PNG with time in seconds and the prompt boundary
    drawn."""
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    seconds = mel.shape[0] / FRAME_RATE
    im = ax.imshow(
        mel.T, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma"
    )
    ax.axvline(boundary_s, color="cyan", linewidth=1.5, label=f"prompt ends ({boundary_s:.2f} s)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax, label="ln mel power")
    fig.tight_layout()
    with write_atomic(path, ".png") as tmp:
        fig.savefig(tmp)
        plt.close(fig)


def write_samples(sample_dir, idx, audio, n_prompt, title, audio_format="wav"):
    """Per sample i: sample_i.wav (prompt + continuation; or .flac, .ogg), sample_i.npy (all tokens;
    the first n_prompt are the prompt's) and sample_i.png."""
    os.makedirs(sample_dir, exist_ok=True)
    boundary_s = n_prompt / FRAME_RATE
    mels = log_mel(audio).cpu().numpy()  # (B, T, 64)
    for i in range(idx.size(0)):
        stem = os.path.join(sample_dir, f"sample_{i}")
        write_audio(f"{stem}.{audio_format}", audio[i].cpu().numpy())
        write_npy(stem + ".npy", idx[i].cpu().numpy().astype(np.uint16))  # as the memmaps
        write_spectrogram(stem + ".png", mels[i], boundary_s, title)
        print(
            f"sample {i}: {stem}.{audio_format} ({audio.size(1) / SAMPLE_RATE:.2f} s; prompt ends "
            "at "
            f"{boundary_s:.2f} s = token {n_prompt}), {stem}.npy, {stem}.png",
            flush=True,
        )


# -----------------------------------------------------------------------------


def generate(model, decoder, tokens, mel, n_new, args):
    """Continue tokens (B, T) by n_new tokens and decode them to audio. After the prompt the hybrid
    is fed what it was trained to be fed: the decoded mel of each token it makes (the decoder's
    stepper), its own predicted mel (--mel_source self) or no mel (--mel_source prompt: NaN rows),
    as the continuation evaluation feeds it (whisper_gpt.continuation_mel). Returns idx
    (B, T + n_new), audio (B, (T + n_new) * HOP), the mel fed (B, T + n_new - 1, n_mel) or None,
    the decoding.DecoderStepper (None where none is used) and the seconds it all took."""
    c = model.config
    after = continuation_mel(c, c.mel_source)[1] if c.hybrid else None
    # after the prompt: the decoder's slices ('decoded'), NaN rows ('none'), or nothing ('self':
    # the model feeds its own)
    stepper = decoder.stepper(args.mel_window) if after == "decoded" else None
    mel_fn = stepper
    if after == "none":
        mel_fn = lambda idx: torch.full((idx.size(0), c.n_mel), float("nan"), device=idx.device)
    generators = [
        torch.Generator(tokens.device).manual_seed(args.seed + i) for i in range(len(tokens))
    ]
    t0 = time.perf_counter()
    # oneDNN sets each call up (~15 us for the GELU of 256 numbers): at one token a step that
    # costs more than the arithmetic, and the one-token step runs ~10% faster on the plain CPU
    # kernels
    with without_onednn():
        idx, fed = model.generate(
            tokens,
            n_new,
            mel=mel if c.hybrid else None,
            mel_fn=mel_fn,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generators,
            return_mel=True,
        )
    audio = stepper.audio(idx) if stepper else decoder.audio(idx)  # the stream's, or all at once
    return idx, audio, fed, stepper, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.sample_dir or args.out_dir, "--sample_dir")  # before the work, not after it
    # EnCodec's decoder runs many times slower on denormal floats on a CPU. The flag belongs to a
    # thread, and the threads torch makes from now on copy it.
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prompt = (
        read_audio(args.prompt, args.prompt_seconds) if args.prompt else None
    )  # a bad one fails before loading
    model, config, data_dir, decoder, meta = load_run(
        args.out_dir, args.ckpt, args.device, args.data_dir
    )
    run = os.path.basename(os.path.normpath(args.out_dir))
    if decoder.offline:
        print(
            f"note: tokenizer {decoder.tokenizer.name} is the offline stand-in (random-weight "
            "EnCodec), whose own "
            "decoder makes noise whatever the tokens; the audio comes from the offline stand-in "
            "decoder instead "
            "(each token's mean mel slice over the train split, phase by Griffin-Lim): it follows "
            "the tokens, "
            "but it is not EnCodec's sound",
            flush=True,
        )
    if prompt is not None:
        tokens, mel = prompt_from_audio(prompt, decoder.tokenizer, meta, args.device)
        print(f"prompt: {tokens.size(1) / FRAME_RATE:.2f} s of {args.prompt}", flush=True)
    else:
        tokens, mel = prompt_from_val(data_dir, meta, args.prompt_seconds, args.device)
    original = mel
    if (
        config.hybrid and config.mel_source == "decoded"
    ):  # a hybrid trained on decoded mel is fed it from the start
        mel = decoder.mel(tokens)
    B, n_prompt, n_new = args.num_samples, tokens.size(1), round(args.seconds * FRAME_RATE)
    tokens, mel = tokens.expand(B, -1), mel.expand(B, -1, -1)
    idx, audio, _, stepper, seconds = generate(model, decoder, tokens, mel, n_new, args)
    if args.bench:
        print(
            f"bench {run}: {B} x {n_new} tokens in {seconds:.2f} s, audio decoding included, "
            f"{torch.get_num_threads()} threads | {B * n_new / seconds:.1f} tokens/s | realtime "
            "factor "
            f"{B * n_new / FRAME_RATE / seconds:.2f} (above 1 is faster than realtime)",
            flush=True,
        )
    if stepper is not None:
        mean, worst, n = stepper.error_against(decoder.mel(idx))
        how = (
            f"last {args.mel_window} tokens decoded per step"
            if stepper.how == "window"
            else "as generated"
        )
        print(
            f"hybrid mel slices ({how}) against the whole output decoded at once: mean |diff| "
            f"{mean:.2e}, "
            f"max {worst:.2e} (normalised units, {n} generated slices)",
            flush=True,
        )
    print(
        "\n".join(mel_report(decoder, idx, original.expand(B, -1, -1), n_prompt, audio)), flush=True
    )
    title = (
        f"{run}: {n_prompt / FRAME_RATE:.2f} s prompt + {n_new / FRAME_RATE:.2f} s generated "
        f"(tokenizer {decoder.tokenizer.name}; audio: {decoder.name})"
    )
    sample_dir = args.sample_dir or args.out_dir
    need = (
        audio.nbytes + idx.numel() * 2 + B * 200_000
    )  # float32 wav at most, uint16 tokens, a PNG each
    with room_to_write(
        sample_dir,
        need,
        "free some space, or pass another --sample_dir",
        [os.path.join(glob.escape(sample_dir), "sample_*.tmp*")],
    ):
        write_samples(sample_dir, idx, audio, n_prompt, title, args.audio_format)


if __name__ == "__main__":
    run_script(main)
