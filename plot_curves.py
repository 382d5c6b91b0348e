"""
Redraw the paper's Figs. 2-3 (val NLL against epoch for GPT-S, GPT-L and the hybrid) and its Tables 1-2
from the runs' log.jsonl files, with the paper's own numbers beside ours.

    python plot_curves.py                      # every out*/log.jsonl under the current folder
    python plot_curves.py out-gpts out-hybrid --out_dir figures

Writes <out_dir>/fig2_music.png, <out_dir>/fig3_libritts.png (one figure per dataset that has runs) and
<out_dir>/tables.md. Missing runs are printed and marked in the table, never skipped in silence.
"""
import argparse
import glob
import json
import math
import os
import sys

import matplotlib
matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt

MODELS = ("GPT-S", "GPT-L", "hybrid")  # the paper's three models, in its row order
COLORS = {"GPT-S": "C0", "GPT-L": "C1", "hybrid": "C2"}  # one colour per model in every figure
# dataset name in the log -> (figure, table, name the paper uses, PNG file name)
PAPER_LAYOUT = {
    "music": ("Fig. 2", "Table 2", "music", "fig2_music.png"),
    "speech": ("Fig. 3", "Table 1", "LibriTTS", "fig3_libritts.png"),
    "libritts": ("Fig. 3", "Table 1", "LibriTTS", "fig3_libritts.png"),
}
# the paper's Tables 1-2: params (millions), NLL (nats/token), accuracy (%), PPL
PAPER_NUMBERS = {
    "LibriTTS": {"GPT-S": (3.7, 2.02, 34.18, 7.54), "GPT-L": (40, 1.94, 34.82, 6.96),
                 "hybrid": (4, 1.93, 35.05, 6.96)},
    "music": {"GPT-S": (3.7, 2.78, 34.96, 16.12), "GPT-L": (40, 2.77, 35.72, 15.96),
              "hybrid": (4, 2.52, 38.47, 12.43)},
}
REQUIRED = {
    "start": ("model", "params", "dataset", "tokenizer"),
    "eval": ("iter", "epoch", "val_nll", "val_acc", "val_ppl"),
    "eval_only": ("params", "val_nll", "val_acc", "val_ppl"),
}


class LogError(ValueError):
    """A log.jsonl that cannot be read: the message names the file and the line."""


# -----------------------------------------------------------------------------
# reading logs

def read_log(path):
    """Parse one log.jsonl into a run dict {dir, model, params, dataset, tokenizer, evals, final}.

    The run is the last "start" line and everything after it (an earlier start belongs to a run that
    this folder's newer run replaced). A resume re-logs evals from its checkpoint on: an eval whose iter
    is not past the previous one's drops the evals it overlaps."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not any(line.strip() for line in lines):
        raise LogError(f"{path}: empty log, no records")
    run = None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = parse_record(path, lineno, line)
        if rec["event"] == "start":
            run = {"dir": os.path.dirname(path) or ".", "log": path, "evals": [], "final": None,
                   "baselines": rec.get("baselines"), **{k: rec[k] for k in REQUIRED["start"]}}
        elif run is None:
            raise LogError(f"{path}:{lineno}: '{rec['event']}' record before any 'start' record")
        elif rec["event"] == "eval":
            run["evals"] = [e for e in run["evals"] if e["iter"] < rec["iter"]] + [rec]
        elif rec["event"] == "eval_only":
            run["final"] = rec
    if run is None:
        raise LogError(f"{path}: no 'start' record")
    return run


def parse_record(path, lineno, line):
    """One JSON line -> dict, checked for the keys its event needs (unknown events are kept, unused)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LogError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
    if not isinstance(rec, dict) or "event" not in rec:
        raise LogError(f"{path}:{lineno}: a record must be a JSON object with an 'event' key")
    missing = [k for k in REQUIRED.get(rec["event"], ()) if k not in rec]
    if missing:
        raise LogError(f"{path}:{lineno}: '{rec['event']}' record lacks {', '.join(missing)}")
    for k in REQUIRED.get(rec["event"], ()):
        if k not in ("model", "dataset", "tokenizer") and not isinstance(rec[k], (int, float)):
            raise LogError(f"{path}:{lineno}: '{k}' must be a number, got {rec[k]!r}")
    return rec


def find_logs(run_dirs):
    """The log.jsonl of each run folder given, or of every out*/ folder when none are given."""
    if not run_dirs:
        logs = sorted(glob.glob("out*/log.jsonl"))
        if not logs:
            raise FileNotFoundError("no out*/log.jsonl here: train a model first or name the run folders")
        return logs
    logs = [os.path.join(d, "log.jsonl") for d in run_dirs]
    for log in logs:
        if not os.path.isfile(log):
            raise FileNotFoundError(f"{log}: no such file (is {os.path.dirname(log)} a run folder?)")
    return logs


def group_runs(runs):
    """{dataset as the paper names it: {label: run}}; GPT-S/GPT-L/hybrid label themselves, custom runs by folder.
    Two runs of one model on one dataset is an error: which one belongs in the table is the user's call."""
    groups = {}
    for run in runs:
        label = run["model"] if run["model"] in MODELS else f"{run['model']} ({os.path.basename(run['dir'])})"
        group = groups.setdefault(paper_names(run["dataset"])[2], {})  # "speech" and "LibriTTS" are one
        if label in group:
            raise ValueError(f"two {label} runs on {run['dataset']}: {group[label]['dir']} and {run['dir']}; "
                             "name the run folders to use on the command line")
        group[label] = run
    return groups


# -----------------------------------------------------------------------------
# the figure and the table

def paper_names(dataset):
    """(figure, table, paper's dataset name, PNG name); datasets the paper lacks get their own names."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    return PAPER_LAYOUT.get(dataset.lower(), (f"Fig. ({dataset})", f"Table ({dataset})", dataset, f"fig_{safe}.png"))


def params_label(n):
    return f"{n / 1e6:.1f} M"


def plot_dataset(dataset, group, missing, path):
    """Val NLL against epoch, one line per run labelled with its measured parameter count; returns the labels."""
    fig_name, _, name, _ = paper_names(dataset)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, run in group.items():
        if run["evals"]:
            epochs = [e["epoch"] for e in run["evals"]]
            nlls = [e["val_nll"] for e in run["evals"]]
            ax.plot(epochs, nlls, marker="o", markersize=3, color=COLORS.get(label),
                    label=f"{label} ({params_label(run['params'])})")
    for (kind, nll), style in zip(baselines(group).items(), ("--", ":")):
        ax.axhline(nll, color="gray", linestyle=style, linewidth=1, label=f"count {kind} of this val split")
    title = f"{fig_name}: {name}, validation loss (tokenizer: {tokenizers(group)})"
    if missing:
        title += f"\nmissing: {', '.join(missing)}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val NLL (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    labels = [line.get_label() for line in ax.lines]
    tmp = path + ".tmp.png"  # matplotlib picks the format from the suffix
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return labels


def baselines(group):
    """{"unigram": nll, "bigram": nll} of the val split the runs share (prepare.py puts them in meta.json and
    the run in its start record); empty when no run has them, an error when runs disagree (other data)."""
    found = {json.dumps(run["baselines"], sort_keys=True) for run in group.values() if run.get("baselines")}
    if len(found) > 1:
        raise ValueError("the runs' count baselines differ: they were trained on different data folders")
    refs = json.loads(found.pop()) if found else {}
    return {kind: refs[f"{kind}_nll"] for kind in ("unigram", "bigram") if f"{kind}_nll" in refs}


def paired_difference(a, b):
    """Mean and standard error of a's NLL minus b's over the same val windows (paired: the spread between
    windows, which both models share, drops out), from their eval_only records; None without them."""
    if not (a and b and a.get("window_nll") and b.get("window_nll")) or len(a["window_nll"]) != len(b["window_nll"]):
        return None
    d = [x - y for x, y in zip(a["window_nll"], b["window_nll"])]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return mean, se, len(d)


def train_time(run):
    """Wall time of the training run, from its last eval's elapsed seconds."""
    return f"{run['evals'][-1]['elapsed_s'] / 60:.1f} min" if run["evals"] and "elapsed_s" in run["evals"][-1] else "-"


def tokenizers(group):
    return ", ".join(sorted({run["tokenizer"] for run in group.values()}))


def result_row(run):
    """(record, where it came from): the eval_only record if the run has one, else its best eval."""
    if run["final"] is not None:
        return run["final"], "eval_only"
    if not run["evals"]:
        return None, "started, no eval yet"
    best = min(run["evals"], key=lambda e: e["val_nll"])
    return best, f"best eval (epoch {best['epoch']:.2f})"


def table_markdown(dataset, group, missing):
    """One table in the layout of the paper's Tables 1-2, ours beside the paper's, with a caption."""
    _, table_name, name, _ = paper_names(dataset)
    paper = PAPER_NUMBERS.get(name, {})
    tok = tokenizers(group) if group else "none"
    caption = (f"**{table_name}** ({name}): val NLL (nats/token), top-1 accuracy and PPL = exp(NLL); "
               f"ours with tokenizer `{tok}`, the paper's with EnCodec 24 kHz codebook 0.")
    if any("offline" in run["tokenizer"].lower() for run in group.values()):
        caption += (" The offline tokenizer (random-weight EnCodec, k-means codebook) makes different tokens "
                    "from the real EnCodec: our numbers are NOT comparable with the paper's.")
    if len({run["tokenizer"] for run in group.values()}) > 1:
        caption += " The runs used different tokenizers: their rows are not comparable with each other."
    lines = [caption, "",
             "| Model | # params (ours) | # params (paper) | NLL ± SE (ours) | NLL (paper) | Accuracy (ours) "
             "| Accuracy (paper) | PPL (ours) | PPL (paper) | training time | our row from |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in list(MODELS) + [k for k in group if k not in MODELS]:
        p = paper.get(label)
        theirs = [f"{p[0]} M", f"{p[1]:.2f}", f"{p[2]:.2f} %", f"{p[3]:.2f}"] if p else ["-"] * 4
        run = group.get(label)
        rec, source = result_row(run) if run else (None, "**not run**")
        se = f" ± {rec['val_nll_se']:.3f}" if rec and rec.get("val_nll_se") is not None else ""
        ours = ([params_label(run["params"]), f"{rec['val_nll']:.3f}{se}", f"{100 * rec['val_acc']:.2f} %",
                 f"{rec['val_ppl']:.2f}"] if rec else
                [params_label(run["params"]) if run else "-", "-", "-", "-"])
        cells = [label] + [c for pair in zip(ours, theirs) for c in pair] + [train_time(run) if run else "-", source]
        lines.append("| " + " | ".join(cells) + " |")
    for kind, nll in baselines(group).items():
        lines.append(f"| count {kind} (train counts, add-one) | - | - | {nll:.3f} | - | - | - | {math.exp(nll):.2f} "
                     "| - | - | meta.json |")
    finals = {label: run["final"] for label, run in group.items()}
    diffs = [(a, b, paired_difference(finals.get(a), finals.get(b)))
             for a, b in (("hybrid", "GPT-S"), ("hybrid", "GPT-L"), ("GPT-L", "GPT-S"))]
    diffs = [(f"{a} − {b}: {d[0]:+.3f} ± {d[1]:.3f}", d[2]) for a, b, d in diffs if d]
    if diffs:
        lines += ["", f"Paired differences in NLL over the same {diffs[0][1]} val windows (mean ± SE): "
                  + "; ".join(text for text, _ in diffs) + "."]
    if missing:
        lines += ["", f"Missing: {', '.join(missing)}."]
    return "\n".join(lines)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", help="run folders with a log.jsonl (default: out*/)")
    parser.add_argument("--out_dir", default="figures", help="where the PNGs and tables.md go")
    args = parser.parse_args(argv)

    groups = group_runs([read_log(log) for log in find_logs(args.run_dirs)])
    for dataset in ("music", "LibriTTS"):  # the paper's two datasets are always reported, even when absent
        groups.setdefault(dataset, {})
    os.makedirs(args.out_dir, exist_ok=True)
    tables = ["# Tables 1-2: our runs beside the paper's", ""]
    for dataset in sorted(groups, key=lambda d: paper_names(d)[0]):
        group = groups[dataset]
        fig_name, _, name, png = paper_names(dataset)
        missing = [m for m in MODELS if m not in group]
        missing += [f"{k} (no eval yet)" for k, run in group.items() if result_row(run)[0] is None]
        if missing:
            print(f"{name}: missing: {', '.join(missing)}", flush=True)
        tables += [table_markdown(dataset, group, missing), ""]
        if not group:
            print(f"{name}: no runs, so no {fig_name}", flush=True)
            continue
        path = os.path.join(args.out_dir, png)
        plot_dataset(dataset, group, missing, path)
        print(f"{name}: {fig_name} -> {path}", flush=True)
    table_path = os.path.join(args.out_dir, "tables.md")
    write_atomic(table_path, "\n".join(tables))
    print(f"tables -> {table_path}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (LogError, FileNotFoundError, ValueError) as e:  # a user's mistake: one line, no traceback
        sys.exit(f"plot_curves.py: error: {e}")
