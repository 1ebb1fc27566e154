"""Fully connected layer."""
from __future__ import annotations

from ..function import ACTIVATION, PARAM, Function
from ..validate import affine_args


class Linear(Function):
    """y = x @ w^T + b.  Shapes: x (N, I), w (O, I), b (O,) or None -> y (N, O).
    gx = gy @ w,  gw = gy^T @ x,  gb = sum_n gy.  Saves x and (by reference) w."""

    SAVES = {"x": ACTIVATION, "w": PARAM}

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save(x=x, w=w)
        y = x @ w.T
        if b is not None:
            y += b
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.restore("x", "w")
        need_x, need_w, need_b = ctx.needs_input_grad
        return (gy @ w if need_x else None,
                gy.T @ x if need_w else None,
                gy.sum(axis=0) if need_b else None)


def linear(x, w, b=None):
    """Functional linear layer (see ``Linear``)."""
    x, w, b = affine_args("linear", x, w, b, "(N, features)", "(out, in)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[1]} features but the weight expects {w.shape[1]}")
    return Linear.apply(x, w, b)
