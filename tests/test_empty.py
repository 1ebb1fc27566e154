"""Empty and absurd sizes: an empty batch (or channel axis) goes through every op and
whole models as an empty tensor, with the gradients PyTorch gives (zeros for the
parameters); sizes the kernels cannot index are refused up front."""
from __future__ import annotations

import numpy as np
import pytest

import npapprox
from npapprox import Tensor, ops
from npapprox.nn.zoo import MODEL_NAMES, build_model
from npapprox.policy import MAX_GROUP, Generic

F32 = np.float32


def _run(np_fn, torch, torch_fn, shapes, diff):
    """np_fn and torch_fn on the same inputs of ``shapes``; backprop the sum of the
    output; compare output shape and every gradient (all float32) with torch's."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(F32) for s in shapes]
    xs = [Tensor(a, requires_grad=i in diff) for i, a in enumerate(arrays)]
    y = np_fn(*xs)
    ops.sum_all(y).backward()
    ts = [torch.tensor(a, requires_grad=i in diff) for i, a in enumerate(arrays)]
    yt = torch_fn(*ts)
    yt.sum().backward()
    assert tuple(y.shape) == tuple(yt.shape) and y.dtype == F32
    np.testing.assert_allclose(y.data, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    for i in diff:
        assert xs[i].grad.shape == arrays[i].shape
        np.testing.assert_allclose(xs[i].grad, ts[i].grad.numpy(), rtol=1e-5, atol=1e-5)
    return xs, y


def test_conv2d_on_an_empty_batch(torch):
    xs, _ = _run(lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding=1), torch,
                 lambda x, w, b: torch.nn.functional.conv2d(x, w, b, stride=2, padding=1),
                 [(0, 3, 6, 6), (4, 3, 3, 3), (4,)], (0, 1, 2))
    assert not xs[1].grad.any() and not xs[2].grad.any()   # d(sum over nothing)/dw = 0


@pytest.mark.parametrize("c,f", [(0, 4), (3, 0), (0, 0)])
def test_conv2d_without_input_or_output_channels(c, f):
    # by hand (PyTorch refuses F = 0 and gives 0 channels out for C = 0): with no input
    # channel the output is the bias; with no filter it has no channel
    x = Tensor(np.ones((2, c, 6, 6), F32), requires_grad=True)
    w = Tensor(np.ones((f, c, 3, 3), F32), requires_grad=True)
    b = Tensor(np.arange(f, dtype=F32), requires_grad=True)
    y = ops.conv2d(x, w, b, stride=2, padding=1)
    ops.sum_all(y).backward()
    assert y.shape == (2, f, 3, 3)
    np.testing.assert_array_equal(y.data, np.broadcast_to(b.data[None, :, None, None], y.shape))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert not x.grad.any()   # no path from x to y: no input channel, or no filter
    np.testing.assert_array_equal(b.grad, np.full(f, 2 * 3 * 3, F32))


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d", "global_avg_pool2d", "relu", "tanh", "gelu",
                                "flatten", "pad_channels"])
def test_pointwise_pooling_and_shape_ops_on_an_empty_batch(torch, op):
    F = torch.nn.functional
    fns = {"max_pool2d": (lambda x: ops.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
           "avg_pool2d": (lambda x: ops.avg_pool2d(x, 2), lambda x: F.avg_pool2d(x, 2)),
           "global_avg_pool2d": (ops.global_avg_pool2d, lambda x: x.mean(dim=(2, 3))),
           "relu": (ops.relu, torch.relu), "tanh": (ops.tanh, torch.tanh),
           "gelu": (ops.gelu, F.gelu), "flatten": (ops.flatten, lambda x: x.flatten(1)),
           "pad_channels": (lambda x: ops.pad_channels(x, 1, 2), lambda x: F.pad(x, (0, 0, 0, 0, 1, 2)))}
    _run(*fns[op][:1], torch, fns[op][1], [(0, 2, 6, 6)], (0,))


def test_linear_on_an_empty_batch(torch):
    xs, y = _run(ops.linear, torch, torch.nn.functional.linear, [(0, 5), (3, 5), (3,)], (0, 1, 2))
    assert y.shape == (0, 3) and not xs[1].grad.any() and not xs[2].grad.any()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_on_an_empty_batch_is_pytorchs(torch, training, relu):
    # PyTorch: empty output, zero gamma / beta gradients, running statistics untouched
    rm, rv = np.float32([0.5, -1, 2]), np.float32([1, 2, 3])
    rm0, rv0 = rm.copy(), rv.copy()
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    act = (lambda t: torch.relu(t)) if relu else (lambda t: t)
    xs, y = _run(lambda x, g, b: ops.batch_norm2d(x, g, b, rm, rv, use_batch_stats=training, relu=relu), torch,
                 lambda x, g, b: act(torch.nn.functional.batch_norm(x, rm_t, rv_t, g, b, training=training)),
                 [(0, 3, 4, 4), (3,), (3,)], (0, 1, 2))
    assert y.shape == (0, 3, 4, 4) and not xs[1].grad.any() and not xs[2].grad.any()
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    np.testing.assert_array_equal(rm_t.numpy(), rm0)


def test_batch_statistics_of_one_value_are_still_refused():
    with pytest.raises(ValueError, match="more than one value per channel"):
        ops.batch_norm2d(np.ones((1, 2, 1, 1), F32), np.ones(2, F32), np.zeros(2, F32))


@pytest.mark.parametrize("policy", ["exact", "paper4", "generic4", "naive4", "approx4"])
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n in ("resnet8", "vgg11", "densenet40")])
def test_whole_model_forward_and_backward_with_batch_zero(name, policy):
    npapprox.nn.manual_seed(0)
    model = build_model(name, width=4) if name != "vgg11" else build_model(name)
    before = {k: np.copy(v) for k, v in model.state_dict().items()}
    with npapprox.storage_policy(npapprox.policy.policy_from_name(policy)):
        out = model(Tensor(np.zeros((0, 3, 32, 32), F32)))
        ops.sum_all(out).backward()
    assert out.shape == (0, 10)
    params = list(model.parameters())
    assert params and all(p.grad is not None and p.grad.shape == p.shape and not p.grad.any() for p in params)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())  # running stats too


def test_cross_entropy_of_an_empty_batch_is_a_clear_error():
    # PyTorch returns NaN (a mean over nothing), which backward() would refuse anyway
    with pytest.raises(ValueError, match="needs at least one sample"):
        ops.cross_entropy(np.zeros((0, 5), F32), np.zeros(0, np.int64))


@pytest.mark.parametrize("group", [0, -1, MAX_GROUP + 1, 2**63, 2**64, 1.5, True, "8"])
def test_generic_group_out_of_range_is_refused_up_front(group):
    with pytest.raises(ValueError, match=r"group must be an integer in \[1, 2147483647\]"):
        Generic(4, group=group)


@pytest.mark.parametrize("bits", [0, 3, 16, 2**63, True])
def test_generic_bits_are_checked_up_front(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        Generic(bits)


def test_largest_generic_group_packs_like_one_group():
    # a group larger than the tensor is one group of all its values
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(F32)
    with npapprox.storage_policy(Generic(4, group=MAX_GROUP)):
        a = ops.tanh(Tensor(x, requires_grad=True))
    with npapprox.storage_policy(Generic(4, group=x.size)):
        b = ops.tanh(Tensor(x, requires_grad=True))
    sa, sb = a._ctx.saved["y"], b._ctx.saved["y"]
    assert np.array_equal(sa.packed, sb.packed) and np.array_equal(sa.restore(), sb.restore())
