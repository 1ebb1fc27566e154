"""One pool of worker threads for the CPU kernels: convolution chunks, storage kernels.

A convolution works on chunks of a few samples (``ops.conv``): im2row, one
tall GEMM, a transposing copy, row2im -- each call only a few hundred
microseconds long. Splitting every such call over the cores (OpenBLAS's
threads for the GEMM, OpenMP's for the Cython kernels) pays a hand-over between
two thread pools per call and leaves cores idle at the end of each. Here each
core instead takes whole chunks, with single-threaded kernels, so a chunk's
rows also stay in that core's own cache: a 3x3 conv forward+backward at batch
128 ran 29% / 19% / 11% faster at 16 / 32 / 64 channels on 2 cores (one
side-by-side measurement during development; see docs/architecture.md).

The number of workers is the number of threads NumPy's BLAS may use (read at
each call, so ``threadpoolctl.threadpool_limits`` applies). While the workers
run (a *parallel region*, one ``run`` call), BLAS is held to one thread and
every thread of the region runs the OpenMP kernels (BN, storage) on one thread:
the pool's threads are the only ones working, none of OpenMP's or OpenBLAS's
own compete with them for the cores. Inside a region ``workers()`` is 1, so a
kernel called from a worker (a BN pass rebuilding a conv chunk's input) runs
serially on that worker, and ``run`` there calls ``fn`` in order.

The workers are persistent threads. The hand-over in both directions is a
counter in memory (``npapprox._sync.Counter``): the caller advances a worker's
``go`` and the worker its ``done``, and the waiting side polls it with the GIL
released for up to SPIN_SECONDS; then a worker sleeps on a condition variable
(notified at each ``go``) and the caller checks every POLL_SECONDS. A blocked
thread is woken in tens of microseconds (a futex wake; on a virtual machine an
interrupt to a halted CPU), as long as one core's share of a BN pass; a polling
one sees the counter within a microsecond. The worker sets ``done`` after it has
released the GIL, so the caller never finds the GIL held by the worker it waited
for. The gaps between a step's regions are mostly under SPIN_SECONDS, so a
worker is usually still polling when the next region starts; one idle for longer
sleeps and costs no CPU.

Chunks are dealt to the workers round-robin (``deal``) and results come back in
worker order (``run``), so a run is deterministic for a given worker count. The
caller allocates every worker's buffers before ``run``, so a measured peak does
not depend on when each thread happens to start.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - a dependency; without it convolutions run serially
    ThreadpoolController = None

try:
    from npapprox._quant import omp_threads as _omp_threads
except ImportError:  # pragma: no cover - the extension not built: no OpenMP kernels either
    def _omp_threads(n=0):
        return 1


class _PlainCounter:
    """``npapprox._sync.Counter`` without polling, for a build without the extension:
    every wait gives up at once, so the waiting side blocks."""

    def __init__(self):
        self.value = 0

    def set(self, v):
        self.value = v

    def wait(self, v, seconds):
        return self.value == v

    def set_then_wait(self, v, other, w, seconds):
        self.value = v
        return other.value == w


try:
    from npapprox._sync import Counter
except ImportError:  # pragma: no cover - the extension not built
    Counter = _PlainCounter

#: how long a waiting side of the hand-over polls before it blocks (0: block at once,
#: for a machine shared with other busy processes). 1 ms covers 99% of the gaps
#: between a ResNet-20 step's regions on 2 cores (docs/architecture.md)
SPIN_SECONDS = 1e-3
#: then the caller checks a worker's ``done`` this often, asleep in between
POLL_SECONDS = 1e-4

_lock = threading.Lock()          # one parallel region at a time (it changes BLAS's thread count)
_blas = None                      # threadpoolctl controller of the BLAS libraries loaded (NumPy's,
_blas_seen = -1                   # SciPy's once imported, ...): rescanned when len(sys.modules) changed
_local = threading.local()        # .inside: this thread is running a region's fn
_workers: list = []               # _Worker k+1 at index k (the calling thread is worker 0)
_timing: dict | None = None       # while ``timing()`` runs: region name -> [seconds in run, seconds waiting]


def _blas_controller():
    global _blas, _blas_seen
    # a BLAS loaded after the first scan (SciPy's, by a later import) must be held to one thread too
    if ThreadpoolController is not None and (_blas is None or len(sys.modules) != _blas_seen):
        _blas_seen = len(sys.modules)
        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def inside() -> bool:
    """True in a thread that is running a parallel region's ``fn``."""
    return getattr(_local, "inside", False)


def omp_team() -> int:
    """Inside ``openmp_team(n)`` on this thread: ``n``; 0 elsewhere."""
    return getattr(_local, "team", 0)


@contextlib.contextmanager
def openmp_team(n: int):
    """Inside the block (on this thread) the kernels split by samples -- the paper
    kernels and BN's backward -- run each call as one OpenMP parallel region of ``n``
    threads started by this thread, not on the pool. For a host whose own work runs
    on this thread's OpenMP team: PyTorch's intra-op threads (the bridge). A process
    has one OpenMP runtime (``npapprox._quant.omp_library``) and a thread's regions
    all reuse its one pool of OpenMP threads, so these regions run on the threads
    torch's ops just used (still waiting for work) and no third thread competes with
    them for the cores. The bytes are the pool's (each range's results do not depend
    on the thread that computes them)."""
    n = max(1, int(n))
    prev, omp_before = omp_team(), _omp_threads(n)   # the count of the kernels' own prange loops
    _local.team = n
    try:
        yield
    finally:
        _local.team = prev
        _omp_threads(omp_before)


def workers(xp=np) -> int:
    """How many chunks run at once: the BLAS thread count on NumPy arrays (1: serial,
    also inside a parallel region and on CuPy arrays)."""
    if xp is not np or inside():
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


def run_ranges(fn, n: int, align: int = 1) -> list:
    """``[fn(b0, b1), fn(b1, b2), ...]``: ``[0, n)`` cut into one contiguous range per
    worker (at most; sizes differing by at most ``align``), every bound a multiple of
    ``align`` but the last, the calls running in parallel (``run``) -> the results in
    range order. Kernels split by samples use it (BN passes, the paper kernels)."""
    units = -(-n // align)
    w = max(1, min(workers(), units))
    bounds = [min(n, align * (units * k // w)) for k in range(w + 1)]
    return run(lambda k: fn(bounds[k], bounds[k + 1]), w)


#: arrays at least this large are added on all workers (``add``): below it a region's
#: hand-over costs more than the second core saves
ADD_MIN_BYTES = 1 << 20


def add(a, b, out=None):
    """``np.add(a, b, out=out)`` (``out=None``: a new array), samples (axis 0) split
    over the workers when a and b are NumPy arrays of one shape and dtype of at
    least ADD_MIN_BYTES and ``out`` is a, b or memory of neither; otherwise, and on
    CuPy arrays, NumPy's own ``np.add`` (which also handles a partly overlapping
    ``out``). Element-wise: the same bits however it is split."""
    if (type(a) is not np.ndarray or type(b) is not np.ndarray or a.shape != b.shape or a.dtype != b.dtype
            or a.ndim == 0 or a.nbytes < ADD_MIN_BYTES or workers() == 1
            or (out is not None and any(out is not v and np.may_share_memory(out, v) for v in (a, b)))):
        return a + b if out is None else np.add(a, b, out=out)
    out = np.empty_like(a) if out is None else out
    run_ranges(lambda i0, i1: np.add(a[i0:i1], b[i0:i1], out=out[i0:i1]), a.shape[0])
    return out


def _join(team):
    """Wait until every worker of ``team`` is done with its current region, even
    through a KeyboardInterrupt (returned, to be raised once they are: a worker left
    running would hand its result to the next region)."""
    interrupted = None
    for w in team:
        while not w.done.wait(w.regions, SPIN_SECONDS):
            try:
                time.sleep(POLL_SECONDS)
            except BaseException as e:  # KeyboardInterrupt in the wait: keep waiting
                interrupted = e
    return interrupted


class _Worker(threading.Thread):
    """Worker k of every region: waits for ``go`` to reach its next region number,
    runs ``fn(k)``, sets ``done`` to that number."""

    def __init__(self, k):
        super().__init__(name=f"npapprox-worker-{k}", daemon=True)
        self.k, self.fn, self.result, self.error = k, None, None, None
        self.regions = 0                       # regions handed to this worker (the caller's count)
        self.go, self.done, self.go_cond = Counter(), Counter(), threading.Condition()
        self.start()

    def run(self):
        _omp_threads(1)            # this thread's OpenMP kernels run on it alone, for good
        _local.inside = True
        region, started = 1, self.go.wait(1, SPIN_SECONDS)
        while True:
            if not started:        # idle longer than SPIN_SECONDS: sleep until the caller notifies
                with self.go_cond:
                    while self.go.value != region:
                        self.go_cond.wait()
            try:
                self.result, self.error = self.fn(self.k), None
            except BaseException as e:  # handed to the caller, which re-raises it
                self.result, self.error = None, e
            self.fn = None
            started = self.done.set_then_wait(region, self.go, region + 1, SPIN_SECONDS)
            region += 1


def _forget_workers():
    """In a forked child the workers do not exist: start new ones when needed."""
    global _lock
    _workers.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


@contextlib.contextmanager
def timing():
    """Inside the block, every parallel region adds to ``times[name]`` (``name``: the
    region function's qualified name) ``[seconds from its start to its end, seconds
    of those the calling thread waited for the other workers after its own share]``
    -> ``times``. What ``benchmarks/bench_pool.py`` prints: where the cores idle."""
    global _timing
    times = _timing = {}
    try:
        yield times
    finally:
        _timing = None


def run(fn, n: int) -> list:
    """``[fn(0), ..., fn(n-1)]``, the calls running in parallel (the calling
    thread runs ``fn(0)``) with BLAS and OpenMP held to one thread per worker;
    ``n = len(deal(...))``. Every call finishes before ``run`` returns or raises
    (the first exception in worker order). Inside a region (``fn`` calling
    ``run``) the calls run in order on the calling thread."""
    if n <= 1 or inside():
        return [fn(k) for k in range(n)]
    with _lock:
        while len(_workers) < n - 1:                  # threads for workers 1 .. n-1
            _workers.append(_Worker(len(_workers) + 1))
        libs = _blas_controller().lib_controllers if ThreadpoolController is not None else []
        omp_before = _omp_threads(1)               # set first, restored last: an OpenMP-threaded
        blas_before = [lib.num_threads for lib in libs]   # BLAS sets OpenMP's count too
        for lib in libs:
            lib.set_num_threads(1)
        _local.inside = True
        team = _workers[:n - 1]
        try:
            for w in team:
                w.fn, w.regions = fn, w.regions + 1
                w.go.set(w.regions)
                with w.go_cond:                       # wakes the worker if it sleeps
                    w.go_cond.notify()
            start = time.perf_counter()
            try:
                first, error = fn(0), None
            except BaseException as e:
                first, error = None, e
            joined = time.perf_counter()
            error = _join(team) or error              # none still runs when BLAS gets its threads back
            if _timing is not None:
                t = _timing.setdefault(getattr(fn, "__qualname__", repr(fn)), [0.0, 0.0])
                end = time.perf_counter()
                t[0] += end - start
                t[1] += end - joined
        finally:
            _local.inside = False
            for lib, t in zip(libs, blas_before, strict=True):
                lib.set_num_threads(t)
            _omp_threads(omp_before)
        error = error or next((w.error for w in team if w.error is not None), None)
        results = [first] + [w.result for w in team]
        for w in team:
            w.result = w.error = None
        if error is not None:
            raise error
        return results
