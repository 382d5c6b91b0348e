"""
Redraw the paper's Figs. 2-3 (val NLL against epoch for GPT-S, GPT-L and the hybrid) and its Tables
1-2 from the runs' log.jsonl files, with the paper's own numbers beside ours; and Fig. 4, which the
paper lacks: val NLL against parameters and training FLOPs for a size sweep of the token-only GPT,
with the hybrid beside it.

    python plot_curves.py                      # every runs/*/log.jsonl (sweep.py's runs, committed)
    -> figures/ python plot_curves.py out-gpt-s-music out-hybrid-music --out_dir my-figures

Writes <out_dir>/fig2_music.png, <out_dir>/fig3_libritts.png (one figure per dataset that has runs),
<out_dir>/fig4_size_music.png (where a dataset has a size sweep) and <out_dir>/tables.md. Runs of
one model with several seeds are reported as their mean ± the standard error over seeds. Missing
runs are printed and marked in the table, never skipped in silence. figures/ holds what the
committed runs give, so it is the default --out_dir only for them: any other set of runs names its
own.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt

from checks import Parser, UserError, check_writable, run_script
from runlog import (
    LogError,
    continuation_rows,
    read_records,
    table_rows,
    this_run,
    trained_with,
    write_atomic,
)
from whisper_gpt import Config, flops_per_token

MODELS = ("GPT-S", "GPT-L", "hybrid")  # the paper's three models, in its row order
COLORS = {"GPT-S": "C0", "GPT-L": "C1", "hybrid": "C2"}  # one colour per model in every figure
# dataset name in the log -> (figure, table, name the paper uses, PNG file name)
PAPER_LAYOUT = {
    "music": ("Fig. 2", "Table 2", "music", "fig2_music.png"),
    "speech": ("Fig. 3", "Table 1", "LibriTTS", "fig3_libritts.png"),
    "libritts": ("Fig. 3", "Table 1", "LibriTTS", "fig3_libritts.png"),
    "tts": ("Fig. 3", "Table 1", "synthetic speech, one Piper voice, not LibriTTS", "fig3_tts.png"),
}
# a built-in stand-in's rows sit beside the paper's numbers for the corpus it stands for
STAND_INS = {"synthetic speech, one Piper voice, not LibriTTS": "LibriTTS"}
# the paper's Tables 1-2: params (millions), NLL (nats/token), accuracy (%), PPL
PAPER_NUMBERS = {
    "LibriTTS": {
        "GPT-S": (3.7, 2.02, 34.18, 7.54),
        "GPT-L": (40, 1.94, 34.82, 6.96),
        "hybrid": (4, 1.93, 35.05, 6.96),
    },
    "music": {
        "GPT-S": (3.7, 2.78, 34.96, 16.12),
        "GPT-L": (40, 2.77, 35.72, 15.96),
        "hybrid": (4, 2.52, 38.47, 12.43),
    },
}
REQUIRED = {
    "start": ("model", "params", "dataset", "tokenizer"),
    "eval": ("iter", "epoch", "val_nll", "val_acc", "val_ppl"),
    "eval_only": ("params", "val_nll", "val_acc", "val_ppl"),
    "continuation": ("prompt_seconds", "val_nll", "val_acc"),
}
# whisper_gpt.py's continuation row: what a hybrid was fed after the prompt, as Fig. 5 names it
AFTER = {"decoded": "the decoded mel", "none": "no mel", "self": "its own mel"}
# the recipe: runs compared in one figure or table must agree on these (where their logs record
# them)
RECIPE = ("block_size", "batch_size", "epochs", "lr", "lr_drop_at", "max_iters", "dropout", "dtype")


# -----------------------------------------------------------------------------
# reading logs


def read_log(path):
    """Parse one log.jsonl into a run dict {dir, model, params, dataset, tokenizer, evals, final}.

    The run is the one in the folder now (runlog.this_run: the last "start" record on). A resume
    re-logs evals from its checkpoint on: an eval whose iter is not past the previous one's drops
    the evals it overlaps. An eval_only on a subset of the val windows (a quick look) is never taken
    for the run's result, nor one that fed a hybrid another mel than it was trained on
    (--mel_source): those go to run["other_mel"][source]."""
    records = read_records(path)
    if not records:
        raise LogError(f"{path}: empty log, no records")
    for lineno, rec in records:
        check_record(path, lineno, rec)
    lineno, first = records[0]
    if first["event"] != "start":
        raise LogError(f"{path}:{lineno}: '{first['event']}' record before any 'start' record")
    numbered = this_run(records)
    start, records = numbered[0][1], [rec for _, rec in numbered]
    run = {
        "dir": os.path.dirname(path) or ".",
        "log": path,
        "evals": [],
        "mel_source": trained_with(records),
        "baselines": start.get("baselines"),
        "config": start.get("config") or {},
        **{k: start[k] for k in REQUIRED["start"]},
    }
    for lineno, rec in numbered:
        if rec["event"] == "eval":
            run["evals"] = [e for e in run["evals"] if e["iter"] < rec["iter"]] + [rec]
        elif rec["event"] == "eval_only" and rec.get("subset"):
            print(
                f"note: {path}:{lineno}: an eval_only of {rec.get('n_windows')} val windows, a "
                "subset: not in the tables",
                flush=True,
            )
    own = table_rows(records, run["mel_source"])
    run["final"] = own[-1] if own else None
    others = table_rows(records)
    run["other_mel"] = {
        r["mel_source"]: r for r in others if r.get("mel_source") not in (None, run["mel_source"])
    }
    # continue_mel (None: a GPT) -> its continuation row
    run["continued"] = {r.get("continue_mel"): r for r in continuation_rows(records)}
    return run


def check_record(path, lineno, rec):
    """Refuse a record that lacks the keys its event needs (unknown events are kept, unused)."""
    missing = [k for k in REQUIRED.get(rec["event"], ()) if k not in rec]
    if missing:
        raise LogError(f"{path}:{lineno}: '{rec['event']}' record lacks {', '.join(missing)}")
    for k in REQUIRED.get(rec["event"], ()):
        if k not in ("model", "dataset", "tokenizer") and not isinstance(rec[k], (int, float)):
            raise LogError(f"{path}:{lineno}: '{k}' must be a number, got {rec[k]!r}")


def find_logs(run_dirs):
    """The log.jsonl of each run folder given; by default those of runs/*/ (sweep.py's), or of out*/
    without them."""
    if not run_dirs:
        logs = sorted(glob.glob(os.path.join("runs", "*", "log.jsonl"))) or sorted(
            glob.glob("out*/log.jsonl")
        )
        if not logs:
            raise LogError(
                "no runs/*/log.jsonl or out*/log.jsonl here: train a model first or name the run "
                "folders"
            )
        return logs
    logs = [os.path.join(d, "log.jsonl") for d in run_dirs]
    for log in logs:
        if not os.path.isfile(log):
            raise LogError(f"{log}: no such file (is {os.path.dirname(log)} a run folder?)")
    return logs


def label_of(run):
    """The paper's name for the paper's three models (the hybrid at its width of 64 only), the mel
    it was trained on for the other hybrids, else model and width."""
    width = run["config"].get("n_embd")
    wide = "" if width in (None, 64) else f" w{width}"
    if run["model"] == "hybrid" and run["mel_source"] != "audio":  # another experiment
        noise = run["config"].get("mel_noise") or 0
        remedy = f"noise {noise:g}" if noise else "no remedy"
        if run["config"].get("mel_feedback"):
            remedy = "second pass" + (f", noise {noise:g}" if noise else "")
        return {
            "decoded": "hybrid, decoded mel",
            "prompt": "hybrid, prompt's mel",
            "self": f"hybrid, own mel, {remedy}",
        }[run["mel_source"]] + wide
    if run["model"] in ("GPT-S", "GPT-L") or (run["model"] == "hybrid" and not wide):
        return run["model"]
    if width is not None:
        return f"{'hybrid' if run['model'] == 'hybrid' else 'GPT'}{wide}"
    return f"{run['model']} ({os.path.basename(run['dir'])})"


def group_runs(runs):
    """{dataset as the paper names it: {label: [runs, one per seed]}}. Two runs of one model with
    one seed is an error (which belongs in the table is the user's call), and so are runs of one
    dataset with other recipes."""
    groups = {}
    for run in runs:
        group = groups.setdefault(
            paper_names(run["dataset"])[2], {}
        )  # "speech" and "LibriTTS" are one
        seeds = group.setdefault(label_of(run), [])
        twin = [r for r in seeds if r["config"].get("seed") == run["config"].get("seed")]
        if twin:
            raise LogError(
                f"two {label_of(run)} runs on {run['dataset']} with one seed: {twin[0]['dir']} and "
                f"{run['dir']}; name the run folders to use on the command line"
            )
        for other in (r for g in group.values() for r in g):
            for key in RECIPE:
                a, b = run["config"].get(key), other["config"].get(key)
                if a is not None and b is not None and a != b:
                    raise LogError(
                        f"{run['dir']} and {other['dir']} were trained with other recipes ({key} "
                        f"{a} and {b}): a figure compares runs of one recipe; plot them apart"
                    )
        seeds.append(run)
        seeds.sort(key=lambda r: r["config"].get("seed", 0))
    return groups


# -----------------------------------------------------------------------------
# the numbers: per run, then over seeds


def result_row(run):
    """(record, where it came from): the eval_only record if the run has one, else its best eval."""
    if run["final"] is not None:
        return run["final"], "eval_only"
    if not run["evals"]:
        return None, "started, no eval yet"
    best = min(run["evals"], key=lambda e: e["val_nll"])
    return best, f"best eval (epoch {best['epoch']:.2f})"


def train_seconds(run):
    """Wall time of the training run: its last eval's elapsed seconds (0 when it has none). Before
    87d7e3b a resumed run's clock started again at 0, so where the clock goes back the part before
    the resume is added."""
    total = last = 0.0
    for e in run["evals"]:
        elapsed = e.get("elapsed_s", 0.0)
        if elapsed < last:
            total += last
        last = elapsed
    return total + last


def mean_se(values):
    """Mean and standard error of the mean (nan for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def summary(runs):
    """One model's numbers over its seeds: {seeds, params, nll, se, se_over, acc, ppl, train_s,
    source}; None when no run has a result yet. se is over seeds where there are several, else the
    run's own over val windows."""
    rows = [(run, *result_row(run)) for run in runs]
    done = [(run, rec, source) for run, rec, source in rows if rec is not None]
    if not done:
        return None
    nll, se = mean_se([rec["val_nll"] for _, rec, _ in done])
    se_over = "seeds"
    if len(done) == 1:
        se, se_over = done[0][1].get("val_nll_se"), "windows"
    sources = sorted({source for _, _, source in done})
    return {
        "seeds": len(done),
        "params": done[0][0]["params"],
        "nlls": [rec["val_nll"] for _, rec, _ in done],
        "nll": nll,
        "se": se,
        "se_over": se_over,
        "acc": mean_se([rec["val_acc"] for _, rec, _ in done])[0],
        "ppl": math.exp(nll),
        "train_s": mean_se([train_seconds(run) for run, _, _ in done])[0],
        "config": done[0][0]["config"],
        "source": sources[0] if len(sources) == 1 else "; ".join(sources),
    }


def paired_difference(a, b):
    """Mean and standard error of a's NLL minus b's over the same val windows (paired: the spread
    between windows, which both models share, drops out), from their eval_only records; None without
    them."""
    if not (a and b and a.get("window_nll") and b.get("window_nll")) or len(a["window_nll"]) != len(
        b["window_nll"]
    ):
        return None
    mean, se = mean_se([x - y for x, y in zip(a["window_nll"], b["window_nll"], strict=False)])
    return mean, se, len(a["window_nll"])


def paired_over_seeds(runs_a, runs_b):
    """a − b paired window by window within each seed both have; (mean, se, seeds, windows): with
    several seeds, the mean and standard error over seeds of each seed's paired mean (what a second
    training run would vary); with one, that seed's mean and its standard error over windows. None
    when no seed has both."""
    b_by_seed = {run["config"].get("seed"): run for run in runs_b}
    pairs = [
        paired_difference(run["final"], b_by_seed[run["config"].get("seed")]["final"])
        for run in runs_a
        if run["config"].get("seed") in b_by_seed
    ]
    pairs = [p for p in pairs if p]
    if not pairs:
        return None
    if len(pairs) == 1:
        return pairs[0][0], pairs[0][1], 1, pairs[0][2]
    return (*mean_se([p[0] for p in pairs]), len(pairs), pairs[0][2])


def continued_runs(runs, after):
    """The runs with a continuation row fed after (the mel after the prompt; None for a GPT), each
    as a run whose final row is that row: summary() and paired_over_seeds() take them as they
    are."""
    return [dict(run, final=run["continued"][after]) for run in runs if after in run["continued"]]


def continuation_lines(group):
    """Fig. 5's lines, [(label, runs)]: GPT-S, GPT-L, then each hybrid of width 64 with each mel it
    was continued with; the token-only sizes of the sweep are Fig. 4's."""
    labels = [m for m in MODELS if m in group] + sorted(
        label for label in group if label.startswith("hybrid,") and " w" not in label
    )
    lines = []
    for label in labels:
        for after in sorted({a for run in group[label] for a in run["continued"]}, key=str):
            name = label if after is None else f"{label}; after the prompt: {AFTER[after]}"
            lines.append((name, continued_runs(group[label], after)))
    return lines


def bins_over_seeds(runs):
    """Each bin's mean NLL over seeds and its SE (over seeds, or over windows for one seed); a bin
    the windows do not reach is None."""
    by_seed = [run["final"]["bin_nll"] for run in runs]
    out = []
    for k in range(len(by_seed[0])):
        values = [b[k] for b in by_seed if b[k] is not None]
        if not values:
            out.append((None, None))
        elif len(values) > 1:
            out.append(mean_se(values))
        else:  # one seed: the spread over its windows
            windows = [w[k] for w in runs[0]["final"]["window_bin_nll"] if w[k] is not None]
            out.append((values[0], mean_se(windows)[1]))
    return out


def baselines(group):
    """{"unigram": nll, "bigram": nll} of the val split the runs share (prepare.py puts them in
    meta.json and the run in its start record); empty when no run has them, an error when runs
    disagree (other data)."""
    found = {
        json.dumps(run["baselines"], sort_keys=True)
        for runs in group.values()
        for run in runs
        if run.get("baselines")
    }
    if len(found) > 1:
        raise LogError(
            "the runs' count baselines differ: they were trained on different data folders"
        )
    refs = json.loads(found.pop()) if found else {}
    return {kind: refs[f"{kind}_nll"] for kind in ("unigram", "bigram") if f"{kind}_nll" in refs}


def tokenizers(group):
    return ", ".join(sorted({run["tokenizer"] for runs in group.values() for run in runs}))


def flops(s):
    """Training FLOPs per token of a summarised model, from its config (the defaults where the log
    lacks a field) and its parameter count."""
    return flops_per_token(
        SimpleNamespace(**{**dataclasses.asdict(Config()), **s["config"]}), s["params"]
    )


def matching_size(curve, target):
    """The parameter count at which the token-only curve [(params, nll)], interpolated linearly in
    log parameters, first comes down to target NLL; None when no size in the curve reaches it."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (p0, y0), (p1, y1) in zip(curve, curve[1:], strict=False):
        if y0 > target >= y1:
            return math.exp(
                math.log(p0) + (y0 - target) / (y0 - y1) * (math.log(p1) - math.log(p0))
            )
    return None


def size_sweep(group):
    """The token-only curve and the hybrid's match on it: {curve: [(label, summary)], hybrids:
    [...], match, low, high} or None when the dataset has fewer than three token-only sizes (the
    paper's two are not a curve) or no hybrid. The range is where
    the curve, moved by its standard error over seeds (none where a size has one seed), meets the
    hybrid's NLL moved by its own: the sizes the seeds' spread allows."""
    done = {label: s for label, s in ((label, summary(runs)) for label, runs in group.items()) if s}
    curve = sorted(
        (
            (label, s)
            for label, s in done.items()
            if not s["config"].get("hybrid", label == "hybrid")
        ),
        key=lambda item: item[1]["params"],
    )
    hybrids = sorted(
        ((label, s) for label, s in done.items() if s["config"].get("hybrid", label == "hybrid")),
        key=lambda item: item[1]["params"],
    )
    if len(curve) < 3 or "hybrid" not in done:
        return None
    h = done["hybrid"]
    h_se = h["se"] if h["se_over"] == "seeds" else 0.0

    def moved(sign):
        return [
            (s["params"], s["nll"] + sign * (s["se"] if s["se_over"] == "seeds" else 0.0))
            for _, s in curve
        ]

    return {
        "curve": curve,
        "hybrids": hybrids,
        "hybrid": h,
        "match": matching_size(moved(0), h["nll"]),
        "low": matching_size(moved(-1), h["nll"] + h_se),
        "high": matching_size(moved(+1), h["nll"] - h_se),
    }


def matches(group, sweep):
    """Each hybrid of width 64 against the token-only sizes on the same footing: teacher-forced (its
    table row against theirs) and continuing (its continuation rows against theirs, on the same
    prompts). [(model, fed, summary, the matching token-only size or None, the largest size run,
    whether the smallest size run is already lower)]."""

    def curve(continuing):
        points = []
        for label, _ in sweep["curve"]:
            runs = continued_runs(group[label], None) if continuing else group[label]
            s = summary(runs) if runs else None
            points += [(s["params"], s["nll"])] if s else []
        return sorted(points)

    given, going = curve(False), curve(True)
    rows = []
    for label in [m for m in group if m == "hybrid" or m.startswith("hybrid,") and " w" not in m]:
        s = summary(group[label])
        if s and given:
            below = s["nll"] > given[0][1]
            size = matching_size(given, s["nll"])
            rows.append((label, "teacher-forced", s, size, given[-1][0], below))
        for after in sorted({a for run in group[label] for a in run["continued"]}, key=str):
            c = summary(continued_runs(group[label], after))
            if c and going:
                fed = f"continuing, then {AFTER[after]}"
                size, below = matching_size(going, c["nll"]), c["nll"] > going[0][1]
                rows.append((label, fed, c, size, going[-1][0], below))
    return rows


def matches_markdown(rows):
    """The table of matches(): how many times larger a token-only GPT must be to match each."""
    out = [
        "**How much larger must a token-only GPT be?** For each hybrid, the token-only size (the "
        "sweep's curve, interpolated in log parameters) whose NLL comes down to the hybrid's: "
        "teacher-forced, the table rows; continuing, the continuation rows of both (Fig. 5's).",
        "",
        "| Model | fed | # params | seeds | NLL ± SE | matching token-only size | times its size |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, fed, s, size, largest, below in rows:
        if size is None:
            match = f"none up to {params_label(largest)} | > {largest / s['params']:.1f}x"
        elif below:  # the smallest size run already does better
            match = f"at most {params_label(size)} | ≤ {size / s['params']:.1f}x"
        else:
            match = f"{params_label(size)} | {size / s['params']:.1f}x"
        head = f"| {label} | {fed} | {params_label(s['params'])} | {s['seeds']} | {nll_cell(s)}"
        out.append(f"{head} | {match} |")
    return "\n".join(out)


def match_sentence(sweep):
    """tables.md's and the README's one sentence: the token-only size that matches the hybrid."""
    h, curve = sweep["hybrid"], sweep["curve"]
    spread = f"{h['seeds']} seeds" if h["se_over"] == "seeds" else "1 seed"
    largest = curve[-1][1]["params"]
    if sweep["match"] is None:
        return (
            f"None of the {len(curve)} token-only sizes run, {curve[0][1]['params'] / 1e6:.1f} to "
            f"{largest / 1e6:.1f} M parameters, reached the hybrid ({h['params'] / 1e6:.2f} M "
            "parameters, val NLL "
            f"{h['nll']:.3f}, {spread}): the largest, {largest / h['params']:.1f} times its size, "
            "ended at "
            f"{curve[-1][1]['nll']:.3f}."
        )
    low, high = sweep["low"], sweep["high"]
    within = (
        f"{low / 1e6:.1f} to {high / 1e6:.1f} M"
        if high is not None
        else f"{low / 1e6:.1f} M to beyond the sweep's largest ({largest / 1e6:.1f} M)"
    )
    return (
        f"The hybrid ({h['params'] / 1e6:.2f} M parameters, val NLL {h['nll']:.3f}, {spread}) "
        "matches a "
        f"token-only GPT of {sweep['match'] / 1e6:.1f} M parameters, "
        f"{sweep['match'] / h['params']:.1f} times "
        f"its size (interpolated in log parameters; {within} within the standard errors over "
        "seeds)."
    )


# -----------------------------------------------------------------------------
# the figures


def paper_names(dataset):
    """(figure, table, paper's dataset name, PNG name); datasets the paper lacks get their own
    names."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    by_name = {
        layout[2]: layout for layout in PAPER_LAYOUT.values()
    }  # group_runs keys the groups by this name
    return PAPER_LAYOUT.get(
        dataset.lower(),
        by_name.get(
            dataset, (f"Fig. ({dataset})", f"Table ({dataset})", dataset, f"fig_{safe}.png")
        ),
    )


def params_label(n):
    return f"{n / 1e6:.1f} M"


def save(fig, path):
    """Write a figure atomically: a PNG that has its final name is complete."""
    with write_atomic(path, ".png") as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp)
        plt.close(fig)


def plot_dataset(dataset, group, missing, path):
    """Val NLL against epoch for the paper's three models, labelled with the measured parameter
    count; the mean over seeds, with the seeds' range shaded. Returns the labels."""
    fig_name, _, name, _ = paper_names(dataset)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label in MODELS:
        runs = [run for run in group.get(label, []) if run["evals"]]
        if not runs:
            continue
        epochs = sorted(set.intersection(*({e["epoch"] for e in run["evals"]} for run in runs)))
        curves = [
            [{e["epoch"]: e["val_nll"] for e in run["evals"]}[x] for x in epochs] for run in runs
        ]
        mean = [sum(values) / len(values) for values in zip(*curves, strict=False)]
        seeds = f", mean of {len(runs)} seeds" if len(runs) > 1 else ""
        ax.plot(
            epochs,
            mean,
            marker="o",
            markersize=3,
            color=COLORS[label],
            label=f"{label} ({params_label(runs[0]['params'])}{seeds})",
        )
        if len(runs) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in zip(*curves, strict=False)],
                [max(v) for v in zip(*curves, strict=False)],
                color=COLORS[label],
                alpha=0.2,
                linewidth=0,
            )
    for (kind, nll), style in zip(baselines(group).items(), ("--", ":"), strict=False):
        ax.axhline(
            nll, color="gray", linestyle=style, linewidth=1, label=f"count {kind} of this val split"
        )
    title = f"{fig_name}: {name}, validation loss"
    tok = f"(tokenizer: {tokenizers(group)})"
    title += (
        f"\n{tok}" if len(title) + len(tok) > 80 else f" {tok}"
    )  # a long title on two lines, not cut off
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
    save(fig, path)
    return labels


def plot_size(dataset, group, sweep, path):
    """Fig. 4: val NLL against parameters and against training FLOPs per token (log axes): the
    token-only sweep as a curve (mean ± SE over seeds, every seed a dot), the hybrids as stars, the
    count bigram as a line; below, where runs have continuation rows, the same for continuing 3 s
    of audio (Fig. 5's NLL), each hybrid with each mel it is fed after the prompt."""
    name = paper_names(dataset)[2]
    millions = lambda x, _=None: f"{x / 1e6:g} M"
    going = [(label, continued_runs(group[label], None)) for label, _ in sweep["curve"]]
    going_hybrids = [
        (f"{label}, then {AFTER[after]}", continued_runs(group[label], after))
        for label, _ in sweep["hybrids"]
        for after in sorted({a for run in group[label] for a in run["continued"]}, key=str)
    ]
    panels = [("given the audio (teacher-forced)", sweep["curve"], sweep["hybrids"])]
    if any(runs for _, runs in going):
        summarised = lambda pairs: [(label, summary(runs)) for label, runs in pairs if runs]
        panels.append(("continuing 3 s of audio", summarised(going), summarised(going_hybrids)))
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(10, 4.2 * len(panels)), dpi=120, sharey="row", squeeze=False
    )
    for row, (what, curve, hybrids) in zip(axes, panels, strict=True):
        for ax, x_of, xlabel in (
            (row[0], lambda s: s["params"], "parameters"),
            (row[1], flops, "training FLOPs per token"),
        ):
            ax.errorbar(
                [x_of(s) for _, s in curve],
                [s["nll"] for _, s in curve],
                color="C0",
                marker="o",
                markersize=4,
                capsize=3,
                label="token-only GPT, 8 layers",
                yerr=[s["se"] if s["se_over"] == "seeds" else 0.0 for _, s in curve],
            )
            for label, s in curve:
                ax.plot([x_of(s)] * s["seeds"], s["nlls"], ".", color="C0", alpha=0.4)
                ax.annotate(
                    label.replace("GPT w", "w"),
                    (x_of(s), s["nll"]),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=7,
                )
            for i, (label, s) in enumerate(hybrids):
                ax.errorbar(
                    [x_of(s)],
                    [s["nll"]],
                    yerr=[s["se"] if s["se_over"] == "seeds" else 0.0],
                    marker="*",
                    markersize=12,
                    capsize=3,
                    linestyle="none",
                    color=f"C{2 + i}",
                    label=f"{label} ({params_label(s['params'])})",
                )
            for kind, nll in baselines(group).items():
                if kind == "bigram":
                    ax.axhline(
                        nll,
                        color="gray",
                        linestyle="--",
                        linewidth=1,
                        label="count bigram of this val split",
                    )
            ax.set_xscale("log")
            # in millions, and between the powers of ten only at 2, 3 and 5, so the labels do
            # not run together
            ax.xaxis.set_major_formatter(millions)
            ax.xaxis.set_minor_formatter(
                lambda x, _: (
                    millions(x) if round(x / 10 ** math.floor(math.log10(x))) in (2, 3, 5) else ""
                )
            )
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, which="both")
        row[0].set_ylabel(f"val NLL, {what}")
        row[0].legend(fontsize=7)
    if sweep["match"] is not None:
        axes[0][0].axvline(
            sweep["match"],
            color="C2",
            linestyle=":",
            linewidth=1,
            label=f"token-only size matching the hybrid: {params_label(sweep['match'])}",
        )
        axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"Fig. 4: {name}, how large must a token-only GPT be? (tokenizer: {tokenizers(group)})",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, path)


def plot_continuation(dataset, group, lines, path):
    """Fig. 5: NLL of the true continuation against seconds after the prompt ends, one line per
    model and the mel it is fed after the prompt (mean ± SE over seeds), the count baselines as
    lines."""
    first = lines[0][1][0]["final"]
    edges = first["bins"]
    fig, ax = plt.subplots(figsize=(7.4, 4.4), dpi=120)
    x = list(range(len(edges) - 1))
    for i, (label, runs) in enumerate(lines):
        points = [
            (k, m, se)
            for k, (m, se) in zip(x, bins_over_seeds(runs), strict=False)
            if m is not None
        ]
        seeds = summary(runs)["seeds"]
        ax.errorbar(
            [k for k, _, _ in points],
            [m for _, m, _ in points],
            yerr=[0.0 if se is None or math.isnan(se) else se for _, _, se in points],
            marker="o",
            markersize=3,
            capsize=3,
            color=COLORS.get(label, f"C{3 + i}"),
            label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})",
        )
    styles = {"unigram": ":", "bigram": "--"}
    for kind, nll in baselines(group).items():
        ax.axhline(nll, color="gray", linestyle=styles[kind], linewidth=1, label=f"count {kind}")
    ax.set_xticks(x, [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)])
    ax.set_xlabel(f"seconds after the {first['prompt_seconds']:g} s prompt ends")
    ax.set_ylabel("NLL of the true continuation (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(
        f"Fig. 5: {paper_names(dataset)[2]}, continuing audio (tokenizer: {tokenizers(group)})",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, path)


# -----------------------------------------------------------------------------
# the tables


def fmt_time(seconds):
    return f"{seconds / 60:.1f} min" if seconds else "-"


def nll_cell(s):
    se = s["se"]
    return f"{s['nll']:.3f}" + ("" if se is None or math.isnan(se) else f" ± {se:.3f}")


def table_markdown(dataset, group, missing):
    """One table in the layout of the paper's Tables 1-2, ours beside the paper's, with a
    caption."""
    _, table_name, name, _ = paper_names(dataset)
    paper_corpus = STAND_INS.get(name, name)
    paper = PAPER_NUMBERS.get(paper_corpus, {})
    tok = tokenizers(group) if group else "none"
    caption = (
        f"**{table_name}** ({name}): val NLL (nats/token), top-1 accuracy and PPL = exp(NLL); "
        f"ours with tokenizer `{tok}`, the paper's with EnCodec 24 kHz codebook 0"
        + (f" on {paper_corpus}" if paper_corpus != name else "")
        + ". Ours are the mean over "
        "the seeds run, ± the standard error over seeds (over val windows where a model has one "
        "seed)."
    )
    if any("offline" in run["tokenizer"].lower() for runs in group.values() for run in runs):
        caption += (
            " The offline tokenizer (random-weight EnCodec, k-means codebook) makes different "
            "tokens "
            "from the real EnCodec: our numbers are NOT comparable with the paper's."
        )
    if len({run["tokenizer"] for runs in group.values() for run in runs}) > 1:
        caption += (
            " The runs used different tokenizers: their rows are not comparable with each other."
        )
    lines = [
        caption,
        "",
        "| Model | seeds | # params (ours) | # params (paper) | NLL ± SE (ours) | NLL (paper) | "
        "Accuracy (ours) "
        "| Accuracy (paper) | PPL (ours) | PPL (paper) | training time | our row from |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in MODELS:
        p = paper.get(label)
        theirs = [f"{p[0]} M", f"{p[1]:.2f}", f"{p[2]:.2f} %", f"{p[3]:.2f}"] if p else ["-"] * 4
        runs = group.get(label, [])
        s = summary(runs) if runs else None
        ours = (
            [params_label(s["params"]), nll_cell(s), f"{100 * s['acc']:.2f} %", f"{s['ppl']:.2f}"]
            if s
            else [params_label(runs[0]["params"]) if runs else "-", "-", "-", "-"]
        )
        source = s["source"] if s else ("started, no eval yet" if runs else "**not run**")
        cells = (
            [label, str(s["seeds"]) if s else "-"]
            + [c for pair in zip(ours, theirs, strict=False) for c in pair]
            + [fmt_time(s["train_s"]) if s else "-", source]
        )
        lines.append("| " + " | ".join(cells) + " |")
    for kind, nll in baselines(group).items():
        lines.append(
            f"| count {kind} (train counts, add-one) | - | - | - | {nll:.3f} | - | - | - | "
            f"{math.exp(nll):.2f} | - | - | meta.json |"
        )
    diffs = [
        (a, b, paired_over_seeds(group.get(a, []), group.get(b, [])))
        for a, b in (("hybrid", "GPT-S"), ("hybrid", "GPT-L"), ("GPT-L", "GPT-S"))
    ]
    diffs = [(a, b, d) for a, b, d in diffs if d]
    if diffs:
        counts, windows = {d[2] for _, _, d in diffs}, diffs[0][2][3]
        if counts == {1}:
            how = f"over the same {windows} val windows (mean ± SE)"
        elif len(counts) == 1:
            how = (
                f"(mean ± SE over {min(counts)} seeds of each seed's mean difference over the "
                f"same {windows} "
                f"val windows)"
            )
        else:  # models run with different numbers of seeds: each difference says how many it has
            how = (
                f"(each seed's mean difference over the same {windows} val windows; mean ± SE "
                "over the seeds both "
                f"models have, or over the windows where they share one)"
            )
        # where the counts differ, each difference says its own; one count for all: the heading says
        # it
        seeds = lambda n: (
            "" if len(counts) == 1 else " (1 seed, SE over windows)" if n == 1 else f" ({n} seeds)"
        )
        lines += [
            "",
            f"Paired differences in NLL {how}: "
            + "; ".join(f"{a} − {b}: {d[0]:+.3f} ± {d[1]:.3f}{seeds(d[2])}" for a, b, d in diffs)
            + ".",
        ]
    lines += generation_markdown(group)
    if missing:
        lines += ["", f"Missing: {', '.join(missing)}."]
    return "\n".join(lines)


def generation_markdown(group):
    """What the hybrid sees when it generates: its checkpoints evaluated with the decoded mel (the
    mel of its own tokens decoded, all that generation has) and the hybrid trained on it, beside
    GPT-S and the paper's hybrid; no lines when no run has them."""
    fed = [
        dict(run, final=run["other_mel"]["decoded"])
        for run in group.get("hybrid", [])
        if "decoded" in run["other_mel"]
    ]
    rows = [
        ("GPT-S", group.get("GPT-S", [])),
        ("GPT-L", group.get("GPT-L", [])),
        (
            "hybrid, the audio's mel (the paper's: teacher-forced with the original audio)",
            group.get("hybrid", []),
        ),
        ("hybrid, the same checkpoints fed the decoded mel (what generation has)", fed),
        ("hybrid trained and evaluated on the decoded mel", group.get("hybrid, decoded mel", [])),
    ]
    if not fed and not rows[-1][1]:
        return []
    lines = [
        "",
        "**What the hybrid sees when it generates.** Generating, the hybrid has no audio, only "
        "the tokens "
        "it made: its mel can only be their decoded mel (`--mel_source decoded`: the offline "
        "stand-in decoder's "
        "per-token mean mel, or EnCodec's decoder). Val NLL, mean ± SE over seeds (over val "
        "windows for one).",
        "",
        "| Model, and the mel it is fed | seeds | NLL ± SE | Accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for label, runs in rows:
        s = summary(runs) if runs else None
        lines.append(
            f"| {label} | {s['seeds']} | {nll_cell(s)} | {100 * s['acc']:.2f} % |"
            if s
            else f"| {label} | - | **not run** | - |"
        )
    pairs = [
        (f"{a} − {b}", paired_over_seeds(x, y))
        for a, x, b, y in (
            ("hybrid fed the decoded mel", fed, "GPT-S", group.get("GPT-S", [])),
            (
                "hybrid fed the decoded mel",
                fed,
                "hybrid fed the audio's mel",
                group.get("hybrid", []),
            ),
            ("hybrid trained on the decoded mel", rows[-1][1], "GPT-S", group.get("GPT-S", [])),
            ("hybrid trained on the decoded mel", rows[-1][1], "GPT-L", group.get("GPT-L", [])),
        )
    ]
    pairs = [(name, d) for name, d in pairs if d]
    if pairs:
        lines += [
            "",
            "Paired differences in NLL (mean ± SE over seeds of each seed's mean over the same "
            "val windows; "
            "over the windows for one seed): "
            + "; ".join(
                f"{name}: {d[0]:+.3f} ± {d[1]:.3f} ({d[2]} seed{'s' if d[2] > 1 else ''})"
                for name, d in pairs
            )
            + ".",
        ]
    return lines


def continuation_markdown(dataset, group, lines):
    """Fig. 5's table: each model's NLL of the true continuation of a val window's first seconds
    (the tokens true; a hybrid fed the audio's mel in the prompt and, after it, what generation
    has), paired window by window with GPT-S and GPT-L, and by seconds after the prompt."""
    first = lines[0][1][0]["final"]
    edges = first["bins"]
    spans = [f"{a:g}-{b:g} s" for a, b in zip(edges, edges[1:], strict=False)]
    pair = lambda runs, other: paired_over_seeds(runs, dict(lines).get(other, []))
    cell = lambda d: "-" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"
    out = [
        f"**Fig. 5's table: continuing {first['prompt_seconds']:g} s of audio** "
        f"({paper_names(dataset)[2]}). Each val window's first {first['prompt_seconds']:g} s "
        "are given (the tokens, and a hybrid the audio's mel); after them the tokens stay the "
        "true ones and a hybrid is fed what it has while generating. NLL of the tokens after the "
        "prompt, mean ± SE over seeds (over val windows for one seed); paired: the same windows.",
        "",
        f"| Model; the mel after the prompt | seeds | NLL ± SE | − GPT-S | − GPT-L | "
        f"{' | '.join(spans)} |",
        "| --- | --- | --- | --- | --- |" + " --- |" * len(spans),
    ]
    for label, runs in lines:
        s = summary(runs)
        by_bin = [fmt_pair(m, se) for m, se in bins_over_seeds(runs)]
        out.append(
            f"| {label} | {s['seeds']} | {nll_cell(s)} | {cell(pair(runs, 'GPT-S'))} | "
            f"{cell(pair(runs, 'GPT-L'))} | {' | '.join(by_bin)} |"
        )
    for kind, nll in baselines(group).items():
        out.append(
            f"| count {kind} (all val tokens) | - | {nll:.3f} | - | - |" + " - |" * len(spans)
        )
    return "\n".join(out)


def fmt_pair(mean, se):
    if mean is None:
        return "-"
    return f"{mean:.3f}" + ("" if se is None or math.isnan(se) else f" ± {se:.3f}")


def sweep_markdown(dataset, group, sweep):
    """The size sweep behind Fig. 4: every size's parameters, FLOPs, seeds and NLL, and the matching
    size."""
    name = paper_names(dataset)[2]
    lines = [
        f"**Size sweep** ({name}, Fig. 4): the same recipe and data for every model; 8 layers, "
        "8 heads or width / 16 when that is more. NLL ± SE over seeds (over val windows for one "
        "seed).",
        "",
        "| Model | width | heads | # params | training FLOPs / token | seeds | NLL ± SE | Accuracy "
        "| training time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in sweep["curve"] + sweep["hybrids"]:
        c = s["config"]
        lines.append(
            f"| {label} | {c.get('n_embd', '-')} | {c.get('n_head', '-')} | "
            f"{params_label(s['params'])} | "
            f"{flops(s) / 1e6:.1f} M | {s['seeds']} | {nll_cell(s)} | {100 * s['acc']:.2f} % | "
            f"{fmt_time(s['train_s'])} |"
        )
    for kind, nll in baselines(group).items():
        lines.append(f"| count {kind} | - | - | - | - | - | {nll:.3f} | - | - |")
    rows = matches(group, sweep)
    return "\n".join(
        lines + ["", match_sentence(sweep)] + (["", matches_markdown(rows)] if rows else [])
    )


def default_out_dir(logs):
    """figures/ for the committed runs (runs/*/, the default); any other set of runs would overwrite
    the committed figures and tables with its own, so it names a folder of its own."""
    committed = glob.glob(os.path.join("runs", "*", "log.jsonl"))
    if committed and sorted(map(os.path.realpath, logs)) == sorted(
        map(os.path.realpath, committed)
    ):
        return "figures"
    raise UserError(
        "figures/ holds what the committed runs (runs/*/, the default) give, and these runs are "
        "others: "
        "pass --out_dir DIR for their figures and tables"
    )


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "run_dirs", nargs="*", help="run folders with a log.jsonl (default: runs/*/, else out*/)"
    )
    parser.add_argument(
        "--out_dir",
        help="where the PNGs and tables.md go (default: figures/, for the committed runs/*/ only)",
    )
    args = parser.parse_args(argv)

    logs = find_logs(args.run_dirs)
    groups = group_runs([read_log(log) for log in logs])
    for dataset in (
        "music",
        "LibriTTS",
    ):  # the paper's two datasets are always reported, even when absent
        groups.setdefault(dataset, {})
    args.out_dir = args.out_dir or default_out_dir(logs)
    check_writable(args.out_dir, "--out_dir")
    os.makedirs(args.out_dir, exist_ok=True)
    tables = ["# Tables 1-2: our runs beside the paper's", ""]
    for dataset in sorted(groups, key=lambda d: paper_names(d)[0]):
        group = groups[dataset]
        fig_name, _, name, png = paper_names(dataset)
        missing = [m for m in MODELS if m not in group]
        missing += [
            f"{k} (no eval yet)" for k in MODELS if k in group and summary(group[k]) is None
        ]
        if missing:
            print(f"{name}: missing: {', '.join(missing)}", flush=True)
        tables += [table_markdown(dataset, group, missing), ""]
        if not any(m in group for m in MODELS):
            what = "runs of the paper's models" if group else "runs"
            print(f"{name}: no {what}, so no {fig_name}", flush=True)
        else:
            path = os.path.join(args.out_dir, png)
            plot_dataset(dataset, group, missing, path)
            print(f"{name}: {fig_name} -> {path}", flush=True)
        lines = continuation_lines(group)
        if lines:
            suffix = os.path.splitext(png)[0].split("_", 1)[1]
            path = os.path.join(args.out_dir, f"fig5_continuation_{suffix}.png")
            plot_continuation(dataset, group, lines, path)
            tables += [continuation_markdown(dataset, group, lines), ""]
            print(f"{name}: Fig. 5 -> {path}", flush=True)
        sweep = size_sweep(group)
        if sweep:
            path = os.path.join(
                args.out_dir, f"fig4_size_{os.path.splitext(png)[0].split('_', 1)[1]}.png"
            )
            plot_size(dataset, group, sweep, path)
            tables += [sweep_markdown(dataset, group, sweep), ""]
            print(f"{name}: Fig. 4 -> {path}\n{match_sentence(sweep)}", flush=True)
    table_path = os.path.join(args.out_dir, "tables.md")
    with write_atomic(table_path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(tables))
    print(f"tables -> {table_path}", flush=True)


if __name__ == "__main__":
    run_script(main)
