"""Zero-copy views between torch tensors and the arrays npapprox's kernels take:
NumPy for CPU tensors, CuPy through DLPack for CUDA tensors (on torch's current
stream), and where the kernels on them run."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..backend import cupy
from ..parallel import openmp_team


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
def kernel_stream(device: torch.device):
    """Where npapprox's kernels on a tensor of ``device`` run: CuPy kernels on torch's
    current stream of the device; CPU kernels on the calling thread's OpenMP team of
    ``torch.get_num_threads()`` threads, i.e. torch's own intra-op threads
    (``npapprox.parallel.openmp_team``), not npapprox's pool beside them."""
    if device.type != "cuda":
        with openmp_team(torch.get_num_threads()):
            yield
        return
    cp = cupy()
    with cp.cuda.Device(device.index), cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        yield
