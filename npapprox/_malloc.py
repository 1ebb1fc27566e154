"""Let the C allocator keep freed activation-sized blocks for reuse (glibc).

A training step allocates and frees activation-sized arrays (8 MiB for a
ResNet-20 stage-1 tensor at batch 128) dozens of times. With glibc's defaults a
freed block of that size often goes back to the kernel (``munmap``, or a heap
trim), and the next array of that size page-faults its way back in: zeroing
and mapping 2048 pages per 8 MiB, on every allocation. Raising the mmap
threshold to glibc's ceiling (32 MiB on 64-bit) and the trim threshold to 1
GiB keeps those blocks in the heap instead; a ResNet-20 step then ran 8-12%
faster on the development machine (``docs/architecture.md``, "Speed").
The cost: memory freed by the process is not returned to the kernel until it
exceeds 1 GiB at the top of the heap, so the resident size stays near its
high-water mark -- what a long training run has anyway. (Measured peaks are
unaffected: ``peak.measure_peak`` counts arrays, not pages.)

``import npapprox`` calls :func:`reuse_freed_memory` once. Nothing is changed
off Linux/glibc, when ``NPAPPROX_MALLOC=default``, or when the user already
tuned the allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``GLIBC_TUNABLES`` in the environment).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20                            # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def reuse_freed_memory(environ=os.environ, platform: str = sys.platform) -> bool:
    """Tune glibc's malloc as described above; True when it was done."""
    if not platform.startswith("linux") or environ.get("NPAPPROX_MALLOC", "").strip().lower() == "default":
        return False
    if any(name in environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
