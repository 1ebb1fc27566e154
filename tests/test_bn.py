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

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npapprox.kernels import bn as B
from npapprox.kernels import use_reference

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
    """(x, gy, gamma, beta, mask) with M around the kernels' 8-lane and 256-value block edges."""
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 5))
    m = draw(st.sampled_from([1, 7, 8, 9, 64, 255, 256, 257, 600]))
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
    code = ("import numpy as np; from npapprox.kernels import bn as B; "
            "r = np.random.default_rng(3); x = r.standard_normal((8, 6, 333)).astype(np.float32); "
            "gy = r.standard_normal(x.shape).astype(np.float32); mu, var = B.bn_stats(x); "
            "inv = (1 / np.sqrt(var + 1e-5)).astype(np.float32); g = np.linspace(-1, 1, 6).astype(np.float32); "
            "gx, gg, gb = B.bn_backward(gy, B.BNSource(x, mu, inv, relu_beta=g), g, inv); "
            "print(b''.join(a.tobytes() for a in (mu, var, gx, gg, gb)).hex())")
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 100


def test_shape_errors():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError):
        _bn.bn_stats(x, np.empty(2), np.empty(3))
    with pytest.raises(ValueError):
        _bn.bn_apply(x, np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                     np.empty((2, 3, 5), np.float32), None)
    with pytest.raises(ValueError):
        _bn.bn_backward(x, x, *(np.zeros(3, np.float32),) * 4, None, 2, True, None, np.empty(3), np.empty(3))
