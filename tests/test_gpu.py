"""GPU tests: they run wherever CuPy sees a CUDA device and skip visibly elsewhere.

(a) kernel parity on the device is part of the parity suite (tests/test_parity.py,
    its ``device`` implementation, skipped and failed by the same rules);
(b) a pre-activation ResNet on the GPU against the same ResNet on the CPU: loss and
    every gradient (float32 tolerance), exact and Paper(4); the forward is
    bit-identical across exact-forward policies on the GPU too; the ledger is the
    CPU's; other ops (max-pool, sigmoid, tanh, GELU via cupyx erf, mul) too;
(c) a few training steps under Paper(4) on the GPU; the measured peak (CuPy's
    memory pool) is lower under Paper(4) than exact.

How to run: ``pip install -e ".[test,gpu]"`` on a machine with an NVIDIA GPU, then
``python -m pytest -q tests/test_gpu.py`` (docs/kernels.md).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require_gpu

import npapprox.kernels as K
from npapprox import cli, ops
from npapprox.backend import to_device
from npapprox.ledger import ledger
from npapprox.optim import SGD
from npapprox.peak import measure_peak
from npapprox.policy import Exact, Generic, Paper, storage_policy
from npapprox.tensor import Tensor

from support import resnet, resnet_forward_backward

F32 = np.float32


@pytest.fixture(scope="module")
def cp():
    return require_gpu()


@pytest.fixture(autouse=True)
def _restore_dispatch():
    require_gpu()            # no device: skip, saying why; CuPy installed but unusable: fail
    yield
    K.use_reference(False)


def _host(a):
    return to_device(a, "cpu")


# --------------------------------------------------------------------------- #
# (b) a ResNet (and the other ops) on the GPU against the CPU
# --------------------------------------------------------------------------- #
def _resnet(seed=0, **kw):
    return resnet(seed, **{"width": 8, **kw})


def _run(model, x, t, policy):
    """Logits, loss and every gradient, on the host."""
    logits, loss, grads = resnet_forward_backward(model, x, t, policy)
    return _host(logits), _host(loss), {n: _host(g) for n, g in grads.items()}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


RNG = np.random.default_rng(20190121)
X = RNG.standard_normal((16, 3, 16, 16)).astype(F32)
T = RNG.integers(0, 5, 16)


@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_resnet_forward_backward_on_gpu_matches_cpu(cp, shortcut):
    cpu = _resnet(1, shortcut=shortcut)
    gpu = _resnet(1, shortcut=shortcut).to("gpu")
    assert all(not isinstance(p.data, np.ndarray) for p in gpu.parameters())
    for policy, tol in ((Exact(), 1e-4), (Paper(4), 2e-2), (Generic(4), 2e-2)):
        c_logits, c_loss, c_grads = _run(cpu, X, T, policy)
        g_logits, g_loss, g_grads = _run(gpu, cp.asarray(X), cp.asarray(T), policy)
        assert _rel(g_logits, c_logits) < 1e-4, f"{policy}: logits"
        assert abs(float(g_loss) - float(c_loss)) <= 1e-4 * max(1.0, abs(float(c_loss)))
        for name, g in c_grads.items():
            assert g_grads[name].dtype == g.dtype and g_grads[name].shape == g.shape
            assert _rel(g_grads[name], g) < tol, f"{policy}: gradient of {name} ({_rel(g_grads[name], g):.2e})"


def test_gpu_forward_is_bit_identical_under_exact_forward_policies(cp):
    gpu = _resnet(2).to("gpu")
    gpu.bn.storage = None
    ref_logits, ref_loss, _ = _run(gpu, cp.asarray(X), cp.asarray(T), Exact())
    for policy in (Paper(4), Paper(8), Generic(4), Generic(2, stochastic=True, seed=3)):
        logits, loss, grads = _run(gpu, cp.asarray(X), cp.asarray(T), policy)
        assert np.array_equal(logits, ref_logits), f"{policy}: logits differ from the exact forward"
        assert np.array_equal(loss, ref_loss)
        assert all(np.isfinite(g).all() for g in grads.values())


def test_gpu_ledger_equals_the_cpu_ledger(cp):
    cpu, gpu = _resnet(3), _resnet(3).to("gpu")
    for policy in (Exact(), Paper(4), Generic(4)):
        a = ledger(cpu, X, T, policy)
        b = ledger(gpu, cp.asarray(X), cp.asarray(T), policy)
        rows = [(e.op, e.name, e.form, e.bits, e.shape, e.payload, e.meta) for e in a.entries]
        assert rows == [(e.op, e.name, e.form, e.bits, e.shape, e.payload, e.meta) for e in b.entries]


def test_other_ops_on_gpu_match_cpu(cp):
    """max-pool (argmax storage), sigmoid, tanh, GELU (cupyx erf), mul with fan-out, flatten, linear."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 9, 9)).astype(F32)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(F32)
    lw = (rng.standard_normal((5, 6 * 5 * 5)) * 0.1).astype(F32)
    t = rng.integers(0, 5, 4)

    def run(dev):
        tx, tw, tl = (Tensor(to_device(a, dev), requires_grad=True) for a in (x, w, lw))
        h = ops.conv2d(tx, tw, padding=1)
        h = ops.max_pool2d(h, 3, 2, 1)
        a = ops.sigmoid(h)
        b = ops.gelu(ops.tanh(h))
        z = ops.linear(ops.flatten(ops.mul(a, b) + a), tl)
        loss = ops.cross_entropy(z, to_device(t, dev))
        loss.backward()
        return [_host(v) for v in (loss.data, tx.grad, tw.grad, tl.grad)]

    for policy in (Exact(), Generic(8)):
        with storage_policy(policy):
            c, g = run("cpu"), run("gpu")
        for a, b in zip(g, c, strict=True):
            assert _rel(a, b) < (1e-4 if isinstance(policy, Exact) else 1e-2)


# --------------------------------------------------------------------------- #
# (c) training on the GPU, measured GPU memory
# --------------------------------------------------------------------------- #
def test_a_few_training_steps_under_paper4_on_gpu(cp):
    model = _resnet(5).to("gpu")
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, t = cp.asarray(X), cp.asarray(T)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with storage_policy(Paper(4)):
            loss = ops.cross_entropy(model(Tensor(x)), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert all(not isinstance(p.data, np.ndarray) and p.data.dtype == np.float32 for p in model.parameters())
    state = model.state_dict()                                   # host copies
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_measured_gpu_peak_is_lower_under_paper4(cp):
    model = _resnet(4, depth=32, width=8).to("gpu")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 16, 16)).astype(F32)
    t = rng.integers(0, 5, 64)
    exact = min(measure_peak(model, x, t, Exact()) for _ in range(2))
    paper = max(measure_peak(model, x, t, Paper(4)) for _ in range(2))
    assert 0 < paper < 0.85 * exact, f"GPU pool peak Paper(4) {paper:,} B vs Exact {exact:,} B"


def test_train_command_on_the_gpu(tmp_path, capsys):
    """`npapprox train --device gpu`: a few iterations, metrics written, loss finite, and the
    same first-step loss as on the CPU (same seed, same batch)."""


    rows = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        assert cli.main(["train", "--model", "resnet8", "--width", "8", "--iterations", "3", "--batch-size", "64",
                         "--policy", "paper4", "--device", device, "--out", str(out), "--quiet"]) == 0
        rows[device] = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(rows["gpu"]) == 3 and all(np.isfinite(r["loss"]) for r in rows["gpu"])
    assert abs(rows["gpu"][0]["loss"] - rows["cpu"][0]["loss"]) < 1e-4 * abs(rows["cpu"][0]["loss"])
