"""PyTorch as an independent oracle: every op's forward and gradients in float32, BN's
running statistics, and a whole pre-activation ResNet-20 written separately in torch.

Tolerances (float32): ``close(a, b, rtol, atol)`` means
``|a - b| <= rtol * |b| + atol * max|b|`` elementwise, i.e. ``atol`` is relative to the
scale of the reference array (gradients of different layers differ by orders of
magnitude). Ops: forward rtol 1e-5 / atol 1e-5, gradients rtol 1e-4 / atol 1e-5; BN
gradients rtol 1e-3 / atol 1e-4; whole ResNets: logits rtol 1e-4 / atol 1e-5, loss rtol 1e-5,
parameter gradients rtol 5e-4 / atol 5e-5, running statistics rtol 1e-4 / atol 1e-5
(measured worst case on x86-64/OpenBLAS: ~4% of each tolerance).

Without torch these tests are skipped; with NPAPPROX_REQUIRE_ORACLE=1 they fail (conftest).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.special import erfc

import npapprox
from npapprox import Tensor, ops

from gradcheck import away_from_zero, distinct_values

SEEDS = st.integers(0, 2**32 - 1)
DIMS = st.integers(1, 4)
FEW = settings(max_examples=20)


def close(a, b, rtol, atol, what="", scale=None):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if scale is None:
        scale = float(np.abs(b).max()) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale + 1e-30, err_msg=what)


def compare(torch, np_fn, torch_fn, inputs, diff, fwd=(1e-5, 1e-5), grad=(1e-4, 1e-5), seed=0,
            grad_scale=None, fwd_scale=None):
    """Run ``np_fn`` (npapprox) and ``torch_fn`` (torch) on the same float32 inputs, backprop
    ``sum(y * R)`` for a random R through both, compare y and the gradients of ``diff``.

    ``grad_scale={i: c}``: the atol of input i's gradient is relative to ``c * max|R|``
    instead of max|gradient|. For gradients formed by cancellation in float32, whose
    error is ~1e-7 of the terms however small the result: a saturated tanh/sigmoid
    (1 - y^2, c = 1), BN's input gradient (gy - mean gy - xhat mean(gy xhat), c = gamma/sigma).
    ``fwd_scale``: likewise for the forward atol (GELU's 1 + erf(x / sqrt 2) cancels for x << 0
    in both implementations: error ~1e-7 |x|; torch's is the larger, see test_gelu_tail_against_float64)."""
    rng = np.random.default_rng((seed, 0x0AC))  # not the stream that made the inputs
    xs = [Tensor(a.copy(), requires_grad=i in diff) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a
          for i, a in enumerate(inputs)]
    y = np_fn(*xs)
    r = rng.standard_normal(y.shape).astype(np.float32)
    ops.sum_all(ops.mul(y, Tensor(r))).backward()

    ts = [torch.tensor(a, requires_grad=i in diff) if isinstance(a, np.ndarray) else a
          for i, a in enumerate(inputs)]
    yt = torch_fn(*ts)
    (yt * torch.from_numpy(r)).sum().backward()

    assert y.dtype == np.float32
    close(y.data, yt.detach().numpy(), *fwd, what="forward", scale=fwd_scale)
    for i in diff:
        assert xs[i].grad is not None and xs[i].grad.dtype == np.float32
        scale = None if grad_scale is None or i not in grad_scale else grad_scale[i] * float(np.abs(r).max())
        close(xs[i].grad, ts[i].grad.numpy(), *grad, what=f"gradient of input {i}", scale=scale)
    return y, yt


def f32(a):
    return np.asarray(a, dtype=np.float32)


# --------------------------------------------------------------------------- #
# Ops
# --------------------------------------------------------------------------- #
@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 3, 7]))
    stride, pad = draw(st.integers(1, 3)), draw(st.integers(0, 3))
    lo = max(1, k - 2 * pad)
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), f=draw(st.integers(1, 4)),
                h=draw(st.integers(lo, lo + 6)), w=draw(st.integers(lo, lo + 6)), k=k, stride=stride,
                pad=pad, bias=draw(st.booleans()), seed=draw(SEEDS))


@FEW
@given(case=conv_cases())
@example(case=dict(n=2, c=3, f=4, h=12, w=12, k=7, stride=2, pad=3, bias=False, seed=0))
@example(case=dict(n=2, c=4, f=8, h=8, w=8, k=1, stride=2, pad=0, bias=False, seed=1))
def test_conv2d(torch, case):
    F = torch.nn.functional
    rng = np.random.default_rng(case["seed"])
    x = f32(rng.standard_normal((case["n"], case["c"], case["h"], case["w"])))
    w = f32(rng.standard_normal((case["f"], case["c"], case["k"], case["k"])))
    b = f32(rng.standard_normal(case["f"])) if case["bias"] else None
    s, p = case["stride"], case["pad"]
    compare(torch, lambda x, w, b: ops.conv2d(x, w, b, stride=s, padding=p),
            lambda x, w, b: F.conv2d(x, w, b, stride=s, padding=p),
            [x, w, b], (0, 1, 2) if b is not None else (0, 1), seed=case["seed"])


@st.composite
def bn_shapes(draw):
    n, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return (max(n, 2), draw(st.integers(1, 4)), h, w)


@FEW
@given(shape=bn_shapes(), momentum=st.sampled_from([0.1, 0.3]), seed=SEEDS)
@example(shape=(8, 3, 4, 4), momentum=0.1, seed=0)
def test_batch_norm2d_training_and_running_stats(torch, shape, momentum, seed):
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = f32(rng.standard_normal(shape) * rng.uniform(0.5, 3, (1, c, 1, 1)) + rng.standard_normal((1, c, 1, 1)))
    gamma, beta = f32(rng.standard_normal(c)), f32(rng.standard_normal(c))
    rm, rv = f32(rng.standard_normal(c)), f32(rng.uniform(0.5, 2, c))
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    compare(torch,
            lambda x, g, b: ops.batch_norm2d(x, g, b, rm, rv, use_batch_stats=True, update_running=True,
                                             momentum=momentum),
            lambda x, g, b: F.batch_norm(x, rm_t, rv_t, g, b, training=True, momentum=momentum, eps=1e-5),
            [x, gamma, beta], (0, 1, 2), grad=(1e-3, 1e-4), seed=seed,
            grad_scale={0: float(np.max(np.abs(gamma) / np.sqrt(x.astype(np.float64).var(axis=(0, 2, 3)) + 1e-5)))})
    close(rm, rm_t.numpy(), 1e-5, 1e-6, "running_mean")
    close(rv, rv_t.numpy(), 1e-5, 1e-6, "running_var (unbiased batch variance)")


@FEW
@given(shape=bn_shapes(), seed=SEEDS)
def test_batch_norm2d_eval_running_stats(torch, shape, seed):
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = f32(rng.standard_normal(shape))
    gamma, beta = f32(rng.standard_normal(c)), f32(rng.standard_normal(c))
    rm, rv = f32(rng.standard_normal(c)), f32(rng.uniform(0.5, 2, c))
    rm0, rv0 = rm.copy(), rv.copy()
    compare(torch, lambda x, g, b: ops.batch_norm2d(x, g, b, rm, rv, use_batch_stats=False),
            lambda x, g, b: F.batch_norm(x, torch.tensor(rm), torch.tensor(rv), g, b, training=False, eps=1e-5),
            [x, gamma, beta], (0, 1, 2), grad=(1e-3, 1e-4), seed=seed)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), "eval mode must not touch running stats"


SHAPES = st.lists(DIMS, min_size=1, max_size=4).map(tuple)


@FEW
@given(shape=SHAPES, seed=SEEDS)
def test_relu(torch, shape, seed):
    x = f32(away_from_zero(np.random.default_rng(seed), shape, margin=1e-3))
    compare(torch, ops.relu, torch.relu, [x], (0,), seed=seed)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu"])
@FEW
@given(shape=SHAPES, seed=SEEDS)
def test_smooth_activation(torch, name, shape, seed):
    x = f32(3 * np.random.default_rng(seed).standard_normal(shape))
    torch_fn = {"sigmoid": torch.sigmoid, "tanh": torch.tanh,
                "gelu": lambda t: torch.nn.functional.gelu(t, approximate="none")}[name]
    compare(torch, getattr(ops, name), torch_fn, [x], (0,), seed=seed, grad_scale={0: 1.0},
            fwd_scale=float(np.abs(x).max()))


def test_gelu_is_the_exact_erf_form(torch):
    # the tanh approximation differs from the erf form by up to ~1e-3 here: must not match it
    x = f32(np.linspace(-4, 4, 101))
    ours = ops.gelu(Tensor(x)).data
    exact = torch.nn.functional.gelu(torch.tensor(x), approximate="none").numpy()
    approx = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()
    close(ours, exact, 1e-6, 1e-6)
    assert np.abs(ours - approx).max() > 1e-4


def test_gelu_tail_against_float64():
    # in the negative tail both float32 GELUs lose relative accuracy; ours stays within
    # 1e-6 |x| of the float64 value (x * erfc(-x / sqrt 2) / 2) down to x = -5
    x = np.linspace(-5, 5, 201).astype(np.float32)
    x64 = x.astype(np.float64)
    err = np.abs(ops.gelu(Tensor(x)).data - 0.5 * x64 * erfc(-x64 / np.sqrt(2)))
    assert np.all(err <= 1e-6 * np.maximum(np.abs(x64), 1)), err.max()


@pytest.mark.parametrize("name", ["add", "mul"])
@FEW
@given(data=st.data(), seed=SEEDS)
def test_binary_broadcasting(torch, name, data, seed):
    n, c, h, w = (data.draw(DIMS) for _ in range(4))
    base = (n, c, h, w)
    other = data.draw(st.sampled_from([base, (1, c, 1, 1), (c, 1, 1), (w,), (n, 1, h, w), ()]))
    shapes = (other, base) if data.draw(st.booleans()) else (base, other)
    rng = np.random.default_rng(seed)
    a, b = f32(rng.standard_normal(shapes[0])), f32(rng.standard_normal(shapes[1]))
    torch_fn = {"add": torch.add, "mul": torch.mul}[name]
    compare(torch, getattr(ops, name), torch_fn, [a, b], (0, 1), seed=seed)


@st.composite
def pool_cases(draw, padded):
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, k // 2)) if padded else 0
    lo = max(1, k - 2 * pad)
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)), h=draw(st.integers(lo, lo + 6)),
                w=draw(st.integers(lo, lo + 6)), k=k, stride=stride, pad=pad, seed=draw(SEEDS))


@FEW
@given(case=pool_cases(padded=False))
@example(case=dict(n=2, c=3, h=8, w=8, k=2, stride=2, pad=0, seed=0))
def test_avg_pool2d(torch, case):
    x = f32(np.random.default_rng(case["seed"]).standard_normal((case["n"], case["c"], case["h"], case["w"])))
    k, s = case["k"], case["stride"]
    compare(torch, lambda x: ops.avg_pool2d(x, k, s), lambda x: torch.nn.functional.avg_pool2d(x, k, s),
            [x], (0,), seed=case["seed"])


@FEW
@given(case=pool_cases(padded=True))
@example(case=dict(n=2, c=2, h=9, w=8, k=3, stride=2, pad=1, seed=0))
@example(case=dict(n=1, c=2, h=6, w=7, k=4, stride=1, pad=2, seed=1))
def test_max_pool2d(torch, case):
    x = f32(distinct_values(np.random.default_rng(case["seed"]), (case["n"], case["c"], case["h"], case["w"])))
    k, s, p = case["k"], case["stride"], case["pad"]
    compare(torch, lambda x: ops.max_pool2d(x, k, s, p), lambda x: torch.nn.functional.max_pool2d(x, k, s, p),
            [x], (0,), seed=case["seed"])


def test_max_pool2d_default_stride_equals_kernel(torch):
    x = f32(distinct_values(np.random.default_rng(3), (2, 3, 6, 6)))
    compare(torch, lambda x: ops.max_pool2d(x, 2), lambda x: torch.nn.functional.max_pool2d(x, 2), [x], (0,))


def _special_pool_input(rng, shape, all_minus_inf):
    """Small integers (many ties), NaN, -inf and +inf; or -inf everywhere."""
    x = rng.integers(-2, 3, shape).astype(np.float32)
    u = rng.random(shape)
    x[u < 0.15] = np.nan
    x[(u >= 0.15) & (u < 0.4)] = -np.inf
    x[(u >= 0.4) & (u < 0.45)] = np.inf
    if all_minus_inf:
        x[:] = -np.inf
    return x


@settings(max_examples=60)
@given(case=pool_cases(padded=True), all_minus_inf=st.booleans())
@example(case=dict(n=1, c=1, h=1, w=4, k=3, stride=1, pad=1, seed=0), all_minus_inf=True)
@example(case=dict(n=1, c=2, h=4, w=4, k=2, stride=2, pad=1, seed=5), all_minus_inf=False)
def test_max_pool2d_nan_ties_and_infinite_windows(torch, case, all_minus_inf):
    """PyTorch's rule: NaN wins (the last NaN of a window, its gradient too), ties go to
    the first maximum, an all -inf window sends its gradient to its first position
    inside the input (never to the padding); a NaN / inf output gradient reaches only
    its window's argmax."""
    rng = np.random.default_rng(case["seed"])
    x = _special_pool_input(rng, (case["n"], case["c"], case["h"], case["w"]), all_minus_inf)
    k, s, p = case["k"], case["stride"], case["pad"]
    xt = Tensor(x.copy(), requires_grad=True)
    y = ops.max_pool2d(xt, k, s, p)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gy.flat[::7] = np.inf
    y.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, s, p)
    ty.backward(torch.tensor(gy))
    assert np.array_equal(y.data, ty.detach().numpy(), equal_nan=True)
    # where each output's gradient went (sums of overlapping windows may round in another order)
    np.testing.assert_allclose(xt.grad, tx.grad.numpy(), rtol=1e-6, atol=0, equal_nan=True)


def test_relu_at_nan_inf_and_zero(torch):
    # torch.relu's backward: the gradient passes where the output is NaN, and nothing passes where
    # it is <= 0 (not even a NaN or inf output gradient)
    x = f32([np.nan, -1, 2, 0, -0.0, np.inf, -np.inf, 1e-45, -1e-45])
    gy = f32([3, np.nan, 3, np.inf, 3, -2, 3, -4, np.nan])
    xt = Tensor(x.copy(), requires_grad=True)
    y = ops.relu(xt)
    y.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.relu(tx)
    ty.backward(torch.tensor(gy))
    assert np.array_equal(y.data, ty.detach().numpy(), equal_nan=True)
    assert np.array_equal(xt.grad, tx.grad.numpy(), equal_nan=True)


@FEW
@given(shape=st.tuples(DIMS, DIMS, DIMS, DIMS), seed=SEEDS)
def test_global_avg_pool2d(torch, shape, seed):
    x = f32(np.random.default_rng(seed).standard_normal(shape))
    compare(torch, ops.global_avg_pool2d, lambda x: x.mean(dim=(2, 3)), [x], (0,), seed=seed)


@FEW
@given(n=st.integers(1, 8), i=st.integers(1, 16), o=st.integers(1, 10), bias=st.booleans(), seed=SEEDS)
def test_linear(torch, n, i, o, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = f32(rng.standard_normal((n, i))), f32(rng.standard_normal((o, i)))
    b = f32(rng.standard_normal(o)) if bias else None
    compare(torch, ops.linear, torch.nn.functional.linear, [x, w, b], (0, 1, 2) if bias else (0, 1), seed=seed)


@FEW
@given(shape=st.tuples(DIMS, DIMS, DIMS, DIMS), before=st.integers(0, 3), after=st.integers(0, 3), seed=SEEDS)
def test_shape_ops(torch, shape, before, after, seed):
    x = f32(np.random.default_rng(seed).standard_normal(shape))
    compare(torch, ops.flatten, lambda t: t.flatten(1), [x], (0,), seed=seed)
    compare(torch, lambda t: ops.reshape(t, (shape[3], -1)), lambda t: t.reshape(shape[3], -1), [x], (0,), seed=seed)
    compare(torch, lambda t: ops.pad_channels(t, before, after),
            lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, before, after)), [x], (0,), seed=seed)


@FEW
@given(n=DIMS, h=DIMS, w=DIMS, channels=st.lists(st.integers(1, 3), min_size=2, max_size=3), seed=SEEDS)
def test_concat_channels(torch, n, h, w, channels, seed):
    rng = np.random.default_rng(seed)
    xs = [f32(rng.standard_normal((n, c, h, w))) for c in channels]
    compare(torch, ops.concat_channels, lambda *ts: torch.cat(ts, dim=1), xs, tuple(range(len(xs))), seed=seed)


@FEW
@given(n=st.integers(1, 16), k=st.integers(1, 12), scale=st.sampled_from([0.1, 1.0, 10.0, 60.0]), seed=SEEDS)
def test_cross_entropy(torch, n, k, scale, seed):
    rng = np.random.default_rng(seed)
    z = f32(scale * rng.standard_normal((n, k)))
    t = rng.integers(0, k, n)
    compare(torch, lambda z: ops.cross_entropy(z, t),
            lambda z: torch.nn.functional.cross_entropy(z, torch.from_numpy(t)), [z], (0,), seed=seed)


# --------------------------------------------------------------------------- #
# A whole pre-activation ResNet, written independently in torch (tests/torch_models.py)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shortcut,depth,batch,size,width", [
    ("pad", 20, 8, 32, 16),         # ResNet-20 on CIFAR-shaped input
    ("projection", 20, 4, 16, 16),  # 1x1 conv shortcut on the pre-activated h
    ("pad", 8, 4, 8, 3),            # odd channel growth 3 -> 6 -> 12: unequal zero-pad split
])
def test_preact_resnet_vs_torch(torch, shortcut, depth, batch, size, width):
    npapprox.nn.manual_seed(3)
    model = npapprox.nn.PreActResNet(depth=depth, num_classes=10, in_channels=3, width=width, shortcut=shortcut)
    if depth == 20 and shortcut == "pad":  # the named constructor builds this very network
        npapprox.nn.manual_seed(3)
        ref = npapprox.nn.preact_resnet20()
        assert all(np.array_equal(a, b)
                   for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True))
        assert list(ref.state_dict()) == list(model.state_dict())
    from model_oracle import against_torch
    from torch_models import TorchPreActResNet  # imports torch: only after the fixture provided it

    x = f32(np.random.default_rng(5).standard_normal((batch, 3, size, size)))
    against_torch(torch, model, TorchPreActResNet(depth, 10, 3, width, shortcut), x)
    n_buffers = sum(1 for _ in model.named_buffers())
    assert n_buffers == 2 * sum(isinstance(m, npapprox.nn.BatchNorm2d) for _, m in model.named_modules())
