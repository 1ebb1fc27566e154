"""im2col / col2im: the data movement behind convolution, with one dispatch point.

Layout (``x`` is ``(N, C, H, W)``, ``xpad`` is ``x`` zero-padded by ``pad`` on H
and W, ``OH = (H + 2*pad - kh) // stride + 1`` and likewise ``OW``)::

    cols[n, (c*kh + p)*kw + q, i*OW + j] = xpad[n, c, i*stride + p, j*stride + q]

so ``cols`` has shape ``(N, C*kh*kw, OH*OW)``.  ``col2im`` is the adjoint
(transpose) of that linear map: every ``cols`` entry is added back onto the ``x``
position it was copied from, and entries that came from the padding are dropped.

Two implementations, bit-identical to each other:

* the compiled kernels in ``npapprox._im2col`` (``src/_im2col.pyx``), used for
  C-contiguous float32/float64 NumPy arrays when the extension imported;
* the ``*_reference`` functions below: plain ``xp`` code (NumPy or CuPy),
  vectorised over N and C with a Python loop over the kernel offsets (p, q).

``col2im`` is a sum, so bit-identity needs a fixed summation order: both start
from zeros and add the contributions to each ``x`` position in increasing
``(p, q)`` order (p outer, q inner).

Set ``NPAPPROX_REFERENCE_KERNELS=1`` in the environment (read once, at import)
or call :func:`use_reference` to force the reference implementation.
"""
from __future__ import annotations

import os

import numpy as np

from npapprox.backend import array_module

try:  # built by ``pip install .`` / ``pip install -e .`` from src/_im2col.pyx
    from npapprox import _im2col as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None

_TRUE = {"1", "true", "yes", "on"}
_force_reference = os.environ.get("NPAPPROX_REFERENCE_KERNELS", "").strip().lower() in _TRUE

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

__all__ = [
    "im2col",
    "col2im",
    "im2col_reference",
    "col2im_reference",
    "use_reference",
    "compiled_available",
    "output_size",
]


def use_reference(flag: bool) -> None:
    """Force (``True``) or stop forcing (``False``) the reference kernels."""
    global _force_reference
    _force_reference = bool(flag)


def compiled_available() -> bool:
    """True when the Cython extension ``npapprox._im2col`` imported."""
    return _compiled is not None


def output_size(H: int, W: int, kh: int, kw: int, stride: int, pad: int) -> tuple[int, int]:
    """``(OH, OW)`` of a ``kh x kw`` window sliding with ``stride`` over the padded input."""
    return (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1


def _check_geometry(H, W, kh, kw, stride, pad):
    if kh < 1 or kw < 1 or stride < 1 or pad < 0:
        raise ValueError(f"need kh, kw, stride >= 1 and pad >= 0, got "
                         f"kh={kh} kw={kw} stride={stride} pad={pad}")
    OH, OW = output_size(H, W, kh, kw, stride, pad)
    if OH < 1 or OW < 1:
        raise ValueError(f"a {kh}x{kw} window (pad={pad}) does not fit a {H}x{W} input")
    return OH, OW


def _use_compiled(a) -> bool:
    return (_compiled is not None and not _force_reference
            and isinstance(a, np.ndarray) and a.dtype in _COMPILED_DTYPES)


def _check_out(out, shape, dtype):
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")


# --------------------------------------------------------------------------- #
# Reference implementations (NumPy or CuPy)
# --------------------------------------------------------------------------- #
def im2col_reference(x, kh, kw, stride, pad, out=None):
    """Reference im2col, ``xp`` code for NumPy and CuPy alike.

    Naive formula::

        for n, c, p, q, i, j:
            ih, iw = i*stride + p - pad, j*stride + q - pad
            inside = 0 <= ih < H and 0 <= iw < W
            cols[n, (c*kh + p)*kw + q, i*OW + j] = x[n, c, ih, iw] if inside else 0

    Vectorised: pad once, then for each kernel offset (p, q) copy the strided
    slice ``xpad[:, :, p::stride, q::stride]`` (``OH x OW`` of it) into
    ``cols[:, :, p, q]`` viewed as ``(N, C, kh, kw, OH, OW)``.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    OH, OW = _check_geometry(H, W, kh, kw, stride, pad)
    shape = (N, C * kh * kw, OH * OW)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    else:
        _check_out(out, shape, x.dtype)
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    cols6 = out.reshape(N, C, kh, kw, OH, OW)  # a view: out is C-contiguous
    hspan = stride * (OH - 1) + 1
    wspan = stride * (OW - 1) + 1
    for p in range(kh):
        for q in range(kw):
            cols6[:, :, p, q] = xpad[:, :, p:p + hspan:stride, q:q + wspan:stride]
    return out


def col2im_reference(cols, x_shape, kh, kw, stride, pad, out=None):
    """Reference col2im (the adjoint of :func:`im2col_reference`).

    Naive formula::

        gx = zeros(x_shape)
        for p, q (p outer, q inner), then n, c, i, j:
            ih, iw = i*stride + p - pad, j*stride + q - pad
            if 0 <= ih < H and 0 <= iw < W:
                gx[n, c, ih, iw] += cols[n, (c*kh + p)*kw + q, i*OW + j]

    Vectorised: accumulate into a zero padded buffer, one strided slice per
    (p, q) in that order, then crop the padding away.
    """
    xp = array_module(cols)
    N, C, H, W = (int(s) for s in x_shape)
    OH, OW = _check_geometry(H, W, kh, kw, stride, pad)
    shape = (N, C * kh * kw, OH * OW)
    if tuple(cols.shape) != shape:
        raise ValueError(f"cols must have shape {shape}, got {tuple(cols.shape)}")
    if out is not None:
        _check_out(out, (N, C, H, W), cols.dtype)
    gxpad = xp.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=cols.dtype)
    cols6 = cols.reshape(N, C, kh, kw, OH, OW)
    hspan = stride * (OH - 1) + 1
    wspan = stride * (OW - 1) + 1
    for p in range(kh):
        for q in range(kw):
            gxpad[:, :, p:p + hspan:stride, q:q + wspan:stride] += cols6[:, :, p, q]
    gx = gxpad[:, :, pad:pad + H, pad:pad + W] if pad else gxpad
    if out is not None:
        out[...] = gx
        return out
    return xp.ascontiguousarray(gx)


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #
def im2col(x, kh, kw, stride, pad, out=None):
    """``(N, C, H, W) -> (N, C*kh*kw, OH*OW)``; see the module docstring for the layout.

    ``out``, when given, must be a C-contiguous array of that shape and of
    ``x``'s dtype; it is filled and returned.
    """
    kh, kw, stride, pad = int(kh), int(kw), int(stride), int(pad)
    if not _use_compiled(x):
        return im2col_reference(x, kh, kw, stride, pad, out=out)
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    OH, OW = _check_geometry(H, W, kh, kw, stride, pad)
    shape = (N, C * kh * kw, OH * OW)
    if out is None:
        out = np.empty(shape, dtype=x.dtype)
    else:
        _check_out(out, shape, x.dtype)
    if out.size:
        _compiled.im2col(x, out, kh, kw, stride, pad)
    return out


def col2im(cols, x_shape, kh, kw, stride, pad, out=None):
    """Adjoint of :func:`im2col`: ``(N, C*kh*kw, OH*OW) -> x_shape = (N, C, H, W)``.

    ``out``, when given, must be a C-contiguous array of ``x_shape`` and of
    ``cols``'s dtype; it is overwritten and returned."""
    kh, kw, stride, pad = int(kh), int(kw), int(stride), int(pad)
    if not _use_compiled(cols):
        return col2im_reference(cols, x_shape, kh, kw, stride, pad, out=out)
    cols = np.ascontiguousarray(cols)
    N, C, H, W = (int(s) for s in x_shape)
    OH, OW = _check_geometry(H, W, kh, kw, stride, pad)
    shape = (N, C * kh * kw, OH * OW)
    if tuple(cols.shape) != shape:
        raise ValueError(f"cols must have shape {shape}, got {tuple(cols.shape)}")
    if out is None:
        gx = np.empty((N, C, H, W), dtype=cols.dtype)
    else:
        _check_out(out, (N, C, H, W), cols.dtype)
        gx = out
    if gx.size:
        _compiled.col2im(cols, gx, kh, kw, stride, pad)
    return gx
