"""The whisper-gpt test suite: CPU only, tiny data, minutes not hours.  python -m pytest -q test_whisper_gpt.py"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import whisper_gpt as wg
from whisper_gpt import Config, WhisperGPT

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# whisper_gpt.py: the models


def tiny(**kw):
    """A model config small enough to train in a test, shaped like the paper's."""
    base = dict(block_size=32, n_layer=2, n_head=2, n_embd=16, dense=64, mel_layer=2, mel_head=2, mel_hidden=32)
    base.update(kw)
    return Config(**base)


def test_paper_architectures():
    gpt_s = WhisperGPT(Config())
    assert len(gpt_s.blocks) == 8 and gpt_s.blocks[0].attn.n_head == 8
    assert gpt_s.wte.weight.shape == (1024, 64)
    assert gpt_s.blocks[0].mlp.c_fc.weight.shape == (256, 64)  # feed-forward 4x
    assert gpt_s.head.c_fc.weight.shape == (2048, 64) and gpt_s.head.c_proj.weight.shape == (1024, 2048)
    assert gpt_s.mel is None
    gpt_l = WhisperGPT(Config(n_embd=256, n_head=16))
    assert len(gpt_l.blocks) == 8 and gpt_l.blocks[0].attn.n_head == 16 and gpt_l.wte.weight.shape == (1024, 256)
    hybrid = WhisperGPT(Config(hybrid=True))
    assert hybrid.wte.weight.shape == (1024, 32)  # token half
    assert hybrid.mel.slice_mlp.c_fc.weight.shape == (2048, 64)  # per-slice MLP 64 -> 2048 -> 32
    assert hybrid.mel.slice_mlp.c_proj.weight.shape == (32, 2048)
    assert len(hybrid.mel.blocks) == 6 and hybrid.mel.blocks[0].mlp.c_fc.weight.shape == (128, 32)
    assert len(hybrid.blocks) == 8 and hybrid.blocks[0].attn.c_attn.weight.shape == (192, 64)
    assert [wg.model_name(m.config) for m in (gpt_s, gpt_l, hybrid)] == ["GPT-S", "GPT-L", "hybrid"]


@pytest.mark.parametrize("hybrid", [False, True])
def test_no_future_token_or_mel_leaks(hybrid):
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=hybrid)).eval()
    idx = torch.randint(0, 1024, (2, 24))
    mel = torch.randn(2, 24, 64) if hybrid else None
    logits, _ = model(idx, mel)
    for i in (0, 5, 23):
        later_tokens = idx.clone()
        later_tokens[:, i + 1:] = torch.randint(0, 1024, (2, 23 - i))
        changed, _ = model(later_tokens, mel)
        torch.testing.assert_close(changed[:, :i + 1], logits[:, :i + 1], rtol=0, atol=1e-6)
        if hybrid:  # mel slices i and later must not reach position i: the paper's shift by 2
            later_mel = mel.clone()
            later_mel[:, i:] = torch.randn(2, 24 - i, 64) * 5
            changed, _ = model(idx, later_mel)
            torch.testing.assert_close(changed[:, :i + 1], logits[:, :i + 1], rtol=0, atol=1e-6)
    if hybrid:  # and the mel path is live: slice i-1 does reach position i
        earlier = mel.clone()
        earlier[:, 4] += 3.0
        changed, _ = model(idx, earlier)
        assert (changed[:, 5] - logits[:, 5]).abs().max() > 1e-4
        torch.testing.assert_close(changed[:, :5], logits[:, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("hybrid", [False, True])
def test_tiny_model_overfits_one_batch(hybrid):
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=hybrid))
    idx = torch.randint(0, 1024, (4, 33))
    mel = torch.randn(4, 32, 64) if hybrid else None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], mel, idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1, f"did not overfit: loss {loss.item():.3f} (started near ln 1024 = 6.93)"


def toy_mel_fn():
    """A mel_fn for generate(): a made-up slice that depends on the newest token."""
    return lambda tokens: torch.sin(tokens[:, -1:].float() * torch.arange(64)[None] / 100.0)


@pytest.mark.parametrize("hybrid", [False, True])
def test_cached_generation_equals_uncached_past_the_window(hybrid):
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=hybrid)).eval()
    idx = torch.randint(0, 1024, (2, 20))
    mel = torch.randn(2, 20, 64) if hybrid else None
    kw = dict(mel=mel, mel_fn=toy_mel_fn(), temperature=1.0, top_k=50)
    # 60 new tokens after 20: the 32-token window slides twice
    cached = model.generate(idx, 60, use_cache=True, generator=torch.Generator().manual_seed(7), **kw)
    uncached = model.generate(idx, 60, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    assert cached.shape == (2, 80)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :20], idx)


def test_batched_generation_equals_one_by_one():
    torch.manual_seed(0)
    model = WhisperGPT(tiny(hybrid=True)).eval()
    idx, mel = torch.randint(0, 1024, (3, 10)), torch.randn(3, 10, 64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = model.generate(idx, 40, mel=mel, mel_fn=toy_mel_fn(), top_p=0.9, generator=gens())
    for row, g in enumerate(gens()):
        alone = model.generate(idx[row:row + 1], 40, mel=mel[row:row + 1], mel_fn=toy_mel_fn(),
                               top_p=0.9, generator=[g])
        assert torch.equal(alone[0], batch[row])


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {wg.sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {wg.sample_next(logits, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {0}  # token 0 alone holds 71 % of the mass
    assert wg.sample_next(logits, temperature=0).item() == 0


def test_lr_schedule_drops_after_epoch_10():
    c = Config()
    spe = 7
    assert wg.get_lr(c, 0, spe) == 2e-4
    assert wg.get_lr(c, 10 * spe - 1, spe) == 2e-4  # last step of epoch 9 (the tenth epoch)
    assert wg.get_lr(c, 10 * spe, spe) == 1e-4  # first step of epoch 10
    assert wg.get_lr(c, 25 * spe - 1, spe) == 1e-4
    # one epoch covers the train tokens once: 7500 tokens = 10 crops of 750 = 1 step of 10 crops
    assert wg.steps_per_epoch(Config(batch_size=10), 7500) == 1
    assert wg.steps_per_epoch(Config(batch_size=10), 7501) == 2
    assert wg.steps_per_epoch(Config(batch_size=5), 7500, world=2) == 1


# -----------------------------------------------------------------------------
# whisper_gpt.py: training, checkpoints, resume, DDP, flags


def make_data(root, n_train=4000, n_val=1000, mel=True, seed=0):
    """A data folder in prepare.py's format: a learnable token sequence (a noisy counter) and mel rows that
    carry the next token, so the hybrid has something to gain."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = (np.arange(n) * 7 + rng.integers(0, 3, n)) % 64  # 64 of the 1024 tokens in use
        tokens.astype(np.uint16).tofile(os.path.join(root, f"{split}_tokens.bin"))
        if mel:
            rows = rng.standard_normal((n, 64)).astype(np.float16)
            rows[:, 0] = tokens / 32.0 - 1.0
            rows.tofile(os.path.join(root, f"{split}_mel.bin"))
    meta = {"version": 1, "tokenizer": "synthetic-test-data", "tokenizer_offline": True, "sample_rate": 24000,
            "frame_rate": 75, "hop": 320, "win": 960, "n_mels": 64, "mel_mean": [0.0] * 64,
            "mel_std": [1.0] * 64, "n_train": n_train, "n_val": n_val, "files": []}
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_config(tmp_path, **kw):
    base = dict(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), batch_size=4, eval_windows=8,
                device="cpu", dtype="float32")
    base.update(kw)
    return tiny(**base)


@pytest.mark.parametrize("hybrid", [False, True])
def test_training_logs_checkpoints_and_round_trips(tmp_path, hybrid):
    make_data(tmp_path / "data")
    c = train_config(tmp_path, hybrid=hybrid, max_iters=6, eval_interval=3)
    wg.train(c)
    log = read_log(c.out_dir)
    assert log[0]["event"] == "start" and log[0]["model"] == ("hybrid" if hybrid else "custom")
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 3, 6]
    assert evals[-1]["val_nll"] < evals[0]["val_nll"] < math.log(1024) + 0.5
    model, config, ckpt = wg.load_checkpoint(os.path.join(c.out_dir, "ckpt_latest.pt"))
    assert config.hybrid == hybrid and ckpt["iter"] == 6
    nll, acc, _ = wg.evaluate(model, config, 8, wg.nullcontext())
    assert nll == pytest.approx(evals[-1]["val_nll"], abs=1e-5)
    assert acc == pytest.approx(evals[-1]["val_acc"], abs=1e-9)
    best = torch.load(os.path.join(c.out_dir, "ckpt_best.pt"), weights_only=False)
    assert best["val_nll"] == min(r["val_nll"] for r in evals)
    assert not [f for f in os.listdir(c.out_dir) if f.endswith(".tmp")]


def test_resumed_run_reproduces_uninterrupted_losses(tmp_path):
    make_data(tmp_path / "data")
    whole = train_config(tmp_path, hybrid=True, max_iters=8, eval_interval=4, out_dir=str(tmp_path / "whole"))
    wg.train(whole)
    wg.train(train_config(tmp_path, hybrid=True, max_iters=4, eval_interval=4, out_dir=str(tmp_path / "cut")))
    wg.train(train_config(tmp_path, hybrid=True, max_iters=8, eval_interval=4, out_dir=str(tmp_path / "cut"),
                          init_from="resume", n_layer=5))  # model flags are taken from the checkpoint
    a = [r for r in read_log(whole.out_dir) if r["event"] == "eval"]
    b = [r for r in read_log(tmp_path / "cut") if r["event"] == "eval"]
    assert [r["iter"] for r in b] == [0, 4, 8]
    for ra, rb in zip(a, b):
        assert ra["train_nll"] == rb["train_nll"] and ra["val_nll"] == rb["val_nll"]


def test_eval_only_prints_the_table_row(tmp_path, capsys):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=2, eval_interval=1))
    record = wg.train(train_config(tmp_path, eval_only=True, final_windows=0))
    n_windows = len(wg.val_windows(1000, 32))
    assert record["n_windows"] == n_windows == 31 and record["tokens"] == 31 * 32
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_nll"]))
    assert "| custom |" in capsys.readouterr().out
    assert read_log(tmp_path / "out")[-1]["event"] == "eval_only"


def test_val_windows_are_fixed_and_subsets_evenly_spaced():
    starts = wg.val_windows(1000, 32)
    assert starts[0] == 0 and np.all(np.diff(starts) == 32) and starts[-1] + 33 <= 1000
    sub = wg.val_windows(1000, 32, limit=5)
    assert len(sub) == 5 and set(sub) <= set(starts) and sub[0] == 0 and sub[-1] == starts[-1]
    assert np.array_equal(sub, wg.val_windows(1000, 32, limit=5))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "whisper_gpt.py"), *args], capture_output=True,
                          text=True, cwd=HERE, env=env, timeout=300)


def test_bad_flags_fail_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="not divisible by --n_head"):
        wg.parse_args(["--n_embd", "65"])
    with pytest.raises(ValueError, match="even --n_embd"):
        wg.parse_args(["--hybrid", "--n_embd", "63", "--n_head", "1"])
    with pytest.raises(ValueError, match="--init_from"):
        wg.parse_args(["--init_from", "latest"])
    make_data(tmp_path / "nomel", mel=False)
    with pytest.raises(FileNotFoundError, match="--hybrid needs the mel"):
        wg.train(train_config(tmp_path, hybrid=True, data_dir=str(tmp_path / "nomel")))
    make_data(tmp_path / "data", n_val=20)
    with pytest.raises(ValueError, match="fewer than a crop"):
        wg.train(train_config(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        wg.train(train_config(tmp_path, data_dir=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        wg.train(train_config(tmp_path, init_from="resume"))
    result = run_cli("--n_embd", "63", "--n_head", "8")
    assert result.returncode != 0 and "not divisible by --n_head 8" in result.stderr


def test_scratch_run_never_overwrites_an_existing_run(tmp_path):
    make_data(tmp_path / "data")
    wg.train(train_config(tmp_path, max_iters=1))
    before = open(tmp_path / "out" / "ckpt_latest.pt", "rb").read()
    with pytest.raises(FileExistsError, match="--init_from resume"):
        wg.train(train_config(tmp_path, max_iters=1))
    assert open(tmp_path / "out" / "ckpt_latest.pt", "rb").read() == before


def test_two_process_ddp_trains_with_gloo(tmp_path):
    data = make_data(tmp_path / "data")
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "whisper_gpt.py"), "--data_dir", data, "--out_dir", out, "--device", "cpu",
           "--dtype", "float32", "--block_size", "32", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
           "--dense", "32", "--batch_size", "2", "--lr", "1e-2", "--max_iters", "4", "--eval_interval", "2", "--eval_windows", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP world 2" in result.stdout
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(math.isfinite(r["val_nll"]) for r in evals)
    assert evals[-1]["tokens"] == 4 * 2 * 32 * 2  # steps x batch x block x world: both processes trained
    assert evals[-1]["val_nll"] < evals[0]["val_nll"]


def test_bench_prints_tokens_per_second(capsys):
    c = tiny(bench=True, bench_steps=2, batch_size=2, device="cpu", dtype="float32")
    assert wg.bench(c) > 0
    c.bench_reference = True
    assert wg.bench(c) > 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "textbook" in out
