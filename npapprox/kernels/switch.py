"""The one switch that forces the reference kernels everywhere.

Every dispatch point -- the storage kernels (:mod:`npapprox.kernels`), im2row /
row2im (:mod:`npapprox.kernels.im2col`), Winograd's transforms, the batch-norm
passes (:mod:`npapprox.kernels.bn`) and average pooling -- asks
:func:`reference_forced` (through :func:`compiled_applies` for the float kernels)
before picking a compiled implementation. The switch starts from the environment variable
``NPAPPROX_REFERENCE_KERNELS`` (``1``, ``true``, ``yes`` or ``on``; read once, at
import) and :func:`use_reference` flips it at run time. All implementations give
identical bytes, so the switch changes speed, never results (docs/kernels.md).
"""
from __future__ import annotations

import os

import numpy as np

from npapprox.backend import on_gpu

__all__ = ["ENV_VAR", "use_reference", "reference_forced", "compiled_applies"]

ENV_VAR = "NPAPPROX_REFERENCE_KERNELS"

_forced = os.environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def use_reference(flag: bool) -> None:
    """Force (``True``) or stop forcing (``False``) the reference kernels."""
    global _forced
    _forced = bool(flag)


def reference_forced() -> bool:
    """True while the reference kernels are forced."""
    return _forced


def compiled_applies(module, *arrays) -> bool:
    """True when the compiled extension ``module`` (None: not built) is to run on
    ``arrays``: all NumPy arrays in host memory (not a device array that subclasses
    one), the first float32 or float64, the reference not forced. Each dispatch
    point asks this with its own extension."""
    if module is None or _forced:
        return False
    for a in arrays:   # a plain ndarray is in host memory; a subclass may be a device array
        if type(a) is not np.ndarray and not (isinstance(a, np.ndarray) and not on_gpu(a)):
            return False
    return arrays[0].dtype in (np.float32, np.float64)
