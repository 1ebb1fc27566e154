"""Storage kernels: the byte contract, the dispatch, properties, statistics.

(a) reference == naive per-element loops written here straight from the contract
    (docs/kernels.md), independent of the vectorised reference;
(b) the compiled Cython kernels are built and the dispatch picks them; their bytes
    (and the CUDA kernels') against the reference: tests/test_parity.py;
(c) properties: code range and padding bits, exact ReLU mask, error <= half a bin,
    saturation, exact round trips, nbytes, non-finite counting;
(d) stochastic rounding is unbiased with the right variance, and the counter-based
    noise is uniform -- asserted with fixed seeds and a stated false-alarm rate.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2

import npapprox.kernels as K
from npapprox import _quant
from npapprox.kernels import im2col as im2col_module
from npapprox.kernels import reference as R
from npapprox.kernels import switch
from npapprox.kernels.im2col import im2row

from support import (
    BITS,
    F32,
    SETTINGS,
    bn_output,
    channel_params,
    generic_input,
    paper_cases,
    paper_params,
    paper_step,
    same,
)


def _cpu():
    """The compiled kernels. An ImportError here fails the test: the package is always built."""
    importlib.import_module("npapprox._quant")
    return importlib.import_module("npapprox.kernels.cpu")


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    K.use_reference(False)


# --------------------------------------------------------------------------- #
# Naive oracles, per element, straight from the contract
# --------------------------------------------------------------------------- #
def naive_pack(codes, bits):
    V = 8 // bits
    out = [0] * ((len(codes) + V - 1) // V)
    for i, c in enumerate(codes):
        out[i // V] |= int(c) << ((i % V) * bits)
    return np.array(out, np.uint8)


def naive_unpack(packed, n, bits):
    V = 8 // bits
    return np.array([(int(packed[i // V]) >> ((i % V) * bits)) & ((1 << bits) - 1)
                     for i in range(n)], np.uint8)


def naive_paper_codes(y, k, s, bits):
    nb = 2 ** bits
    lim = F32(nb + 1)
    C = y.shape[1]
    hw = int(np.prod(y.shape[2:], dtype=np.int64))
    codes = []
    with np.errstate(all="ignore"):
        for i, v in enumerate(y.reshape(-1)):
            c = (i // hw) % C
            u = F32(v * k[c])
            u = -lim if np.isnan(u) else min(max(u, -lim), lim)
            code = int(s[c]) - 1 + math.ceil(u)
            code = min(max(code, 0), nb - 1)
            code = max(code, int(s[c])) if v > 0 else min(code, int(s[c]) - 1)
            codes.append(code)
    return codes


def naive_paper_decode(codes, shape, s, step, off, relu):
    C = shape[1]
    hw = int(np.prod(shape[2:], dtype=np.int64))
    out = np.empty(len(codes), np.float32)
    with np.errstate(all="ignore"):
        for i, code in enumerate(codes):
            c = (i // hw) % C
            t = F32(int(code) - int(s[c])) + F32(0.5)
            val = F32(t * step[c]) + off[c]
            val = F32(0.0) if relu and code < s[c] else val
            out[i] = val if val == val else F32(np.nan)   # every NaN is 0x7fc00000
    return out.reshape(shape)


def naive_uniform(i, seed):
    m = 0xFFFFFFFF
    h = ((i & m) * 0x9E3779B9 + seed) & m
    h ^= h >> 16
    h = (h * 0x7FEB352D) & m
    h ^= h >> 15
    h = (h * 0x846CA68B) & m
    h ^= h >> 16
    return F32(h >> 8) * F32(2.0 ** -24)


def naive_generic(x, bits, G, stochastic, seed):
    L = 2 ** bits - 1
    flat = x.reshape(-1)
    n = flat.size
    ng = (n + G - 1) // G
    lo = np.empty(ng, np.float32)
    scale = np.empty(ng, np.float32)
    codes = []
    nonfinite = 0
    with np.errstate(all="ignore"):
        for g in range(ng):
            xs = flat[g * G:(g + 1) * G]
            bad = int(np.sum(~np.isfinite(xs)))
            nonfinite += bad
            if bad == 0:
                glo = F32(min(xs)) + F32(0.0)
                ghi = F32(max(xs)) + F32(0.0)
                d = F32(ghi - glo)
                lo[g], scale[g] = glo, F32(d / F32(L))
                inv = F32(F32(L) / d) if ghi != glo else F32(0.0)
            else:
                lo[g], scale[g], inv = F32(np.nan), F32(np.nan), F32(0.0)
            for j, xv in enumerate(xs):
                v = F32(F32(xv - lo[g]) * inv)
                r = naive_uniform(g * G + j, seed) if stochastic else F32(0.5)
                fl = np.floor(F32(v + r))
                codes.append(0 if np.isnan(fl) else int(min(max(fl, 0.0), L)))
    return codes, lo, scale, nonfinite


def naive_generic_decode(codes, lo, scale, G, shape):
    out = np.empty(len(codes), np.float32)
    with np.errstate(all="ignore"):
        for i, code in enumerate(codes):
            v = lo[i // G] + F32(F32(int(code)) * scale[i // G])
            out[i] = v if v == v else F32(np.nan)      # every NaN is 0x7fc00000
    return out.reshape(shape)


# --------------------------------------------------------------------------- #
# (a) reference == naive loops
# --------------------------------------------------------------------------- #
@SETTINGS(150)
@given(case=paper_cases())
def test_reference_paper_matches_naive_loops(case):
    bits, y, gamma, beta, k, s = case
    packed, nf = R.paper_pack(y, k, s, bits)
    codes = naive_paper_codes(y, k, s, bits)
    assert same(packed, naive_pack(codes, bits))
    assert nf == int(np.sum(~np.isfinite(y)))
    assert same(R.unpack_bits(packed, y.size, bits), np.array(codes, np.uint8))
    step = paper_step(gamma, bits)
    for relu in (False, True):
        got = R.paper_decode(packed, y.shape, s, step, beta, bits, relu)
        assert same(got, naive_paper_decode(codes, y.shape, s, step, beta, relu))
    mask = R.paper_mask(packed, y.shape, s, bits)
    want = np.array([c >= s[(i // int(np.prod(y.shape[2:]))) % y.shape[1]] for i, c in enumerate(codes)],
                    bool).reshape(y.shape)
    assert same(mask, want)


@SETTINGS(150)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 150), group=st.sampled_from([1, 2, 3, 7, 8, 64]),
       kind=st.sampled_from(["normal", "wide", "constant", "zeros", "specials", "nonfinite"]),
       stochastic=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_reference_generic_matches_naive_loops(bits, n, group, kind, stochastic, seed):
    x = generic_input(np.random.default_rng(seed), n, kind)
    packed, lo, scale, nf = R.generic_pack(x, bits, group, stochastic, seed)
    codes, nlo, nscale, nnf = naive_generic(x, bits, group, stochastic, seed)
    assert same(packed, naive_pack(codes, bits))
    assert same(lo, nlo) and same(scale, nscale) and nf == nnf
    assert same(R.generic_decode(packed, lo, scale, bits, group, x.shape),
                 naive_generic_decode(codes, lo, scale, group, x.shape))


@SETTINGS(100)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 70), seed=st.integers(0, 2 ** 32 - 1))
def test_reference_bit_packing_matches_naive_loops(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, n).astype(np.uint8)
    packed = R.pack_bits(codes, bits)
    assert same(packed, naive_pack(codes, bits))
    assert same(R.unpack_bits(packed, n, bits), naive_unpack(packed, n, bits))
    assert same(R.unpack_bits(packed, n, bits), codes)


@pytest.mark.parametrize("seed", [0, 1, 0x9E3779B9, 2 ** 32 - 1])
def test_reference_counter_uniform_matches_naive_hash(seed):
    n = 300
    want = np.array([naive_uniform(i, seed) for i in range(n)], np.float32)
    assert same(R.counter_uniform(n, seed), want)


def test_counter_uniform_pinned_values():
    """A few values computed by hand from the hash: any backend must reproduce them."""
    r = R.counter_uniform(3, 0)
    assert [int(v * 2 ** 24) for v in r] == [naive_uniform(i, 0) * 2 ** 24 for i in range(3)]
    # the flat index is taken modulo 2**32: element 2**32 + 5 draws like element 5
    assert naive_uniform(2 ** 32 + 5, 7) == naive_uniform(5, 7)
    assert R.counter_uniform(6, 7)[5] == naive_uniform(5, 7)


# --------------------------------------------------------------------------- #
# (b) the compiled kernels and the dispatch
# --------------------------------------------------------------------------- #
def test_compiled_module_is_built():
    """The package is always built by pip install: a missing extension is a failure, not a skip."""
    _cpu()
    assert K.compiled_available()
    assert K.implementation(np.zeros(1, np.float32)) == "cpu"


def test_dispatch_switch():
    """NumPy arrays go to the compiled kernels; the switch sends them to the reference (same bytes)."""
    rng = np.random.default_rng(3)
    gamma, beta = channel_params(rng, 6)
    y = bn_output(rng, (3, 6, 9, 10), gamma, beta)
    k, s = paper_params(gamma, beta, 4)
    ref = R.paper_pack(y, k, s, 4)
    assert K.implementation(y) == "cpu" and same(K.paper_pack(y, k, s, 4)[0], ref[0])
    K.use_reference(True)
    assert K.implementation(y) == "reference" and same(K.paper_pack(y, k, s, 4)[0], ref[0])
    K.use_reference(False)
    assert K.implementation(y) == "cpu"


def test_one_switch_for_all_kernels_and_im2row_still_a_module():
    assert K.im2col is im2col_module and im2row is im2col_module.im2row
    assert K.use_reference is switch.use_reference and im2col_module.use_reference is switch.use_reference
    assert not switch.reference_forced()
    K.use_reference(True)
    assert switch.reference_forced()
    assert not im2col_module._use_compiled(np.zeros((1, 1, 1, 1), np.float32))
    assert K.implementation(np.zeros(1, np.float32)) == "reference"


def test_environment_variable_forces_reference():
    code = ("import numpy as np, npapprox.kernels as K; "
            "print(K.implementation(np.zeros(1, np.float32)), K.compiled_available())")
    env = dict(os.environ, NPAPPROX_REFERENCE_KERNELS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["reference", "True"]


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_bad_arguments_raise_clear_errors(impl):
    mod = R if impl == "reference" else _cpu()
    y = np.zeros((2, 3, 4, 4), np.float32)
    k, s = np.ones(3, np.float32), np.full(3, 8, np.int32)
    with pytest.raises(ValueError, match="bits"):
        mod.paper_pack(y, k, s, 3)
    with pytest.raises(ValueError, match="float32"):
        mod.paper_pack(y.astype(np.float64), k, s, 4)
    with pytest.raises(ValueError, match="s must lie"):
        mod.paper_pack(y, k, np.full(3, 16, np.int32), 4)
    with pytest.raises(ValueError, match="s must lie"):
        mod.paper_pack(y, k, np.zeros(3, np.int32), 4)
    with pytest.raises(ValueError, match="k must have shape"):
        mod.paper_pack(y, np.ones(4, np.float32), s, 4)
    with pytest.raises(ValueError, match="shape"):
        mod.paper_pack(np.zeros(5, np.float32), k, s, 4)
    packed, _ = mod.paper_pack(y, k, s, 4)
    with pytest.raises(ValueError, match="packed holds"):
        mod.paper_decode(packed[:-1], y.shape, s, k, k, 4)
    with pytest.raises(ValueError, match="group"):
        mod.generic_pack(y, 4, 0)
    with pytest.raises(ValueError, match="seed"):
        mod.generic_pack(y, 4, 8, True, 2 ** 32)
    p, lo, scale, _ = mod.generic_pack(y, 4, 8)
    with pytest.raises(ValueError, match="lo must have shape"):
        mod.generic_decode(p, lo[:-1], scale, 4, 8, y.shape)


# --------------------------------------------------------------------------- #
# (c) properties (through the dispatch; parity above makes them hold for both)
# --------------------------------------------------------------------------- #
@SETTINGS(200)
@given(case=paper_cases(max_side=8))
def test_paper_properties(case):
    bits, y, gamma, beta, k, s = case
    nb = 2 ** bits
    packed, nf = K.paper_pack(y, k, s, bits)
    n = y.size
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8 == R.packed_nbytes(n, bits)
    assert nf == int(np.sum(~np.isfinite(y)))
    V = 8 // bits
    if n % V:  # unused high bits of the last byte are zero
        assert int(packed[-1]) >> ((n % V) * bits) == 0
    hw = int(np.prod(y.shape[2:]))
    codes = K.unpack_bits(packed, n, bits).astype(np.int64).reshape(y.shape[0], y.shape[1], hw)
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= nb - 1
    # the mask is EXACT for every gamma, beta (incl. gamma <= 0, == 0, tiny, |beta/gamma| >> 3)
    mask = K.paper_mask(packed, y.shape, s, bits)
    assert mask.dtype == bool and mask.shape == y.shape
    assert np.array_equal(mask, y > 0)
    # error <= half a bin inside the window, saturation outside
    step = paper_step(gamma, bits).astype(np.float64)
    yhat = K.paper_decode(packed, y.shape, s, paper_step(gamma, bits), np.zeros_like(gamma), bits)
    y3 = y.astype(np.float64).reshape(codes.shape)
    with np.errstate(all="ignore"):
        u = y3 * k.astype(np.float64)[None, :, None]  # exact y / (D |gamma|) up to k's rounding
    s3 = s[None, :, None].astype(np.float64)
    ok_k = (np.isfinite(k) & (k > 0))[None, :, None] & np.isfinite(y3)
    inside = ok_k & (u > -s3 + 1e-3) & (u <= nb - s3 - 1e-3)
    err = np.abs(yhat.reshape(codes.shape).astype(np.float64) - y3)
    step3 = step[None, :, None]
    bound = 0.5 * step3 + 1e-6 * (np.abs(y3) + nb * step3)
    assert np.all(err[inside] <= np.broadcast_to(bound, err.shape)[inside])
    assert np.all(codes[ok_k & (u > nb - s3 + 1e-3)] == nb - 1)        # saturate at the top
    assert np.all(codes[ok_k & (u <= -s3 - 1e-3)] == 0)                # and at the bottom
    # decode with relu: exactly 0 on the negative side, the plain decode elsewhere
    yr = K.paper_decode(packed, y.shape, s, paper_step(gamma, bits), beta, bits, relu=True)
    yp = K.paper_decode(packed, y.shape, s, paper_step(gamma, bits), beta, bits, relu=False)
    assert same(yr[~mask], np.zeros(int((~mask).sum()), np.float32))
    assert same(yr[mask], yp[mask])


def test_paper_mask_pins_the_released_code_defects():
    """docs/method.md section 4: the mask must not die for beta/gamma < -3, gamma <= 0, gamma ~ 0,
    nor send values in (0, 1e-6] to the negative side."""
    for bits in BITS:
        gamma = np.float32([1.0, 1.0, -1.0, 0.0, 1e-30, -1e-30, 1.0])
        beta = np.float32([-10.0, -1e3, 0.5, 0.7, 1e-31, -1e-29, 0.0])
        k, s = paper_params(gamma, beta, bits)
        y = np.float32([[1e-7, 5e-7, 1e-6, 1e-45, 0.0, -0.0, -1e-45, 2.0, -2.0, 1e30]]).T
        y = np.ascontiguousarray(np.broadcast_to(y, (y.shape[0], 7)))
        packed, _ = K.paper_pack(y, k, s, bits)
        assert np.array_equal(K.paper_mask(packed, y.shape, s, bits), y > 0)
        K.use_reference(True)
        packed_ref, _ = K.paper_pack(y, k, s, bits)
        K.use_reference(False)
        assert same(packed, packed_ref)


@SETTINGS(200)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 2000), group=st.sampled_from([1, 3, 64, 256, 1000]),
       kind=st.sampled_from(["normal", "wide", "constant", "zeros", "specials"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_generic_properties(bits, n, group, kind, seed):
    L = 2 ** bits - 1
    x = generic_input(np.random.default_rng(seed), n, kind)
    packed, lo, scale, nf = K.generic_pack(x, bits, group)
    ng = (n + group - 1) // group
    assert packed.size == (n * bits + 7) // 8 and lo.shape == scale.shape == (ng,) and nf == 0
    V = 8 // bits
    if n % V:
        assert int(packed[-1]) >> ((n % V) * bits) == 0
    codes = K.unpack_bits(packed, n, bits)
    assert codes.max(initial=0) <= L
    xhat = K.generic_decode(packed, lo, scale, bits, group, x.shape)
    gi = np.arange(n) // group
    lo64, sc64 = lo.astype(np.float64)[gi], scale.astype(np.float64)[gi]
    x64 = x.astype(np.float64)
    hi64 = np.zeros(ng)
    if n:
        hi64 = np.maximum.reduceat(x64, np.arange(0, n, group))
    # lo is the group minimum (as +0.0 when it is a zero), scale = (hi - lo) / L
    if n:
        assert np.array_equal(lo.astype(np.float64), np.minimum.reduceat(x64, np.arange(0, n, group)))
        assert not np.any(np.signbit(lo) & (lo == 0))
    # error <= scale / 2 per element (+ float32 rounding slack), wherever the group's range
    # hi - lo fits in float32 (a range over FLT_MAX gives scale = inf: see test below)
    fits = np.isfinite(sc64)
    err = np.abs(xhat.astype(np.float64) - x64)[fits]
    slack = 2.0 ** -20 * (np.abs(lo64) + np.abs(hi64[gi]) + L * sc64)[fits] + 4 * L * 2.0 ** -149
    assert np.all(err <= sc64[fits] / 2 + slack)
    const = (hi64 == lo.astype(np.float64))[gi] if n else np.zeros(0, bool)
    assert np.all(xhat[const] == x[const])  # a constant group decodes exactly


def test_generic_range_overflow_is_visible_in_scale():
    """Contract limit: a group whose range hi - lo overflows float32 (|x| ~ FLT_MAX on both
    sides) gets scale = inf, codes 0 and decodes to NaN; the caller must check
    isfinite(scale). Pinned here so a change of that behaviour is deliberate."""
    x = np.float32([3e38, -3e38, 1.0, 2.0, 5.0, 6.0])
    for reference in (False, True):
        K.use_reference(reference)
        packed, lo, scale, nf = K.generic_pack(x, 4, 4)
        assert nf == 0 and np.isinf(scale[0]) and scale[1] == np.float32(1.0) / np.float32(15)
        assert np.all(K.unpack_bits(packed, 6, 4)[:4] == 0)
        xhat = K.generic_decode(packed, lo, scale, 4, 4, x.shape)
        assert np.all(np.isnan(xhat[:4])) and np.array_equal(xhat[4:], x[4:])


@SETTINGS(150)
@given(bits=st.sampled_from(BITS), ngroups=st.integers(1, 12), group=st.sampled_from([2, 3, 64, 256]),
       exponent=st.integers(-12, 12), seed=st.integers(0, 2 ** 32 - 1), stochastic=st.booleans())
def test_generic_round_trip_exact_on_the_grid(bits, ngroups, group, exponent, seed, stochastic):
    """x = lo + j * 2**e with integer j in [0, L], each group holding 0 and L: decoded exactly
    (deterministic and stochastic: v is an integer, so the noise never crosses a level)."""
    L = 2 ** bits - 1
    rng = np.random.default_rng(seed)
    scale = 2.0 ** exponent
    j = rng.integers(0, L + 1, (ngroups, group))
    j[:, 0], j[:, -1] = 0, L
    lo = rng.integers(-50, 50, ngroups)[:, None] * scale
    x = (lo + j * scale).astype(np.float32).reshape(-1)
    assert np.array_equal(x.astype(np.float64), (lo + j * scale).reshape(-1))  # representable
    packed, glo, gscale, _ = K.generic_pack(x, bits, group, stochastic, seed)
    assert np.all(gscale == np.float32(scale))
    assert same(K.unpack_bits(packed, x.size, bits), j.reshape(-1).astype(np.uint8))
    xhat = K.generic_decode(packed, glo, gscale, bits, group, x.shape)
    assert np.array_equal(xhat, x)


@pytest.mark.parametrize("reference", [False, True])
def test_nonfinite_inputs_are_counted_and_defined(reference):
    K.use_reference(reference)
    rng = np.random.default_rng(11)
    y = bn_output(rng, (2, 3, 5, 5), np.ones(3, np.float32), np.zeros(3, np.float32), nonfinite=0.1)
    nbad = int(np.sum(~np.isfinite(y)))
    assert nbad > 0
    k, s = paper_params(np.ones(3), np.zeros(3), 4)
    packed, nf = K.paper_pack(y, k, s, 4)
    assert nf == nbad
    assert np.array_equal(K.paper_mask(packed, y.shape, s, 4), y > 0)  # NaN -> negative side
    x = y.reshape(-1)
    packed, lo, scale, nf = K.generic_pack(x, 4, 16, True, 3)
    assert nf == nbad
    bad_group = np.add.reduceat(~np.isfinite(x), np.arange(0, x.size, 16)) > 0
    assert np.all(np.isnan(lo[bad_group])) and np.all(np.isnan(scale[bad_group]))
    assert np.all(np.isfinite(lo[~bad_group]))
    codes = K.unpack_bits(packed, x.size, 4).reshape(-1)
    assert np.all(codes[np.repeat(bad_group, 16)[:x.size]] == 0)  # defined: code 0


def test_empty_and_single_element():
    for bits in BITS:
        for impl in (False, True):
            K.use_reference(impl)
            y = np.zeros((0, 3, 2, 2), np.float32)
            k, s = paper_params(np.ones(3), np.zeros(3), bits)
            packed, nf = K.paper_pack(y, k, s, bits)
            assert packed.shape == (0,) and nf == 0
            assert K.paper_decode(packed, y.shape, s, k, k, bits).shape == y.shape
            assert K.paper_mask(packed, y.shape, s, bits).shape == y.shape
            p, lo, scale, nf = K.generic_pack(np.zeros(0, np.float32), bits, 4)
            assert p.shape == lo.shape == scale.shape == (0,) and nf == 0
            assert K.generic_decode(p, lo, scale, bits, 4, (0,)).shape == (0,)
            one = np.float32([-2.5])
            p, lo, scale, nf = K.generic_pack(one, bits, 4, True, 1)
            assert p.size == 1 and lo[0] == one[0] and scale[0] == 0
            assert same(K.generic_decode(p, lo, scale, bits, 4, (1,)), one)


# --------------------------------------------------------------------------- #
# (d) statistics of stochastic rounding and of the noise
# --------------------------------------------------------------------------- #
Z = 5.0  # two-sided normal tail at 5 sigma: false-alarm rate ~5.7e-7 per checked quantity


@pytest.mark.parametrize("reference", [False, True])
def test_stochastic_rounding_is_unbiased_with_the_bernoulli_variance(reference):
    """A group with lo = 0, hi = 15 (K = 4: scale = 1, inv = 1 exactly) holds test values x
    with fractional parts f. Over many seeds and positions, each decoded value is floor(x) or
    floor(x) + 1 (support), its mean is x within Z * sqrt(f(1-f)/M) (Var = scale^2 f(1-f)), and
    its sample variance s^2 matches f(1-f) within Z * sd(s^2), with the exact iid formula
    Var(s^2) = mu4/M - sigma^4 (M-3)/(M(M-1)), mu4 = f(1-f)(1 - 3f(1-f)) for a Bernoulli step.
    (f = 1/2 is excluded from the variance check: s^2 is then nearly constant and its
    deviation is chi-square(1)-shaped, not normal.) Fixed seeds: the test is deterministic;
    with ~20 checked quantities the family-wise false-alarm rate is ~1e-5."""
    K.use_reference(reference)
    bits, group = 4, 64
    fracs = np.array([0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.8, 0.95, 0.999], np.float64)
    template = np.zeros(group, np.float64)
    template[0], template[1] = 0.0, 15.0                                 # lo = 0, hi = 15
    tv = (3.0 + fracs).astype(np.float32).astype(np.float64)             # test values in [3, 4)
    slots = np.arange(2, 2 + 6 * len(fracs)).reshape(6, len(fracs))       # 6 slots per value
    template[slots] = tv
    x = np.tile(template, 40).astype(np.float32)                          # 40 groups
    xs = x.astype(np.float64)
    assert np.array_equal(xs[slots], np.broadcast_to(tv, slots.shape))  # exactly representable
    seeds = range(100)
    samples = []
    for seed in seeds:
        packed, lo, scale, _ = K.generic_pack(x, bits, group, True, seed)
        assert np.all(lo == 0) and np.all(scale == 1)
        xhat = K.generic_decode(packed, lo, scale, bits, group, x.shape).astype(np.float64)
        samples.append(xhat.reshape(40, group)[:, slots].reshape(-1, len(fracs)))
    d = np.concatenate(samples)                                            # (M, len(fracs))
    M = d.shape[0]
    assert M == 100 * 40 * 6
    assert np.all((d == np.floor(tv)) | (d == np.floor(tv) + 1))         # support
    f = tv - np.floor(tv)
    var = f * (1 - f)
    mean_err = np.abs(d.mean(axis=0) - tv)
    assert np.all(mean_err <= Z * np.sqrt(var / M) + 1e-6), (mean_err, Z * np.sqrt(var / M))
    assert np.all(d[:, f == 0] == 3.0)                                     # on the grid: exact
    s2 = d.var(axis=0, ddof=1)
    mu4 = var * (1 - 3 * var)
    sd_s2 = np.sqrt(np.maximum(mu4 / M - var ** 2 * (M - 3) / (M * (M - 1)), 0))
    check = (f > 0) & (np.abs(f - 0.5) > 0.1)
    assert np.all(np.abs(s2 - var)[check] <= Z * sd_s2[check] + 1e-9), (s2, var, sd_s2)


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2 ** 32 - 1])
def test_counter_uniform_is_uniform(seed):
    """mean 1/2 and variance 1/12 within Z standard errors; 64-bin chi-square at false-alarm 1e-6;
    values are multiples of 2**-24 in [0, 1)."""

    n = 1 << 20
    r = K.counter_uniform(n, seed).astype(np.float64)
    assert r.min() >= 0.0 and r.max() < 1.0
    assert np.all(r * 2 ** 24 == np.floor(r * 2 ** 24))
    assert abs(r.mean() - 0.5) <= Z * math.sqrt(1 / 12 / n)
    # Var of the sample variance of U(0,1): (mu4 - sigma^4)/n = (1/80 - 1/144)/n
    assert abs(r.var() - 1 / 12) <= Z * math.sqrt((1 / 80 - 1 / 144) / n)
    counts = np.bincount((r * 64).astype(np.int64), minlength=64)
    stat = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert stat <= chi2.isf(1e-6, 63), stat
    # neighbouring counters are not correlated (lag-1 correlation within Z / sqrt(n))
    c = np.corrcoef(r[:-1], r[1:])[0, 1]
    assert abs(c) <= Z / math.sqrt(n)


def test_the_build_reports_a_vector_unit_this_cpu_has():
    """``_quant.SIMD`` names the vector unit the kernels were built for (bench_engine's
    ``--isa avx2`` checks it); the CPU running them must have it."""
    SIMD = _quant.SIMD
    assert SIMD in ("avx512f", "avx2", "avx", "sse2", "neon", "none")
    if SIMD in ("avx512f", "avx2", "avx") and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert SIMD in f.read().split()
