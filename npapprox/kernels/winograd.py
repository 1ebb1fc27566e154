"""Winograd tile transforms for 3x3 stride-1 convolutions, with one dispatch point.

Winograd's minimal filtering F(m x m, 3 x 3) computes an ``m x m`` output tile
from an ``a x a`` input tile (``a = m + 2``) with ``a*a`` multiplications per
channel pair instead of ``9*m*m`` (Lavin & Gray 2016)::

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise)

Summed over input channels, the elementwise products become one matrix product
per tile position ``t < a*a``: ``M[t] = V[t] @ U[t]`` with ``V`` ``(a*a, P, C)``
(input tiles, P tiles), ``U`` ``(a*a, C, F)`` (filters) and ``M`` ``(a*a, P, F)``.
This module holds the transforms between images and those tile stacks, and
their adjoints (the backward pass is the forward's transpose):

==========================  ==============================  =========================
function                    maps                            matrix L in ``L X L^T``
==========================  ==============================  =========================
``filter_tiles``            w (F, C, 3, 3) -> U (a*a, C, F) G       (a, 3)
``filter_tiles_adjoint``    gU -> gw                        G^T     (3, a)
``input_tiles``             x (B, C, H, W) -> V             B^T     (a, a)
``input_tiles_adjoint``     gV -> gx (overlapping tiles     B       (a, a)
                            summed)
``output_tiles``            M -> y (B, F, OH, OW)           A^T     (m, a)
``output_tiles_adjoint``    gy -> gM                        A       (a, m)
==========================  ==============================  =========================

Tile ``p = (n*TH + ti)*TW + tj`` (``TH = ceil(OH/m)``, ``TW = ceil(OW/m)``) reads
the input at rows ``ti*m .. ti*m + a - 1`` of the zero-padded input (zero beyond
it too) and writes output rows ``ti*m .. ti*m + m - 1`` (those past OH dropped).

Two implementations, bit-identical to each other for every function above:

* the compiled kernels in ``npapprox._winograd`` (``src/_winograd.pyx``), used for
  float32/float64 NumPy arrays when the extension imported;
* the ``*_reference`` functions below: plain ``xp`` code, and the spec.

Bit-identity needs one order of operations: ``L X L^T`` is computed rows first
(``T = L X``), then columns (``Y = T L^T``), each output the sum of the terms with
a non-zero coefficient in increasing index order, the first term assigned, not
added to zero (:func:`_lxl_reference`); coefficients are cast to the data's dtype
first. ``input_tiles_adjoint`` adds the tiles into a zeroed image in increasing
tile order. The switch of :mod:`npapprox.kernels.switch`
(``NPAPPROX_REFERENCE_KERNELS=1`` or ``use_reference(True)``) forces the reference.
"""
from __future__ import annotations

from fractions import Fraction as Fr
from functools import lru_cache

import numpy as np

from npapprox.backend import array_module
from npapprox.kernels.checks import out_array
from npapprox.kernels.switch import compiled_applies

try:  # built by ``pip install .`` / ``pip install -e .`` from src/_winograd.pyx
    from npapprox import _winograd as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None

__all__ = ["TILES", "tile_grid", "filter_tiles", "filter_tiles_adjoint", "input_tiles",
           "input_tiles_adjoint", "output_tiles", "output_tiles_adjoint", "ChunkTransforms",
           "compiled_for", "compiled_available"]


#: (B^T, G, A^T) of F(m x m, 3 x 3) for m = 2 and 4 (Lavin & Gray 2016, points 0, +-1 / 0, +-1, +-2).
_MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [Fr(1, 2), Fr(1, 2), Fr(1, 2)], [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
         [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
#: the output tile sizes m available
TILES = tuple(_MATRICES)


def compiled_available() -> bool:
    """True when the Cython extension ``npapprox._winograd`` imported."""
    return _compiled is not None


def _matrix(m: int, which: str, dtype):
    """One of B^T ("BT"), B, G, G^T ("GT"), A^T ("AT"), A of F(m, 3), as a C-contiguous
    read-only array of dtype (each coefficient rounded once, from its exact value to float64)."""
    return _matrix_cached(m, which, np.dtype(dtype))


@lru_cache(maxsize=None)
def _matrix_cached(m, which, dtype):
    bt, g, at = (np.array([[float(c) for c in row] for row in mat]) for mat in _MATRICES[m])
    mats = {"BT": bt, "B": bt.T, "G": g, "GT": g.T, "AT": at, "A": at.T}
    out = np.ascontiguousarray(mats[which], dtype=dtype)
    out.flags.writeable = False
    return out


def tile_grid(OH: int, OW: int, m: int) -> tuple[int, int]:
    """``(TH, TW)``: tiles per sample along H and W for an OH x OW output."""
    return -(-OH // m), -(-OW // m)


def compiled_for(a) -> bool:
    """True when the compiled transforms run on array ``a`` (NumPy float32/float64, the
    extension built, the reference not forced): what ``ChunkTransforms`` takes."""
    return compiled_applies(_compiled, a)


# --------------------------------------------------------------------------- #
# Reference implementations (NumPy or CuPy): the spec
# --------------------------------------------------------------------------- #
def _combine(L, X, axis):
    """``sum_j L[i, j] * X.take(j, axis)`` for each row i of L, stacked along ``axis``:
    the non-zero terms in increasing j, the first assigned (a row of zeros gives zeros)."""
    xp = array_module(X)
    rows = []
    for i in range(L.shape[0]):
        acc = None
        for j in range(L.shape[1]):
            if L[i, j] != 0:
                term = L[i, j] * xp.take(X, j, axis=axis)
                acc = term if acc is None else acc + term
        rows.append(xp.zeros_like(xp.take(X, 0, axis=axis)) if acc is None else acc)
    return xp.stack(rows, axis=axis)


def _lxl_reference(L, X):
    """``L X L^T`` on the axes -3, -2 of ``X`` (..., a, a, K) -> (..., r, r, K): rows, then columns."""
    return _combine(L, _combine(L, X, X.ndim - 3), X.ndim - 2)


def _to_tile_stack(tiles, xp):
    """(B, TH, TW, a, a, K) -> (a*a, B*TH*TW, K)."""
    B, TH, TW, a, _, K = tiles.shape
    return tiles.transpose(3, 4, 0, 1, 2, 5).reshape(a * a, B * TH * TW, K)


def _from_tile_stack(stack, B, TH, TW):
    """(a*a, B*TH*TW, K) -> (B, TH, TW, a, a, K)."""
    a = int(round(stack.shape[0] ** 0.5))
    return stack.reshape(a, a, B, TH, TW, stack.shape[2]).transpose(2, 3, 4, 0, 1, 5)


def _input_geometry(shape, m, pad):
    B, C, H, W = (int(s) for s in shape)
    TH, TW = tile_grid(H + 2 * pad - 2, W + 2 * pad - 2, m)
    return B, C, H, W, TH, TW


def filter_tiles_reference(w, m):
    """w (F, C, 3, 3) -> U (a*a, C, F), U[:, c, f] = G w[f, c] G^T."""
    xp = array_module(w)
    F, C = w.shape[:2]
    g = xp.asarray(_matrix(m, "G", w.dtype))
    src = xp.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(3, 3, C * F)
    return xp.ascontiguousarray(_lxl_reference(g, src).reshape((m + 2) ** 2, C, F))


def filter_tiles_adjoint_reference(gu, m):
    """gU (a*a, C, F) -> gw (F, C, 3, 3), gw[f, c] = G^T gU[:, c, f] G."""
    xp = array_module(gu)
    a, (C, F) = m + 2, gu.shape[1:]
    gt = xp.asarray(_matrix(m, "GT", gu.dtype))
    return xp.ascontiguousarray(_lxl_reference(gt, gu.reshape(a, a, C * F)).reshape(3, 3, C, F)
                                .transpose(3, 2, 0, 1))


def input_tiles_reference(x, m, pad, out=None):
    """x (B, C, H, W) -> V (a*a, B*TH*TW, C): each a x a tile of the zero-padded input
    (channels last) as B^T d B. Tiles overlap by 2; the padded image is extended with
    zeros to whole tiles."""
    xp = array_module(x)
    a = m + 2
    B, C, H, W, TH, TW = _input_geometry(x.shape, m, pad)
    out = out_array(out, (a * a, B * TH * TW, C), x.dtype, xp)
    xpad = xp.zeros((B, TH * m + 2, TW * m + 2, C), dtype=x.dtype)
    xpad[:, pad:pad + H, pad:pad + W] = x.transpose(0, 2, 3, 1)
    sb, sh, sw, sc = xpad.strides
    tiles = xp.lib.stride_tricks.as_strided(xpad, shape=(B, TH, TW, a, a, C),
                                            strides=(sb, m * sh, m * sw, sh, sw, sc))
    out[...] = _to_tile_stack(_lxl_reference(xp.asarray(_matrix(m, "BT", x.dtype)), tiles), xp)
    return out


def input_tiles_adjoint_reference(gv, x_shape, m, pad, out=None):
    """gV (a*a, B*TH*TW, C) -> gx (B, C, H, W): each tile's B gV B^T added onto the
    image positions it was read from, in increasing tile order (for one position:
    decreasing offset inside the tile), padding dropped."""
    xp = array_module(gv)
    a = m + 2
    B, C, H, W, TH, TW = _input_geometry(x_shape, m, pad)
    out = out_array(out, (B, C, H, W), gv.dtype, xp)
    tiles = _lxl_reference(xp.asarray(_matrix(m, "B", gv.dtype)), _from_tile_stack(gv, B, TH, TW))
    gpad = xp.zeros((B, TH * m + 2, TW * m + 2, C), dtype=gv.dtype)
    for u in reversed(range(a)):
        for w in reversed(range(a)):
            gpad[:, u:u + TH * m:m, w:w + TW * m:m] += tiles[:, :, :, u, w]
    out[...] = gpad[:, pad:pad + H, pad:pad + W].transpose(0, 3, 1, 2)
    return out


def output_tiles_reference(mt, y_shape, m, out=None):
    """M (a*a, B*TH*TW, F) -> y (B, F, OH, OW): each tile's A^T M A, outputs past OH, OW dropped."""
    xp = array_module(mt)
    B, F, OH, OW = (int(s) for s in y_shape)
    TH, TW = tile_grid(OH, OW, m)
    out = out_array(out, (B, F, OH, OW), mt.dtype, xp)
    tiles = _lxl_reference(xp.asarray(_matrix(m, "AT", mt.dtype)), _from_tile_stack(mt, B, TH, TW))
    out[...] = tiles.transpose(0, 5, 1, 3, 2, 4).reshape(B, F, TH * m, TW * m)[:, :, :OH, :OW]
    return out


def output_tiles_adjoint_reference(gy, m, out=None):
    """gy (B, F, OH, OW) -> gM (a*a, B*TH*TW, F): each m x m tile (zero past OH, OW) as A g A^T."""
    xp = array_module(gy)
    a = m + 2
    B, F, OH, OW = (int(s) for s in gy.shape)
    TH, TW = tile_grid(OH, OW, m)
    out = out_array(out, (a * a, B * TH * TW, F), gy.dtype, xp)
    g = xp.zeros((B, TH * m, TW * m, F), dtype=gy.dtype)
    g[:, :OH, :OW] = gy.transpose(0, 2, 3, 1)
    tiles = g.reshape(B, TH, m, TW, m, F).transpose(0, 1, 3, 2, 4, 5)
    out[...] = _to_tile_stack(_lxl_reference(xp.asarray(_matrix(m, "A", gy.dtype)), tiles), xp)
    return out


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #
def filter_tiles(w, m):
    """w (F, C, 3, 3) -> U (a*a, C, F) (see the module docstring)."""
    if not compiled_for(w):
        return filter_tiles_reference(w, m)
    F, C = w.shape[:2]
    src = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(1, 3, 3, C * F)
    out = np.empty((1, m + 2, m + 2, C * F), dtype=w.dtype)
    _compiled.transform(src, out, _matrix(m, "G", w.dtype))
    return out.reshape((m + 2) ** 2, C, F)


def filter_tiles_adjoint(gu, m):
    """gU (a*a, C, F) -> gw (F, C, 3, 3)."""
    if not compiled_for(gu):
        return filter_tiles_adjoint_reference(gu, m)
    C, F = gu.shape[1:]
    out = np.empty((1, 3, 3, C * F), dtype=gu.dtype)
    _compiled.transform(np.ascontiguousarray(gu).reshape(1, m + 2, m + 2, C * F), out,
                        _matrix(m, "GT", gu.dtype))
    return np.ascontiguousarray(out.reshape(3, 3, C, F).transpose(3, 2, 0, 1))


def input_tiles(x, m, pad, out=None):
    """x (B, C, H, W) -> V (a*a, B*TH*TW, C); ``out`` (C-contiguous) is filled when given."""
    if not compiled_for(x):
        return input_tiles_reference(x, m, pad, out=out)
    B, C, H, W, TH, TW = _input_geometry(x.shape, m, pad)
    out = out_array(out, ((m + 2) ** 2, B * TH * TW, C), x.dtype)
    _compiled.input_tiles(np.ascontiguousarray(x), out, _matrix(m, "BT", x.dtype), m, pad)
    return out


def input_tiles_adjoint(gv, x_shape, m, pad, out=None):
    """gV (a*a, B*TH*TW, C) -> gx of ``x_shape`` (B, C, H, W)."""
    if not compiled_for(gv):
        return input_tiles_adjoint_reference(gv, x_shape, m, pad, out=out)
    out = out_array(out, x_shape, gv.dtype)
    _compiled.input_tiles_adjoint(np.ascontiguousarray(gv), out, _matrix(m, "B", gv.dtype), m, pad)
    return out


def output_tiles(mt, y_shape, m, out=None):
    """M (a*a, B*TH*TW, F) -> y of ``y_shape`` (B, F, OH, OW)."""
    if not compiled_for(mt):
        return output_tiles_reference(mt, y_shape, m, out=out)
    out = out_array(out, y_shape, mt.dtype)
    _compiled.output_tiles(np.ascontiguousarray(mt), out, _matrix(m, "AT", mt.dtype))
    return out


def output_tiles_adjoint(gy, m, out=None):
    """gy (B, F, OH, OW) -> gM (a*a, B*TH*TW, F)."""
    if not compiled_for(gy):
        return output_tiles_adjoint_reference(gy, m, out=out)
    B, F, OH, OW = gy.shape
    TH, TW = tile_grid(OH, OW, m)
    out = out_array(out, ((m + 2) ** 2, B * TH * TW, F), gy.dtype)
    _compiled.output_tiles_adjoint(np.ascontiguousarray(gy), out, _matrix(m, "A", gy.dtype))
    return out


class ChunkTransforms:
    """The four tile transforms of one convolution's chunks, dispatched once: F(m x m,
    3 x 3) in ``dtype``, compiled when ``compiled`` (``compiled_for`` of the layer's
    input or output gradient) and otherwise the functions above. Their dispatch and
    checks (a few µs a call, thousands of calls a ResNet-20 step, made on the workers
    under the GIL) are paid once per convolution; every ``out`` is required (C-contiguous,
    as the conv op allocates them), and the compiled kernels still check each shape.

    input_tiles(x, pad, out)           x (B, C, H, W) -> out V (a*a, B*TH*TW, C)
    output_tiles(mt, out)              M (a*a, B*TH*TW, F) -> out y (B, F, OH, OW)
    output_tiles_adjoint(gy, out)      gy (B, F, OH, OW) -> out gM (a*a, B*TH*TW, F)
    input_tiles_adjoint(gv, pad, out)  gV (a*a, B*TH*TW, C) -> out gx (B, C, H, W)
    """

    def __init__(self, m, dtype, compiled):
        self.m, self.compiled = m, bool(compiled)
        if self.compiled:
            self.bt, self.at, self.a, self.b = (_matrix(m, k, dtype) for k in ("BT", "AT", "A", "B"))

    def input_tiles(self, x, pad, out):
        if not self.compiled:
            return input_tiles(x, self.m, pad, out=out)
        _compiled.input_tiles(np.ascontiguousarray(x), out, self.bt, self.m, pad)
        return out

    def output_tiles(self, mt, out):
        if not self.compiled:
            return output_tiles(mt, out.shape, self.m, out=out)
        _compiled.output_tiles(np.ascontiguousarray(mt), out, self.at)
        return out

    def output_tiles_adjoint(self, gy, out):
        if not self.compiled:
            return output_tiles_adjoint(gy, self.m, out=out)
        _compiled.output_tiles_adjoint(np.ascontiguousarray(gy), out, self.a)
        return out

    def input_tiles_adjoint(self, gv, pad, out):
        if not self.compiled:
            return input_tiles_adjoint(gv, out.shape, self.m, pad, out=out)
        _compiled.input_tiles_adjoint(np.ascontiguousarray(gv), out, self.b, self.m, pad)
        return out
