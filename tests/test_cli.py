"""The command line's user errors: exit code 2 and exactly one line on stderr, naming
the option as typed (never a library parameter), no traceback; sizes that cannot fit
are refused before anything large is allocated."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import npapprox
from npapprox import cli, cli_options, limits, nn
from npapprox.data import load_cifar10, load_dataset
from npapprox.ledger import footprint, ledger
from npapprox.peak import max_batch, measure_peak
from npapprox.policy import Exact, Paper

import cifar_archive

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
LIBRARY_NAMES = re.compile(r"\bpath=|\bresize=|input_size|\bbuild_model\b|\bdata_path\b")


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``npapprox argv``, whether main returns or exits."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(argv, capsys, *fragments):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "usage:" not in err, err
    assert err.startswith("npapprox"), err
    assert not LIBRARY_NAMES.search(err), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def memory_8gib(monkeypatch):
    """The checks compare against 8 GiB, whatever this machine has."""
    monkeypatch.setattr(limits, "available_memory", lambda: 8 * GiB)


# --------------------------------------------------------------------------- #
# One line, the option's own name
# --------------------------------------------------------------------------- #
BAD = {
    "empty policy list": (["compare", "--policies", "", "--iterations", "1"], ["--policies"]),
    "empty seed item": (["compare", "--seeds", "0,,1", "--iterations", "1"], ["--seeds", "'0,,1'"]),
    "repeated seed": (["compare", "--seeds", "0,1,0", "--iterations", "1"], ["--seeds", "repeats 0"]),
    "repeated policy": (["compare", "--policies", "exact,paper4,exact"], ["--policies", "repeats exact"]),
    "negative seed in list": (["compare", "--seeds", "0,-1", "--iterations", "1"], ["--seeds", ">= 0"]),
    "argparse range": (["train", "--epochs", "0"], ["--epochs", "(see npapprox train --help)"]),
    "argparse type": (["train", "--batch-size", "x"], ["--batch-size", "(see npapprox train --help)"]),
    "argparse choice": (["train", "--optimizer", "lbfgs"], ["--optimizer", "lbfgs"]),
    "unknown command": (["frobnicate"], ["frobnicate", "(see npapprox --help)"]),
    "no command": ([], ["command"]),
    "infinite lr": (["train", "--lr", "inf"], ["--lr"]),
    "negative momentum": (["train", "--momentum", "-1"], ["--momentum"]),
    "negative seed": (["train", "--seed", "-1"], ["--seed"]),
    "cifar without path": (["train", "--data", "cifar10", "--iterations", "1"],
                           ["--data cifar10 needs --data-path", "cifar-10-python.tar.gz"]),
    "preset without path": (["compare", "--preset", "paper"], ["--preset paper", "--data-path"]),
    "digits with path": (["train", "--data-path", "x", "--iterations", "1"], ["--data-path"]),
    "size below the images": (["train", "--size", "4", "--iterations", "1"], ["--size 4", "8x8"]),
    "size not divisible": (["train", "--size", "10", "--iterations", "1"], ["--size 10", "divisible by 4"]),
    "model needs a size": (["train", "--model", "vgg11", "--iterations", "1"], ["--size 32"]),
    "memory size not divisible": (["memory", "--model", "vgg11", "--size", "16"], ["--size 16", "32"]),
    "bad model": (["train", "--model", "resnet7", "--iterations", "1"], ["--model", "resnet7"]),
    "bad memory model": (["memory", "--model", "nonet"], ["--model", "nonet"]),
    "bad policy": (["train", "--policy", "paper3", "--iterations", "1"], ["--policy", "paper3"]),
    "bad compare policy": (["compare", "--policies", "exact,bogus"], ["--policies", "bogus"]),
    "bad study opt-policy": (["study", "--opt-policies", "exact,paper5"], ["--opt-policies", "paper5"]),
    "nesterov with adam": (["train", "--nesterov", "--optimizer", "adam", "--iterations", "1"],
                           ["--nesterov", "--optimizer"]),
    "study optimizer lr": (["study", "--experiment", "optimizers", "--optimizers", "sgd:x"],
                           ["--optimizers", "sgd:x"]),
    "study optimizer name": (["study", "--optimizers", "lbfgs"], ["--optimizers", "lbfgs"]),
    "study activation": (["study", "--activations", "relu,swish"], ["--activations", "swish"]),
    "study empty policies": (["study", "--policies", ""], ["--policies"]),
    "study seeds": (["study", "--seeds", "1,,2"], ["--seeds"]),
    "study activations of a VGG": (["study", "--experiment", "activations", "--model", "vgg11", "--size", "32"],
                                   ["--model vgg11"]),
    "too many classes": (["memory", "--classes", "100000000"], ["--classes", "from 1 to 100000"]),
    "too many channels": (["memory", "--channels", "100000000"], ["--channels"]),
    "json is a folder": (["memory", "--json", "/"], ["--json /", "folder"]),
    "budget zero": (["memory", "--budget", "0"], ["--budget"]),
    "budget words": (["memory", "--budget", "lots"], ["--budget", "'lots'"]),
    "budget overflow": (["memory", "--budget", "1e400"], ["--budget"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_value_is_one_line_naming_the_option(case, capsys):
    argv, fragments = BAD[case]
    assert_one_line_error(argv + (["--quiet"] if argv[:1] in (["train"], ["compare"]) else []), capsys, *fragments)


def test_a_missing_or_foreign_data_path_is_one_line(tmp_path, capsys):
    assert_one_line_error(["train", "--data", "cifar10", "--data-path", str(tmp_path / "none"), "--quiet"], capsys,
                          "does not exist", "cifar-10-python.tar.gz")
    assert_one_line_error(["train", "--data", "cifar100", "--data-path", str(tmp_path), "--quiet"], capsys,
                          "cifar-100-python.tar.gz")
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    assert_one_line_error(["train", "--data", "cifar10", "--data-path", str(text), "--quiet"], capsys,
                          str(text), "not a readable gzip-compressed tar file")


def test_cifar_with_an_empty_test_split_is_refused_naming_the_file(tmp_path, capsys):

    members = cifar_archive.cifar10_members()
    members["test_batch"] = {b"batch_label": b"testing batch 1 of 1", b"labels": [],
                             b"data": np.zeros((0, 3072), np.uint8), b"filenames": []}
    archive = cifar_archive.make_cifar10(tmp_path / "a", members=members)
    folder = cifar_archive.make_cifar10(tmp_path / "f", form="folder", members=members)
    with pytest.raises(ValueError, match=r"member cifar-10-batches-py/test_batch holds no test images"):
        load_cifar10(archive)
    with pytest.raises(ValueError, match=re.escape(str(folder / "test_batch")) + r" is corrupt: it holds no test"):
        load_cifar10(folder)
    assert_one_line_error(["train", "--data", "cifar10", "--data-path", str(archive), "--model", "resnet8",
                           "--width", "4", "--iterations", "1", "--quiet"], capsys, str(archive), "test_batch")


def test_version_is_the_packages(capsys):
    rc, out, err = run_cli(["--version"], capsys)
    # the [project] table's version line (tomllib would need Python 3.11; the package supports 3.10)
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert rc == 0 and out == f"npapprox {declared}\n" and not err
    assert npapprox.__version__ == declared


def test_help_has_no_markup():
    parser = cli.build_parser()
    helps = [parser.format_help()] + [sub.format_help() for sub in parser.subcommands.values()]
    assert "train" in helps[0] and "memory" in helps[0]
    for text in helps:
        assert not re.search(r"``|:[a-z]+:`|`", text), text


@pytest.mark.parametrize("text, expected", [
    ("1e9", 10 ** 9), ("2GiB", 2 * GiB), ("512MiB", 512 * 2 ** 20), ("1.5K", 1536), ("100B", 100),
    (" 3 gib ", 3 * GiB), ("1TiB", 2 ** 40), ("2.5e3", 2500),
])
def test_budget_sizes_parse(text, expected):
    assert cli_options.byte_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0.5", "-1", "lots", "1e400", "5i", "GiB", "1 KiBB", "nan", "inf"])
def test_budget_sizes_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli_options.byte_size(text)


def test_the_process_prints_one_line_and_no_traceback(tmp_path):
    """The real command, as a user runs it (sys.argv, sys.exit, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv, code in [(["compare", "--policies", ""], 2), (["train", "--width", "1000000", "--quiet"], 2),
                       (["memory", "--budget", "0"], 2), (["--version"], 0)]:
        r = subprocess.run([sys.executable, "-m", "npapprox", *argv], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == code, (argv, r.stderr)
        lines = (r.stderr if code else r.stdout).splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)


# --------------------------------------------------------------------------- #
# Sizes that cannot fit are refused before anything large is allocated
# --------------------------------------------------------------------------- #
ABSURD = {
    "train width": (["train", "--width", "1000000", "--quiet"], ["--width 1000000", "parameters", "8.0 GiB"]),
    "compare width": (["compare", "--width", "1000000", "--quiet"], ["--width 1000000"]),
    "study width": (["study", "--width", "1000000"], ["--width 1000000"]),
    "memory width": (["memory", "--width", "1000000"], ["--width 1000000"]),
    "train size": (["train", "--size", "100000", "--quiet"], ["--size", "1x100000x100000", "8.0 GiB"]),
    "study size": (["study", "--size", "100000"], ["--size"]),
    "memory size": (["memory", "--size", "100000"], ["--size", "3x100000x100000"]),
    "memory batch": (["memory", "--batch", "100000"], ["--batch 100000", "8.0 GiB"]),
    "train batch": (["train", "--batch-size", "1000000", "--size", "256", "--quiet"], ["--batch-size 1000000"]),
    "memory budget": (["memory", "--budget", "1TiB"], ["--budget 1.0 TiB", "8.0 GiB"]),
}


@pytest.mark.parametrize("case", list(ABSURD), ids=list(ABSURD))
def test_a_size_that_cannot_fit_is_refused_up_front(case, capsys, memory_8gib):
    argv, fragments = ABSURD[case]
    tracemalloc.start()
    try:
        assert_one_line_error(argv, capsys, "more than", *fragments)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2 ** 20, f"refusing took {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("command", ["memory", "train"])
def test_the_memory_check_refuses_only_what_does_not_fit(command, monkeypatch, capsys, tmp_path):
    """Against the real ledger of the full-size batch (built here, independently)
    plus the parameters (twice for SGD with momentum: its buffer): a machine with
    exactly that much memory runs the command; one with half of it is refused."""
    shape = ["--model", "resnet20", "--width", "32", "--size", "16", "--policy", "exact"]
    argv = (["memory", *shape, "--channels", "1", "--batch", "48"] if command == "memory" else
            ["train", *shape, "--batch-size", "48", "--iterations", "1", "--quiet"])
    nn.manual_seed(0)
    model = nn.build_model("resnet20", num_classes=10, in_channels=1, input_size=16, width=32)
    x = np.random.default_rng(0).standard_normal((48, 1, 16, 16), dtype=np.float32)
    params = sum(p.data.nbytes for p in model.parameters())
    need = ledger(model, x, np.arange(48) % 10, Exact()).activation_stored + params * (1 + (command == "train"))
    monkeypatch.setattr(limits, "available_memory", lambda: need)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0 and ("stored for backward" in out or "resnet20 on digits" in out), err
    monkeypatch.setattr(limits, "available_memory", lambda: need // 2)
    assert_one_line_error(argv, capsys, "--batch 48" if command == "memory" else "--batch-size 48", "more than")


@pytest.mark.parametrize("name, width, size, policy", [
    ("resnet20", 40, 16, Exact()), ("resnet164", None, 16, Paper(4)), ("vgg11", 80, 64, Paper(4)),
    ("densenet40", 30, 16, Exact()), ("resnet8", 4, 8, Paper(2)),
])
def test_footprint_predicts_the_built_models_ledger(name, width, size, policy):
    """Parameters exactly; the stored bytes per image are what one more image adds
    to the ledger of the model built at that width and size (batches of 4 and 8),
    and no more than a batch's average."""
    params, per_image = footprint(name, policy, in_channels=3, size=size, width=width)
    nn.manual_seed(0)
    model = nn.build_model(name, num_classes=10, in_channels=3, input_size=size, width=width)
    rng = np.random.default_rng(0)
    stored = {n: ledger(model, rng.standard_normal((n, 3, size, size), dtype=np.float32), np.arange(n) % 10,
                        policy).activation_stored for n in (4, 8)}
    assert params == sum(p.data.nbytes for p in model.parameters())
    assert per_image == pytest.approx((stored[8] - stored[4]) / 4, rel=1e-3, abs=8)
    assert per_image <= stored[4] / 4


def test_load_dataset_refuses_a_resize_that_cannot_fit():
    load_dataset("digits")                           # imports scikit-learn outside the measurement
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"1797 digits images resized to 1x100000x100000 float32 would take "
                                             r"[0-9.]+ TiB, more than the"):
            load_dataset("digits", size=100000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2 ** 20


# --------------------------------------------------------------------------- #
# memory --budget: written as in the help, and below the smallest batch
# --------------------------------------------------------------------------- #
def test_budget_written_with_an_exponent_runs_the_search(capsys, tmp_path):
    budget = 1e7
    rc, out, err = run_cli(["memory", "--model", "resnet8", "--width", "4", "--size", "8", "--channels", "1",
                            "--batch", "16", "--budget", "1e7", "--json", str(tmp_path / "m.json")], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())["budget"]
    assert (result["model"], result["input"], result["policy"], result["budget"]) == \
        ("resnet8", [1, 8, 8], "Paper(bits=4)", 10**7)
    assert result["batch"] == result["predicted"] and not result["measured"] and result["peak"] is None
    batch = int(re.search(r"largest batch with predicted peak <= 9.5 MiB \(10,000,000 B\): (\d+) for "
                          r"resnet8 on 1x8x8 inputs under Paper\(bits=4\); from the lines through", out).group(1))
    nn.manual_seed(0)
    model = nn.build_model("resnet8", num_classes=10, in_channels=1, input_size=8, width=4)
    x = np.random.default_rng(1).standard_normal((batch, 1, 8, 8), dtype=np.float32)
    assert measure_peak(model, x, np.arange(batch) % 10, Paper(4)) <= 1.01 * budget
    assert result["batch"] == batch


def test_budget_confirmed_measures_the_answer(capsys, tmp_path):
    """--confirm: the answer is a measured batch that fits (the line's prediction measured)."""
    rc, out, err = run_cli(["memory", "--model", "resnet8", "--width", "4", "--size", "8", "--channels", "1",
                            "--batch", "16", "--budget", "8MiB", "--confirm", "--json", str(tmp_path / "m.json")],
                           capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())["budget"]
    assert result["measured"] and result["batch"] in result["probes"] and result["peak"] <= 8 * 2**20
    assert f"largest batch with measured peak <= 8.0 MiB (8,388,608 B): {result['batch']} for resnet8" in out


def test_budget_below_the_smallest_batch_is_one_line(capsys):
    assert_one_line_error(["memory", "--model", "resnet8", "--width", "4", "--size", "8", "--channels", "1",
                           "--batch", "4", "--budget", "1KiB"], capsys, "batch of 2", "budget of 1.0 KiB")


def test_budget_between_the_smallest_batches():
    """A budget that fits 3 images but not 4 finds 3 (the search's line starts at 4)."""
    nn.manual_seed(0)
    model = nn.build_model("resnet8", num_classes=10, in_channels=3, input_size=32, width=8)
    rng = np.random.default_rng(1)

    def peak(n):
        return measure_peak(model, rng.standard_normal((n, 3, 32, 32), dtype=np.float32), np.arange(n) % 10,
                            Paper(4))
    peak(2)                                          # the first measurement also pays for warm-up
    p2, p3, p4 = peak(2), peak(3), peak(4)
    assert p2 < p3 < p4
    batch, measured = max_batch(model, (3, 32, 32), 10, Paper(4), (p3 + p4) // 2)
    assert batch == 3 and measured <= (p3 + p4) // 2
    batch, _ = max_batch(model, (3, 32, 32), 10, Paper(4), (p2 + p3) // 2)
    assert batch == 2


@pytest.mark.parametrize("args, policy", [
    (["train", "--engine", "torch"], None), (["compare", "--engine=torch"], None),
    (["train"], "PASSIVE"), (["train", "--engine", "npapprox"], "PASSIVE"), (["study", "torch"], "PASSIVE")])
def test_openmp_wait_policy_is_left_to_torch_for_the_torch_engine(args, policy):
    """``import npapprox`` makes OpenMP's threads sleep between regions (the engine's pools)
    unless the command runs the PyTorch engine, whose OpenMP threads keep their default;
    a user's own setting always wins."""
    code = (f"import sys; sys.argv = ['npapprox'] + {args!r}; import npapprox, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(policy)
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
