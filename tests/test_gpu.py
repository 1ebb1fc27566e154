"""GPU tests: they run wherever CuPy sees a CUDA device and skip visibly elsewhere.

(a) kernel parity on the device: the CUDA kernels (``npapprox.kernels.gpu``, reached
    through the dispatch with CuPy arrays) give the NumPy reference's bytes, for
    every K, both quantizers, deterministic and stochastic, odd and large sizes,
    NaN/inf, subnormals (CuPy compiles with -ftz=true; the kernels must not flush)
    and the paper mask's edge cases;
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

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npapprox.kernels as K
import test_kernels as TK
from npapprox import nn, ops
from npapprox.backend import gpu_status, to_device
from npapprox.kernels import reference as R
from npapprox.optim import SGD
from npapprox.policy import Exact, Generic, Paper, storage_policy
from npapprox.ledger import ledger, measure_peak
from npapprox.tensor import Tensor

# A machine without CuPy or without a device skips, saying why; CuPy installed but unusable (it does
# not import, or cannot compile a kernel) fails every test instead: an installation to repair.
_STATUS = gpu_status()
pytestmark = pytest.mark.skipif(not _STATUS.available and not _STATUS.broken,
                                reason=f"no usable CUDA device: {_STATUS.reason}")

BITS = (1, 2, 4, 8)
F32 = np.float32


def SETTINGS(n):
    return settings(deadline=None, max_examples=n,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def cp():
    from npapprox.backend import cupy  # noqa: PLC0415
    return cupy()


@pytest.fixture(autouse=True)
def _restore_dispatch():
    if _STATUS.broken:
        pytest.fail(f"CuPy is installed but unusable: {_STATUS.reason}", pytrace=False)
    yield
    K.use_reference(False)


def _host(a):
    return to_device(a, "cpu")


def _same(dev, ref):
    """Device array ``dev`` has the dtype, shape and bytes of the host array ``ref``."""
    assert not isinstance(dev, np.ndarray), "expected a CuPy array from the device path"
    return TK._same(_host(dev), ref)


# --------------------------------------------------------------------------- #
# (a) kernel parity on the device
# --------------------------------------------------------------------------- #
def _check_paper(cp, y, k, s, bits, step, off, impl="gpu"):
    d = cp.asarray
    assert K.implementation(d(y)) == impl
    ref_packed, ref_nf = R.paper_pack(y, k, s, bits)
    packed, nf = K.paper_pack(d(y), d(k), d(s), bits)
    assert _same(packed, ref_packed), "packed bytes differ"
    assert nf == ref_nf
    for relu in (False, True):
        assert _same(K.paper_decode(d(ref_packed), y.shape, d(s), d(step), d(off), bits, relu),
                     R.paper_decode(ref_packed, y.shape, s, step, off, bits, relu)), f"decode relu={relu}"
    mask = K.paper_mask(d(ref_packed), y.shape, d(s), bits)
    assert _same(mask, R.paper_mask(ref_packed, y.shape, s, bits))
    return _host(mask)


def _check_paper_gb(cp, y, gamma, beta, bits, impl="gpu"):
    k, s = TK.paper_params(gamma, beta, bits)
    return _check_paper(cp, y, k, s, bits, TK.paper_step(gamma, bits), np.asarray(beta, F32), impl)


def _check_generic(cp, x, bits, group, stochastic, seed):
    d = cp.asarray
    ref = R.generic_pack(x, bits, group, stochastic, seed)
    got = K.generic_pack(d(x), bits, group, stochastic, seed)
    assert _same(got[0], ref[0]), "packed bytes differ"
    assert _same(got[1], ref[1]), "lo differs"
    assert _same(got[2], ref[2]), "scale differs"
    assert got[3] == ref[3]
    assert _same(K.generic_decode(d(ref[0]), d(ref[1]), d(ref[2]), bits, group, x.shape),
                 R.generic_decode(*ref[:3], bits, group, x.shape))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 3), (4, 7),
                                   (2, 3, 61, 67), (1, 9, 33, 31), (64, 16, 32, 32)], ids=str)
def test_device_paper_bit_identical(cp, bits, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, shape, "gpu")).encode()))
    gamma, beta = TK.channel_params(rng, shape[1])
    y = TK.bn_output(rng, shape, gamma, beta, special=0.3, nonfinite=0.02)
    _check_paper_gb(cp, y, gamma, beta, bits)


@pytest.mark.parametrize("bits", BITS)
def test_device_paper_mask_edge_cases_and_subnormals(cp, bits):
    """gamma <= 0, == 0, tiny; beta/gamma = +-1e3; y in (0, 1e-6] including subnormals; +-0.0; NaN."""
    gammas = np.float32([1.0, -1.0, -0.2, 0.0, 1e-30, -1e-30, 1e-38, 2.0, 1e3])
    rel = np.float32([0.0, 1e3, -1e3, 2.9, -3.5])
    gamma = np.repeat(gammas, rel.size)
    beta = (np.tile(rel, gammas.size) * np.abs(gamma)).astype(F32)
    beta[gamma == 0] = np.float32([0.0, 1.0, -1.0, 0.5, -0.5])
    tiny = np.float32([1e-45, 3e-45, 1e-40, 1.1754942e-38, 1e-38, 1e-30, 1e-7, 5e-7, 1e-6])
    vals = np.concatenate([tiny, -tiny, np.float32([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0])])
    y = np.ascontiguousarray(np.broadcast_to(vals[:, None], (vals.size, gamma.size)))
    mask = _check_paper_gb(cp, y.reshape(vals.size, gamma.size, 1, 1), gamma, beta, bits)
    assert np.array_equal(mask.reshape(y.shape), y > 0)
    # k = 1: u = y itself in the subnormal range (ceil(1e-45) = 1): flushing would change codes
    sub = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, 5.877472e-39]).reshape(6, 1, 1)
    _check_paper(cp, sub, np.float32([1.0]), np.int32([1]), bits, np.float32([1e-40]), np.float32([-1e-45]))


@SETTINGS(60)
@given(case=TK.paper_cases(max_side=9))
def test_device_paper_bit_identical_random(case):
    from npapprox.backend import cupy  # noqa: PLC0415
    bits, y, gamma, beta, k, s = case
    _check_paper(cupy(), y, k, s, bits, TK.paper_step(gamma, bits), beta)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [1, 3, 64, 256, 2049, 20000, 2 ** 40])
@pytest.mark.parametrize("stochastic", [False, True], ids=["det", "sto"])
def test_device_generic_bit_identical(cp, bits, group, stochastic):
    rng = np.random.default_rng(bits * 1000 + min(group, 10 ** 6))
    for n in (0, 1, 7, 45_001):
        for kind in ("normal", "wide", "constant", "zeros", "specials", "nonfinite"):
            _check_generic(cp, TK.generic_input(rng, n, kind), bits, group, stochastic,
                           int(rng.integers(0, 2 ** 32)))
    _check_generic(cp, TK.generic_input(rng, (1 << 20) + 3, "normal"), bits, group, stochastic, 99)


def test_device_generic_subnormal_ranges(cp):
    sub = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, 5.877472e-39])
    x = np.concatenate([sub, np.float32([0.0, -0.0, 1e-45, 2e-45, 1.0, 1e-45])])
    for bits in BITS:
        for group in (1, 2, 3, 4, 6, 12):
            for stochastic in (False, True):
                _check_generic(cp, x, bits, group, stochastic, 77)


@SETTINGS(60)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 3000), group=st.integers(1, 300),
       kind=st.sampled_from(["normal", "wide", "constant", "zeros", "specials", "nonfinite"]),
       stochastic=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_device_generic_bit_identical_random(bits, n, group, kind, stochastic, seed):
    from npapprox.backend import cupy  # noqa: PLC0415
    _check_generic(cupy(), TK.generic_input(np.random.default_rng(seed), n, kind), bits, group, stochastic, seed)


@pytest.mark.parametrize("bits", BITS)
def test_device_bit_packing_and_noise(cp, bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 5, 4097, 1 << 20):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        packed = R.pack_bits(codes, bits)
        assert _same(K.pack_bits(cp.asarray(codes), bits), packed)
        assert _same(K.unpack_bits(cp.asarray(packed), n, bits), R.unpack_bits(packed, n, bits))
    for seed in (0, 12345, 2 ** 32 - 1):
        assert _same(K.counter_uniform(70_001, seed, xp=cp), R.counter_uniform(70_001, seed))


def test_device_kernels_accept_views_and_host_parameters(cp):
    rng = np.random.default_rng(3)
    gamma, beta = TK.channel_params(rng, 6)
    base = TK.bn_output(rng, (3, 12, 9, 10), np.repeat(gamma, 2), np.repeat(beta, 2))
    y = base[:, ::2, :, ::-1]
    k, s = TK.paper_params(gamma, beta, 4)
    ref = R.paper_pack(np.ascontiguousarray(y), k, s, 4)
    got = K.paper_pack(cp.asarray(base)[:, ::2, :, ::-1], k, s, 4)     # k, s stay NumPy arrays
    assert _same(got[0], ref[0]) and got[1] == ref[1]


def test_device_decoded_nan_is_the_canonical_quiet_nan(cp):
    """The GPU's arithmetic writes 0x7fffffff for a NaN result; the decoders write the
    contract's 0x7fc00000 (NaN lo / scale / step / off with any payload, 0 * inf, inf - inf)."""
    pats = np.uint32([0x7fc00000, 0x7fc00001, 0xffc00000, 0x7f800001, 0xffffffff, 0x7fffffff]).view(F32)
    lo = np.concatenate([pats, np.ones(pats.size, F32), np.float32([1.0, -3e38])])
    scale = np.concatenate([np.ones(pats.size, F32), pats, np.float32([np.inf, np.inf])])
    packed = R.pack_bits(np.tile(np.arange(4, dtype=np.uint8), lo.size), 4)
    d = cp.asarray
    assert _same(K.generic_decode(d(packed), d(lo), d(scale), 4, 4, (4 * lo.size,)),
                 R.generic_decode(packed, lo, scale, 4, 4, (4 * lo.size,)))
    C = 2 * pats.size + 1
    step = np.concatenate([pats, np.ones(pats.size, F32), np.float32([np.inf])])
    off = np.concatenate([np.zeros(pats.size, F32), pats, np.float32([-np.inf])])
    s = np.full(C, 2, np.int32)
    packed = R.pack_bits(np.tile(np.arange(4, dtype=np.uint8), C), 2)
    for relu in (False, True):
        ref = R.paper_decode(packed, (1, C, 4), s, step, off, 2, relu)
        assert set(ref.view(np.uint32)[np.isnan(ref)].tolist()) == {0x7fc00000}
        assert _same(K.paper_decode(d(packed), (1, C, 4), d(s), d(step), d(off), 2, relu), ref)


def test_reference_on_cupy_arrays_matches_away_from_subnormals(cp):
    """The forced reference on CuPy arrays gives the same bytes for inputs whose
    arithmetic stays in the normal range (CuPy's own kernels flush subnormals)."""
    rng = np.random.default_rng(8)
    gamma = np.float32([1.0, -0.5, 2.0, 0.3])
    beta = np.float32([0.1, -0.2, 0.0, 1.5])
    y = TK.bn_output(rng, (4, 4, 6, 5), gamma, beta, special=0.0)
    K.use_reference(True)
    assert K.implementation(cp.asarray(y)) == "reference"
    for bits in BITS:
        _check_paper_gb(cp, y, gamma, beta, bits, impl="reference")
        for stochastic in (False, True):
            _check_generic(cp, y, bits, 64, stochastic, 5)


# --------------------------------------------------------------------------- #
# (b) a ResNet (and the other ops) on the GPU against the CPU
# --------------------------------------------------------------------------- #
def _resnet(seed=0, **kw):
    nn.manual_seed(seed)
    args = dict(depth=8, num_classes=5, in_channels=3, width=8)
    args.update(kw)
    return nn.PreActResNet(**args)


def _run(model, x, t, policy):
    model.zero_grad()
    with storage_policy(policy):
        logits = model(Tensor(x))
        loss = ops.cross_entropy(logits, t)
    loss.backward()
    return (_host(logits.data), _host(loss.data),
            {n: _host(p.grad) for n, p in model.named_parameters()})


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
        for a, b in zip(g, c):
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
    import json  # noqa: PLC0415

    from npapprox import cli  # noqa: PLC0415

    rows = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        assert cli.main(["train", "--model", "resnet8", "--width", "8", "--iterations", "3", "--batch-size", "64",
                         "--policy", "paper4", "--device", device, "--out", str(out), "--quiet"]) == 0
        rows[device] = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(rows["gpu"]) == 3 and all(np.isfinite(r["loss"]) for r in rows["gpu"])
    assert abs(rows["gpu"][0]["loss"] - rows["cpu"][0]["loss"]) < 1e-4 * abs(rows["cpu"][0]["loss"])
