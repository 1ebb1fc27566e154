"""The only module that imports CuPy.

Everything else asks ``array_module(x)`` for the array namespace (``numpy`` or
``cupy``) and writes ``xp.*`` code once for both backends (docs/design.md property 7).
CuPy is imported lazily, so a CPU-only install never pays for it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from typing import NamedTuple

import numpy as np


class DeviceError(RuntimeError):
    """The GPU was asked for but CuPy or a CUDA device is missing."""


class GpuStatus(NamedTuple):
    """What :func:`gpu_status` found: ``available`` (CuPy imported, a device is
    there, and a kernel compiled and ran), ``kind`` (``"ok"``, ``"not-installed"``,
    ``"import-failed"``, ``"no-device"``, ``"probe-failed"``) and ``reason`` (a
    one-line explanation, with the exception that caused it)."""

    available: bool
    kind: str
    reason: str

    @property
    def broken(self) -> bool:
        """CuPy is installed and a device may be there, but CuPy cannot be used: an
        installation to repair, not a machine without a GPU."""
        return self.kind in ("import-failed", "probe-failed")


_cupy = None
_cupy_tried = False
_cupy_error: Exception | None = None  # why ``import cupy`` failed (None: it did not, or not tried)
_gpu_state: GpuStatus | None = None  # the cached result of gpu_status()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]


def _import_quietly(name: str):
    """``importlib.import_module(name)`` with warnings shown as warnings: under
    ``-W error`` (pytest's filterwarnings = error) a deprecation warning raised
    while CuPy imports would otherwise become the import's exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return importlib.import_module(name)


def _try_cupy():
    global _cupy, _cupy_tried, _cupy_error
    if not _cupy_tried:
        _cupy_tried = True
        try:
            _cupy = _import_quietly("cupy")  # the one import of cupy in the package
        except Exception as e:  # ImportError, or a CUDA library that fails to load: kept for the messages
            _cupy, _cupy_error = None, e
    return _cupy


def cupy_installed() -> bool:
    """True when a ``cupy`` package is installed (whether or not it imports)."""
    return importlib.util.find_spec("cupy") is not None


def _probe(cp) -> None:
    """Compile and run one elementwise kernel and one raw kernel (NVRTC and the CUDA
    headers, which CuPy needs for both; without the headers CuPy raises "Failed to
    find CUDA headers" at the first kernel). Raises on any failure."""
    double = cp.ElementwiseKernel("float32 x", "float32 y", "y = x + x", "npapprox_probe_double")
    inc = cp.RawKernel(r'extern "C" __global__ void npapprox_probe_inc(float* a) { a[threadIdx.x] += 1.0f; }',
                       "npapprox_probe_inc")
    a = double(cp.arange(4, dtype=cp.float32))
    inc((1,), (4,), (a,))
    got = cp.asnumpy(a).tolist()
    if got != [1.0, 3.0, 5.0, 7.0]:
        raise RuntimeError(f"probe kernels computed {got}, expected [1.0, 3.0, 5.0, 7.0]")


def gpu_status() -> GpuStatus:
    """Whether the GPU can be used, and why not (computed once per process)."""
    global _gpu_state
    if _gpu_state is None:
        cp = _try_cupy()
        if cp is None:
            if _cupy_error is None or not cupy_installed():
                _gpu_state = GpuStatus(False, "not-installed", "CuPy is not installed: pip install 'npapprox[gpu]'")
            else:
                _gpu_state = GpuStatus(False, "import-failed", f"CuPy is installed but import cupy failed: "
                                                               f"{_describe(_cupy_error)}")
        else:
            try:
                count = cp.cuda.runtime.getDeviceCount()
            except Exception as e:  # no driver, or no device
                count, why = 0, _describe(e)
            else:
                why = "the CUDA runtime reports 0 devices"
            if count < 1:
                _gpu_state = GpuStatus(False, "no-device", f"no CUDA device ({why})")
            else:
                try:
                    _probe(cp)
                    _gpu_state = GpuStatus(True, "ok", f"{count} CUDA device(s)")
                except Exception as e:
                    _gpu_state = GpuStatus(False, "probe-failed",
                                           f"CuPy cannot compile or run a kernel ({_describe(e)}); "
                                           "pip install 'npapprox[gpu]' brings NVRTC and the CUDA headers")
    return _gpu_state


def gpu_available() -> bool:
    """True when CuPy imports, sees a CUDA device, and compiles and runs a kernel
    (``gpu_status().reason`` says why not)."""
    return gpu_status().available


def cupy():
    """The ``cupy`` module, for the few places that need CuPy itself (the CUDA
    kernels in ``npapprox.kernels.gpu``); a clear error when it is missing."""
    cp = _try_cupy()
    if cp is None:
        raise DeviceError(f"this needs CuPy and a CUDA GPU: {gpu_status().reason}") from _cupy_error
    return cp


def array_module(x):
    """``numpy`` for host arrays, ``cupy`` for device arrays."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    cp = _try_cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def on_gpu(x) -> bool:
    return array_module(x) is not np


def to_device(x, device: str):
    """Move an array to ``"cpu"`` or ``"gpu"`` (a no-op when already there)."""
    if device == "cpu":
        return x.get() if on_gpu(x) else x
    if device == "gpu":
        if on_gpu(x):
            return x
        status = gpu_status()
        if not status.available:
            raise DeviceError(f"device 'gpu' needs CuPy and a usable CUDA GPU: {status.reason}") from _cupy_error
        return _cupy.asarray(x)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def erf(x):
    """Elementwise error function on either backend (GELU needs it)."""
    if on_gpu(x):
        try:
            special = _import_quietly("cupyx.scipy.special")
        except Exception as e:
            raise DeviceError(f"erf on the GPU needs cupyx.scipy.special, which failed to import: "
                              f"{_describe(e)}") from e
        return special.erf(x)
    from scipy.special import erf as _erf
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
    from cupy.cuda import memory_hook

    tracker = _PoolPeak(cp.get_default_memory_pool())

    class _Hook(memory_hook.MemoryHook):
        name = "npapprox_pool_peak"

        def malloc_postprocess(self, **kwargs):
            tracker.sample()

    with _Hook():
        yield tracker
