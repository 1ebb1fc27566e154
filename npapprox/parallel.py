"""Chunk-level parallelism for the convolution's CPU path.

A convolution works on chunks of a few samples (``ops.conv``): im2row, one
tall GEMM, a transposing copy, row2im -- each call only a few hundred
microseconds long. Splitting every such call over the cores (OpenBLAS's
threads for the GEMM, OpenMP's for the Cython kernels) pays a hand-over between
two thread pools per call and leaves cores idle at the end of each. Here each
core instead takes whole chunks, with single-threaded kernels, so a chunk's
rows also stay in that core's own cache: a 3x3 conv forward+backward at batch
128 ran 29% / 19% / 11% faster at 16 / 32 / 64 channels on 2 cores (one
side-by-side measurement during development; see docs/architecture.md).

The number of workers is the number of threads NumPy's BLAS may use (read with
threadpoolctl at each call, so ``threadpoolctl.threadpool_limits`` applies);
while the workers run, BLAS is held to one thread. Chunks are dealt to the
workers round-robin (``deal``) and results come back in worker order (``run``),
so a run is deterministic for a given worker count. The caller allocates every
worker's buffers before ``run``, so a measured peak does not depend on when
each thread happens to start.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - a dependency; without it convolutions run serially
    ThreadpoolController = None

_lock = threading.Lock()          # one parallel region at a time changes BLAS's thread count
_blas = None                      # threadpoolctl controller of the BLAS libraries loaded (NumPy's,
_blas_seen = -1                   # SciPy's once imported, ...): rescanned when len(sys.modules) changed
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _blas_controller():
    global _blas, _blas_seen
    # a BLAS loaded after the first scan (SciPy's, by a later import) must be held to one thread too
    if ThreadpoolController is not None and (_blas is None or len(sys.modules) != _blas_seen):
        _blas_seen = len(sys.modules)
        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def workers(xp=np) -> int:
    """How many chunks run at once: the BLAS thread count on NumPy arrays (1: serial)."""
    if xp is not np:
        return 1
    blas = _blas_controller()
    if blas is None or not blas.lib_controllers:
        return 1
    return max(1, min(lib.num_threads for lib in blas.lib_controllers))


def deal(chunks: list, xp=np) -> list:
    """``chunks`` dealt round-robin to ``min(workers(xp), len(chunks))`` workers:
    one list of chunks per worker (a single list on CuPy arrays or one core)."""
    n = max(1, min(workers(xp), len(chunks)))
    return [chunks[k::n] for k in range(n)]


def run(fn, n: int) -> list:
    """``[fn(0), ..., fn(n-1)]``, the calls running in parallel (the calling
    thread runs ``fn(0)``) with BLAS held to one thread; ``n = len(deal(...))``.
    Not reentrant: ``fn`` must not call ``run``."""
    if n <= 1:
        return [fn(0)]
    global _pool, _pool_size
    with _lock:
        if _pool_size < n - 1:                        # threads for workers 1 .. n-1
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="npapprox-conv")
            _pool_size = n - 1
        with _blas_controller().limit(limits=1):
            futures = [_pool.submit(fn, k) for k in range(1, n)]
            try:
                first = fn(0)
            finally:
                wait(futures)                         # none still runs when BLAS gets its threads back
            return [first] + [f.result() for f in futures]
