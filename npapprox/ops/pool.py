"""Pooling on NCHW: average (k x k, stride), max (k x k, stride, padding), global average.

All three loop over the k*k window offsets (p, q) with strided slices, which is
vectorised over (N, C, OH, OW) and works unchanged on CuPy arrays. Average pooling
of float NumPy arrays runs the compiled kernels of ``npapprox._pool`` instead
(bit-identical to those slices, src/_pool.pyx), the samples split over the
worker pool; ``NPAPPROX_REFERENCE_KERNELS=1`` forces the slices.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..function import INDEX, Function
from ..kernels.switch import compiled_applies
from ..parallel import run_ranges
from ..validate import as_tensor, check_float, check_int, check_rank, out_size

try:  # built from src/_pool.pyx
    from npapprox import _pool as _compiled
except ImportError:  # pragma: no cover - only when the package was not built
    _compiled = None


def _window(p, q, stride, oh, ow):
    """Slices selecting xpad[:, :, i*stride+p, j*stride+q] for all (i, j)."""
    return (slice(None), slice(None),
            slice(p, p + stride * (oh - 1) + 1, stride), slice(q, q + stride * (ow - 1) + 1, stride))


class AvgPool2d(Function):
    """y[n,c,i,j] = mean_{p,q < k} x[n,c,i*s+p,j*s+q]  (no padding);
    gx[n,c,i*s+p,j*s+q] += gy[n,c,i,j] / k^2.  Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x, *, kernel, stride):
        n, c, h, w = x.shape
        oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        ctx.kernel, ctx.stride, ctx.x_shape = kernel, stride, x.shape
        inv = x.dtype.type(1 / kernel**2)
        if compiled_applies(_compiled, x):
            x, y = np.ascontiguousarray(x), np.empty((n, c, oh, ow), dtype=x.dtype)
            run_ranges(lambda n0, n1: _compiled.avg_pool_forward(x, y, kernel, stride, inv, n0, n1), n)
            return y
        y = array_module(x).zeros((n, c, oh, ow), dtype=x.dtype)
        for p in range(kernel):
            for q in range(kernel):
                y += x[_window(p, q, stride, oh, ow)]
        y *= inv                                                  # in place: no second output buffer
        return y

    @staticmethod
    def backward(ctx, gy):
        k, s = ctx.kernel, ctx.stride
        oh, ow = gy.shape[2:]
        if compiled_applies(_compiled, gy):
            gy, gx = np.ascontiguousarray(gy), np.empty(ctx.x_shape, dtype=gy.dtype)
            run_ranges(lambda n0, n1: _compiled.avg_pool_backward(gy, gx, k, s, 1 / k**2, n0, n1), gy.shape[0])
            return gx
        gx = array_module(gy).zeros(ctx.x_shape, dtype=gy.dtype)
        g = gy * gy.dtype.type(1 / k**2)
        for p in range(k):
            for q in range(k):
                gx[_window(p, q, s, oh, ow)] += g
        return gx


class MaxPool2d(Function):
    """y[n,c,i,j] = max_{p,q < k} xpad[n,c,i*s+p,j*s+q]  (xpad padded with -inf);
    the gradient goes to the window position ``argmax`` that PyTorch picks: the
    positions are visited in row-major order starting from y = -inf at the
    window's first position inside the input, and a position is taken when it
    is larger than y or NaN. So the first maximum wins a tie, the last NaN wins
    (y is NaN when the window holds one), and a window of -inf (padding
    included) sends its gradient to its first position inside the input, never
    to the padding. Saves the argmax offset p*k+q per output (uint8), not x.
    When its input is a stored output (a unit's, ...), a consumer saving y gets a
    reference that rebuilds y from that form and the argmax (``storage.PooledRef``)."""

    SAVES = {"argmax": INDEX}

    @staticmethod
    def forward(ctx, x, *, kernel, stride, padding):
        xp = array_module(x)
        n, c, h, w = x.shape
        oh = (h + 2 * padding - kernel) // stride + 1
        ow = (w + 2 * padding - kernel) // stride + 1
        if padding:
            xpad = xp.full((n, c, h + 2 * padding, w + 2 * padding), -xp.inf, dtype=x.dtype)
            xpad[:, :, padding:padding + h, padding:padding + w] = x
        else:
            xpad = x
        y = xp.full((n, c, oh, ow), -xp.inf, dtype=x.dtype)
        # the first position inside the input of window (i, j): row max(0, pad - i*s), same for columns
        p0 = xp.maximum(padding - stride * xp.arange(oh), 0)
        q0 = xp.maximum(padding - stride * xp.arange(ow), 0)
        argmax = xp.broadcast_to((p0[:, None] * kernel + q0[None, :]).astype(xp.uint8), y.shape)
        for p in range(kernel):
            for q in range(kernel):
                v = xpad[_window(p, q, stride, oh, ow)]
                better = (v > y) | xp.isnan(v)
                y = xp.where(better, v, y)
                argmax = xp.where(better, xp.uint8(p * kernel + q), argmax)   # no boolean-mask write: no GPU sync
        ctx.save(argmax=xp.ascontiguousarray(argmax))   # a broadcast view if no position ever won
        ctx.pool_input = ctx.shared_form(x)
        ctx.kernel, ctx.stride, ctx.padding, ctx.x_shape = kernel, stride, padding, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        argmax = ctx.restore("argmax")
        ctx.pool_input = None
        xp = array_module(gy)
        k, s, pad = ctx.kernel, ctx.stride, ctx.padding
        n, c, h, w = ctx.x_shape
        oh, ow = gy.shape[2:]
        gxpad = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=gy.dtype)
        for p in range(k):
            for q in range(k):       # where, not gy * mask: a NaN / inf gy reaches its argmax only
                gxpad[_window(p, q, s, oh, ow)] += xp.where(argmax == p * k + q, gy, 0)
        return gxpad[:, :, pad:pad + h, pad:pad + w]


class GlobalAvgPool2d(Function):
    """y[n,c] = mean_{i,j} x[n,c,i,j];  gx = gy[n,c] / (H*W) everywhere.  Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x):
        ctx.x_shape = x.shape
        return x.mean(axis=(2, 3))

    @staticmethod
    def backward(ctx, gy):
        n, c, h, w = ctx.x_shape
        g = gy * gy.dtype.type(1 / (h * w))
        return array_module(gy).broadcast_to(g[:, :, None, None], ctx.x_shape).copy()


def _pool_args(op, x, kernel, stride, padding):
    x = as_tensor(x, "x")
    check_rank(op, "x", x, 4, "(N, C, H, W)")
    check_float(op, x=x)
    kernel = check_int(op, "kernel", kernel)
    stride = kernel if stride is None else check_int(op, "stride", stride)
    padding = check_int(op, "padding", padding, minimum=0)
    if padding > kernel // 2:
        raise ValueError(f"{op}: padding {padding} must be at most half the kernel ({kernel})")
    out_size(op, x.shape[2], kernel, stride, padding)
    out_size(op, x.shape[3], kernel, stride, padding)
    return x, kernel, stride, padding


def avg_pool2d(x, kernel: int, stride: int | None = None):
    """k x k average pooling, stride defaults to k, no padding."""
    x, kernel, stride, _ = _pool_args("avg_pool2d", x, kernel, stride, 0)
    return AvgPool2d.apply(x, kernel=kernel, stride=stride)


def max_pool2d(x, kernel: int, stride: int | None = None, padding: int = 0):
    """k x k max pooling (k <= 16), stride defaults to k, padding with -inf."""
    x, kernel, stride, padding = _pool_args("max_pool2d", x, kernel, stride, padding)
    if kernel > 16:
        raise ValueError(f"max_pool2d: kernel {kernel} too large (argmax is stored in 8 bits; k <= 16)")
    return MaxPool2d.apply(x, kernel=kernel, stride=stride, padding=padding)


def global_avg_pool2d(x):
    """Mean over H and W: (N, C, H, W) -> (N, C)."""
    x = as_tensor(x, "x")
    check_rank("global_avg_pool2d", "x", x, 4, "(N, C, H, W)")
    check_float("global_avg_pool2d", x=x)
    return GlobalAvgPool2d.apply(x)
