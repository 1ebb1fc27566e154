"""Every op's backward against float64 central differences along random directions.

See ``gradcheck.directional_check`` for the criterion. Shapes, strides, paddings and
kernel sizes come from Hypothesis (derandomized profile in conftest.py); inputs are kept
away from kinks (ReLU: |x| >= 0.1; max-pool: all values distinct, 0.1 apart).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import npapprox
from npapprox import Function, ops
from npapprox.policy import ACTIVATION

from gradcheck import away_from_zero, directional_check, distinct_values

SEEDS = st.integers(0, 2**32 - 1)
DIMS = st.integers(1, 4)


# --------------------------------------------------------------------------- #
# The check itself can fail
# --------------------------------------------------------------------------- #
class _SquareWrongBackward(Function):
    """y = x^2 with a backward off by ``rel`` in one element."""

    SAVES = {"x": ACTIVATION}
    rel = 0.0

    @staticmethod
    def forward(ctx, x):
        ctx.save(x=x)
        return x * x

    @staticmethod
    def backward(ctx, gy):
        x = ctx.restore("x")
        gx = 2 * x * gy
        gx.flat[3] *= 1 + _SquareWrongBackward.rel
        return gx


@pytest.mark.parametrize("rel", [1e-3, -0.5, -2.0])
def test_gradcheck_catches_a_wrong_backward(rel):
    x = np.random.default_rng(1).standard_normal((4, 5)) + 3.0  # no element near 0
    _SquareWrongBackward.rel = 0.0
    directional_check(_SquareWrongBackward.apply, [x], (0,))  # correct: passes
    _SquareWrongBackward.rel = rel
    try:
        with pytest.raises(AssertionError, match="directional derivative mismatch"):
            directional_check(_SquareWrongBackward.apply, [x], (0,))
    finally:
        _SquareWrongBackward.rel = 0.0


def test_gradcheck_catches_a_missing_gradient_term(monkeypatch):
    # BN's input gradient without its variance term (a classic bug) must be rejected.
    rng = np.random.default_rng(2)
    x, g, b = rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(2), rng.standard_normal(2)
    def bn(x, g, b):
        return ops.batch_norm2d(x, g, b)
    directional_check(bn, [x, g, b], (0,))

    def no_variance_term(ctx, gy):
        x, gamma, mu, inv_sigma = ctx.restore("x", "gamma", "mu", "inv_sigma")
        m = gy.shape[0] * gy.shape[2] * gy.shape[3]
        mean_gy = gy.sum(axis=(0, 2, 3)) / m
        return (gamma * inv_sigma)[None, :, None, None] * (gy - mean_gy[None, :, None, None]), None, None

    monkeypatch.setattr(npapprox.ops.batchnorm.BatchNorm2d, "backward", staticmethod(no_variance_term))
    with pytest.raises(AssertionError, match="directional derivative mismatch"):
        directional_check(bn, [x, g, b], (0,))


# --------------------------------------------------------------------------- #
# Convolution
# --------------------------------------------------------------------------- #
@st.composite
def conv_cases(draw):
    kh = draw(st.sampled_from([1, 3, 2, 7]))
    kw = kh if draw(st.booleans()) else draw(st.sampled_from([1, 2, 3]))
    stride, pad = draw(st.integers(1, 3)), draw(st.integers(0, 3))
    lo_h, lo_w = max(1, kh - 2 * pad), max(1, kw - 2 * pad)
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 3)),
                h=draw(st.integers(lo_h, lo_h + 5)), w=draw(st.integers(lo_w, lo_w + 5)),
                kh=kh, kw=kw, stride=stride, pad=pad, bias=draw(st.booleans()),
                diff=draw(st.sampled_from([(0, 1, 2), (0,), (1, 2)])), seed=draw(SEEDS))


@given(case=conv_cases())
@example(case=dict(n=2, c=3, f=2, h=9, w=8, kh=7, kw=7, stride=2, pad=3, bias=True, diff=(0, 1, 2), seed=1))
@example(case=dict(n=2, c=2, f=3, h=7, w=7, kh=7, kw=7, stride=1, pad=0, bias=False, diff=(0, 1, 2), seed=2))
@example(case=dict(n=2, c=3, f=2, h=6, w=5, kh=3, kw=3, stride=1, pad=1, bias=True, diff=(0, 1, 2), seed=3))
@example(case=dict(n=2, c=3, f=4, h=7, w=6, kh=1, kw=1, stride=2, pad=0, bias=False, diff=(0, 1, 2), seed=4))
@example(case=dict(n=1, c=3, f=2, h=4, w=5, kh=1, kw=1, stride=1, pad=0, bias=True, diff=(0, 1, 2), seed=5))
def test_conv2d(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["f"], case["c"], case["kh"], case["kw"]))
    b = rng.standard_normal(case["f"]) if case["bias"] else None
    diff = tuple(i for i in case["diff"] if i < 2 or b is not None) or (0,)
    s, p = case["stride"], case["pad"]
    directional_check(lambda x, w, b: ops.conv2d(x, w, b, stride=s, padding=p), [x, w, b], diff,
                      seed=case["seed"])


# --------------------------------------------------------------------------- #
# Batch norm
# --------------------------------------------------------------------------- #
@st.composite
def bn_shapes(draw):
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if n * h * w < 2:
        n = 2
    return n, draw(st.integers(1, 3)), h, w


@given(shape=bn_shapes(), seed=SEEDS)
@example(shape=(2, 1, 1, 1), seed=0)  # M = 2 values per channel, the smallest allowed
def test_batch_norm2d_batch_stats(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, (1, c, 1, 1)) + rng.standard_normal((1, c, 1, 1))
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    directional_check(lambda x, g, b: ops.batch_norm2d(x, g, b, update_running=False),
                      [x, gamma, beta], (0, 1, 2), seed=seed)


@given(shape=bn_shapes(), seed=SEEDS)
def test_batch_norm2d_running_stats(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.3, 2.0, c)

    def f(x, g, b):
        return ops.batch_norm2d(x, g, b, rm, rv, use_batch_stats=False)

    directional_check(f, [x, gamma, beta], (0, 1, 2), seed=seed)


def test_batch_norm2d_gradient_wrt_x_only():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 3, 3))
    directional_check(lambda x, g, b: ops.batch_norm2d(x, g, b), [x, rng.standard_normal(2), rng.standard_normal(2)],
                      (0,))


# --------------------------------------------------------------------------- #
# Pointwise activations
# --------------------------------------------------------------------------- #
SHAPES = st.lists(DIMS, min_size=1, max_size=4).map(tuple)


@given(shape=SHAPES, seed=SEEDS)
def test_relu(shape, seed):
    rng = np.random.default_rng(seed)
    directional_check(ops.relu, [away_from_zero(rng, shape)], (0,), seed=seed)


@pytest.mark.parametrize("op", [ops.sigmoid, ops.tanh, ops.gelu], ids=["sigmoid", "tanh", "gelu"])
@given(shape=SHAPES, seed=SEEDS)
@example(shape=(1,), seed=15733)  # deep in GELU's negative tail: noise-floor case
def test_smooth_activation(op, shape, seed):
    rng = np.random.default_rng(seed)
    directional_check(op, [2 * rng.standard_normal(shape)], (0,), seed=seed)


# --------------------------------------------------------------------------- #
# Elementwise
# --------------------------------------------------------------------------- #
@st.composite
def broadcast_pairs(draw):
    n, c, h, w = (draw(DIMS) for _ in range(4))
    base = (n, c, h, w)
    other = draw(st.sampled_from([base, (1, c, 1, 1), (c, 1, 1), (w,), (1, 1, 1, 1), (n, 1, h, w), (1,), ()]))
    return (other, base) if draw(st.booleans()) else (base, other)


@pytest.mark.parametrize("op", [ops.add, ops.mul], ids=["add", "mul"])
@given(shapes=broadcast_pairs(), seed=SEEDS)
@example(shapes=((2, 3, 4, 4), (2, 3, 4, 4)), seed=0)  # the residual add
def test_binary_broadcasting(op, shapes, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    directional_check(op, [a, b], (0, 1), seed=seed)
    directional_check(op, [a, b], (1,), seed=seed + 1)


@pytest.mark.parametrize("f", [lambda x: ops.mul(x, x), lambda x: ops.add(x, x),
                               lambda x: x * 2.5, lambda x: -x, lambda x: x - x * x, lambda x: 1.5 + x],
                         ids=["x*x", "x+x", "scale", "neg", "sub", "radd"])
def test_same_tensor_twice_and_operators(f):
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    directional_check(f, [x], (0,))


@given(shape=SHAPES, seed=SEEDS)
def test_sum_all(shape, seed):
    directional_check(ops.sum_all, [np.random.default_rng(seed).standard_normal(shape)], (0,), seed=seed)


# --------------------------------------------------------------------------- #
# Pooling
# --------------------------------------------------------------------------- #
@st.composite
def pool_cases(draw, padded):
    k = draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.integers(1, 3)))
    pad = draw(st.integers(0, k // 2)) if padded else 0
    lo = max(1, k - 2 * pad)
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=draw(st.integers(lo, lo + 5)),
                w=draw(st.integers(lo, lo + 5)), k=k, stride=stride, pad=pad, seed=draw(SEEDS))


@given(case=pool_cases(padded=False))
@example(case=dict(n=2, c=2, h=8, w=8, k=2, stride=None, pad=0, seed=0))  # the 'pad' shortcut's pooling
def test_avg_pool2d(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    directional_check(lambda x: ops.avg_pool2d(x, case["k"], case["stride"]), [x], (0,), seed=case["seed"])


@given(case=pool_cases(padded=True))
@example(case=dict(n=2, c=2, h=7, w=6, k=3, stride=2, pad=1, seed=0))
@example(case=dict(n=1, c=2, h=5, w=5, k=3, stride=1, pad=1, seed=1))  # overlapping windows
def test_max_pool2d(case):
    rng = np.random.default_rng(case["seed"])
    x = distinct_values(rng, (case["n"], case["c"], case["h"], case["w"]))
    directional_check(lambda x: ops.max_pool2d(x, case["k"], case["stride"], case["pad"]), [x], (0,),
                      seed=case["seed"])


@given(shape=st.tuples(DIMS, DIMS, DIMS, DIMS), seed=SEEDS)
def test_global_avg_pool2d(shape, seed):
    directional_check(ops.global_avg_pool2d, [np.random.default_rng(seed).standard_normal(shape)], (0,), seed=seed)


# --------------------------------------------------------------------------- #
# Linear, shape ops, loss
# --------------------------------------------------------------------------- #
@given(n=st.integers(1, 4), i=st.integers(1, 6), o=st.integers(1, 5), bias=st.booleans(), seed=SEEDS)
def test_linear(n, i, o, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, i)), rng.standard_normal((o, i))
    b = rng.standard_normal(o) if bias else None
    directional_check(ops.linear, [x, w, b], (0, 1, 2) if bias else (0, 1), seed=seed)
    directional_check(ops.linear, [x, w, b], (1,), seed=seed + 1)


@given(shape=st.tuples(DIMS, DIMS, DIMS, DIMS), perm=st.permutations(range(4)), seed=SEEDS)
def test_reshape_and_flatten(shape, perm, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    directional_check(ops.flatten, [x], (0,), seed=seed)
    target = tuple(shape[p] for p in perm)  # same size, different layout
    directional_check(lambda x: ops.reshape(x, target), [x], (0,), seed=seed)
    directional_check(lambda x: ops.reshape(x, (-1,)), [x], (0,), seed=seed)


@given(shape=st.tuples(DIMS, DIMS, DIMS, DIMS), before=st.integers(0, 3), after=st.integers(0, 3), seed=SEEDS)
def test_pad_channels(shape, before, after, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    directional_check(lambda x: ops.pad_channels(x, before, after), [x], (0,), seed=seed)


@given(n=DIMS, h=DIMS, w=DIMS, channels=st.lists(st.integers(1, 3), min_size=2, max_size=3), seed=SEEDS)
def test_concat_channels(n, h, w, channels, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((n, c, h, w)) for c in channels]
    directional_check(ops.concat_channels, xs, range(len(xs)), seed=seed)
    directional_check(ops.concat_channels, xs, (len(xs) - 1,), seed=seed + 1)


@given(n=st.integers(1, 6), k=st.integers(1, 7), scale=st.sampled_from([0.1, 1.0, 5.0]), seed=SEEDS)
@example(n=1, k=2, scale=5.0, seed=1361)  # confident and right: loss ~1e-5, noise-floor case
@example(n=3, k=4, scale=30.0, seed=0)  # large logits: the stable logsumexp path
def test_cross_entropy(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((n, k))
    t = rng.integers(0, k, n)
    directional_check(ops.cross_entropy, [z, t], (0,), seed=seed)


# --------------------------------------------------------------------------- #
# Whole pre-activation ResNets in float64 (every op composed, fan-out included)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_preact_resnet_float64(shortcut):
    npapprox.nn.manual_seed(11)
    model = npapprox.nn.PreActResNet(depth=8, num_classes=3, in_channels=2, width=4, shortcut=shortcut)
    model.astype(np.float64)
    slots = [(mod, name) for _, mod in model.named_modules() for name, v in list(mod.__dict__.items())
             if isinstance(v, npapprox.nn.Parameter)]
    params = [getattr(m, n).data.copy() for m, n in slots]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 8, 8))
    labels = rng.integers(0, 3, 3)

    def f(x, *ps):
        for (mod, name), p in zip(slots, ps, strict=True):
            object.__setattr__(mod, name, p)
        return ops.cross_entropy(model(x), labels)

    try:
        directional_check(f, [x, *params], range(len(params) + 1), seed=9)
    finally:
        for (mod, name), p in zip(slots, params, strict=True):
            object.__setattr__(mod, name, npapprox.nn.Parameter(p))
