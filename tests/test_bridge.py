"""The PyTorch bridge (npapprox.bridge) against the engine and against plain torch.

Oracles: the independent torch mirror of the ResNets (tests/torch_models.py) for
"plain torch", the engine's own policies and ledger for what is stored, and the
engine's gradients computed from the *same* codes (``Replay``) for the backward."""
from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import os
import sys

import numpy as np
import pytest
from conftest import require_openmp, require_torch
from threadpoolctl import threadpool_limits

import npapprox as na
from npapprox import Tensor, kernels, ops, parallel
from npapprox.policy import FitWindow
from npapprox.storage import GenericPacked, PooledRef
from npapprox.tensor import topological_order
from npapprox.units import BNReLUUnit, PaperUnit

torch = require_torch()
F = torch.nn.functional
from npapprox import bridge
from npapprox.bridge import storage as bstorage
from npapprox.bridge import views

from model_oracle import randomise_bn
from torch_models import TorchPreActResNet


def _ctx(name="BatchNormReLU"):
    return bstorage._op(name)


def _data(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32), rng.integers(0, 10, n)


def _resnet20(seed=1):
    na.nn.manual_seed(0)
    m = na.nn.preact_resnet20()
    randomise_bn(m, np.random.default_rng(seed))
    return m


def _torch_step(module, x, y, policy=None):
    """Logits, loss and {name: grad} of one training step of a copy of ``module``."""
    module = copy.deepcopy(module)
    with bridge.storage_policy(policy) if policy is not None else _null():
        out = module(torch.from_numpy(x))
        loss = F.cross_entropy(out, torch.from_numpy(y))
    loss.backward()
    return out.detach(), {n: p.grad for n, p in module.named_parameters()}, dict(module.named_buffers())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- #
# import, conversion, bad input
# --------------------------------------------------------------------------- #
def test_import_without_torch_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "npapprox.bridge" or n.startswith("npapprox.bridge.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)        # what a missing install looks like to import
    with pytest.raises(ImportError) as err:
        importlib.import_module("npapprox.bridge")
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'npapprox[torch]'" in msg


def _plain(mod):
    """A module's attributes other than parameters, sub-modules and buffers (policies by repr)."""
    return {k: repr(v) for k, v in mod.__dict__.items()
            if k != "_buffers" and k not in mod._buffers and not isinstance(v, (na.nn.Module, na.nn.Parameter))}


@pytest.mark.parametrize("build", [
    lambda: na.nn.preact_resnet20(),
    lambda: na.nn.build_model("resnet20", shortcut="projection", activation="tanh", width=4),
    lambda: na.nn.PreActResNet(depth=11, block="bottleneck", width=4, shortcut="projection"),
    lambda: na.nn.VGG((8, "M", 16, "M"), input_size=8, classifier="flatten"),
    lambda: na.nn.densenet_bc(depth=10, growth_rate=4, input_size=8),
], ids=["resnet20", "resnet20-tanh-projection", "bottleneck-projection", "vgg", "densenet"])
def test_round_trip_and_forward(build):
    """from_torch(to_torch(m)) is m (names, order, values, attributes); the torch
    module's forward agrees with the engine's (float32 tolerance: different kernels)."""
    na.nn.manual_seed(0)
    m = build()
    randomise_bn(m, np.random.default_rng(2))
    t = bridge.to_torch(m)
    sd = m.state_dict()
    assert set(t.state_dict()) == set(sd)
    arrays = bridge.state_dict_to_arrays(t.state_dict())
    assert all(np.array_equal(arrays[k], sd[k]) for k in sd)
    back = bridge.from_torch(t)
    sd2 = back.state_dict()
    assert list(sd2) == list(sd) and all(np.array_equal(sd2[k], sd[k]) and sd2[k].dtype == sd[k].dtype for k in sd)
    assert ([(n, type(x).__name__) for n, x in back.named_modules()]
            == [(n, type(x).__name__) for n, x in m.named_modules()])
    assert [_plain(a) for _, a in back.named_modules()] == [_plain(b) for _, b in m.named_modules()]
    assert any(mod.storage is not None for _, mod in back.named_modules())   # e.g. the exact last unit
    t2 = bridge.to_torch(build())            # other weights, then ours loaded by name
    t2.load_state_dict(bridge.arrays_to_state_dict(sd))
    assert all(torch.equal(v, torch.from_numpy(sd[k])) for k, v in t2.state_dict().items())
    size = 8 if isinstance(m, (na.nn.VGG, na.nn.DenseNet)) else 16
    x = np.random.default_rng(3).standard_normal((4, 3, size, size)).astype(np.float32)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        getattr(t, mode)()
        with na.no_grad():
            ref = m(Tensor(x)).data
        got = t(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=mode)


def test_unconvertible_model_and_module_are_named():
    class Odd(na.nn.Module):
        def forward(self, x):
            return x

    m = na.nn.preact_resnet20()
    m.blocks.__dict__["2"].extra_layer = Odd()
    with pytest.raises(TypeError, match=r"'blocks\.2\.extra_layer'.*Odd"):
        bridge.to_torch(m)
    with pytest.raises(TypeError, match=r"'\(root\)' \(Linear\) was not made by npapprox.bridge.to_torch"):
        bridge.from_torch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("policy, match", [
    (na.Naive(4), r"cannot apply Naive\(bits=4\): it changes the forward pass"),
    (na.ApproxForward(8), r"cannot apply ApproxForward\(bits=8\)"),
    (na.Paper(4, fallback=na.Naive(2)), r"cannot apply Naive\(bits=2\)"),
])
def test_policies_the_bridge_cannot_apply(policy, match):
    with pytest.raises(ValueError, match=match):
        with bridge.storage_policy(policy):
            pass
    with pytest.raises(TypeError, match="expects an npapprox Policy"):
        with bridge.storage_policy("paper4"):
            pass
    bn = bridge.to_torch(na.nn.BatchNorm2d(3, relu=True)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"Paper\(bits=4\) stores float32 or float64 activations, got torch.bfloat16"):
        with bridge.storage_policy(na.Paper(4)):
            bn(torch.ones(2, 3, 2, 2, dtype=torch.bfloat16, requires_grad=True))


@pytest.mark.parametrize("policy", [na.Paper(4), na.Generic(4, group=64)], ids=repr)
def test_non_finite_activation_raises_as_the_engine(policy):
    t = bridge.to_torch(_resnet20())
    x, y = _data(2, size=8)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite") as engine_err:
        with na.storage_policy(policy):
            ops.cross_entropy(_resnet20()(x), y)
    with pytest.raises(FloatingPointError, match="non-finite") as bridge_err:
        with bridge.storage_policy(policy):
            t(torch.from_numpy(x))
    assert type(bridge_err.value) is type(engine_err.value)
    # a non-finite value in an activation that goes through the saved-tensor hooks (the fc input)
    lin = bridge.to_torch(na.nn.Linear(4, 3))
    with pytest.raises(FloatingPointError, match="non-finite"):
        with bridge.storage_policy(policy):
            lin(torch.full((2, 4), np.inf).requires_grad_().exp())


# --------------------------------------------------------------------------- #
# one unit: codes against the engine
# --------------------------------------------------------------------------- #
def _unit_case(seed=0):
    """x (4, 8, 6, 6), gamma, beta: ordinary channels, gamma < 0, gamma = 0,
    |beta/gamma| > 3 both ways, a denormal gamma, and a channel of denormal inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 8, 6, 6)).astype(np.float32) * 2 + 0.5
    x[:, 7] = rng.integers(1, 50, (4, 6, 6)).astype(np.float32) * np.float32(1e-44)   # denormals
    gamma = np.array([1.3, -0.7, 0.0, 0.2, 0.1, 1e-40, 0.8, 1.1], np.float32)
    beta = np.array([0.1, 0.3, 0.5, 1.0, -0.5, 0.2, 0.0, -0.2], np.float32)
    return x, gamma, beta


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unit_codes_match_the_engine(bits):
    x, gamma, beta = _unit_case()
    bn = bridge.to_torch(na.nn.BatchNorm2d(8, relu=True))
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    tx = torch.from_numpy(x).requires_grad_()
    with bstorage.record() as saved, bridge.storage_policy(na.Paper(bits)):
        h = bn(tx)
    unit = next(s for _, s in saved if isinstance(s, PaperUnit))
    y_t = F.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta),
                       training=True).numpy()
    assert torch.equal(h, F.relu(torch.from_numpy(y_t)))                  # forward: torch's, bit for bit
    # (a) the same y: the engine's Paper unit stores the same bytes
    ref = na.Paper(bits).store_unit(_ctx(), "unit", BNReLUUnit(None, y_t, None, None, gamma, beta))
    assert unit.packed.tobytes() == ref.packed.tobytes() and np.array_equal(unit.s, ref.s)
    assert np.array_equal(unit.mask(), y_t > 0)                           # the mask is exact
    # (b) the engine's own op on the same x: a code may differ only where the two BN
    # implementations round y differently and y sits at a bin edge; count them
    with na.storage_policy(na.Paper(bits)):
        out = ops.batch_norm2d(Tensor(x, requires_grad=True), Tensor(gamma), Tensor(beta), relu=True)
    eng = out._ctx.saved["unit"]
    y_e = ops.batch_norm2d(Tensor(x), Tensor(gamma), Tensor(beta)).data
    n = x.size
    a = kernels.unpack_bits(unit.packed, n, bits).astype(int)
    b = kernels.unpack_bits(eng.packed, n, bits).astype(int)
    differ = a != b
    assert np.all(y_e.reshape(-1)[differ] != y_t.reshape(-1)[differ])    # only where y itself differs
    assert np.all(np.abs(a - b)[differ] == 1) and differ.sum() <= max(2, n // 1000)
    assert np.array_equal(eng.mask(), y_e > 0) and np.array_equal(unit.s, eng.s)


# --------------------------------------------------------------------------- #
# a whole ResNet-20: Exact bit-identical to torch, Paper(4) against the engine
# --------------------------------------------------------------------------- #
def _mirror(m):
    t = TorchPreActResNet(20)
    t.load_state_dict(bridge.arrays_to_state_dict(m.state_dict()), strict=False)
    return t


def test_exact_is_bit_identical_to_plain_torch():
    m = _resnet20()
    x, y = _data(8)
    logits0, grads0, buffers0 = _torch_step(_mirror(m), x, y)
    t = bridge.to_torch(m)
    for policy in (None, na.Exact()):
        logits, grads, buffers = _torch_step(t, x, y, policy)
        assert torch.equal(logits, logits0), policy
        assert set(grads) == set(grads0)
        assert [n for n in grads if not torch.equal(grads[n], grads0[n])] == [], policy
        assert [n for n in buffers if not torch.equal(buffers[n], buffers0[n])] == [], policy


class Replay(na.Paper):
    """An engine policy that hands out the bridge's stored forms in order, so the
    engine's backward runs on exactly the bridge's codes."""

    def __init__(self, bits, stored):
        super().__init__(bits)
        self.units = [s for s in stored if isinstance(s, PaperUnit)]
        self.acts = [s for s in stored if isinstance(s, GenericPacked)]

    def store_unit(self, ctx, name, u):
        return self.units.pop(0)

    def store_activation(self, ctx, name, array):
        return self.acts.pop(0)


def _engine_grads(m, x, y, policy):
    m = copy.deepcopy(m)
    with na.storage_policy(policy):
        loss = ops.cross_entropy(m(x), y)
    codes = [s for c in topological_order(loss._ctx) for s in c.saved.values() if isinstance(s, PaperUnit)]
    codes = [kernels.unpack_bits(u.packed, int(np.prod(u.shape)), u.bits) for u in codes]
    loss.backward()
    return {n: p.grad for n, p in m.named_parameters()}, codes


def test_paper4_forward_is_torch_and_gradients_are_the_engines():
    """Forward logits: bit-identical to plain torch. Gradients: the engine's Paper(4)
    gradients computed from the bridge's own codes (``Replay``) agree to 5e-5 of each
    gradient's largest entry (measured: 6e-6): what is left differs only by float32 rounding (torch's
    1/sigma and BN sums against the engine's, convolution backward summation order
    over up to N*H*W = 8192 terms). The engine's *own* codes differ from the bridge's
    where torch's BN rounds y across a bin edge: counted (at most 1 in 10^5 codes,
    each off by one bin), and their effect on the gradients is bounded (5e-2 of the
    largest entry, measured 2e-2 from 2 flips: one bin, 0.375 sigma, at one position of a
    batch of 8 moves a small layer's weight gradient)."""
    m = _resnet20()
    x, y = _data(8)
    t = bridge.to_torch(m)
    logits0, _, _ = _torch_step(_mirror(m), x, y)
    with bstorage.record() as saved:
        logits, grads, _ = _torch_step(t, x, y, na.Paper(4))
    assert torch.equal(logits, logits0)
    stored = [s for _, s in saved]
    replay, _ = _engine_grads(m, x, y, Replay(4, stored))
    own, engine_codes = _engine_grads(m, x, y, na.Paper(4))
    bridge_codes = [kernels.unpack_bits(s.packed, int(np.prod(s.shape)), 4) for s in stored if isinstance(s, PaperUnit)]
    assert len(bridge_codes) == len(engine_codes) == 18
    total = sum(c.size for c in bridge_codes)
    flips = [(a.astype(int) - b.astype(int))[a != b] for a, b in zip(bridge_codes, engine_codes, strict=True)]
    n_flips = sum(f.size for f in flips)
    assert all(np.all(np.abs(f) == 1) for f in flips) and n_flips <= total // 100_000, (n_flips, total)
    for name, g in grads.items():
        g = g.numpy()
        scale = np.abs(replay[name]).max()
        np.testing.assert_allclose(g, replay[name], rtol=0, atol=5e-5 * scale, err_msg=name)
        np.testing.assert_allclose(g, own[name], rtol=0, atol=5e-2 * scale, err_msg=name)


def test_generic_policy_runs_and_matches_the_engine_ledger():
    m = _resnet20()
    x, y = _data(2, size=16)
    t = bridge.to_torch(m)
    policy = na.Generic(4, group=64)
    logits0, grads0, _ = _torch_step(t, x, y)
    logits, grads, _ = _torch_step(t, x, y, policy)
    assert torch.equal(logits, logits0)
    for n in grads:          # 4-bit storage: close to exact, not equal
        assert torch.isfinite(grads[n]).all()
        assert float((grads[n] - grads0[n]).norm()) <= 0.5 * float(grads0[n].norm()) + 1e-6, n
    _same_activation_entries(bridge.ledger(t, torch.from_numpy(x), y, policy), na.ledger(m, x, y, policy))


# --------------------------------------------------------------------------- #
# the ledger
# --------------------------------------------------------------------------- #
def _activation_entries(ledger):
    return [(e.module, e.kind, e.form, e.bits, e.shape, e.payload, e.meta) for e in ledger.entries
            if e.kind in ("activation", "unit")]


def _same_activation_entries(got, ref):
    assert _activation_entries(got) == _activation_entries(ref)
    assert got.activation_stored == ref.activation_stored


@pytest.mark.parametrize("policy", [na.Paper(4), na.Exact(), na.Generic(2, group=100)], ids=repr)
def test_meta_ledger_equals_the_real_one(policy):
    m = _resnet20()
    t = bridge.to_torch(m)
    x, y = _data(2, size=8)
    real = bridge.ledger(t, torch.from_numpy(x), y, policy)
    meta = bridge.ledger(t, torch.empty(x.shape, device="meta"), y, policy)
    assert [(e.module, e.op, e.name, e.kind, e.form, e.bits, e.shape, e.payload, e.meta) for e in real.entries] == \
           [(e.module, e.op, e.name, e.kind, e.form, e.bits, e.shape, e.payload, e.meta) for e in meta.entries]
    _same_activation_entries(real, na.ledger(m, x, y, policy))


def test_resnet164_ledger_at_batch_128_equals_the_engines():
    """The paper's network and batch: the bridge's shape-only pass against the
    engine's real forward, entry by entry (module, form, bits, shape, bytes)."""
    na.nn.manual_seed(0)
    m = na.nn.preact_resnet164()
    x, y = _data(128)
    ref = na.ledger(m, x, y, na.Paper(4))
    got = bridge.ledger(bridge.to_torch(m), torch.empty(x.shape, device="meta"), y, na.Paper(4))
    _same_activation_entries(got, ref)
    units = [e for e in got.entries if e.kind == "unit"]
    assert len(units) == 3 * 18 * 3 + 1 and sum(e.form == "paper" for e in units) == len(units) - 1


def test_unit_output_is_stored_once():
    """The conv (and a projection shortcut) reading a unit's output store references:
    one K-bit tensor per unit, as the engine."""
    na.nn.manual_seed(0)
    m = na.nn.build_model("resnet8", shortcut="projection")
    L = bridge.ledger(bridge.to_torch(m), torch.from_numpy(_data(2, size=8)[0]), None, na.Paper(4))
    refs = [e for e in L.entries if e.form == "ref:paper"]
    assert refs and all(e.payload == 0 for e in refs)
    assert {e.module.rsplit(".", 1)[-1] for e in refs} == {"conv1", "conv2", "proj"}


@pytest.mark.parametrize("build", [
    lambda: na.nn.VGG((8, "M", 16, "M"), input_size=8),
    lambda: na.nn.VGG((8, "M", 16, "M"), input_size=8, exact_pool_units=False),
    lambda: na.nn.densenet_bc(depth=10, growth_rate=4, input_size=8),
    lambda: na.nn.build_model("resnet8", activation="tanh", shortcut="projection"),
], ids=["vgg", "vgg-pool-units-k-bit", "densenet", "resnet8-tanh"])
def test_other_models_keep_the_engines_activation_bytes(build):
    """Under Paper(4), real and shape-only: the activation and unit entries equal the
    engine's (a max-pool output that a conv reads is a ``PooledRef``, 0 bytes, as in
    the engine), and so do the max-pools' argmax entries (uint8 window offsets)."""
    na.nn.manual_seed(0)
    m = build()
    t = bridge.to_torch(m)
    x, y = _data(4, size=8)
    engine = na.ledger(m, x, y, na.Paper(4))
    for xin in (torch.from_numpy(x), torch.empty(x.shape, device="meta")):
        got = bridge.ledger(t, xin, y, na.Paper(4))
        # names and order may differ (the bridge names a tanh's save after the unit it runs under)
        assert sorted(e[1:] for e in _activation_entries(got)) == sorted(e[1:] for e in _activation_entries(engine))
        assert got.activation_stored == engine.activation_stored
        assert _argmax_entries(got) == _argmax_entries(engine)
    if isinstance(m, na.nn.VGG):
        assert sum(e.form.startswith("ref:pool") for e in engine.entries) == 1


def _argmax_entries(ledger):
    return [(e.module, e.kind, e.form, e.shape, e.payload) for e in ledger.entries if e.name == "argmax"]


def _pool_net(kernel, stride, padding):
    """conv -> BN-ReLU unit -> max-pool -> conv -> BN-ReLU -> 2x2 max-pool -> linear (8x8 input)."""
    na.nn.manual_seed(0)
    L = na.nn.layers
    m = na.nn.Sequential(L.Conv2d(3, 8, 3, padding=1), L.BatchNorm2d(8, relu=True),
                         L.MaxPool2d(kernel, stride, padding), L.Conv2d(8, 8, 3, padding=1),
                         L.BatchNorm2d(8, relu=True), L.MaxPool2d(2), na.nn.Flatten(), L.Linear(8 * 4, 10))
    for mod in m:
        if isinstance(mod, L.BatchNorm2d):
            rng = np.random.default_rng(mod.channels)
            mod.weight.data[...] = rng.uniform(0.5, 1.5, 8)
            mod.bias.data[...] = 0.5 * rng.standard_normal(8)     # many ReLU zeros: ties in the windows
    return m


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)], ids=["2x2", "3x3-stride2-pad1"])
def test_max_pool_keeps_the_engines_argmax_and_exact_gradients_are_torchs(pool):
    """The bridge's max-pool: under Exact() logits and every gradient bit-identical to
    plain torch (overlapping and padded windows, ties after ReLU); under Paper(4) the
    argmax offsets are the engine's bytes, the conv after the pool rebuilds its input
    from the unit's codes (0 bytes) bit-identical to the engine's ``PooledRef``, and
    the ledger is the engine's."""
    m = _pool_net(*pool)
    t = bridge.to_torch(m)
    x, y = _data(4, size=8)
    logits0, grads0, _ = _torch_step(t, x, y)
    logits, grads, _ = _torch_step(t, x, y, na.Exact())
    assert torch.equal(logits, logits0)
    for n in grads0:
        assert torch.equal(grads[n], grads0[n]), n
    engine = na.ledger(m, x, y, na.Paper(4))
    got = bridge.ledger(copy.deepcopy(t), torch.from_numpy(x), y, na.Paper(4))
    _same_activation_entries(got, engine)
    assert _argmax_entries(got) == _argmax_entries(engine) and len(_argmax_entries(got)) == 2

    # the conv after a pool rebuilds its input as the engine's PooledRef does from the same form and argmax
    tt = copy.deepcopy(t)
    with bridge.storage_policy(na.Paper(4)):
        out = tt(torch.from_numpy(x))
    pools = [fn.pooled for fn in _graph_nodes(out.grad_fn) if type(fn).__name__ == "MaxPoolBackward"]
    assert len(pools) == 2 and all(p.source.form == "ref:paper" for p in pools)
    for p in pools:
        engine_ref = PooledRef(p.source, p.argmax.numpy(), p.kernel, p.stride, p.padding, np.float32)
        np.testing.assert_array_equal(p.restore().numpy().view(np.uint32), engine_ref.restore().view(np.uint32))


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1), (3, 1, 1)], ids=["2x2", "3x3-stride2-pad1", "3x3-stride1"])
def test_max_pool_argmax_bytes_are_the_engines(pool):
    """Ties (ReLU zeros, repeated values), -inf windows and NaN: the bridge's argmax
    offsets equal the engine's ``ops.max_pool2d`` argmax byte for byte."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-3, 4, (2, 3, 7, 7)), 0).astype(np.float32)
    x[0, 0, :3, :3] = -np.inf
    x[1, 2, 4, 4] = x[1, 2, 5, 6] = np.nan
    k, st, pad = pool
    out = ops.max_pool2d(Tensor(x, requires_grad=True), k, st, pad)
    tx = torch.from_numpy(x).requires_grad_()
    with bridge.storage_policy(na.Paper(4)):
        ty = bstorage.max_pool2d(tx, k, st, pad)
    np.testing.assert_array_equal(ty.detach().numpy(), out.data)
    np.testing.assert_array_equal(ty.grad_fn.pooled.argmax.numpy(), out._ctx.restore("argmax"))
    gy = torch.from_numpy(rng.standard_normal(ty.shape).astype(np.float32))
    ty.backward(gy)
    tx0 = torch.from_numpy(x).requires_grad_()
    F.max_pool2d(tx0, k, st, pad).backward(gy)
    assert torch.equal(tx.grad, tx0.grad)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 5)], ids=["even", "odd-rows-dropped"])
def test_avg_pool_saves_nothing_and_its_gradient_is_torchs(shape):
    """The bridge's average pool keeps no tensor for backward (the engine's pool saves
    nothing), and its input gradient is F.avg_pool2d's, bit for bit (rows and columns
    the pool drops get 0)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    gy = torch.from_numpy(rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2)).astype(np.float32))
    tx = torch.from_numpy(x).requires_grad_()
    with bstorage.record() as saved, bridge.storage_policy(na.Paper(4)):
        y = bstorage.avg_pool2d(tx * 1, 2)
    assert type(y.grad_fn).__name__ == "AvgPoolBackward" and saved == []
    y.backward(gy)
    tx0 = torch.from_numpy(x).requires_grad_()
    F.avg_pool2d(tx0, 2).backward(gy)
    assert torch.equal(tx.grad, tx0.grad)


def _graph_nodes(fn):
    seen, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.append(f)
        todo.extend(g for g, _ in f.next_functions)
    return seen


def test_cpu_tensors_reach_the_compiled_kernels_without_a_copy():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    a = bstorage.as_array(t)
    assert a.ctypes.data == t.data_ptr() and bstorage.as_tensor(a).data_ptr() == t.data_ptr()
    assert kernels.implementation(a) == ("cpu" if kernels.compiled_available() else "reference")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_cpu_kernels_run_on_torchs_openmp_threads_with_the_pools_bytes(monkeypatch):
    """The process has one OpenMP runtime: torch's wheel bundles a libgomp with the
    system's soname, and whichever loads first serves both torch and the kernels. So the
    bridge's kernels, parallel regions of the calling thread (``views.kernel_stream``),
    run on the threads of torch's own ops: a Paper(4) / Generic(4) step with 2 torch
    threads never uses npapprox's pool and starts no thread; its logits, gradients and
    buffers are bit-identical to the same step with the kernels on the pool."""
    lib = require_openmp()
    with open("/proc/self/maps") as f:
        runtimes = {os.path.realpath(line.split()[-1]) for line in f if "libgomp" in line}
    assert runtimes == {os.path.realpath(lib)}
    x, y = _data(32)
    t = bridge.to_torch(_resnet20())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            for policy in (na.Paper(4), na.Generic(4)):
                with monkeypatch.context() as m:
                    m.setattr(views, "openmp_team", lambda n: contextlib.nullcontext())
                    want = _torch_step(t, x, y, policy)            # kernels on the pool (2 workers)
                before = set(os.listdir("/proc/self/task"))
                with monkeypatch.context() as m:
                    m.setattr(parallel, "run", lambda fn, n: pytest.fail("npapprox's pool ran in the bridge"))
                    got = _torch_step(t, x, y, policy)
                assert set(os.listdir("/proc/self/task")) <= before
                assert torch.equal(got[0], want[0])
                for g, w in zip(got[1:], want[1:], strict=True):
                    assert g.keys() == w.keys() and all(g[k].numpy().tobytes() == w[k].numpy().tobytes() for k in g)
    finally:
        torch.set_num_threads(threads)


def _alive_units():
    gc.collect()
    return sum(type(o) is PaperUnit for o in gc.get_objects())


def test_units_are_freed_as_backward_walks_and_no_grad_keeps_none():
    t = bridge.to_torch(_resnet20())
    x, y = _data(2, size=8)
    before = _alive_units()
    with bridge.storage_policy(na.Paper(4)):
        loss = F.cross_entropy(t(torch.from_numpy(x)), torch.from_numpy(y))
    assert _alive_units() - before == 18            # one per unit but the exact last one
    loss.backward()
    assert _alive_units() - before == 0             # the graph (loss) is alive, its codes are not
    with pytest.raises(RuntimeError, match="already freed|backward through the graph a second time"):
        loss.backward()
    del loss
    with torch.no_grad(), bridge.storage_policy(na.Paper(4)):
        t(torch.from_numpy(x))
    assert _alive_units() - before == 0


def test_eval_mode_unit_under_paper4_is_the_engines():
    """A unit with running statistics (eval mode, gradients on): forward bit-identical
    to torch's eval BN + ReLU; codes, 1/sigma and the gradients of x, gamma, beta
    equal the engine's (BN's backward without the batch terms, the same kernel)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 6, 6)).astype(np.float32)
    gh = rng.standard_normal(x.shape).astype(np.float32)
    m = na.nn.BatchNorm2d(8, relu=True)
    m.weight.data[...] = rng.uniform(-1, 1.5, 8)
    m.bias.data[...] = 0.3 * rng.standard_normal(8)
    m.running_mean[...] = 0.2 * rng.standard_normal(8)
    m.running_var[...] = rng.uniform(0.5, 2, 8)
    m.eval()
    t = bridge.to_torch(m)
    assert not t.training
    xt = torch.from_numpy(x).requires_grad_()
    with bstorage.record() as saved, bridge.storage_policy(na.Paper(4)):
        h = t(xt)
    h.backward(torch.from_numpy(gh))
    assert torch.equal(h, F.relu(F.batch_norm(torch.from_numpy(x), t.running_mean, t.running_var, t.weight, t.bias)))
    xe = Tensor(x, requires_grad=True)
    with na.storage_policy(na.Paper(4)):
        he = m(xe)
    unit = next(s for _, s in saved if isinstance(s, PaperUnit))
    inv_sigma = next(s for e, s in saved if e.name == "inv_sigma").tensor.numpy()
    assert unit.packed.tobytes() == he._ctx.saved["unit"].packed.tobytes()
    assert np.array_equal(inv_sigma, he._ctx.saved["inv_sigma"].restore())
    he.backward(gh)
    for got, want in ((xt.grad, xe.grad), (t.weight.grad, m.weight.grad), (t.bias.grad, m.bias.grad)):
        assert np.array_equal(got.numpy(), want)


# --------------------------------------------------------------------------- #
# windows: Paper(K, window=W) and FitWindow(K) through the bridge
# --------------------------------------------------------------------------- #
WINDOWED = [na.Paper(4, window=2), na.Paper(2, window=6), FitWindow(4), FitWindow(2, window=(2, 3)), FitWindow(8)]


@pytest.mark.parametrize("policy", WINDOWED, ids=repr)
def test_windowed_unit_codes_are_the_engines(policy):
    """The same y: the bridge stores the engine's unit, byte for byte (codes, s,
    the fitted window's per-channel parameters), on the edge cases of ``_unit_case``."""
    x, gamma, beta = _unit_case()
    bn = bridge.to_torch(na.nn.BatchNorm2d(8, relu=True))
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    with bstorage.record() as saved, bridge.storage_policy(policy):
        bn(torch.from_numpy(x).requires_grad_())
    unit = next(s for _, s in saved if isinstance(s, PaperUnit))
    y_t = F.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta),
                       training=True).numpy()
    ref = policy.store_unit(_ctx(), "unit", BNReLUUnit(None, y_t, None, None, gamma, beta))
    assert type(unit) is type(ref) and unit.bits == ref.bits
    assert unit.packed.tobytes() == ref.packed.tobytes() and unit.s.tobytes() == ref.s.tobytes()
    assert sorted(unit.params) == sorted(ref.params)
    for k in ref.params:
        assert np.asarray(unit.params[k]).tobytes() == np.asarray(ref.params[k]).tobytes(), k


@pytest.mark.parametrize("policy", [na.Paper(4, window=2), FitWindow(4)], ids=repr)
def test_windowed_resnet_gradients_and_ledger_are_the_engines(policy):
    """ResNet-20: the forward is torch's, the activation bytes are the engine's, and
    the gradients agree with the engine's own under the same policy to the bound
    of ``test_paper4_forward_is_torch_and_gradients_are_the_engines`` (codes at a bin
    edge may differ where torch's BN rounds y differently)."""
    m = _resnet20()
    x, y = _data(8)
    t = bridge.to_torch(m)
    logits0, _, _ = _torch_step(_mirror(m), x, y)
    logits, grads, _ = _torch_step(t, x, y, policy)
    assert torch.equal(logits, logits0)
    own, _ = _engine_grads(m, x, y, policy)
    for name, g in grads.items():
        np.testing.assert_allclose(g.numpy(), own[name], rtol=0, atol=5e-2 * np.abs(own[name]).max(), err_msg=name)
    mine = bridge.ledger(copy.deepcopy(t), torch.from_numpy(x), y, policy)
    ref = na.ledger(copy.deepcopy(m), x, y, policy)
    assert mine.activation_stored == ref.activation_stored
