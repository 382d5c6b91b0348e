"""
A user's mistake, refused before any work in one line that says what to do, while a bug keeps its traceback:
UserError, run_script, the argparse and the torch-file loading of every script, and the checks of whisper_gpt.py's
flags and data folder. Every script imports them from here.
"""
import argparse
import json
import os
import pickle
import re
import sys

import numpy as np
import torch


class UserError(Exception):
    """A user's mistake (a flag, a missing or damaged file, too little disk): run_script prints it as one line,
    with no traceback. Every script of the project raises it."""


def run_script(main):
    """Run a script's main(): a UserError ends the program with one line, `<script>: error: <message>`, and exit
    status 1; any other exception is a bug and keeps its traceback."""
    try:
        main()
    except UserError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (what is wrong, and where the help is), not usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_torch_file(path, device="cpu"):
    """torch.load with weights_only=True: tensors and plain types only, so no code in the file ever runs. A file
    that is not a whole torch file (a truncated copy, another format, a pickle holding code) is one clear error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        reason = re.split(r"\.\s", str(e).strip())[0][:150] or type(e).__name__  # torch's first sentence
        raise UserError(f"{path} is not a whole torch file of tensors ({reason}): copy or make it again") from e


def validate(c):
    """Raise one clear error for an impossible combination of whisper_gpt.py's flags (c is its Config)."""
    if c.n_embd % c.n_head:
        raise UserError(f"--n_embd {c.n_embd} is not divisible by --n_head {c.n_head}: pick a width that is")
    if c.hybrid and c.n_embd % 2:
        raise UserError(f"--hybrid needs an even --n_embd (half token, half mel); got {c.n_embd}")
    if c.hybrid and (c.n_embd // 2) % c.mel_head:
        raise UserError(f"the mel stack width {c.n_embd // 2} is not divisible by --mel_head {c.mel_head}")
    if c.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from must be 'scratch' or 'resume', not {c.init_from!r}")
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, not {c.dtype!r}")
    for name in ("block_size", "n_layer", "batch_size", "epochs", "vocab_size"):
        if getattr(c, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(c, name)}")
    for name in ("micro_batch", "log_interval", "eval_interval", "max_iters", "eval_windows", "final_windows"):
        if getattr(c, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(c, name)}")
    if c.lr <= 0:
        raise UserError(f"--lr must be positive, got {c.lr}")
    if not 0 <= c.lr_drop_at <= 1:
        raise UserError(f"--lr_drop_at is a fraction of the run, between 0 and 1; got {c.lr_drop_at}")


def check_data(c):
    """whisper_gpt.py's data contract, checked before the first step, so that bad data is one line naming the file,
    not a traceback hours in: meta.json parses and has what training needs; every memmap holds whole rows, as many
    as meta.json says; the mel has one row per token; every token id is below the vocabulary. A new model takes its
    vocabulary and mel bins from meta.json (a resumed one has them from its checkpoint). Returns meta."""
    path, fix = os.path.join(c.data_dir, "meta.json"), f"make {c.data_dir} again with python prepare.py"
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {c.data_dir}: run python prepare.py --dataset {c.dataset}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:  # json's errors and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not JSON ({e}): {fix}") from None
    missing = [k for k in ("vocab_size", "n_mels", "n_train", "n_val")
               if not isinstance(meta, dict) or not isinstance(meta.get(k), int) or meta[k] < 1]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (positive whole numbers): {fix}")
    if c.init_from == "scratch" and not c.eval_only:
        c.vocab_size, c.n_mel = meta["vocab_size"], meta["n_mels"]
    elif c.hybrid and c.n_mel != meta["n_mels"]:
        raise UserError(f"{path} has {meta['n_mels']} mel bins and the checkpoint's model reads {c.n_mel}: "
                        f"train a new run on this data")
    for split in ("train", "val"):
        n, files = meta[f"n_{split}"], [(f"{split}_tokens.bin", 2, "uint16 tokens", fix)]
        if c.hybrid:
            files.append((f"{split}_mel.bin", 2 * c.n_mel, f"{c.n_mel}-bin float16 mel rows",
                          "--hybrid needs the mel memmaps of prepare.py"))
        for name, row, what, if_missing in files:
            file = os.path.join(c.data_dir, name)
            if not os.path.isfile(file):
                raise UserError(f"{c.data_dir} has no {name}: {if_missing}")
            size = os.path.getsize(file)
            if size % row:
                raise UserError(f"{file}: {size:,} bytes is not a whole number of {what} ({row} bytes each), so it "
                                f"is cut short or not prepare.py's: {fix}")
            if size // row != n:
                raise UserError(f"{file} holds {size // row:,} {what} but meta.json says the {split} split has "
                                f"{n:,} tokens (one mel row per token): {fix}")
        if n < c.block_size + 1:
            raise UserError(f"the {split} split has {n} tokens, fewer than a crop of --block_size {c.block_size} "
                            f"+ 1: use a smaller --block_size or prepare more audio")
        top = int(np.memmap(os.path.join(c.data_dir, f"{split}_tokens.bin"), dtype=np.uint16, mode="r").max())
        if top >= c.vocab_size:
            raise UserError(f"{os.path.join(c.data_dir, split + '_tokens.bin')} holds token id {top}, not below the "
                            f"model's vocabulary of {c.vocab_size}: the file is damaged or made by another "
                            f"tokenizer; {fix}")
    return meta
