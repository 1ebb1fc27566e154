"""Storage policies through the engine: the method's semantics against plain-NumPy oracles.

Every expected value below is computed in this file from the formulas of docs/method.md
sections 3-5 and the byte contract (npapprox/quant.py, npapprox/kernels/reference.py):
codes, bin centres, the rebuilt h and xhat, and the exact backward formulas evaluated
with them. The engine is never its own oracle.

1. the forward pass is bit-identical under every policy that claims an exact forward;
   the naive and approximate-forward baselines differ;
2. Paper(K): a BN->ReLU unit read by a 3x3 conv and a strided 1x1 projection; each
   gradient equals the exact formula evaluated with the decoded approximation exactly
   where docs/method.md section 3 says, exact elsewhere; and differs from exact where it must;
3. the released code's defects are not repeated (exact masks for every gamma/beta,
   tiny positive y, y == 0; the first conv trains);
4. the storage economy in the ledger, against byte counts computed from the shapes;
5. the generic quantizer through the engine (sigmoid / tanh / gelu / linear);
6. Naive(K) propagates the decoded approximation and its error grows with depth;
7. measured peak memory falls under Paper(4); non-finite activations raise;
8. stochastic rounding: seeds change the bytes, the same seed reproduces them;
9. names: one registry builds every policy and gives its plot style.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

from npapprox import Tensor, ops
from npapprox.function import PARAM, STAT, UNIT
from npapprox.ledger import ledger
from npapprox.peak import measure_peak
from npapprox.policy import (
    POLICIES,
    ApproxForward,
    Exact,
    FitWindow,
    Generic,
    Naive,
    Paper,
    policy_from_name,
    register_policy,
    storage_policy,
)
from npapprox.study.plots import line_style
from npapprox.tensor import topological_order
from npapprox.units import BNReLUUnit

from support import (
    assert_close,
    bn_forward,
    bn_relu_backward_oracle,
    c4,
    conv3x3_oracle,
    engine_unit,
    max_rel,
    paper_oracle,
    proj_oracle,
    resnet,
    resnet_forward_backward,
    unit_problem,
    unpack_codes,
)

F32, F64 = np.float32, np.float64


RNG = np.random.default_rng(20190121)
X8 = RNG.standard_normal((8, 3, 8, 8)).astype(F32)
T8 = RNG.integers(0, 5, 8)


# --------------------------------------------------------------------------- #
# 1. Exact forward
# --------------------------------------------------------------------------- #
EXACT_FORWARD = [Exact(), Paper(8), Paper(4), Generic(4), Generic(2, stochastic=True, seed=3)]


@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_forward_is_bit_identical_under_every_exact_forward_policy(shortcut):
    model = resnet(1, shortcut=shortcut)
    model.bn.storage = None  # no exact override: every unit goes through the policy under test
    ref_logits, ref_loss, _ = resnet_forward_backward(model, X8, T8, Exact())
    for policy in EXACT_FORWARD:
        logits, loss, grads = resnet_forward_backward(model, X8, T8, policy)
        assert np.array_equal(logits, ref_logits), f"{policy}: logits differ from the exact forward"
        assert np.array_equal(loss, ref_loss), f"{policy}: loss differs from the exact forward"
        assert all(np.isfinite(g).all() for g in grads.values())
    for policy in (Naive(4), ApproxForward(4)):
        logits, loss, _ = resnet_forward_backward(model, X8, T8, policy)
        rel = max_rel(logits, ref_logits)
        assert rel > 1e-3, f"{policy}: forward should propagate the K-bit approximation (rel diff {rel:.2e})"
        assert not np.array_equal(loss, ref_loss)


# --------------------------------------------------------------------------- #
# 2. The method's semantics, one unit, against the NumPy oracle
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_paper_gradients_equal_the_exact_formulas_at_the_decoded_values(bits):
    problem = unit_problem()
    x, gamma, beta, w1, w2, r1, r2 = problem
    out, info = engine_unit(problem, Paper(bits))
    exact, _ = engine_unit(problem, Exact())

    # forward: exact, and y rebuilt here bit for bit (so the codes below are the contract's)
    y, inv_sigma = bn_forward(x, gamma, beta)
    assert np.array_equal(out["h"], y * (y > 0)), "the unit's forward output is not relu(bn(x))"
    assert np.array_equal(out["h"], exact["h"]) and np.array_equal(out["o1"], exact["o1"])

    # what is stored: one K-bit code tensor, references for both consumers
    code, s, h_hat, xhat_hat = paper_oracle(y, gamma, beta, bits)
    assert info["form"] == "paper" and info["conv_forms"] == ("ref:paper", "ref:paper")
    assert info["conv_payload"] == 0
    assert info["packed"].nbytes == math.ceil(y.size * bits / 8)
    assert np.array_equal(info["s"], s), "first-positive codes s differ from the contract"
    assert np.array_equal(unpack_codes(info["packed"], y.size, bits).reshape(y.shape), code), \
        "stored codes differ from the contract's"
    assert np.array_equal(info["mask"], y > 0)
    assert_close(info["h_restored"], h_hat, 1e-6, "conv input rebuilt from the codes")
    # inside the window (codes not saturated) h_hat is within half a bin of relu(y)
    inside = (code > 0) & (code < 2 ** bits - 1) & (y > 0)
    half_bin = 0.5 * 6 / 2 ** bits * np.abs(gamma)[None, :, None, None]
    assert inside.mean() > 0.2 and np.all((np.abs(h_hat - y) <= half_bin * (1 + 1e-5))[inside])

    # the oracle: exact backward formulas, decoded values exactly where section 3 says
    x64, g64, b64 = x.astype(F64), gamma.astype(F64), beta.astype(F64)
    inv_sigma64 = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5)
    _, gw1, gh1 = conv3x3_oracle(h_hat, w1.astype(F64), r1.astype(F64))   # weight grad: h_hat
    _, gw2, gh2 = proj_oracle(h_hat, w2.astype(F64), r2.astype(F64))      # weight grad: h_hat
    # input grads of both convs use w only (and are the same whatever h is)
    gh = gh1 + gh2
    gx, ggamma, gbeta = bn_relu_backward_oracle(gh, y > 0, xhat_hat, g64, inv_sigma64)

    for name, want in (("gw1", gw1), ("gw2", gw2), ("gx", gx), ("ggamma", ggamma), ("gbeta", gbeta)):
        assert_close(out[name], want, 1e-5, f"Paper({bits}) {name} vs the oracle")

    # exact where the method is exact: beta's gradient (exact mask, exact g)
    assert_close(out["gbeta"], exact["gbeta"], 1e-5, "gbeta must be exact")
    # and approximate where it must be: a policy storing exact values would fail here
    # (gx only through BN's variance term: a smaller, still 10x-the-tolerance, difference)
    for name, tol in (("gw1", 1e-3), ("gw2", 1e-3), ("ggamma", 1e-3), ("gx", 1e-4)):
        assert max_rel(out[name], exact[name]) > tol, f"Paper({bits}) {name} equals the exact gradient"

    # the exact policy against the same oracle with the exact values (the oracle itself is sound)
    xhat = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) * inv_sigma64[None, :, None, None]
    h = np.maximum(g64[None, :, None, None] * xhat + b64[None, :, None, None], 0)
    _, egw1, _ = conv3x3_oracle(h, w1.astype(F64), r1.astype(F64))
    _, egw2, _ = proj_oracle(h, w2.astype(F64), r2.astype(F64))
    egx, eggamma, _ = bn_relu_backward_oracle(gh, y > 0, xhat, g64, inv_sigma64)
    for name, want in (("gw1", egw1), ("gw2", egw2), ("gx", egx), ("ggamma", eggamma)):
        assert_close(exact[name], want, 1e-4, f"Exact() {name} vs the exact oracle")


def test_paper_gx_differs_from_exact_only_by_the_variance_term():
    """gx_paper - gx_exact = -gamma/sigma * (xhat_hat mean(g xhat_hat) - xhat mean(g xhat)):
    the mean term and everything upstream of BN are exact."""
    problem = unit_problem(11)
    x, gamma, beta, w1, w2, r1, r2 = problem
    out, _ = engine_unit(problem, Paper(4))
    exact, _ = engine_unit(problem, Exact())
    y, _ = bn_forward(x, gamma, beta)
    _, _, _, xhat_hat = paper_oracle(y, gamma, beta, 4)
    x64 = x.astype(F64)
    inv_sigma = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5)
    xhat = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) * inv_sigma[None, :, None, None]
    # g = dL/dy = (dL/dh) [y > 0]; dL/dh from the conv oracles (w only)
    _, _, gh1 = conv3x3_oracle(np.zeros(x.shape), w1.astype(F64), r1.astype(F64))
    _, _, gh2 = proj_oracle(np.zeros(x.shape), w2.astype(F64), r2.astype(F64))
    g = (gh1 + gh2) * (y > 0)
    m = g.shape[0] * g.shape[2] * g.shape[3]
    def var_term(xh):
        return xh * c4((g * xh).sum(axis=(0, 2, 3)) / m)
    want = -c4(gamma.astype(F64) * inv_sigma) * (var_term(xhat_hat) - var_term(xhat))
    diff = out["gx"].astype(F64) - exact["gx"]
    np.testing.assert_allclose(diff, want, atol=2e-5 * np.abs(exact["gx"]).max())
    assert np.abs(want).max() > 1e-3 * np.abs(exact["gx"]).max()


# --------------------------------------------------------------------------- #
# 3. The released code's defects, not repeated
# --------------------------------------------------------------------------- #
def _extreme_problem(seed=3):
    """Channels covering gamma <= 0, gamma == 0, gamma ~ 1e-30, beta/gamma = +-1e3,
    b < -3 with a few positive outputs, y in (0, 1e-6], y == 0 exactly."""
    rng = np.random.default_rng(seed)
    n, hw = 4, 4
    spec = [  # (gamma, beta)
        (-1.5, 0.3),        # gamma < 0
        (0.0, 0.5),         # gamma == 0: y = beta > 0 everywhere
        (0.0, -0.5),        # gamma == 0: y < 0 everywhere
        (0.0, 0.0),         # gamma == 0, beta == 0: y == 0 exactly
        (1e-30, 0.0),       # gamma ~ 1e-30: |y| ~ 1e-30, half of them in (0, 1e-6]
        (-1e-30, 0.0),
        (1e-7, 0.0),        # y in (-1e-6, 1e-6)
        (1.0, -1e3),        # beta/gamma = -1e3: all negative
        (1.0, 1e3),         # beta/gamma = +1e3: all positive
        (-1.0, 1e3),        # beta/gamma = -1e3 with gamma < 0: all positive
        (-1.0, -1e3),       # all negative
        (1.0, -4.0),        # b = -4 < -3 (released code: every mask 0), an outlier makes y > 0
        (1.0, 0.0),         # constant input: xhat = 0, y == 0 exactly
        (-2.0, -4.0),       # gamma < 0, b = 2: y > 0 where xhat < -2 (outlier below)
        (0.5, 0.1),         # ordinary
    ]
    c = len(spec)
    gamma = np.array([g for g, _ in spec], F32)
    beta = np.array([b for _, b in spec], F32)
    x = rng.standard_normal((n, c, hw, hw)).astype(F32)
    x[:, 11] *= 0.1
    x[0, 11, 0, 0] = 10.0     # xhat ~ sqrt(M - 1) ~ 7.9: y = xhat - 4 > 0 there only
    x[:, 12] = 0.75           # exactly representable mean: x - mu == 0
    x[:, 13] *= 0.1
    x[1, 13, 2, 3] = -10.0
    return x, gamma, beta


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_mask_from_codes_is_exactly_the_forward_relu_mask(bits):
    x, gamma, beta = _extreme_problem()
    rng = np.random.default_rng(bits)
    X, G, B = Tensor(x, True), Tensor(gamma, True), Tensor(beta, True)
    with storage_policy(Paper(bits)):
        h = ops.batch_norm2d(X, G, B, relu=True)
    unit = h._ctx.saved["unit"]
    assert unit.form == "paper"
    positive = h.data > 0          # the forward ReLU's own decision, y > 0
    # the data covers what the test claims to cover
    assert np.any((h.data > 0) & (h.data <= 1e-6)), "no y in (0, 1e-6]"
    assert np.all(h.data[:, 3] == 0) and np.all(h.data[:, 12] == 0)
    assert positive[:, 11].sum() == 1 and positive[:, 13].sum() == 1
    assert positive[:, 8].all() and positive[:, 9].all() and not positive[:, 7].any()
    mask = unit.mask()
    assert mask.dtype == bool and np.array_equal(mask, positive), (
        f"Paper({bits}): mask wrong in channels {sorted(set(np.nonzero(mask != positive)[1]))}")
    # through the ReLU gradient: dL/dbeta = sum of gh where y > 0 (exact, per channel)
    gh = rng.standard_normal(x.shape).astype(F32)
    h.backward(gh)
    want = (gh.astype(F64) * positive).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(B.grad, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(X.grad).all() and np.isfinite(G.grad).all()


# |gamma| = 1e-45 (denormal) and 3e38 make k or h_step infinite in float32: the codes
# saturate, the mask (what is pinned here) stays exact, and no warning is raised
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stored_form_mask_follows_y_for_crafted_values(bits):
    """The stored form alone, on y values no BN would produce: 0, -0, denormals,
    (0, 1e-6], huge values, every sign of gamma and beta/gamma far outside +-3."""
    base = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-12, 1e-7, 5e-7, 1e-6, 1.01e-6, -1e-7, -1e-6,
                     0.3, -0.3, 2.9, -2.9, 3.1, -3.1, 1e3, -1e3, 1e30, -1e30, 1e-30, -1e-30], F32)
    cases = [(1.0, 0.0), (-1.0, 0.0), (1.0, -1e3), (1.0, 1e3), (-1.0, 1e3), (-1.0, -1e3),
             (1e-30, 0.0), (-1e-30, 1e-30), (0.0, 0.0), (0.0, 1.0), (-0.0, -1.0), (2.0, -7.0),
             (1e-45, 0.0), (3e38, 1.0), (-0.5, 0.0)]
    c = len(cases)
    y = np.broadcast_to(base[None, None, :], (2, c, base.size)).copy()
    y[1] = -y[1]
    y = y.reshape(2, c, base.size, 1)
    gamma = np.array([g for g, _ in cases], F32)
    beta = np.array([b for _, b in cases], F32)
    zeros = np.zeros(c, F32)
    ctx = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="test"))
    stored = Paper(bits).store_unit(ctx, "unit", BNReLUUnit(y, y, zeros, zeros + 1, gamma, beta))
    assert np.array_equal(stored.mask(), y > 0)
    h = stored.h()
    assert np.all(h[y <= 0] == 0) and not np.signbit(h).any()


def test_first_conv_trains_under_paper():
    """The released code's backward never reaches layer 0; here the first conv's weight
    gradient is nonzero and close to the exact one (its input is the network input, kept
    in float32; its output gradient is exact except BN variance terms)."""
    model = resnet(2)
    _, _, exact = resnet_forward_backward(model, X8, T8, Exact())
    entry = next(e for e in ledger(model, X8, T8, Paper(4)).entries if e.module == "conv" and e.name == "x")
    assert (entry.form, entry.payload) == ("float32", X8.nbytes)
    for bits, bound in ((8, 0.04), (4, 0.15)):   # measured: 0.016, 0.068
        _, _, paper = resnet_forward_backward(model, X8, T8, Paper(bits))
        g = paper["conv.weight"]
        assert np.abs(g).max() > 0.1 * np.abs(exact["conv.weight"]).max(), "the first conv gets no gradient"
        rel = max_rel(g, exact["conv.weight"])
        assert rel < bound, f"Paper({bits}): first conv's weight gradient off by {rel:.3f}"
        cos = float(np.sum(g * exact["conv.weight"]) / np.linalg.norm(g) / np.linalg.norm(exact["conv.weight"]))
        assert cos > 0.95


# --------------------------------------------------------------------------- #
# 4. The economy, in the ledger
# --------------------------------------------------------------------------- #
def _unit_shapes(depth, width, n, hw):
    """(module name, shape) of every BN -> ReLU unit of PreActResNet(depth, width) on
    (n, 3, hw, hw) input, computed from the architecture (basic blocks, stride 2 at stages 2, 3)."""
    per_stage = (depth - 2) // 6
    units, cin, size, i = [], width, hw, 0
    for stage in range(3):
        cout = width * 2 ** stage
        for b in range(per_stage):
            units.append((f"blocks.{i}.bn1", (n, cin, size, size)))
            if stage > 0 and b == 0:
                size //= 2
            units.append((f"blocks.{i}.bn2", (n, cout, size, size)))
            cin, i = cout, i + 1
    return units, ("bn", (n, cin, size, size))


@pytest.mark.parametrize("shortcut", ["projection", "pad"])
def test_ledger_shows_the_paper_economy(shortcut):
    depth, width, n, hw, classes = 14, 4, 4, 16, 5
    model = resnet(3, depth=depth, width=width, shortcut=shortcut, num_classes=classes)
    x = np.random.default_rng(0).standard_normal((n, 3, hw, hw)).astype(F32)
    t = np.arange(n) % classes
    led = ledger(model, x, t, Paper(4))
    units, (last_name, last_shape) = _unit_shapes(depth, width, n, hw)
    by_module = {}
    for e in led.entries:
        by_module.setdefault((e.module, e.op), []).append(e)

    for name, shape in units:
        es = {e.name: e for e in by_module[(name, "BatchNormReLU")]}
        assert sorted(es) == ["gamma", "inv_sigma", "unit"]
        numel, c = int(np.prod(shape)), shape[1]
        u = es["unit"]
        assert (u.kind, u.form, u.bits, u.shape) == (UNIT, "paper", 4, shape), name
        assert u.payload == math.ceil(numel * 4 / 8) and u.meta == 16 * c, name   # s, h_step, x_step, x_off
        s = es["inv_sigma"]
        assert (s.kind, s.form, s.shape, s.payload, s.meta) == (STAT, "float32", (c,), 4 * c, 0), name
        assert (es["gamma"].kind, es["gamma"].payload) == (PARAM, 0)
        assert u.policy == "Paper(bits=4)"
    assert sum(1 for e in led.entries if e.kind == UNIT) == len(units) + 1

    # every conv reading a unit output stores a reference (conv1, conv2, the projection)
    convs = [e for e in led.entries if e.op == "Conv2d" and e.name == "x"]
    first = [e for e in convs if e.module == "conv"]
    assert len(first) == 1 and (first[0].form, first[0].payload) == ("float32", 4 * n * 3 * hw * hw)
    refs = [e for e in convs if e.module != "conv"]
    n_blocks = (depth - 2) // 6 * 3
    expected_refs = 2 * n_blocks + (2 if shortcut == "projection" else 0)
    assert len(refs) == expected_refs
    assert all(e.form == "ref:paper" and e.payload == 0 and e.meta == 0 for e in refs)
    if shortcut == "projection":
        assert {e.module for e in refs if e.module.endswith(".proj")} == {"blocks.2.proj", "blocks.4.proj"}

    # the last unit is kept exactly, by the module's own override
    last = {e.name: e for e in by_module[(last_name, "BatchNormReLU")]}["unit"]
    last_numel, last_c = int(np.prod(last_shape)), last_shape[1]
    assert (last.form, last.policy, last.shape) == ("float32", "Exact()", last_shape)
    assert (last.payload, last.meta) == (4 * last_numel, 4 * last_c)

    # totals: activation bytes from the shapes
    fc_in = n * last_c
    fc = next(e for e in led.entries if e.op == "Linear" and e.name == "x")
    assert (fc.form, fc.payload, fc.meta) == ("generic", math.ceil(fc_in / 2), 8 * math.ceil(fc_in / 256))
    net_input = 4 * n * 3 * hw * hw
    last_bytes = 4 * last_numel + 4 * last_c
    paper = (net_input + sum(math.ceil(np.prod(s) / 2) + 16 * s[1] for _, s in units) + last_bytes
             + math.ceil(fc_in / 2) + 8 * math.ceil(fc_in / 256))
    exact = net_input + sum(4 * np.prod(s) + 4 * s[1] for _, s in units) + last_bytes + 4 * fc_in
    assert led.activation_stored == paper
    led_exact = ledger(model, x, t, Exact())
    assert led_exact.activation_stored == exact
    assert all(e.form in ("float32", "param", "int64", "ref:float32") for e in led_exact.entries)
    assert led.activation_stored < 0.3 * led_exact.activation_stored


# --------------------------------------------------------------------------- #
# 5. The generic quantizer through the engine
# --------------------------------------------------------------------------- #
def _generic_decode_oracle(stored):
    """lo[g] + float32(code * scale[g]) per group of ``group`` consecutive values."""
    n = int(np.prod(stored.shape))
    codes = unpack_codes(stored.packed, n, stored.bits).astype(F32)
    grp = np.arange(n) // stored.group
    return (stored.lo[grp] + codes * stored.scale[grp]).reshape(stored.shape)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _erf(z):
    return np.vectorize(math.erf)(z)


@pytest.mark.parametrize("bits", [4, 8])
def test_generic_gradients_equal_the_exact_formulas_at_the_decoded_values(bits):
    rng = np.random.default_rng(5)
    n, d = 16, 24
    x = rng.standard_normal((n, d)).astype(F32)
    ws = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(F32) for _ in range(4)]
    r = rng.standard_normal((n, d)).astype(F32)

    def run(policy):
        W = [Tensor(w, True) for w in ws]
        X = Tensor(x, True)
        with storage_policy(policy):
            z1 = ops.linear(X, W[0])
            a1 = ops.sigmoid(z1)
            z2 = ops.linear(a1, W[1])
            a2 = ops.tanh(z2)
            z3 = ops.linear(a2, W[2])
            a3 = ops.gelu(z3)
            out = ops.linear(a3, W[3])
            loss = ops.sum_all(ops.mul(out, Tensor(r)))
        acts = {"sig_y": a1._ctx.saved["y"], "lin2_x": z2._ctx.saved["x"], "tanh_y": a2._ctx.saved["y"],
                "lin3_x": z3._ctx.saved["x"], "gelu_x": a3._ctx.saved["x"], "lin4_x": out._ctx.saved["x"],
                "lin1_x": z1._ctx.saved["x"]}
        exact_vals = {"sig_y": a1.data, "lin2_x": a1.data, "tanh_y": a2.data, "lin3_x": a2.data,
                      "gelu_x": z3.data, "lin4_x": a3.data}
        forms = {k: v.form for k, v in acts.items()}
        # a linear reading a sigmoid / tanh output shares the form that op stored: kept once
        assert acts["lin2_x"].target is acts["sig_y"] and acts["lin3_x"].target is acts["tanh_y"]
        dec = {k: _generic_decode_oracle(v) for k, v in acts.items() if v.form == "generic"}
        scales = {k: v.scale.copy() for k, v in acts.items() if v.form == "generic"}
        for ref, own in (("lin2_x", "sig_y"), ("lin3_x", "tanh_y")):
            if own in dec:
                dec[ref], scales[ref] = dec[own], scales[own]
        loss.backward()
        return forms, dec, scales, exact_vals, X.grad, [w.grad for w in W], out.data

    forms, dec, scales, vals, gx, gws, out = run(Generic(bits))
    _, _, _, _, egx, egws, eout = run(Exact())
    assert np.array_equal(out, eout)
    assert forms.pop("lin1_x") == "float32"      # the network input (a leaf) stays exact
    assert forms.pop("lin2_x") == forms.pop("lin3_x") == "ref:generic"
    assert set(forms.values()) == {"generic"}, forms
    for k, v in vals.items():  # decoded values within half a step of the exact ones
        step = np.repeat(scales[k], 256)[:v.size].reshape(v.shape)
        assert np.all(np.abs(dec[k] - v) <= 0.5 * step * (1 + 1e-5) + 1e-7), k

    w64 = [w.astype(F64) for w in ws]
    d64 = {k: v.astype(F64) for k, v in dec.items()}
    g = r.astype(F64)                                              # dL/d out
    gw4 = g.T @ d64["lin4_x"]
    g = g @ w64[3]                                                 # dL/d a3
    zh = d64["gelu_x"]
    g = g * (0.5 * (1 + _erf(zh / np.sqrt(2))) + zh * np.exp(-zh * zh / 2) / np.sqrt(2 * np.pi))
    gw3 = g.T @ d64["lin3_x"]
    g = (g @ w64[2]) * (1 - d64["tanh_y"] ** 2)                    # dL/d z2
    gw2 = g.T @ d64["lin2_x"]
    sy = d64["sig_y"]
    g = (g @ w64[1]) * sy * (1 - sy)                               # dL/d z1
    gw1 = g.T @ x.astype(F64)
    gx_want = g @ w64[0]
    for name, got, want in (("gw1", gws[0], gw1), ("gw2", gws[1], gw2), ("gw3", gws[2], gw3),
                            ("gw4", gws[3], gw4), ("gx", gx, gx_want)):
        assert_close(got, want, 1e-5, f"Generic({bits}) {name}")
    for i in range(4):
        assert max_rel(gws[i], egws[i]) > 1e-4, f"Generic({bits}) gw{i + 1} equals the exact gradient"


# --------------------------------------------------------------------------- #
# 6. Naive low precision propagates the approximation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bits", [8, 4])
def test_naive_unit_output_is_the_decoded_approximation(bits):
    problem = unit_problem(13)
    x, gamma, beta, w1, w2, r1, r2 = problem
    out, info = engine_unit(problem, Naive(bits))
    y, inv_sigma = bn_forward(x, gamma, beta)
    code, s, h_hat, xhat_hat = paper_oracle(y, gamma, beta, bits)
    assert info["form"] == "paper" and info["conv_forms"] == ("ref:paper", "ref:paper")
    assert_close(out["h"], h_hat, 1e-6, f"Naive({bits}) forward output vs h_hat")
    assert not np.array_equal(out["h"], y * (y > 0))
    # the next layer received h_hat (forward) and backward used it too
    o1, gw1, gh1 = conv3x3_oracle(h_hat, w1.astype(F64), r1.astype(F64))
    assert_close(out["o1"], o1, 1e-5, "conv forward on h_hat")
    assert_close(out["gw1"], gw1, 1e-5, "conv weight gradient on h_hat")
    _, gw2, gh2 = proj_oracle(h_hat, w2.astype(F64), r2.astype(F64))
    inv_sigma64 = 1 / np.sqrt(x.astype(F64).var(axis=(0, 2, 3)) + 1e-5)
    gx, ggamma, gbeta = bn_relu_backward_oracle(gh1 + gh2, y > 0, xhat_hat, gamma.astype(F64), inv_sigma64)
    for name, want in (("gx", gx), ("ggamma", ggamma), ("gbeta", gbeta), ("gw2", gw2)):
        assert_close(out[name], want, 1e-5, f"Naive({bits}) {name}")


def test_approx_forward_propagates_h_hat_and_stores_it_exactly():
    problem = unit_problem(17)
    x, gamma, beta, w1, w2, r1, r2 = problem
    out, info = engine_unit(problem, ApproxForward(4))
    y, _ = bn_forward(x, gamma, beta)
    _, _, h_hat, _ = paper_oracle(y, gamma, beta, 4)
    assert_close(out["h"], h_hat, 1e-6, "ApproxForward forward output vs h_hat")
    assert info["form"] == "float32" and info["conv_forms"] == ("float32", "float32")
    # backward exact for the computed forward: the weight gradient uses the propagated h_hat
    _, gw1, _ = conv3x3_oracle(h_hat, w1.astype(F64), r1.astype(F64))
    assert_close(out["gw1"], gw1, 1e-5, "ApproxForward gw1")
    assert_close(info["h_restored"], h_hat, 1e-6)


def test_naive_error_grows_with_depth():
    rng = np.random.default_rng(9)
    c, depth = 8, 10
    x = rng.standard_normal((8, c, 8, 8)).astype(F32)
    ws = [(rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(F32) for _ in range(depth)]
    gamma, beta = np.ones(c, F32), np.zeros(c, F32)

    def chain(policy):
        outs, h = [], Tensor(x, True)
        with storage_policy(policy):
            for w in ws:
                h = ops.conv2d(ops.batch_norm2d(h, Tensor(gamma), Tensor(beta), relu=True), Tensor(w),
                               padding=1)
                outs.append(h.data.astype(F64))
        return outs

    exact, naive, paper = chain(Exact()), chain(Naive(4)), chain(Paper(4))
    assert all(np.array_equal(a, b) for a, b in zip(exact, paper, strict=True)), "Paper's forward must be exact"
    err = np.array([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(naive, exact, strict=True)])
    assert err[0] > 0.01
    assert err[-1] > 2 * err[0], f"naive error does not grow: {np.round(err, 4)}"
    assert np.all(np.diff(err[::3]) > 0), f"naive error not increasing along depth: {np.round(err, 4)}"


# --------------------------------------------------------------------------- #
# 7. Measured memory, non-finite activations
# --------------------------------------------------------------------------- #
def test_measured_peak_is_lower_under_paper4():
    """Activation storage must dominate the peak for the saving to show: a deep, narrow
    net (im2row transients of one layer are ~9x one activation). Measured twice each,
    interleaved, and the larger Paper peak against the smaller Exact peak.

    It fails if the graph keeps intermediate Tensors (and so their float32 ``data``)
    alive until backward: the K-bit codes then come on top of the full activations
    instead of replacing them (measured ~1.05x then; ~0.68x with the graph linked
    through contexts)."""
    model = resnet(4, depth=32, width=4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3, 16, 16)).astype(F32)
    t = rng.integers(0, 5, 16)
    peaks = {"exact": [], "paper": []}
    for _ in range(2):
        peaks["exact"].append(measure_peak(model, x, t, Exact()))
        peaks["paper"].append(measure_peak(model, x, t, Paper(4)))
    exact, paper = min(peaks["exact"]), max(peaks["paper"])
    saved = ledger(model, x, t, Exact()).activation_stored - ledger(model, x, t, Paper(4)).activation_stored
    assert paper < 0.85 * exact, f"peak Paper(4) {paper:,} B vs Exact {exact:,} B (ledger saves {saved:,} B)"
    assert exact - paper > 0.3 * saved


@pytest.mark.parametrize("policy", [Paper(4), Paper(8), Generic(4), Generic(4, stochastic=True)],
                         ids=repr)
def test_nonfinite_activation_raises(policy):
    model = resnet(5)
    x = X8.copy()
    x[1, 0, 2, 3] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        with storage_policy(policy):
            model(Tensor(x))
    with pytest.raises(FloatingPointError, match="non-finite"):     # a non-BN activation
        with storage_policy(policy):
            ops.sigmoid(Tensor(np.array([[0.5, np.nan]], F32), True))
    with storage_policy(Exact()):                                    # exact storage: no check
        assert np.isnan(model(Tensor(x)).data).any()


# --------------------------------------------------------------------------- #
# 8. Stochastic rounding: seeded, deterministic
# --------------------------------------------------------------------------- #
def _stored_bytes(model, x, t, policy):
    with storage_policy(policy):
        led_root = ops.cross_entropy(model(Tensor(x)), t)
    chunks = []
    for ctx in topological_order(led_root._ctx):
        for st in ctx.saved.values():
            packed = getattr(st, "packed", None)
            if packed is None:  # a GenericUnit: its codes of y
                packed = getattr(getattr(st, "y", None), "packed", None)
            if packed is not None:
                chunks.append(packed.tobytes())
    return chunks, led_root.data


def test_stochastic_generic_seeds_change_bytes_and_same_seed_reproduces():
    model = resnet(6)
    a, la = _stored_bytes(model, X8, T8, Generic(4, stochastic=True, seed=1))
    b, lb = _stored_bytes(model, X8, T8, Generic(4, stochastic=True, seed=1))
    c, lc = _stored_bytes(model, X8, T8, Generic(4, stochastic=True, seed=2))
    d, _ = _stored_bytes(model, X8, T8, Generic(4, stochastic=False, seed=1))
    assert len(a) == len(c) == len(d) >= 6
    assert a == b, "same seed, same call sequence: the stored bytes must be identical"
    assert all(x != y for x, y in zip(a, c, strict=True)), "a different seed must change every stored tensor"
    assert a != d
    assert np.array_equal(la, lb) and np.array_equal(la, lc)      # the forward never sees the noise
    # one policy object used twice: the per-save counter moves on, the noise is not reused
    p = Generic(4, stochastic=True, seed=1)
    first, _ = _stored_bytes(model, X8, T8, p)
    second, _ = _stored_bytes(model, X8, T8, p)
    assert first == a and second != first


def test_generic_refuses_a_range_wider_than_float32():
    """max - min of a group overflows float32: the scale would be inf and decode to NaN."""
    x = Tensor(np.array([[-3e38, 3e38, 1.0]], F32), requires_grad=True)
    with pytest.raises(FloatingPointError, match="wider than float32"):
        with storage_policy(Generic(4)):
            ops.gelu(x * 1.0)                # GELU saves its input (not a leaf: leaves stay exact)
    with storage_policy(Generic(4)):
        ops.gelu(Tensor(np.array([[-3e37, 3e37, 1.0]], F32), requires_grad=True) * 1.0)  # finite range: fine


# --------------------------------------------------------------------------- #
# 9. Names: one registry
# --------------------------------------------------------------------------- #
def test_the_registry_builds_every_family_from_its_names():
    assert {f: e.cls for f, e in POLICIES.items()} == {"exact": Exact, "generic": Generic, "paper": Paper,
                                                       "fit": FitWindow, "naive": Naive, "approx": ApproxForward}
    assert repr(policy_from_name("exact")) == "Exact()"
    for family in ("paper", "fit", "naive", "approx", "generic"):
        p = policy_from_name(f"{family}2", seed=7)
        assert type(p) is POLICIES[family].cls and p.bits == 2
    for family in ("paper", "fit", "naive", "approx"):
        assert "window=2.5" in repr(policy_from_name(f"{family}4-w2.5"))
    g = policy_from_name("generic8s-g64", seed=7)
    assert (g.bits, g.group, g.stochastic, g.seed) == (8, 64, True, 7)
    for bad in ("exact4", "paper", "paper4s", "generic4-w2", "approx4-g8", "generics", "bogus4", "paper16"):
        with pytest.raises(ValueError, match="unknown storage policy"):
            policy_from_name(bad)


def test_a_registered_policy_is_built_by_name_and_drawn_in_its_style():
    """Registering is the one step: ``policy_from_name`` (the command line's parser) and
    the study's plots pick the new family up."""
    @register_policy("halfexact", options="K", style=("Purples", ":"))
    class HalfExact(Exact):
        def __init__(self, bits):
            self.bits = bits

    fake_plt = types.SimpleNamespace(get_cmap=lambda cmap: (lambda shade: (cmap, shade)))
    try:
        p = policy_from_name("halfexact2")
        assert type(p) is HalfExact and p.bits == 2
        for bad in ("halfexact", "halfexact2-w3", "halfexact2s"):
            with pytest.raises(ValueError, match="unknown storage policy"):
                policy_from_name(bad)
        assert line_style(fake_plt, "halfexact2") == {"color": ("Purples", 0.45), "linestyle": ":"}
        assert line_style(fake_plt, "paper8") == {"color": ("Blues", 0.95), "linestyle": "-"}
        assert line_style(fake_plt, "generic4s")["color"] == ("Purples", 0.7)     # stochastic: its own colour
    finally:
        del POLICIES["halfexact"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_generic_unit_rebuilds_h_xhat_and_mask_as_the_formulas(dtype):
    """A ``GenericUnit`` (computed in place in the decoded y): h = y * mask,
    xhat = (y - beta) / gamma (0 where gamma == 0), the mask y > 0 of the forward's
    y, bit for bit the plain NumPy formulas on the decoded y; gamma < 0 and 0 included."""
    rng = np.random.default_rng(5)
    y = rng.standard_normal((3, 4, 5, 5)).astype(dtype)
    gamma = np.array([1.5, -0.5, 0.0, 0.25], np.float32)
    beta = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    ctx = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="test"))
    unit = Generic(4, group=16).store_unit(ctx, "unit", BNReLUUnit(None, y, None, None, gamma, beta))
    y_dec = unit.y.restore()
    g = gamma.astype(dtype)[:, None, None]
    want_xhat = np.where(g == 0, 0, (y_dec - beta[:, None, None]) / np.where(g == 0, 1, g))
    bits = np.uint32 if dtype == np.float32 else np.uint64
    assert np.array_equal(unit.mask(), y > 0) and unit.mask().dtype == np.bool_
    assert np.array_equal(unit.h().view(bits), (y_dec * (y > 0)).view(bits))
    assert unit.xhat().dtype == dtype and np.array_equal(unit.xhat().view(bits), want_xhat.astype(dtype).view(bits))
    assert np.all(unit.xhat()[:, 2] == 0) and unit.y.restore().tobytes() == y_dec.tobytes()   # codes untouched
