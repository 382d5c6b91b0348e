"""
The audio side of whisper-gpt, shared by prepare.py (which makes the data) and sample.py (which
continues a prompt): the constants, the causal log-mel and its normalisation, the tokenizer (EnCodec
24 kHz codebook 0, with the real weights or the named offline stand-in), its weights, the decoder
(tokens back to mel and audio, all at once or a token at a time) and EnCodec's decoder run as a
stream.

Token t of a file covers samples [320t, 320(t+1)); mel slice t is the 960-sample window that ENDS at
sample 320(t+1), so it never hears a sample after the audio its token covers.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from encodec import EncodecModel
from encodec.modules.conv import SConv1d, SConvTranspose1d, pad1d
from encodec.modules.lstm import SLSTM
from encodec.modules.seanet import SEANetResnetBlock

from checks import UserError, first_non_finite, load_torch_file
from runlog import write_atomic

SAMPLE_RATE = 24000  # Hz, EnCodec 24 kHz model
HOP = 320  # samples per token = 75 tokens per second
FRAME_RATE = 75  # tokens per second
WIN = 960  # samples in a mel window = 40 ms
N_MELS = 64  # mel bins per slice
VOCAB = 1024  # codebook 0 of EnCodec 24 kHz
EMB_DIM = 128  # width of the EnCodec latent that codebook 0 quantises
LOG_FLOOR = 1e-10  # mel power floor before the natural log
SILENCE_PEAK = 1e-4  # a file whose peak is below this (-80 dBFS) is silent

SEGMENT = (
    10 * SAMPLE_RATE
)  # samples per encoder row: bounds memory (~0.4 GB) whatever the file length
CONTEXT = (
    SAMPLE_RATE  # samples before a later segment that warm up its encoder state (frames dropped)
)

ENCODEC_CKPT = "encodec_24khz-d7cc33bc.th"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CKPT
ENCODEC_SHA256 = "d7cc33bc"  # prefix of the checkpoint's sha256, as torch.hub checks it
DOWNLOAD_TIMEOUT = 10  # seconds without a byte before a download gives up
ENCODEC_NAME = "encodec_24khz"
OFFLINE_NAME = "offline-random-encodec-kmeans"
TOKENIZER_FILE = "tokenizer.pt"
KMEANS_ITERS = 20  # Lloyd iterations of the offline codebook's fit
DECODE_HOLD = (
    16  # tokens: EnCodec's decoder starts on the first token held this long (Tokenizer.decode)
)
OFFLINE_DTYPE = (
    torch.float64
)  # the offline tokenizer's arithmetic, and its latents rounded to LATENT_ROUNDING:
LATENT_ROUNDING = torch.bfloat16  # the same tokens on every kind of CPU (NOTES.md)


# -----------------------------------------------------------------------------
# loading, and the mel


def to_model_rate(audio: np.ndarray, rate: int) -> torch.Tensor:
    """audio (S, channels) at any rate -> (S',) float64 mono at 24 kHz, trimmed to a multiple of
    HOP. In float64 (as log_mel and the offline tokenizer), so that a CPU's vector width changes no
    bit that is kept."""
    wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float64)).mean(1)
    if rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, rate, SAMPLE_RATE)
    return wav[: len(wav) - len(wav) % HOP]


def unreadable(error) -> str:
    """Why soundfile cannot read a regular file, from its LibsndfileError: libsndfile's own reason,
    but for the one its mp3 reader gives a file with no MPEG frames in it (a text file named .mp3,
    say): "not a regular file (possibly a pipe?)", which the callers have already ruled out."""
    reason = error.error_string.rstrip(".")
    if "possibly a pipe" in reason:
        reason = "no wav, flac, ogg or mp3 audio in it"
    return f"not audio that soundfile can read ({reason})"


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """Causal 64-bin log-mel, one slice per token: wav (..., S) float at 24 kHz, S a multiple of HOP
    -> (..., S // HOP, N_MELS) float32, natural log, not normalised; computed in float64.

    Slice t is the power spectrum of the 960-sample periodic Hann window that ENDS at sample
    320(t+1) (the wav is left-padded with 640 zeros and framed with hop 320, never centred), mapped
    to 64 Slaney mel bands over 0-12 kHz and logged with a floor of 1e-10. No per-clip statistics: a
    slice depends on its own window only.
    """
    if wav.shape[-1] % HOP:
        raise ValueError(f"log_mel needs a multiple of {HOP} samples, got {wav.shape[-1]}")
    wav = wav.double()
    window, fbank = mel_basis(wav.device)
    frames = F.pad(wav, (WIN - HOP, 0)).unfold(-1, WIN, HOP)  # (..., T, WIN)
    power = torch.fft.rfft(frames * window).abs().pow(2)  # (..., T, WIN//2+1)
    return torch.log(torch.clamp(power @ fbank, min=LOG_FLOOR)).float()


@functools.cache
def mel_basis(device):
    """The periodic Hann window (WIN,) and the Slaney mel filterbank (WIN//2+1, N_MELS), float64,
    made once per device: sample.py calls log_mel once per generated token."""
    return torch.hann_window(WIN, dtype=torch.float64, device=device), torch.from_numpy(
        slaney_fbank()
    ).to(device)


def slaney_fbank(n_freqs=WIN // 2 + 1, n_mels=N_MELS, rate=SAMPLE_RATE) -> np.ndarray:
    """torchaudio's melscale_fbanks(n_freqs, 0, rate / 2, n_mels, rate, norm="slaney",
    mel_scale="slaney"), in float64 with the band edges from Python's own log and exp (torchaudio's
    float32 filterbank moves by 1e-6 with the CPU's vector width): triangles between n_mels + 2
    points evenly spaced in Slaney mels over 0 to rate / 2, each scaled to unit area -> (n_freqs,
    n_mels)."""
    step, knee = math.log(6.4) / 27, 1000.0  # Slaney: linear below 1 kHz, log above
    to_mel = lambda hz: hz / (200 / 3) if hz < knee else 15 + math.log(hz / knee) / step
    to_hz = lambda mel: mel * (200 / 3) if mel < 15 else knee * math.exp(step * (mel - 15))
    top = to_mel(rate / 2)
    edges = np.array([to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)])  # (n_mels + 2,) Hz
    freqs = np.arange(n_freqs) * (rate // 2) / (n_freqs - 1)  # (n_freqs,) Hz
    slopes = edges[None, :] - freqs[:, None]
    widths = np.diff(edges)
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def normalise_mel(mel: torch.Tensor, meta: dict) -> torch.Tensor:
    """(mel - train mean) / train std, per bin, with the statistics stored in meta.json."""
    mean = torch.tensor(meta["mel_mean"], dtype=mel.dtype, device=mel.device)
    std = torch.tensor(meta["mel_std"], dtype=mel.dtype, device=mel.device)
    return (mel - mean) / std


def check_vocabulary(meta: dict, path):
    """Refuse a meta.json (at path) of one of prepare.py's tokenizers whose vocabulary is not the
    tokenizer's VOCAB (EnCodec's codebook 0, or the offline k-means codebook of its size): edited or
    damaged, it would give a model the wrong width for the tokens."""
    if meta.get("tokenizer") in (ENCODEC_NAME, OFFLINE_NAME) and meta.get("vocab_size") != VOCAB:
        raise UserError(
            f"{path} says vocab_size {meta.get('vocab_size')}, but its tokenizer "
            f"{meta['tokenizer']} has {VOCAB} tokens: the file was edited or is damaged; make the "
            "data again with python prepare.py --overwrite"
        )


def read_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: make it with `python prepare.py` (an unfinished run has none)"
        )
    return json.loads(path.read_text())


# -----------------------------------------------------------------------------
# the tokenizer: EnCodec 24 kHz encoder + codebook 0, real weights or the offline stand-in


def nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """x (..., D), codebook (K, D) -> (...) int64 index of the nearest row, with the distance
    written exactly as EnCodec's quantizer writes it (so the codes equal its codes[:, 0]), chunked
    to keep memory at chunk x K."""
    flat = x.reshape(-1, x.shape[-1]).to(codebook.dtype)  # (N, D)
    embed = codebook.t()  # (D, K)
    out = torch.empty(len(flat), dtype=torch.long, device=x.device)
    for i in range(0, len(flat), chunk):
        xi = flat[i : i + chunk]
        dist = -(
            xi.pow(2).sum(1, keepdim=True) - 2 * xi @ embed + embed.pow(2).sum(0, keepdim=True)
        )  # (chunk, K)
        out[i : i + chunk] = dist.max(-1).indices
    return out.reshape(x.shape[:-1])


@contextlib.contextmanager
def fast_cpu(device="cpu"):
    """How EnCodec runs fast on a CPU (nothing changes on a GPU):
    - one torch thread: torch's threads meet at each of the LSTM's 1,500 small steps per 10 s of
      audio and stall there whenever another process holds a core (30x slower, seen here); worker
      processes give the parallelism;
    - denormal floats flushed to zero (left on afterwards) in the calling thread, whose flag it is:
      the LSTM state decays into them, 16x slower."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def embed(encoder, wavs: list, batch_size: int = 1) -> list:
    """EnCodec encoder latents: wavs, a list of (S_i,) float tensors at 24 kHz with S_i % HOP == 0
    -> a list of (S_i // HOP, EMB_DIM) tensors on the CPU, in the encoder's dtype.

    An encoder in OFFLINE_DTYPE (the offline tokenizer's) has its latents rounded to
    LATENT_ROUNDING's 8 significant bits: float64's last-bit differences between CPUs (about 1e-14
    here) then reach no kept bit, and latents that differ only by them (a silence's, say) become
    equal, so no near-tie decides a k-means step.

    Each file is cut into rows of at most SEGMENT samples; a row after the first also gets the
    CONTEXT samples before it, whose frames are dropped, so its encoder state starts warm. That
    bounds memory for any file length and lets rows of many files share an encoder call. Rows are
    sorted by length and right-padded to the longest in their batch: the encoder is causal, so
    padding changes no frame before it.
    """
    device = next(encoder.parameters()).device
    with fast_cpu(device):
        return embed_rows(encoder, wavs, batch_size, device)


def embed_rows(encoder, wavs: list, batch_size: int, device) -> list:
    rows = []  # (file, segment, first sample, end, context)
    for i, wav in enumerate(wavs):
        for k, start in enumerate(range(0, len(wav), SEGMENT)):
            context = min(start, CONTEXT)
            rows.append((i, k, start - context, min(start + SEGMENT, len(wav)), context))
    rows.sort(key=lambda row: row[3] - row[2])
    parts = [[None] * -(-len(wav) // SEGMENT) for wav in wavs]
    dtype = next(encoder.parameters()).dtype
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        x = torch.zeros(
            len(batch), 1, max(end - lo for _, _, lo, end, _ in batch), dtype=dtype
        )  # (rows, 1, samples)
        for j, (i, _, lo, end, _) in enumerate(batch):
            x[j, 0, : end - lo] = wavs[i][lo:end]
        emb = encoder(x.to(device)).transpose(1, 2).cpu()  # (rows, frames, EMB_DIM)
        if dtype == OFFLINE_DTYPE:
            emb = emb.to(LATENT_ROUNDING).to(dtype)
        for j, (i, k, lo, end, context) in enumerate(batch):
            parts[i][k] = emb[j, context // HOP : (end - lo) // HOP]
    return [torch.cat(p) for p in parts]


class Tokenizer:
    """Audio <-> codebook-0 tokens. `model` is an EncodecModel (its quantizer is unused); `codebook`
    (VOCAB, EMB_DIM) is the real model's first codebook, or, for the offline tokenizer, a k-means
    fit (None until fitted)."""

    def __init__(self, model, codebook, name, offline, weights, seed=None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.codebook = codebook
        self.name, self.offline, self.weights, self.seed = name, offline, weights, seed

    def embed_many(self, wavs: list, batch_size: int = 1) -> list:
        return embed(self.model.encoder, wavs, batch_size)

    def quantise(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (..., T, EMB_DIM) -> (..., T) int64 tokens in [0, VOCAB)."""
        return nearest(emb.to(self.codebook.device), self.codebook).cpu()

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, S) float at 24 kHz, S % HOP == 0 -> (B, S // HOP) int64 tokens in [0, VOCAB)."""
        return torch.stack([self.quantise(e) for e in self.embed_many(list(wav))]).to(wav.device)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> (B, T * HOP) float32 audio at 24 kHz, from codebook 0 alone (so
        coarse; and noise for the offline tokenizer, whose decoder is random). Causal: sample t
        hears tokens <= t // HOP only. EnCodec's convs reflect-pad the start of what they decode, so
        its first frames would hear up to 6 tokens ahead; the decoder starts instead on the first
        token held for DECODE_HOLD tokens, whose audio is dropped."""
        held = hold_first(tokens)
        emb = self.codebook[held.to(self.codebook.device)].transpose(1, 2)  # (B, EMB_DIM, HOLD + T)
        torch.set_flush_denormal(
            True
        )  # for this thread (the decoder has an LSTM too); thread count: the caller's
        dtype = next(self.model.decoder.parameters()).dtype
        return self.model.decoder(emb.to(self.device, dtype))[
            :, 0, DECODE_HOLD * HOP : held.shape[1] * HOP
        ].float()

    def fingerprint(self) -> str:
        """A hash of everything that decides the tokens: shards made by another tokenizer are not
        reused."""
        h = hashlib.sha1(self.name.encode())
        for tensor in [self.codebook, *self.model.encoder.state_dict().values()]:
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path):
        """Everything load_tokenizer needs to rebuild the offline tokenizer exactly (weights kept as
        well as the seed, since torch's random streams may change between versions)."""
        state = {
            "name": self.name,
            "seed": self.seed,
            "codebook": self.codebook.cpu(),  # weights: float32 values
            **{
                part: {k: v.float() for k, v in getattr(self.model, part).state_dict().items()}
                for part in ("encoder", "decoder")
            },
        }
        # a file of ours, closed on error: a full disk's room is free again
        with write_atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)


def hold_first(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> (B, DECODE_HOLD + T): the first token held before them, where a decode
    starts."""
    return torch.cat([tokens[:, :1].expand(-1, DECODE_HOLD), tokens], 1)


def encodec_skeleton() -> EncodecModel:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*")
        return EncodecModel.encodec_model_24khz(pretrained=False)


def encodec_weights(ckpt=None) -> tuple:
    """The pretrained EnCodec 24 kHz state dict and where it came from: `ckpt` (a file or a folder
    holding it), else the torch hub cache, else a download into that cache. Raises UserError saying
    what failed."""
    if ckpt:
        path = Path(ckpt) / ENCODEC_CKPT if Path(ckpt).is_dir() else Path(ckpt)
        if not path.is_file():
            raise UserError(f"--encodec_ckpt {ckpt}: no such file")
        return load_torch_file(path), str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ENCODEC_CKPT
    if not cached.is_file():
        try:
            download(ENCODEC_URL, cached)
        except OSError as e:
            raise UserError(
                f"not in the torch hub cache ({cached}) and the download failed ({e})"
            ) from e
    with open(cached, "rb") as f:
        if not hashlib.file_digest(f, "sha256").hexdigest().startswith(ENCODEC_SHA256):
            raise UserError(f"{cached} is corrupt (sha256 mismatch): delete it")
    return load_torch_file(cached), str(cached)


def encodec_tokenizer(ckpt=None, device="cpu") -> Tokenizer:
    state, where = encodec_weights(ckpt)
    model = encodec_skeleton()
    model.load_state_dict(state)
    codebook = model.quantizer.vq.layers[0]._codebook.embed.detach().clone()  # (VOCAB, EMB_DIM)
    return Tokenizer(model.to(device), codebook.to(device), ENCODEC_NAME, False, where)


def offline_tokenizer(seed, device="cpu", saved=None) -> Tokenizer:
    """EnCodec 24 kHz with random weights drawn from `seed` (or restored from a saved state), run in
    float64; its codebook is fitted later by fit_codebook, unless restored too."""
    model = random_weights(encodec_skeleton(), seed).to(OFFLINE_DTYPE)
    codebook = None
    if saved is not None:
        model.encoder.load_state_dict(saved["encoder"])
        model.decoder.load_state_dict(saved["decoder"])
        codebook = saved["codebook"].to(device, OFFLINE_DTYPE)
    return Tokenizer(model.to(device), codebook, OFFLINE_NAME, True, f"random, seed {seed}", seed)


def random_weights(model: EncodecModel, seed: int) -> EncodecModel:
    """Fill the encoder's and decoder's parameters, in order, from numpy's generator seeded with
    `seed`, with the bounds of torch's default init: U(+-1/sqrt(fan_in)) for a convolution's weight
    and bias (its weight norm g then being the norm of v, as weight_norm sets it),
    U(+-1/sqrt(hidden)) for the LSTMs. torch's own init rounds differently with the CPU's vector
    width; numpy's float64 stream is the same bits everywhere."""
    rng = np.random.default_rng(seed)

    def uniform(shape, bound):
        return torch.from_numpy(rng.uniform(-bound, bound, tuple(shape)).astype(np.float32))

    with torch.no_grad():
        for part in (model.encoder, model.decoder):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                    fan_in = nn.init._calculate_fan_in_and_fan_out(module.weight_v)[0]
                    v = uniform(module.weight_v.shape, 1 / np.sqrt(fan_in))
                    g = np.sqrt(
                        (v.double().numpy() ** 2).sum(axis=tuple(range(1, v.dim())), keepdims=True)
                    )
                    module.weight_v.copy_(v)
                    module.weight_g.copy_(torch.from_numpy(g.astype(np.float32)))
                    module.bias.copy_(uniform(module.bias.shape, 1 / np.sqrt(fan_in)))
                elif isinstance(module, nn.LSTM):
                    for p in module.parameters():
                        p.copy_(uniform(p.shape, 1 / np.sqrt(module.hidden_size)))
    return model


def fit_codebook(emb: torch.Tensor, seed: int) -> torch.Tensor:
    """The offline tokenizer's codebook: Lloyd k-means of emb (N, EMB_DIM) into (VOCAB, EMB_DIM),
    distances by matrix product (EnCodec's own kmeans builds an N x VOCAB x EMB_DIM tensor: 26 GB
    for 50,000 points). Starts from VOCAB random points (repeats when N < VOCAB); an empty cluster
    is re-seeded with a random point. In emb's dtype (float64 offline)."""
    g = torch.Generator().manual_seed(seed)
    n = len(emb)
    start = (
        torch.randperm(n, generator=g)[:VOCAB]
        if n >= VOCAB
        else torch.randint(n, (VOCAB,), generator=g)
    )
    centroids = emb[start]
    for _ in range(KMEANS_ITERS):
        assign = nearest(emb, centroids)  # (N,)
        counts = torch.bincount(assign, minlength=VOCAB)[:, None]  # (VOCAB, 1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, emb)
        reseed = emb[torch.randint(n, (VOCAB,), generator=g)]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), reseed)
    return centroids


def load_tokenizer(data_dir, device="cpu") -> Tokenizer:
    """Rebuild the tokenizer that made data_dir: the offline one from its tokenizer.pt, the real one
    from the weights it was made with (or the hub cache / a download when that path is gone)."""
    meta = read_meta(data_dir)
    if meta["tokenizer_offline"]:
        if not (Path(data_dir) / TOKENIZER_FILE).is_file():
            raise UserError(
                f"{Path(data_dir) / TOKENIZER_FILE} not found: the offline tokenizer that made "
                f"{data_dir} is gone; make the data again with `python prepare.py`"
            )
        saved = load_torch_file(Path(data_dir) / TOKENIZER_FILE)
        return offline_tokenizer(saved["seed"], device, saved)
    ckpt = meta.get("tokenizer_weights")
    try:
        return encodec_tokenizer(ckpt if ckpt and Path(ckpt).is_file() else None, device)
    except UserError as e:
        raise UserError(weights_help(str(e))) from e


def weights_help(reason: str) -> str:
    return (
        f"pretrained EnCodec 24 kHz weights unavailable: {reason}. Supply them one of three ways: "
        f"(1) run with internet access once (they download from {ENCODEC_URL}); (2) copy "
        f"{ENCODEC_CKPT} into {Path(torch.hub.get_dir()) / 'checkpoints'}/; (3) pass "
        "--encodec_ckpt PATH (the file, or its folder)."
    )


# -----------------------------------------------------------------------------
# decoding: from tokens alone, the mel the hybrid is fed while it generates and the audio a person
# hears

DECODER_FILE = (
    "token_mel.npy"  # the offline decoder's table, beside tokenizer.pt: (VOCAB, N_MELS) float32
)
GRIFFIN_LIM_ITERS = 64  # phase-recovery iterations of the offline decoder's audio


def fit_token_mel(
    tokens: np.ndarray, mel: np.ndarray, vocab: int = VOCAB, chunk: int = 1 << 18
) -> np.ndarray:
    """The offline decoder's table: each token's mean normalised mel slice, tokens (N,) with their
    slices mel (N, n_mel), summed in float64 a chunk at a time -> (vocab, n_mel) float32. The mean
    is the least-squares estimate of a slice from its token alone; a token the split never has gets
    the mean of all slices."""
    sums, counts = (
        torch.zeros(vocab, mel.shape[1], dtype=torch.float64),
        torch.zeros(vocab, dtype=torch.float64),
    )
    for i in range(0, len(tokens), chunk):
        t = torch.from_numpy(tokens[i : i + chunk].astype(np.int64))
        sums.index_add_(0, t, torch.from_numpy(mel[i : i + chunk].astype(np.float64)))
        counts += torch.bincount(t, minlength=vocab).double()
    overall = sums.sum(0) / counts.sum()
    return (
        torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)
        .float()
        .numpy()
    )


def save_token_mel(data_dir, meta=None) -> Path:
    """Fit the offline decoder's table on data_dir's train split and write it (atomically) beside
    the tokenizer."""
    meta = meta or read_meta(data_dir)
    tokens = np.memmap(Path(data_dir) / "train_tokens.bin", np.uint16, "r")
    mel = np.memmap(Path(data_dir) / "train_mel.bin", np.float16, "r").reshape(-1, meta["n_mels"])
    path = Path(data_dir) / DECODER_FILE
    bad = first_non_finite(Path(data_dir) / "train_mel.bin", meta["n_mels"])
    if bad is not None:  # its tokens' rows of the table would be nan
        raise UserError(
            f"{Path(data_dir) / 'train_mel.bin'} holds a nan or inf in row {bad:,}: the file is "
            f"damaged; make {data_dir} again with python prepare.py --overwrite"
        )
    with write_atomic(path, ".npy") as tmp:
        np.save(tmp, fit_token_mel(tokens, mel, meta["vocab_size"]))
    return path


class Decoder:
    """Tokens (B, T) -> their decoded mel (B, T, n_mel), normalised, and their audio (B, T * HOP):
    the one meaning of "decoded mel" in the project, the mel the hybrid can have of tokens while it
    generates them. stepper() gives the same mel and audio a token at a time, as generation makes
    the tokens.
    - The real EnCodec: its decoder on codebook 0, and the causal log-mel of that audio (slice t
      hears tokens <= t).
    - Offline, EnCodec's decoder has random weights: its audio is noise whatever the tokens. So the
      stand-in decoder maps each token to its mean mel slice over the train split (DECODER_FILE,
      made by prepare.py), and the audio comes from that mel by torchaudio's InverseMelScale +
      GriffinLim. Slice t is token t's alone."""

    def __init__(self, tokenizer, meta, table=None):
        self.tokenizer, self.meta = tokenizer, meta
        # (VOCAB, n_mel)
        self.table = None if table is None else torch.as_tensor(table, dtype=torch.float32)
        self.name = (
            "per-token mean mel + Griffin-Lim (offline stand-in for EnCodec's decoder)"
            if self.offline
            else f"{tokenizer.name} decoder (codebook 0)"
            + (", random weights" if tokenizer.offline else "")
        )

    @property
    def offline(self) -> bool:
        """Whether this is the offline stand-in decoder (the table), not EnCodec's decoder network
        (whose weights are random for the offline tokenizer: a Decoder of it made without the table
        is that network)."""
        return self.table is not None

    def mel(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> (B, T, n_mel) float32 normalised decoded mel, on the tokens'
        device."""
        if self.offline:
            return self.table.to(tokens.device)[tokens]
        return (
            normalise_mel(log_mel(self.tokenizer.decode(tokens)), self.meta)
            .float()
            .to(tokens.device)
        )

    def audio(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> (B, T * HOP) float32 audio at 24 kHz."""
        if self.offline:
            return mel_to_audio(self.mel(tokens.cpu()), self.meta).to(tokens.device)
        return self.tokenizer.decode(tokens)

    def stepper(self, window: int = 0) -> "DecoderStepper":
        """The decoded mel of tokens that grow by one a call (WhisperGPT.generate's mel_fn), and
        their audio at the end; window: see DecoderStepper."""
        return DecoderStepper(self, window)


def mel_to_audio(
    mel: torch.Tensor, meta: dict, n_iter: int = GRIFFIN_LIM_ITERS, seed: int = 0
) -> torch.Tensor:
    """Normalised log-mel (B, T, n_mel) -> audio (B, T * HOP) whose causal log-mel approximates it:
    the mel power back to a linear power spectrum (InverseMelScale: least squares over the Slaney
    filterbank, negatives to 0), then Griffin-Lim's phase (seeded: the same mel gives the same
    audio), shifted by half a hop so that frame t of its centred STFT lands on causal slice t (whose
    window ends at sample 320(t+1))."""
    std, mean = (torch.tensor(meta[k], dtype=torch.float32) for k in ("mel_std", "mel_mean"))
    power = torch.exp(mel.float() * std + mean).transpose(1, 2)  # (B, n_mel, T): mel power
    power = torch.cat([power, power[..., -1:]], dim=-1)  # (B, n_mel, T + 1): see below
    inverse = torchaudio.transforms.InverseMelScale(
        WIN // 2 + 1,
        mel.size(-1),
        SAMPLE_RATE,
        0.0,
        SAMPLE_RATE / 2,
        norm="slaney",
        mel_scale="slaney",
        driver="gelsd",
    )
    # a centred frame t is centred on sample 320t, causal slice t on 320t - 160: drop the first 160
    # samples, so T * HOP samples out take T * HOP + 160 in, T + 1 centred frames (the last slice
    # repeated)
    shift, n = WIN // 2 - HOP // 2 - HOP // 2, mel.size(1) * HOP  # 160 samples; the output length
    griffin_lim = torchaudio.transforms.GriffinLim(
        WIN, n_iter, hop_length=HOP, power=2.0, length=n + shift
    )
    rows = []
    for row in (
        power
    ):  # one row at a time, its random initial phase from the seed: the same audio in any batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rows.append(griffin_lim(inverse(row[None])))  # (1, n + shift)
    return torch.cat(rows)[:, shift:].contiguous()


@functools.cache
def load_decoder(data_dir, device="cpu") -> Decoder:
    """The decoder of the tokenizer that made data_dir, loaded once per process: the offline one
    reads its table, and a folder made before there was one gets one line saying how to add it."""
    meta = read_meta(data_dir)
    tokenizer = load_tokenizer(data_dir, device)
    if not tokenizer.offline:
        return Decoder(tokenizer, meta)
    return Decoder(tokenizer, meta, read_token_mel(data_dir, meta))


def read_token_mel(data_dir, meta) -> np.ndarray:
    """The offline decoder's table of data_dir (VOCAB, n_mel) float32, whole and finite, or one line
    saying to run prepare.py again: it makes the table again (or for the first time, in data made
    before there was one) in seconds, from the train split, and keeps the data."""
    path, again = (
        Path(data_dir) / DECODER_FILE,
        (
            f"run the prepare.py command that made it once more (e.g. python "
            f"prepare.py --dataset {Path(data_dir).name}): it makes the "
            "decoder again in seconds and keeps the data"
        ),
    )
    if not path.is_file():
        raise UserError(
            f"{data_dir} has no offline decoder ({DECODER_FILE}; data made before there was one): "
            f"{again}"
        )
    try:
        table = np.load(path, allow_pickle=False)
    except (
        ValueError,
        OSError,
        EOFError,
    ) as e:  # cut short, or not a .npy: numpy's first sentence says which
        raise UserError(f"{path} is damaged ({str(e).split('. ')[0][:120]}): {again}") from None
    if table.shape != (meta["vocab_size"], meta["n_mels"]) or table.dtype != np.float32:
        raise UserError(
            f"{path} is damaged (a {table.dtype} table of shape {table.shape}, not float32 "
            f"({meta['vocab_size']}, {meta['n_mels']})): {again}"
        )
    bad = ~np.isfinite(table).all(1)
    if bad.any():
        raise UserError(
            f"{path} is damaged (a nan or inf in row {int(bad.argmax())}, the mel of that token): "
            f"{again}"
        )
    return table


class DecodedSplit:
    """A split's decoded mel, indexed as its mel memmap is: rows [i:j] are the decoded mel of tokens
    [i:j] alone (EnCodec's decoder starts at token i, as generation's does at its prompt), (j - i,
    n_mel) float32."""

    def __init__(self, tokens: np.ndarray, decoder: Decoder):
        self.tokens, self.decoder = tokens, decoder

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, rows: slice) -> np.ndarray:
        tokens = torch.from_numpy(self.tokens[rows].astype(np.int64))[None]  # (1, j - i)
        return self.decoder.mel(tokens)[0].numpy()


class DecoderStepper:
    """A Decoder fed tokens that grow by one a call, as WhisperGPT.generate makes them: each call
    returns the newest token's decoded slice, as Decoder.mel of all the tokens gives it, and audio()
    the audio of all of them. How a token becomes its slice is chosen once, here (`how`):
    - "table": the offline decoder: a slice is its token's row of the table alone (window unused);
    - "stream": EnCodec's decoder, window 0: StreamingDecoder fed the new tokens only (exact; its
      audio is the output's);
    - "window": EnCodec's decoder, window W: the newest W tokens decoded from scratch every step
      (its context cut to W tokens: an approximation), the audio decoded at once at the end.
    Every slice returned is kept by token index, to be checked against the whole output decoded at
    once."""

    def __init__(self, decoder: Decoder, window: int = 0):
        self.decoder, self.window = decoder, window
        self.how = "table" if decoder.offline else "window" if window else "stream"
        self.slices = {}  # token index -> (B, n_mel)
        self.stream, self.fed, self.pieces = None, None, []

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), those of the call before and one more -> the newest token's slice
        (B, n_mel)."""
        if self.how == "table":
            last = self.decoder.mel(tokens[:, -1:])[:, 0]  # (B, n_mel)
        else:
            # only the last WIN samples enter the last slice: the mel of those alone, its last row
            mel = log_mel(self.recent_audio(tokens)[:, -WIN:])  # (B, <= 3, n_mel)
            last = normalise_mel(mel[:, -1], self.decoder.meta).float()  # (B, n_mel)
        self.slices[tokens.size(1) - 1] = last
        return last

    def recent_audio(self, tokens: torch.Tensor) -> torch.Tensor:
        """The newest tokens' audio (B, >= WIN samples past the start), EnCodec's decoder's."""
        if self.how == "window":
            return self.decoder.tokenizer.decode(tokens[:, -self.window :])  # (B, W * HOP)
        self.feed(tokens)
        return torch.cat(self.pieces[-WIN // HOP :], dim=1)

    def feed(self, tokens: torch.Tensor):
        """Stream the tokens (B, n) not fed yet. Starts afresh when tokens do not extend those fed
        before."""
        n = 0 if self.fed is None else self.fed.size(1)
        if self.fed is None or tokens.size(1) <= n or not torch.equal(tokens[:, :n], self.fed):
            self.stream, self.pieces, n = StreamingDecoder(self.decoder.tokenizer), [], 0
        self.pieces.append(self.stream(tokens[:, n:]))  # (B, (len - n) * HOP)
        self.fed = tokens.clone()

    def audio(self, tokens: torch.Tensor) -> torch.Tensor:
        """The audio (B, T * HOP) of all the tokens (B, T): the stream's, fed the rest first; else
        Decoder.audio's."""
        if self.how != "stream":
            return self.decoder.audio(tokens)
        self.feed(tokens)
        return torch.cat(self.pieces, dim=1)

    def error_against(self, reference: torch.Tensor) -> tuple:
        """Mean and max |slice returned - reference slice|, and how many slices; reference
        (B, T, n_mel) from Decoder.mel of the whole output."""
        if not self.slices:
            return float("nan"), float("nan"), 0
        diff = torch.stack([(s - reference[:, t]).abs() for t, s in sorted(self.slices.items())])
        return diff.mean().item(), diff.max().item(), len(self.slices)


# -----------------------------------------------------------------------------
# downloads (the EnCodec weights here; prepare.py also fetches LibriTTS with it)


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT):
    """Fetch url into dest through dest.part: an existing .part is resumed with an HTTP Range
    request (restarted when the server ignores ranges or refuses the one asked); the size is checked
    against the server's, and the file renamed into place only when whole."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        part.unlink()  # 416: the .part is no prefix of this file; start over
        return download(url, dest, timeout)
    resume = response.status == 206
    if resume:
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
    else:
        have, total = 0, response.headers.get("Content-Length", "*")
    free = shutil.disk_usage(dest.parent).free
    if (
        total != "*" and int(total) - have > free
    ):  # checked before a byte is written (or a .part truncated)
        response.close()
        raise OSError(
            f"{dest.name} needs {(int(total) - have) / 1e6:,.1f} MB more and {dest.parent} has "
            f"{free / 1e6:,.1f} MB free: free some space or pass another --data_root"
        )
    with response, open(part, "ab" if resume else "wb") as f:
        of = f"{int(total) / 1e6:,.0f}" if total != "*" else "?"
        last_print = time.time()
        while chunk := response.read(1 << 20):
            f.write(chunk)
            have += len(chunk)
            if time.time() - last_print > 1:
                last_print = time.time()
                print(
                    f"\r{dest.name}: {have / 1e6:,.0f} of {of} MB",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    if total != "*" and part.stat().st_size != int(total):
        raise OSError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)


# -----------------------------------------------------------------------------
# EnCodec's decoder as a stream: one token's work per token


class StreamingDecoder:
    """EnCodec's causal SEANet decoder run incrementally, exactly: each layer keeps the past it
    needs (a causal conv its last (k-1)*d inputs, a transposed conv the tail of its overlap-add, the
    LSTM its state), so feeding tokens in pieces gives the audio that tokenizer.decode gives for all
    of them at once, at one token's cost. The layers are wrapped once, here; a step then calls torch
    directly, with no per-call dispatch on types."""

    def __init__(self, tokenizer):
        self.codebook = tokenizer.codebook  # (VOCAB, 128): token -> the latent the decoder reads
        dtype = next(
            tokenizer.model.decoder.parameters()
        ).dtype  # the tokenizer's own (float64 offline)
        decoder = encodec_skeleton().decoder.to(tokenizer.device, dtype).eval()  # a copy to change:
        decoder.load_state_dict(tokenizer.model.decoder.state_dict())
        for m in decoder.modules():  # fold weight norm into the weights once, not at every call
            if hasattr(m, "weight_g"):
                torch.nn.utils.remove_weight_norm(m)
        self.layers = [streamed(m) for m in decoder.model]
        self.started = False

    @torch.inference_mode()
    def __call__(self, tokens):
        """tokens (B, n) that follow the ones fed before -> their audio (B, n * HOP). The first call
        starts on its first token held DECODE_HOLD tokens, as Tokenizer.decode does."""
        torch.set_flush_denormal(
            True
        )  # for this thread: the LSTM's state decays into denormals, 16x slower
        hold = 0 if self.started else DECODE_HOLD
        if hold:
            tokens = hold_first(tokens)
        self.started = True
        x = self.codebook[tokens].transpose(1, 2)  # (B, 128, n)
        for layer in self.layers:
            x = layer(x)
        return x[:, 0, hold * HOP :].float()


def streamed(m):
    """A decoder layer as a function of its new frames x (B, C, L) that keeps the past it needs."""
    if isinstance(m, SConv1d):
        return StreamedConv(m.conv.conv, m.pad_mode)
    if isinstance(m, SConvTranspose1d):
        return StreamedConvTranspose(m.convtr.convtr)
    if isinstance(m, SLSTM):
        return StreamedLSTM(m.lstm, m.skip)
    if isinstance(m, SEANetResnetBlock):
        shortcut, block = streamed(m.shortcut), [streamed(b) for b in m.block]

        def residual(x):
            y = x
            for layer in block:
                y = layer(y)
            return shortcut(x) + y

        return residual
    if isinstance(m, (nn.ELU, nn.Identity)):
        return m
    raise TypeError(f"no streaming rule for {type(m).__name__}: a decoder this file does not know")


@contextlib.contextmanager
def without_onednn():
    """Plain CPU kernels instead of oneDNN's, which set each call up: worth it for big inputs, not
    for one token."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class StreamedConv:
    """A causal conv (stride 1): each call sees the last (k-1)*d frames of the one before."""

    def __init__(self, conv, pad_mode):
        assert conv.stride[0] == 1, "the SEANet decoder's convs have stride 1"
        self.weight, self.bias, self.dilation = conv.weight, conv.bias, conv.dilation[0]
        self.context = (conv.kernel_size[0] - 1) * self.dilation
        self.pad_mode, self.past = pad_mode, None

    def __call__(self, x):
        if self.context:  # the first call pads as SConv1d does (reflection at the very start)
            x = (
                pad1d(x, (self.context, 0), mode=self.pad_mode)
                if self.past is None
                else torch.cat([self.past, x], -1)
            )
            self.past = x[..., -self.context :]
        return F.conv1d(x, self.weight, self.bias, dilation=self.dilation)


class StreamedConvTranspose:
    """A transposed conv (kernel k, stride s): the last k - s samples of a call's output overlap the
    next call's first ones, so they are held back and added in then (their bias counted once)."""

    def __init__(self, conv):
        self.weight, self.bias, self.stride = conv.weight, conv.bias, conv.stride[0]
        self.overlap = conv.kernel_size[0] - self.stride
        self.tail = None

    def __call__(self, x):
        y = F.conv_transpose1d(
            x, self.weight, self.bias, stride=self.stride
        )  # (B, C, (L - 1) * s + k)
        if self.tail is not None:
            y = torch.cat(
                [y[..., : self.overlap] + self.tail - self.bias[:, None], y[..., self.overlap :]],
                dim=-1,
            )
        n = x.size(-1) * self.stride
        self.tail = y[..., n:]
        return y[..., :n]


class StreamedLSTM:
    """SLSTM (an LSTM over time, plus its input when skip) carrying its state from call to call."""

    def __init__(self, lstm, skip):
        self.lstm, self.skip, self.state = lstm, skip, None

    def __call__(self, x):
        seq = x.permute(2, 0, 1)  # (L, B, C)
        with without_onednn():  # oneDNN's LSTM takes ~9 ms for one step on a CPU, plain ~1 ms
            y, self.state = self.lstm(seq, self.state)
        return (y + seq).permute(1, 2, 0) if self.skip else y.permute(1, 2, 0)
