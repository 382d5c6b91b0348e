"""
The tokenizer of whisper-gpt, audio <-> the coarsest EnCodec token: EnCodec 24 kHz's encoder and
codebook 0, with the real weights (from a file, the torch hub cache or a download) or the named
offline stand-in (the same network with random weights drawn from a seed, and a k-means codebook
fitted to its latents). prepare.py tokenizes with it; a data folder's meta.json names it, and
load_tokenizer rebuilds it from that folder.
"""

import contextlib
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from encodec import EncodecModel

from audio import HOP, SAMPLE_RATE, VOCAB, read_meta
from checks import UserError, load_torch_file
from corpora import download
from runlog import write_atomic

EMB_DIM = 128  # width of the EnCodec latent that codebook 0 quantises
# samples per encoder row: bounds memory (~0.4 GB) whatever the file length
SEGMENT = 10 * SAMPLE_RATE
# samples before a later segment that warm up its encoder state (frames dropped)
CONTEXT = SAMPLE_RATE

ENCODEC_CKPT = "encodec_24khz-d7cc33bc.th"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CKPT
ENCODEC_SHA256 = "d7cc33bc"  # prefix of the checkpoint's sha256, as torch.hub checks it
ENCODEC_NAME = "encodec_24khz"
OFFLINE_NAME = "offline-random-encodec-kmeans"
TOKENIZER_FILE = "tokenizer.pt"
KMEANS_ITERS = 20  # Lloyd iterations of the offline codebook's fit
# tokens: EnCodec's decoder starts on the first token held this long (Tokenizer.decode)
DECODE_HOLD = 16
# the offline tokenizer's arithmetic, and its latents rounded to LATENT_ROUNDING: the same tokens on
# every kind of CPU (NOTES.md)
OFFLINE_DTYPE = torch.float64
LATENT_ROUNDING = torch.bfloat16


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
