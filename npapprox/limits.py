"""How much memory this machine can still give, and byte counts for messages.

``available_memory()`` is what size checks compare against before allocating:
``MemAvailable`` of /proc/meminfo (free memory plus what the kernel can reclaim),
lowered to what a cgroup v2 memory limit leaves (``memory.max`` minus
``memory.current``, as in a container); elsewhere the machine's physical memory.
"""
from __future__ import annotations

import os

_CGROUP = "/sys/fs/cgroup"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None      # "max": no limit
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes this process can still allocate (see the module docstring)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return 2 ** 62                                 # unknown: no limit
    limit, used = _read_int(f"{_CGROUP}/memory.max"), _read_int(f"{_CGROUP}/memory.current")
    if limit is not None and used is not None:
        avail = min(avail, max(limit - used, 0))
    return avail


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units up to EiB)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} EiB"


__all__ = ["available_memory", "fmt_bytes"]
