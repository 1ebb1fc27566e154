"""``npapprox train --engine torch [--nproc N]`` (npapprox.bridge.train).

Oracles: the engine's optimizer on NumPy copies (the views must change nothing)
and ``torch.optim`` (the formulas); the uninterrupted run (resume, bit for bit,
one process and two); the checkpoint arrays themselves (engine <-> torch)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import require_torch

import npapprox as na
from npapprox import checkpoint, cli, optim
from npapprox.study import study_gradients

torch = require_torch()
from npapprox.bridge import ddp
from npapprox.bridge import train as btrain
from npapprox.train import CHECKPOINT, TrainConfig, Trainer, load_run, make_trainer

TINY = dict(model="resnet8", width=4, data="digits", batch_size=16, lr=0.1, schedule="cosine", engine="torch")
LR, WD = 0.05, 1e-2
quiet = dict(progress=False, log=lambda *_: None)


def _cfg(tmp_path, name, **kw):
    return TrainConfig(**{**TINY, **kw, "out": str(tmp_path / name)})


def _arrays(folder):
    return checkpoint.load(folder / CHECKPOINT)


def _same_arrays(a, b):
    assert sorted(a) == sorted(b)            # torch lists a module's buffers after its parameters
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# --------------------------------------------------------------------------- #
# the optimizer: npapprox.optim on zero-copy views of the torch tensors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, kw", [
    ("sgd", dict(momentum=0.9, nesterov=True, decay="all")),
    ("sgd", dict(momentum=0.9, decay="kernels")),
    ("adam", dict(decay="all")),
    ("rmsprop", dict(momentum=0.5, decay="kernels")),
], ids=["sgd-nesterov-all", "sgd-kernels", "adam-all", "rmsprop-momentum-kernels"])
def test_optimizer_on_torch_views_is_the_engines_and_torch_optims(name, kw):
    rng = np.random.default_rng(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 4)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tparams = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    nparams = [na.nn.Parameter(a.copy()) for a in init]
    ref = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    views = [btrain.TorchParam(p) for p in tparams]
    mine = optim.make_optimizer(name, views, lr=LR, weight_decay=WD, **kw)
    engine = optim.make_optimizer(name, nparams, lr=LR, weight_decay=WD, **kw)
    decayed = [p.ndim >= 2 or kw["decay"] == "all" for p in ref]
    groups = [{"params": [p for p, d in zip(ref, decayed, strict=True) if d], "weight_decay": WD},
              {"params": [p for p, d in zip(ref, decayed, strict=True) if not d], "weight_decay": 0.0}]
    cls, extra = {"sgd": (torch.optim.SGD, dict(momentum=0.9, nesterov=kw.get("nesterov", False))),
                  "adam": (torch.optim.Adam, {}),
                  "rmsprop": (torch.optim.RMSprop, dict(momentum=kw.get("momentum", 0.0)))}[name]
    oracle = cls([g for g in groups if g["params"]], lr=LR, **extra)
    for step in range(4):
        lr = LR / (step + 1)                                   # a schedule changes lr between steps
        mine.lr = engine.lr = lr
        for g in oracle.param_groups:
            g["lr"] = lr
        for t, n, r in zip(tparams, nparams, ref, strict=True):
            g = rng.standard_normal(t.shape).astype(np.float32)
            t.grad, n.grad, r.grad = torch.from_numpy(g.copy()), g.copy(), torch.from_numpy(g.copy())
        mine.step()
        engine.step()
        oracle.step()
        for t, n, r, v in zip(tparams, nparams, ref, views, strict=True):
            assert np.shares_memory(v.data, t.detach().numpy())      # still the tensor's own memory
            assert np.array_equal(t.detach().numpy(), n.data), step  # the engine's formulas, bit for bit
            np.testing.assert_allclose(t.detach().numpy(), r.detach().numpy(), rtol=2e-6, atol=2e-7)
    mine.zero_grad()
    assert all(t.grad is None for t in tparams)
    a, b = mine.state_dict(), engine.state_dict()
    assert a["steps"] == b["steps"] and all(np.array_equal(x[k], y[k])
                                            for x, y in zip(a["state"], b["state"], strict=True) for k in x)


# --------------------------------------------------------------------------- #
# one process: the Trainer's run, logs, resume
# --------------------------------------------------------------------------- #
def _interrupt_at(trainer, n, signum=signal.SIGINT):
    step = trainer.step

    def wrapped(xb, yb):
        if trainer.iteration == n - 1:
            os.kill(os.getpid(), signum)
        return step(xb, yb)

    trainer.step = wrapped


def test_torch_engine_resumes_bit_for_bit(tmp_path):
    """Stochastic rounding (the policy's noise counter), momentum, BN statistics,
    a stop mid-epoch: the resumed run's checkpoint and logs are the uninterrupted run's."""
    kw = dict(policy="generic4s", iterations=7, optimizer="sgd", momentum=0.9, nesterov=True)
    full = make_trainer(_cfg(tmp_path, "full", **kw), **quiet)
    assert isinstance(full, btrain.TorchTrainer)
    full.run()
    first = make_trainer(_cfg(tmp_path, "cut", **kw), **quiet)
    _interrupt_at(first, 4)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert _arrays(tmp_path / "cut")[1]["iteration"] == 4
    second = make_trainer(_cfg(tmp_path, "cut", **kw), **quiet)
    second.resume()
    second.run()
    _same_arrays(_arrays(tmp_path / "full")[0], _arrays(tmp_path / "cut")[0])
    steps = [(tmp_path / r / "steps.jsonl").read_text().splitlines() for r in ("full", "cut")]
    assert [json.loads(s)["loss"] for s in steps[0]] == [json.loads(s)["loss"] for s in steps[1]]
    row = full.history[-1]
    assert row["stored_bytes"] > 0 and row["peak_bytes"] is None and np.isfinite(row["test_loss"])


def test_window_watch_names_the_units_as_the_engine(tmp_path):
    """The saturation watch of ``train`` sees every K-bit unit (ResNet-8: 6; the last one is
    exact) under the engine's module name."""
    runs = [make_trainer(_cfg(tmp_path, e, policy="paper4", iterations=2, engine=e), **quiet)
            for e in ("npapprox", "torch")]
    for r in runs:
        r.run()
    seen = [r.window_watch._seen for r in runs]
    assert seen[0] == seen[1] and len(seen[0]) == 6 and set(seen[0].values()) == {2}, seen


# --------------------------------------------------------------------------- #
# checkpoints shared by the engines
# --------------------------------------------------------------------------- #
def test_checkpoint_round_trip_torch_engine_torch_is_bit_exact(tmp_path):
    """A torch run's checkpoint loads into the engine's Trainer, whose checkpoint
    loads back into the torch trainer: every array (model and Adam's state) and
    the optimizer's metadata unchanged. ``load_run`` gives the engine's model at
    that point to the gradient study."""
    kw = dict(policy="paper4", iterations=3, optimizer="adam", lr=0.003)
    make_trainer(_cfg(tmp_path, "torch", **kw), **quiet).run()
    arrays, meta = _arrays(tmp_path / "torch")
    assert meta["config"]["engine"] == "torch" and any(k.startswith("optimizer/") for k in arrays)

    (tmp_path / "engine").mkdir()
    shutil.copy(tmp_path / "torch" / CHECKPOINT, tmp_path / "engine" / CHECKPOINT)
    engine = Trainer(_cfg(tmp_path, "engine", **kw, engine="npapprox"), **quiet)   # engine differs: allowed
    engine.resume()
    assert engine.param_names() == make_trainer(_cfg(tmp_path, "x", **kw), **quiet).param_names()   # steps[i]
    engine.save_checkpoint()
    arrays2, meta2 = _arrays(tmp_path / "engine")
    _same_arrays(arrays, arrays2)
    assert meta2["optimizer"] == meta["optimizer"] and meta2["iteration"] == 3

    (tmp_path / "back").mkdir()
    shutil.copy(tmp_path / "engine" / CHECKPOINT, tmp_path / "back" / CHECKPOINT)
    back = make_trainer(_cfg(tmp_path, "back", **kw), **quiet)
    back.resume()
    a3, m3 = back.state()
    _same_arrays(arrays, a3)
    assert json.loads(json.dumps(m3["optimizer"])) == meta["optimizer"]   # as the file holds it

    run = load_run(tmp_path / "torch")                      # the study's way in; nothing written
    _same_arrays({k: v for k, v in arrays.items() if not k.startswith("optimizer/")}, run.model.state_dict())
    assert sorted(p.name for p in (tmp_path / "torch").iterdir()) == [CHECKPOINT, "metrics.jsonl", "steps.jsonl"]
    st = study_gradients(run.model, run.data.x_train[:32], run.data.y_train[:32], ["paper4"], repeats=1,
                         include_exact=False)
    assert 0 < st.stats(st.policies[0])["rel_err"] < 0.5


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #
ARGS = ["train", "--model", "resnet8", "--width", "4", "--batch-size", "16", "--quiet"]


@pytest.mark.parametrize("extra, match", [
    (["--nproc", "2"], "--nproc 2 needs --engine torch"),
    (["--engine", "torch", "--nproc", "32"], "--nproc 32 is larger than --batch-size 16"),
    (["--engine", "torch", "--nproc", "3"], "--batch-size 16 is not divisible by --nproc 3"),
    (["--engine", "torch", "--device", "gpu"], "--engine torch runs on --device cpu or cuda"),
    (["--device", "cuda"], "--device cuda needs --engine torch"),
    (["--engine", "torch", "--policy", "naive4"], "cannot apply Naive"),
])
def test_cli_refuses_bad_engine_options_in_one_line(capsys, extra, match):
    assert cli.main(ARGS + extra) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_cli_without_torch_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert cli.main(ARGS + ["--engine", "torch"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'npapprox[torch]'" in err and err.count("\n") == 1


def test_cli_torch_run_continues_on_the_engine(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli.main(ARGS + ["--engine", "torch", "--policy", "paper4", "--iterations", "4", "--out", out]) == 0
    assert "engine torch" in capsys.readouterr().out
    (tmp_path / "r" / CHECKPOINT).unlink()      # as if stopped at iteration 2: rerun 2 of 4 on torch
    cfg = _cfg(tmp_path, "r", policy="paper4", iterations=4)
    t = make_trainer(cfg, overwrite=True, **quiet)
    _interrupt_at(t, 2)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert cli.main(ARGS + ["--policy", "paper4", "--iterations", "4", "--out", out, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from iteration 2 of 4" in printed and "engine torch" not in printed
    assert _arrays(tmp_path / "r")[1]["iteration"] == 4


def test_cli_compare_on_torch(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--engine", "torch", "--model", "resnet8", "--width", "4", "--batch-size", "16",
                     "--iterations", "2", "--policies", "exact,paper4", "--seeds", "0", "--quiet",
                     "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "paper4" in table and (out / "paper4" / "seed0" / CHECKPOINT).exists()
    meta = _arrays(out / "paper4" / "seed0")[1]
    assert meta["config"]["engine"] == "torch" and meta["history"][-1]["grad_rel_err"] > 0


# --------------------------------------------------------------------------- #
# two processes (gloo on 127.0.0.1)
# --------------------------------------------------------------------------- #
def _stopped_by_rank_1(rank, world_size, cfg, at):
    """A rank of ``train`` whose rank 1 alone gets SIGTERM during step ``at``."""
    real = btrain.TorchTrainer.step

    def step(self, xb, yb):
        seeds.append(self.policy.seed)
        if rank == 1 and self.iteration == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, xb, yb)

    btrain.TorchTrainer.step = step
    seeds = []
    return btrain._rank(rank, world_size, rank, cfg, False, False, False, print), seeds[0]


def test_two_processes_resume_bit_for_bit(tmp_path):
    """--nproc 2 on the CPU, stochastic rounding (per-rank noise, its counter in the
    checkpoint): a SIGTERM reaching rank 1 only stops both ranks after
    the same step (rank 0 writes the checkpoint); resumed (--nproc 2, spawned), the
    run ends with the arrays and losses of the uninterrupted run (launched by
    torchrun), bit for bit."""
    kw = dict(policy="generic4s", iterations=6, nproc=2, optimizer="sgd", momentum=0.9)
    # the uninterrupted run: the same command launched by torchrun (2 processes, one node, loopback)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GLOO_SOCKET_IFNAME": "lo"}

    def torchrun(out):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                               "2", "--master-addr", "127.0.0.1", "--master-port", str(ddp.free_port()), "-m",
                               "npapprox", *ARGS, "--engine", "torch", "--policy", "generic4s", "--iterations", "6",
                               "--momentum", "0.9", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=240, check=False)

    full = tmp_path / "full"
    done = torchrun(full)
    if done.returncode != 0 and "received by PID" in done.stderr:
        # a rank killed by a signal before training (seen once in CI: SIGABRT in torchrun's start-up, not
        # reproduced in 9 direct runs): shown, then the launch is tried once more in a fresh folder
        print("first torchrun launch failed:\n" + done.stderr[:4000] + "\n...\n" + done.stderr[-2000:])
        full = tmp_path / "full2"
        done = torchrun(full)
    assert done.returncode == 0, done.stderr[:4000] + "\n...\n" + done.stderr[-2000:]
    assert "engine torch x 2 processes" in done.stdout
    cut = _cfg(tmp_path, "cut", **kw)
    results = ddp.launch(_stopped_by_rank_1, 2, cut, 3, timeout=60, deadline=240)
    assert [r[0] for r in results] == [("interrupted", signal.SIGTERM)] * 2
    assert results[0][1] != results[1][1]           # each rank its own stochastic-rounding noise
    assert _arrays(tmp_path / "cut")[1]["iteration"] == 3
    btrain.train(cut, resume=True, progress=False, timeout=60)
    _same_arrays(_arrays(full)[0], _arrays(tmp_path / "cut")[0])
    steps = [(folder / "steps.jsonl").read_text().splitlines() for folder in (full, tmp_path / "cut")]
    assert [json.loads(s)["loss"] for s in steps[0]] == [json.loads(s)["loss"] for s in steps[1]]
    assert len(steps[0]) == 6


def _rank_1_fails(rank, world_size, *args):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return btrain._spawned(rank, world_size, *args)


def test_a_failing_rank_fails_the_command_with_its_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(btrain, "_spawned", _rank_1_fails)
    monkeypatch.setattr(btrain, "TIMEOUT", 30.0)
    assert cli.main(ARGS + ["--engine", "torch", "--nproc", "2", "--iterations", "3",
                            "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1] == "npapprox train: error: rank 1 failed: RuntimeError: boom on rank 1"
    assert "Traceback" in err


def _parent_signalled_during_start(rank, world_size, *args):
    if rank == 0:
        os.kill(os.getppid(), signal.SIGTERM)     # as a scheduler would; the parent passes it on
    time.sleep(60)                                # ended by it: no training loop defers it yet
    return "not reached"


def test_a_signal_before_training_starts_is_an_interruption(tmp_path, monkeypatch, capsys):
    """SIGTERM to the parent while the ranks start: passed on, the ranks end, and the
    command exits as interrupted (128 + 15), not as a failed rank."""
    monkeypatch.setattr(btrain, "_spawned", _parent_signalled_during_start)
    start = time.monotonic()
    assert cli.main(ARGS + ["--engine", "torch", "--nproc", "2", "--iterations", "3",
                            "--out", str(tmp_path / "r")]) == 128 + signal.SIGTERM
    assert "interrupted" in capsys.readouterr().err and time.monotonic() - start < 50
    assert signal.getsignal(signal.SIGTERM) is not btrain._forward_signals      # the parent's handler is back
