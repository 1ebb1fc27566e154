"""Elementwise arithmetic with NumPy broadcasting: add (residual add), mul, sum."""
from __future__ import annotations

from ..backend import array_module
from ..function import ACTIVATION, Function
from ..parallel import add as _add
from ..tensor import Tensor
from ..validate import as_tensor


def _unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added or stretched, to ``shape``."""
    if tuple(g.shape) == tuple(shape):
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


class Add(Function):
    """y = a + b (broadcasting);  ga = gy, gb = gy (summed to each shape). Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return _add(a, b)                                         # the residual add: on all cores

    @staticmethod
    def backward(ctx, gy):
        return _unbroadcast(gy, ctx.shapes[0]), _unbroadcast(gy, ctx.shapes[1])


class Mul(Function):
    """y = a * b (broadcasting);  ga = gy * b, gb = gy * a. Saves both."""

    SAVES = {"a": ACTIVATION, "b": ACTIVATION}

    @staticmethod
    def forward(ctx, a, b):
        ctx.save(a=a, b=b)
        return a * b

    @staticmethod
    def backward(ctx, gy):
        a, b = ctx.restore("a", "b")
        need_a, need_b = ctx.needs_input_grad
        return (_unbroadcast(gy * b, a.shape) if need_a else None,
                _unbroadcast(gy * a, b.shape) if need_b else None)


class Scale(Function):
    """y = c * x for a Python number c;  gx = c * gy. Saves nothing."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x, *, c):
        ctx.c = c
        return (x * c).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, gy):
        return (gy * ctx.c).astype(gy.dtype, copy=False)


class SumAll(Function):
    """y = sum of every element (a 0-d array);  gx = gy broadcast to x's shape."""

    SAVES = {}

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum()

    @staticmethod
    def backward(ctx, gy):
        return array_module(gy).full(ctx.shape, gy, dtype=gy.dtype)


def add(a, b):
    """Residual / elementwise addition."""
    a = as_tensor(a, "a")
    if not isinstance(b, (Tensor,)) and not hasattr(b, "shape"):
        b = Tensor(a.dtype.type(b))
    b = as_tensor(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"add: dtype mismatch ({a.dtype} and {b.dtype})")
    return Add.apply(a, b)


def mul(a, b):
    """Elementwise product; a Python number for ``b`` scales without saving anything."""
    a = as_tensor(a, "a")
    if isinstance(b, (int, float)):
        return Scale.apply(a, c=b)
    b = as_tensor(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"mul: dtype mismatch ({a.dtype} and {b.dtype})")
    return Mul.apply(a, b)


def sum_all(x):
    return SumAll.apply(as_tensor(x, "x"))
