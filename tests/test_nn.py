"""Modules, state dicts, BN train/eval behaviour, SGD against plain NumPy, end-to-end training."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from npapprox import Tensor, nn, no_grad, ops
from npapprox.optim import SGD


def _model(seed, **kw):
    nn.manual_seed(seed)
    args = dict(depth=8, num_classes=5, in_channels=3, width=4)
    args.update(kw)
    return nn.PreActResNet(**args)


X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


# --------------------------------------------------------------------------- #
# state_dict / save / load
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_state_dict_round_trip_through_npz(tmp_path, shortcut):
    a = _model(1, shortcut=shortcut)
    a(X)  # a training forward: running statistics move away from (0, 1)
    a(X * 2 + 1)
    path = tmp_path / "model.npz"
    a.save(path)

    b = _model(2, shortcut=shortcut)  # different initialisation
    a.eval(), b.eval()
    with no_grad():
        assert not np.array_equal(a(X).data, b(X).data)
    b.load(path)
    with no_grad():
        ya, yb = a(X).data, b(X).data
    assert ya.dtype == yb.dtype == np.float32
    assert np.array_equal(ya, yb), "outputs differ after load (eval mode)"
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k
    assert any(k.endswith("running_var") for k in sa) and any(k.endswith("running_mean") for k in sa)
    a.train(), b.train()
    assert np.array_equal(a(X).data, b(X).data), "outputs differ after load (train mode)"
    # the file holds exactly the state dict
    with np.load(path) as f:
        assert sorted(f.files) == sorted(sa)


def test_state_dict_is_a_copy_and_has_a_fixed_order():
    m = _model(3)
    sd = m.state_dict()
    sd["fc.weight"][...] = 0
    sd["blocks.0.bn1.running_mean"][...] = 7
    assert np.abs(m.fc.weight.data).sum() > 0
    assert not np.any(m.blocks[0].bn1.running_mean == 7)
    keys = list(sd)
    assert keys[:3] == ["conv.weight", "blocks.0.bn1.weight", "blocks.0.bn1.bias"]
    assert keys == list(_model(4).state_dict())
    params = [n for n, _ in m.named_parameters()]
    buffers = [n for n, _ in m.named_buffers()]
    assert keys == params + buffers
    assert len(m.parameters()) == len(params) == len(set(params))


def test_load_state_dict_errors_leave_the_model_unchanged():
    m = _model(5)
    before = m.state_dict()
    good = _model(6).state_dict()

    bad = dict(good)
    bad["blocks.1.conv2.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"blocks.1.conv2.weight has shape \(1, 2, 3, 3\), the model expects"):
        m.load_state_dict(bad)

    missing = dict(good)
    del missing["fc.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['fc.bias'\]"):
        m.load_state_dict(missing)

    extra = dict(good, **{"head.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match=r"unexpected keys \['head.weight'\]"):
        m.load_state_dict(extra)

    after = m.state_dict()
    for k in before:  # a failed load must not leave a half-loaded model behind
        assert np.array_equal(before[k], after[k]), f"{k} changed by a failed load"

    m.load_state_dict(missing, strict=False)  # non-strict: loads what is there
    assert np.array_equal(m.fc.weight.data, good["fc.weight"])
    assert np.array_equal(m.fc.bias.data, before["fc.bias"])


def test_load_keeps_parameter_identity_and_dtype():
    m = _model(7)
    w = m.conv.weight
    sd = {k: v.astype(np.float64) for k, v in _model(8).state_dict().items()}
    m.load_state_dict(sd)
    assert m.conv.weight is w and w.data.dtype == np.float32  # an optimizer holding w still sees it
    assert np.array_equal(w.data, sd["conv.weight"].astype(np.float32))


# --------------------------------------------------------------------------- #
# Batch norm: train / eval
# --------------------------------------------------------------------------- #
def _bn_layer(c, rng):
    bn = nn.BatchNorm2d(c)
    bn.weight.data[...] = rng.uniform(0.5, 2, c)
    bn.bias.data[...] = rng.standard_normal(c)
    bn.running_mean[...] = rng.standard_normal(c)
    bn.running_var[...] = rng.uniform(0.5, 2, c)
    return bn


def _bn_formula(x, gamma, beta, mean, var, eps=1e-5):
    x = x.astype(np.float64)
    return gamma[None, :, None, None] * (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps) \
        + beta[None, :, None, None]


def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
    rng = np.random.default_rng(1)
    bn = _bn_layer(3, rng)
    x = (rng.standard_normal((5, 3, 4, 4)) * 2 + 1).astype(np.float32)
    rm0, rv0 = bn.running_mean.copy().astype(np.float64), bn.running_var.copy().astype(np.float64)
    y = bn(x).data
    mean, var = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(y, _bn_formula(x, bn.weight.data, bn.bias.data, mean, var), rtol=1e-5, atol=1e-5)
    m = 5 * 4 * 4
    np.testing.assert_allclose(bn.running_mean, 0.9 * rm0 + 0.1 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, 0.9 * rv0 + 0.1 * var * m / (m - 1), rtol=1e-6, atol=1e-7)


def test_batchnorm_eval_uses_running_stats_and_does_not_update_them():
    rng = np.random.default_rng(2)
    bn = _bn_layer(3, rng).eval()
    x = (rng.standard_normal((5, 3, 4, 4)) * 2 + 1).astype(np.float32)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x).data
    np.testing.assert_allclose(y, _bn_formula(x, bn.weight.data, bn.bias.data, rm0, rv0), rtol=1e-5, atol=1e-5)
    assert np.array_equal(bn.running_mean, rm0) and np.array_equal(bn.running_var, rv0)
    # per-sample: the output of one sample does not depend on the rest of the batch
    assert np.array_equal(bn(x[2:3]).data, y[2:3])
    # gradient through eval BN: gamma / sigma * gy (the statistics are constants)
    xt = Tensor(x, requires_grad=True)
    ops.sum_all(bn(xt)).backward()
    expected = np.broadcast_to((bn.weight.data / np.sqrt(rv0 + 1e-5))[None, :, None, None], x.shape)
    np.testing.assert_allclose(xt.grad, expected, rtol=1e-6)


def test_batchnorm_eval_batch_stats_option():
    rng = np.random.default_rng(3)
    bn = _bn_layer(2, rng)
    bn.eval_batch_stats = True
    bn.eval()
    x = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    rm0 = bn.running_mean.copy()
    y = bn(x).data
    mean, var = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(y, _bn_formula(x, bn.weight.data, bn.bias.data, mean, var), rtol=1e-5, atol=1e-5)
    assert np.array_equal(bn.running_mean, rm0)


def test_train_eval_switch_reaches_every_module():
    m = _model(9)
    assert all(mod.training for _, mod in m.named_modules())
    assert m.eval() is m and not any(mod.training for _, mod in m.named_modules())
    with no_grad():
        y_eval1 = m(X).data
        y_eval2 = m(X[:1]).data
    np.testing.assert_allclose(y_eval2, y_eval1[:1], rtol=1e-5, atol=1e-6)  # eval: per-sample
    m.train()
    assert all(mod.training for _, mod in m.named_modules())
    stats = m.state_dict()["bn.running_mean"].copy()
    y_train = m(X).data
    assert not np.allclose(y_train, y_eval1)
    assert not np.array_equal(m.state_dict()["bn.running_mean"], stats)  # train: stats move


# --------------------------------------------------------------------------- #
# SGD against the plain NumPy formula
# --------------------------------------------------------------------------- #
def _sgd_reference(ws, grads_per_step, lr, momentum, wd, nesterov, decay):
    """PyTorch-convention SGD in float64 NumPy: d = g + wd w (kernels only unless decay='all');
    v = d (first step) else momentum v + d;  w -= lr (d + momentum v if nesterov else v)."""
    ws = [w.astype(np.float64) for w in ws]
    vs = [None] * len(ws)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            d = g.astype(np.float64)
            if wd and (decay == "all" or ws[i].ndim >= 2):
                d = d + wd * ws[i]
            if momentum:
                vs[i] = d.copy() if vs[i] is None else momentum * vs[i] + d
                d = d + momentum * vs[i] if nesterov else vs[i]
            ws[i] = ws[i] - lr * d
    return ws


@pytest.mark.parametrize("momentum,wd,nesterov,decay", [
    (0.9, 5e-4, False, "kernels"),
    (0.9, 1e-2, True, "kernels"),
    (0.0, 1e-2, False, "kernels"),
    (0.5, 1e-2, False, "all"),
    (0.9, 0.0, True, "all"),
])
def test_sgd_matches_numpy_formula(momentum, wd, nesterov, decay):
    rng = np.random.default_rng(4)
    shapes = [(2, 3, 3, 3), (2,), (4, 5), (5,)]  # conv kernel, BN/bias vector, linear kernel, bias
    ws = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [nn.Parameter(w.copy()) for w in ws]
    opt = SGD(params, lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov, decay=decay)
    steps = []
    for step in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if step == 1:
            grads[3] = None  # a parameter without gradient is left alone this step
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        steps.append(grads)
    expected = _sgd_reference(ws, steps, 0.05, momentum, wd, nesterov, decay)
    for p, e in zip(params, expected, strict=True):
        assert p.data.dtype == np.float32
        np.testing.assert_allclose(p.data, e, rtol=1e-6, atol=1e-6)


def test_sgd_decays_kernels_only_by_default():
    w, b = nn.Parameter(np.ones((2, 2), np.float32)), nn.Parameter(np.ones(2, np.float32))
    opt = SGD([w, b], lr=1.0, weight_decay=0.1)
    w.grad, b.grad = np.zeros((2, 2), np.float32), np.zeros(2, np.float32)
    opt.step()
    np.testing.assert_allclose(w.data, 0.9)
    np.testing.assert_array_equal(b.data, 1.0)
    opt.zero_grad()
    assert w.grad is None and b.grad is None


# --------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------- #
def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()  # ships with scikit-learn: no download
    x = (d.images.astype(np.float32) / 16.0 - 0.3)[:, None]  # (1797, 1, 8, 8)
    return x, d.target


def test_small_resnet_learns_digits():
    x, y = _digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    train, test = idx[:1024], idx[1024:1536]
    model = _model(0, num_classes=10, in_channels=1, width=8)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def loss_on(ix):
        with no_grad():
            return ops.cross_entropy(model(x[ix]), y[ix]).item()

    initial = loss_on(train[:256])
    for _ in range(30):
        b = rng.choice(train, 64, replace=False)
        loss = ops.cross_entropy(model(x[b]), y[b])
        model.zero_grad()
        loss.backward()
        opt.step()
    final = loss_on(train[:256])
    assert initial > 2.0, initial  # ~ln 10 at initialisation
    assert final < 0.25 * initial, (initial, final)  # measured: 2.47 -> 0.12
    model.eval()
    with no_grad():
        accuracy = float((model(x[test]).data.argmax(axis=1) == y[test]).mean())
    assert accuracy > 0.7, accuracy  # held out, running statistics; measured 0.92; chance 0.1


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    x, y = _digits()
    rng = np.random.default_rng(1)
    batches = [rng.choice(len(x), 32, replace=False) for _ in range(6)]

    def run(model, opt, bs):
        for b in bs:
            loss = ops.cross_entropy(model(x[b]), y[b])
            model.zero_grad()
            loss.backward()
            opt.step()

    def fresh(seed):
        m = _model(seed, num_classes=10, in_channels=1, width=4)
        return m, SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)

    m1, o1 = fresh(0)
    run(m1, o1, batches)

    m2, o2 = fresh(0)
    run(m2, o2, batches[:3])
    m2.save(tmp_path / "ckpt.npz")
    opt_state = o2.state_dict()
    m3, o3 = fresh(123)
    m3.load(tmp_path / "ckpt.npz")
    o3.load_state_dict(opt_state)
    run(m3, o3, batches[3:])
    s1, s3 = m1.state_dict(), m3.state_dict()
    for k in s1:
        assert np.array_equal(s1[k], s3[k]), k


def test_module_utilities():
    m = _model(10)
    ops.sum_all(m(X)).backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m.astype(np.float64)
    assert all(p.data.dtype == np.float64 for p in m.parameters())
    assert all(b.dtype == np.float64 for _, b in m.named_buffers())
    assert m(X.astype(np.float64)).dtype == np.float64
    seq = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.GlobalAvgPool2d())
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU)
    out = seq(X)
    np.testing.assert_allclose(out.data, np.maximum(np.einsum("fc,nchw->nfhw", seq[0].weight.data[:, :, 0, 0], X), 0)
                               .mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert "PreActResNet(" in repr(m) and "(conv1): Conv2d" in repr(m)
    with pytest.raises(RuntimeError, match="must call super"):
        class Broken(nn.Module):
            def __init__(self):
                self.x = 1
        Broken()


def test_trace_modules_records_calls_in_order_inside_its_block_and_thread():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    seq = nn.Sequential(a, b)
    x = np.zeros((1, 3), np.float32)
    with no_grad():
        seq(x)                                        # before the block: not recorded
        with nn.trace_modules() as called:
            seq(x)
            b(x)
            with nn.trace_modules() as inner:
                a(x)
            worker = threading.Thread(target=seq, args=(x,))   # another thread's calls are its own
            worker.start()
            worker.join()
        seq(x)                                        # after the block: not recorded
    assert [id(m) for m in called] == [id(m) for m in (seq, a, b, b, a)]
    assert [id(m) for m in inner] == [id(a)]
    assert "forward" not in a.__dict__                # nothing patched on the instances
