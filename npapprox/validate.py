"""Argument checks shared by the ops' functional boundary, the models and the
command line (ops themselves stay check-free). Each raises a one-line
``TypeError`` / ``ValueError`` naming the function and the argument."""
from __future__ import annotations

import math
import numbers

import numpy as np

from .tensor import Tensor

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_tensor(x, name: str) -> Tensor:
    """``x`` as a Tensor (an array is wrapped), or a TypeError naming it."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return Tensor(x)
    raise TypeError(f"{name} must be a Tensor or an array, got {type(x).__name__}")


def check_float(op: str, **tensors) -> None:
    """All given tensors float32 or float64 and of one dtype."""
    dtypes = {n: t.dtype for n, t in tensors.items() if t is not None}
    for n, dt in dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {n} has dtype {dt}; expected float32 or float64")
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={dt}" for n, dt in dtypes.items())
        raise TypeError(f"{op}: dtype mismatch ({listed}); cast all to one dtype")


def check_rank(op: str, name: str, t: Tensor, ndim: int, layout: str) -> None:
    """``t`` has ``ndim`` dimensions (``layout`` names them in the message)."""
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")


def affine_args(op: str, x, w, b, x_layout: str, w_layout: str) -> tuple:
    """``(x, w, b)`` as tensors after the checks a linear or convolution op makes on
    them: ranks (from the layouts), float dtypes, and a bias of shape (w.shape[0],)."""
    x, w = as_tensor(x, "x"), as_tensor(w, "w")
    b = None if b is None else as_tensor(b, "b")
    check_rank(op, "x", x, x_layout.count(",") + 1, x_layout)
    check_rank(op, "w", w, w_layout.count(",") + 1, w_layout)
    check_float(op, x=x, w=w, b=b)
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{op}: bias shape {tuple(b.shape)} should be ({w.shape[0]},)")
    return x, w, b


def int_rule(minimum: int = 1, maximum: int | None = None) -> str:
    """The rule ``is_int`` checks, in words."""
    return f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"


def is_int(value, minimum: int = 1, maximum: int | None = None) -> bool:
    """An int (not a bool) in [minimum, maximum]."""
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum))


def check_int(owner: str, name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], or ``"{owner}: {name} must be an integer >= ..."``."""
    if not is_int(value, minimum, maximum):
        raise ValueError(f"{owner}: {name} must be {int_rule(minimum, maximum)}, got {value!r}")
    return int(value)


def check_count(owner: str, name: str, value) -> int:
    """A size (channels, classes, width) as an int >= 1, or ``"... must be a positive integer"``."""
    if not is_int(value, 1):
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def number_rule(lo=None, lo_open: bool = False, hi=None, hi_open: bool = False) -> str:
    """The rule ``is_number`` checks, in words."""
    if lo == 0 and lo_open and hi is None:
        return "positive"
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    return "a finite number " + " and ".join(s for s in (lo_s, hi_s) if s)


def is_number(value, lo=None, lo_open: bool = False, hi=None, hi_open: bool = False) -> bool:
    """A finite real (not a bool) within the bounds (open or closed)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    return ok


def check_number(owner: str, name: str, value, *, lo=None, lo_open: bool = False, hi=None,
                 hi_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the argument and the allowed range."""
    if not is_number(value, lo, lo_open, hi, hi_open):
        raise ValueError(f"{owner}: {name} must be {number_rule(lo, lo_open, hi, hi_open)}, got {value!r}")
    return float(value)


def out_size(op: str, size: int, k: int, stride: int, pad: int) -> int:
    """The output size (size + 2 pad - k) // stride + 1 of a window op, at least 1."""
    o = (size + 2 * pad - k) // stride + 1
    if o < 1:
        raise ValueError(f"{op}: kernel {k} with padding {pad} does not fit an input of size {size}")
    return o


def check_size_pair(owner: str, input_size) -> tuple[int, int]:
    """``input_size`` (an int or an (H, W) pair) as a pair of positive ints."""
    pair = (input_size, input_size) if not isinstance(input_size, (tuple, list)) else tuple(input_size)
    if len(pair) != 2 or not all(is_int(v, 1) for v in pair):
        raise ValueError(f"{owner}: input_size must be a positive int or an (H, W) pair, got {input_size!r}")
    return int(pair[0]), int(pair[1])


def check_model_input(model, x, divisor: int, why: str) -> Tensor:
    """A model's input as a Tensor, or a clear error for a wrong rank, channel count or size."""
    x = as_tensor(x, "x")
    if x.ndim != 4 or x.shape[1] != model.in_channels:
        raise ValueError(f"{type(model).__name__} expects input (N, {model.in_channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[2] % divisor or x.shape[3] % divisor:
        raise ValueError(f"{type(model).__name__}: input height and width must be divisible by {divisor} "
                         f"({why}), got {tuple(x.shape[2:])}")
    return x
