"""Memory: the ledger counts every byte the saved state holds, every stored output is
kept once, consumers rebuild what they need a chunk at a time, and the measured peak
stays within the transient bound of docs/storage.md ("Transients")."""
from __future__ import annotations

import numpy as np
import pytest

from npapprox import Tensor, nn, ops, quant
from npapprox.kernels import paper_pack, use_reference
from npapprox.kernels.bn import BNSource, as_ncm, bn_backward
from npapprox.ledger import ledger, transient_bound
from npapprox.peak import measure_peak, measure_profile
from npapprox.policy import ACTIVATION, Exact, FitWindow, Generic, Paper, storage_policy
from npapprox.storage import PooledRef, SharedRef, Stored
from npapprox.tensor import topological_order
from npapprox.units import ExactUnit, PaperUnit

F32 = np.float32


def _models():
    nn.manual_seed(0)
    return {
        "resnet8": nn.PreActResNet(depth=8, width=4, num_classes=5),
        "resnet8-proj": nn.PreActResNet(depth=8, width=4, num_classes=5, shortcut="projection"),
        "resnet8-sigmoid": nn.PreActResNet(depth=8, width=4, num_classes=5, activation="sigmoid"),
        "resnet8-tanh": nn.PreActResNet(depth=8, width=4, num_classes=5, activation="tanh"),
        "vgg11/8": nn.VGG("vgg11", num_classes=5, in_channels=3, input_size=32, width_mult=1 / 8,
                          exact_pool_units=False),
        "densenet16": nn.DenseNet(depth=16, growth_rate=4, num_classes=5, in_channels=3, input_size=8),
    }


MODELS = _models()
POLICIES = [Exact(), Paper(4), Paper(2), FitWindow(4), Generic(4)]


def _input(name, n=4):
    size = 8 if name == "densenet16" else 32 if name.startswith("vgg") else 16
    rng = np.random.default_rng(3)
    return rng.standard_normal((n, 3, size, size)).astype(F32), np.arange(n) % 5


def _arrays(obj, seen_objs, out):
    """Every ndarray reachable from a stored form (slots, dicts, tuples), by object."""
    if id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _arrays(v, seen_objs, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _arrays(v, seen_objs, out)
    elif isinstance(obj, Stored):
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(obj, slot):
                    _arrays(getattr(obj, slot), seen_objs, out)


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("name", list(MODELS))
def test_ledger_total_is_every_byte_reachable_from_the_saved_state(name, policy):
    """The sum of nbytes over every distinct buffer reachable from the saved state (parameters
    excluded: they belong to the model) equals the ledger's total: no stored form holds bytes
    its entry does not count, and a shared form is counted once."""
    model, (x, t) = MODELS[name], _input(name)
    params = {id(_root(p.data)) for p in model.parameters()}
    with storage_policy(policy):
        root = ops.cross_entropy(model(Tensor(x)), t)
    found, seen = [], set()
    for ctx in topological_order(root._ctx):
        for stored in ctx.saved.values():
            _arrays(stored, seen, found)
    buffers = {id(_root(a)): _root(a) for a in found}
    reachable = sum(int(b.nbytes) for key, b in buffers.items() if key not in params)
    assert reachable == ledger(model, x, t, policy).stored


@pytest.mark.parametrize("policy", [Exact(), Paper(4), Generic(4)], ids=repr)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_no_activation_is_stored_twice(activation, policy):
    """Every conv but the first reads a stored output (a unit's, or the sigmoid/tanh op's own
    saved y): its entry is a reference costing 0 bytes, so each activation is kept once."""
    name = "resnet8" if activation == "relu" else f"resnet8-{activation}"
    model, (x, t) = MODELS[name], _input(name)
    led = ledger(model, x, t, policy)
    convs = [e for e in led.entries if e.op == "Conv2d" and e.name == "x" and e.module != "conv"]
    assert len(convs) == 6
    assert all(e.form.startswith("ref:") and e.payload + e.meta == 0 for e in convs), \
        [(e.module, e.form) for e in convs]
    if activation != "relu":                       # each sigmoid / tanh output: one stored form
        owners = [e for e in led.entries if e.op in ("Sigmoid", "Tanh") and e.name == "y"]
        assert len(owners) == 7 and all(e.payload > 0 for e in owners)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
@pytest.mark.parametrize("policy", [Exact(), Paper(4), Paper(1)], ids=repr)
def test_max_pool_output_is_rebuilt_from_the_unit_and_the_argmax(policy, kernel, stride, padding):
    """A conv reading a max-pool output of a unit stores a reference: rebuilt as the unit's
    rebuilt h at the argmax (an independent gather loop here); exactly the forward's
    pooled output under Exact."""
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((3, 4, 7, 9)).astype(F32), requires_grad=True)
    g, b = (Tensor(rng.standard_normal(4).astype(F32), requires_grad=True) for _ in range(2))
    w = Tensor(rng.standard_normal((2, 4, 3, 3)).astype(F32), requires_grad=True)
    with storage_policy(policy):
        h = ops.batch_norm2d(x, g, b, relu=True)
        p = ops.max_pool2d(h, kernel, stride, padding)
        y = ops.conv2d(p, w, padding=1)
    stored = y._ctx.saved["x"]
    assert isinstance(stored, PooledRef) and stored.payload_nbytes == 0
    argmax = p._ctx.saved["argmax"].restore()
    hh = h._ctx.saved["unit"].restore().h()
    want = np.empty(p.shape, F32)
    for n, c, i, j in np.ndindex(*p.shape):
        r, q = divmod(int(argmax[n, c, i, j]), kernel)
        want[n, c, i, j] = hh[n, c, i * stride + r - padding, j * stride + q - padding]
    got = stored.restore()
    assert got.tobytes() == want.tobytes()
    if isinstance(policy, Exact):
        assert got.tobytes() == p.data.tobytes()
    y.sum().backward()                                      # the pool's and conv's backward still run
    assert x.grad is not None and np.isfinite(x.grad).all()


def _paper_unit(rng, shape, bits):
    """A PaperUnit of random y (N, C, H, W) under random gamma, beta -> (unit, gamma, beta)."""
    y = rng.standard_normal(shape).astype(F32)
    gamma, beta = rng.standard_normal(shape[1]).astype(F32), rng.standard_normal(shape[1]).astype(F32)
    p = quant.paper_params(gamma, beta, bits)
    packed, _ = paper_pack(y, p["k"], p["s"], bits)
    return PaperUnit(packed, p, bits, shape, np.dtype(F32)), gamma, beta


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (5, 3, 3, 3), (4, 1, 1, 1)])
def test_h_of_a_slice_of_samples_equals_the_whole_decode(bits, shape):
    """Conv backward rebuilds its input chunk by chunk (``h_samples``): byte-equal to slicing
    the whole decode, whether the chunk starts on a byte boundary (own bytes) or not."""
    rng = np.random.default_rng(bits)
    unit, gamma, beta = _paper_unit(rng, shape, bits)
    x = rng.standard_normal(shape).astype(F32)
    mu, inv = x.mean(axis=(0, 2, 3)), (1 / x.std(axis=(0, 2, 3))).astype(F32)
    exact = ExactUnit(x, mu, inv, gamma, beta)
    for reference in (False, True):
        use_reference(reference)
        try:
            for u in (unit, exact):
                whole, read = u.h(), u.sample_reader()      # the conv's reader: dispatched once
                for sl in (slice(0, 1), slice(1, 3), slice(2, shape[0]), slice(0, shape[0]), slice(0, shape[0], 2)):
                    assert u.h_samples(sl).tobytes() == whole[sl].tobytes(), (type(u).__name__, sl)
                    assert read(sl).tobytes() == whole[sl].tobytes(), (type(u).__name__, sl, reference)
        finally:
            use_reference(False)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_backward_from_codes_is_byte_identical_to_decoding_first(bits, batch_stats):
    """The fused pass reading a unit's codes gives the bytes of decoding xhat and the mask into
    arrays and running the ordinary pass (the Cython kernel; the reference decodes first)."""
    rng = np.random.default_rng(10 + bits)
    for shape in [(5, 3, 7, 9), (2, 4, 1, 1), (3, 2, 16, 17)]:
        c = shape[1]
        unit, gamma, beta = _paper_unit(rng, shape, bits)
        gy = as_ncm(rng.standard_normal(shape).astype(F32))
        inv = np.abs(rng.standard_normal(c)).astype(F32)
        decoded = BNSource(as_ncm(unit.xhat()), mask=unit.mask())
        for reference in (False, True):
            use_reference(reference)
            try:
                a = bn_backward(gy, unit.bn_source(), gamma, inv, batch_stats=batch_stats)
                b = bn_backward(gy, decoded, gamma, inv, batch_stats=batch_stats)
            finally:
                use_reference(False)
            for got, want in zip(a, b, strict=True):
                assert got.tobytes() == want.tobytes(), (shape, reference)


def test_in_place_accumulation_leaves_the_callers_arrays_alone():
    """The walk adds a gradient into a pending buffer only when nothing else can see it: the
    caller's gradient, an array handed to two parents and a leaf's .grad are never written."""
    rng = np.random.default_rng(2)
    a = Tensor(rng.standard_normal((3, 4)).astype(F32), requires_grad=True)
    b = Tensor(rng.standard_normal((3, 4)).astype(F32), requires_grad=True)
    s = ops.add(a, b)
    out = ops.add(ops.add(s, s), ops.mul(s, b))           # s fans out three ways; b twice
    g = rng.standard_normal((3, 4)).astype(F32)
    g0 = g.copy()
    out.backward(g)
    assert g.tobytes() == g0.tobytes()
    bd = b.data.astype(np.float64)
    gs = 2 * g0.astype(np.float64) + g0 * bd
    np.testing.assert_allclose(a.grad, gs, rtol=1e-6)
    np.testing.assert_allclose(b.grad, gs + g0 * (a.data + b.data), rtol=1e-5)


@pytest.mark.parametrize("policy", [Paper(4), Paper(2), Exact()], ids=repr)
def test_measured_peak_minus_ledger_is_within_the_transient_bound(policy):
    """peak - ledger <= 2.5 largest-activation buffers + the largest conv workspace
    (``ledger.transient_bound``, docs/storage.md "Transients"), on a small ResNet; the
    formula is the one the ResNet-20/56/164 table checks."""
    nn.manual_seed(0)
    model = nn.PreActResNet(depth=14, width=8, num_classes=5)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 3, 32, 32)).astype(F32)
    t = rng.integers(0, 5, 32)
    led = ledger(model, x, t, policy)
    peak = min(measure_peak(model, x, t, policy) for _ in range(2))
    bound = transient_bound(led)
    act = 4 * 32 * 8 * 32 * 32
    assert bound < 2.5 * act + 4 * 2**20 * 4            # the formula itself is not vacuous
    assert peak - led.stored <= bound, (peak, led.stored, bound)
    assert peak > led.stored                            # the ledger is held at the peak


def test_shared_forms_are_kept_once_in_memory():
    """A SharedRef holds the producer's form itself (no copy): restoring gives its output."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3)).astype(F32), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3)).astype(F32), requires_grad=True)
    with storage_policy(Generic(4)):
        y = ops.sigmoid(x)
        z = ops.linear(y, w)
    ref, own = z._ctx.saved["x"], y._ctx.saved["y"]
    assert isinstance(ref, SharedRef) and ref.target is own and ref.payload_nbytes == 0
    assert ref.restore().tobytes() == own.restore().tobytes()
    assert z._ctx.fn.SAVES["x"] == ACTIVATION


@pytest.mark.parametrize("policy", [Exact(), Paper(4), Paper(2), Generic(4)], ids=repr)
def test_the_stretch_lines_predict_a_larger_batchs_measured_peak(policy):
    """``measure_profile``: one measured peak per stretch between two ops, the same
    stretches at every batch, its maximum the measured peak (the same in a second
    run); the line of each stretch through 128 and 256 images predicts the peak
    measured at 640 images (the budget search's model, docs/storage.md) within 1%
    (the order in which two conv workers free their chunk buffers moves a
    stretch's peak by a few hundred KB from run to run)."""
    nn.manual_seed(0)
    model = nn.build_model("resnet8", num_classes=10, in_channels=3, input_size=32, width=8)
    rng = np.random.default_rng(0)

    def run(n):
        x, y = rng.standard_normal((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n)
        return measure_profile(model, x, y, policy), measure_peak(model, x, y, policy)

    (p128, _), (p256, _), (p640, peak640) = run(128), run(256), run(640)
    assert len(p128) == len(p256) == len(p640) > 40
    assert abs(p640.max() - peak640) <= 0.005 * peak640      # two runs: the same stretches and peak
    predicted = (p256 + (p256 - p128) / 128 * (640 - 256)).max()
    assert abs(predicted - peak640) <= 0.01 * peak640, (predicted, peak640)
