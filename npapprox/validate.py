"""Argument checks shared by the ops' functional boundary, the models and the
command line (ops themselves stay check-free). Each raises a one-line
``TypeError`` / ``ValueError`` naming the function and the argument."""
from __future__ import annotations

import numpy as np

from .tensor import Tensor

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_tensor(x, name: str) -> Tensor:
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
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")


def check_positive_int(op: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def out_size(op: str, size: int, k: int, stride: int, pad: int) -> int:
    o = (size + 2 * pad - k) // stride + 1
    if o < 1:
        raise ValueError(f"{op}: kernel {k} with padding {pad} does not fit an input of size {size}")
    return o


def positive_int(owner: str, name: str, value) -> int:
    """``value`` as an int >= 1, or ``"{owner}: {name} must be a positive integer"``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def size_pair(owner: str, input_size) -> tuple[int, int]:
    """``input_size`` (an int or an (H, W) pair) as a pair of positive ints."""
    pair = (input_size, input_size) if not isinstance(input_size, (tuple, list)) else tuple(input_size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in pair):
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
