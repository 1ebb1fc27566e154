"""Bad input gives a clear error: the exception type *and* a message that names the problem."""
from __future__ import annotations

import numpy as np
import pytest

import npapprox
from npapprox import Tensor, nn, ops

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)        # a valid NCHW input
W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)        # a valid conv kernel
G, B = np.ones(3, np.float32), np.zeros(3, np.float32)          # valid BN gamma / beta
Z = rng.standard_normal((4, 5)).astype(np.float32)               # valid logits
T = np.array([0, 4, 2, 1])                                       # valid labels


def test_valid_inputs_are_accepted():
    """The baseline the cases below perturb: each call succeeds as given."""
    ops.conv2d(X, W, np.zeros(4, np.float32), stride=2, padding=1)
    ops.batch_norm2d(X, G, B)
    ops.linear(Z, np.ones((2, 5), np.float32))
    ops.avg_pool2d(X, 2)
    ops.max_pool2d(X, 3, 2, 1)
    ops.global_avg_pool2d(X)
    ops.cross_entropy(Z, T)
    nn.PreActResNet(depth=8, in_channels=3, width=4)(X)


CASES = {
    # --- wrong rank -----------------------------------------------------------
    "conv2d x rank 3": (lambda: ops.conv2d(X[0], W),
                        ValueError, r"conv2d: x must have 4 dimensions .*got shape \(3, 8, 8\)"),
    "conv2d w rank 2": (lambda: ops.conv2d(X, W[:, :, 0, 0]), ValueError, r"conv2d: w must have 4 dimensions"),
    "batch_norm2d rank 2": (lambda: ops.batch_norm2d(X[:, :, 0, 0], G, B),
                            ValueError, r"batch_norm2d: x must have 4 dimensions"),
    "linear x rank 4": (lambda: ops.linear(X, np.ones((2, 3), np.float32)),
                        ValueError, r"linear: x must have 2 dimensions"),
    "linear w rank 1": (lambda: ops.linear(Z, np.ones(5, np.float32)), ValueError, r"linear: w must have 2 dimensions"),
    "avg_pool2d rank 3": (lambda: ops.avg_pool2d(X[0], 2), ValueError, r"avg_pool2d: x must have 4 dimensions"),
    "max_pool2d rank 5": (lambda: ops.max_pool2d(X[None], 2), ValueError, r"max_pool2d: x must have 4 dimensions"),
    "global_avg_pool2d rank 2": (lambda: ops.global_avg_pool2d(Z),
                                 ValueError, r"global_avg_pool2d: x must have 4 dimensions"),
    "pad_channels rank 3": (lambda: ops.pad_channels(X[0], 1, 1),
                            ValueError, r"pad_channels: x must have 4 dimensions"),
    "concat rank 3": (lambda: ops.concat_channels(X, X[0]), ValueError, r"concat_channels: x1 must have 4 dimensions"),
    "cross_entropy logits rank 1": (lambda: ops.cross_entropy(Z[0], T[:1]),
                                    ValueError, r"cross_entropy: logits must have 2 dimensions"),
    # --- channel / feature counts ------------------------------------------------
    "conv2d channels": (lambda: ops.conv2d(X, W[:, :2]), ValueError, r"input has 3 channels but the kernel expects 2"),
    "conv2d bias shape": (lambda: ops.conv2d(X, W, np.zeros(3, np.float32)),
                          ValueError, r"bias shape \(3,\) should be \(4,\)"),
    "Conv2d layer channels": (lambda: nn.Conv2d(4, 8, 3)(X),
                              ValueError, r"input has 3 channels but the kernel expects 4"),
    "batch_norm2d gamma": (lambda: ops.batch_norm2d(X, G[:2], B),
                           ValueError, r"gamma has shape \(2,\), expected \(3,\)"),
    "BatchNorm2d layer channels": (lambda: nn.BatchNorm2d(5)(X),
                                   ValueError, r"batch_norm2d: gamma has shape \(5,\), expected \(3,\)"),
    "batch_norm2d running_var": (lambda: ops.batch_norm2d(X, G, B, np.zeros(3, np.float32), np.ones(4, np.float32)),
                                 ValueError, r"running_var has shape \(4,\)"),
    "linear features": (lambda: ops.linear(Z, np.ones((2, 4), np.float32)),
                        ValueError, r"input has 5 features but the weight expects 4"),
    "linear bias": (lambda: ops.linear(Z, np.ones((2, 5), np.float32), np.ones(3, np.float32)),
                    ValueError, r"bias shape \(3,\) should be \(2,\)"),
    "model in_channels": (lambda: nn.PreActResNet(depth=8, in_channels=1, width=4)(X), ValueError,
                          r"PreActResNet expects input \(N, 1, H, W\), got shape \(2, 3, 8, 8\)"),
    "model input rank": (lambda: nn.PreActResNet(depth=8, in_channels=3, width=4)(X[0]),
                         ValueError, r"expects input \(N, 3, H, W\)"),
    "model odd size": (lambda: nn.PreActResNet(depth=8, in_channels=3, width=4)(X[:, :, :6, :6]),
                       ValueError, r"divisible by 4"),
    "concat spatial": (lambda: ops.concat_channels(X, X[:, :, :4]), ValueError, r"x1 shape .* does not match"),
    "concat nothing": (lambda: ops.concat_channels(), ValueError, r"at least one tensor"),
    # --- dtypes -------------------------------------------------------------------
    "conv2d f32 x f64 w": (lambda: ops.conv2d(X, W.astype(np.float64)),
                           TypeError, r"conv2d: dtype mismatch \(x=float32, w=float64"),
    "conv2d f64 bias": (lambda: ops.conv2d(X, W, np.zeros(4)), TypeError, r"dtype mismatch .*b=float64"),
    "conv2d int x": (lambda: ops.conv2d(X.astype(np.int64), W),
                     TypeError, r"conv2d: x has dtype int64; expected float32 or float64"),
    "conv2d float16": (lambda: ops.conv2d(X.astype(np.float16), W.astype(np.float16)), TypeError, r"dtype float16"),
    "batch_norm2d f64 gamma": (lambda: ops.batch_norm2d(X, G.astype(np.float64), B),
                               TypeError, r"batch_norm2d: dtype mismatch"),
    "linear int": (lambda: ops.linear(np.ones((2, 5), np.int32), np.ones((2, 5), np.int32)),
                   TypeError, r"linear: x has dtype int32"),
    "relu int": (lambda: ops.relu(np.arange(3)), TypeError, r"relu: x has dtype int64"),
    "gelu bool": (lambda: ops.gelu(np.ones(3, bool)), TypeError, r"gelu: x has dtype bool"),
    "max_pool2d int": (lambda: ops.max_pool2d(X.astype(np.int32), 2), TypeError, r"max_pool2d: x has dtype int32"),
    "add mismatch": (lambda: ops.add(Tensor(X), Tensor(X.astype(np.float64))), TypeError, r"add: dtype mismatch"),
    "mul mismatch": (lambda: ops.mul(Tensor(X), Tensor(X.astype(np.float64))), TypeError, r"mul: dtype mismatch"),
    "concat dtype": (lambda: ops.concat_channels(X, X.astype(np.float64)), TypeError, r"x1 has dtype float64"),
    "model float64 input": (lambda: nn.PreActResNet(depth=8, in_channels=3, width=4)(X.astype(np.float64)), TypeError,
                            r"dtype mismatch"),
    "not an array": (lambda: ops.relu([1.0, 2.0]), TypeError, r"x must be a Tensor or an array, got list"),
    # --- kernel sizes, strides, paddings ----------------------------------------------
    "conv2d kernel > input": (lambda: ops.conv2d(X[:, :, :2, :2], W),
                              ValueError, r"conv2d: kernel 3 with padding 0 does not fit an input of size 2"),
    "conv2d kernel > input width": (lambda: ops.conv2d(X[:, :, :, :2], W),
                                    ValueError, r"does not fit an input of size 2"),
    "avg_pool2d kernel > input": (lambda: ops.avg_pool2d(X, 9),
                                  ValueError, r"avg_pool2d: kernel 9 with padding 0 does not fit an input of size 8"),
    "max_pool2d kernel > input": (lambda: ops.max_pool2d(X[:, :, :3, :3], 4, padding=0),
                                  ValueError, r"max_pool2d: kernel 4 .*does not fit"),
    "max_pool2d kernel > 16": (lambda: ops.max_pool2d(np.zeros((1, 1, 20, 20), np.float32), 17),
                               ValueError, r"k <= 16"),
    "max_pool2d padding": (lambda: ops.max_pool2d(X, 2, padding=2),
                           ValueError, r"padding 2 must be at most half the kernel"),
    "conv2d stride 0": (lambda: ops.conv2d(X, W, stride=0),
                        ValueError, r"conv2d: stride must be an integer >= 1, got 0"),
    "conv2d stride float": (lambda: ops.conv2d(X, W, stride=1.5),
                            ValueError, r"stride must be an integer >= 1, got 1.5"),
    "conv2d padding -1": (lambda: ops.conv2d(X, W, padding=-1), ValueError, r"padding must be an integer >= 0, got -1"),
    "avg_pool2d kernel 0": (lambda: ops.avg_pool2d(X, 0), ValueError, r"kernel must be an integer >= 1"),
    "pad_channels negative": (lambda: ops.pad_channels(X, -1, 2),
                              ValueError, r"before and after must be integers >= 0, got -1, 2"),
    "pad_channels float": (lambda: ops.pad_channels(X, 1.5, 2),
                           ValueError, r"before and after must be integers >= 0, got 1.5"),
    "reshape size": (lambda: ops.reshape(X, (5, -1)), ValueError, r"cannot reshape \(2, 3, 8, 8\) to \(5, -1\)"),
    "reshape two -1": (lambda: ops.reshape(X, (2, -1, -1)), ValueError, r"cannot reshape"),
    "reshape negative": (lambda: ops.reshape(X, (-2, -192)), ValueError, r"cannot reshape"),
    "reshape float": (lambda: ops.reshape(X, (2, 96.5)), ValueError, r"reshape: the new shape must hold integers"),
    "Conv2d layer kernel 0": (lambda: nn.Conv2d(3, 4, 0), ValueError, r"kernel_size must be a positive integer"),
    # --- batch norm statistics ------------------------------------------------------------
    "batch stats of one value": (lambda: ops.batch_norm2d(X[:1, :, :1, :1], G, B),
                                 ValueError, r"more than one value per channel"),
    "eval without running stats": (lambda: ops.batch_norm2d(X, G, B, use_batch_stats=False), ValueError,
                                   r"needs running_mean and running_var"),
    # --- cross entropy labels -----------------------------------------------------------
    "labels too large": (lambda: ops.cross_entropy(Z, np.array([0, 5, 1, 1])),
                         ValueError, r"labels must lie in \[0, 5\), got range \[0, 5\]"),
    "labels negative": (lambda: ops.cross_entropy(Z, np.array([0, -1, 1, 1])),
                        ValueError, r"labels must lie in \[0, 5\)"),
    "labels wrong length": (lambda: ops.cross_entropy(Z, T[:3]),
                            ValueError, r"labels must have shape \(4,\), got \(3,\)"),
    "labels 2-D": (lambda: ops.cross_entropy(Z, T[:, None]),
                   ValueError, r"labels must have shape \(4,\), got \(4, 1\)"),
    "labels float": (lambda: ops.cross_entropy(Z, T.astype(np.float32)),
                     TypeError, r"labels must be integers, got dtype float32"),
    "labels bool": (lambda: ops.cross_entropy(Z, T > 1), TypeError, r"labels must be integers, got dtype bool"),
    "empty batch": (lambda: ops.cross_entropy(Z[:0], T[:0]), ValueError, r"cross_entropy: needs at least one sample"),
    "logits int": (lambda: ops.cross_entropy(np.ones((4, 5), np.int64), T),
                   TypeError, r"cross_entropy: logits has dtype int64"),
    # --- models, layers, optimizers, policies ------------------------------------------------
    "depth 10": (lambda: nn.PreActResNet(depth=10), ValueError, r"depth 6n \+ 2 .*got 10"),
    "depth 2": (lambda: nn.PreActResNet(depth=2), ValueError, r"depth 6n \+ 2 .*got 2"),
    "depth 21": (lambda: nn.PreActResNet(depth=21), ValueError, r"got 21"),
    "shortcut name": (lambda: nn.PreActResNet(depth=8, shortcut="conv"),
                      ValueError, r"shortcut must be 'pad' or 'projection', got 'conv'"),
    "pad shortcut narrowing": (lambda: nn.PreActBlock(8, 4, stride=2, shortcut="pad"),
                               ValueError, r"cannot narrow 8 -> 4"),
    "Sequential item": (lambda: nn.Sequential(nn.ReLU(), ops.relu), TypeError, r"item 1 is a function, not a Module"),
    "SGD lr": (lambda: npapprox.optim.SGD([], lr=0.0), ValueError, r"lr must be positive, got 0.0"),
    "SGD decay": (lambda: npapprox.optim.SGD([], lr=0.1, decay="bias"),
                  ValueError, r"decay must be 'kernels' or 'all'"),
    "storage_policy type": (lambda: npapprox.storage_policy("exact").__enter__(),
                            TypeError, r"expects a Policy instance, got str"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gives_a_clear_error(case):
    fn, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_loss_refuses_backward(bad):
    x = Tensor(np.array([1.0, bad, 2.0]), requires_grad=True)
    loss = ops.sum_all(ops.mul(x, x))
    with pytest.raises(FloatingPointError, match=r"loss is not finite \((nan|inf)\); backward refused"):
        loss.backward()
    assert x.grad is None, "no gradient may be written after the refusal"


def test_overflowing_loss_refuses_backward():
    npapprox.nn.manual_seed(0)
    model = nn.PreActResNet(depth=8, in_channels=3, width=4)
    model.fc.weight.data[...] = np.float32(3e38)
    with np.errstate(all="ignore"):
        loss = ops.cross_entropy(model(X), np.array([0, 1]))
        assert not np.isfinite(loss.item())
        with pytest.raises(FloatingPointError, match="not finite"):
            loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_backward_needs_a_tensor_that_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        ops.sum_all(Tensor(np.ones(3))).backward()


def test_scalar_operands_take_the_tensor_dtype():
    # a Python number next to an array or tensor adopts its dtype (no silent float64 upcast)
    for a in (np.ones(3, np.float32), Tensor(np.ones(3, np.float32))):
        for op, expected in ((ops.add, 3.0), (ops.mul, 2.0)):
            y = op(a, 2.0)
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y.data, np.full(3, expected, np.float32))
    t = Tensor(np.ones(3, np.float32), requires_grad=True)
    assert (t - 1.0).dtype == np.float32 and (1.0 + t).dtype == np.float32 and (2 * t).dtype == np.float32
