"""Tests for prepare.py: alignment, mel, tokenizer, bad input, resume, determinism, downloads. CPU, seconds of audio."""
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import prepare

SEED = 1337


# ---------------------------------------------------------------------------------------------------------------
# helpers

def tone(seconds, rate, freq, channels=1, seed=0):
    """A tone with a little noise: (S,) or (S, channels) float64."""
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return wav if channels == 1 else np.stack([wav, 0.5 * wav], 1)


def make_corpus(folder: Path, n=6):
    """n short good files: 24/16/44.1 kHz, mono and stereo, wav/flac/ogg, in nested folders."""
    formats, rates = ["wav", "flac", "ogg"], [24000, 16000, 44100]
    for i in range(n):
        path = folder / f"d{i % 2}" / f"good{i}.{formats[i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(1.0 + 0.25 * i, rates[i % 3], 200 + 70 * i, 1 + i % 2, seed=i), rates[i % 3])


def make_bad_files(folder: Path) -> dict:
    """One file of each bad kind -> {name: words its skip reason must contain}."""
    (folder / "corrupt.wav").write_bytes(b"this is not audio" * 100)
    (folder / "zero_bytes.wav").write_bytes(b"")
    sf.write(folder / "no_samples.wav", np.zeros(100), 24000)  # a valid header, less than one token
    sf.write(folder / "silent.flac", np.zeros(24000), 24000)
    (folder / "unreadable.wav").symlink_to(folder / "missing-target.wav")
    return {"corrupt.wav": "not recognised", "zero_bytes.wav": "empty", "no_samples.wav": "empty",
            "silent.flac": "silent", "unreadable.wav": "No such file"}


def run_prepare(root: Path, *args):
    prepare.main([*args, "--data_root", str(root), "--workers", "0", "--seed", str(SEED)])
    return root


def read_split(data_dir: Path, split: str):
    tokens = np.fromfile(data_dir / f"{split}_tokens.bin", dtype=np.uint16)
    mel = np.fromfile(data_dir / f"{split}_mel.bin", dtype=np.float16).reshape(-1, prepare.N_MELS)
    return tokens, mel


def model_rate(path):
    return prepare.to_model_rate(*sf.read(path, dtype="float32", always_2d=True))


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


# ---------------------------------------------------------------------------------------------------------------
# the mel

def test_log_mel_shape_dtype_and_errors():
    wav = torch.randn(2, 3, 50 * prepare.HOP, dtype=torch.float64)
    mel = prepare.log_mel(wav)
    assert mel.shape == (2, 3, 50, prepare.N_MELS) and mel.dtype == torch.float32
    assert torch.isfinite(prepare.log_mel(torch.zeros(prepare.HOP * 4))).all()  # the log has a floor
    with pytest.raises(ValueError, match="multiple of 320"):
        prepare.log_mel(torch.randn(1000))


def test_log_mel_is_causal_and_its_window_ends_at_the_hop():
    """Slice t sees samples up to 320(t+1) - 1 and never 320(t+1) or later; its window is 960 samples long."""
    hop, n = prepare.HOP, 40
    wav = torch.randn(n * hop)
    base = prepare.log_mel(wav)
    for t in (0, 7, 20):
        later = wav.clone()
        later[hop * (t + 1):] = torch.randn(len(wav) - hop * (t + 1))
        changed = (prepare.log_mel(later) != base).any(-1)
        assert not changed[:t + 1].any() and changed[t + 1:].all()
        last_own = wav.clone()
        last_own[hop * (t + 1) - 1] += 1.0  # the last sample of slice t's window: slices t, t+1, t+2 see it
        changed = (prepare.log_mel(last_own) != base).any(-1)
        assert changed.nonzero().flatten().tolist() == [s for s in (t, t + 1, t + 2) if s < n]


def test_log_mel_puts_a_tone_in_the_right_band():
    rate, freq = prepare.SAMPLE_RATE, 1000.0
    wav = torch.sin(2 * torch.pi * freq * torch.arange(rate) / rate)
    peak_bin = prepare.log_mel(wav)[10:].mean(0).argmax().item()
    fbank = __import__("torchaudio").functional.melscale_fbanks(481, 0.0, rate / 2, 64, rate, norm="slaney",
                                                                 mel_scale="slaney")
    assert peak_bin == fbank[round(freq / (rate / prepare.WIN))].argmax().item()


# ---------------------------------------------------------------------------------------------------------------
# a prepared folder

def test_counts_alignment_and_token_range(prepared_dir, audio_corpus):
    folder, bad = audio_corpus
    meta = prepare.read_meta(prepared_dir)
    assert {f["path"] for f in meta["files"]} == {str(p.relative_to(folder)) for p in folder.rglob("good*")}
    assert not list(prepared_dir.parent.rglob("*.tmp")) and not (prepared_dir / "work").exists()
    for split in ("train", "val"):
        tokens, mel = read_split(prepared_dir, split)
        files = [f for f in meta["files"] if f["split"] == split]
        assert len(tokens) == len(mel) == meta[f"n_{split}"] == sum(f["frames"] for f in files) > 0
        assert int(tokens.max()) < prepare.VOCAB
        for f in files:  # each file: one token and one mel row per whole 320 samples at 24 kHz
            assert f["frames"] == len(model_rate(folder / f["path"])) // prepare.HOP
    assert len(np.unique(read_split(prepared_dir, "train")[0])) > 10


def test_mel_is_normalised_with_train_statistics(prepared_dir):
    meta = prepare.read_meta(prepared_dir)
    _, mel = read_split(prepared_dir, "train")
    assert (prepared_dir / "train_mel.bin").stat().st_size == meta["n_train"] * 64 * 2  # float16 [N, 64]
    assert (prepared_dir / "train_tokens.bin").stat().st_size == meta["n_train"] * 2    # uint16 [N]
    mel = mel.astype(np.float64)
    assert np.abs(mel.mean(0)).max() < 0.01
    assert np.abs(mel.std(0) - 1).max() < 0.01
    assert len(meta["mel_mean"]) == len(meta["mel_std"]) == 64


def test_stored_rows_are_the_files_own_tokens_and_mels(prepared_dir, audio_corpus):
    """The rebuilt tokenizer (load_tokenizer) gives the stored tokens; log_mel + normalise_mel the stored mels."""
    folder, _ = audio_corpus
    meta = prepare.read_meta(prepared_dir)
    tok = prepare.load_tokenizer(prepared_dir)
    assert tok.offline and tok.name == meta["tokenizer"] == prepare.OFFLINE_NAME and meta["tokenizer_offline"]
    for f in meta["files"][:2] + [f for f in meta["files"] if f["split"] == "val"]:
        tokens, mel = read_split(prepared_dir, f["split"])
        rows = slice(f["offset"], f["offset"] + f["frames"])
        wav = model_rate(folder / f["path"])
        assert torch.equal(tok.encode(wav[None])[0], torch.from_numpy(tokens[rows].astype(np.int64)))
        expected = prepare.normalise_mel(prepare.log_mel(wav), meta).numpy()
        np.testing.assert_allclose(mel[rows].astype(np.float32), expected, atol=0.02, rtol=0.002)
    audio = tok.decode(torch.from_numpy(tokens[:75].astype(np.int64))[None])
    assert audio.shape == (1, 75 * prepare.HOP) and audio.dtype == torch.float32


def test_bad_files_are_skipped_with_their_reason(prepared_dir, audio_corpus):
    _, bad = audio_corpus
    meta = prepare.read_meta(prepared_dir)
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == set(bad)
    for name, words in bad.items():
        assert words in reasons[name], (name, reasons[name])
    assert sorted(p.name for p in prepared_dir.iterdir()) == sorted(
        ["meta.json", "tokenizer.pt", "train_mel.bin", "train_tokens.bin", "val_mel.bin", "val_tokens.bin"])


@pytest.mark.parametrize("kind", ["empty", "missing", "nothing usable"])
def test_no_usable_input_is_one_clear_error_and_writes_nothing(tmp_path, kind):
    folder = tmp_path / "audio"
    if kind != "missing":
        folder.mkdir()
    if kind == "nothing usable":
        make_bad_files(folder)
    root = tmp_path / "data"
    with pytest.raises(SystemExit, match={"empty": "no audio files", "missing": "does not exist",
                                          "nothing usable": "no usable audio"}[kind]):
        run_prepare(root, "--audio_dir", str(folder), "--name", "x", "--tokenizer", "offline")
    assert not (root / "x").exists()
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        prepare.read_meta(root / "x")


def test_output_is_deterministic_for_a_seed(prepared_dir, audio_corpus, tmp_path):
    again = run_prepare(tmp_path, "--audio_dir", str(audio_corpus[0]), "--name", "tiny", "--tokenizer", "offline") / "tiny"
    for name in ("train_tokens.bin", "train_mel.bin", "val_tokens.bin", "val_mel.bin", "meta.json"):
        assert (again / name).read_bytes() == (prepared_dir / name).read_bytes(), name
    a, b = (torch.load(d / "tokenizer.pt") for d in (again, prepared_dir))
    assert torch.equal(a["codebook"], b["codebook"]) and a["seed"] == b["seed"] == SEED


def test_resume_after_interruption_redoes_nothing_finished(tmp_path, monkeypatch):
    folder = tmp_path / "audio"
    make_corpus(folder, n=8)
    monkeypatch.setattr(prepare, "GROUP_FILES", 2)
    monkeypatch.setattr(prepare, "FIT_FRAMES", 150)  # fit after the first group, so shards are written early
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
    assert not (cut / "meta.json").exists() and not list(cut.glob("*.bin")) and len(list(cut.glob("work/*.npz"))) == 2

    monkeypatch.setattr(prepare, "write_shard", write_shard)
    load_source, loaded = prepare.load_source, []
    monkeypatch.setattr(prepare, "load_source", lambda src: loaded.append(src.name) or load_source(src))
    run_prepare(tmp_path / "cut", *args)
    done = {src.name for group in written for src, *_ in group}
    assert len(done) == 4 and not done & set(loaded) and len(loaded) == 4
    for name in ("train_tokens.bin", "train_mel.bin", "val_tokens.bin", "val_mel.bin", "meta.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (cut / "work").exists()


def test_a_different_job_never_reuses_an_interrupted_one(tmp_path, monkeypatch):
    """Work left by an interrupted run is reused only by the same job: new files, new start (a codebook fitted on
    other audio must not leak in)."""
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
    monkeypatch.setattr(prepare, "load_source", lambda src: loaded.append(src.name) or load_source(src))
    run_prepare(tmp_path, *args)
    fresh = run_prepare(tmp_path / "fresh", *args) / "j"
    assert len(loaded) == 2 * 5
    for name in ("train_tokens.bin", "val_tokens.bin", "train_mel.bin"):
        assert (tmp_path / "j" / name).read_bytes() == (fresh / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer

def test_long_files_are_encoded_in_segments_with_warm_context(monkeypatch):
    monkeypatch.setattr(prepare, "SEGMENT", 2 * prepare.SAMPLE_RATE)
    tok = prepare.offline_tokenizer(SEED)
    long, short = (torch.from_numpy(tone(s, 24000, 300, seed=int(s)).astype(np.float32)) for s in (5.0, 1.0))
    alone = tok.embed_many([long])[0]
    assert alone.shape == (5 * 75, prepare.EMB_DIM)
    with torch.no_grad(), prepare.fast_cpu():
        whole = tok.model.encoder(long[None, None]).transpose(1, 2)[0]
    assert torch.allclose(alone[:150], whole[:150], atol=1e-5)  # the first segment is the plain encoding
    assert torch.allclose(alone, whole, atol=0.05 * whole.abs().max().item())  # later ones start warm
    batched = tok.embed_many([short, long], batch_size=3)  # rows padded to the longest: causal, so no change
    assert torch.allclose(batched[1], alone, atol=1e-5) and batched[0].shape == (75, prepare.EMB_DIM)


def test_fit_codebook_is_a_deterministic_kmeans():
    centres = torch.randn(8, prepare.EMB_DIM) * 10
    points = (centres[:, None] + torch.randn(8, 100, prepare.EMB_DIM)).reshape(-1, prepare.EMB_DIM)
    with prepare.fast_cpu():
        codebook = prepare.fit_codebook(points, SEED)
    assert codebook.shape == (prepare.VOCAB, prepare.EMB_DIM) and torch.equal(codebook, prepare.fit_codebook(points, SEED))
    codes = prepare.nearest(points, codebook)
    error = (points - codebook[codes]).pow(2).sum(1).mean()
    assert error < (points - points.mean(0)).pow(2).sum(1).mean() / 10
    assert torch.equal(codes, torch.cdist(points, codebook).argmin(1))


def test_pretrained_path_takes_codebook_zero_of_encodec(tmp_path):
    """--encodec_ckpt with an EnCodec 24 kHz checkpoint (random here): tokens are EnCodec's own codes[:, 0]."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = prepare.encodec_skeleton()
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.copy_(torch.randn(prepare.VOCAB, prepare.EMB_DIM) * 0.02)
    ckpt = tmp_path / prepare.ENCODEC_CKPT
    torch.save(model.state_dict(), ckpt)
    folder = tmp_path / "audio"
    make_corpus(folder, n=3)
    data = run_prepare(tmp_path / "data", "--audio_dir", str(folder), "--name", "e", "--tokenizer", "encodec",
                       "--encodec_ckpt", str(tmp_path)) / "e"
    meta = prepare.read_meta(data)
    assert meta["tokenizer"] == "encodec_24khz" and not meta["tokenizer_offline"] and not (data / "tokenizer.pt").exists()
    model.set_target_bandwidth(1.5)
    for f in meta["files"]:
        wav = model_rate(folder / f["path"])
        with torch.no_grad(), prepare.fast_cpu():
            codes = model.encode(wav[None, None])[0][0]  # (B, n_q, T)
        tokens, _ = read_split(data, f["split"])
        stored = torch.from_numpy(tokens[f["offset"]:f["offset"] + f["frames"]].astype(np.int64))
        assert torch.equal(stored, codes[0, 0])
    assert torch.equal(prepare.load_tokenizer(data).codebook, model.quantizer.vq.layers[0]._codebook.embed)


def test_encodec_without_weights_fails_clearly_and_auto_falls_back_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(prepare, "ENCODEC_URL", "http://127.0.0.1:9/encodec_24khz.th")  # nothing listens
    folder = tmp_path / "audio"
    make_corpus(folder, n=2)
    args = ["--audio_dir", str(folder), "--name", "w"]
    with pytest.raises(SystemExit) as error:
        run_prepare(tmp_path / "data", *args, "--tokenizer", "encodec")
    for way in ("internet", str(tmp_path / "torch" / "hub" / "checkpoints"), "--encodec_ckpt"):
        assert way in str(error.value)
    assert not (tmp_path / "data" / "w").exists()
    data = run_prepare(tmp_path / "data", *args) / "w"
    assert "WARNING" in capsys.readouterr().err and prepare.read_meta(data)["tokenizer_offline"]


# ---------------------------------------------------------------------------------------------------------------
# downloads

@pytest.fixture
def archive_server():
    """A real local HTTP server in a thread serving `files`; honours Range requests while `ranges` is true."""
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
            self.wfile.write(body[start:len(body) // 2 if self.short else None])  # short: the connection drops

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()


@pytest.mark.parametrize("case", ["resume", "server ignores ranges", "part too long"])
def test_download_resumes_or_restarts_a_partial_file(tmp_path, archive_server, case):
    url, handler = archive_server
    body = os.urandom(300_000)
    handler.files["/x.bin"] = body
    handler.ranges = case != "server ignores ranges"
    part = tmp_path / "x.bin.part"
    part.write_bytes(body[:100_000] if case != "part too long" else body + b"extra")
    prepare.download(f"{url}/x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == body and not part.exists()
    assert handler.requests[0] == ("/x.bin", f"bytes={100_000 if case != 'part too long' else len(body) + 5}-")
    assert len(handler.requests) == (2 if case == "part too long" else 1)  # a 416 starts over, once


def test_download_refuses_a_short_file_and_keeps_the_part(tmp_path, archive_server):
    url, handler = archive_server
    handler.files["/x.bin"] = os.urandom(10_000)
    handler.short = True
    with pytest.raises(OSError, match="run again to resume"):
        prepare.download(f"{url}/x.bin", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists() and (tmp_path / "x.bin.part").stat().st_size == 5_000


def test_libritts_download_extract_and_tokenise(tmp_path, archive_server):
    """A tiny archive with LibriTTS's layout (LibriTTS/<subset>/<speaker>/<chapter>/*.wav), half downloaded."""
    url, handler = archive_server
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for speaker, chapter, utt in [(19, 198, 0), (19, 198, 1), (26, 495, 0), (26, 495, 1), (32, 21625, 0)]:
            name = f"LibriTTS/train-clean-100/{speaker}/{chapter}/{speaker}_{chapter}_{utt:06d}_000000"
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
    run_prepare(tmp_path, "--dataset", "speech", "--url_base", url, "--tokenizer", "offline")
    meta = prepare.read_meta(tmp_path / "speech")
    assert len(meta["files"]) == 5 and meta["corpus"] == "LibriTTS train-clean-100"
    assert all(f["path"].startswith("train-clean-100/") and f["path"].endswith(".wav") for f in meta["files"])
    assert handler.requests == [("/train-clean-100.tar.gz", "bytes=1000-")]
    assert (downloads / "train-clean-100.extracted").exists() and not list(downloads.glob("*.tar.gz*"))
    run_prepare(tmp_path, "--dataset", "speech", "--url_base", url, "--tokenizer", "offline")
    assert len(handler.requests) == 1  # extracted once: no second download


def test_corrupt_archive_is_deleted_with_a_clear_error(tmp_path, archive_server):
    url, handler = archive_server
    handler.files["/dev-clean.tar.gz"] = b"not a tarball" * 50
    with pytest.raises(SystemExit, match="corrupt"):
        run_prepare(tmp_path, "--dataset", "speech", "--subsets", "dev-clean", "--url_base", url)
    assert not list((tmp_path / "downloads").glob("dev-clean*"))


# ---------------------------------------------------------------------------------------------------------------
# the built-in music corpus

SHORT_PIECES = ["essenFolksong/erk10.abc#208", "essenFolksong/kinder0.abc#170", "essenFolksong/erk20.abc#257"]


def test_music_sources_are_varied_and_deterministic():
    sources = prepare.music_sources(SEED)
    assert sources == prepare.music_sources(SEED) and sources != prepare.music_sources(SEED + 1)
    assert len(sources) > 10_000 and len({s.key for s in sources}) == len(sources)
    programs = {s.music["program"] for s in sources[:200]}
    assert programs == set(prepare.INSTRUMENTS)
    assert {s.path.split("/")[0] for s in sources[:500]} >= {"bach", "palestrina", "essenFolksong", "oneills1850"}


def test_music_dataset_renders_short_pieces_in_a_worker(tmp_path, monkeypatch):
    everything = {s.name: s for s in prepare.music_sources(SEED)}
    pieces = [everything[name] for name in SHORT_PIECES]
    monkeypatch.setattr(prepare, "music_sources", lambda seed: pieces)
    prepare.main(["--dataset", "music", "--hours", "0.01", "--tokenizer", "offline", "--data_root", str(tmp_path),
                  "--workers", "1", "--seed", str(SEED)])
    meta = prepare.read_meta(tmp_path / "music")
    assert sorted(f["path"] for f in meta["files"]) == sorted(SHORT_PIECES) and not meta["skipped"]
    assert [f["path"] for f in meta["files"] if f["split"] == "val"] == SHORT_PIECES[:1]  # the first usable file
    wav, mel = prepare.load_source(pieces[0])
    frames = {f["path"]: f["frames"] for f in meta["files"]}
    assert wav.dtype == np.float32 and len(wav) % prepare.HOP == 0 and len(mel) == frames[SHORT_PIECES[0]]
    assert abs(np.abs(wav).max() - prepare.RENDER_PEAK) < 1e-5
    assert all(f["rendering"]["program"] in prepare.INSTRUMENTS for f in meta["files"])
    assert np.array_equal(prepare.load_source(pieces[0])[0], wav)  # rendering is deterministic
    program = 73 if pieces[0].music["program"] != 73 else 0
    flute = prepare.load_source(pieces[0]._replace(music={**pieces[0].music, "program": program}))[0]
    assert len(flute) == len(wav) and not np.allclose(flute, wav, atol=0.05)
