"""The backward walk: fan-out accumulation, no_grad, freeing saved state, deep graphs,
double backward (also through a shared sub-graph), detach, Context.save's declaration
check, per-thread policy / grad mode / module stacks."""
from __future__ import annotations

import gc
import threading
import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import npapprox
from npapprox import Function, Tensor, no_grad, ops, parallel
from npapprox.policy import ACTIVATION, Exact, storage_policy
from npapprox.storage import GenericPacked, SharedRef


# --------------------------------------------------------------------------- #
# Fan-out ("diamond") accumulation
# --------------------------------------------------------------------------- #
def test_diamond_fan_out_accumulates():
    # tinygrad's diamond: x feeds two branches that join again
    #   L = sum(tanh(x) * sigmoid(x) + x)
    # dL/dx = (1 - t^2) s + t s (1 - s) + 1
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((3, 4))
    x = Tensor(xv, requires_grad=True)
    a, b = ops.tanh(x), ops.sigmoid(x)
    ops.sum_all(ops.add(ops.mul(a, b), x)).backward()
    t, s = np.tanh(xv), 1 / (1 + np.exp(-xv))
    np.testing.assert_allclose(x.grad, (1 - t**2) * s + t * s * (1 - s) + 1, rtol=1e-12, atol=1e-14)


def test_intermediate_used_by_several_consumers():
    # y = tanh(x) (a non-leaf) feeds three consumers: L = sum(y*y + 3y) + sum(relu(y))
    rng = np.random.default_rng(1)
    xv = rng.standard_normal(50)
    x = Tensor(xv, requires_grad=True)
    y = ops.tanh(x)
    loss = ops.add(ops.sum_all(ops.add(ops.mul(y, y), y * 3.0)), ops.sum_all(ops.relu(y)))
    loss.backward()
    t = np.tanh(xv)
    np.testing.assert_allclose(x.grad, (2 * t + 3 + (t > 0)) * (1 - t**2), rtol=1e-12)


@pytest.mark.parametrize("op,expected", [(ops.mul, lambda v: 2 * v), (ops.add, lambda v: 2 + 0 * v)],
                         ids=["mul(x,x)", "add(x,x)"])
def test_leaf_used_twice_in_one_op(op, expected):
    xv = np.array([[-1.5, 0.25], [2.0, 3.0]])
    x = Tensor(xv, requires_grad=True)
    ops.sum_all(op(x, x)).backward()
    np.testing.assert_array_equal(x.grad, expected(xv))


def test_conv_input_shared_by_two_convs():
    # the projection-shortcut pattern: one h read by two convs, summed
    rng = np.random.default_rng(2)
    h = Tensor(rng.standard_normal((2, 3, 5, 5)), requires_grad=True)
    w1, w2 = rng.standard_normal((4, 3, 1, 1)), rng.standard_normal((4, 3, 1, 1))
    ops.sum_all(ops.add(ops.conv2d(h, w1), ops.conv2d(h, w2))).backward()
    # d/dh sum(conv1x1(h, w)) = sum_f w[f, c] at every position
    expected = np.broadcast_to((w1 + w2).sum(axis=0)[:, 0, 0][None, :, None, None], h.shape)
    np.testing.assert_allclose(h.grad, expected, rtol=1e-12)


def test_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    ops.sum_all(x * 3.0).backward()
    ops.sum_all(ops.mul(x, x)).backward()
    np.testing.assert_array_equal(x.grad, 3.0 + 2 * np.array([1.0, 2.0]))


def test_backward_with_explicit_gradient():
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    y = x * 2.0
    g = np.full((2, 3), 0.5)
    y.backward(g)
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 1.0))
    with pytest.raises(ValueError, match="does not match tensor shape"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(ValueError, match="needs a scalar"):
        (x * 2.0).backward()


# --------------------------------------------------------------------------- #
# no_grad and detach
# --------------------------------------------------------------------------- #
class _CountingPolicy(Exact):
    """Exact storage that counts what it is asked to store."""

    def __init__(self):
        self.saved = []

    def save(self, ctx, name, kind, array):
        self.saved.append((ctx.fn.__name__, name))
        return super().save(ctx, name, kind, array)


def _small_net_ops(x, w, g, b):
    h = ops.relu(ops.batch_norm2d(ops.conv2d(x, w, padding=1), g, b))
    return ops.linear(ops.flatten(ops.max_pool2d(ops.tanh(h), 2)), np.ones((3, 8), dtype=x.dtype))


def test_no_grad_saves_nothing():
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 2, 4, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal((2, 2, 3, 3)), requires_grad=True)
    g, b = Tensor(np.ones(2), requires_grad=True), Tensor(np.zeros(2), requires_grad=True)

    spy = _CountingPolicy()
    with storage_policy(spy):
        y = _small_net_ops(x, w, g, b)
    assert y.requires_grad and y._ctx is not None
    assert {"Conv2d", "BatchNorm2d", "ReLU", "Tanh", "MaxPool2d", "Linear"} <= {fn for fn, _ in spy.saved}

    spy = _CountingPolicy()
    with storage_policy(spy), no_grad():
        y2 = _small_net_ops(x, w, g, b)
    assert spy.saved == [], f"no_grad stored {spy.saved}"
    assert not y2.requires_grad and y2._ctx is None
    np.testing.assert_array_equal(y2.data, y.data)  # same forward
    with pytest.raises(RuntimeError, match="does not require grad"):
        ops.sum_all(y2).backward()
    assert npapprox.tensor.is_grad_enabled()  # restored on exit


def test_no_grad_context_of_a_custom_function_stores_nothing():
    seen = []

    class Probe(Function):
        SAVES = {"x": ACTIVATION}

        @staticmethod
        def forward(ctx, x):
            ctx.save(x=x)
            seen.append((ctx.recording, dict(ctx.saved)))
            return x * 2

        @staticmethod
        def backward(ctx, gy):
            return gy * 2

    x = Tensor(np.ones(4), requires_grad=True)
    with no_grad():
        y = Probe.apply(x)
    assert seen[-1] == (False, {}) and y._ctx is None and not y.requires_grad
    y = Probe.apply(x)
    assert seen[-1][0] is True and list(seen[-1][1]) == ["x"] and y._ctx is not None


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            raise ZeroDivisionError
    assert npapprox.tensor.is_grad_enabled()


def test_inputs_without_grad_record_nothing():
    y = ops.tanh(Tensor(np.ones(3)))
    assert not y.requires_grad and y._ctx is None


def test_detach_cuts_the_graph():
    xv = np.array([0.5, -1.0, 2.0])
    x = Tensor(xv, requires_grad=True)
    y = ops.tanh(x)
    d = y.detach()
    assert d.data is y.data and not d.requires_grad and d._ctx is None
    # L = sum(y * detach(y)): only the first factor carries gradient -> t * (1 - t^2)
    ops.sum_all(ops.mul(y, d)).backward()
    t = np.tanh(xv)
    np.testing.assert_allclose(x.grad, t * (1 - t**2), rtol=1e-12)
    with pytest.raises(RuntimeError, match="does not require grad"):
        ops.sum_all(ops.tanh(d)).backward()


# --------------------------------------------------------------------------- #
# Saved state is freed as backward walks
# --------------------------------------------------------------------------- #
def test_saved_state_is_freed_during_backward():
    depth, shape = 8, (256, 1024)                    # float64: 2 MiB per array
    nbytes = int(np.prod(shape)) * 8
    record = {}

    class Probe(Function):
        """Identity at the bottom of the chain; its backward runs last and measures."""
        SAVES = {}

        @staticmethod
        def forward(ctx, x):
            return x.copy()

        @staticmethod
        def backward(ctx, gy):
            gc.collect()
            record["during"] = tracemalloc.get_traced_memory()[0]
            return gy

    gc.collect()
    tracemalloc.start()
    try:
        x = Tensor(np.random.default_rng(4).standard_normal(shape) * 0.1, requires_grad=True)
        h = Probe.apply(x)
        for _ in range(depth):
            h = ops.tanh(h)                          # each saves its 2 MiB output
        loss = ops.sum_all(h)
        del h
        gc.collect()
        record["before"] = tracemalloc.get_traced_memory()[0]
        loss.backward()
        gc.collect()
        record["after"] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    # before backward: x and the `depth` saved tanh outputs are alive; the probe's output
    # is not (nothing saved it, and the graph links contexts, not tensors)
    assert (depth + 1) * nbytes <= record["before"] < (depth + 2) * nbytes, record
    # when the probe runs, every tanh node has been released; alive: x and the incoming
    # gradient (2 arrays), plus one array of slack
    assert record["during"] <= 3 * nbytes + 256 * 1024, record
    assert record["before"] - record["during"] >= (depth - 3) * nbytes, record
    # after: x and x.grad (measured: 2.0 arrays); the graph is gone
    assert record["after"] <= 3 * nbytes + 256 * 1024, record
    expected = np.ones(shape)
    t = x.data
    for _ in range(depth):  # chain rule through the tanh chain, in float64
        t = np.tanh(t)
        expected = expected * (1 - t * t)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12)


def test_release_drops_context_references():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    y = ops.tanh(x)
    ctx = y._ctx
    assert ctx.saved and ctx.parents == (x,) and ctx.inputs == ()  # no input tensor kept past forward
    ops.sum_all(y).backward()
    assert ctx.released and ctx.saved is None and ctx.parents == ()


# --------------------------------------------------------------------------- #
# Deep graphs, double backward, undeclared saves
# --------------------------------------------------------------------------- #
def test_deep_chain_of_5000_ops_has_no_recursion_limit():
    x = Tensor(np.array([0.3, -0.7]), requires_grad=True)
    h = x
    for i in range(5000):
        h = h * 1.001 if i % 2 == 0 else ops.add(h, Tensor(np.array([0.5, 0.5])))
    ops.sum_all(h).backward()
    np.testing.assert_allclose(x.grad, np.full(2, 1.001 ** 2500), rtol=1e-10)
    np.testing.assert_allclose(h.data, x.data * 1.001**2500 + 0.5 * sum(1.001**k for k in range(2500)),
                               rtol=1e-10)


def test_deep_tanh_chain_gradient():
    xv = np.array([0.9, -0.2, 1.7])
    x = Tensor(xv, requires_grad=True)
    h = x
    for _ in range(5000):
        h = ops.tanh(h)
    ops.sum_all(h).backward()
    expected, t = np.ones(3), xv
    for _ in range(5000):
        t = np.tanh(t)
        expected = expected * (1 - t * t)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-9)


def test_backward_twice_is_a_clear_error():
    x = Tensor(np.ones(3), requires_grad=True)
    loss = ops.sum_all(ops.tanh(x))
    loss.backward()
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


# a shared op (the first four save nothing) and d(sum of its output)/dx, by hand
SHARED_SAVE_NOTHING = {
    "add": (lambda x: ops.add(x, Tensor(np.full(x.shape, 0.5))), lambda x: np.ones_like(x)),
    "scale": (lambda x: ops.mul(x, 2.0), lambda x: np.full_like(x, 2.0)),
    "reshape": (lambda x: ops.reshape(x, (-1,)), lambda x: np.ones_like(x)),
    "pad": (lambda x: ops.pad_channels(x, 1, 2), lambda x: np.ones_like(x)),
    "tanh (saves its output)": (ops.tanh, lambda x: 1 - np.tanh(x) ** 2),
}


@pytest.mark.parametrize("name", list(SHARED_SAVE_NOTHING))
def test_second_backward_through_a_shared_subgraph_is_refused_whole(name):
    # two losses share `shared`; the second backward must not drop the gradient through
    # it silently (a released node has no links), nor add its own branch's part first
    shared_op, d_shared = SHARED_SAVE_NOTHING[name]
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 2, 2)), requires_grad=True)
    shared = shared_op(x)
    loss1 = ops.sum_all(shared)
    loss2 = ops.add(ops.sum_all(ops.mul(shared, 3.0)), ops.sum_all(ops.mul(x, 5.0)))
    loss1.backward()
    np.testing.assert_allclose(x.grad, d_shared(x.data), rtol=1e-12)
    before = x.grad.copy()
    with pytest.raises(RuntimeError, match="already backpropagated.*sum of the losses"):
        loss2.backward()
    np.testing.assert_array_equal(x.grad, before)   # nothing added, not even loss2's own branch


@pytest.mark.parametrize("name", list(SHARED_SAVE_NOTHING))
def test_one_backward_of_the_summed_losses_accumulates_both(name):
    shared_op, d_shared = SHARED_SAVE_NOTHING[name]
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 2, 2)), requires_grad=True)
    shared = shared_op(x)
    loss = ops.add(ops.sum_all(shared), ops.add(ops.sum_all(ops.mul(shared, 3.0)), ops.sum_all(ops.mul(x, 5.0))))
    loss.backward()
    np.testing.assert_allclose(x.grad, 4 * d_shared(x.data) + 5, rtol=1e-12)


def test_restore_after_release_is_a_clear_error():
    x = Tensor(np.ones(3), requires_grad=True)
    y = ops.tanh(x)
    ctx = y._ctx
    ops.sum_all(y).backward()
    with pytest.raises(RuntimeError, match="already freed"):
        ctx.restore("y")


def test_save_of_an_undeclared_name_raises_key_error():
    class Sloppy(Function):
        SAVES = {"x": ACTIVATION}

        @staticmethod
        def forward(ctx, x):
            ctx.save(y=x)
            return x

    with pytest.raises(KeyError, match="SAVES does not declare"):
        Sloppy.apply(Tensor(np.ones(2), requires_grad=True))
    with pytest.raises(KeyError, match="'y'"):  # checked even when nothing is recorded
        with no_grad():
            Sloppy.apply(Tensor(np.ones(2), requires_grad=True))


def test_saves_declaration_kind_is_checked():
    with pytest.raises(TypeError, match="expected one of"):
        class Bad(Function):
            SAVES = {"x": "float16"}


def test_tensor_basics():
    t = Tensor(np.arange(6.0).reshape(2, 3))
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2 and t.dtype == np.float64
    assert Tensor(t).data is t.data
    assert Tensor(np.array([4.5])).item() == 4.5
    with pytest.raises(ValueError, match="one element"):
        t.item()
    assert "requires_grad=True" in repr(Tensor(np.ones(1), requires_grad=True))
    r = t.reshape(3, 2)
    assert r.shape == (3, 2) and t.reshape((6,)).shape == (6,)
    np.testing.assert_array_equal((t - t).data, np.zeros((2, 3)))
    assert float(t.sum().data) == 15.0


# --------------------------------------------------------------------------- #
# Policy stack, grad mode and module stack are per thread
# --------------------------------------------------------------------------- #
def _in_threads(*bodies):
    """Run each body in its own thread; re-raise the first failure here."""
    errors = []

    def guard(body):
        try:
            body()
        except BaseException as e:  # any failure: handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_policy_stack_is_per_thread():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    exact, paper = Exact(), npapprox.Paper(4)
    step = threading.Barrier(2, timeout=30)
    seen = {}

    def a():
        with storage_policy(exact):
            step.wait()                           # 1: both blocks are open now
            seen["a1"] = ops.tanh(x)._ctx.policy
            step.wait()                           # 2: b leaves its block
            step.wait()                           # 3
            seen["a2"] = ops.tanh(x)._ctx.policy
        seen["a_after"] = npapprox.current_policy()

    def b():
        step.wait()                               # 1: a is inside Exact()
        seen["b0"] = npapprox.current_policy()    # not a's
        with storage_policy(paper):
            seen["b1"] = ops.tanh(x)._ctx.policy
            step.wait()                           # 2
        step.wait()                               # 3: a records after b's block closed

    with storage_policy(npapprox.Generic(8)):     # the main thread's block is seen by neither
        _in_threads(a, b)
        assert isinstance(npapprox.current_policy(), npapprox.Generic)
    assert seen["a1"] is exact and seen["a2"] is exact and seen["b1"] is paper
    assert type(seen["b0"]) is Exact and seen["b0"] is not exact     # b's own default
    assert type(seen["a_after"]) is Exact and seen["a_after"] is not exact


def test_grad_mode_and_module_stack_are_per_thread():
    x = Tensor(np.ones(3), requires_grad=True)
    step = threading.Barrier(2, timeout=30)
    seen = {}

    class Waits(npapprox.nn.Module):
        def forward(self, t):
            step.wait()                           # 1: b runs inside this forward
            step.wait()                           # 2
            return ops.tanh(t)

    waits = Waits()

    def a():
        with no_grad():
            seen["a_in"] = ops.tanh(x)
            step.wait()                           # 3: b records while a is in no_grad
            step.wait()                           # 4

    def b():
        step.wait()                               # 1: a's module forward is running
        seen["b_module"] = ops.tanh(x)._ctx.module
        step.wait()                               # 2
        step.wait()                               # 3
        seen["b_rec"] = ops.tanh(x)
        step.wait()                               # 4

    def a_module_then_no_grad():
        seen["a_module"] = waits(x)._ctx.module
        a()

    _in_threads(a_module_then_no_grad, b)
    assert seen["a_module"] is waits and seen["b_module"] is None
    assert not seen["a_in"].requires_grad and seen["a_in"]._ctx is None
    assert seen["b_rec"].requires_grad and seen["b_rec"]._ctx is not None
    assert npapprox.tensor.is_grad_enabled()


def test_conv_worker_threads_store_under_the_callers_policy():
    # the conv's chunks run on worker threads (npapprox.parallel), which have their own
    # (default) policy stack: what is stored must still follow the caller's policy


    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    results = []
    for threads in (2, 1):
        xt = Tensor(x, requires_grad=True)
        with threadpool_limits(threads, user_api="blas"), storage_policy(npapprox.Generic(4)):
            assert parallel.workers() == threads
            h = ops.tanh(xt)
            y = ops.conv2d(h, w, padding=1)
            assert isinstance(h._ctx.saved["y"], GenericPacked)        # tanh keeps its output, K-bit
            assert isinstance(y._ctx.saved["x"], SharedRef)            # the conv refers to it
            ops.sum_all(y).backward()
        results.append((y.data.tobytes(), xt.grad.tobytes()))
    assert results[0] == results[1]
