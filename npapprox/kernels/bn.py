"""Batch-norm passes with one dispatch point: fused Cython kernels
(``src/_bn.pyx``, extension ``npapprox._bn``) for float32/float64 NumPy arrays,
the ``xp`` reference below otherwise (CuPy arrays, other dtypes, or
``NPAPPROX_REFERENCE_KERNELS=1`` / ``kernels.use_reference(True)``).

Arrays are ``(N, C, M)`` views of NCHW tensors (``M = H*W``), per-channel
vectors ``(C,)``. BN is memory-bound: the reference makes a pass over the
tensor per NumPy expression (about ten for a forward), the kernels two or three.

Contract between the two: element-wise outputs (``y``, ``h``, ``gx`` given the
same per-channel constants) are bit-identical; reductions (``mu``, ``var``,
``ggamma``, ``gbeta``) are summed in float64 by the kernels and in the array's
precision by the reference, so they agree to rounding (tests compare both with a
float64 oracle). Within one backend every recomputation uses the same
implementation as the forward, so a rebuilt ``h`` or ReLU mask is bit-identical
to the forward's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from npapprox.backend import array_module, on_gpu
from npapprox.kernels import im2col as _switch            # holds the one reference switch

try:  # built by ``pip install .`` / ``pip install -e .`` from src/_bn.pyx
    from npapprox import _bn as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None

__all__ = ["BNSource", "as_ncm", "bn_stats", "bn_apply", "bn_backward", "compiled_available"]

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BNSource(NamedTuple):
    """What BN's backward reads: ``xhat = (src - mu) * inv_sigma`` and the ReLU
    mask. ``mu is None`` means ``src`` already is xhat. The mask is either an
    array (``mask``), or rebuilt from ``src`` exactly as the forward computed it,
    ``(src - mu) * (gamma * inv_sigma) + relu_beta > 0`` (``relu_beta``), or
    absent (plain BN: both None)."""

    src: object
    mu: object = None
    inv_sigma: object = None
    mask: object = None
    relu_beta: object = None


def as_ncm(a):
    """(N, C, H, W) -> (N, C, H*W), the layout of these passes (a view when it can be)."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def compiled_available() -> bool:
    """True when the Cython extension ``npapprox._bn`` imported."""
    return _compiled is not None


def _use_compiled(*arrays) -> bool:
    return (_compiled is not None and not _switch._force_reference
            and all(isinstance(a, np.ndarray) and not on_gpu(a) for a in arrays) and arrays[0].dtype in _COMPILED_DTYPES)


def bn_stats(x3):
    """Per-channel mean and biased variance of ``x3 (N, C, M)`` over N and M
    (two passes: the variance is the mean of squared deviations)."""
    if _use_compiled(x3):
        x3 = np.ascontiguousarray(x3)
        mean, var = np.empty(x3.shape[1]), np.empty(x3.shape[1])
        _compiled.bn_stats(x3, mean, var)
        return mean.astype(x3.dtype), var.astype(x3.dtype)
    mu = x3.mean(axis=(0, 2))
    d = x3 - mu[:, None]
    return mu, (d * d).mean(axis=(0, 2))


def bn_apply(x3, mu, scale, beta, *, want_y=True, want_h=False):
    """``y = (x3 - mu) * scale + beta`` (the BN output, ``scale = gamma *
    inv_sigma``) and/or ``h = y * (y > 0)`` (ReLU: -0.0 where y < 0, as NumPy
    gives) -> ``(y or None, h or None)``, each ``(N, C, M)``."""
    if _use_compiled(x3, mu, scale, beta):
        x3 = np.ascontiguousarray(x3)
        y = np.empty_like(x3) if want_y else None
        h = np.empty_like(x3) if want_h else None
        _compiled.bn_apply(x3, *(np.ascontiguousarray(a) for a in (mu, scale, beta)), y, h)
        return y, h
    y = (x3 - mu[:, None]) * scale[:, None] + beta[:, None]
    return (y if want_y else None), (y * (y > 0) if want_h else None)


def bn_backward(gy3, source: BNSource, gamma, inv_sigma, *, batch_stats=True, need_gx=True):
    """BN's backward from ``gy3 (N, C, M)`` -> ``(gx or None, ggamma, gbeta)``.

    With ``g = gy * mask`` and ``xhat`` from ``source`` (see ``BNSource``)::

        gbeta  = sum g,  ggamma = sum g * xhat          (over N and M)
        gx     = gamma*inv_sigma * (g - gbeta/Mt - xhat * ggamma/Mt)   batch statistics
        gx     = gamma*inv_sigma * g                                   running statistics

    ``inv_sigma`` is the op's (the scale of the forward); ``source.inv_sigma``
    only turns ``src`` into xhat."""
    xp = array_module(gy3)
    src, mu, s_inv, mask, relu_beta = source
    dtype, c = gy3.dtype, gy3.shape[1]
    scale = gamma * inv_sigma                                    # as the forward computed it
    if mu is None:                                               # src is xhat already: (xhat - 0) * 1
        mu, s_inv = xp.zeros(c, dtype), xp.ones(c, dtype)
    if _use_compiled(gy3, src, mu, s_inv, scale):
        gy3, src = np.ascontiguousarray(gy3), np.ascontiguousarray(src)
        mode = 2 if mask is not None else 1 if relu_beta is not None else 0
        m8 = np.ascontiguousarray(mask, dtype=bool).reshape(gy3.shape).view(np.uint8) if mode == 2 else None
        beta = np.ascontiguousarray(relu_beta, dtype=dtype) if mode == 1 else scale
        gx = np.empty_like(gy3) if need_gx else None
        ggamma, gbeta = np.empty(c), np.empty(c)
        _compiled.bn_backward(gy3, src, np.ascontiguousarray(mu), np.ascontiguousarray(s_inv),
                              np.ascontiguousarray(scale), beta, m8, mode, bool(batch_stats), gx, ggamma, gbeta)
        return gx, ggamma.astype(dtype), gbeta.astype(dtype)
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
    return gx, ggamma, gbeta
