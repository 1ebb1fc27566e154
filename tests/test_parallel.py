"""npapprox.parallel: whole chunks per core, BLAS held to one thread meanwhile."""
import sys
import threading
import tracemalloc
import types

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import npapprox as na
from npapprox import parallel
from npapprox.ops import conv


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
    agrees to rounding."""
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
            par = run()
        with threadpool_limits(1, user_api="blas"):
            ser = run()
    finally:
        conv.CHUNK_BYTES = old
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
