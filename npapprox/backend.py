"""The only module that imports CuPy.

Everything else asks ``array_module(x)`` for the array namespace (``numpy`` or
``cupy``) and writes ``xp.*`` code once for both backends (DESIGN.md property 7).
CuPy is imported lazily, so a CPU-only install never pays for it.
"""
from __future__ import annotations

import contextlib

import numpy as np



class DeviceError(RuntimeError):
    """The GPU was asked for but CuPy or a CUDA device is missing."""

_cupy = None
_cupy_tried = False


def _try_cupy():
    global _cupy, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            import cupy  # noqa: PLC0415  (the one cupy import of the package)
            _cupy = cupy
        except Exception:  # ImportError, or a CUDA library that fails to load
            _cupy = None
    return _cupy


def cupy():
    """The ``cupy`` module, for the few places that need CuPy itself (the CUDA
    kernels in ``npapprox.kernels.gpu``); a clear error when it is missing."""
    cp = _try_cupy()
    if cp is None:
        raise DeviceError("this needs CuPy (and a CUDA GPU): pip install 'npapprox[gpu]'")
    return cp


def array_module(x):
    """``numpy`` for host arrays, ``cupy`` for device arrays."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    cp = _try_cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def on_gpu(x) -> bool:
    return array_module(x) is not np


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _try_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def to_device(x, device: str):
    """Move an array to ``"cpu"`` or ``"gpu"`` (a no-op when already there)."""
    if device == "cpu":
        return x.get() if on_gpu(x) else x
    if device == "gpu":
        cp = _try_cupy()
        if cp is None:
            raise DeviceError("device 'gpu' needs CuPy: pip install 'npapprox[gpu]'")
        return cp.asarray(x)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def erf(x):
    """Elementwise error function on either backend (GELU needs it)."""
    if on_gpu(x):
        import cupyx.scipy.special  # noqa: PLC0415  (only reached with CuPy present)
        return cupyx.scipy.special.erf(x)
    from scipy.special import erf as _erf  # noqa: PLC0415
    return _erf(x).astype(x.dtype, copy=False)


class _PoolPeak:
    """Bytes in use in CuPy's default memory pool: ``peak`` is the highest value
    seen since ``start`` (sampled after every allocation from the pool), minus
    the value at the start."""

    def __init__(self, pool):
        self.pool = pool
        self.start = self.high = pool.used_bytes()

    def sample(self) -> None:
        used = self.pool.used_bytes()
        if used > self.high:
            self.high = used

    @property
    def peak(self) -> int:
        self.sample()
        return int(self.high - self.start)


@contextlib.contextmanager
def gpu_memory_peak():
    """Measure the peak of GPU memory held by CuPy's default memory pool inside
    the ``with`` block (what the arrays of the block use: ``used_bytes()``, not
    the pool's cached reserve). Yields an object whose ``peak`` is in bytes above
    the level at entry. Allocations outside the pool (cuBLAS workspaces, the
    CUDA context) are not counted."""
    cp = cupy()
    from cupy.cuda import memory_hook  # noqa: PLC0415  (CuPy stays confined to this module)

    tracker = _PoolPeak(cp.get_default_memory_pool())

    class _Hook(memory_hook.MemoryHook):
        name = "npapprox_pool_peak"

        def malloc_postprocess(self, **kwargs):
            tracker.sample()

    with _Hook():
        yield tracker
