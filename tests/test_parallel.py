"""npapprox.parallel: whole chunks per core, BLAS held to one thread meanwhile."""
import multiprocessing as mp
import os
import sys
import threading
import time
import tracemalloc
import types

import numpy as np
import pytest
from conftest import require_openmp
from threadpoolctl import threadpool_info, threadpool_limits

import npapprox as na
from npapprox import _quant, _sync, parallel
from npapprox.kernels import bn, cpu, reference
from npapprox.ops import conv
from npapprox.quant import paper_params


def _blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_chunks_dealt_round_robin_results_in_worker_order():
    with threadpool_limits(2, user_api="blas"):
        assert parallel.workers() == 2
        shares = parallel.deal(list(range(7)))
        seen = []
        out = parallel.run(lambda k: (seen.append(threading.get_ident()), shares[k])[1], len(shares))
    assert shares == out == [[0, 2, 4, 6], [1, 3, 5]]
    assert len(set(seen)) == 2 and threading.get_ident() in seen   # the caller is worker 0


def test_blas_held_to_one_thread_inside_and_restored_after(monkeypatch):
    # parallel holds the BLAS libraries loaded at its first use; start afresh, so that one an earlier
    # test loaded after that use (SciPy's, through scikit-learn) is among them
    monkeypatch.setattr(parallel, "_blas", None)
    with threadpool_limits(2, user_api="blas"):   # every BLAS loaded (NumPy's, maybe SciPy's, ...)
        before = _blas_threads()
        inside = parallel.run(lambda k: _blas_threads(), 2)
        assert len(inside) == 2 and all(t == 1 for ts in inside for t in ts)
        assert _blas_threads() == before == [2] * len(before)


def test_one_blas_thread_means_serial():
    with threadpool_limits(1, user_api="blas"):
        assert parallel.workers() == 1
        assert parallel.deal([0, 1, 2]) == [[0, 1, 2]]
    assert parallel.deal([5]) == [[5]]                    # one chunk: nothing to share
    assert parallel.run(lambda k: threading.get_ident(), 1) == [threading.get_ident()]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_worker_raises_after_every_worker_finished(failing):
    done = []

    def fn(k):
        if k == failing:
            raise RuntimeError("boom")
        done.append(k)
        return k

    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(RuntimeError, match="boom"):
            parallel.run(fn, 2)
        assert done == [1 - failing] and set(_blas_threads()) == {2}


def test_conv_parallel_equals_serial():
    """Each chunk is computed the same way whichever core runs it: y and gx are
    bit-identical to a serial run; gw adds the workers' partial sums, so it
    agrees to rounding. Runs with the same worker count are bit-identical, gw
    too (the partials are added in worker order)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((40, 16, 6, 6)).astype(np.float32)

    def run():
        xt, wt = na.Tensor(x, requires_grad=True), na.Tensor(w, requires_grad=True)
        y = na.ops.conv2d(xt, wt, stride=2, padding=1)
        y.backward(gy)
        return y.data, xt.grad, wt.grad

    old, conv.CHUNK_BYTES = conv.CHUNK_BYTES, 4096          # many chunks
    try:
        with threadpool_limits(2, user_api="blas"):
            par, again = run(), run()
        with threadpool_limits(1, user_api="blas"):
            ser = run()
    finally:
        conv.CHUNK_BYTES = old
    assert [a.tobytes() for a in par] == [a.tobytes() for a in again]
    assert np.array_equal(par[0], ser[0]) and np.array_equal(par[1], ser[1])
    np.testing.assert_allclose(par[2], ser[2], rtol=1e-5, atol=1e-4)


def test_measured_peak_does_not_depend_on_when_workers_start(monkeypatch):
    """Every worker's buffers exist before any worker runs: a worker that starts
    late (here: after worker 0 returned) does not lower the measured peak."""

    rng = np.random.default_rng(0)
    x = na.Tensor(rng.standard_normal((32, 16, 16, 16)).astype(np.float32), requires_grad=True)
    w = na.Tensor(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), requires_grad=True)
    gy = rng.standard_normal((32, 16, 16, 16)).astype(np.float32)

    def peaks():
        out = []
        for step in ("forward", "backward"):
            tracemalloc.start()
            if step == "forward":
                y = na.ops.conv2d(x, w, padding=1)
            else:
                y.backward(gy)
            out.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        return out

    done = threading.Event()

    def late(fn, n):   # worker k > 0 starts only once worker 0 has returned
        def wrapped(k):
            if k:
                done.wait()
            out = fn(k)
            if k == 0:
                done.set()
            return out
        done.clear()
        return parallel.run(wrapped, n)

    with threadpool_limits(2, user_api="blas"):
        normal = peaks()
        monkeypatch.setattr(conv, "run", late)
        delayed = peaks()
    workspace = 16 * 16 * 144 * 4        # one sample's rows: each worker holds several
    assert all(abs(a - b) < workspace for a, b in zip(normal, delayed, strict=True)), (normal, delayed)


def test_a_blas_loaded_after_the_first_scan_is_found(monkeypatch):
    """The BLAS libraries are rescanned once new modules were imported (SciPy's
    OpenBLAS arrives with its import, after the first convolution scanned)."""

    monkeypatch.setattr(parallel, "_blas", parallel._blas_controller().select(user_api="none"))
    assert parallel._blas_controller().lib_controllers == []           # nothing new imported: cached
    monkeypatch.setitem(sys.modules, "_npapprox_test_new_module", types.ModuleType("m"))
    assert parallel._blas_controller().lib_controllers                 # rescanned


def _in_thread(fn, timeout=30):
    """fn() in a thread; fails (instead of hanging the suite) when it does not return in time."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "parallel.run hung"
    return out


def test_a_worker_exception_propagates_without_hanging_and_the_pool_still_works():
    def fn(k):
        if k == 1:
            raise ValueError(f"worker {k} failed")
        return k

    with threadpool_limits(2, user_api="blas"):
        got = _in_thread(lambda: parallel.run(fn, 2))
        assert isinstance(got.get("error"), ValueError) and "worker 1 failed" in str(got["error"])
        assert _in_thread(lambda: parallel.run(lambda k: 10 * k, 2))["value"] == [0, 10]   # next region


def test_the_first_exception_in_worker_order_is_raised():
    def fn(k):
        raise RuntimeError(f"w{k}")

    with threadpool_limits(2, user_api="blas"), pytest.raises(RuntimeError, match="w0"):
        parallel.run(fn, 2)


def test_inside_a_region_kernels_and_nested_runs_are_serial():
    """Every thread of a region runs OpenMP kernels on one thread (no second pool
    per worker competing for the cores), sees one worker, and a nested run calls
    fn in order on its own thread; all is restored after the region."""
    def probe(k):
        nested = parallel.run(lambda j: (j, threading.get_ident()), 3)
        return _quant.omp_threads(), parallel.workers(), parallel.inside(), nested, threading.get_ident()

    before = _quant.omp_threads()
    with threadpool_limits(2, user_api="blas"):
        out = parallel.run(probe, 2)
        assert parallel.workers() == 2 and not parallel.inside()
    for omp, wk, ins, nested, ident in out:
        assert (omp, wk, ins) == (1, 1, True)
        assert nested == [(0, ident), (1, ident), (2, ident)]
    assert _quant.omp_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_starts_its_own_workers():
    with threadpool_limits(2, user_api="blas"):
        parallel.run(lambda k: k, 2)                        # the parent's workers exist
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=lambda: q.put(parallel.run(lambda k: k + 1, 2)))
        p.start()
        p.join(30)
        alive = p.is_alive()
        if alive:
            p.kill()
        assert not alive and p.exitcode == 0
        assert q.get(timeout=5) == [1, 2]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_paper_kernels_on_the_pool_give_the_references_bytes(bits):
    """A tensor big enough for the pool (kernels.cpu.POOL_MIN), with samples that
    do not end on a byte below 8 bits (12321 values each): the workers' sample ranges start on
    a byte, and the bytes, decoded values and mask equal the reference's
    (non-finite inputs counted across the ranges)."""
    rng = np.random.default_rng(bits)
    shape = (67, 3, 37, 111)
    assert shape[0] * np.prod(shape[1:]) >= cpu.POOL_MIN and (bits == 8 or (np.prod(shape[1:]) * bits) % 8)
    y = rng.standard_normal(shape).astype(np.float32)
    y[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
    y[-1, -1, -1, -1] = np.nan
    p = paper_params(np.array([1.0, -0.5, 0.0], np.float32), np.array([0.1, 0.0, 2.0], np.float32), bits)
    want, want_nf = reference.paper_pack(y, p["k"], p["s"], bits)
    with threadpool_limits(2, user_api="blas"):
        assert parallel.workers() == 2
        got, nf = cpu.paper_pack(y, p["k"], p["s"], bits)
        assert got.tobytes() == want.tobytes() and nf == want_nf == 4
        for relu in (False, True):
            dec = cpu.paper_decode(got, shape, p["s"], p["x_step"], p["x_off"], bits, relu=relu)
            ref = reference.paper_decode(want, shape, p["s"], p["x_step"], p["x_off"], bits, relu=relu)
            assert dec.tobytes() == ref.tobytes()
        assert np.array_equal(cpu.paper_mask(got, shape, p["s"], bits), reference.paper_mask(want, shape, p["s"], bits))


@pytest.mark.parametrize("n, rows, k", [(128, 64, 576), (128, 1024, 144), (37, 100, 27), (3, 1024, 144), (1, 8, 8)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunk_plan_balances_the_workers(n, rows, k, threads):
    """Every sample in exactly one chunk, in order; chunks within the byte budget
    (or one sample), sizes differing by at most one; the workers' sample totals
    differ by at most one (ResNet-20's 64-channel 8x8 conv at batch 128 used to
    give one worker 70 samples and the other 58)."""
    with threadpool_limits(threads, user_api="blas"):
        shares, m = conv.chunk_plan(n, rows, k, 4, np)
    flat = sorted((s for share in shares for s in share), key=lambda s: s.start)
    assert [s.start for s in flat] == [0] + [s.stop for s in flat[:-1]] and flat[-1].stop == n
    sizes = [s.stop - s.start for s in flat]
    assert max(sizes) - min(sizes) <= 1 and m == max(sizes) * rows
    assert max(sizes) == 1 or max(sizes) * rows * k * 4 <= conv.CHUNK_BYTES
    totals = [sum(s.stop - s.start for s in share) for share in shares]
    assert len(shares) == min(threads, n) and max(totals) - min(totals) <= 1


def test_an_interrupt_in_the_calling_thread_waits_for_the_workers():
    """Ctrl-C while worker 0 (the caller) runs: ``run`` raises it only once the
    other workers are done, so none is left running into the next region (whose
    results it would otherwise hand back)."""
    finished = threading.Event()

    def fn(k):
        if k == 0:
            raise KeyboardInterrupt
        finished.wait(0.2)          # still running when worker 0 is interrupted
        finished.set()
        return k

    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(KeyboardInterrupt):
            parallel.run(fn, 2)
        assert finished.is_set()
        assert parallel.run(lambda k: -k, 2) == [0, -1]


def test_timing_counts_each_regions_time_and_the_callers_wait():
    """``parallel.timing``: a region whose worker 1 sleeps 30 ms after worker 0 is done
    counts about 30 ms of waiting, within the region's own time; single-worker calls
    (no region) and calls outside the block are not counted."""
    def slow_second(k):
        if k == 1:
            time.sleep(0.03)
        return k

    with threadpool_limits(2, user_api="blas"):
        parallel.run(slow_second, 2)                    # outside the block
        with parallel.timing() as times:
            for _ in range(3):
                parallel.run(slow_second, 2)
            parallel.run(slow_second, 1)                # serial: no region
        parallel.run(slow_second, 2)
    name = slow_second.__qualname__
    assert list(times) == [name]
    region, wait = times[name]
    assert 0.085 <= wait <= region < 0.09 + 0.5, (region, wait)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_splits_large_arrays_and_gives_numpys_bits(monkeypatch, threads):
    """parallel.add == np.add bit for bit (out of place and in place); large NumPy arrays of
    one shape go through a region of min(threads, samples) workers, small or mixed ones not."""
    rng = np.random.default_rng(threads)
    a = rng.standard_normal((6, 3, 128, 128)).astype(np.float32)     # 1.1 MiB
    b = rng.standard_normal(a.shape).astype(np.float32)
    b.flat[::5] = -0.0
    calls = []
    real_run = parallel.run
    monkeypatch.setattr(parallel, "run", lambda fn, n: calls.append(n) or real_run(fn, n))
    with threadpool_limits(threads, user_api="blas"):
        got = parallel.add(a, b)
        inplace = a.copy()
        parallel.add(inplace, b, out=inplace)
        small = parallel.add(a[:, :, :4], b[:, :, :4])               # under ADD_MIN_BYTES
        mixed = parallel.add(a, b.astype(np.float64))                # dtypes differ: NumPy's promotion
    assert got.tobytes() == np.add(a, b).tobytes() == inplace.tobytes()
    assert small.tobytes() == np.add(a[:, :, :4], b[:, :, :4]).tobytes()
    assert mixed.dtype == np.float64 and mixed.tobytes() == (a + b.astype(np.float64)).tobytes()
    assert a.nbytes >= parallel.ADD_MIN_BYTES
    assert calls == ([] if threads == 1 else [min(threads, a.shape[0])] * 2)


def test_add_into_a_partly_overlapping_out_is_numpys(monkeypatch):
    """An ``out`` that overlaps an input without being it is not split (one worker's writes
    could land where another still reads): np.add, with NumPy's overlap handling, does it."""
    buf = np.random.default_rng(0).standard_normal((7, 3, 128, 128)).astype(np.float32)
    a, b = buf[1:].copy(), buf[:-1]
    want = buf.copy()
    np.add(a, want[:-1], out=want[1:])
    calls = []
    real_run = parallel.run
    monkeypatch.setattr(parallel, "run", lambda fn, n: calls.append(n) or real_run(fn, n))
    with threadpool_limits(2, user_api="blas"):
        parallel.add(a, b, out=buf[1:])
        parallel.add(a, a.copy(), out=a)                          # out is an input: split
    assert buf.tobytes() == want.tobytes()
    assert calls == [2]


def _cpu_seconds_by_thread():
    """{native thread id: seconds on a CPU} of this process's threads (/proc schedstat, ns)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) * 1e-9
        except OSError:          # a thread that ended meanwhile
            continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_openmp_team_runs_the_kernels_on_the_callers_openmp_threads_with_the_same_bytes(monkeypatch):
    """Inside ``openmp_team(2)`` (the PyTorch bridge's CPU kernels) the paper kernels and
    BN's backward from codes never use the pool: each call is a parallel region on the
    calling thread's OpenMP threads -- the ones its first region started (in the bridge,
    torch's): no thread starts after that, and one besides the caller does a share of the
    work (half of BN's backward). Their bytes equal the pool's and one thread's; the
    OpenMP count is restored."""
    require_openmp()
    rng = np.random.default_rng(0)
    shape, bits = (32, 16, 64, 64), 4
    gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    inv_sigma = rng.uniform(0.5, 2, 16).astype(np.float32)
    p = paper_params(gamma, beta, bits)
    y, gy = rng.standard_normal((2,) + shape).astype(np.float32)

    def backward(packed):
        src = bn.BNSource(None, codes=(packed, shape, p["s"], p["x_step"], p["x_off"], bits))
        return list(bn.bn_backward(bn.as_ncm(gy), src, gamma, inv_sigma))

    def kernels():
        packed, _ = cpu.paper_pack(y, p["k"], p["s"], bits)
        h = cpu.paper_decode(packed, shape, p["s"], p["h_step"], p["h_off"], bits, relu=True)
        return [packed, h, *backward(packed)]

    with threadpool_limits(1, user_api="blas"):
        one = kernels()
    with threadpool_limits(2, user_api="blas"):
        pool = kernels()
        workers = {t.native_id for t in threading.enumerate() if t.name.startswith("npapprox-worker")}
        assert workers
        omp_before = _quant.omp_threads()
        monkeypatch.setattr(parallel, "run", lambda fn, n: pytest.fail("the pool ran inside openmp_team"))
        with parallel.openmp_team(2):
            assert parallel.omp_team() == 2 and _quant.omp_threads() == 2
            team = kernels()                             # the caller's OpenMP threads exist from here
            before = _cpu_seconds_by_thread()
            again = [backward(team[0]) for _ in range(10)]   # BN's backward splits its rows evenly
            after = _cpu_seconds_by_thread()
        assert parallel.omp_team() == 0 and _quant.omp_threads() == omp_before
    assert set(after) == set(before)                      # no thread started
    gained = {t: after[t] - before[t] for t in after}
    others = sum(s for t, s in gained.items() if t != threading.get_native_id() and t not in workers)
    assert others >= 0.25 * sum(gained.values()) > 0, gained
    assert all(gained[t] < 1e-3 for t in workers), gained
    for a, b, c in zip(one, pool, team, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    assert all(a.tobytes() == b.tobytes() for grads in again for a, b in zip(grads, team[2:], strict=True))


def test_counter_wait_sees_a_value_set_by_another_thread_and_times_out_otherwise():
    """``_sync.Counter``: ``wait`` polls with the GIL released (another thread's ``set``
    ends it), gives up after its time (False), and with no time only reads the value;
    ``set_then_wait`` stores before it polls the other counter."""
    c, other = _sync.Counter(), _sync.Counter()
    assert c.value == 0 and c.wait(0, 0.0) and not c.wait(1, 0.0)
    t0 = time.perf_counter()
    assert not c.wait(1, 0.02)
    assert time.perf_counter() - t0 >= 0.02
    setter = threading.Timer(0.01, lambda: c.set(7))
    setter.start()
    assert c.wait(7, 30.0) and c.value == 7          # the setter ran while this thread polled
    setter.join()
    seen = []
    t = threading.Thread(target=lambda: seen.append(other.wait(3, 30.0) and c.value))
    t.start()
    assert not c.set_then_wait(8, other, 9, 0.0)      # stored, then one look at `other`
    other.set(3)
    t.join(30)
    assert seen == [8] and c.value == 8


@pytest.mark.parametrize("spin", [0.0, 1e-4, parallel.SPIN_SECONDS])
def test_every_hand_over_path_gives_each_region_its_own_results(monkeypatch, spin):
    """Regions back to back (the worker still polling), after idle gaps longer than
    the poll (the worker asleep on its condition), with a worker slower than the
    poll (the caller's sleeping checks), and with fewer workers than the pool holds:
    every region returns its own calls' results, in worker order."""
    monkeypatch.setattr(parallel, "SPIN_SECONDS", spin)
    rng = np.random.default_rng(0)
    with threadpool_limits(3, user_api="blas"):
        for r in range(60):
            n = int(rng.integers(2, 4))
            nap = float(rng.choice([0.0, 0.0, 0.002]))

            def fn(k, r=r, n=n, nap=nap):
                if k == n - 1:
                    time.sleep(nap)              # the last worker may finish well after the caller
                return (r, k, parallel.inside())

            assert _in_thread(lambda n=n, fn=fn: parallel.run(fn, n))["value"] == [(r, k, True) for k in range(n)]
            if rng.random() < 0.2:
                time.sleep(0.003)                # idle: longer than every poll above but the default


def test_the_pool_works_without_the_compiled_counter(monkeypatch):
    """Without ``npapprox._sync`` (the extension not built) nobody polls: every
    wait blocks at once, and the regions still hand back their results."""
    monkeypatch.setattr(parallel, "Counter", parallel._PlainCounter)
    parallel._forget_workers()                   # new workers, with plain counters
    try:
        with threadpool_limits(2, user_api="blas"):
            for r in range(20):
                assert _in_thread(lambda r=r: parallel.run(lambda k: (r, k), 2))["value"] == [(r, 0), (r, 1)]
    finally:
        parallel._forget_workers()               # the next test's workers use the compiled counter
