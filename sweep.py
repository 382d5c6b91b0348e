"""
How much larger must a token-only GPT be to match the hybrid? Train the runs that answer it: the
paper's three models with three seeds each, a size sweep of the token-only GPT (8 layers, widths 32
to 512, 2.3 M to 28.9 M parameters) and the hybrid at twice its width, all on the default recipe and
data.

    python sweep.py                   # every run in turn; finished runs are skipped, cut ones
    resumed python sweep.py --jobs 2          # two runs at a time, one thread each (a 2-core
    machine) python sweep.py --list            # each run's state, then exit
    python sweep.py gpt-s-s1338       # just the runs named
    python sweep.py --dataset tts     # the paper's three models, three seeds each, on data/tts
    (tts-gpt-s-s1337, ...)

Every hybrid is evaluated twice: with the audio's mel (the paper's number, its row) and with the
decoded mel (the mel generation can have: decoding.Decoder); hybrid-decoded-s<seed> is the hybrid
trained on the decoded mel.

Each run is `python whisper_gpt.py <its flags> --out_dir runs/<name>`, then the same with
--eval_only for its table row; its output goes to runs/<name>/train.log. A run whose process is cut
off (a machine stopped, a kill) resumes from its last checkpoint (once an epoch) when the sweep runs
again, and draws the same crops as an unbroken run. runs/<name>/log.jsonl, which plot_curves.py
reads, is small and committed; checkpoints are not.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from checks import Parser, UserError, run_script
from runlog import (
    continuation_rows,
    hold_folder,
    read_records,
    table_rows,
    this_run,
    trained_with,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (1337, 1338, 1339)  # the default seed and two more: --seed sets the init and the crops
SELF_NOISE = "0.5"  # --mel_source self: the pilot's choice of remedy (NOTES.md), against none
WIDTHS = (32, 48, 96, 128, 192, 384, 512)  # token-only widths beside GPT-S (64) and GPT-L (256)
DATASETS = (
    "music",
    "tts",
)  # music: all the runs below; tts: the paper's models and hybrids x seeds


def heads(width):
    """One rule for the sweep: 8 heads, or width / 16 when that is more (head size at most 16). It
    gives the paper's GPT-S (64 wide, 8 heads) and GPT-L (256 wide, 16 heads)."""
    return max(8, width // 16)


def gpt(width):
    return ["--n_embd", str(width), "--n_head", str(heads(width))]


def runs(dataset="music"):
    """[(name, whisper_gpt.py flags)] in the order they train: the paper's models at the default
    seed first (Fig. 2 and Table 2), then the small widths, the other seeds, the wider hybrid, and
    the largest widths last. Every run differs only in its model flags and seed: the default recipe,
    on data/<dataset>. Another dataset than music has the paper's three models with three seeds,
    named <dataset>-<model>-s<seed>."""
    paper = {"gpt-s": gpt(64), "hybrid": ["--hybrid", "--n_embd", "64"], "gpt-l": gpt(256)}
    hybrid = paper["hybrid"]
    decoded = {  # the hybrids that generate from what generation has (issues 32 and 38)
        "hybrid-decoded": hybrid + ["--mel_source", "decoded"],  # trained on the decoded mel
        "hybrid-prompt": hybrid
        + ["--mel_source", "prompt"],  # the audio's mel up to a cut, none on
        "hybrid-self": hybrid + ["--mel_source", "self", "--mel_noise", SELF_NOISE],  # its own mel
    }
    pilot = {  # the self-mel hybrid's remedies for exposure bias, one seed each (NOTES.md)
        "hybrid-self-nonoise": hybrid + ["--mel_source", "self", "--mel_noise", "0"],
        "hybrid-self-feedback": hybrid + ["--mel_source", "self", "--mel_feedback"],
    }
    prefix = "" if dataset == "music" else f"{dataset}-"

    def seeded(name, flags, seed):
        return f"{prefix}{name}-s{seed}", ["--dataset", dataset] + flags + ["--seed", str(seed)]

    order = [seeded(name, flags, SEEDS[0]) for name, flags in paper.items()]
    if dataset != "music":
        order += [seeded(name, flags, SEEDS[0]) for name, flags in decoded.items()]
        return order + [
            seeded(name, flags, seed)
            for seed in SEEDS[1:]
            for name, flags in (paper | decoded).items()
        ]
    order += [seeded(f"gpt-w{w}", gpt(w), SEEDS[0]) for w in WIDTHS if w <= 192]
    order += [seeded(name, flags, seed) for seed in SEEDS[1:] for name, flags in paper.items()]
    order += [seeded("hybrid-w128", ["--hybrid", "--n_embd", "128"], SEEDS[0])]
    order += [seeded(f"gpt-w{w}", gpt(w), SEEDS[0]) for w in WIDTHS if w > 192]
    order += [seeded(name, flags, seed) for seed in SEEDS for name, flags in decoded.items()]
    return order + [seeded(name, flags, SEEDS[0]) for name, flags in pilot.items()]


def state(out_dir):
    """'done' (its eval_only row and its continuation row on all val windows are logged), 'trained'
    (a finished checkpoint: the evaluation is left to do), 'resume' (a checkpoint to continue from)
    or 'new' (also a logged run whose checkpoint is gone and whose continuation row is missing: it
    trains again, to the same digits, and its log gains the run once more)."""
    run = logged_run(out_dir)
    done = table_rows(run, trained_with(run))
    if done and (continuation_rows(run) or not done[-1].get("continues", True)):
        return "done"
    if os.path.isfile(os.path.join(out_dir, "ckpt_best.pt")) and done:
        return "trained"
    if not os.path.isfile(os.path.join(out_dir, "ckpt_latest.pt")):
        return "new"
    evals = [r for r in run if r["event"] == "eval"]  # the sweep's runs end with an epoch
    return "trained" if evals and evals[-1]["epoch"] >= run[0]["config"]["epochs"] else "resume"


def logged_run(out_dir):
    """The records of the run in out_dir now (runlog.this_run, without line numbers), or [] without
    a log."""
    log = os.path.join(out_dir, "log.jsonl")
    return [r for _, r in this_run(read_records(log))] if os.path.isfile(log) else []


def say(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def train(name, flags, runs_dir, threads, extra_flags=()):
    """Train one run to the end and log its table row. Returns its eval_only record; raises on a
    failed step.

    The run folder's lock (runlog.hold_folder), held by the training process too (its file
    descriptor is inherited), keeps a second sweep from training the same folder while the first
    one's process still runs, even if that sweep died."""
    out_dir = os.path.join(runs_dir, name)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = (
        [sys.executable, os.path.join(HERE, "whisper_gpt.py")]
        + flags
        + list(extra_flags)
        + ["--out_dir", out_dir]
    )
    t0 = time.time()
    with (
        hold_folder(out_dir, "--runs_dir") as lock,
        open(os.path.join(out_dir, "train.log"), "a") as out,
    ):
        how = state(out_dir)
        # the row and the continuation row, with the mel the run was trained with (its flags)
        steps = {"done": [], "resume": [["--init_from", "resume"]], "trained": [], "new": [[]]}[how]
        steps += [] if how == "done" else [["--eval_only"]]
        if how != "done" and "--hybrid" in flags:  # and with the mel generation can have
            steps += {
                "audio": [["--eval_only", "--mel_source", "decoded", "--prompt_seconds", "0"]],
                "prompt": [["--eval_only", "--continue_mel", "decoded"]],
            }.get(
                flags[flags.index("--mel_source") + 1] if "--mel_source" in flags else "audio", []
            )
        if how != "done":
            say(
                f"{name}: "
                + {
                    "resume": "resumed from its last checkpoint",
                    "trained": "trained; evaluating it",
                    "new": "started",
                }[how]
            )
        for extra in steps:
            out.write(f"$ {' '.join(command + extra)}\n")
            out.flush()
            rc = subprocess.run(
                command + extra,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(lock.fileno(),) if lock else (),
            ).returncode
            if rc != 0:
                raise RuntimeError(
                    f"{name}: {' '.join(command[1:] + extra)} exited with status {rc}; "
                    f"its output is in {out.name}"
                )
    run = logged_run(out_dir)
    final = table_rows(run, trained_with(run))[-1]
    if how != "done":
        se = final["val_nll_se"]  # None for a val split of one window
        say(
            f"{name}: val NLL {final['val_nll']:.3f} "
            + ("(one window: no SE)" if se is None else f"± {se:.3f}")
            + f", {final['params']:,} parameters, {(time.time() - t0) / 60:.1f} min"
        )
    return final


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="runs to train (default: all, in order)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each with --threads threads"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per run; 0 = the cores / jobs"
    )
    parser.add_argument(
        "--runs_dir", default=os.path.join(HERE, "runs"), help="where the run folders go"
    )
    parser.add_argument("--list", action="store_true", help="print each run's state and exit")
    parser.add_argument(
        "--dataset", default="music", choices=DATASETS, help="the built-in corpus the runs train on"
    )
    parser.add_argument(
        "--dtype", help="whisper_gpt.py's --dtype for every run (default: its own default)"
    )
    args = parser.parse_args(argv)
    todo = runs(args.dataset)
    unknown = set(args.names) - {name for name, _ in todo}
    if unknown:
        raise UserError(
            f"no run named {', '.join(sorted(unknown))} (python sweep.py --list shows them)"
        )
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    todo = [(name, flags) for name, flags in todo if not args.names or name in args.names]
    if args.list:
        for name, flags in todo:
            print(
                f"{name:18s} {state(os.path.join(args.runs_dir, name)):7s} {' '.join(flags)}",
                flush=True,
            )
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    left = [name for name, _ in todo if state(os.path.join(args.runs_dir, name)) != "done"]
    say(
        f"{len(todo)} runs, {len(todo) - len(left)} done; {len(left)} to train, {args.jobs} at a "
        "time with "
        f"{threads} thread(s) each, into {args.runs_dir}"
    )
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            name: pool.submit(
                train,
                name,
                flags,
                args.runs_dir,
                threads,
                ["--dtype", args.dtype] if args.dtype else [],
            )
            for name, flags in todo
        }
        for name, future in futures.items():
            try:
                future.result()
            except (RuntimeError, UserError) as e:
                say(f"FAILED {e}")
                failed.append(name)
    if failed:
        raise UserError(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; the others are done. Run it again "
            "to resume them, after reading their train.log"
        )
    say("all runs done: python plot_curves.py draws Fig. 4 and writes figures/tables.md")


if __name__ == "__main__":
    run_script(main)
