"""One parity suite: every implementation of the storage kernels gives the reference's bytes.

Each test runs once per implementation (the ``impl`` fixture):

* ``cpu``: the Cython kernels (``npapprox.kernels.cpu`` / ``npapprox._quant``); a
  missing extension FAILS (the package is always built);
* ``host``: the CUDA source ``quant.cu`` compiled by g++ with cuda_shim.h, run through
  ``gpu.py``'s own wrappers with a host launcher (tests/support.py) that also checks
  every kernel writes all of its outputs and nothing outside them; a missing g++ FAILS;
* ``device``: the CUDA kernels on a GPU through the dispatch, with CuPy arrays. Skipped
  visibly without a usable device; a CuPy that is installed but broken (it does not
  import, or cannot compile a kernel) FAILS instead: an installation to repair.

The reference itself is checked against naive per-element loops in tests/test_kernels.py.
Edge cases: every K, both quantizers, deterministic and stochastic rounding, empty and
odd sizes, many pieces, partial last groups, groups larger than the tensor, saturation,
exact integers and the clamps, NaN/inf (counted, encoded deterministically, decoded to
the one quiet NaN), subnormals (CuPy compiles with -ftz=true; the kernels must not flush).
Seeds are fixed numbers or ``zlib.crc32`` of the parameters, never ``hash()``.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import require_gpu
from hypothesis import given
from hypothesis import strategies as st

import npapprox.kernels as K
from npapprox import backend, quant
from npapprox.kernels import bn as B
from npapprox.kernels import gpu
from npapprox.kernels import reference as R

from support import (
    BETA_OVER_GAMMA,
    BITS,
    F32,
    GAMMAS,
    NONFINITE,
    SETTINGS,
    SPECIALS,
    Impl,
    bn_output,
    channel_params,
    check_bn_apply_pack,
    check_bn_backward_codes,
    check_generic,
    check_paper,
    check_paper_gb,
    cpu_impl,
    generic_input,
    host_impl,
    paper_cases,
    paper_params,
    paper_step,
    same,
)

KINDS = ("normal", "wide", "constant", "zeros", "specials", "nonfinite")


def device_impl():
    """The CUDA kernels through the dispatch on CuPy arrays; results come back to the host."""
    cp = require_gpu()
    assert K.implementation(cp.zeros(1, cp.float32)) == "gpu"

    def call(kernel, *args):
        if kernel.startswith("bn_"):                  # the fused BN passes: gpu.py's public functions
            return getattr(gpu, kernel)(*args)
        return K.counter_uniform(*args, xp=cp) if kernel == "counter_uniform" else getattr(K, kernel)(*args)

    def get(out):
        if out is None:
            return None
        if isinstance(out, (int, np.integer)):
            return int(out)
        assert isinstance(out, cp.ndarray), "expected a CuPy array from the device path"
        return backend.to_device(out, "cpu") if out.ndim else int(out)   # 0-d: a count, not read back before

    return Impl("device", call, put=cp.asarray, get=get)


@pytest.fixture(scope="module", params=["cpu", "host", "device"])
def impl(request):
    if request.param == "cpu":
        return cpu_impl()
    if request.param == "host":
        return host_impl(request.getfixturevalue("host_lib"))
    return device_impl()


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    K.use_reference(False)


# --------------------------------------------------------------------------- #
# The paper's scheme
# --------------------------------------------------------------------------- #
PAPER_SHAPES = [(0, 3, 4, 4), (1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 1, 3), (1, 2, 3), (4, 7),
                (2, 3, 61, 67), (1, 9, 33, 31),   # many pieces, planes straddling bytes
                (64, 16, 32, 32)]                 # large: many blocks on a GPU


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=str)
def test_paper_edge_cases(impl, bits, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, shape)).encode()))
    gamma, beta = channel_params(rng, shape[1])
    y = bn_output(rng, shape, gamma, beta, special=0.3, nonfinite=0.02)
    check_paper_gb(impl, y, gamma, beta, bits)
    # every special value in every channel setting (gamma <= 0, == 0, tiny; beta/gamma far outside +-3)
    C = len(GAMMAS) * len(BETA_OVER_GAMMA)
    gamma = np.repeat(np.array(GAMMAS, np.float32), len(BETA_OVER_GAMMA))
    beta = (np.tile(np.array(BETA_OVER_GAMMA), len(GAMMAS)) * np.abs(gamma)).astype(np.float32)
    vals = np.concatenate([SPECIALS, -SPECIALS, NONFINITE, np.float32([0.5, -0.5, 3.0, 1e-3])])
    with np.errstate(all="ignore"):
        y = np.repeat(vals[:, None], C, axis=1) * np.where(gamma == 0, 1, gamma)[None, :]
    y = np.concatenate([y.astype(np.float32), np.repeat(vals[:, None], C, axis=1)], axis=0)
    check_paper_gb(impl, y, gamma, beta, bits)


@SETTINGS(200)
@given(case=paper_cases(max_side=9))
def test_paper_random(impl, case):
    bits, y, gamma, beta, k, s = case
    check_paper(impl, y, k, s, bits, paper_step(gamma, bits), beta)


@pytest.mark.parametrize("bits", BITS)
def test_paper_exact_integers_and_clamp_edges(impl, bits):
    """u = y*k on, just off and between integers, +-0.0, around the clamps +-(NB+1); k = 0, inf."""
    nb = 2 ** bits
    us = np.arange(-(nb + 3), nb + 4, dtype=np.float32)
    u = np.concatenate([us, np.nextafter(us, F32(np.inf)), np.nextafter(us, F32(-np.inf)),
                        us + F32(0.5), np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45])])
    k = np.float32([1.0, 0.0, np.inf])
    for s_val in sorted({1, nb // 2 if nb > 2 else 1, nb - 1}):
        s = np.full(3, s_val, np.int32)
        y = np.ascontiguousarray(np.broadcast_to(u[:, None], (u.size, 3)))
        _, mask = check_paper(impl, y, k, s, bits, np.float32([0.5, 1.0, 2.0]), np.float32([0, -1, 1]))
        assert same(mask, y > 0)


@pytest.mark.parametrize("bits", BITS)
def test_paper_mask_edge_cases(impl, bits):
    """The mask equals y > 0 exactly: gamma <= 0, == 0, tiny (1e-30, 1e-38: k = inf at K = 8),
    beta/gamma = +-1e3, y in (0, 1e-6] (subnormals included), y = +-0.0, NaN -> False."""
    gammas = np.float32([1.0, -1.0, -0.2, 0.0, 1e-30, -1e-30, 1e-38, 2.0, 1e3])
    rel = np.float32([0.0, 1e3, -1e3, 2.9, -3.5])
    gamma = np.repeat(gammas, rel.size)
    beta = (np.tile(rel, gammas.size) * np.abs(gamma)).astype(np.float32)
    beta[gamma == 0] = np.float32([0.0, 1.0, -1.0, 0.5, -0.5])
    tiny = np.float32([1e-45, 3e-45, 1e-40, 1.1754942e-38, 1e-38, 1e-30, 1e-7, 5e-7, 1e-6])
    vals = np.concatenate([tiny, -tiny, np.float32([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0])])
    y = np.ascontiguousarray(np.broadcast_to(vals[:, None], (vals.size, gamma.size)))
    _, mask = check_paper_gb(impl, y.reshape(vals.size, gamma.size, 1, 1), gamma, beta, bits)
    assert same(mask.reshape(y.shape), y > 0)


def test_subnormals_are_kept(impl):
    """Values and products in the subnormal range keep their exact IEEE results (CuPy's
    -ftz=true would flush them; the kernels are immune)."""
    sub = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, 5.877472e-39])
    # paper: k = 1 puts u = y in the subnormal range; ceil(1e-45) = 1 -> first positive bin
    y = np.ascontiguousarray(np.broadcast_to(sub[:, None], (sub.size, 2))).reshape(sub.size, 2, 1)
    for bits in BITS:
        check_paper(impl, y, np.float32([1.0, 2.0 ** 100]), np.int32([1, 2 ** bits - 1]), bits,
                    np.float32([1e-40, 3e-39]), np.float32([-1e-45, 0.0]))
    # generic: groups whose range is subnormal (inv overflows to inf), or whose lo is subnormal
    x = np.concatenate([sub, np.float32([0.0, -0.0, 1e-45, 2e-45, 1.0, 1e-45])])
    for bits in BITS:
        for group in (1, 2, 3, 4, 6, 12):
            for stochastic in (False, True):
                check_generic(impl, x, bits, group, stochastic, 77)


# --------------------------------------------------------------------------- #
# The generic quantizer
# --------------------------------------------------------------------------- #
GROUPS = [1, 3, 64, 256, 2048, 2049, 20000]  # 2049, 20000: the Cython two-pass path


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["det", "sto"])
def test_generic_edge_cases(impl, bits, group, stochastic):
    rng = np.random.default_rng(bits * 1000 + group)
    for n in (0, 1, 2, 7, group - 1, group, group + 1, 3 * group + 5, 45_001):
        for kind in KINDS:
            check_generic(impl, generic_input(rng, n, kind), bits, group, stochastic,
                          int(rng.integers(0, 2 ** 32)))
    check_generic(impl, generic_input(rng, (1 << 20) + 3, "normal"), bits, group, stochastic, 99)


def test_generic_group_larger_than_tensor(impl):
    """A group far larger than the tensor is one partial group (no work or memory per unused slot)."""
    x = generic_input(np.random.default_rng(5), 50_001, "normal")
    for group in (50_001, 2 ** 20, 2 ** 40, 2 ** 70):
        for stochastic in (False, True):
            ref = check_generic(impl, x, 4, group, stochastic, 9)
            assert ref[1].shape == (1,) and ref[1][0] == x.min()


@SETTINGS(150)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 3000), group=st.integers(1, 300),
       kind=st.sampled_from(KINDS), stochastic=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_generic_random(impl, bits, n, group, kind, stochastic, seed):
    check_generic(impl, generic_input(np.random.default_rng(seed), n, kind), bits, group, stochastic, seed)


# --------------------------------------------------------------------------- #
# Bit packing, the noise, and what every kernel shares
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bits", BITS)
def test_bit_packing_and_noise(impl, bits):
    rng = np.random.default_rng(bits + 40)
    for n in (0, 1, 5, 7, 9, 4095, 4096, 4097, 50_001, 1 << 20):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        packed = R.pack_bits(codes, bits)
        assert same(impl("pack_bits", codes, bits), packed)
        assert same(impl("unpack_bits", packed, n, bits), R.unpack_bits(packed, n, bits))
        # out-of-range codes spill like the reference's uint8 shifts (same bytes, not a feature)
        wild = rng.integers(0, 256, n).astype(np.uint8)
        assert same(impl("pack_bits", wild, bits), R.pack_bits(wild, bits))
    for seed in (0, 1, 12345, 0x9E3779B9, 2 ** 32 - 1):
        assert same(impl("counter_uniform", 70_001, seed), R.counter_uniform(70_001, seed))
    assert same(impl("counter_uniform", 0, 3), R.counter_uniform(0, 3))


def test_nonfinite_inputs_are_counted_and_defined(impl):
    rng = np.random.default_rng(21)
    gamma, beta = channel_params(rng, 3)
    for shape in ((2, 3, 4, 5), (1, 3, 1, 1), (5, 3, 3, 3)):
        y = bn_output(rng, shape, gamma, beta, nonfinite=0.3)
        y.reshape(-1)[:3] = np.float32([np.nan, np.inf, -np.inf])
        for bits in BITS:
            check_paper_gb(impl, y, gamma, beta, bits)
            assert impl("paper_pack", y, *paper_params(gamma, beta, bits), bits)[1] == int(np.sum(~np.isfinite(y)))
            for group in (1, 4, 64):
                ref = check_generic(impl, y, bits, group, False, 0)
                assert ref[3] == int(np.sum(~np.isfinite(y)))


def test_accepts_views_odd_shapes_and_host_parameters(impl):
    rng = np.random.default_rng(3)
    gamma, beta = channel_params(rng, 6)
    base = bn_output(rng, (3, 12, 9, 10), np.repeat(gamma, 2), np.repeat(beta, 2))
    y = base[:, ::2, :, ::-1]                                   # not contiguous
    k, s = paper_params(gamma, beta, 4)
    ref = R.paper_pack(np.ascontiguousarray(y), k, s, 4)
    got = impl.direct("paper_pack", impl.put(base)[:, ::2, :, ::-1], k, s, 4)   # k, s stay NumPy arrays
    assert same(got[0], ref[0]) and got[1] == ref[1]
    x = base.transpose(0, 2, 3, 1)                              # not contiguous
    gref = R.generic_pack(np.ascontiguousarray(x), 4, 64, True, 5)
    got = impl.direct("generic_pack", impl.put(base).transpose(0, 2, 3, 1), 4, 64, True, 5)
    assert all(same(a, b) for a, b in zip(got[:3], gref[:3], strict=True))
    # (N, C) and (N, C, L) shapes of the paper scheme
    for shape in ((7, 3), (2, 3, 5)):
        yy = bn_output(rng, shape, gamma[:3], beta[:3])
        check_paper_gb(impl, yy, gamma[:3], beta[:3], 2)


# NaN bit patterns: quiet with payloads, negative, signalling, all ones (what a GPU's arithmetic writes)
NAN_PATTERNS = np.uint32([0x7fc00000, 0x7fc00001, 0xffc00000, 0x7f800001, 0xffffffff, 0x7fffffff]).view(F32)
CANONICAL_NAN = 0x7fc00000


def _nan_bits(out):
    bits = np.ascontiguousarray(out).view(np.uint32).reshape(-1)
    nan = np.isnan(out).reshape(-1)
    return int(nan.sum()), sorted({hex(int(b)) for b in bits[nan]})


def test_every_decoded_nan_is_the_canonical_quiet_nan(impl):
    """Decoders write 0x7fc00000 for every NaN, whatever made it: a NaN lo / scale / step / off
    with any payload or sign, 0 * inf (x86 makes 0xffc00000), inf - inf. The host build
    computes with x86 semantics and a GPU writes 0x7fffffff, so a missing canonicalisation
    shows everywhere; the reference is pinned to the same count and pattern."""
    m = NAN_PATTERNS.size
    # generic: a NaN lo (each pattern), a NaN scale (each pattern), scale = inf (0 * inf at code 0)
    lo = np.concatenate([NAN_PATTERNS, np.ones(m, F32), np.float32([1.0, -3e38])])
    scale = np.concatenate([np.ones(m, F32), NAN_PATTERNS, np.float32([np.inf, np.inf])])
    G = 4
    codes = np.tile(np.arange(G, dtype=np.uint8), lo.size)
    packed = R.pack_bits(codes, 4)
    want = (2 * m * G + 2, [hex(CANONICAL_NAN)])
    assert _nan_bits(R.generic_decode(packed, lo, scale, 4, G, (codes.size,))) == want
    assert _nan_bits(impl("generic_decode", packed, lo, scale, 4, G, (codes.size,))) == want
    # paper: NaN step / off (each pattern), step = inf with off = -inf (inf - inf for t > 0)
    C = 2 * m + 1
    step = np.concatenate([NAN_PATTERNS, np.ones(m, F32), np.float32([np.inf])])
    off = np.concatenate([np.zeros(m, F32), NAN_PATTERNS, np.float32([-np.inf])])
    s = np.full(C, 2, np.int32)
    packed = R.pack_bits(np.tile(np.arange(4, dtype=np.uint8), C), 2)   # t = -1.5, -0.5, 0.5, 1.5
    for relu in (False, True):
        want = (2 * m * (2 if relu else 4) + 2, [hex(CANONICAL_NAN)])
        assert _nan_bits(R.paper_decode(packed, (1, C, 4), s, step, off, 2, relu)) == want
        assert _nan_bits(impl("paper_decode", packed, (1, C, 4), s, step, off, 2, relu)) == want, relu


# --------------------------------------------------------------------------- #
# The fused BN -> ReLU passes (quant.cu's npx_bn_*; their Cython counterparts are
# tested in tests/test_bn.py)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module", params=["host", "device"])
def fused(request):
    if request.param == "host":
        return host_impl(request.getfixturevalue("host_lib"))
    return device_impl()


# odd sizes whose codes end inside a byte at every K < 8, (N, C) and (N, C, L) shapes, many blocks
FUSED_SHAPES = [(0, 3, 4, 4), (1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 1, 3), (1, 2, 3), (5, 7), (2, 3, 61, 67)]
SUBNORMALS = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, -5.877472e-39])


def _unit_constants(rng, C):
    """gamma, beta (gamma < 0, == 0, tiny; |beta/gamma| up to 1e3), mu, inv_sigma, scale = gamma * inv_sigma."""
    gamma, beta = channel_params(rng, C)
    mu = (rng.standard_normal(C) * 2).astype(F32)
    inv_sigma = rng.uniform(0.2, 4.0, C).astype(F32)
    return gamma, beta, mu, inv_sigma, gamma * inv_sigma


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_bn_apply_pack_edge_cases(fused, bits, shape):
    """h and the codes of y = BN(x) in one pass: bn_apply's y and paper_pack(y)'s bytes."""
    rng = np.random.default_rng(zlib.crc32(repr(("apply", bits, shape)).encode()))
    gamma, beta, mu, inv_sigma, scale = _unit_constants(rng, shape[1])
    x = bn_output(rng, shape, np.ones(shape[1], F32), mu, special=0.3, nonfinite=0.02)
    check_bn_apply_pack(fused, x, mu, scale, beta, *paper_params(gamma, beta, bits), bits)
    # every special x in every channel setting, mu = 0 and inv_sigma = 1: y = x * gamma + beta,
    # subnormal y where beta = 0 (x subnormal, or x * gamma underflowing)
    C = len(GAMMAS) * len(BETA_OVER_GAMMA)
    gamma = np.repeat(np.array(GAMMAS, F32), len(BETA_OVER_GAMMA))
    beta = (np.tile(np.array(BETA_OVER_GAMMA), len(GAMMAS)) * np.abs(gamma)).astype(F32)
    vals = np.concatenate([SPECIALS, -SPECIALS, SUBNORMALS, NONFINITE, np.float32([0.5, -0.5, 3.0, 1e-3])])
    x = np.ascontiguousarray(np.broadcast_to(vals[:, None, None], (vals.size, C, 3)))
    y = check_bn_apply_pack(fused, x, np.zeros(C, F32), gamma, beta, *paper_params(gamma, beta, bits), bits)
    assert ((y != 0) & (np.abs(y) < np.finfo(F32).tiny)).any()            # subnormal y were encoded


def test_bn_apply_pack_flags_nonfinite(fused):
    """NaN / inf in x, and y overflowing to inf, are counted as paper_pack counts them."""
    rng = np.random.default_rng(31)
    gamma, beta, mu, inv_sigma, scale = _unit_constants(rng, 3)
    scale[2] = F32(1e30)                                                  # y overflows for |x - mu| > 3.4e8
    for shape in ((2, 3, 4, 5), (1, 3, 1, 1), (5, 3, 3, 3)):
        x = rng.standard_normal(shape).astype(F32)
        x.reshape(-1)[:3] = np.float32([np.nan, np.inf, -np.inf])
        x[-1, 2, -1, -1] = F32(1e10)
        for bits in BITS:
            y = check_bn_apply_pack(fused, x, mu, scale, beta, *paper_params(gamma, beta, bits), bits)
            assert np.isinf(y[-1, 2, -1, -1]) and np.isnan(y.flat[0])       # the overflow is counted too


def _unit_codes(rng, shape, bits):
    """A unit as the paper policy stores it: codes of y = BN output, quant.paper_params's maps."""
    gamma, beta = channel_params(rng, shape[1])
    y = bn_output(rng, shape, gamma, beta, special=0.2)
    p = quant.paper_params(gamma, beta, bits)
    packed, _ = R.paper_pack(y, p["k"], p["s"], bits)
    inv_sigma = rng.uniform(0.2, 4.0, shape[1]).astype(F32)
    return packed, p["s"], p["x_step"], p["x_off"], gamma * inv_sigma


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_backward_codes_edge_cases(fused, bits, shape, batch_stats):
    """gx bit for bit at the kernel's constants, sums within float64 rounding of exact sums;
    gy with signed zeros and subnormals, gamma < 0, == 0, |beta/gamma| > 3."""
    rng = np.random.default_rng(zlib.crc32(repr(("backward", bits, shape)).encode()))
    packed, s, x_step, x_off, scale = _unit_codes(rng, shape, bits)
    gy = rng.standard_normal(shape).astype(F32)
    pick = rng.random(shape) < 0.2
    gy[pick] = rng.choice(np.concatenate([SUBNORMALS, np.float32([0.0, -0.0, 1e-7, 1e4])]), int(pick.sum()))
    check_bn_backward_codes(fused, gy, packed, s, x_step, x_off, bits, scale, batch_stats)


def test_bn_backward_codes_nonfinite_gradient(fused):
    """A NaN or inf in gy: NaN / inf sums in its channel only, gx still the formula's bits."""
    rng = np.random.default_rng(41)
    shape = (3, 4, 5, 3)
    for bits in BITS:
        packed, s, x_step, x_off, scale = _unit_codes(rng, shape, bits)
        mask = R.paper_mask(packed, shape, s, bits)
        gy = rng.standard_normal(shape).astype(F32)
        on = np.argwhere(mask[:, :2])                                     # positions the mask lets through
        gy[tuple(on[on[:, 1] == 0][0])] = np.nan
        gy[tuple(on[on[:, 1] == 1][0])] = np.inf
        for batch_stats in (True, False):
            _, ggamma, gbeta = check_bn_backward_codes(fused, gy, packed, s, x_step, x_off, bits, scale, batch_stats)
            assert np.isnan(gbeta[0]) and gbeta[1] == np.inf and np.isfinite(gbeta[2:]).all()


def test_bn_backward_on_device_arrays_runs_the_fused_kernels():
    """bn.bn_backward of a unit's codes on CuPy arrays is gpu.bn_backward_codes (sums cast to float32)."""
    cp = require_gpu()
    rng = np.random.default_rng(51)
    shape = (4, 3, 6, 5)
    packed, s, x_step, x_off, _ = _unit_codes(rng, shape, 4)
    gamma, inv_sigma = np.float32([1.0, -0.5, 2.0]), np.float32([0.7, 1.5, 3.0])
    gy, packed, s, x_step, x_off = (cp.asarray(a) for a in (rng.standard_normal(shape).astype(F32), packed, s,
                                                               x_step, x_off))
    source = B.BNSource(None, codes=(packed, shape, s, x_step, x_off, 4))
    got = B.bn_backward(B.as_ncm(gy), source, cp.asarray(gamma), cp.asarray(inv_sigma))
    want = gpu.bn_backward_codes(gy, packed, s, x_step, x_off, 4, cp.asarray(gamma * inv_sigma))
    assert all(isinstance(a, cp.ndarray) for a in got)
    assert same(cp.asnumpy(got[0]), cp.asnumpy(want[0]).reshape(got[0].shape))
    assert same(cp.asnumpy(got[1]), cp.asnumpy(want[1]).astype(F32))
    assert same(cp.asnumpy(got[2]), cp.asnumpy(want[2]).astype(F32))


# --------------------------------------------------------------------------- #
# The reference itself on device arrays
# --------------------------------------------------------------------------- #
def test_reference_on_device_arrays_matches_away_from_subnormals():
    """The forced reference on CuPy arrays gives the same bytes for inputs whose
    arithmetic stays in the normal range (CuPy's own kernels flush subnormals)."""
    dev = device_impl()
    rng = np.random.default_rng(8)
    gamma = np.float32([1.0, -0.5, 2.0, 0.3])
    beta = np.float32([0.1, -0.2, 0.0, 1.5])
    y = bn_output(rng, (4, 4, 6, 5), gamma, beta, special=0.0)
    K.use_reference(True)
    assert K.implementation(dev.put(y)) == "reference"
    for bits in BITS:
        check_paper_gb(dev, y, gamma, beta, bits)
        for stochastic in (False, True):
            check_generic(dev, y, bits, 64, stochastic, 5)
