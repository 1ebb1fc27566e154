"""The one switch that forces the reference kernels everywhere.

Every dispatch point -- the storage kernels (:mod:`npapprox.kernels`), im2row /
row2im (:mod:`npapprox.kernels.im2col`) and the batch-norm passes
(:mod:`npapprox.kernels.bn`) -- asks :func:`reference_forced` before picking a
compiled implementation. The switch starts from the environment variable
``NPAPPROX_REFERENCE_KERNELS`` (``1``, ``true``, ``yes`` or ``on``; read once, at
import) and :func:`use_reference` flips it at run time. All implementations give
identical bytes, so the switch changes speed, never results (docs/kernels.md).
"""
from __future__ import annotations

import os

__all__ = ["ENV_VAR", "use_reference", "reference_forced"]

ENV_VAR = "NPAPPROX_REFERENCE_KERNELS"

_forced = os.environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def use_reference(flag: bool) -> None:
    """Force (``True``) or stop forcing (``False``) the reference kernels."""
    global _forced
    _forced = bool(flag)


def reference_forced() -> bool:
    """True while the reference kernels are forced."""
    return _forced
