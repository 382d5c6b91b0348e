"""
A user's mistake, refused before any work in one line that says what to do, while a bug keeps its
traceback: UserError, run_script, the argparse and the torch-file loading of every script, the
device and folder checks, a full disk, and the checks of whisper_gpt.py's flags and data folder.
Every script imports them from here; a run folder's bookkeeping (its lock, log and data
fingerprint) is runlog.py's.
"""

import argparse
import contextlib
import errno
import glob
import json
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile

import numpy as np


class UserError(Exception):
    """A user's mistake (a flag, a missing or damaged file, too little disk): run_script prints it
    as one line, with no traceback. Every script of the project raises it."""


def run_script(main):
    """Run a script's main(): a UserError ends the program with one line, `<script>: error:
    <message>`, and exit status 1; any other exception is a bug and keeps its traceback."""
    try:
        main()
    except UserError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (what is wrong, and where the help is), not
    usage + error, and exit status 1, as every other mistake of a user (argparse's own is 2)."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_torch_file(path, device="cpu"):
    """torch.load with weights_only=True: tensors and plain types only, so no code in the file ever
    runs. A file that is not a whole torch file (a truncated copy, another format, a pickle holding
    code) is one clear error."""
    import torch  # here: importing this file needs no torch (runlog.py, sweep.py)

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        reason = (
            re.split(r"\.\s", str(e).strip())[0][:150] or type(e).__name__
        )  # torch's first sentence
        raise UserError(
            f"{path} is not a whole torch file of tensors ({reason}): copy or make it again"
        ) from e


def file_kind(path):
    """What path is when it is not a regular file ("a folder", "a named pipe (FIFO)", "a socket", "a
    device"), told by os.stat alone, since opening a pipe or a device can block for ever; None for a
    regular file. Raises OSError (FileNotFoundError, say) where there is nothing to stat."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    return (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a file"
    )


def check_device(device, flag="--device"):
    """Refuse, before any work, a device that torch cannot use here: no GPU, no such GPU, not a
    device at all."""
    import torch  # here, as in load_torch_file

    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        raise UserError(f"{flag} {device!r} is not a device: use cpu, cuda or cuda:N") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cuda" and not gpus:
        raise UserError(f"{flag} {device}, but torch sees no GPU here: use {flag} cpu")
    if kind == "cuda" and index is not None and index >= gpus:
        raise UserError(
            f"{flag} {device}, but torch sees {gpus} GPU(s) here: use cuda:0 to cuda:{gpus - 1}"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} mps, but torch sees no Apple GPU here: use {flag} cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag} {device}: the scripts run on cpu, cuda or mps")


def check_writable(folder, flag):
    """Refuse, before any work, a folder that cannot be written to or made (a run that cannot save
    loses hours)."""
    where = os.path.abspath(folder)
    while not os.path.exists(where):  # the folder is made in the nearest one that exists
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise UserError(f"{flag} {folder}: {where} is a file, not a folder: pass another {flag}")
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise UserError(
            f"{flag} {folder}: cannot write in {where} ({e.strerror}): pass a folder you can "
            "write to"
        ) from None


def disk_full(e):
    """Whether e is a write that found the disk full: ENOSPC or EDQUOT, or the RuntimeError that
    torch.save raises instead (its zip writer checks how far it got, not errno: "unexpected pos",
    "PytorchStreamWriter failed")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("unexpected pos", "PytorchStreamWriter failed")
    )


@contextlib.contextmanager
def room_to_write(folder, need, fix, temporary=()):
    """A full disk while the with-block writes into folder is one line: the folder, about how much
    the writes need (need, bytes) and how much is free, then fix (what to do). The half-written
    files (temporary: glob patterns; every file is written under a temporary name and renamed whole)
    are removed first."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        for path in (path for pattern in temporary for path in glob.glob(pattern)):
            with contextlib.suppress(OSError):
                os.remove(path)
        where = os.path.abspath(folder)
        while not os.path.isdir(
            where
        ):  # the disk's free space is that of the nearest folder that exists
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free
        raise UserError(
            f"the disk of {folder} is full: the files written there need about {need / 1e6:,.1f} "
            "MB and "
            f"it has {free / 1e6:,.1f} MB free; {fix}"
        ) from None


def validate(c):
    """Raise one clear error for an impossible combination of whisper_gpt.py's flags (c is its
    Config)."""
    for name in (
        "block_size",
        "n_layer",
        "n_head",
        "n_embd",
        "dense",
        "mel_hidden",
        "mel_head",
        "batch_size",
        "epochs",
        "vocab_size",
    ):  # first: a width or head count of 0 would divide by zero below
        if getattr(c, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if c.n_embd % c.n_head:
        raise UserError(
            f"--n_embd {c.n_embd} is not divisible by --n_head {c.n_head}: pick a width that is"
        )
    if c.hybrid and c.n_embd % 2:
        raise UserError(f"--hybrid needs an even --n_embd (half token, half mel); got {c.n_embd}")
    if c.hybrid and (c.n_embd // 2) % c.mel_head:
        raise UserError(
            f"the mel stack width {c.n_embd // 2} is not divisible by --mel_head {c.mel_head}"
        )
    if c.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from must be 'scratch' or 'resume', not {c.init_from!r}")
    if c.mel_source not in ("audio", "decoded", "prompt", "self"):
        raise UserError(
            f"--mel_source must be audio, decoded, prompt or self, not {c.mel_source!r}"
        )
    if (c.mel_feedback or c.mel_noise) and c.mel_source != "self":
        raise UserError("--mel_feedback and --mel_noise are remedies of --mel_source self only")
    if c.continue_mel not in ("", "decoded", "none", "self"):
        raise UserError(f"--continue_mel must be decoded, none or self, not {c.continue_mel!r}")
    from audio import FRAME_RATE  # here: audio.py imports this file

    window_s = c.block_size / FRAME_RATE  # the default 3 s on a short window: no continuation row
    if not c.prompt_seconds >= 0 or c.eval_only and window_s <= c.prompt_seconds != 3.0:
        raise UserError(
            f"--prompt_seconds must be 0 or more and shorter than a window ({window_s:g} s of "
            f"--block_size {c.block_size}), got {c.prompt_seconds}"
        )
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, not {c.dtype!r}")
    for name in (
        "micro_batch",
        "log_interval",
        "eval_interval",
        "max_iters",
        "eval_windows",
        "final_windows",
        "mel_layer",
        "seed",
    ):
        if getattr(c, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(c, name)}")
    if not 0 < c.lr < float("inf"):  # written so that nan fails too
        raise UserError(f"--lr must be a positive number, got {c.lr}")
    if not 0 <= c.lr_drop_at <= 1:
        raise UserError(
            f"--lr_drop_at is a fraction of the run, between 0 and 1; got {c.lr_drop_at}"
        )
    if not 0 <= c.dropout < 1:
        raise UserError(f"--dropout is a probability below 1, got {c.dropout}")
    check_device(c.device)


def micro_batches(c, world):
    """(crops per forward pass, forward passes per step) of one process, or one line if they do not
    fit."""
    if c.batch_size % world:
        raise UserError(
            f"--batch_size {c.batch_size} (crops per step in all) does not divide among {world} "
            f"processes: use a multiple of {world}"
        )
    share = c.batch_size // world
    micro = c.micro_batch or share
    if share % micro:
        raise UserError(
            f"--micro_batch {micro} does not divide a process's {share} crops: use a divisor of "
            f"{share}"
        )
    return micro, share // micro


def check_data(c, recorded=None):
    """whisper_gpt.py's data contract, checked before the first step, so that bad data is one line
    naming the file, not a traceback hours in: meta.json parses and has what training needs; a
    resumed or evaluated run reads the data it was trained on (recorded: the fingerprint in its
    checkpoint, where it has one) with its vocabulary; every memmap holds whole rows, as many as
    meta.json says; the mel has one row per token, all of them finite (a nan trains the model to
    nan); every token id is below the vocabulary. A new model takes its vocabulary and mel bins from
    meta.json (a resumed one has them from its checkpoint). Returns meta."""
    path, fix = (
        os.path.join(c.data_dir, "meta.json"),
        f"make {c.data_dir} again with python prepare.py",
    )
    if not os.path.isfile(path):
        raise UserError(
            f"no prepared data in {c.data_dir}: run python prepare.py --dataset {c.dataset}"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:  # json's errors and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not JSON ({e}): {fix}") from None
    missing = [
        k
        for k in ("vocab_size", "n_mels", "n_train", "n_val")
        if not isinstance(meta, dict) or not isinstance(meta.get(k), int) or meta[k] < 1
    ]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (positive whole numbers): {fix}")
    from tokenizer import check_vocabulary  # here: tokenizer.py imports this file

    check_vocabulary(meta, path)  # meta.json against its own tokenizer, before any checkpoint
    if recorded:
        from runlog import check_same_data, data_fingerprint  # here: runlog.py imports this file

        check_same_data(recorded, data_fingerprint(c.data_dir, meta), f"the run in {c.out_dir}")
    if c.init_from == "scratch" and not c.eval_only:
        c.vocab_size, c.n_mel = meta["vocab_size"], meta["n_mels"]
    elif (
        c.vocab_size != meta["vocab_size"]
    ):  # other data, not damaged data: a healthy file is never called damaged
        raise UserError(
            f"{path} has a vocabulary of {meta['vocab_size']} tokens and the checkpoint's model "
            "reads "
            f"{c.vocab_size}: the data of another tokenizer; train a new run on it"
        )
    elif c.hybrid and c.n_mel != meta["n_mels"]:
        raise UserError(
            f"{path} has {meta['n_mels']} mel bins and the checkpoint's model reads {c.n_mel}: "
            f"train a new run on this data"
        )
    for split in ("train", "val"):
        n, files = meta[f"n_{split}"], [(f"{split}_tokens.bin", 2, "uint16 tokens", fix)]
        if c.hybrid:
            files.append(
                (
                    f"{split}_mel.bin",
                    2 * c.n_mel,
                    f"{c.n_mel}-bin float16 mel rows",
                    "--hybrid needs the mel memmaps of prepare.py",
                )
            )
        for name, row, what, if_missing in files:
            file = os.path.join(c.data_dir, name)
            if not os.path.isfile(file):
                raise UserError(f"{c.data_dir} has no {name}: {if_missing}")
            size = os.path.getsize(file)
            if size % row:
                raise UserError(
                    f"{file}: {size:,} bytes is not a whole number of {what} ({row} bytes each), "
                    "so it "
                    f"is cut short or not prepare.py's: {fix}"
                )
            if size // row != n:
                raise UserError(
                    f"{file} holds {size // row:,} {what} but meta.json says the {split} split has "
                    f"{n:,} tokens (one mel row per token): {fix}"
                )
        if n < c.block_size + 1:
            raise UserError(
                f"the {split} split has {n} tokens, fewer than a crop of --block_size "
                f"{c.block_size} "
                f"+ 1: use a smaller --block_size or prepare more audio"
            )
        mel = os.path.join(c.data_dir, f"{split}_mel.bin")
        bad = first_non_finite(mel, c.n_mel) if c.hybrid and c.mel_source != "decoded" else None
        if bad is not None:
            raise UserError(
                f"{mel} holds a nan or inf in row {bad:,} (token {bad:,} of the {split} split): "
                "the file "
                f"is damaged, and a model fed it would train to nan; {fix}"
            )
        top = int(
            np.memmap(
                os.path.join(c.data_dir, f"{split}_tokens.bin"), dtype=np.uint16, mode="r"
            ).max()
        )
        if top >= c.vocab_size:
            raise UserError(
                f"{os.path.join(c.data_dir, split + '_tokens.bin')} holds token id {top}, not "
                "below the "
                f"model's vocabulary of {c.vocab_size}, which is its own meta.json's: the file is "
                f"damaged; {fix}"
            )
    return meta


def first_non_finite(path, row, chunk=1 << 16):
    """The first row of a float16 memmap of rows of `row` values that holds a nan or an inf, or
    None. Streamed, `chunk` rows at a time, as integers: a float16 is nan or inf where its five
    exponent bits are all set, and that test runs at over 10 GB/s on one core (np.isfinite on
    float16: 2 GB/s), so the 6.9 GB of the paper's 200 h take well under a second from the page
    cache: the disk's speed, once, beside the epochs that read it."""
    bits = np.memmap(path, dtype=np.uint16, mode="r")
    for start in range(0, len(bits), chunk * row):
        bad = (bits[start : start + chunk * row] & 0x7C00) == 0x7C00
        if bad.any():
            return (start + int(bad.argmax())) // row
    return None
