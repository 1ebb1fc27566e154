"""Batch-norm kernels (npapprox.kernels.bn): compiled against the reference and float64 oracles.

Contract: element-wise outputs are bit-identical given the same per-channel
constants; reductions are float64 in the kernels and agree with a float64 oracle
to the output precision.
"""
import contextlib
import importlib
import os
import subprocess
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npapprox
import npapprox.ops.conv as conv
from npapprox import Tensor, ops, parallel, quant
from npapprox.kernels import bn as B
from npapprox.kernels import reference as R
from npapprox.kernels import use_reference
from npapprox.policy import Paper

SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (np.float32, np.float64)
_bn = importlib.import_module("npapprox._bn")


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    use_reference(False)


@contextlib.contextmanager
def reference():
    """The reference implementation inside the block (hypothesis runs many examples per test call)."""
    use_reference(True)
    try:
        yield
    finally:
        use_reference(False)


@st.composite
def problems(draw):
    """(x, gy, gamma, beta, mask) with M around the kernels' 32-lane and 1024-value block edges."""
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 5))
    m = draw(st.sampled_from([1, 7, 8, 9, 31, 32, 33, 64, 255, 600, 1023, 1025]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shift = draw(st.sampled_from([0.0, 3.0, -50.0]))
    x = (rng.standard_normal((n, c, m)) * rng.uniform(0.1, 3, (1, c, 1)) + shift).astype(dtype)
    x.flat[::11] = -0.0
    gy = rng.standard_normal((n, c, m)).astype(dtype)
    gy.flat[::13] = -0.0
    gamma = rng.uniform(-2, 2, c).astype(dtype)
    gamma[0] = 0 if c > 2 else gamma[0]
    beta = rng.uniform(-1, 1, c).astype(dtype)
    mask = rng.random((n, c, m)) < 0.5
    return x, gy, gamma, beta, mask


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _stats64(x):
    x64 = x.astype(np.float64)
    return x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))


def test_compiled_module_is_built():
    assert B.compiled_available() and B._compiled is _bn


@SETTINGS
@given(p=problems())
def test_stats_against_float64_oracle(p):
    x = p[0]
    mu, var = B.bn_stats(x)
    mu64, var64 = _stats64(x)
    assert mu.dtype == var.dtype == x.dtype
    eps = np.finfo(x.dtype).eps
    scale = np.abs(x.astype(np.float64)).max() + 1e-30
    if x.dtype == np.float32:   # float64 sums rounded once: within one float32 ulp of the oracle
        np.testing.assert_array_max_ulp(mu, mu64.astype(np.float32), maxulp=1)
        np.testing.assert_array_max_ulp(var, var64.astype(np.float32), maxulp=1)
    else:                       # float64 sums in another order
        np.testing.assert_allclose(mu, mu64, rtol=0, atol=16 * eps * scale)
        np.testing.assert_allclose(var, var64, rtol=0, atol=16 * eps * scale ** 2)
    with reference():     # the reference sums in the array's precision: close, not equal
        rmu, rvar = B.bn_stats(x)
    np.testing.assert_allclose(rmu, mu64, rtol=0, atol=64 * eps * scale)
    np.testing.assert_allclose(rvar, var64, rtol=64 * eps, atol=64 * eps * scale * np.sqrt(var64.max() + 1e-30))


@SETTINGS
@given(p=problems(), want=st.sampled_from([(True, False), (False, True), (True, True)]))
def test_apply_bit_identical_to_reference(p, want):
    x, _, gamma, beta, _ = p
    mu, var = B.bn_stats(x)
    scale = gamma * (1 / np.sqrt(var + 1e-5)).astype(x.dtype)
    y, h = B.bn_apply(x, mu, scale, beta, want_y=want[0], want_h=want[1])
    with reference():
        ry, rh = B.bn_apply(x, mu, scale, beta, want_y=want[0], want_h=want[1])
    # independent formula: y = (x - mu) * scale + beta, h = relu with NumPy's y * (y > 0) bits
    oy = (x - mu[:, None]) * scale[:, None] + beta[:, None]
    for got, ref, oracle in ((y, ry, oy), (h, rh, oy * (oy > 0))):
        if got is None:
            assert ref is None
            continue
        assert got.dtype == x.dtype
        assert np.array_equal(_bits(got), _bits(ref)) and np.array_equal(_bits(got), _bits(oracle))


def _backward_oracle64(gy, xhat, scale, mask, batch_stats):
    """Float64 BN backward: g = gy * mask; gbeta = sum g, ggamma = sum g xhat;
    gx = scale (g - gbeta/M - xhat ggamma/M), or scale g with running statistics."""
    g = gy.astype(np.float64) * mask
    gbeta, ggamma = g.sum(axis=(0, 2)), (g * xhat).sum(axis=(0, 2))
    m = g.shape[0] * g.shape[2]
    scale = scale.astype(np.float64)[:, None]
    gx = scale * (g - gbeta[:, None] / m - xhat * ggamma[:, None] / m) if batch_stats else scale * g
    return gx, ggamma, gbeta


def _sources(x, gamma, beta, mask, mu, inv_sigma):
    """(BNSource, the mask it stands for) for the three mask modes."""
    relu = ((x - mu[:, None]) * (gamma * inv_sigma)[:, None] + beta[:, None]) > 0
    xhat = ((x - mu[:, None]) * inv_sigma[:, None]).astype(x.dtype)
    return [(B.BNSource(x, mu, inv_sigma), np.ones(x.shape, bool)),
            (B.BNSource(x, mu, inv_sigma, relu_beta=beta), relu),
            (B.BNSource(xhat, mask=mask), mask)]


@SETTINGS
@given(p=problems(), batch_stats=st.booleans())
def test_backward_against_float64_oracle_and_reference(p, batch_stats):
    x, gy, gamma, beta, mask = p
    mu, var = B.bn_stats(x)
    inv_sigma = (1 / np.sqrt(var + 1e-5)).astype(x.dtype)
    eps = np.finfo(x.dtype).eps
    for source, m in _sources(x, gamma, beta, mask, mu, inv_sigma):
        gx, ggamma, gbeta = B.bn_backward(gy, source, gamma, inv_sigma, batch_stats=batch_stats)
        src = source.src.astype(np.float64)
        xhat = src if source.mu is None else (src - mu[:, None]) * inv_sigma.astype(np.float64)[:, None]
        ogx, oggamma, ogbeta = _backward_oracle64(gy, xhat, gamma * inv_sigma, m, batch_stats)
        # tolerances from the magnitudes summed (a sum of n terms is good to ~n eps of sum |terms|)
        n = gy.shape[0] * gy.shape[2]
        gsum = np.abs(gy.astype(np.float64)).sum(axis=(0, 2)).max() + 1e-30
        xmax = np.abs(xhat).max() + 1
        np.testing.assert_allclose(gbeta, ogbeta, rtol=0, atol=8 * eps * gsum)
        np.testing.assert_allclose(ggamma, oggamma, rtol=0, atol=16 * eps * gsum * xmax)
        gmax = np.abs(gamma * inv_sigma).max() * (np.abs(gy).max() + 2 * gsum / n * xmax ** 2) + 1e-30
        np.testing.assert_allclose(gx, ogx, rtol=0, atol=64 * eps * gmax)
        with reference():
            rgx, _, _ = B.bn_backward(gy, source, gamma, inv_sigma, batch_stats=batch_stats)
        np.testing.assert_allclose(rgx, gx, rtol=0, atol=256 * eps * gmax)
        none, _, _ = B.bn_backward(gy, source, gamma, inv_sigma, batch_stats=batch_stats, need_gx=False)
        assert none is None


@SETTINGS
@given(p=problems(), batch_stats=st.booleans())
def test_backward_elementwise_bits_given_the_kernels_sums(p, batch_stats):
    """gx is the reference's formula, bit for bit, at the kernel's own per-channel constants."""
    x, gy, gamma, beta, mask = p
    mu, var = B.bn_stats(x)
    inv_sigma = (1 / np.sqrt(var + 1e-5)).astype(x.dtype)
    scale = gamma * inv_sigma
    for source, m in _sources(x, gamma, beta, mask, mu, inv_sigma):
        src, smu, sinv = source.src, source.mu, source.inv_sigma
        if smu is None:
            smu, sinv = np.zeros_like(mu), np.ones_like(inv_sigma)
        mode = 2 if source.mask is not None else 1 if source.relu_beta is not None else 0
        m8 = np.ascontiguousarray(source.mask).view(np.uint8) if mode == 2 else None
        gx = np.full(gy.shape, np.nan, x.dtype)
        ggamma, gbeta = np.empty(x.shape[1]), np.empty(x.shape[1])
        _bn.bn_backward(gy, src, smu, sinv, scale, beta, m8, mode, batch_stats, gx, ggamma, gbeta)
        g = gy * m
        xhat = (src - smu[:, None]) * sinv[:, None]
        cnt = gy.shape[0] * gy.shape[2]
        if batch_stats:
            a = np.asarray(gbeta / cnt).astype(x.dtype)
            k = np.asarray(ggamma / cnt).astype(x.dtype)
            want = scale[:, None] * (g - a[:, None] - xhat * k[:, None])
        else:
            want = scale[:, None] * g
        assert want.dtype == x.dtype
        assert np.array_equal(_bits(gx), _bits(want))


def _tree(acc):
    """Lane j += lane j+16, j+8, j+4, j+2, j+1 (32 float64 lanes) -> lane 0."""
    acc = np.array(acc, dtype=np.float64)
    w = 16
    while w:
        acc[:w] += acc[w:2 * w]
        w //= 2
    return acc[0]


def _lanes64(t):
    """The kernels' float64 sum of the terms ``t`` (1-D float64), as src/_lanes.h defines it:
    lane j adds t[i] for i = j (mod 32) in order of i, then the tree; the result is lane 0."""
    acc = np.zeros(32)
    for i0 in range(0, len(t), 32):
        piece = t[i0:i0 + 32]
        acc[:len(piece)] += piece
    return _tree(acc)


def _fma(a, b, c):
    """a * b + c rounded once: exact in fractions, then float(), which rounds correctly."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _moments_row64(x64):
    """A row's (S, Q) as src/_bn.pyx's ``_moments_row`` defines them: around c = the lanes sum
    of the first min(m, 32) values over their count, d = x - c; Sd = the lanes sum of d,
    Qd = the lanes of fma(d, d, lane), then the tree; S = c*m + Sd, Q = Qd - Sd*Sd/m."""
    m = len(x64)
    c = _lanes64(x64[:32]) / min(m, 32)
    d = x64 - c
    sd = _lanes64(d)
    q = [0.0] * 32
    for i, v in enumerate(d):
        q[i % 32] = _fma(v, v, q[i % 32])
    return c * m + sd, _tree(q) - sd * sd / m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 31, 32, 33, 257, 1000, 1025, 2100])
def test_row_sums_are_the_documented_lanes_bit_for_bit(dtype, m):
    """The per-row float64 sums of the statistics and of the backward (exact and codes sources)
    are exactly the 32-lane sums of src/_lanes.h (so the same on every build and vector path),
    on values spread over 40 binades, where the order of the additions shows in the bits."""
    rng = np.random.default_rng(m)
    n, c = 2, 3
    x = (rng.standard_normal((n, c, m)) * 2.0 ** rng.integers(-20, 20, (n, c, m)) + 3).astype(dtype)
    gy = (rng.standard_normal((n, c, m)) * 2.0 ** rng.integers(-20, 20, (n, c, m))).astype(dtype)
    part = np.empty((2, n, c))
    _bn.row_moments(x, part)
    for i in np.ndindex(n, c):
        assert (part[0][i], part[1][i]) == _moments_row64(x[i].astype(np.float64))
    mu, var = B.bn_stats(x)
    inv = (1 / np.sqrt(var + 1e-5)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    scale = gamma * inv
    mask = rng.random(x.shape) < 0.5
    xhat = (x - mu[:, None]) * inv[:, None]
    cases = [((x, mu, inv, scale, beta, None, 0), gy, xhat),
             ((x, mu, inv, scale, beta, None, 1), gy * ((x - mu[:, None]) * scale[:, None] + beta[:, None] > 0), xhat),
             ((x, mu, inv, scale, beta, mask.view(np.uint8), 2), gy * mask, xhat)]
    for args, g, xh in cases:
        _bn.bn_backward(gy, *args, True, None, np.empty(c), np.empty(c), part, 1)
        for i in np.ndindex(n, c):
            assert part[0][i] == _lanes64(g[i].astype(np.float64))
            assert part[1][i] == _lanes64((g[i] * xh[i]).astype(np.float64))   # products in dtype
    if dtype == np.float32 and m % 2 == 0:
        p = quant.paper_params(gamma, beta, 4)
        packed, _ = R.paper_pack(x * scale[:, None], p["k"], p["s"], 4)
        s32 = p["s"].astype(np.int32)
        _bn.bn_backward_codes(gy, packed, s32, p["x_step"], p["x_off"], 4, scale, True, None,
                              np.empty(c), np.empty(c), part, 1)
        xh = R.paper_decode(packed, x.shape, p["s"], p["x_step"], p["x_off"], 4)
        g = gy * R.paper_mask(packed, x.shape, p["s"], 4)
        for i in np.ndindex(n, c):
            assert part[0][i] == _lanes64(g[i].astype(np.float64))
            assert part[1][i] == _lanes64((g[i] * xh[i]).astype(np.float64))


def test_reference_switch_and_other_dtypes_use_the_reference():
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float16)
    assert not B._use_compiled(x)
    use_reference(True)
    assert not B._use_compiled(x.astype(np.float32))
    use_reference(False)
    assert B._use_compiled(x.astype(np.float32))
    mu, var = B.bn_stats(x)               # float16 goes to the reference
    assert mu.dtype == np.float16


def test_results_do_not_depend_on_the_thread_count():
    """Every compiled pass, split over 1, 2 and 3 workers (``npapprox.parallel``: the BLAS
    thread count), gives the same bytes."""
    code = ("import numpy as np; from npapprox.kernels import bn as B; from npapprox import quant; "
            "r = np.random.default_rng(3); x = r.standard_normal((13, 6, 1111)).astype(np.float32); "
            "gy = r.standard_normal(x.shape).astype(np.float32); mu, var = B.bn_stats(x); "
            "inv = (1 / np.sqrt(var + 1e-5)).astype(np.float32); g = np.linspace(-1, 1, 6).astype(np.float32); "
            "gx, gg, gb = B.bn_backward(gy, B.BNSource(x, mu, inv, relu_beta=g), g, inv); "
            "p = quant.paper_params(g, g, 4); h, pk, nf = B.bn_apply_pack(x, mu, g * inv, g, p['k'], p['s'], 4); "
            "src = B.BNSource(None, codes=(pk, x.shape, p['s'], p['x_step'], p['x_off'], 4)); "
            "cx = B.bn_backward(gy, src, g, inv); "
            "print(b''.join(a.tobytes() for a in (mu, var, gx, gg, gb, h, pk) + cx).hex())")
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 100


@pytest.fixture
def split_everything(monkeypatch):
    """Every compiled pass split over 3 workers, however small (``npapprox.parallel``), and
    a check that none of them hands work to the pool from inside a worker (not reentrant)."""
    inside = threading.local()
    real_run = parallel.run

    def checked_run(fn, n):
        assert n == 1 or not getattr(inside, "busy", False), "parallel.run called from inside a worker"

        def wrapped(k):
            inside.busy = True
            try:
                return fn(k)
            finally:
                inside.busy = False
        return real_run(wrapped, n)

    monkeypatch.setattr(parallel, "workers", lambda xp=np: 3)
    monkeypatch.setattr(parallel, "run", checked_run)            # what parallel.run_ranges calls
    monkeypatch.setattr(B, "PARALLEL_MIN", 0)
    monkeypatch.setattr(conv, "run", checked_run)


def _all_passes(x, gy, gamma, beta, mask, bits=4):
    """Every dispatching pass on one problem -> their outputs (arrays), in a fixed order."""
    mu, var, inv = B.bn_batch_stats(x, 1e-5)
    scale = gamma * inv
    y, h = B.bn_apply(x, mu, scale, beta, want_h=True)
    out = [mu, var, inv, y, h]
    for src in (B.BNSource(x, mu, inv, relu_beta=beta), B.BNSource(x, mu, inv, mask=mask), B.BNSource(x, mu, inv)):
        out += B.bn_backward(gy, src, gamma, inv)
    if x.dtype == np.float32:
        p = quant.paper_params(gamma, beta, bits)
        h2, packed, nf = B.bn_apply_pack(x, mu, scale, beta, p["k"], p["s"], bits)
        codes = B.BNSource(None, codes=(packed, x.shape, p["s"], p["x_step"], p["x_off"], bits))
        out += [h2, packed, np.int64(nf)] + list(B.bn_backward(gy, codes, gamma, inv))
    return out


@given(problems())
@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_split_over_workers_gives_the_serial_bytes(split_everything, p):
    x, gy, gamma, beta, mask = p
    split = _all_passes(x, gy, gamma, beta, mask)
    B.PARALLEL_MIN = 1 << 62                      # the same calls on the calling thread
    try:
        serial = _all_passes(x, gy, gamma, beta, mask)
    finally:
        B.PARALLEL_MIN = 0
    for a, b in zip(split, serial, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_conv_over_an_exact_unit_rebuilds_h_without_nesting_the_pool(split_everything):
    """The conv weight gradient rebuilds an exact unit's h per chunk inside a worker: that
    bn_apply runs on the worker's thread (split_everything fails a nested parallel.run)."""
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((6, 3, 8, 8)).astype(np.float32), requires_grad=True)
    gamma = Tensor(np.ones(3, np.float32), requires_grad=True)
    beta = Tensor(np.zeros(3, np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    h = ops.batch_norm2d(x, gamma, beta, relu=True)
    ops.conv2d(h, w, padding=1).sum().backward()
    want = ops.conv2d(Tensor(np.maximum(h.data, 0)), w, padding=1)
    assert want.shape == (6, 4, 8, 8) and w.grad is not None and np.isfinite(w.grad).all()


def test_shape_errors():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError):
        _bn.bn_stats(x, np.empty(2), np.empty(3))
    with pytest.raises(ValueError):
        _bn.bn_apply(x, np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                     np.empty((2, 3, 5), np.float32), None)
    with pytest.raises(ValueError):
        _bn.bn_backward(x, x, *(np.zeros(3, np.float32),) * 4, None, 2, True, None, np.empty(3), np.empty(3))


# --------------------------------------------------------------------------- #
# Scale invariance up to float32's range (the variance of values around 1e30 is 1e60)
# --------------------------------------------------------------------------- #
def _bn_oracle64(x, gamma, beta, r, eps=1e-5):
    """Training-mode BN in float64 from the formulas, y and the gradients of sum(y * r)."""
    x64, r64 = x.astype(np.float64), r.astype(np.float64)
    mu = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    xhat = (x64 - mu) / np.sqrt(var + eps)
    g4 = gamma.astype(np.float64)[None, :, None, None]
    y = g4 * xhat + beta.astype(np.float64)[None, :, None, None]
    m = x.shape[0] * x.shape[2] * x.shape[3]
    gbeta, ggamma = r64.sum(axis=(0, 2, 3)), (r64 * xhat).sum(axis=(0, 2, 3))
    gx = g4 / np.sqrt(var + eps) * (r64 - gbeta[None, :, None, None] / m - xhat * ggamma[None, :, None, None] / m)
    return y, gx, ggamma, gbeta


def _bn_op(x, gamma, beta, r, relu, rm=None, rv=None):
    xt, gt, bt = (Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    y = ops.batch_norm2d(xt, gt, bt, rm, rv, relu=relu)
    ops.sum_all(ops.mul(y, Tensor(r))).backward()
    return y.data, xt.grad, gt.grad, bt.grad


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("magnitude", [1e6, 1e30, 1e36])
def test_training_bn_is_scale_invariant_up_to_the_float32_range(impl, magnitude):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 3, 5, 5)) + rng.standard_normal((1, 3, 1, 1))).astype(np.float32)
    big = (x * np.float32(magnitude)).astype(np.float32)
    gamma, beta = np.float32([1.5, -0.7, 0.3]), np.float32([0.2, 0.0, -1.0])
    r = rng.standard_normal(x.shape).astype(np.float32)
    use_reference(impl == "reference")
    for relu in (False, True):
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        y, gx, gg, gb = _bn_op(big, gamma, beta, r, relu, rm, rv)
        y1, gx1, gg1, gb1 = _bn_op(x, gamma, beta, r, relu)
        oy, ogx, ogg, ogb = _bn_oracle64(big, gamma, beta, r * (1 if not relu else (y1 > 0)))
        if relu:
            oy = np.maximum(oy, 0)
        # the float64 oracle of the very input, and BN(x): same up to float32 rounding and eps
        np.testing.assert_allclose(y, oy, rtol=1e-5, atol=1e-5 * np.abs(oy).max())
        np.testing.assert_allclose(y, y1, rtol=1e-4, atol=1e-4 * np.abs(y1).max())
        for got, want, one in ((gg, ogg, gg1), (gb, ogb, gb1)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())
        assert gx.dtype == np.float32 and np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
        gscale = np.abs(gamma).max() / np.sqrt(((big.astype(np.float64) - big.mean(axis=(0, 2, 3), keepdims=True,
                                                dtype=np.float64)) ** 2).mean(axis=(0, 2, 3))).min()
        np.testing.assert_allclose(gx, ogx, rtol=1e-3, atol=1e-4 * gscale * np.abs(r).max())
        if magnitude > 1e19:   # var(x * 1e30) = 1e60 does not fit float32: inf, as in PyTorch
            assert np.all(np.isinf(rv)) and np.all(np.isfinite(rm))
        else:
            assert np.all(np.isfinite(rv))


def test_bn_of_huge_values_against_torch_float64(torch):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3, 2, 4, 4)) * 1e30).astype(np.float32)
    gamma, beta, r = np.float32([0.5, 2.0]), np.float32([1.0, -1.0]), rng.standard_normal(x.shape).astype(np.float32)
    y, gx, gg, gb = _bn_op(x, gamma, beta, r, relu=False)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    gt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (gamma, beta))
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    (yt * torch.tensor(r, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-3, atol=1e-4 * np.abs(xt.grad.numpy()).max())


@pytest.mark.parametrize("magnitude", [1.0, 1e6, 1e12, 1e20, 1e37])
def test_reference_stats_keep_their_bytes_and_finish_like_the_kernels(magnitude):
    """Below 2^32 the reference's statistics are today's NumPy expressions bit for bit; the
    power-of-two scaling above it is exact, so it too reproduces them wherever they do not
    overflow. Compiled and reference agree with a float64 oracle at every magnitude."""
    rng = np.random.default_rng(9)
    x = ((rng.standard_normal((6, 4, 33)) + 2) * magnitude).astype(np.float32)
    with reference():
        mu, var, inv = B.bn_batch_stats(x, 1e-5)
    with np.errstate(over="ignore"):
        d = x - x.mean(axis=(0, 2))[:, None]
        plain_var = (d * d).mean(axis=(0, 2))
    if np.all(np.isfinite(plain_var)):
        assert np.array_equal(_bits(mu), _bits(x.mean(axis=(0, 2)))) and np.array_equal(_bits(var), _bits(plain_var))
        assert np.array_equal(_bits(inv), _bits((1 / np.sqrt(plain_var + 1e-5)).astype(np.float32)))
    mu64, var64 = _stats64(x)
    cmu, cvar, cinv = B.bn_batch_stats(x, 1e-5)
    for m, v, i in ((mu, var, inv), (cmu, cvar, cinv)):
        np.testing.assert_allclose(m, mu64, rtol=1e-5)
        np.testing.assert_allclose(i, 1 / np.sqrt(var64 + 1e-5), rtol=1e-5)
        with np.errstate(over="ignore"):
            np.testing.assert_allclose(v, var64.astype(np.float32), rtol=1e-5)   # inf where it overflows


def test_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    for impl in ("compiled", "reference"):
        use_reference(impl == "reference")
        with pytest.raises(ValueError, match="at least one value"):
            B.bn_stats(x)
        gx, gg, gb = B.bn_backward(x, B.BNSource(x, np.zeros(3, np.float32), np.ones(3, np.float32)),
                                   np.ones(3, np.float32), np.ones(3, np.float32))
        assert gx.shape == x.shape and np.array_equal(gg, np.zeros(3)) and np.array_equal(gb, np.zeros(3))
        assert gg.dtype == gb.dtype == np.float32
        y, h = B.bn_apply(x, *(np.ones(3, np.float32),) * 3, want_h=True)
        assert y.shape == h.shape == x.shape
    assert B.as_ncm(np.zeros((0, 3, 2, 2))).shape == (0, 3, 4)


# --------------------------------------------------------------------------- #
# The fused forward of a unit under the paper's window: h and the codes in one pass
# --------------------------------------------------------------------------- #
def _unit_case(case, c, rng):
    """gamma, beta (float32, (C,)) of one edge case of the paper's window."""
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta = rng.uniform(-1, 1, c).astype(np.float32)
    if case == "negative gamma":
        gamma = -gamma
    elif case == "zero gamma":
        gamma[::2] = 0
    elif case == "beta far outside":                      # |beta / gamma| > 3: all codes clipped one way
        beta = np.where(np.arange(c) % 2, 5, -5).astype(np.float32) * np.abs(gamma)
    elif case == "denormal":
        gamma[::2] = np.float32(1e-42)
        beta[1::2] = np.float32(-3e-41)
    return gamma, beta


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("case", ["plain", "negative gamma", "zero gamma", "beta far outside", "denormal"])
@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (2, 4, 16, 17), (3, 2, 1, 3)])
def test_apply_pack_is_the_composition_bytes(bits, case, shape):
    """bn_apply_pack (compiled and reference dispatch) gives the bytes of bn_apply's h and of
    paper_pack(bn_apply's y) made by the reference, and the same non-finite count. (3, 2, 1, 3):
    rows that do not start on a byte boundary take the composition itself."""
    rng = np.random.default_rng(bits)
    n, c = shape[:2]
    x = B.as_ncm((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    x.flat[::7] = -0.0
    gamma, beta = _unit_case(case, c, rng)
    mu, _, inv = B.bn_batch_stats(x, 1e-5)
    if case == "denormal":
        x[:, 1::2] = (x[:, 1::2] * np.float32(1e-40)).astype(np.float32)   # subnormal inputs too
    p = quant.paper_params(gamma, beta, bits)
    with reference():
        y, h = B.bn_apply(x, mu, gamma * inv, beta, want_h=True)
        want_packed, want_nf = R.paper_pack(y, p["k"], p["s"], bits)
    for forced in (False, True):
        use_reference(forced)
        got_h, got_packed, got_nf = B.bn_apply_pack(x, mu, gamma * inv, beta, p["k"], p["s"], bits)
        use_reference(False)
        assert np.array_equal(_bits(got_h), _bits(h)), forced
        assert got_packed.tobytes() == want_packed.tobytes(), forced
        assert int(got_nf) == int(want_nf) == 0


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_apply_pack_counts_non_finite_values_like_paper_pack(bits):
    rng = np.random.default_rng(5)
    x = B.as_ncm(rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    x[1, 0, 5], x[2, 2, 9], x[3, 1, 0] = np.nan, np.inf, -np.inf
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    mu, inv = np.zeros(3, np.float32), np.ones(3, np.float32)
    p = quant.paper_params(gamma, beta, bits)
    want_packed, want_nf = R.paper_pack(x * np.float32(1), p["k"], p["s"], bits)
    h, packed, nf = B.bn_apply_pack(x, mu, gamma * inv, beta, p["k"], p["s"], bits)
    assert int(nf) == int(want_nf) == 3 and packed.tobytes() == want_packed.tobytes()


def test_paper_unit_with_nan_refuses_and_fused_forward_matches_two_passes():
    """Under Paper the unit's forward is the fused pass: its output h and stored codes are the
    bytes of the two passes it replaces (bn_apply, then paper_pack of y) on the same backend,
    and a NaN in the input is refused with FloatingPointError as before."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    gamma, beta = rng.uniform(-2, 2, 3).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32)
    p = quant.paper_params(gamma, beta, 4)
    for forced in (False, True):
        use_reference(forced)
        try:
            with npapprox.storage_policy(Paper(bits=4)):
                h = ops.batch_norm2d(Tensor(x, requires_grad=True), Tensor(gamma), Tensor(beta), relu=True)
            mu, _, inv = B.bn_batch_stats(B.as_ncm(x), 1e-5)
            y, want_h = B.bn_apply(B.as_ncm(x), mu, gamma * inv, beta, want_h=True)
            want_packed, _ = npapprox.kernels.paper_pack(y, p["k"], p["s"], 4)
        finally:
            use_reference(False)
        assert h.data.tobytes() == want_h.tobytes(), forced
        assert h._ctx.saved["unit"].packed.tobytes() == want_packed.tobytes(), forced
    bad = x.copy()
    bad[0, 1, 2, 3] = np.nan
    with npapprox.storage_policy(Paper(bits=4)), pytest.raises(FloatingPointError, match="non-finite"):
        ops.batch_norm2d(Tensor(bad, requires_grad=True), Tensor(gamma), Tensor(beta), relu=True)


def test_outputs_into_given_buffers():
    """out= buffers (also gx written over gy itself) give the bytes of fresh outputs."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 50)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = rng.uniform(-2, 2, 4).astype(np.float32), rng.uniform(-1, 1, 4).astype(np.float32)
    mu, _, inv = B.bn_batch_stats(x, 1e-5)
    for forced in (False, True):
        use_reference(forced)
        y, h = B.bn_apply(x, mu, gamma * inv, beta, want_h=True)
        buf_y, buf_h = np.empty_like(x), np.empty_like(x)
        y2, h2 = B.bn_apply(x, mu, gamma * inv, beta, want_h=True, out_y=buf_y, out_h=buf_h)
        assert y2 is buf_y and h2 is buf_h and y2.tobytes() == y.tobytes() and h2.tobytes() == h.tobytes()
        src = B.BNSource(x, mu, inv, relu_beta=beta)
        want = B.bn_backward(gy, src, gamma, inv)
        g = gy.copy()
        got = B.bn_backward(g, src, gamma, inv, out=g)
        assert got[0] is g and all(a.tobytes() == b.tobytes() for a, b in zip(got, want, strict=True))
        use_reference(False)
    with pytest.raises(ValueError, match="out must be"):
        B.bn_apply(x, mu, gamma * inv, beta, out_y=np.empty((3, 4, 51), np.float32))
