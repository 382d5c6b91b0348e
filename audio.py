"""
The audio side of whisper-gpt, shared by prepare.py (which makes the data), the tokenizer and the
decoder (tokenizer.py, decoding.py) and sample.py (which continues a prompt): the constants, loading
audio at the model's rate, the causal log-mel and its normalisation, and a data folder's meta.json.

Token t of a file covers samples [320t, 320(t+1)); mel slice t is the 960-sample window that ENDS at
sample 320(t+1), so it never hears a sample after the audio its token covers.
"""

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from checks import UserError

SAMPLE_RATE = 24000  # Hz, EnCodec 24 kHz model
HOP = 320  # samples per token = 75 tokens per second
FRAME_RATE = 75  # tokens per second
WIN = 960  # samples in a mel window = 40 ms
N_MELS = 64  # mel bins per slice
VOCAB = 1024  # codebook 0 of EnCodec 24 kHz
LOG_FLOOR = 1e-10  # mel power floor before the natural log
SILENCE_PEAK = 1e-4  # a file whose peak is below this (-80 dBFS) is silent


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


def read_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: make it with `python prepare.py` (an unfinished run has none)"
        )
    return json.loads(path.read_text())
