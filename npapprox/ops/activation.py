"""Pointwise non-linearities: relu, sigmoid, tanh, gelu."""
from __future__ import annotations

import math

from ..backend import array_module, erf
from ..function import ACTIVATION, Function
from ..validate import as_tensor, check_float


class ReLU(Function):
    """y = max(x, 0) (NaN stays NaN);  gx = 0 where y <= 0, else gy.  Saves its output.
    As PyTorch: the gradient passes where y is NaN, and nothing (not even a NaN
    or inf gy) passes where y <= 0."""

    SAVES = {"y": ACTIVATION}

    @staticmethod
    def forward(ctx, x):
        y = array_module(x).maximum(x, 0)
        ctx.save(y=y)
        return y

    @staticmethod
    def backward(ctx, gy):
        y = ctx.restore("y")
        return array_module(gy).where(y <= 0, 0, gy)


class Sigmoid(Function):
    """y = 1 / (1 + exp(-x));  gx = gy * y * (1 - y).  Saves its output."""

    SAVES = {"y": ACTIVATION}

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        # exp of a non-positive number only: no overflow warnings for large |x|
        e = xp.exp(-xp.abs(x))
        y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        ctx.save(y=y)
        return y

    @staticmethod
    def backward(ctx, gy):
        y = ctx.restore("y")
        return gy * y * (1 - y)


class Tanh(Function):
    """y = tanh(x);  gx = gy * (1 - y^2).  Saves its output."""

    SAVES = {"y": ACTIVATION}

    @staticmethod
    def forward(ctx, x):
        y = array_module(x).tanh(x)
        ctx.save(y=y)
        return y

    @staticmethod
    def backward(ctx, gy):
        y = ctx.restore("y")
        return gy * (1 - y * y)


class GELU(Function):
    """y = x * Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2  (the exact GELU);
    gx = gy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi).
    Saves its input."""

    SAVES = {"x": ACTIVATION}

    @staticmethod
    def forward(ctx, x):
        ctx.save(x=x)
        return x * (0.5 * (1 + erf(x * (1 / math.sqrt(2)))))

    @staticmethod
    def backward(ctx, gy):
        x = ctx.restore("x")
        xp = array_module(x)
        cdf = 0.5 * (1 + erf(x * (1 / math.sqrt(2))))
        pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return gy * (cdf + x * pdf)


def _pointwise(fn, name):
    def op(x):
        x = as_tensor(x, "x")
        check_float(name, x=x)
        return fn.apply(x)
    op.__name__ = name
    op.__doc__ = f"Functional {name} (see ``{fn.__name__}``)."
    return op


relu = _pointwise(ReLU, "relu")
sigmoid = _pointwise(Sigmoid, "sigmoid")
tanh = _pointwise(Tanh, "tanh")
gelu = _pointwise(GELU, "gelu")
