"""Tests of sample.py and plot_curves.py: CPU only, tiny data made here.  python -m pytest -q test_sample_part.py"""
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

import plot_curves

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# plot_curves.py


def write_log(run_dir, model, dataset, params, nlls, final_nll=None, tokenizer="offline-random-encodec-kmeans"):
    """A log.jsonl as whisper_gpt.py writes it: a start line, one eval per val NLL (two per epoch), and an
    eval_only line when final_nll is given."""
    os.makedirs(run_dir, exist_ok=True)
    records = [{"event": "start", "model": model, "params": params, "dataset": dataset, "tokenizer": tokenizer,
                "config": {}}]
    for i, nll in enumerate(nlls):
        records.append({"event": "eval", "iter": 10 * i, "epoch": i / 2, "tokens": 7500 * i, "lr": 2e-4,
                        "train_nll": nll, "val_nll": nll, "val_acc": 0.5 - nll / 20, "val_ppl": math.exp(nll),
                        "tokens_per_s": 1000.0, "elapsed_s": float(i)})
    if final_nll is not None:
        records.append({"event": "eval_only", "params": params, "val_nll": final_nll, "val_acc": 0.3125,
                        "val_ppl": math.exp(final_nll), "n_windows": 4, "tokens": 3000, "iter": 10})
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


def test_plot_curves_makes_both_figures_and_the_table(tmp_path, capsys):
    runs = [write_log(tmp_path / "out-s-music", "GPT-S", "music", 3_312_000, [5.0, 4.0, 3.5], final_nll=3.123),
            write_log(tmp_path / "out-h-music", "hybrid", "music", 3_712_000, [5.0, 3.2, 3.4]),  # no GPT-L
            write_log(tmp_path / "out-s-sp", "GPT-S", "speech", 3_312_000, [4.0, 3.0]),
            write_log(tmp_path / "out-l-sp", "GPT-L", "speech", 39_000_000, [4.0, 2.9]),
            write_log(tmp_path / "out-h-sp", "hybrid", "speech", 3_712_000, [4.0, 2.8])]
    out = tmp_path / "figures"
    plot_curves.main(runs + ["--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert "music: missing: GPT-L" in printed
    for name in ("fig2_music.png", "fig3_libritts.png"):
        image = matplotlib.image.imread(out / name)  # raises on a file that is not a valid PNG
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05
    assert sorted(os.listdir(out)) == ["fig2_music.png", "fig3_libritts.png", "tables.md"]  # no temp files left
    markdown = (out / "tables.md").read_text()
    music, speech = table_rows(markdown)  # Fig. 2 / Table 2 (music) first, as the figures are numbered
    assert music["GPT-S"][1:5] == ["3.3 M", "3.7 M", "3.123", "2.78"]  # eval_only row beats the evals
    assert music["GPT-S"][9] == "eval_only"
    assert music["hybrid"][3:9] == ["3.200", "2.52", "34.00 %", "38.47 %", f"{math.exp(3.2):.2f}", "12.43"]
    assert music["hybrid"][9] == "best eval (epoch 0.50)"  # the lowest val NLL, not the last
    assert music["GPT-L"][2] == "40 M" and music["GPT-L"][3] == "-" and "not run" in music["GPT-L"][9]
    assert speech["GPT-L"][1:5] == ["39.0 M", "40 M", "2.900", "1.94"]
    assert "Table 1" in markdown and "Table 2" in markdown and "NOT comparable" in markdown
    assert "offline-random-encodec-kmeans" in markdown and "Missing: GPT-L." in markdown


def test_plot_curves_labels_each_curve_with_its_parameter_count(tmp_path):
    group = {"GPT-S": plot_curves.read_log(write_log(tmp_path / "a", "GPT-S", "music", 3_312_000, [4, 3]) +
                                           "/log.jsonl"),
             "hybrid": plot_curves.read_log(write_log(tmp_path / "b", "hybrid", "music", 3_712_000, [4, 2]) +
                                            "/log.jsonl")}
    labels = plot_curves.plot_dataset("music", group, ["GPT-L"], str(tmp_path / "fig.png"))
    assert labels == ["GPT-S (3.3 M)", "hybrid (3.7 M)"]


def test_plot_curves_reports_a_dataset_with_no_runs(tmp_path, capsys):
    run = write_log(tmp_path / "out-s", "GPT-S", "music", 3_312_000, [4.0, 3.0])
    plot_curves.main([run, "--out_dir", str(tmp_path / "fig")])
    printed = capsys.readouterr().out
    assert "LibriTTS: no runs, so no Fig. 3" in printed and "music: missing: GPT-L, hybrid" in printed
    music, speech = table_rows((tmp_path / "fig" / "tables.md").read_text())
    assert all("not run" in speech[m][9] for m in ("GPT-S", "GPT-L", "hybrid"))
    assert not (tmp_path / "fig" / "fig3_libritts.png").exists()


def test_a_resumed_run_replaces_the_evals_it_relogged(tmp_path):
    run = write_log(tmp_path / "out", "GPT-S", "music", 100, [5.0, 4.0, 3.0])  # iters 0, 10, 20
    with open(os.path.join(run, "log.jsonl"), "a") as f:  # resumed from the checkpoint of iter 10
        for it, nll in ((20, 3.5), (30, 3.2)):
            f.write(json.dumps({"event": "eval", "iter": it, "epoch": it / 20, "val_nll": nll, "val_acc": 0.1,
                                "val_ppl": math.exp(nll)}) + "\n")
    evals = plot_curves.read_log(os.path.join(run, "log.jsonl"))["evals"]
    assert [(e["iter"], e["val_nll"]) for e in evals] == [(0, 5.0), (10, 4.0), (20, 3.5), (30, 3.2)]


@pytest.mark.parametrize("text, message", [
    ("", "log.jsonl: empty log"),
    ("\n\n", "log.jsonl: empty log"),
    ('{"event": "start", "model": "GPT-S", "params": 1, "dataset": "music", "tokenizer": "t"}\n{"event": "eval",',
     "log.jsonl:2: not valid JSON"),
    ('{"event": "start", "model": "GPT-S", "params": 1, "dataset": "music", "tokenizer": "t"}\n'
     '{"event": "eval", "iter": 0, "epoch": 0.0, "val_acc": 0.1, "val_ppl": 2.0}\n', "log.jsonl:2: 'eval' record lacks val_nll"),
    ('{"event": "eval", "iter": 0, "epoch": 0.0, "val_nll": 1.0, "val_acc": 0.1, "val_ppl": 2.0}\n',
     "log.jsonl:1: 'eval' record before any 'start' record"),
    ('[1, 2]\n', "log.jsonl:1: a record must be a JSON object"),
])
def test_plot_curves_fails_clearly_on_an_empty_or_malformed_log(tmp_path, text, message):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "log.jsonl").write_text(text)
    with pytest.raises(plot_curves.LogError, match=message):
        plot_curves.main([str(tmp_path / "out"), "--out_dir", str(tmp_path / "fig")])
    assert not (tmp_path / "fig").exists()  # nothing half-written


def test_plot_curves_cli_prints_one_line_naming_the_file(tmp_path):
    os.makedirs(tmp_path / "out-x")
    (tmp_path / "out-x" / "log.jsonl").write_text("")
    r = subprocess.run([sys.executable, os.path.join(HERE, "plot_curves.py")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "plot_curves.py: error: out-x/log.jsonl: empty log, no records"


def test_plot_curves_refuses_two_runs_of_one_model(tmp_path):
    runs = [write_log(tmp_path / d, "GPT-S", "music", 100, [3.0]) for d in ("out-a", "out-b")]
    with pytest.raises(ValueError, match="two GPT-S runs on music"):
        plot_curves.main(runs + ["--out_dir", str(tmp_path / "fig")])
