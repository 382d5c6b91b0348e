"""
The decoder of whisper-gpt: from tokens alone, the mel the hybrid is fed while it generates and the
audio a person hears, all at once or a token at a time (Decoder, DecodedSplit, DecoderStepper), and
EnCodec's decoder run as a stream, one token's work per token (StreamingDecoder).
"""

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from encodec.modules.conv import SConv1d, SConvTranspose1d, pad1d
from encodec.modules.lstm import SLSTM
from encodec.modules.seanet import SEANetResnetBlock

from audio import HOP, SAMPLE_RATE, VOCAB, WIN, log_mel, normalise_mel, read_meta
from checks import UserError, first_non_finite
from runlog import write_atomic
from tokenizer import DECODE_HOLD, encodec_skeleton, hold_first, load_tokenizer

# the offline decoder's table, beside tokenizer.pt: (VOCAB, N_MELS) float32
DECODER_FILE = "token_mel.npy"
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
