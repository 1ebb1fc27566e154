"""Shape ops: reshape / flatten, channel zero-padding, channel concatenation."""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..function import Function
from ..validate import as_tensor, check_rank


class Reshape(Function):
    """y = x.reshape(shape);  gx = gy.reshape(x.shape).  Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x, *, shape):
        ctx.x_shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, gy):
        return gy.reshape(ctx.x_shape)


class PadChannels(Function):
    """y = x with `before` zero channels in front and `after` behind:
    (N, C, H, W) -> (N, before + C + after, H, W);  gx = gy[:, before:before+C].
    The paper's parameter-free shortcut when a stage widens. Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x, *, before, after):
        n, c, h, w = x.shape
        y = array_module(x).zeros((n, before + c + after, h, w), dtype=x.dtype)
        y[:, before:before + c] = x
        ctx.before, ctx.c = before, c
        return y

    @staticmethod
    def backward(ctx, gy):
        return gy[:, ctx.before:ctx.before + ctx.c]


class ConcatChannels(Function):
    """y = concat(x_1, ..., x_m) along axis 1;  gx_i = gy[:, offset_i : offset_i + C_i].
    DenseNet's join. Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, *xs):
        ctx.splits = [x.shape[1] for x in xs]
        return array_module(xs[0]).concatenate(xs, axis=1)

    @staticmethod
    def backward(ctx, gy):
        grads, start = [], 0
        for c in ctx.splits:
            grads.append(gy[:, start:start + c])
            start += c
        return tuple(grads)


def reshape(x, shape):
    x = as_tensor(x, "x")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shape):
        raise ValueError(f"reshape: the new shape must hold integers, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    known = math.prod(s for s in shape if s != -1)
    free = shape.count(-1)
    fits = (free == 0 and known == x.size) or (free == 1 and known > 0 and x.size % known == 0)
    if not fits or any(s < -1 for s in shape):   # NumPy's rule, checked without touching the data
        raise ValueError(f"reshape: cannot reshape {tuple(x.shape)} to {shape}")
    return Reshape.apply(x, shape=shape)


def flatten(x):
    """(N, ...) -> (N, prod(...))."""
    x = as_tensor(x, "x")
    return reshape(x, (x.shape[0], math.prod(x.shape[1:])))   # not -1: ambiguous for an empty batch


def pad_channels(x, before: int, after: int):
    x = as_tensor(x, "x")
    check_rank("pad_channels", "x", x, 4, "(N, C, H, W)")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in (before, after)):
        raise ValueError(f"pad_channels: before and after must be integers >= 0, got {before!r}, {after!r}")
    return PadChannels.apply(x, before=int(before), after=int(after))


def concat_channels(*xs):
    xs = [as_tensor(x, f"x{i}") for i, x in enumerate(xs)]
    if not xs:
        raise ValueError("concat_channels needs at least one tensor")
    for i, x in enumerate(xs):
        check_rank("concat_channels", f"x{i}", x, 4, "(N, C, H, W)")
        if x.dtype != xs[0].dtype:
            raise TypeError(f"concat_channels: x{i} has dtype {x.dtype}, x0 has {xs[0].dtype}")
        if (x.shape[0],) + tuple(x.shape[2:]) != (xs[0].shape[0],) + tuple(xs[0].shape[2:]):
            raise ValueError(f"concat_channels: x{i} shape {tuple(x.shape)} does not match "
                             f"x0 {tuple(xs[0].shape)} outside the channel axis")
    return ConcatChannels.apply(*xs)
