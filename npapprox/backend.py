"""The only module that imports CuPy.

Everything else asks ``array_module(x)`` for the array namespace (``numpy`` or
``cupy``) and writes ``xp.*`` code once for both backends (DESIGN.md property 7).
CuPy is imported lazily, so a CPU-only install never pays for it.
"""
from __future__ import annotations

import numpy as np

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
            raise RuntimeError("device 'gpu' needs CuPy: pip install 'npapprox[gpu]'")
        return cp.asarray(x)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def erf(x):
    """Elementwise error function on either backend (GELU needs it)."""
    if on_gpu(x):
        import cupyx.scipy.special  # noqa: PLC0415  (only reached with CuPy present)
        return cupyx.scipy.special.erf(x)
    from scipy.special import erf as _erf  # noqa: PLC0415
    return _erf(x).astype(x.dtype, copy=False)
