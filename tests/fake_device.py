"""A counting stand-in for CuPy, on the CPU: what a step reads back from the device.

On a GPU every ``int(a)``, ``float(a)``, ``bool(a)``, ``a.item()``, ``a.get()``,
``a.tolist()`` of a device array copies it to the host and waits for every kernel
queued before it (a device-to-host sync). ``DeviceArray`` is a NumPy array that
behaves like a CuPy array where it matters here (reductions, indexing and
``count_nonzero`` give 0-d arrays, not host scalars; NumPy functions applied to it
give DeviceArrays, like CuPy's ``__array_function__``) and counts each of those
calls in ``SYNCS``. ``install(monkeypatch)`` makes it the backend's "cupy" module,
so ``array_module`` / ``on_gpu`` / the kernel dispatch treat DeviceArrays as
device arrays; the CUDA kernels then run through a launcher given by the test
(the host build of quant.cu, tests/support.py).
"""
from __future__ import annotations

import collections
import traceback
import types

import numpy as np

from npapprox import backend

#: where each sync came from: "kind file:line" -> count (cleared by ``reset``)
SYNCS: collections.Counter = collections.Counter()
#: host -> device copies through ``FakeCupy.asarray`` (cleared by ``reset``)
UPLOADS = [0]


def reset() -> None:
    SYNCS.clear()
    UPLOADS[0] = 0


def total() -> int:
    return sum(SYNCS.values())


def _count(kind: str) -> None:
    for frame in reversed(traceback.extract_stack(limit=8)[:-2]):
        if "fake_device" not in frame.filename and "/numpy/" not in frame.filename:
            SYNCS[f"{kind} {frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno}"] += 1
            return
    SYNCS[kind] += 1


def dev(r):
    """``r`` (array, NumPy scalar, Python number, or a tuple / list of them) as device arrays."""
    if isinstance(r, DeviceArray):
        return r
    if isinstance(r, np.ndarray):
        return r.view(DeviceArray)
    if isinstance(r, (np.generic, bool, int, float)):
        return np.asarray(r).view(DeviceArray)
    if isinstance(r, (tuple, list)):
        return type(r)(dev(v) for v in r)
    return r


class DeviceArray(np.ndarray):
    """A NumPy array playing a CuPy array; reading it on the host counts a sync."""

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return arr.view(DeviceArray)                  # 0-d results stay arrays, as in CuPy

    def __array_function__(self, func, types_, args, kwargs):
        return dev(super().__array_function__(func, types_, args, kwargs))

    def __getitem__(self, key):
        return dev(super().__getitem__(key))

    def __setitem__(self, key, value):
        if isinstance(key, np.ndarray) and key.dtype == np.bool_:
            _count("mask-setitem")                    # CuPy counts the mask's True values on the host
        super().__setitem__(key, value)

    def __bool__(self):
        _count("bool")
        return super().__bool__()

    def __int__(self):
        _count("int")
        return super().__int__()

    def __float__(self):
        _count("float")
        return super().__float__()

    def __index__(self):
        _count("index")
        return super().__index__()

    def item(self, *args):
        _count("item")
        return super().item(*args)

    def tolist(self):
        _count("tolist")
        return super().tolist()

    def get(self):
        _count("get")
        return np.asarray(self).view(np.ndarray).copy()

    @property
    def device(self):
        return _DEVICE


def _reduction(name):
    def method(self, *args, **kwargs):
        return dev(getattr(np.ndarray, name)(self, *args, **kwargs))
    method.__name__ = name
    return method


for _name in ("sum", "min", "max", "all", "any", "mean", "prod", "argmax", "argmin", "std", "var"):
    setattr(DeviceArray, _name, _reduction(_name))


class _Device:
    """``array.device``: entering it is recorded (kernels must launch on the arrays' device)."""

    def __init__(self):
        self.entered = 0
        self.active = 0

    def __enter__(self):
        self.entered += 1
        self.active += 1
        return self

    def __exit__(self, *exc):
        self.active -= 1


_DEVICE = _Device()


class FakeCupy(types.ModuleType):
    """``numpy`` whose functions return DeviceArrays (``ndarray`` is DeviceArray)."""

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("fake_cupy")

    def __getattr__(self, name):
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type):
            def call(*args, **kwargs):
                return dev(obj(*args, **kwargs))
            return call
        return obj

    @staticmethod
    def asarray(a, dtype=None):
        if not isinstance(a, DeviceArray):
            UPLOADS[0] += 1                           # host -> device (from pageable memory it may wait too)
        return dev(np.asarray(a, dtype=dtype))

    @staticmethod
    def asnumpy(a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)


def install(monkeypatch) -> FakeCupy:
    """Make a FakeCupy the backend's CuPy for the test (``monkeypatch`` undoes it)."""
    fake = FakeCupy()
    monkeypatch.setattr(backend, "_cupy", fake)
    monkeypatch.setattr(backend, "_cupy_tried", True)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_gpu_state", backend.GpuStatus(True, "ok", "fake device (tests/fake_device.py)"))
    reset()
    _DEVICE.entered = _DEVICE.active = 0
    return fake

