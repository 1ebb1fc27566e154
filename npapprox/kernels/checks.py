"""Argument checks of the storage kernels, shared by every implementation.

The reference (:mod:`npapprox.kernels.reference`), the Cython wrappers
(:mod:`npapprox.kernels.cpu`) and the CUDA wrappers (:mod:`npapprox.kernels.gpu`)
validate and normalise their arguments with these functions, so all three accept
the same inputs and raise the same one-line ``ValueError`` for the same mistakes.
Each ``check_<kernel>`` returns the normalised arguments its kernel needs
(C-contiguous arrays of the kernel's dtypes, Python ints, the derived sizes).
``out_array`` checks the ``out=`` buffers of every kernel family (storage, BN,
im2row, Winograd).
"""
from __future__ import annotations

import numpy as np

from npapprox.backend import array_module

__all__ = [
    "BITS",
    "packed_nbytes",
    "num_groups",
    "check_bits",
    "check_float32",
    "check_shape",
    "check_channel_param",
    "check_s",
    "check_packed",
    "check_group",
    "check_seed",
    "check_codes",
    "check_unpack_bits",
    "check_paper_pack",
    "check_paper_decode",
    "check_generic_pack",
    "check_generic_decode",
    "out_array",
]

BITS = (1, 2, 4, 8)


def check_bits(bits) -> int:
    b = int(bits)
    if b not in BITS or b != bits:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return b


def packed_nbytes(n: int, bits: int) -> int:
    """``ceil(n * bits / 8)``: bytes needed for ``n`` values of ``bits`` bits."""
    v = 8 // check_bits(bits)
    return (int(n) + v - 1) // v


def num_groups(n: int, group: int) -> int:
    """``ceil(n / group)``: number of groups (the last one may be partial)."""
    return (int(n) + int(group) - 1) // int(group)


def out_array(out, shape, dtype, xp=np):
    """``out`` checked (a C-contiguous ``xp`` array of ``shape`` and ``dtype``), or a
    new ``xp.empty(shape, dtype)`` when it is None."""
    shape = tuple(map(int, shape))
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if not (isinstance(out, xp.ndarray) and out.shape == shape and out.dtype == dtype
            and out.flags.c_contiguous):
        got = f"{tuple(out.shape)} {out.dtype}" if hasattr(out, "dtype") else type(out).__name__
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got {got}")
    return out


def check_float32(a, name):
    xp = array_module(a)
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    return xp.ascontiguousarray(a)


def check_shape(shape):
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or any(d < 0 for d in shape):
        raise ValueError(f"shape must be (N, C, *spatial) with non-negative sizes, got {shape}")
    hw = 1
    for d in shape[2:]:
        hw *= d
    return shape, shape[1], hw


def check_channel_param(xp, a, C, dtype, name):
    a = xp.ascontiguousarray(xp.asarray(a, dtype=dtype)).reshape(-1)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one per channel), got {tuple(a.shape)}")
    return a


def check_s(xp, s, C, bits):
    """``s`` as int32 ``(C,)`` of ``xp``. Its range is checked when it comes from the
    host; a device ``s`` was checked where it was made (``quant.paper_params``
    computes it on the host): reading it back here would stall the GPU at every call."""
    if array_module(s) is np:
        s = check_channel_param(np, s, C, np.int32, "s")
        lo, hi = (int(s.min()), int(s.max())) if C else (1, 1)
        if lo < 1 or hi > (1 << bits) - 1:
            raise ValueError(f"s must lie in [1, {(1 << bits) - 1}] for bits={bits}, got range [{lo}, {hi}]")
        if xp is np:
            return s                          # checked above: no second pass for host kernels
    return check_channel_param(xp, s, C, np.int32, "s")


def check_paper_pack(y, k, s, bits):
    """Validated ``(y, k, s, bits, shape, C, HW)`` for :func:`paper_pack`."""
    xp = array_module(y)
    bits = check_bits(bits)
    y = check_float32(y, "y")
    shape, C, hw = check_shape(y.shape)
    return y, check_channel_param(xp, k, C, np.float32, "k"), check_s(xp, s, C, bits), bits, shape, C, hw


def check_packed(packed, n, bits):
    xp = array_module(packed)
    packed = xp.ascontiguousarray(packed).reshape(-1)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    nb = packed_nbytes(n, bits)
    if packed.size != nb:
        raise ValueError(f"packed holds {packed.size} bytes, {n} values of {bits} bits need {nb}")
    return packed


def check_group(group):
    g = int(group)
    if g < 1 or g != group:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    return g


def check_seed(seed):
    sd = int(seed)
    if not 0 <= sd < 2**32 or sd != seed:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return sd


def check_codes(codes, bits):
    xp = array_module(codes)
    bits = check_bits(bits)
    codes = xp.ascontiguousarray(codes).reshape(-1)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    return codes, bits


def check_unpack_bits(packed, n, bits):
    """Validated ``(packed, n, bits)`` for :func:`unpack_bits`."""
    bits = check_bits(bits)
    n = int(n)
    return check_packed(packed, n, bits), n, bits


def check_paper_decode(packed, shape, s, step, off, bits):
    """Validated ``(packed, shape, C, HW, s, step, off, bits)`` for decode / mask."""
    xp = array_module(packed)
    bits = check_bits(bits)
    shape, C, hw = check_shape(shape)
    packed = check_packed(packed, shape[0] * C * hw, bits)
    s = check_s(xp, s, C, bits)
    if step is not None:
        step = check_channel_param(xp, step, C, np.float32, "step")
        off = check_channel_param(xp, off, C, np.float32, "off")
    return packed, shape, C, hw, s, step, off, bits


def check_generic_pack(x, bits, group, seed):
    """Validated ``(x, bits, group, seed)`` for :func:`generic_pack`."""
    bits = check_bits(bits)
    x = check_float32(x, "x")
    group = check_group(group)
    seed = check_seed(seed)
    return x, bits, group, seed


def check_generic_decode(packed, lo, scale, bits, group, shape):
    """Validated ``(packed, lo, scale, bits, group, shape, n)`` for :func:`generic_decode`."""
    xp = array_module(packed)
    bits = check_bits(bits)
    group = check_group(group)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    packed = check_packed(packed, n, bits)
    ng = num_groups(n, group)
    lo = check_channel_param(xp, lo, ng, np.float32, "lo")
    scale = check_channel_param(xp, scale, ng, np.float32, "scale")
    return packed, lo, scale, bits, group, shape, n
