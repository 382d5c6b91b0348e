"""
How much larger must a token-only GPT be to match the hybrid? Train the runs that answer it: the paper's three
models with three seeds each, a size sweep of the token-only GPT (8 layers, widths 32 to 512, 2.3 M to 28.9 M
parameters) and the hybrid at twice its width, all on the default recipe and data.

    python sweep.py                   # every run in turn; finished runs are skipped, cut ones resumed
    python sweep.py --jobs 2          # two runs at a time, one thread each (a 2-core machine)
    python sweep.py --list            # each run's state, then exit
    python sweep.py gpt-s-s1338       # just the runs named

Each run is `python whisper_gpt.py <its flags> --out_dir runs/<name>`, then the same with --eval_only for its
table row; its output goes to runs/<name>/train.log. A run whose process is cut off (a machine stopped, a kill)
resumes from its last checkpoint (once an epoch) when the sweep runs again, and draws the same crops as an unbroken
run. runs/<name>/log.jsonl, which plot_curves.py reads, is small and committed; checkpoints are not.
"""
import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from checks import UserError, run_script

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (1337, 1338, 1339)  # the default seed and two more: --seed sets the initialisation and the crops
WIDTHS = (32, 48, 96, 128, 192, 384, 512)  # token-only widths beside GPT-S (64) and GPT-L (256)
COMMON = ["--dataset", "music"]  # the default recipe and data: every run here differs only in its model flags


def heads(width):
    """One rule for the sweep: 8 heads, or width / 16 when that is more (head size at most 16). It gives the
    paper's GPT-S (64 wide, 8 heads) and GPT-L (256 wide, 16 heads)."""
    return max(8, width // 16)


def gpt(width):
    return ["--n_embd", str(width), "--n_head", str(heads(width))]


def runs():
    """[(name, whisper_gpt.py flags)] in the order they train: the paper's models at the default seed first
    (Fig. 2 and Table 2), then the small widths, the other seeds, the wider hybrid, and the largest widths last."""
    paper = {"gpt-s": gpt(64), "hybrid": ["--hybrid", "--n_embd", "64"], "gpt-l": gpt(256)}

    def seeded(name, flags, seed):
        return f"{name}-s{seed}", flags + ["--seed", str(seed)]

    order = [seeded(name, flags, SEEDS[0]) for name, flags in paper.items()]
    order += [seeded(f"gpt-w{w}", gpt(w), SEEDS[0]) for w in WIDTHS if w <= 192]
    order += [seeded(name, flags, seed) for seed in SEEDS[1:] for name, flags in paper.items()]
    order += [seeded("hybrid-w128", ["--hybrid", "--n_embd", "128"], SEEDS[0])]
    order += [seeded(f"gpt-w{w}", gpt(w), SEEDS[0]) for w in WIDTHS if w > 192]
    return order


def state(out_dir):
    """'done' (its eval_only row is logged), 'resume' (a checkpoint to continue from) or 'new'."""
    log = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            events = [json.loads(line)["event"] for line in f if line.strip()]
        starts = [i for i, e in enumerate(events) if e == "start"]
        if starts and "eval_only" in events[starts[-1]:]:
            return "done"
    return "resume" if os.path.isfile(os.path.join(out_dir, "ckpt_latest.pt")) else "new"


def say(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def train(name, flags, runs_dir, threads):
    """Train one run to the end and log its table row. Returns its eval_only record; raises on a failed step.

    A lock on runs/<name>/lock, held by the training process itself (its file descriptor is inherited), keeps a
    second sweep from training the same folder while the first one's process still runs, even if that sweep died."""
    out_dir = os.path.join(runs_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{name}: another process is training {out_dir}; left alone") from None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.join(HERE, "whisper_gpt.py")] + COMMON + flags + ["--out_dir", out_dir]
    t0 = time.time()
    with lock, open(os.path.join(out_dir, "train.log"), "a") as out:
        how = state(out_dir)
        if how != "done":
            say(f"{name}: {'resumed from its last checkpoint' if how == 'resume' else 'started'}")
            for extra in (["--init_from", "resume"] if how == "resume" else [], ["--eval_only"]):
                out.write(f"$ {' '.join(command + extra)}\n")
                out.flush()
                rc = subprocess.run(command + extra, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(lock.fileno(),)).returncode
                if rc != 0:
                    raise RuntimeError(f"{name}: {' '.join(command[1:] + extra)} exited with status {rc}; "
                                       f"its output is in {out.name}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        final = [json.loads(line) for line in f if '"eval_only"' in line][-1]
    if how != "done":
        say(f"{name}: val NLL {final['val_nll']:.3f} ± {final['val_nll_se']:.3f}, {final['params']:,} parameters, "
            f"{(time.time() - t0) / 60:.1f} min")
    return final


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="runs to train (default: all, in order)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with --threads threads")
    parser.add_argument("--threads", type=int, default=0, help="threads per run; 0 = the cores / jobs")
    parser.add_argument("--runs_dir", default=os.path.join(HERE, "runs"), help="where the run folders go")
    parser.add_argument("--list", action="store_true", help="print each run's state and exit")
    args = parser.parse_args(argv)
    todo = runs()
    unknown = set(args.names) - {name for name, _ in todo}
    if unknown:
        raise UserError(f"no run named {', '.join(sorted(unknown))} (python sweep.py --list shows them)")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    todo = [(name, flags) for name, flags in todo if not args.names or name in args.names]
    if args.list:
        for name, flags in todo:
            print(f"{name:18s} {state(os.path.join(args.runs_dir, name)):7s} {' '.join(flags)}", flush=True)
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    left = [name for name, _ in todo if state(os.path.join(args.runs_dir, name)) != "done"]
    say(f"{len(todo)} runs, {len(todo) - len(left)} done; {len(left)} to train, {args.jobs} at a time with "
        f"{threads} thread(s) each, into {args.runs_dir}")
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(train, name, flags, args.runs_dir, threads) for name, flags in todo}
        for name, future in futures.items():
            try:
                future.result()
            except (RuntimeError, UserError) as e:
                say(f"FAILED {e}")
                failed.append(name)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; the others are done. Run it again "
                        "to resume them, after reading their train.log")
    say("all runs done: python plot_curves.py draws Fig. 4 and writes figures/tables.md")


if __name__ == "__main__":
    run_script(main)
