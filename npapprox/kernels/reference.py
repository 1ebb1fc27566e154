"""Storage kernels, reference implementation: plain ``xp`` code (NumPy or CuPy).

This module *is* the byte contract of the storage kernels (docs/kernels.md has
the same contract in prose). The Cython kernels (``npapprox._quant``, wrapped by
``npapprox.kernels.cpu``) and the CUDA kernels (``kernels/quant.cu``) must produce **identical
bytes** for every input; each docstring below gives the naive per-element loop
that the vectorised code implements; tests/test_kernels.py checks the
vectorised code against such loops written independently in the test, and
tests/test_parity.py every other implementation against this one.

Conventions shared by every function

* All arrays are C-contiguous and flattened in C order; ``n`` is the number of
  elements; ``bits`` (K) is one of 1, 2, 4, 8.
* Packing: ``V = 8 // K`` values per byte; value ``i`` lives in byte ``i // V``,
  bits ``[(i % V)*K, (i % V)*K + K)`` (first value in the low bits). Packed
  length ``ceil(n / V)`` bytes (uint8); unused high bits of the last byte are 0.
* All floating-point arithmetic is float32, one rounding per operation, no
  fused multiply-add: every constant below is an ``np.float32`` so NumPy's type
  promotion never silently switches to float64.
* Float -> int conversions only ever see finite, clamped values. Clamps are
  written ``fmin(fmax(u, lo), hi)`` with the IEEE maxNum/minNum meaning: a NaN
  ``u`` becomes the *lower* bound (C: ``u = u > lo ? u : lo; u = u < hi ? u : hi``,
  CUDA: ``fminf(fmaxf(u, lo), hi)``). The contract does not otherwise say what a
  NaN encodes to; this makes it deterministic on every backend.
* Every NaN a kernel writes is the quiet NaN ``0x7fc00000`` (``np.float32(np.nan)``):
  float arithmetic that yields NaN gives a different pattern on each machine (x86
  passes an input NaN's payload through and makes ``0xffc00000`` for ``0 * inf``,
  NVIDIA GPUs make ``0x7fffffff``), so decoded values are canonicalised.

Public functions: :func:`paper_pack`, :func:`paper_decode`, :func:`paper_mask`
(the paper's "BN window" scheme), :func:`generic_pack`, :func:`generic_decode`
(per-group min/max K-bit), :func:`pack_bits`, :func:`unpack_bits`,
:func:`counter_uniform` (the counter-based noise of stochastic rounding).
Arguments are validated by :mod:`npapprox.kernels.checks`, shared with the
Cython and CUDA wrappers, so all three accept the same inputs.

Sections, in the same order and with the same helper names as src/_quant.pyx and
kernels/quant.cu (docs/kernels.md has the table): bit packing; the counter-based
noise (``_uniform``); the paper's scheme (``_paper_codes``); the generic
quantizer (``_group_params``, ``_generic_codes``).
"""
from __future__ import annotations

import numpy as np

from npapprox.backend import array_module
from npapprox.kernels.checks import (
    BITS,
    check_codes,
    check_generic_decode,
    check_generic_pack,
    check_paper_decode,
    check_paper_pack,
    check_seed,
    check_unpack_bits,
    num_groups,
    packed_nbytes,
)

__all__ = ["BITS", "paper_pack", "paper_decode", "paper_mask", "generic_pack", "generic_decode", "pack_bits",
           "unpack_bits", "counter_uniform", "packed_nbytes", "num_groups"]

_F0 = np.float32(0.0)
_HALF = np.float32(0.5)
_NAN = np.float32(np.nan)  # the quiet NaN 0x7fc00000
_TWO_M24 = np.float32(1.0 / 16777216.0)  # 2**-24, exact

# lowbias32 constants (Chris Wellons' hash-prospector), and the Weyl step 2**32 / golden ratio
_GOLDEN = np.uint32(0x9E3779B9)
_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)


# --------------------------------------------------------------------------- #
# Bit packing
# --------------------------------------------------------------------------- #
def pack_bits(codes, bits):
    """Pack uint8 codes (each ``< 2**bits``) into ``ceil(n / V)`` bytes, ``V = 8 // bits``.

    Naive loop::

        out = zeros(ceil(n / V), uint8)
        for i in range(n):
            out[i // V] |= codes[i] << ((i % V) * bits)

    Codes must already be in range (higher bits would spill into the neighbour).
    """
    xp = array_module(codes)
    codes, bits = check_codes(codes, bits)
    v = 8 // bits
    if v == 1:
        return codes.copy()
    n = codes.size
    nbytes = (n + v - 1) // v
    padded = xp.zeros(nbytes * v, dtype=np.uint8)
    padded[:n] = codes
    lanes = padded.reshape(nbytes, v)                       # (nbytes, V): value j of each byte
    out = xp.zeros(nbytes, dtype=np.uint8)
    for j in range(v):
        out |= lanes[:, j] << np.uint8(j * bits)            # uint8 shift: stays uint8
    return out


def unpack_bits(packed, n, bits):
    """Inverse of :func:`pack_bits`: the first ``n`` codes, uint8 of shape ``(n,)``.

    Naive loop::

        for i in range(n):
            codes[i] = (packed[i // V] >> ((i % V) * bits)) & (2**bits - 1)
    """
    xp = array_module(packed)
    packed, n, bits = check_unpack_bits(packed, n, bits)
    v = 8 // bits
    if v == 1:
        return packed.copy()
    shifts = (xp.arange(v, dtype=np.uint8) * np.uint8(bits))  # (V,)
    mask = np.uint8((1 << bits) - 1)
    codes = (packed[:, None] >> shifts[None, :]) & mask     # (nbytes, V)
    return xp.ascontiguousarray(codes.reshape(-1)[:n])


# --------------------------------------------------------------------------- #
# Counter-based noise (lowbias32)
# --------------------------------------------------------------------------- #
def _uniform(xp, idx, seed):
    """lowbias32 of ``idx * 0x9E3779B9 + seed`` (uint32, wrapping) -> float32 in [0, 1)."""
    h = idx * _GOLDEN + np.uint32(seed)
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(15)
    h *= _M2
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * _TWO_M24


def counter_uniform(n, seed, xp=np):
    """The noise of stochastic rounding: ``r[i]`` in ``[0, 1)``, float32 of shape ``(n,)``.

    Naive loop (all uint32 arithmetic wraps modulo 2**32)::

        for i in range(n):
            h = uint32(uint32(i) * 0x9E3779B9 + seed)
            h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b; h ^= h >> 16
            r[i] = float32(h >> 8) * 2**-24          # exact: a 24-bit integer times 2**-24

    ``r[i]`` depends only on ``(i, seed)`` (counter-based), so every backend and
    every thread count draws the same noise. ``xp`` picks NumPy or CuPy.
    """
    seed = check_seed(seed)
    idx = xp.arange(int(n), dtype=np.uint64).astype(np.uint32)   # i modulo 2**32
    return _uniform(xp, idx, seed)


# --------------------------------------------------------------------------- #
# The paper's scheme ("BN window"), per channel
# --------------------------------------------------------------------------- #
def _paper_codes(xp, y3, k3, s3, nb):
    """The paper code of every ``y3`` (``(N, C, HW)``; ``k3``, ``s3`` broadcast ``(1, C, 1)``), int32."""
    lim = np.float32(nb + 1)
    with np.errstate(all="ignore"):                       # inf * 0, overflow: defined below
        u = y3 * k3                                       # float32
        u = xp.fmin(xp.fmax(u, -lim), lim)
        t = xp.ceil(u).astype(np.int32)
    code = xp.clip(s3 - 1 + t, 0, nb - 1)                 # int32
    return xp.where(y3 > 0, xp.maximum(code, s3), xp.minimum(code, s3 - 1))


def paper_pack(y, k, s, bits):
    """Encode BN outputs ``y`` (float32, ``(N, C, *spatial)``) to K-bit codes, packed.

    ``k`` (float32, ``(C,)``) is ``1 / (D |gamma|)`` (0 where gamma == 0) and ``s``
    (int32, ``(C,)``, in ``[1, 2**bits - 1]``) the code of the first positive bin;
    both are computed by the caller. Returns ``(packed, n_nonfinite)``.

    Naive loop (``NB = 2**bits``, ``HW`` = product of the spatial sizes)::

        for i in range(n):
            c = (i // HW) % C;  v = y.flat[i]
            u = float32(v * k[c])
            u = fmin(fmax(u, -(NB + 1)), NB + 1)         # NaN -> -(NB + 1)
            code = s[c] - 1 + int(ceil(u))                # u in (0, 1] -> s, (-1, 0] -> s - 1
            code = min(max(code, 0), NB - 1)
            if v > 0: code = max(code, s[c])              # the mask is exact:
            else:     code = min(code, s[c] - 1)          #   code >= s  <=>  v > 0 (NaN: else)
            codes[i] = code
        packed = pack_bits(codes, bits)
        n_nonfinite = number of i with y.flat[i] NaN or +-inf
    """
    xp = array_module(y)
    y, k, s, bits, shape, C, hw = check_paper_pack(y, k, s, bits)
    y3 = y.reshape(shape[0], C, hw)                       # (N, C, HW)
    code = _paper_codes(xp, y3, k[None, :, None], s[None, :, None], 1 << bits)
    n_nonfinite = int(xp.count_nonzero(~xp.isfinite(y)))
    return pack_bits(code.astype(np.uint8).reshape(-1), bits), n_nonfinite


def _codes_by_channel(packed, shape, C, hw, bits):
    n = int(np.prod(shape, dtype=np.int64))
    codes = unpack_bits(packed, n, bits)
    return codes.reshape(shape[0], C, hw).astype(np.int32)   # (N, C, HW)


def paper_decode(packed, shape, s, step, off, bits, relu=False):
    """Decode :func:`paper_pack` codes to float32 of ``shape`` (bin centres).

    ``step``, ``off`` (float32, ``(C,)``) map the bin centre offset to the value
    wanted (e.g. ``step = D * gamma``, ``off = beta`` style affine maps; the
    caller picks them). With ``relu`` the negative side decodes to +0.0.

    Naive loop::

        for i in range(n):
            c = (i // HW) % C;  code = codes[i]
            t = float32(code - s[c]) + 0.5                # float32
            out = float32(t * step[c]) + off[c]           # two roundings, no FMA
            if relu and code < s[c]: out = +0.0
            if isnan(out): out = NaN                      # the quiet NaN 0x7fc00000, whatever the payload
            out.flat[i] = out
    """
    xp = array_module(packed)
    packed, shape, C, hw, s, step, off, bits = check_paper_decode(packed, shape, s, step, off, bits)
    codes = _codes_by_channel(packed, shape, C, hw, bits)
    s3 = s[None, :, None]
    t = (codes - s3).astype(np.float32) + _HALF
    with np.errstate(all="ignore"):                       # inf / NaN parameters: defined below
        out = t * step[None, :, None] + off[None, :, None]
    if relu:
        out = xp.where(codes < s3, _F0, out)
    out = xp.where(xp.isnan(out), _NAN, out)                # every NaN is 0x7fc00000
    return xp.ascontiguousarray(out.reshape(shape), dtype=np.float32)


def paper_mask(packed, shape, s, bits):
    """The exact ReLU mask ``y > 0`` from :func:`paper_pack` codes: bool of ``shape``.

    Naive loop::

        for i in range(n):
            mask.flat[i] = codes[i] >= s[(i // HW) % C]
    """
    packed, shape, C, hw, s, _, _, bits = check_paper_decode(packed, shape, s, None, None, bits)
    codes = _codes_by_channel(packed, shape, C, hw, bits)
    return (codes >= s[None, :, None]).reshape(shape)


# --------------------------------------------------------------------------- #
# Generic per-group K-bit quantizer (min/max range per group)
# --------------------------------------------------------------------------- #
def _group_view(xp, x, group):
    """``x`` flat, as ``(ngroups, group)``; a partial last group is padded with its own last value."""
    xf = x.reshape(-1)
    n = xf.size
    group = min(group, n)                                   # group >= n: one group of n values
    ng = num_groups(n, group)
    pad = ng * group - n
    if pad:
        xf = xp.concatenate([xf, xp.full(pad, xf[-1], dtype=np.float32)])
    return xf.reshape(ng, group)


def _group_params(xp, xg, levels):
    """``(lo, scale, inv)`` per group of ``xg`` (``(ngroups, group)``)."""
    finite = xp.isfinite(xg).all(axis=1)                    # groups without NaN / inf
    lev = np.float32(levels)
    with np.errstate(all="ignore"):
        lo = xp.where(finite, xg.min(axis=1), _NAN) + _F0     # + 0.0f: -0.0 -> +0.0, so the
        hi = xp.where(finite, xg.max(axis=1), _NAN) + _F0     #   result is order-independent
        d = hi - lo                                           # float32
        scale = xp.where(finite, d / lev, _NAN)
        inv = xp.where(finite & (hi != lo), lev / d, _F0)
    return lo, scale, inv


def _generic_codes(xp, x, lo, inv, r, levels):
    """``min(floor(clamp((x - lo) * inv + r, 0, L + 1)), L)`` elementwise (broadcasting), int32."""
    with np.errstate(all="ignore"):
        v = (x - lo) * inv                                  # float32
        w = v + r
        w = xp.fmin(xp.fmax(w, _F0), np.float32(levels + 1))
        return xp.minimum(xp.floor(w).astype(np.int32), levels)


def generic_pack(x, bits, group, stochastic=False, seed=0):
    """Per-group min/max K-bit quantization of float32 ``x`` (any shape).

    Returns ``(packed, lo, scale, n_nonfinite)``: ``packed`` uint8 of
    ``ceil(n / V)`` bytes, ``lo`` and ``scale`` float32 of ``(ngroups,)``,
    ``ngroups = ceil(n / group)`` (groups of ``group`` consecutive flat elements,
    the last one possibly partial).

    Naive loop (``L = 2**bits - 1`` levels)::

        for g in range(ngroups):
            xs = x.flat[g*group : (g+1)*group]
            if all(isfinite(xs)):
                lo, hi = min(xs) + 0.0, max(xs) + 0.0      # float32; + 0.0 makes -0.0 -> +0.0
                scale[g] = float32(hi - lo) / L             # two float32 roundings
                inv = float32(L / float32(hi - lo)) if hi != lo else 0.0
            else:                                           # caller raises; defined anyway:
                lo, scale[g], inv = NaN, NaN, 0.0           #   NaN = 0x7fc00000
            lo[g] = lo
            for i in the group:
                v = float32(float32(x.flat[i] - lo) * inv)
                w = v + r[i] if stochastic else v + 0.5     # r = counter_uniform(n, seed)
                w = fmin(fmax(w, 0), L + 1)                 # NaN -> 0 (non-finite groups)
                codes[i] = min(int(floor(w)), L)            # == clamp(floor(v + .5), 0, L)
        packed = pack_bits(codes, bits)
        n_nonfinite = number of NaN or +-inf in x

    Clamping ``w`` to ``[0, L + 1]`` before the floor gives the same code as
    clamping the integer afterwards for every non-NaN ``w`` (including +-inf),
    and keeps the float -> int conversion defined.
    """
    xp = array_module(x)
    x, bits, group, seed = check_generic_pack(x, bits, group, seed)
    n = x.size
    levels = (1 << bits) - 1
    if n == 0:
        empty = xp.zeros(0, dtype=np.float32)
        return xp.zeros(0, dtype=np.uint8), empty, empty.copy(), 0
    xg = _group_view(xp, x, group)                          # (ngroups, group)
    lo, scale, inv = _group_params(xp, xg, levels)
    r = counter_uniform(xg.size, seed, xp=xp).reshape(xg.shape) if stochastic else _HALF  # padding draws unused
    code = _generic_codes(xp, xg, lo[:, None], inv[:, None], r, levels)
    codes = code.reshape(-1)[:n].astype(np.uint8)
    n_nonfinite = int(xp.count_nonzero(~xp.isfinite(x)))
    return pack_bits(codes, bits), lo, scale, n_nonfinite


def generic_decode(packed, lo, scale, bits, group, shape):
    """Decode :func:`generic_pack` codes to float32 of ``shape``.

    Naive loop::

        for i in range(n):
            g = i // group
            out.flat[i] = lo[g] + float32(float32(codes[i]) * scale[g])   # no FMA
            if isnan(out.flat[i]): out.flat[i] = NaN                      # 0x7fc00000

    (``out == lo`` exactly when the group was constant: ``scale == 0``.)
    """
    xp = array_module(packed)
    packed, lo, scale, bits, group, shape, n = check_generic_decode(packed, lo, scale, bits, group, shape)
    if n == 0:
        return xp.zeros(shape, dtype=np.float32)
    codes = unpack_bits(packed, n, bits)
    ng = lo.size
    group = min(group, n)                                   # group >= n: one group of n values
    cpad = xp.zeros(ng * group, dtype=np.float32)
    cpad[:n] = codes
    cg = cpad.reshape(ng, group)                            # (ngroups, group)
    with np.errstate(all="ignore"):                         # NaN groups (non-finite input)
        out = lo[:, None] + cg * scale[:, None]             # float32, two roundings
    out = xp.where(xp.isnan(out), _NAN, out)                # every NaN is 0x7fc00000
    return xp.ascontiguousarray(out.reshape(-1)[:n].reshape(shape))
