"""The gradient-error study (npapprox/study.py): cases with known answers.

1. the exact policy gives zero error (exactly 0, cosine exactly 1), and every
   pass leaves the model's parameters and BN running statistics unchanged;
2. more bits give smaller error on the same batch (paper 8 < 4 < 2, generic 8 < 4 < 2);
3. under the paper policy the input gradient of one BN -> ReLU unit (read by a conv,
   then pooling and the loss) differs from exact only by BN's variance term, against
   a NumPy formula with xhat_hat from the unit's stored codes;
4. accumulation: on a chain of BN -> ReLU -> conv units, the first layer's gradient
   error grows with the number of units above it under the naive policy, not under
   the paper's;
5. stochastic rounding: the mean of R draws is much closer to the exact gradient than
   one draw (unbiased: the bias falls like spread / sqrt(R));
6. the SGD-noise yardstick on batches with known spread; layer order; the statistics'
   definitions against direct NumPy computations;
7. the non-ReLU ResNets (activation option): same state_dict keys, the activation ops
   present, the last unit exact;
8. `npapprox study`: every experiment runs (tiny settings) and writes its files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from npapprox import Tensor, cli, nn, ops
from npapprox import study as S
from npapprox.ledger import ledger
from npapprox.policy import Exact, Paper, storage_policy

from support import bn_forward, c4, conv3x3_oracle, paper_oracle

F32, F64 = np.float32, np.float64
RNG = np.random.default_rng(20191208)
X16 = RNG.standard_normal((16, 3, 8, 8)).astype(F32)
T16 = RNG.integers(0, 5, 16)


def resnet(seed=0, **kw):
    nn.manual_seed(seed)
    args = dict(depth=8, num_classes=5, in_channels=3, width=4)
    args.update(kw)
    return nn.PreActResNet(**args)


def _state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _overall(study):
    return {r["policy"]: r for r in study.overall_rows()}


# --------------------------------------------------------------------------- #
# 1. Exact: zero error; the state does not drift
# --------------------------------------------------------------------------- #
def test_exact_policy_gives_zero_error_and_the_state_is_restored():
    model = resnet(1)
    before = _state(model)
    noise = [(X16[:8], T16[:8]), (X16[8:], T16[8:])]
    st = S.study_gradients(model, X16[:8], T16[:8], ["paper4", "generic4s"], repeats=2, noise_batches=noise,
                           systematic=True, input_grad=True)
    assert st.policies == ["exact", "paper4", "generic4s"]
    ex = _overall(st)["exact"]
    for key in ("rel_err", "rel_err_max", "bias", "spread", "err_over_noise", "avg_err", "input_rel_err",
                "first_third", "middle_third", "last_third"):
        assert ex[key] == 0.0, key
    assert ex["cosine"] == 1.0
    for row in st.param_rows() + st.layer_rows():
        if row["policy"] == "exact":
            assert row["rel_err"] == 0.0 and row["cosine"] == 1.0, row
    assert _overall(st)["paper4"]["rel_err"] > 1e-3        # the set-up can see an error
    # the passes restored parameters and BN running statistics, and left no gradients
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    # the exact gradient is what one plain backward gives
    g = S.gradients(model, X16[:8], T16[:8])
    model.zero_grad()
    loss = ops.cross_entropy(model(Tensor(X16[:8])), T16[:8])
    loss.backward()
    for name, p in model.named_parameters():
        assert np.array_equal(g[name], p.grad.astype(F64)), name


# --------------------------------------------------------------------------- #
# 2. More bits, smaller error
# --------------------------------------------------------------------------- #
def test_more_bits_give_smaller_error_on_the_same_batch():
    model = resnet(2)
    model.bn.storage = None          # every unit through the policy under test
    pols = ["paper2", "paper4", "paper8", "generic2", "generic4", "generic8"]
    r = _overall(S.study_gradients(model, X16, T16, pols))
    for kind in ("paper", "generic"):
        e2, e4, e8 = (r[f"{kind}{b}"]["rel_err"] for b in (2, 4, 8))
        assert e8 < e4 / 2 < e2 / 4, (kind, e2, e4, e8)
        c2, c4, c8 = (r[f"{kind}{b}"]["cosine"] for b in (2, 4, 8))
        assert c8 > c4 > c2, (kind, c2, c4, c8)


# --------------------------------------------------------------------------- #
# 3. One unit under the paper policy: only BN's variance term differs
# --------------------------------------------------------------------------- #
class _Unit(nn.Module):
    """x -> BN -> ReLU -> conv3x3 -> global average pool -> logits."""

    def __init__(self, c, classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, relu=True)
        self.conv = nn.Conv2d(c, classes, 3, padding=1)

    def forward(self, x):
        return ops.global_avg_pool2d(self.conv(self.bn(x)))


def test_paper_input_gradient_of_one_unit_differs_only_by_the_variance_term():
    rng = np.random.default_rng(11)
    n, c, hw, classes = 8, 6, 8, 5
    x = (rng.standard_normal((n, c, hw, hw)) * rng.uniform(0.5, 2.0, c)[None, :, None, None]
         + rng.uniform(-1, 1, c)[None, :, None, None]).astype(F32)
    t = rng.integers(0, classes, n)
    nn.manual_seed(3)
    model = _Unit(c, classes)
    gamma = np.array([1.3, -0.7, 0.5, -1.9, 2.0, 0.9], F32)
    beta = np.array([0.2, -0.3, 0.0, 0.5, -1.0, 0.1], F32)
    model.bn.weight.data[...] = gamma
    model.bn.bias.data[...] = beta
    w = model.conv.weight.data.astype(F64)

    g_exact = S.gradients(model, x, t, Exact(), input_grad=True)
    g_paper = S.gradients(model, x, t, Paper(4), input_grad=True)
    # xhat_hat from the codes the unit stores under Paper(4), checked against the contract's
    state = model.state_dict()
    with storage_policy(Paper(4)):
        h = model.bn(Tensor(x))
    xhat_hat = h._ctx.saved["unit"].xhat().astype(F64)
    model.load_state_dict(state)
    y, _ = bn_forward(x, gamma, beta)
    _, _, _, xhat_hat_oracle = paper_oracle(y, gamma, beta, 4)
    np.testing.assert_allclose(xhat_hat, xhat_hat_oracle, rtol=1e-5, atol=1e-5)

    # g = dL/dy in float64: L = mean_n CE(mean_ij conv(relu(y))), dL/dh from the conv oracle
    x64 = x.astype(F64)
    mu = x64.mean(axis=(0, 2, 3), keepdims=True)
    inv_sigma = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5)
    xhat = (x64 - mu) * inv_sigma[None, :, None, None]
    hh = np.maximum(c4(gamma.astype(F64)) * xhat + c4(beta.astype(F64)), 0)
    out, _, _ = conv3x3_oracle(hh, w, np.zeros((n, classes, hw, hw)))
    logits = out.mean(axis=(2, 3))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dlogits = (p - np.eye(classes)[t]) / n
    _, _, gh = conv3x3_oracle(hh, w, np.broadcast_to(dlogits[:, :, None, None] / (hw * hw), out.shape))
    g = gh * (y > 0)
    m = n * hw * hw
    def var_term(xh):
        return xh * c4((g * xh).sum(axis=(0, 2, 3)) / m)
    want = c4(gamma.astype(F64) * inv_sigma) * (-var_term(xhat_hat) + var_term(xhat))

    diff = g_paper[S.INPUT] - g_exact[S.INPUT]
    scale = np.abs(g_exact[S.INPUT]).max()
    np.testing.assert_allclose(diff, want, atol=2e-5 * scale)
    assert np.abs(want).max() > 1e-3 * scale            # the variance term is really there
    # and the study reports exactly that difference for the input gradient
    st = S.study_gradients(model, x, t, ["paper4"], input_grad=True)
    reported = st.stats("paper4", [S.INPUT])["rel_err"]
    assert reported == pytest.approx(np.linalg.norm(want) / np.linalg.norm(g_exact[S.INPUT]), rel=1e-3)
    # the exact oracle for the exact gradient too (the formula's g is the engine's)
    gx = c4(gamma.astype(F64) * inv_sigma) * (g - c4(g.sum(axis=(0, 2, 3)) / m) - var_term(xhat))
    np.testing.assert_allclose(g_exact[S.INPUT], gx, atol=1e-5 * scale)


# --------------------------------------------------------------------------- #
# 4. Accumulation with depth: naive yes, paper no
# --------------------------------------------------------------------------- #
class _Chain(nn.Module):
    """``depth`` units BN -> ReLU -> conv3x3 (c channels), global pool, linear."""

    def __init__(self, depth, c=8, classes=5):
        super().__init__()
        self.units = nn.Sequential(*[nn.Sequential(nn.BatchNorm2d(c, relu=True), nn.Conv2d(c, c, 3, padding=1))
                                     for _ in range(depth)])
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(ops.global_avg_pool2d(self.units(x)))


def test_naive_error_accumulates_with_depth_and_paper_error_does_not():
    """The first conv's weight-gradient error as 2, 4, 8, 12 units are stacked above
    it (same seed, same batch). Naive low precision propagates its approximation,
    so every unit added perturbs the forward pass and the loss gradient further:
    measured 0.23, 0.59, 0.92, 1.36. The paper's forward is exact and its backward
    error per unit is local: measured 0.12, 0.14, 0.14, 0.14.

    (Within one 12-unit chain the *last* conv has a much smaller error than the
    others under both policies, because the gradient reaching it is exact; the
    comparison across depths is what isolates accumulation.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 8)).astype(F32)
    t = rng.integers(0, 5, 16)
    err = {"paper4": [], "naive4": []}
    for depth in (2, 4, 8, 12):
        nn.manual_seed(0)
        st = S.study_gradients(_Chain(depth), x, t, list(err))
        for p in err:
            first_conv = next(r for r in st.layer_rows_of(p) if r["kind"] == "Conv2d")
            assert first_conv["module"] == "units.0.1"
            err[p].append(first_conv["rel_err"])
    naive, paper = np.array(err["naive4"]), np.array(err["paper4"])
    assert np.all(np.diff(naive) > 0), f"naive error does not grow with depth: {np.round(naive, 3)}"
    assert naive[-1] / naive[0] > 3, np.round(naive, 3)
    assert naive[-1] > 1.0
    assert paper.max() / paper.min() < 1.5, f"paper error varies with depth: {np.round(paper, 3)}"
    assert paper[-1] / paper[0] < 1.5 and paper.max() < 0.25


# --------------------------------------------------------------------------- #
# 5. Stochastic rounding is unbiased
# --------------------------------------------------------------------------- #
def test_stochastic_rounding_bias_falls_like_spread_over_sqrt_draws():
    """For unbiased rounding E[g_r] = g_exact up to the (small) non-linear terms of
    BN's backward, so ||mean of R draws - g_exact|| ~ spread / sqrt(R): bound
    1.5 spread / sqrt(R), and under 0.4 x the single-draw error at R = 16 (measured
    0.25 x). Nearest rounding's bias is its error."""
    model = resnet(4)
    model.bn.storage = None
    r_draws = 16
    r = _overall(S.study_gradients(model, X16, T16, ["generic4s", "generic4"], repeats=r_draws))
    s = r["generic4s"]
    assert s["stochastic"] and s["draws"] == r_draws
    assert s["rel_err"] > 0.05
    assert s["bias"] < 0.4 * s["rel_err"], s
    assert s["bias"] < 1.5 * s["spread"] / np.sqrt(r_draws), s
    d = r["generic4"]
    assert not d["stochastic"] and d["draws"] == 1 and d["bias"] == d["rel_err"] and d["spread"] == 0.0


# --------------------------------------------------------------------------- #
# 6. Definitions, yardstick, layer order
# --------------------------------------------------------------------------- #
def test_statistics_match_their_definitions_and_the_noise_yardstick():
    model = resnet(5)
    b1, b2 = (X16[:8], T16[:8]), (X16[8:], T16[8:])
    st = S.study_gradients(model, *b1, ["paper4", "generic2s"], repeats=3, noise_batches=[b1, b2],
                           systematic=True)
    ge = S.gradients(model, *b1)
    gp = S.gradients(model, *b1, "paper4")
    g2 = S.gradients(model, *b2)
    def flat(g):
        return np.concatenate([v.ravel() for v in g.values()])
    e, p, o = flat(ge), flat(gp), flat(g2)
    row = _overall(st)["paper4"]
    assert row["rel_err"] == pytest.approx(np.linalg.norm(p - e) / np.linalg.norm(e), rel=1e-9)
    assert row["cosine"] == pytest.approx(p @ e / (np.linalg.norm(p) * np.linalg.norm(e)), rel=1e-12)
    # noise of two batches: sum_m ||g_m - mean||^2 / (M - 1) = ||g1 - g2||^2 / 2
    noise = np.linalg.norm(e - o) / np.sqrt(2)
    assert row["noise"] == pytest.approx(noise / np.linalg.norm(e), rel=1e-9)
    assert row["err_over_noise"] == pytest.approx(np.linalg.norm(p - e) / noise, rel=1e-9)
    # avg-grad error over the two noise batches (the first is the studied one)
    gp2 = flat(S.gradients(model, *b2, "paper4"))
    avg = np.linalg.norm((p - e + gp2 - o) / 2) / np.linalg.norm((e + o) / 2)
    assert row["avg_err"] == pytest.approx(avg, rel=1e-9)
    # identical batches: no noise at all
    same = S.minibatch_noise(model, [b1, b1, b1])
    assert all(v == 0 for v in same.sq_noise.values())
    # a stochastic policy's draws: bias and spread from the draws themselves
    draws = [flat(S.gradients(model, *b1, pol)) for pol in S.draws_of("generic2s", 3, 0)]
    mean = np.mean(draws, axis=0)
    row = _overall(st)["generic2s"]
    assert row["bias"] == pytest.approx(np.linalg.norm(mean - e) / np.linalg.norm(e), rel=1e-9)
    spread = np.sqrt(sum(np.sum((d - mean) ** 2) for d in draws) / 2)
    assert row["spread"] == pytest.approx(spread / np.linalg.norm(e), rel=1e-9)
    assert row["rel_err"] == pytest.approx(np.mean([np.linalg.norm(d - e) for d in draws]) / np.linalg.norm(e),
                                           rel=1e-9)


def test_layer_order_is_the_forward_order():
    model = resnet(6, shortcut="projection")
    layers = S.layer_order(model, X16)
    names = [layer.module for layer in layers]
    assert names[:6] == ["conv", "blocks.0.bn1", "blocks.0.conv1", "blocks.0.bn2", "blocks.0.conv2",
                         "blocks.1.bn1"]
    assert names[-2:] == ["bn", "fc"]
    assert names.index("blocks.1.proj") == names.index("blocks.1.conv2") + 1   # proj runs after the branch
    assert [layer.depth for layer in layers] == list(range(len(layers)))
    assert sorted(n for layer in layers for n in layer.params) == sorted(n for n, _ in model.named_parameters())
    assert layers[1].params == ["blocks.0.bn1.weight", "blocks.0.bn1.bias"] and layers[1].kind == "BatchNorm2d"
    assert "forward" not in model.conv.__dict__          # the recording wrappers are gone


# --------------------------------------------------------------------------- #
# 7. ResNets with other activations
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "gelu"])
def test_resnet_with_other_activations(activation):
    relu = resnet(7, shortcut="projection")
    other = resnet(7, shortcut="projection", activation=activation)
    assert list(other.state_dict()) == list(relu.state_dict())
    assert all(np.array_equal(a, b)
               for a, b in zip(other.state_dict().values(), relu.state_dict().values(), strict=True))
    led = ledger(other, X16[:4], T16[:4], Paper(4))
    op = {"sigmoid": "Sigmoid", "tanh": "Tanh", "gelu": "GELU"}[activation]
    assert not any(e.op == "BatchNormReLU" for e in led.entries)
    acts = [e for e in led.entries if e.op == op]
    assert len(acts) == 7                                # 3 blocks x 2 units + the last one
    assert acts[-1].policy == "Exact()" and acts[-1].form == "float32"   # the last unit stays exact
    assert all(e.form == "generic" for e in acts[:-1])
    with storage_policy(Exact()):
        a, b = relu(Tensor(X16)).data, other(Tensor(X16)).data
    assert not np.allclose(a, b)
    z = nn.build_model("resnet8", num_classes=5, in_channels=3, input_size=8, width=4, activation=activation)
    assert z.activation == activation and z.blocks[0].activation == activation
    with pytest.raises(ValueError, match="activation"):
        nn.build_model("vgg11", activation=activation)
    with pytest.raises(ValueError, match="activation must be one of"):
        resnet(7, activation="swish")


# --------------------------------------------------------------------------- #
# 8. The command
# --------------------------------------------------------------------------- #
TINY = ["--model", "resnet8", "--width", "4", "--batch-size", "16", "--repeats", "2", "--noise-batches", "2"]


@pytest.mark.parametrize("experiment,extra,files", [
    ("depth", ["--policies", "paper4,generic4s"], ["overall.csv", "layers.csv", "params.csv", "study.json",
                                                   "table.md", "depth.png"]),
    ("activations", ["--policies", "paper4", "--activations", "relu,sigmoid"],
     ["activations.csv", "activations.json", "activations.png"]),
    ("training", ["--policies", "paper4,naive4", "--iterations", "4", "--every", "2"],
     ["training.csv", "training.json", "training.png"]),
    ("optimizers", ["--iterations", "3", "--optimizers", "sgd,adam:0.01", "--opt-policies", "exact,paper4",
                    "--seeds", "0"], ["optimizers.csv", "optimizers.json", "optimizers.png"]),
])
def test_study_command(tmp_path, capsys, experiment, extra, files):
    pytest.importorskip("matplotlib")
    rc = cli.main(["study", "--experiment", experiment, *TINY, *extra, "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| policy" in out or "| iteration" in out or "| optimizer" in out
    for f in files:
        assert (tmp_path / experiment / f).stat().st_size > 0, f
    data = json.loads((tmp_path / experiment / [f for f in files if f.endswith(".json")][0]).read_text())
    if experiment == "depth":
        assert [r["policy"] for r in data["overall"]] == ["exact", "paper4", "generic4s"]
        assert data["overall"][0]["rel_err"] == 0
    elif experiment == "training":
        assert sorted({r["iteration"] for r in data["rows"]}) == [0, 2, 4]
    elif experiment == "optimizers":
        assert {(r["optimizer"], r["policy"]) for r in data["rows"]} == {
            ("sgd", "exact"), ("sgd", "paper4"), ("adam", "exact"), ("adam", "paper4")}


def test_study_window_experiment(tmp_path, capsys):
    """The window experiment (tiny): every fixed window and the fitted one, both data sets,
    three seeds, measured at initialisation and after training; then the training runs."""
    pytest.importorskip("matplotlib")
    rc = cli.main(["study", "--experiment", "window", *TINY, "--iterations", "1", "--every", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    assert "| paper8-w6 |" in capsys.readouterr().out
    for f in ("window.csv", "units.csv", "training.csv", "window.json", "table.md", "window.png"):
        assert (tmp_path / "window" / f).stat().st_size > 0, f
    data = json.loads((tmp_path / "window" / "window.json").read_text())
    rows = data["rows"]
    assert {r["policy"] for r in rows} == set(S.window_policies())
    assert {(r["data"], r["seed"], r["iteration"]) for r in rows} == {
        (d, s, i) for d in ("digits", "random") for s in (0, 1, 2) for i in (0, 1)}
    assert all(0 < r["rel_err"] < 2 and -1 <= r["cosine"] <= 1 for r in rows)
    # the fitted 8-bit window clips nothing; the +-2 window clips the Gaussian-like tails
    at = {(r["policy"], r["data"], r["seed"], r["iteration"]): r for r in rows}
    assert all(at[("fit8", d, s, 0)]["clipped"] == 0 for d in ("digits", "random") for s in (0, 1, 2))
    assert all(at[("paper8-w2", d, s, 0)]["clipped"] > 0.01 for d in ("digits", "random") for s in (0, 1, 2))
    assert {(r["policy"], r["seed"]) for r in data["training"]} == {
        (p, s) for p in ("paper4", "fit4", "paper2", "fit2") for s in (0, 1, 2)}


def test_study_command_refuses_a_bad_policy(capsys):
    assert cli.main(["study", "--policies", "paper3"]) == 2
    assert "unknown storage policy" in capsys.readouterr().err
