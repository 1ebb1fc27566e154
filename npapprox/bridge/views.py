"""Zero-copy views between torch tensors and the arrays npapprox's kernels take:
NumPy for CPU tensors, CuPy through DLPack for CUDA tensors (on torch's current
stream)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..backend import cupy


def as_array(t):
    """The data of tensor ``t`` as a NumPy (CPU) or CuPy (CUDA, DLPack) array, no copy
    when ``t`` is contiguous."""
    t = t.detach()
    t = t if t.is_contiguous() else t.contiguous()
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        return cupy().from_dlpack(t)
    raise ValueError(f"npapprox.bridge: K-bit storage runs on cpu or cuda tensors, not {t.device}")


def as_tensor(a):
    """An array (NumPy or CuPy) as a tensor sharing its memory; tensors pass through."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


@contextlib.contextmanager
def kernel_stream(t):
    """CuPy kernels on ``t``'s device run on torch's current stream (no-op on the CPU)."""
    if t.device.type != "cuda":
        yield
        return
    cp = cupy()
    with cp.cuda.Device(t.device.index), cp.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
        yield
