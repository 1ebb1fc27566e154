"""Checks of non-finite values that do not stall the GPU.

Reading a number computed on the GPU back to the host (``int(a)``, ``bool(a)``,
``a.item()``) waits for every kernel queued before it. The storage policies count
non-finite values at every pack, and backward checks the loss; on the GPU those
counts stay on the device: :func:`nonfinite` keeps them, and :func:`flush` (called
once at the end of ``Tensor.backward``, the defined point) reads them all back in
one transfer and raises ``FloatingPointError`` for the first non-zero one. On the
CPU the count is a host integer and :func:`nonfinite` raises at once.

So on the GPU a diverged forward pass is reported at the end of the backward that
follows it (its gradients are then garbage, but no optimizer step has used them),
with the same message as on the CPU. Counts of a forward pass that no backward
follows are read at the next flush (or once ``MAX_PENDING`` of them wait).
"""
from __future__ import annotations

import numpy as np

from .backend import array_module, to_device

#: device counts not read yet: (0-d integer array, message(n) -> str)
_pending: list = []
#: read back early when this many are pending (forward passes without a backward)
MAX_PENDING = 512


def nonfinite(count, message) -> None:
    """``count`` values were non-finite; ``message(count)`` is the error. A host
    integer raises now when non-zero; a device array is kept for :func:`flush`."""
    if array_module(count) is np:
        n = int(count)
        if n:
            raise FloatingPointError(message(n))
        return
    _pending.append((count, message))
    if len(_pending) >= MAX_PENDING:
        flush()


def flush() -> None:
    """Read every pending device count back (one transfer) and raise for the first non-zero."""
    if not _pending:
        return
    items = list(_pending)
    _pending.clear()
    xp = array_module(items[0][0])
    counts = to_device(xp.stack([xp.asarray(c, dtype=np.int64).reshape(()) for c, _ in items]), "cpu")
    for n, (_, message) in zip(counts.tolist(), items, strict=True):
        if n:
            raise FloatingPointError(message(int(n)))


def pending() -> int:
    """How many device counts wait for :func:`flush`."""
    return len(_pending)
