"""im2row / row2im: the data movement behind convolution, with one dispatch point.

im2col in *row* layout: one row per output position, the window's values along
the row (``x`` is ``(N, C, H, W)``, ``xpad`` is ``x`` zero-padded by ``pad`` on
H and W, ``OH = (H + 2*pad - kh) // stride + 1`` and likewise ``OW``)::

    rows[(n*OH + i)*OW + j, (p*kw + q)*C + c] = xpad[n, c, i*stride + p, j*stride + q]

so ``rows`` has shape ``(N*OH*OW, kh*kw*C)``.  ``row2im`` is the adjoint
(transpose) of that linear map: every ``rows`` entry is added back onto the ``x``
position it was copied from, and entries that came from the padding are dropped.

Why rows, not the classic ``(N, C*kh*kw, OH*OW)`` columns: the convolution is
then *one* tall matrix product per chunk of samples, ``rows @ W2.T`` with
``W2 = w.transpose(0, 2, 3, 1).reshape(F, kh*kw*C)``, instead of one small
product per sample; at CIFAR shapes OpenBLAS runs the tall products up to 3x
faster (``benchmarks/bench_gemm_layout.py``; table in docs/architecture.md).

Two implementations, bit-identical to each other:

* the compiled kernels in ``npapprox._im2col`` (``src/_im2col.pyx``), used for
  C-contiguous float32/float64 NumPy arrays when the extension imported;
* the ``*_reference`` functions below: plain ``xp`` code (NumPy or CuPy), used
  on the GPU: im2row is one strided copy, row2im a loop over the kernel
  offsets (p, q) vectorised over N and C.

``row2im`` is a sum, so bit-identity needs a fixed summation order: both start
from zeros and add the contributions to each ``x`` position in decreasing
``(p, q)`` order (p outer, q inner).

The switch of :mod:`npapprox.kernels.switch` (``NPAPPROX_REFERENCE_KERNELS=1``,
or :func:`use_reference`, re-exported here) forces the reference implementation.
"""
from __future__ import annotations

import numpy as np

from npapprox.backend import array_module
from npapprox.kernels.checks import out_array
from npapprox.kernels.switch import compiled_applies, use_reference

try:  # built by ``pip install .`` / ``pip install -e .`` from src/_im2col.pyx
    from npapprox import _im2col as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None


__all__ = [
    "im2row",
    "row2im",
    "transpose_samples",
    "im2row_reference",
    "row2im_reference",
    "use_reference",
    "compiled_available",
    "output_size",
]


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
    return compiled_applies(_compiled, a)


# --------------------------------------------------------------------------- #
# Reference implementations (NumPy or CuPy)
# --------------------------------------------------------------------------- #
def _rows_shape(x_shape, kh, kw, stride, pad):
    N, C, H, W = (int(s) for s in x_shape)
    OH, OW = _check_geometry(H, W, kh, kw, stride, pad)
    return (N * OH * OW, kh * kw * C), (N, OH, OW, kh, kw, C)


def im2row_reference(x, kh, kw, stride, pad, out=None):
    """Reference im2row, ``xp`` code for NumPy and CuPy alike.

    Naive formula::

        for n, i, j, p, q, c:
            ih, iw = i*stride + p - pad, j*stride + q - pad
            inside = 0 <= ih < H and 0 <= iw < W
            rows[(n*OH + i)*OW + j, (p*kw + q)*C + c] = x[n, c, ih, iw] if inside else 0

    Vectorised: pad once and move channels last, then one strided copy: the
    windows of ``xpad`` as a ``(N, OH, OW, kh, kw, C)`` view (strides
    ``(sN, stride*sH, stride*sW, sH, sW, sC)``, no copy) into ``rows`` viewed
    the same way (on CuPy: one kernel, whatever kh and kw).
    """
    xp = array_module(x)
    shape, shape6 = _rows_shape(x.shape, kh, kw, stride, pad)
    out = out_array(out, shape, x.dtype, xp)
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    xpad = xpad.transpose(0, 2, 3, 1)                    # (N, H+2pad, W+2pad, C)
    sn, sh, sw, sc = xpad.strides
    windows = xp.lib.stride_tricks.as_strided(xpad, shape=shape6,
                                              strides=(sn, stride * sh, stride * sw, sh, sw, sc))
    out.reshape(shape6)[...] = windows                   # a view: out is C-contiguous
    return out


def row2im_reference(rows, x_shape, kh, kw, stride, pad, out=None):
    """Reference row2im (the adjoint of :func:`im2row_reference`).

    Naive formula::

        gx = zeros(x_shape)
        for p, q in *decreasing* order (p outer, q inner), then n, i, j, c:
            ih, iw = i*stride + p - pad, j*stride + q - pad
            if 0 <= ih < H and 0 <= iw < W:
                gx[n, c, ih, iw] += rows[(n*OH + i)*OW + j, (p*kw + q)*C + c]

    Vectorised: accumulate into a zero padded channels-last buffer, one strided
    slice per (p, q) in that order, then crop the padding away. (Decreasing,
    because the compiled kernel walks the output positions (i, j) in increasing
    order, reading each row of ``rows`` once, and for a fixed x position a larger
    i or j means a smaller p or q.)
    """
    xp = array_module(rows)
    N, C, H, W = (int(s) for s in x_shape)
    shape, shape6 = _rows_shape(x_shape, kh, kw, stride, pad)
    if tuple(rows.shape) != shape:
        raise ValueError(f"rows must have shape {shape}, got {tuple(rows.shape)}")
    if out is not None:
        out_array(out, (N, C, H, W), rows.dtype)
    gpad = xp.zeros((N, H + 2 * pad, W + 2 * pad, C), dtype=rows.dtype)
    rows6 = rows.reshape(shape6)
    OH, OW = shape6[1:3]
    hspan, wspan = stride * (OH - 1) + 1, stride * (OW - 1) + 1
    for p in reversed(range(kh)):
        for q in reversed(range(kw)):
            gpad[:, p:p + hspan:stride, q:q + wspan:stride] += rows6[:, :, :, p, q]
    gx = gpad[:, pad:pad + H, pad:pad + W].transpose(0, 3, 1, 2)
    if out is not None:
        out[...] = gx
        return out
    return xp.ascontiguousarray(gx)


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #
def im2row(x, kh, kw, stride, pad, out=None, threads=1):
    """``(N, C, H, W) -> (N*OH*OW, kh*kw*C)``; see the module docstring for the layout.

    ``out``, when given, must be a C-contiguous array of that shape and of
    ``x``'s dtype; it is filled and returned. ``threads``: OpenMP threads of
    the compiled kernel (samples split between them; same bytes for any count).
    """
    kh, kw, stride, pad = int(kh), int(kw), int(stride), int(pad)
    if not _use_compiled(x):
        return im2row_reference(x, kh, kw, stride, pad, out=out)
    x = np.ascontiguousarray(x)
    shape, _ = _rows_shape(x.shape, kh, kw, stride, pad)
    out = out_array(out, shape, x.dtype)
    if out.size:
        _compiled.im2row(x, out, kh, kw, stride, pad, threads)
    return out


def row2im(rows, x_shape, kh, kw, stride, pad, out=None, threads=1):
    """Adjoint of :func:`im2row`: ``(N*OH*OW, kh*kw*C) -> x_shape = (N, C, H, W)``.

    ``out``, when given, must be a C-contiguous array of ``x_shape`` and of
    ``rows``'s dtype; it is overwritten and returned. ``threads`` as :func:`im2row`."""
    kh, kw, stride, pad = int(kh), int(kw), int(stride), int(pad)
    if not _use_compiled(rows):
        return row2im_reference(rows, x_shape, kh, kw, stride, pad, out=out)
    rows = np.ascontiguousarray(rows)
    N, C, H, W = (int(s) for s in x_shape)
    shape, _ = _rows_shape(x_shape, kh, kw, stride, pad)
    if tuple(rows.shape) != shape:
        raise ValueError(f"rows must have shape {shape}, got {tuple(rows.shape)}")
    gx = out_array(out, (N, C, H, W), rows.dtype)
    if gx.size:
        _compiled.row2im(rows, gx, kh, kw, stride, pad, threads)
    return gx


def transpose_samples(src, out):
    """``out[n] = src[n].T`` for a 3-D ``src`` (N, R, S) into ``out`` (N, S, R), both of one
    dtype, ``out`` C-contiguous: a conv chunk's GEMM rows to NCHW and back (a blocked
    compiled copy; NumPy's strided copy is the reference)."""
    if not _use_compiled(src) or not out.flags.c_contiguous or out.dtype != src.dtype:
        out[...] = src.transpose(0, 2, 1)
        return out
    _compiled.transpose_samples(np.ascontiguousarray(src), out)
    return out
