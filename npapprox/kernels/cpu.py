"""Storage kernels on the CPU: thin wrappers around the Cython module ``npapprox._quant``.

Same names, signatures and return values as :mod:`npapprox.kernels.reference`
(and the same argument checks, :mod:`npapprox.kernels.checks`), identical
output bytes. These wrappers only validate, allocate the outputs and call the
compiled kernels on flat C-contiguous views; the loops are in src/_quant.pyx.
NumPy arrays only. Importing this module fails when the extension was not built
(the dispatch in :mod:`npapprox.kernels` then falls back to the reference).

The paper kernels of a large tensor run on the pool of :mod:`npapprox.parallel`
(the convolution's): one contiguous range of samples per worker, each starting
on a byte of the packed codes, so the bytes are those of one call. Small
tensors, and calls from inside a parallel region (a conv chunk's decode), run
on the calling thread; inside ``parallel.openmp_team`` (the PyTorch bridge) a
call's pieces run on the calling thread's OpenMP team (the kernels' ``prange``).
"""
from __future__ import annotations

import math

import numpy as np

from npapprox import _quant, parallel
from npapprox.kernels import checks

#: fewer values than this: one call on the calling thread (a region costs more than it saves)
POOL_MIN = 1 << 18

__all__ = ["paper_pack", "paper_decode", "paper_mask", "generic_pack", "generic_decode", "pack_bits",
           "unpack_bits", "counter_uniform"]


def _by_samples(shape, bits, kernel, values, packed):
    """``kernel(values[i0:i1], packed[j0:j1])`` on the flat values and packed bytes of
    sample ranges covering ``shape[0]``: one range per worker of the pool (each
    starting on a byte of ``packed``) or, for a small tensor, one call -> the
    results in sample order."""
    n, per = shape[0], math.prod(shape[1:])
    if n * per < POOL_MIN or parallel.omp_team():   # one call: its pieces run on the caller's OpenMP team
        return [kernel(values, packed)]
    g = 8 // math.gcd(per * bits, 8)                 # samples per whole number of bytes
    return parallel.run_ranges(lambda a, b: kernel(values[a * per:b * per],
                                                   packed[a * per * bits // 8:-(-b * per * bits // 8)]), n, g)


def paper_pack(y, k, s, bits):
    """See :func:`npapprox.kernels.reference.paper_pack`. Returns ``(packed, n_nonfinite)``."""
    y, k, s, bits, shape, C, hw = checks.check_paper_pack(y, k, s, bits)
    out = np.empty(checks.packed_nbytes(y.size, bits), dtype=np.uint8)
    nf = _by_samples(shape, bits, lambda v, p: _quant.paper_pack(v, k, s, bits, C, hw, p), y.reshape(-1), out)
    return out, int(sum(nf))


def paper_decode(packed, shape, s, step, off, bits, relu=False):
    """See :func:`npapprox.kernels.reference.paper_decode`."""
    packed, shape, C, hw, s, step, off, bits = checks.check_paper_decode(packed, shape, s, step, off, bits)
    out = np.empty(shape, dtype=np.float32)
    _by_samples(shape, bits, lambda o, p: _quant.paper_decode(p, s, step, off, bits, C, hw, bool(relu), o),
                out.reshape(-1), packed)
    return out


def paper_sample_decoder(packed, shape, s, step, off, bits, relu=False):
    """See :func:`npapprox.kernels.paper_sample_decoder`: the arguments checked here, once."""
    packed, shape, C, hw, s, step, off, bits = checks.check_paper_decode(packed, shape, s, step, off, bits)
    per, tail = C * hw, shape[1:]

    def decode(a, b):
        out = np.empty((b - a,) + tail, dtype=np.float32)
        _by_samples(out.shape, bits, lambda o, p: _quant.paper_decode(p, s, step, off, bits, C, hw, bool(relu), o),
                    out.reshape(-1), packed[a * per * bits // 8:b * per * bits // 8])
        return out
    return decode


def paper_mask(packed, shape, s, bits):
    """See :func:`npapprox.kernels.reference.paper_mask`."""
    packed, shape, C, hw, s, _, _, bits = checks.check_paper_decode(packed, shape, s, None, None, bits)
    out = np.empty(shape, dtype=np.bool_)
    _by_samples(shape, bits, lambda o, p: _quant.paper_mask(p, s, bits, C, hw, o),
                out.reshape(-1).view(np.uint8), packed)
    return out


def _group_len(group, n):
    """A group holds at most n values: the same groups, and a C integer whatever ``group`` is."""
    return min(group, max(n, 1))


def generic_pack(x, bits, group, stochastic=False, seed=0):
    """See :func:`npapprox.kernels.reference.generic_pack`. Returns ``(packed, lo, scale, n_nonfinite)``."""
    x, bits, group, seed = checks.check_generic_pack(x, bits, group, seed)
    ng = checks.num_groups(x.size, group)
    out = np.empty(checks.packed_nbytes(x.size, bits), dtype=np.uint8)
    lo = np.empty(ng, dtype=np.float32)
    scale = np.empty(ng, dtype=np.float32)
    nf = _quant.generic_pack(x.reshape(-1), bits, _group_len(group, x.size), bool(stochastic), seed, out, lo, scale)
    return out, lo, scale, int(nf)


def generic_decode(packed, lo, scale, bits, group, shape):
    """See :func:`npapprox.kernels.reference.generic_decode`."""
    packed, lo, scale, bits, group, shape, n = checks.check_generic_decode(packed, lo, scale, bits, group, shape)
    out = np.empty(shape, dtype=np.float32)
    _quant.generic_decode(packed, lo, scale, bits, _group_len(group, n), out.reshape(-1))
    return out


def pack_bits(codes, bits):
    """See :func:`npapprox.kernels.reference.pack_bits`."""
    codes, bits = checks.check_codes(codes, bits)
    out = np.empty(checks.packed_nbytes(codes.size, bits), dtype=np.uint8)
    _quant.pack_bits(codes, bits, out)
    return out


def unpack_bits(packed, n, bits):
    """See :func:`npapprox.kernels.reference.unpack_bits`."""
    packed, n, bits = checks.check_unpack_bits(packed, n, bits)
    out = np.empty(n, dtype=np.uint8)
    _quant.unpack_bits(packed, bits, out)
    return out


def counter_uniform(n, seed, xp=np):
    """See :func:`npapprox.kernels.reference.counter_uniform` (NumPy only)."""
    if xp is not np:
        raise ValueError("npapprox.kernels.cpu.counter_uniform makes NumPy arrays only")
    seed = checks.check_seed(seed)
    out = np.empty(int(n), dtype=np.float32)
    _quant.counter_uniform(seed, out)
    return out
