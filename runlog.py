"""
A run folder's bookkeeping, the one home of what the scripts write and read there: files written
whole (write_atomic), the folder's lock (one writer), log.jsonl's records (lines that survive a
process cut off mid-line; a training's eval line and record; a log begun again if it vanished), what
a log says of the run in the folder now (its records, the mel it was trained with, its table and
continuation rows), and the fingerprint of the data a run trains on. No torch: plot_curves.py and
sweep.py read logs without it.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys

from checks import UserError, room_to_write


@contextlib.contextmanager
def write_atomic(path, suffix=""):
    """Write path whole or not at all: the with-block writes the temporary name it gets, path +
    ".tmp" + suffix (suffix: for a writer that picks the format from the name, ".png" or ".npy"),
    which then replaces path. A file that has its final name is complete; a failed write leaves only
    the temporary (the cleanup globs' "*.tmp*")."""
    tmp = f"{path}.tmp{suffix}"
    yield tmp
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the lock: one writer per folder


@contextlib.contextmanager
def hold_folder(folder, flag="--out_dir", holders="a training, an evaluation or a sweep"):
    """One writer per folder: an exclusive lock on folder/lock while the with-block runs, so that a
    second training (or sweep; or prepare.py into a data folder: holders says what may hold it) into
    it is refused in one line. The kernel lets go of the lock however the process ends, a kill
    included; the file names the holder's process and is emptied on the way out, so a process named
    in a lock that was free was killed, and its lock is taken over with a note. A lock held by this
    process's parent counts as its own: sweep.py holds a run's folder across the training and the
    evaluation it starts there, and passes the open lock file (what the with-block gets; None where
    the parent holds the lock) to them, so that a training goes on holding it should the sweep die;
    the child adds its own process to the file meanwhile, so that a refusal names it, not the sweep,
    once the sweep has died. A folder made here that holds nothing but the lock at the end (the work
    was refused) is removed."""
    made, lock = not os.path.isdir(folder), os.path.join(folder, "lock")
    os.makedirs(folder, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = True
        except BlockingIOError:
            mine = False
        f.seek(0)
        # the holder, then the child holding it with it (a sweep's training), if any
        pids = f.read().split()
        if not mine and pids[:1] != [str(os.getppid())]:
            raise UserError(
                f"{folder} is in use: {lock_holder(pids)} holds its lock ({holders}): let it end, "
                f"or pass another {flag}"
            )
        if mine and pids:
            print(
                f"note: {folder}/lock names process {', '.join(pids)}, which ended without letting "
                "go of it (killed?): taken over",
                flush=True,
            )
        f.truncate(0)  # "a+" appends: at 0, the file being empty
        f.write(str(os.getpid()) if mine else f"{pids[0]} {os.getpid()}")
        f.flush()
        try:
            yield f if mine else None
        finally:
            f.truncate(0)
            if not mine:
                f.write(pids[0])  # the parent's again
                f.flush()
            if mine and made and os.listdir(folder) == ["lock"]:
                # while it is still held: a process that opened it meanwhile is refused
                os.remove(lock)
                os.rmdir(folder)


def lock_holder(pids):
    """Who holds a lock whose file names pids: the process that took it, or, once that one has ended
    (a sweep killed), the child that goes on holding it (its training)."""
    if not pids:
        return "another process"
    if len(pids) > 1 and not alive(pids[0]) and alive(pids[1]):
        return f"process {pids[1]} (started by process {pids[0]}, which has ended)"
    return f"process {pids[0]}"


def alive(pid):
    try:
        os.kill(int(pid), 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        # another user's process; or not a number, which only a person writes: say what it says
        return True
    return True


# -----------------------------------------------------------------------------
# log.jsonl: one JSON record a line, appended by whisper_gpt.py, read by plot_curves.py and sweep.py

CUT = {
    "event": "cut",
    "note": "the line before this one was cut off when its process stopped: readers skip it",
}


class LogError(UserError, ValueError):
    """A log.jsonl that cannot be read: the message names the file and the line."""


def append_record(path, record):
    """Append one record as one line. A last line that a killed process left without its newline is
    closed first and marked cut, so that the new record starts a line of its own and the readers
    know to skip the cut one."""
    cut = False
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    line = ("\n" + json.dumps(CUT) + "\n" if cut else "") + json.dumps(record) + "\n"
    with (
        room_to_write(
            os.path.dirname(path) or ".",
            len(line),
            "free some space, then resume the run (a line cut short is skipped by the readers)",
        ),
        open(path, "a") as f,
    ):
        f.write(line)


def log_event(out_dir, record, start=None):
    """Append record to out_dir/log.jsonl. A log that vanished under a running training (deleted,
    moved) is begun again with the run's start record (start), marked, and a note: the run goes on,
    and the log every reader finds opens with its start (plot_curves refuses evals after none)."""
    path = os.path.join(out_dir, "log.jsonl")
    if start is not None and not os.path.isfile(path):
        print(
            f"note: {path} has vanished (deleted or moved?): begun again with this run's start "
            f"record; the records before step {record['iter']} are not in it"
        )
        append_record(path, {**start, "log_begun_again_at": record["iter"]})
    append_record(path, record)


def log_eval(c, it, epoch_steps, lr, train_nll, tok_s, result, elapsed, start=None):
    """An eval's line, and its record in log.jsonl (start: the run's start record, see log_event)"""
    print(
        f"epoch {it / epoch_steps:6.2f} | step {it:6d} | train {fmt(train_nll, '.4f')} | "
        f"val {result.nll:.4f} {plus_minus(result.se, '.4f')} | acc {result.acc:6.2%} | "
        f"ppl {math.exp(result.nll):7.2f} | {fmt(tok_s, ',.0f')} tok/s | {elapsed:6.0f} s"
    )
    record = {"event": "eval", "iter": it, "epoch": it / epoch_steps}
    record |= {"tokens": it * c.batch_size * c.block_size, "lr": lr, "train_nll": train_nll}
    record |= {"val_nll": result.nll, "val_nll_se": result.se, "val_acc": result.acc}
    record |= {"val_ppl": math.exp(result.nll), "tokens_per_s": tok_s, "elapsed_s": elapsed}
    log_event(c.out_dir, record, start)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def plus_minus(se, spec=".3f"):
    """'± se', or what stands in its place for an evaluation on one window (no spread to measure)"""
    return "(one window: no SE)" if se is None else f"± {se:{spec}}"


def read_records(path):
    """[(line number, record)] of a log.jsonl, each record a JSON object with an "event". A line cut
    off by a killed process is skipped with a note: the last line, left without its newline, or one
    a later writer marked cut. Any other line that is not a record is one error naming the file and
    the line."""
    with open(path, errors="replace") as f:
        # after a final newline, "": a last line with text is unterminated
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if i == len(lines) - 1 or marked_cut(lines[i + 1 :]):
                print(
                    f"note: {path}:{i + 1}: skipped a line cut off when its run stopped: "
                    f"{line[:60]!r}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            raise LogError(
                f"{path}:{i + 1}: not valid JSON ({getattr(e, 'msg', e)}) in the middle of the "
                f"log, so damaged, not cut off: {line[:80]!r}"
            ) from None
        if not isinstance(record, dict) or "event" not in record:
            raise LogError(f"{path}:{i + 1}: a record must be a JSON object with an 'event' key")
        if record["event"] != CUT["event"]:
            records.append((i + 1, record))
    return records


def marked_cut(rest):
    """Whether the next line with text among rest is the mark that append_record leaves after
    a cut line."""
    line = next((line for line in rest if line.strip()), "")
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event") == CUT["event"]


# -----------------------------------------------------------------------------
# what a log says of the run in the folder now


def this_run(records):
    """The run in the folder now: read_records' [(line number, record)] from the last "start" on, or
    [] with no start. An earlier start belongs to a run that the folder's newer run replaced."""
    starts = [i for i, (_, record) in enumerate(records) if record["event"] == "start"]
    return records[starts[-1] :] if starts else []


def trained_with(run):
    """The mel a run (this_run's records, without their line numbers) was trained with: its start's
    mel_source, 'audio' for every run before the flag (and for no run at all)."""
    return (run[0].get("config") or {}).get("mel_source", "audio") if run else "audio"


def table_rows(run, mel_source=None):
    """The run's table rows (eval_only on all val windows) evaluated with mel_source (None: with any
    mel). A row that names no mel (a GPT's, and every row before the flag) was fed the mel the run
    was trained with."""
    return [
        r
        for r in run
        if r["event"] == "eval_only"
        and not r.get("subset")
        and mel_source in (None, r.get("mel_source") or trained_with(run))
    ]


def continuation_rows(run):
    """The run's continuation rows (whisper_gpt.py --eval_only --prompt_seconds) on all val
    windows."""
    return [r for r in run if r["event"] == "continuation" and not r.get("subset")]


# -----------------------------------------------------------------------------
# the data a run trains on


def data_fingerprint(data_dir, meta):
    """What a run records of the data it trains on: the folder, its tokenizer, its counts and a hash
    of meta.json, the offline tokenizer's tokenizer.pt and the tokens (2 bytes each: 0.1 GB, a
    fraction of a second, at the paper's 200 h; the mel rows, 64 times larger, are made from the
    same audio), which changes whenever the corpus or its tokenizer is made again."""
    digest = hashlib.sha256()
    for name in ("meta.json", "tokenizer.pt", "train_tokens.bin", "val_tokens.bin"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return {
        "data_dir": data_dir,
        "tokenizer": meta.get("tokenizer"),
        "vocab_size": meta.get("vocab_size"),
        "n_train": meta.get("n_train", 0),
        "n_val": meta.get("n_val", 0),
        "sha256": digest.hexdigest()[:16],
    }


def check_same_data(recorded, now, run):
    """Refuse data other than a run's in one line naming both: recorded is the fingerprint the run
    was trained with, now that of the data it is about to read. A copy of the same corpus elsewhere
    is the same data."""
    if recorded["sha256"] == now["sha256"]:
        return

    def described(f):
        return (
            f"{f['data_dir']}: tokenizer {f['tokenizer']}, vocabulary {f['vocab_size']}, "
            f"{f['n_train']:,} train and {f['n_val']:,} val tokens"
        )

    if os.path.realpath(recorded["data_dir"]) == os.path.realpath(now["data_dir"]):
        raise UserError(
            f"{now['data_dir']} was made again after {run} was trained on it (then "
            f"{described(recorded)}; now {described(now)}): train a new run on it"
        )
    raise UserError(
        f"{run} was trained on {described(recorded)}; not on {described(now)}: leave out "
        f"--data_dir and --dataset to use the run's own data, or train a new run on the other"
    )
