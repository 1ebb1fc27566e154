"""Training runs, resume equivalence, non-finite loss, and the command line."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal

import numpy as np
import pytest

from npapprox import checkpoint, cli, cli_options, nn
from npapprox.backend import gpu_available
from npapprox.peak import measure_peak
from npapprox.policy import Paper
from npapprox.train import CHECKPOINT, NonFiniteLoss, TrainConfig, Trainer

import cifar_archive

TINY = dict(model="resnet8", width=8, data="digits", batch_size=64, lr=0.1, schedule="cosine")


def _train(tmp_path, name, **kw):
    cfg = TrainConfig(**{**TINY, **kw, "out": str(tmp_path / name)})
    trainer = Trainer(cfg, progress=False, log=lambda *_: None)
    trainer.run()
    return trainer


@pytest.mark.parametrize("policy", ["exact", "paper4"])
def test_short_training_on_digits_learns(tmp_path, policy):
    t = _train(tmp_path, policy, policy=policy, epochs=4)
    h = t.history
    assert len(h) == 4 and h[-1]["iteration"] == 4 * t.per_epoch
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert h[-1]["test_acc"] > 0.8, h[-1]                  # chance is 0.1
    rows = [json.loads(line) for line in (tmp_path / policy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["stored_bytes"] > 0 and r["peak_bytes"] > r["stored_bytes"] for r in rows)
    steps = [json.loads(line) for line in (tmp_path / policy / "steps.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps] == list(range(1, 4 * t.per_epoch + 1))
    assert all(b["time"] >= a["time"] for a, b in zip(steps, steps[1:], strict=False))


def test_paper_policy_stores_less_than_exact(tmp_path):
    exact = _train(tmp_path, "e", policy="exact", iterations=2).history[-1]["stored_bytes"]
    paper = _train(tmp_path, "p", policy="paper4", iterations=2).history[-1]["stored_bytes"]
    assert paper < exact / 3


def _interrupt_after(trainer, n):
    """Deliver a real SIGINT to this process during step ``n``."""
    step = trainer.step

    def wrapped(xb, yb):
        if trainer.iteration == n - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step(xb, yb)

    trainer.step = wrapped


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    """Stochastic rounding (policy noise counter), augmentation (batch-derived RNG),
    momentum, BN running statistics and a mid-epoch stop: all must carry over."""
    kw = dict(policy="generic4s", augment=True, iterations=40, batch_size=100)
    full = _train(tmp_path, "full", **kw)

    cfg = TrainConfig(**{**TINY, **kw, "out": str(tmp_path / "cut")})
    first = Trainer(cfg, progress=False, log=lambda *_: None)
    _interrupt_after(first, 23)                              # mid-epoch (15 iterations per epoch)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.iteration == 23
    assert checkpoint.load(tmp_path / "cut" / CHECKPOINT)[1]["iteration"] == 23

    with open(tmp_path / "cut" / "steps.jsonl", "a") as f:   # as if a crash had followed steps
        f.write(json.dumps({"iteration": 24, "loss": 9.0, "time": 0.0}) + "\n")   # that no checkpoint kept
    second = Trainer(cfg, progress=False, log=lambda *_: None)
    second.resume()
    second.run()
    a, b = full.model.state_dict(), second.model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    keys = ["epoch", "iteration", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "stored_bytes"]
    assert [{k: r[k] for k in keys} for r in full.history] == [{k: r[k] for k in keys} for r in second.history]
    # the logs of the resumed run read like the uninterrupted run's
    def log(run, name):
        return [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]
    assert [(s["iteration"], s["loss"]) for s in log("cut", "steps.jsonl")] == \
        [(s["iteration"], s["loss"]) for s in log("full", "steps.jsonl")]
    assert [r["test_acc"] for r in log("cut", "metrics.jsonl")] == [r["test_acc"] for r in log("full", "metrics.jsonl")]


def test_resume_refuses_other_settings(tmp_path):
    _train(tmp_path, "run", iterations=3)
    other = Trainer(TrainConfig(**{**TINY, "iterations": 3, "lr": 0.05, "out": str(tmp_path / "run")}),
                    progress=False)
    with pytest.raises(ValueError, match="lr=0.1 .now 0.05"):
        other.resume()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(TrainConfig(**{**TINY, "iterations": 3, "out": str(tmp_path / "none")}), progress=False).resume()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 3, "out": str(tmp_path / "nan")})
    t = Trainer(cfg, progress=False, log=lambda *_: None)
    step = t.step

    def poisoned(xb, yb):
        if t.iteration >= t.per_epoch + 2:                   # in the second epoch
            xb = np.full_like(xb, np.nan)
        return step(xb, yb)

    t.step = poisoned
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        t.run()
    arrays, meta = checkpoint.load(tmp_path / "nan" / CHECKPOINT)
    assert meta["iteration"] == t.per_epoch                  # the end of the first epoch
    assert all(np.isfinite(v).all() for v in arrays.values())


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #
def test_cli_train_runs_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["train", "--model", "resnet8", "--width", "4", "--iterations", "6", "--batch-size", "128",
            "--policy", "paper8", "--out", out, "--quiet"]
    assert cli.main(args) == 0
    assert "resnet8 on digits" in capsys.readouterr().out
    assert cli.main(args + ["--resume"]) == 0               # already finished: resumes at the end
    assert "resumed from iteration 6 of 6" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--policy", "paper3"], "unknown storage policy 'paper3'"),
    (["train", "--model", "resnet7"], "resnet7"),
    (["train", "--data", "cifar10", "--data-path", "/nonexistent/cifar"], "cifar-10-python.tar.gz"),
    (["compare", "--policies", "exact,bogus"], "unknown storage policy 'bogus'"),
    (["memory", "--model", "nonet"], "nonet"),
])
def test_cli_reports_bad_values_clearly(argv, message, capsys):
    assert cli.main(argv + (["--quiet"] if argv[0] != "memory" else [])) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "0"], ["train", "--lr", "-1"], ["train", "--batch-size", "x"],
    ["train", "--optimizer", "lbfgs"], ["memory", "--budget", "lots"], ["frobnicate"],
])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_cli_compare_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--model", "resnet8", "--width", "4", "--iterations", "4", "--batch-size", "128",
                     "--policies", "exact,paper4", "--seeds", "0,1", "--out", str(out), "--quiet"]) == 0
    table = (out / "results.md").read_text()
    assert "| exact |" in table and "| paper4 |" in table and "±" in table
    assert (out / "results.csv").read_text().count("\n") == 1 + 2 * 2    # header + one epoch per run
    for name in ("loss_vs_iterations.png", "loss_vs_time.png", "test_accuracy.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_memory_finds_the_largest_batch_under_a_budget(tmp_path, capsys):
    budget = 24 * 2**20
    assert cli.main(["memory", "--model", "resnet8", "--width", "4", "--size", "8", "--channels", "1",
                     "--policy", "paper4", "--batch", "16", "--budget", "24MiB", "--confirm",
                     "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    batch = int(re.search(r"largest batch with measured peak <= 24.0 MiB \(25,165,824 B\): (\d+)", text).group(1))
    assert batch >= 16
    nn.manual_seed(0)
    model = nn.build_model("resnet8", num_classes=10, in_channels=1, input_size=8, width=4)
    rng = np.random.default_rng(1)

    def peak(n):
        return measure_peak(model, rng.standard_normal((n, 1, 8, 8)).astype(np.float32),
                            rng.integers(0, 10, n), Paper(4))
    assert peak(batch) <= 1.01 * budget                     # measured again, independently (+-Python objects)
    assert peak(batch + batch // 20) > budget               # and it is (nearly) the largest
    totals = json.loads((tmp_path / "m.json").read_text())
    assert totals["float32_per_unit"] > 3 * totals["stored"]


def test_paper_preset_is_the_papers_protocol():
    cfg = TrainConfig.paper()
    assert (cfg.model, cfg.batch_size, cfg.iterations, cfg.schedule, cfg.weight_decay, cfg.decay,
            cfg.momentum, cfg.augment, cfg.normalize) == ("resnet164", 128, 64000, "paper", 2e-4, "kernels",
                                                          0.9, True, "image-mean")
    assert dataclasses.replace(cfg, lr=0.05).lr == 0.05


@pytest.mark.skipif(gpu_available(), reason="a GPU is present: --device gpu is exercised in test_gpu.py")
def test_cli_device_gpu_without_cupy_is_a_clear_error(capsys):
    assert cli.main(["train", "--device", "gpu", "--iterations", "1", "--quiet"]) == 2
    assert "needs CuPy" in capsys.readouterr().err


@pytest.mark.parametrize("data, make", [("cifar10", "make_cifar10"), ("cifar100", "make_cifar100")])
def test_cli_trains_on_a_cifar_archive(tmp_path, capsys, data, make):
    """End to end on small archives in the exact CIFAR format: load, augment, train, evaluate."""

    archive = getattr(cifar_archive, make)(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", data, "--data-path", str(archive), "--model", "resnet8", "--width", "4",
                     "--iterations", "3", "--batch-size", "8", "--augment", "--policy", "paper4",
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"resnet8 on {data}" in text and "32x32x3" in text
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iteration"] == 3 and np.isfinite(row["train_loss"]) and 0 <= row["test_acc"] <= 1


def test_preset_yields_only_to_options_the_user_typed():
    """--preset paper keeps the paper's values for everything not typed, and a typed
    value wins even when it equals the option's ordinary default (resnet20, --lr 0.1)."""
    parse = cli.build_parser().parse_args

    def config(argv):
        args = parse(argv)
        args.typed = cli._typed(argv)
        return cli_options.train_config(args, "exact", 0, None)

    paper = config(["train", "--preset", "paper"])
    assert (paper.model, paper.iterations, paper.schedule, paper.batch_size) == ("resnet164", 64000, "paper", 128)
    typed = config(["train", "--preset", "paper", "--model", "resnet20", "--batch-size", "64"])
    assert (typed.model, typed.batch_size, typed.schedule) == ("resnet20", 64, "paper")
    plain = config(["train"])
    assert (plain.model, plain.schedule, plain.batch_size) == ("resnet20", "cosine", 64)


def test_fit_trains_as_run_does_and_reports_at_its_checkpoints():
    """``Trainer.fit`` (the study's training) takes the same steps as ``run``: the same
    batches, learning rates and updates, so the same weights, bit for bit."""
    cfg = TrainConfig(model="resnet8", data="digits", epochs=None, iterations=5, batch_size=64, width=4, out=None)
    quiet = {"progress": False, "log": lambda *_: None}
    ran = Trainer(cfg, **quiet)
    ran.run()
    fitted = Trainer(cfg, **quiet)
    losses = fitted.fit()
    assert len(losses) == 5 and all(np.isfinite(losses))
    for (name, p), (_, q) in zip(ran.model.named_parameters(), fitted.model.named_parameters(), strict=True):
        assert np.array_equal(p.data, q.data), name
    # a given model and data: checkpoints before iterations 0, 2, 4 and after the last
    nn.manual_seed(cfg.seed)
    model = nn.build_model("resnet8", num_classes=10, in_channels=1, input_size=8, width=4)
    seen = []
    given = Trainer(cfg, model=model, data=fitted.data, **quiet)
    assert given.model is model and given.data is fitted.data
    given.fit(2, lambda i, since: seen.append((i, len(since))))
    assert seen == [(0, 0), (2, 2), (4, 2), (5, 1)]
    for (name, p), (_, q) in zip(model.named_parameters(), fitted.model.named_parameters(), strict=True):
        assert np.array_equal(p.data, q.data), name
