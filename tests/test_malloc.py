"""npapprox._malloc: freed activation-sized blocks are reused instead of page-faulting back in."""
import os
import subprocess
import sys

import pytest

from npapprox._malloc import reuse_freed_memory

# four 8 MiB arrays made and freed 20 times; prints the minor page faults this took
CYCLES = """
import npapprox, numpy as np, resource
def cycle():
    a = [np.ones(2 << 20, np.float32) for _ in range(4)]
    return sum(float(x[::4096].sum()) for x in a)
cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NPAPPROX_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", CYCLES], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tuning is for glibc (Linux) only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 20 * 4 * (8 << 20) // 4096          # what mapping every array afresh costs
    tuned, default = _faults(), _faults(NPAPPROX_MALLOC="default")
    assert default > pages // 8, "glibc's defaults should give pages back (the problem being solved)"
    assert tuned < pages // 100


def test_when_nothing_is_changed():
    assert reuse_freed_memory(environ={}, platform="darwin") is False
    assert reuse_freed_memory(environ={"NPAPPROX_MALLOC": "default"}, platform="linux") is False
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        assert reuse_freed_memory(environ={name: "1"}, platform="linux") is False
