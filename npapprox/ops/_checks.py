"""Input validation at the functional boundary (ops themselves stay check-free)."""
from __future__ import annotations

import numpy as np

from ..tensor import Tensor

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
