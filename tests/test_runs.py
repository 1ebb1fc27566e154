"""Run folders and checkpoints: nothing lost, nothing mixed, no code run from a file.

Checkpoint format and integrity, damaged or foreign checkpoints through the
command, one run per folder, logs after kill -9 and torn lines, --out checked
before work, SIGINT/SIGTERM, and what ``compare`` reports."""
from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import npapprox.study
from npapprox import checkpoint, cli, nn, ops, storage_policy
from npapprox.data import load_dataset
from npapprox.policy import policy_from_name
from npapprox.runfolder import CHECKPOINT, METRICS, STEPS
from npapprox.tensor import Tensor
from npapprox.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
# per epoch: ceil(1437 / 256) = 6 iterations
RUN = ["--model", "resnet8", "--width", "4", "--batch-size", "256", "--quiet"]


def _train_args(out, iterations=3, *extra):
    return ["train", *RUN, "--iterations", str(iterations), "--out", str(out), *extra]


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- #
# The checkpoint format
# --------------------------------------------------------------------------- #
ARRAYS = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
          "bn.running_var": np.array([1.5, np.inf, -0.0], np.float32), "scalar": np.float64(np.pi),
          "empty": np.zeros((0, 3), np.int64), "mask": np.array([True, False]), "codes": np.arange(5, dtype=np.uint8)}
META = {"iteration": 7, "history": [{"loss": 0.1 + 0.2}], "name": "é"}


def test_checkpoint_round_trip_is_exact_and_safetensors_reads_it(tmp_path):
    """The independent reader (the safetensors library) sees the same arrays and the metadata."""

    path = tmp_path / "c.safetensors"
    checkpoint.save(path, ARRAYS, META)
    arrays, meta = checkpoint.load(path)
    assert meta == META and list(arrays) == list(ARRAYS)
    for k, v in ARRAYS.items():
        assert arrays[k].dtype == np.asarray(v).dtype and arrays[k].tobytes() == np.asarray(v).tobytes(), k
    theirs = load_file(str(path))
    assert set(theirs) == set(ARRAYS)
    for k, v in ARRAYS.items():
        assert theirs[k].dtype == np.asarray(v).dtype and theirs[k].tobytes() == np.asarray(v).tobytes(), k
    with safe_open(str(path), "np") as f:
        info = f.metadata()
    assert info["format"] == "npapprox-checkpoint" and json.loads(info["meta"]) == META
    blob = path.read_bytes()
    assert int.from_bytes(blob[:8], "little") % 8 == 0 and blob[8:9] == b"{"


def test_a_trainers_checkpoint_names_its_arrays_as_the_model_does(tmp_path):
    cfg = TrainConfig(model="resnet8", width=4, batch_size=256, iterations=2, out=str(tmp_path / "r"))
    t = Trainer(cfg, progress=False, log=lambda *_: None)
    t.run()
    arrays, meta = checkpoint.load(tmp_path / "r" / CHECKPOINT)
    model = t.model.state_dict()
    assert [k for k in arrays if not k.startswith("optimizer/")] == list(model)
    for k, v in model.items():
        assert np.array_equal(arrays[k], v), k
    for name, p in t.model.named_parameters():                      # SGD momentum, per parameter
        assert arrays[f"optimizer/{name}/momentum_buffer"].shape == p.shape
    assert meta["iteration"] == 2 and meta["config"]["model"] == "resnet8" and meta["optimizer"]["steps"] == [2] * len(
        list(t.model.parameters()))


def test_torch_reads_a_trainers_checkpoint_by_parameter_name(tmp_path, torch):
    """What a PyTorch bridge needs: safetensors.torch loads the file, names and values as the model's."""
    from safetensors.torch import load_file

    cfg = TrainConfig(model="resnet8", width=4, batch_size=256, iterations=1, out=str(tmp_path / "r"))
    t = Trainer(cfg, progress=False, log=lambda *_: None)
    t.run()
    tensors = load_file(str(tmp_path / "r" / CHECKPOINT))
    for name, p in t.model.named_parameters():
        assert tensors[name].dtype == torch.float32 and np.array_equal(tensors[name].numpy(), p.data), name


def test_plain_safetensors_and_pickles_are_refused_without_running_them(tmp_path, capsys):

    out = tmp_path / "run"
    assert cli.main(_train_args(out, 2)) == 0
    capsys.readouterr()
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    (out / CHECKPOINT).write_bytes(pickle.dumps(Payload()))
    assert cli.main(_train_args(out, 2, "--resume")) == 2
    _one_line_error(capsys, str(out / CHECKPOINT), "not a checkpoint")
    (out / "checkpoint.pkl").write_bytes(pickle.dumps(Payload()))   # the name of old: never read
    (out / CHECKPOINT).unlink()
    assert cli.main(_train_args(out, 2, "--resume")) == 2
    _one_line_error(capsys, "no checkpoint")
    assert not ran.exists()
    save_file({"conv.weight": np.ones(3, np.float32)}, str(out / CHECKPOINT), metadata={"format": "pt"})
    assert cli.main(_train_args(out, 2, "--resume")) == 2
    _one_line_error(capsys, "not an npapprox checkpoint")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(_train_args(out, 3)) == 0
    return out


def _flip_in_weight(path):
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    begin = json.loads(blob[8:8 + n])["conv.weight"]["data_offsets"][0]
    blob[8 + n + begin + 2] ^= 0x10
    path.write_bytes(bytes(blob))


def _other_arrays(path, width):
    """The run's metadata with another model's arrays, under a valid checksum."""
    arrays, meta = checkpoint.load(path)
    nn.manual_seed(0)
    other = nn.build_model("resnet8", num_classes=10, in_channels=1, input_size=8, width=width).state_dict()
    checkpoint.save(path, {**other, **{k: v for k, v in arrays.items() if k.startswith("optimizer/")}}, meta)


def _other_names(path):
    arrays, meta = checkpoint.load(path)
    checkpoint.save(path, {("x" + k if k == "conv.weight" else k): v for k, v in arrays.items()}, meta)


DAMAGE = {
    "zero bytes": (lambda p: p.write_bytes(b""), "is empty or truncated"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:100]), "is truncated or not a checkpoint"),
    "truncated arrays": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a checkpoint"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "is a folder"),
    "flipped byte in a weight": (_flip_in_weight, "is damaged (checksum mismatch)"),
    "another model's shapes": (lambda p: _other_arrays(p, 8), "array 'conv.weight' is float32[8, 1, 3, 3]"),
    "another model's names": (_other_names, "its arrays are not this model's"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_or_foreign_checkpoints_are_one_line_errors(finished_run, tmp_path, capsys, case):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damage, message = DAMAGE[case]
    damage(out / CHECKPOINT)
    capsys.readouterr()
    assert cli.main(_train_args(out, 3, "--resume")) == 2
    _one_line_error(capsys, f"checkpoint {out / CHECKPOINT}", message)


# --------------------------------------------------------------------------- #
# One run per folder
# --------------------------------------------------------------------------- #
def test_a_new_run_refuses_a_folder_holding_a_run_and_overwrite_starts_clean(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(out, 3)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(_train_args(out, 4)) == 2
    _one_line_error(capsys, str(out), "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # untouched
    assert cli.main(_train_args(out, 4, "--overwrite")) == 0
    assert [s["iteration"] for s in _lines(out / STEPS)] == [1, 2, 3, 4]
    assert [r["iteration"] for r in _lines(out / METRICS)] == [4]
    with pytest.raises(SystemExit) as e:
        cli.main(_train_args(out, 4, "--resume", "--overwrite"))
    assert e.value.code == 2


def _compare(out, policies, seeds, iterations=2):
    return cli.main(["compare", *RUN, "--iterations", str(iterations), "--policies", policies, "--seeds", seeds,
                     "--out", str(out)])


def test_compare_twice_in_one_folder_replaces_the_first(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(out, "exact,paper4", "0,1") == 0
    capsys.readouterr()
    assert _compare(out, "paper8", "3", iterations=3) == 0
    assert "held an earlier comparison" in capsys.readouterr().out
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("paper8,3,")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["paper8"]
    assert [s["iteration"] for s in _lines(out / "paper8" / "seed3" / STEPS)] == [1, 2, 3]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _compare(foreign, "exact", "0") == 2
    _one_line_error(capsys, "holds other files")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("policies, seeds, option, repeated", [("paper4,exact,paper4", "0", "--policies", "paper4"),
                                                                ("exact", "0,1,0", "--seeds", "0")])
def test_compare_refuses_a_repeated_policy_or_seed(tmp_path, capsys, policies, seeds, option, repeated):
    """A repeated policy or seed would count twice in the table: one line, before any work."""
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        _compare(out, policies, seeds, iterations=1)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and f"repeats {repeated}" in err
    assert not out.exists()


# --------------------------------------------------------------------------- #
# Logs after a crash
# --------------------------------------------------------------------------- #
KILL_AT = """
import os, signal, sys
from npapprox import cli
from npapprox.train import Trainer
step = Trainer.step
def step_then_die(self, xb, yb):
    if self.iteration == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, xb, yb)
Trainer.step = step_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_logs_survive_kill_9_and_resume_reads_like_the_uninterrupted_run(tmp_path, capsys):
    """SIGKILL in the second epoch, after the first epoch's checkpoint (iteration 6):
    the logs on disk reach the checkpoint, and the resumed logs equal the full run's."""
    cut, full = tmp_path / "cut", tmp_path / "full"
    args = _train_args(cut, 10, "--policy", "generic4s")
    proc = subprocess.run([sys.executable, "-c", KILL_AT.format(at=8), *args], env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint.load(cut / CHECKPOINT)[1]["iteration"] == 6
    assert [s["iteration"] for s in _lines(cut / STEPS)][:6] == [1, 2, 3, 4, 5, 6]
    assert cli.main(args + ["--resume"]) == 0
    assert "resumed from iteration 6 of 10" in capsys.readouterr().out
    assert cli.main(_train_args(full, 10, "--policy", "generic4s")) == 0
    assert [(s["iteration"], s["loss"]) for s in _lines(cut / STEPS)] == \
        [(s["iteration"], s["loss"]) for s in _lines(full / STEPS)]
    assert [r["test_acc"] for r in _lines(cut / METRICS)] == [r["test_acc"] for r in _lines(full / METRICS)]


def test_a_torn_last_log_line_is_repaired_on_resume(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with open(out / STEPS, "a") as f:
        f.write('{"iteration": 4, "lo')                            # a crash in mid-write
    capsys.readouterr()
    assert cli.main(_train_args(out, 3, "--resume")) == 0
    assert (out / STEPS).read_text() == (finished_run / STEPS).read_text()


def test_a_bad_line_inside_a_log_is_an_error_naming_the_file(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    lines = (out / STEPS).read_text().splitlines()
    lines[1] = "{garbage"
    (out / STEPS).write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli.main(_train_args(out, 3, "--resume")) == 2
    _one_line_error(capsys, f"{out / STEPS}, line 2: not JSON")


# --------------------------------------------------------------------------- #
# --out checked before any work
# --------------------------------------------------------------------------- #
def _unwritable(tmp_path) -> Path:
    """A folder no file can be created in (root ignores permissions: /sys refuses even root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except OSError:
        return locked / "out"
    (locked / "probe").unlink()
    return Path("/sys/npapprox-test-out")


@pytest.mark.parametrize("command", ["train", "compare", "study", "memory"])
@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command, where):

    def no_work(*_, **__):
        raise AssertionError("work started before --out was checked")

    for target, name in ((Trainer, "__init__"), (npapprox.study, "run"), (cli, "ledger"),
                         (nn, "build_model")):
        monkeypatch.setattr(target, name, no_work)
    (tmp_path / "file").write_text("x")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out",
           "unwritable": _unwritable(tmp_path)}[where]
    option = "--json" if command == "memory" else "--out"
    argv = {"train": ["train", "--out", str(out), "--quiet"], "compare": ["compare", "--out", str(out), "--quiet"],
            "study": ["study", "--out", str(out)], "memory": ["memory", "--json", str(out)]}[command]
    if command == "memory" and where == "a file":
        out = tmp_path                                              # --json names a file: a folder is wrong
        argv[-1] = str(out)
    try:
        assert cli.main(argv) == 2
    finally:
        if where == "unwritable" and out.parent.name == "locked":
            out.parent.chmod(0o700)
    message = {"a file": "is a folder, not a file" if command == "memory" else "is a file, not a folder",
               "under a file": f"{tmp_path / 'file'} is a file", "unwritable": "cannot write in"}[where]
    _one_line_error(capsys, f"{option} {out}", message)


# --------------------------------------------------------------------------- #
# Signals
# --------------------------------------------------------------------------- #
def _signal_after_first_epoch(args, signum):
    """Start ``npapprox`` with ``args``, send ``signum`` once it printed its first
    epoch, return (exit code, stdout + stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "npapprox", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.monotonic() + 300
    try:
        while "epoch   1" not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else ""
            assert line, f"no first epoch: {seen}"
            seen += line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, seen + out + err


def test_ctrl_c_without_out_says_nothing_was_saved():
    code, text = _signal_after_first_epoch(["train", *RUN, "--iterations", "100000"], signal.SIGINT)
    assert code == 130, text
    assert "SIGINT: stopped at iteration" in text and "nothing saved (no --out)" in text
    assert "checkpoint" not in text and "Traceback" not in text


def test_sigterm_writes_the_checkpoint_and_says_where(tmp_path):
    out = tmp_path / "run"
    code, text = _signal_after_first_epoch(_train_args(out, 100000), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, text
    assert f"checkpoint written to {out / CHECKPOINT}" in text and "--resume" in text and "Traceback" not in text
    stopped = int(text.split("stopped at iteration ")[1].split()[0])
    assert stopped >= 6 and checkpoint.load(out / CHECKPOINT)[1]["iteration"] == stopped
    assert [s["iteration"] for s in _lines(out / STEPS)] == list(range(1, stopped + 1))


# --------------------------------------------------------------------------- #
# What compare reports
# --------------------------------------------------------------------------- #
def _gradient(model, x, y, policy):
    """All parameter gradients as one float64 vector: forward under ``policy``, backward."""
    state = model.state_dict()
    model.zero_grad()
    with storage_policy(policy_from_name(policy)):
        loss = ops.cross_entropy(model(Tensor(x)), y)
    loss.backward()
    g = np.concatenate([p.grad.ravel().astype(np.float64) for p in model.parameters()])
    model.load_state_dict(state)
    return g


def test_compare_interleaves_policies_and_reports_gradient_error(tmp_path, capsys, monkeypatch):
    """The gradient error in the table is the one measured independently at the run's
    final weights (the checkpoint's) on the first training batch; naive4 is far off,
    paper4 is not; plots carry a title; an epoch of one (untimed) step shows no nan."""

    figures = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *a, **kw):
        ax = fig.axes[0]
        figures[Path(path).name] = (ax.get_title(), [line.get_marker() for line in ax.get_lines()])
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    out = tmp_path / "cmp"
    assert _compare(out, "exact,paper4,naive4", "0,1", iterations=1) == 0
    text = capsys.readouterr().out
    order = [line for line in text.splitlines() if line.startswith("== ")]
    assert order == [f"== {p}, seed {s}" for s in (0, 1) for p in ("exact", "paper4", "naive4")]
    table = (out / "results.md").read_text()
    assert "nan" not in table and "one run" in table and "resnet8 (width 4) on digits, batch 256" in table
    data = load_dataset("digits", seed=0)
    x, y = data.x_train[:256], data.y_train[:256]
    errors = {}
    for policy in ("exact", "paper4", "naive4"):
        arrays, meta = checkpoint.load(out / policy / "seed0" / CHECKPOINT)
        model = nn.build_model("resnet8", num_classes=10, in_channels=1, input_size=8, width=4)
        model.load_state_dict({k: v for k, v in arrays.items() if not k.startswith("optimizer/")})
        exact, g = _gradient(model, x, y, "exact"), _gradient(model, x, y, policy)
        rel = np.linalg.norm(g - exact) / np.linalg.norm(exact)
        cos = g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))
        row = meta["history"][-1]
        assert row["grad_rel_err"] == pytest.approx(rel, rel=1e-6, abs=1e-12)
        assert row["grad_cosine"] == pytest.approx(cos, rel=1e-9)
        errors[policy] = rel
    assert errors["exact"] == 0 and errors["paper4"] < 0.2 and errors["naive4"] > 0.4
    assert set(figures) == {"loss_vs_iterations.png", "loss_vs_time.png", "test_accuracy.png",
                            "gradient_error.png", "memory.png"}
    assert all("resnet8 (width 4) on digits, batch 256" in t for t, _ in figures.values())
    assert figures["test_accuracy.png"][1] == ["o"] * 3                   # one epoch: a visible point each
