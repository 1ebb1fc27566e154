"""Batch-norm passes with one dispatch point: fused Cython kernels
(``src/_bn.pyx``, extension ``npapprox._bn``) for float32/float64 NumPy arrays,
the ``xp`` reference below otherwise (CuPy arrays, other dtypes, or
``NPAPPROX_REFERENCE_KERNELS=1`` / ``kernels.use_reference(True)``). On CuPy
float32 arrays the backward of a unit's codes runs the CUDA fused pass
(``kernels.gpu.bn_backward_codes``, same contract as the Cython one).

Arrays are ``(N, C, M)`` views of NCHW tensors (``M = H*W``), per-channel
vectors ``(C,)``. BN is memory-bound: the reference makes a pass over the
tensor per NumPy expression (about ten for a forward), the kernels two or three.

Contract between the two: element-wise outputs (``y``, ``h``, ``gx`` given the
same per-channel constants) are bit-identical; reductions (``mu``, ``var``,
``ggamma``, ``gbeta``) are summed in float64 by the kernels and in the array's
precision by the reference, so they agree to rounding (tests compare both with a
float64 oracle). Both hand the variance on in float64 and finish the statistics
with the same code (``bn_batch_stats``), so BN stays scale-invariant up to the
dtype's range: the variance of float32 values around 1e30 (1e60) does not fit
float32, but 1/sigma does. The reference gets its float64 variance without
overflow by dividing a channel whose largest |x| exceeds 2^(maxexp/4) (2^32 for
float32) by a power of two first (exact, so no bytes change for any channel
below that bound). Within one backend every recomputation uses the same
implementation as the forward, so a rebuilt ``h`` or ReLU mask is bit-identical
to the forward's.

Fused entry points of a BN -> ReLU unit under the paper's window (the CUDA
kernels implement the same two, against the same byte contract):

* ``bn_apply_pack(x3, mu, scale, beta, k, s, bits) -> (h, packed, n_nonfinite)``:
  the forward writes h and the K-bit codes of y in one pass; the bytes are those
  of ``paper_pack(bn_apply(x3, mu, scale, beta)[0] as float32, k, s, bits)`` and
  ``bn_apply``'s h.
* ``bn_backward(gy3, BNSource(None, codes=(packed, shape, s, x_step, x_off, bits)),
  gamma, inv_sigma, batch_stats=..., need_gx=...) -> (gx, ggamma, gbeta)``: the
  backward reads the codes, rebuilding xhat and the mask per block; the bytes of
  gx are those of decoding first (``paper_decode``, ``paper_mask``).

Parallelism: the compiled passes split the samples among the workers of
``npapprox.parallel`` (the pool of the convolutions), contiguous ranges walked in
memory order; reductions go through per-row partial sums combined per channel in
a fixed order, so the bytes do not depend on the thread count. Passes over fewer than
``PARALLEL_MIN`` values, and calls with ``serial=True`` (from inside a worker of
that pool, which is not reentrant), run on the calling thread. Inside
``parallel.openmp_team`` (the PyTorch bridge) the backward's passes split their
samples over the calling thread's OpenMP team instead (torch's threads).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from npapprox.backend import array_module, on_gpu
from npapprox.kernels import gpu as _gpu
from npapprox.kernels import paper_decode, paper_mask, paper_pack
from npapprox.kernels.checks import out_array
from npapprox.kernels.switch import compiled_applies, reference_forced
from npapprox.parallel import omp_team, run_ranges

try:  # built by ``pip install .`` / ``pip install -e .`` from src/_bn.pyx
    from npapprox import _bn as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None

__all__ = ["BNSource", "as_ncm", "bn_stats", "bn_batch_stats", "inv_sigma_of", "bn_apply", "bn_apply_pack",
           "bn_backward", "compiled_available", "PARALLEL_MIN"]


#: passes over fewer values run on the calling thread: handing work to the pool
#: costs tens of microseconds, about what 2^16 values take on one core
PARALLEL_MIN = 1 << 16


class BNSource(NamedTuple):
    """What BN's backward reads: ``xhat = (src - mu) * inv_sigma`` and the ReLU
    mask. ``mu is None`` means ``src`` already is xhat. The mask is either an
    array (``mask``), or rebuilt from ``src`` exactly as the forward computed it,
    ``(src - mu) * (gamma * inv_sigma) + relu_beta > 0`` (``relu_beta``), or
    absent (plain BN: both None). Or ``codes``: a BN -> ReLU unit's paper-scheme
    codes ``(packed, shape, s, x_step, x_off, bits)`` (``units.PaperUnit``), from
    which xhat and the mask are rebuilt inside the pass (``src`` None)."""

    src: object
    mu: object = None
    inv_sigma: object = None
    mask: object = None
    relu_beta: object = None
    codes: tuple | None = None


def as_ncm(a):
    """(N, C, H, W) -> (N, C, H*W), the layout of these passes (a view when it can be;
    the last size is spelt out, as -1 is ambiguous for an empty batch)."""
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:], dtype=np.int64)))


def compiled_available() -> bool:
    """True when the Cython extension ``npapprox._bn`` imported."""
    return _compiled is not None


def _use_compiled(*arrays) -> bool:
    return compiled_applies(_compiled, *arrays)


def _by_samples(kernel, x3, serial=False) -> list:
    """``kernel(n0, n1)`` for each worker's contiguous range of samples of ``x3 (N, C, M)``
    (``npapprox.parallel``; one range on the calling thread when ``serial`` or small)
    -> the results, in worker order."""
    if serial or x3.size < PARALLEL_MIN:
        return [kernel(0, x3.shape[0])]
    return run_ranges(kernel, x3.shape[0])


def _into(out, a):
    """``a``, or ``a`` copied into ``out`` when a buffer was given (the reference paths)."""
    if out is None or a is None:
        return a
    out[...] = a
    return out


def _moments(x3):
    """Per-channel mean (in x3's dtype) and biased variance (float64) of ``x3 (N, C, M)``
    over N and M: the kernels read x once (``row_moments``), the reference twice (the
    variance is the mean of squared deviations)."""
    if x3.shape[0] * x3.shape[2] == 0:
        raise ValueError("batch statistics need at least one value per channel")
    if _use_compiled(x3):                                        # float64 sums: no overflow
        x3 = np.ascontiguousarray(x3)
        mean, var = np.empty(x3.shape[1]), np.empty(x3.shape[1])
        part = np.empty((2,) + x3.shape[:2])                      # per-row sums, then combined in order
        _by_samples(lambda n0, n1: _compiled.row_moments(x3, part, n0, n1), x3)
        _compiled.moments_of_rows(part, x3.shape[2], mean, var)
        return mean.astype(x3.dtype), var
    xp = array_module(x3)
    # a: 1, or a power of two bringing the channel's max |x| into [1, 2), where its
    # squared deviations cannot overflow; dividing by it is exact (powers of two)
    amax = xp.maximum(x3.max(axis=(0, 2)), -x3.min(axis=(0, 2)))
    big = xp.isfinite(amax) & (amax > 2.0 ** (np.finfo(x3.dtype).maxexp // 4))
    a = xp.where(big, xp.ldexp(xp.ones_like(amax), xp.frexp(amax)[1] - 1), 1).astype(x3.dtype)
    xs = x3 / a[:, None]
    mu = xs.mean(axis=(0, 2))
    d = xs - mu[:, None]
    return mu * a, (d * d).mean(axis=(0, 2)).astype(np.float64) * a.astype(np.float64) ** 2


def _in_dtype(var64, dtype):
    """The variance in ``dtype``: inf where it exceeds the dtype's range."""
    with np.errstate(over="ignore"):
        return var64.astype(dtype)


def inv_sigma_of(var, eps):
    """1/sigma = 1 / sqrt(var + eps), (C,), in var's dtype."""
    return (1.0 / array_module(var).sqrt(var + eps)).astype(var.dtype)


def bn_stats(x3):
    """Per-channel mean and biased variance of ``x3 (N, C, M)`` over N and M, in x3's
    dtype (the variance is inf where it exceeds the dtype's range)."""
    mu, var64 = _moments(x3)
    return mu, _in_dtype(var64, x3.dtype)


def bn_batch_stats(x3, eps):
    """``bn_stats`` and ``inv_sigma = 1/sqrt(var + eps)``, (C,) each, in x3's dtype.
    Where the variance overflows the dtype, 1/sigma comes from the float64 variance
    (finite down to 1/sigma ~ 1e-38 in float32); elsewhere it is ``inv_sigma_of(var)``."""
    mu, var64 = _moments(x3)
    var = _in_dtype(var64, x3.dtype)
    xp = array_module(var)
    inv_sigma = inv_sigma_of(var, eps)
    if xp is np and not np.isinf(var).any():    # nothing overflowed (on the CPU: a test without a device sync)
        return mu, var, inv_sigma
    wide = xp.isinf(var) & xp.isfinite(var64)
    return mu, var, xp.where(wide, inv_sigma_of(var64, eps).astype(x3.dtype), inv_sigma)


def bn_apply(x3, mu, scale, beta, *, want_y=True, want_h=False, out_y=None, out_h=None, serial=False):
    """``y = (x3 - mu) * scale + beta`` (the BN output, ``scale = gamma *
    inv_sigma``) and/or ``h = y * (y > 0)`` (ReLU: -0.0 where y < 0, as NumPy
    gives) -> ``(y or None, h or None)``, each ``(N, C, M)``. ``out_y`` / ``out_h``:
    buffers to write into (compiled path; C-contiguous, x3's shape and dtype)."""
    if _use_compiled(x3, mu, scale, beta):
        x3 = np.ascontiguousarray(x3)
        y = out_array(out_y, x3.shape, x3.dtype) if want_y else None
        h = out_array(out_h, x3.shape, x3.dtype) if want_h else None
        consts = [np.ascontiguousarray(a) for a in (mu, scale, beta)]
        _by_samples(lambda n0, n1: _compiled.bn_apply(x3, *consts, y, h, n0, n1), x3, serial)
        return y, h
    y = (x3 - mu[:, None]) * scale[:, None] + beta[:, None]
    return _into(out_y, y if want_y else None), _into(out_h, y * (y > 0) if want_h else None)


def bn_apply_pack(x3, mu, scale, beta, k, s, bits, *, out_h=None):
    """A BN -> ReLU unit's forward and its paper codes (``quant.paper_params``'
    ``k``, ``s``; K = ``bits``) -> ``(h, packed, n_nonfinite)``: ``h = y * (y > 0)``
    ``(N, C, M)`` with ``y = (x3 - mu) * scale + beta``, and ``(packed, n_nonfinite) =
    paper_pack(y as float32, k, s, bits)``, bytes identical to that composition.
    Compiled (float32 NumPy arrays whose rows hold whole bytes of codes, ``M * bits
    % 8 == 0``): one pass over x3, the codes written as h is, no y of the batch; on
    float32 CuPy arrays the same pass in CUDA (``gpu.bn_apply_pack``, quant.cu).
    Otherwise the composition itself (y, its codes, then h written over y)."""
    if (_use_compiled(x3, mu, scale, beta) and x3.dtype == np.float32 and (x3.shape[2] * bits) % 8 == 0
            and bits in (1, 2, 4, 8)):
        x3 = np.ascontiguousarray(x3)
        h = out_array(out_h, x3.shape, x3.dtype)
        packed = np.empty(x3.size * bits // 8, np.uint8)
        consts = [np.ascontiguousarray(a, np.float32) for a in (mu, scale, beta, k)]
        s = np.ascontiguousarray(s, np.int32)
        nf = _by_samples(lambda n0, n1: _compiled.bn_apply_pack(x3, *consts, s, bits, h, packed, n0, n1), x3)
        return h, packed, sum(nf)
    if on_gpu(x3) and x3.dtype == np.float32 and out_h is None and not reference_forced():
        return _gpu.bn_apply_pack(x3, mu, scale, beta, k, s, bits)
    y, _ = bn_apply(x3, mu, scale, beta)
    packed, nf = paper_pack(y if y.dtype == np.float32 else y.astype(np.float32), k, s, bits)
    xp = array_module(y)
    return _into(out_h, xp.multiply(y, y > 0, out=y)), packed, nf


def _phases(kernel, gy3, gx):
    """A compiled backward ``kernel(ggamma, gbeta, part, phase, n0, n1[, threads])`` in
    its two parallel phases: row sums by sample ranges, their per-channel sums (n in
    order), then gx by sample ranges -> ``(gx, ggamma, gbeta)`` in gy3's dtype. Inside
    ``parallel.openmp_team(n)`` (the bridge) each phase is one call that splits its
    samples over the calling thread's OpenMP team itself."""
    c, team = gy3.shape[1], omp_team() if gy3.size >= PARALLEL_MIN else 0
    ggamma, gbeta, part = np.empty(c), np.empty(c), np.empty((2,) + gy3.shape[:2])

    def phase(p):
        if team:
            kernel(ggamma, gbeta, part, p, 0, gy3.shape[0], team)
        else:
            _by_samples(lambda n0, n1: kernel(ggamma, gbeta, part, p, n0, n1), gy3)

    phase(1)
    _compiled.sums_of_rows(part, ggamma, gbeta)
    if gx is not None:
        phase(2)
    return gx, ggamma.astype(gy3.dtype), gbeta.astype(gy3.dtype)


def bn_backward(gy3, source: BNSource, gamma, inv_sigma, *, batch_stats=True, need_gx=True, out=None):
    """BN's backward from ``gy3 (N, C, M)`` -> ``(gx or None, ggamma, gbeta)``.

    With ``g = gy * mask`` and ``xhat`` from ``source`` (see ``BNSource``)::

        gbeta  = sum g,  ggamma = sum g * xhat          (over N and M)
        gx     = gamma*inv_sigma * (g - gbeta/Mt - xhat * ggamma/Mt)   batch statistics
        gx     = gamma*inv_sigma * g                                   running statistics

    ``inv_sigma`` is the op's (the scale of the forward); ``source.inv_sigma``
    only turns ``src`` into xhat. An empty batch gives an empty gx and zero sums.
    ``out``: a buffer for gx (compiled path; it may be ``gy3`` itself: each value of
    gx is written after the value of gy at its place was last read)."""
    xp = array_module(gy3)
    dtype, c = gy3.dtype, gy3.shape[1]
    if gy3.size == 0:
        return (xp.empty_like(gy3) if need_gx else None), xp.zeros(c, dtype), xp.zeros(c, dtype)
    scale = gamma * inv_sigma                                    # as the forward computed it
    if source.codes is not None:
        packed, shape, s, x_step, x_off, bits = source.codes
        if _use_compiled(gy3, scale) and dtype == np.float32 and isinstance(packed, np.ndarray):
            # xhat and the mask rebuilt per block inside the pass: no decoded arrays
            gy3 = np.ascontiguousarray(gy3)
            gx = out_array(out, gy3.shape, gy3.dtype) if need_gx else None
            s32, scale = np.ascontiguousarray(s, np.int32), np.ascontiguousarray(scale)
            return _phases(lambda *a: _compiled.bn_backward_codes(
                gy3, packed, s32, x_step, x_off, bits, scale, bool(batch_stats), gx, *a), gy3, gx)
        if on_gpu(gy3) and on_gpu(packed) and dtype == np.float32 and not reference_forced():
            # the same fused pass in CUDA (quant.cu): xhat and the mask rebuilt per element
            gx, ggamma, gbeta = _gpu.bn_backward_codes(gy3, packed, s, x_step, x_off, bits, scale,
                                                       batch_stats=bool(batch_stats), need_gx=need_gx)
            return gx, ggamma.astype(dtype), gbeta.astype(dtype)
        source = BNSource(as_ncm(paper_decode(packed, shape, s, x_step, x_off, bits).astype(dtype, copy=False)),
                          mask=paper_mask(packed, shape, s, bits))
    src, mu, s_inv, mask, relu_beta, _ = source
    if mu is None:                                               # src is xhat already: (xhat - 0) * 1
        mu, s_inv = xp.zeros(c, dtype), xp.ones(c, dtype)
    if _use_compiled(gy3, src, mu, s_inv, scale):
        gy3, src = np.ascontiguousarray(gy3), np.ascontiguousarray(src)
        mode = 2 if mask is not None else 1 if relu_beta is not None else 0
        m8 = np.ascontiguousarray(mask, dtype=bool).reshape(gy3.shape).view(np.uint8) if mode == 2 else None
        beta = np.ascontiguousarray(relu_beta, dtype=dtype) if mode == 1 else scale
        gx = out_array(out, gy3.shape, gy3.dtype) if need_gx else None
        consts = [np.ascontiguousarray(a) for a in (mu, s_inv, scale)] + [beta]
        return _phases(lambda *a: _compiled.bn_backward(gy3, src, *consts, m8, mode, bool(batch_stats), gx, *a),
                       gy3, gx)
    xhat = (src - mu[:, None]) * s_inv[:, None]
    if mask is not None:
        g = gy3 * mask.reshape(gy3.shape)
    elif relu_beta is not None:
        g = gy3 * (((src - mu[:, None]) * scale[:, None] + relu_beta[:, None]) > 0)
    else:
        g = gy3
    gbeta = g.sum(axis=(0, 2))
    ggamma = (g * xhat).sum(axis=(0, 2))
    gx = None
    if need_gx:
        if batch_stats:
            m = gy3.shape[0] * gy3.shape[2]
            gx = scale[:, None] * (g - (gbeta / m)[:, None] - xhat * (ggamma / m)[:, None])
        else:
            gx = scale[:, None] * g
    return _into(out, gx), ggamma, gbeta
