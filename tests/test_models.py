"""The model zoo: VGG with BN, DenseNet-BC, bottleneck ResNets and ``build_model``.

1. every named model's output shape (and the literature's parameter counts);
2. forward, loss, every parameter gradient and the BN running statistics of a small VGG
   (both classifiers), a small DenseNet-BC and a bottleneck ResNet against independent
   PyTorch mirrors (tests/torch_models.py), float32 tolerances as in test_torch_oracle.py:
   logits rtol 1e-4 / atol 1e-5, loss rtol 1e-5, gradients rtol 5e-4 / atol 5e-5 (atol
   relative to max|reference|);
3. the exact-forward invariant (bit-identical logits under Exact, Paper(K), Generic(K));
4. the storage economy in the ledger, against byte counts computed here from the
   architecture: one K-bit 'paper' unit per BN -> ReLU, references for convs reading a
   unit, max-pool units exact (VGG), nothing stored for a concatenation (DenseNet);
5. bad names, sizes and arguments give clear errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from npapprox import Tensor, cli, nn, no_grad, ops
from npapprox.ledger import ledger
from npapprox.policy import PARAM, STAT, UNIT, Exact, Generic, Paper, storage_policy

from model_oracle import against_torch

F32 = np.float32


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


# small instances used throughout
def small_vgg(classifier="avg", exact_pool_units=True, seed=1):
    nn.manual_seed(seed)   # vgg11 at 1/8 width: 8, 16, 32, 32, 64, 64, 64, 64 channels
    return nn.VGG("vgg11", num_classes=10, in_channels=3, input_size=32, width_mult=1 / 8,
                  classifier=classifier, exact_pool_units=exact_pool_units)


def small_densenet(seed=2):
    nn.manual_seed(seed)   # DenseNet-BC-16: 2 bottleneck layers per block, k = 4, c0 = 8
    return nn.DenseNet(depth=16, growth_rate=4, num_classes=10, in_channels=3, input_size=8)


# --------------------------------------------------------------------------- #
# 1. Shapes and sizes
# --------------------------------------------------------------------------- #
SHAPE_CASES = {  # name: (width, input size): reduced widths keep this fast
    "resnet8": (4, (8, 12)), "resnet20": (4, 8), "resnet32": (4, 8), "resnet56": (2, 8),
    "resnet110": (2, 8), "resnet164": (2, 8), "vgg11": (8, 32), "vgg16": (8, (32, 64)),
    "densenet40": (4, 8), "densenet100": (2, 8),
}


def test_shape_cases_cover_every_name():
    assert set(SHAPE_CASES) == set(nn.MODEL_NAMES)


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_forward_shape(name):
    width, size = SHAPE_CASES[name]
    nn.manual_seed(0)
    model = nn.build_model(name, num_classes=7, in_channels=1, input_size=size, width=width)
    hw = size if isinstance(size, tuple) else (size, size)
    with no_grad():
        y = model(_x((3, 1) + hw))
    assert y.shape == (3, 7) and y.dtype == F32
    assert np.all(np.isfinite(y.data))


# parameters at the standard width, 10 classes, RGB (He et al. 2016; Huang et al. 2017)
LITERATURE = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6,
              "resnet164": 1.7e6, "densenet100": 0.8e6}


@pytest.mark.parametrize("name", list(LITERATURE))
def test_parameter_counts_match_the_literature(name):
    model = nn.build_model(name, num_classes=10, in_channels=3, input_size=32)
    count = sum(p.data.size for p in model.parameters())
    assert abs(count - LITERATURE[name]) < 0.05 * LITERATURE[name], count


def test_zoo_structure_and_options():
    m = nn.build_model("resnet164", input_size=32, width=2)
    assert m.depth == 164 and len(m.blocks) == 54 and isinstance(m.blocks[0], nn.PreActBottleneck)
    m = nn.build_model("resnet110", input_size=32, width=2)
    assert len(m.blocks) == 54 and isinstance(m.blocks[0], nn.PreActBlock)
    proj = nn.build_model("resnet20", width=4, shortcut="projection")
    assert {n for n, _ in proj.named_modules() if n.endswith(".proj")} == {"blocks.3.proj", "blocks.6.proj"}
    assert not any(n.endswith(".proj") for n, _ in nn.build_model("resnet20", width=4).named_modules())
    v = nn.build_model("vgg11", width=8)   # width = first-stage channels; the others scale with it
    convs = [mod for _, mod in v.named_modules() if isinstance(mod, nn.Conv2d)]
    assert [c.weight.shape[0] for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert sum(isinstance(mod, nn.Conv2d) for _, mod in nn.build_model("vgg16", width=8).named_modules()) == 13
    d = nn.build_model("densenet40", width=12)
    assert d.block1.n == 6 and d.fc.weight.shape == (10, 132)   # 24 + 6*12 -> 48 -> 120 -> 60 -> 132
    assert d.trans1.conv.weight.shape[:2] == (48, 96) and d.trans2.conv.weight.shape[:2] == (60, 120)
    flat = nn.build_model("vgg11", width=8, classifier="flatten", input_size=64, exact_pool_units=False)
    assert flat.fc.weight.shape == (10, 64 * 2 * 2)
    assert all(mod.storage is None for _, mod in flat.named_modules())


# --------------------------------------------------------------------------- #
# 2. Against PyTorch mirrors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("classifier", ["avg", "flatten"])
def test_vgg_vs_torch(torch, classifier):
    model = small_vgg(classifier)
    from torch_models import TorchVGG  # imports torch: only after the fixture provided it

    tmodel = TorchVGG(nn.VGG_CONFIGS["vgg11"], 10, 3, 32, 1 / 8, classifier)
    against_torch(torch, model, tmodel, _x((4, 3, 32, 32), 5))


def test_densenet_bc_vs_torch(torch):
    model = small_densenet()
    from torch_models import TorchDenseNetBC

    tmodel = TorchDenseNetBC(depth=16, k=4, compression=0.5, num_classes=10, in_channels=3)
    against_torch(torch, model, tmodel, _x((4, 3, 8, 8), 6))


@pytest.mark.parametrize("shortcut,depth", [("pad", 11), ("projection", 11), ("pad", 20)])
def test_bottleneck_resnet_vs_torch(torch, shortcut, depth):
    nn.manual_seed(3)
    model = nn.PreActResNet(depth=depth, num_classes=10, in_channels=3, width=4, shortcut=shortcut,
                            block="bottleneck")
    from torch_models import TorchPreActResNet

    tmodel = TorchPreActResNet(depth, 10, 3, 4, shortcut, block="bottleneck")
    against_torch(torch, model, tmodel, _x((4, 3, 8, 8), 7))


# --------------------------------------------------------------------------- #
# 3. The forward pass is exact under the policies that claim it
# --------------------------------------------------------------------------- #
FORWARD_CASES = {
    "vgg": (lambda: small_vgg(), (4, 3, 32, 32)),
    "vgg-flatten-quantised-pool-units": (lambda: small_vgg("flatten", exact_pool_units=False), (4, 3, 32, 32)),
    "densenet": (small_densenet, (4, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_is_bit_identical_under_exact_forward_policies(case):
    make, shape = FORWARD_CASES[case]
    model = make()
    x, t = _x(shape, 8), np.arange(shape[0]) % 10
    grads = {}
    logits = {}
    for policy in (Exact(), Paper(4), Paper(8), Generic(4)):
        model.zero_grad()
        with storage_policy(policy):
            out = model(Tensor(x))   # training mode: batch statistics, so the running stats do not matter
            loss = ops.cross_entropy(out, t)
        loss.backward()
        logits[repr(policy)] = out.data
        grads[repr(policy)] = {n: p.grad for n, p in model.named_parameters()}
    for name, out in logits.items():
        assert np.array_equal(out, logits["Exact()"]), f"{name}: logits differ from the exact forward"
    # the backward is approximate, but close: the cosine of each parameter's gradient to the exact one
    for name, g in grads["Paper(bits=8)"].items():
        e = grads["Exact()"][name]
        cos = float(np.sum(g * e) / (np.linalg.norm(g) * np.linalg.norm(e) + 1e-30))
        assert cos > 0.99, f"Paper(8): gradient of {name} has cosine {cos:.4f} to the exact one"


# --------------------------------------------------------------------------- #
# 4. The economy, in the ledger
# --------------------------------------------------------------------------- #
def _paper_bytes(shape, bits=4):
    """One paper unit: K-bit codes + per channel the int32 first-positive code and three
    float32 decode maps (h_step, x_step, x_off)."""
    return math.ceil(int(np.prod(shape)) * bits / 8) + 16 * shape[1]


def _exact_unit_bytes(shape):
    """One exact unit: the float32 BN input + float32 mean per channel."""
    return 4 * int(np.prod(shape)) + 4 * shape[1]


def _generic_bytes(numel, bits=4, group=256):
    return math.ceil(numel * bits / 8), 8 * math.ceil(numel / group)


def _units(led):
    return {e.module: e for e in led.entries if e.op == "BatchNormReLU" and e.name == "unit"}


def _check_unit_entries(led, shapes, exact_modules):
    """Each unit: one UNIT entry of the computed shape (K-bit paper form, or float32 where the
    model keeps it exactly), its sigma as a float32 STAT, gamma by reference."""
    units = _units(led)
    assert set(units) == set(shapes)
    assert sum(1 for e in led.entries if e.kind == UNIT) == len(shapes)
    for name, shape in shapes.items():
        u = units[name]
        assert u.shape == shape, name
        if name in exact_modules:
            assert (u.form, u.policy, u.payload, u.meta) == ("float32", "Exact()", 4 * int(np.prod(shape)),
                                                             4 * shape[1]), name
        else:
            assert (u.kind, u.form, u.bits, u.policy) == (UNIT, "paper", 4, "Paper(bits=4)"), name
            assert u.payload + u.meta == _paper_bytes(shape), name
        mine = {e.name: e for e in led.entries if e.module == name}
        assert sorted(mine) == ["gamma", "inv_sigma", "unit"], name
        assert (mine["inv_sigma"].kind, mine["inv_sigma"].payload) == (STAT, 4 * shape[1])
        assert (mine["gamma"].kind, mine["gamma"].payload) == (PARAM, 0)


def _densenet_units(depth, k, n_batch, hw, theta=0.5):
    """(module name -> shape) of every BN -> ReLU unit of DenseNet-BC(depth, k), from the architecture."""
    n = (depth - 4) // 6
    shapes, c, size = {}, 2 * k, hw
    for b in (1, 2, 3):
        for i in range(n):
            shapes[f"block{b}.layer{i + 1}.bn1"] = (n_batch, c + i * k, size, size)
            shapes[f"block{b}.layer{i + 1}.bn2"] = (n_batch, 4 * k, size, size)
        c += n * k
        if b < 3:
            shapes[f"trans{b}.bn"] = (n_batch, c, size, size)
            c, size = int(theta * c), size // 2
    shapes["bn"] = (n_batch, c, size, size)
    return shapes


def test_densenet_ledger_economy():
    """DenseNet-BC-16, k = 4, batch 4, 8x8: every unit's BN reads a concatenation; under
    Paper(4) the ledger keeps 4-bit codes of each unit's output and nothing else
    activation-sized (the concatenations are not stored), exactly as computed here."""
    n, hw = 4, 8
    model = small_densenet()
    x, t = _x((n, 3, hw, hw), 9), np.arange(n) % 10
    led = ledger(model, x, t, Paper(4))
    shapes = _densenet_units(16, 4, n, hw)
    _check_unit_entries(led, shapes, exact_modules={"bn"})
    # a concatenation and an average pool save nothing
    assert not [e for e in led.entries if e.op in ("ConcatChannels", "AvgPool2d", "GlobalAvgPool2d")]
    convs = [e for e in led.entries if e.op == "Conv2d" and e.name == "x"]
    assert len(convs) == 1 + 3 * 2 * 2 + 2   # first conv, two per layer, one per transition
    first = [e for e in convs if e.module == "conv"]
    assert len(first) == 1 and (first[0].form, first[0].payload) == ("float32", x.nbytes)
    assert all(e.form == "ref:paper" and e.payload + e.meta == 0 for e in convs if e.module != "conv")
    fc = next(e for e in led.entries if e.op == "Linear" and e.name == "x")
    fc_in = n * shapes["bn"][1]
    assert (fc.form, (fc.payload, fc.meta)) == ("generic", _generic_bytes(fc_in))

    paper = (x.nbytes + sum(_paper_bytes(s) for m, s in shapes.items() if m != "bn")
             + _exact_unit_bytes(shapes["bn"]) + sum(_generic_bytes(fc_in)))
    exact = x.nbytes + sum(_exact_unit_bytes(s) for s in shapes.values()) + 4 * fc_in
    led_exact = ledger(model, x, t, Exact())
    assert led.activation_stored == paper
    assert led_exact.activation_stored == exact
    assert all(e.form in ("float32", "param", "int64", "ref:float32") for e in led_exact.entries)
    # measured: 95,536 B (Exact) vs 18,504 B (Paper(4)): 5.16x less. This tiny net is dominated
    # by what stays exact (the network input, the last unit) and by the per-channel metadata
    # (16 B: s and three decode maps) of 2x2 maps; a standard autodiff framework (BN input + ReLU
    # output per unit + its own copy of each conv input) would keep 277,488 B, 15.0x the Paper(4) ledger.
    ratio = led_exact.activation_stored / led.activation_stored
    assert ratio > 5.1, ratio
    assert led.standard_autodiff / led.activation_stored > 14.5


def test_densenet40_ledger_ratio():
    """DenseNet-BC-40 (k = 12) on 8 CIFAR-sized images: measured 32,454,720 B (Exact) vs
    4,388,344 B (Paper(4)), 7.40x less (batch 128: 519 MB vs 70 MB; DenseNet-BC-100: 7.69x)."""
    nn.manual_seed(0)
    model = nn.build_model("densenet40", input_size=32)
    x, t = _x((8, 3, 32, 32), 11), np.arange(8) % 10
    exact, paper = (ledger(model, x, t, p).activation_stored for p in (Exact(), Paper(4)))
    assert 7.2 < exact / paper < 8, (exact, paper)


def _vgg_layout(config, width_mult, n_batch, hw):
    """From a VGG config: (unit module name -> shape), the units feeding a max-pool, and the
    convs reading a max-pool's output (features.<j>: a conv takes two indices, a pool one)."""
    shapes, pool_units, after_pool, size, j = {}, set(), set(), hw, 0
    for i, v in enumerate(config):
        if v == "M":
            size, j = size // 2, j + 1
            continue
        if i > 0 and config[i - 1] == "M":
            after_pool.add(f"features.{j}")
        shapes[f"features.{j + 1}"] = (n_batch, max(1, round(v * width_mult)), size, size)
        if i + 1 < len(config) and config[i + 1] == "M":
            pool_units.add(f"features.{j + 1}")
        j += 2
    return shapes, pool_units, after_pool


@pytest.mark.parametrize("exact_pool_units", [True, False])
def test_vgg_ledger_economy(exact_pool_units):
    """VGG-11 at 1/8 width, batch 4, 32x32: one paper unit per BN -> ReLU (float32 where it feeds
    a max-pool, by default), a reference for every conv reading a unit, the pool keeps only its
    argmax, and a conv reading a pool's output stores a reference rebuilding it from the
    pool's input form and the argmax (nothing stored twice)."""
    n, hw = 4, 32
    model = small_vgg(exact_pool_units=exact_pool_units)
    x, t = _x((n, 3, hw, hw), 10), np.arange(n) % 10
    config = nn.VGG_CONFIGS["vgg11"]
    shapes, pool_units, after_pool = _vgg_layout(config, 1 / 8, n, hw)
    assert len(shapes) == 8 and len(pool_units) == 5 and len(after_pool) == 4
    led = ledger(model, x, t, Paper(4))
    _check_unit_entries(led, shapes, exact_modules=pool_units if exact_pool_units else set())

    pools = [e for e in led.entries if e.op == "MaxPool2d"]
    assert len(pools) == 5 and all(e.name == "argmax" and e.form == "uint8" for e in pools)
    # conv inputs: the network input (exact), a unit's output (reference), a pool's output (a
    # reference to the pool's input form: the unit's, exact or paper)
    convs = {e.module: e for e in led.entries if e.op == "Conv2d" and e.name == "x"}
    assert len(convs) == 8
    generic = 0
    for name, e in convs.items():
        if name == "features.0":
            assert (e.form, e.payload) == ("float32", x.nbytes)
        elif name in after_pool:
            unit_form = "float32" if exact_pool_units else "paper"
            assert (e.form, e.payload + e.meta) == (f"ref:pool:ref:{unit_form}", 0), name
        else:
            assert e.form.startswith("ref:") and e.payload + e.meta == 0, name
    fc = next(e for e in led.entries if e.op == "Linear" and e.name == "x")
    fc_bytes = sum(_generic_bytes(n * 64))
    assert (fc.form, fc.payload + fc.meta) == ("generic", fc_bytes)

    exact_units = pool_units if exact_pool_units else set()
    paper = (x.nbytes + generic + fc_bytes
             + sum(_exact_unit_bytes(s) if m in exact_units else _paper_bytes(s) for m, s in shapes.items()))
    assert led.activation_stored == paper
    led_exact = ledger(model, x, t, Exact())
    exact = x.nbytes + 4 * n * 64 + sum(_exact_unit_bytes(s) for s in shapes.values())
    assert led_exact.activation_stored == exact
    ratio = led_exact.activation_stored / led.activation_stored
    # measured: 354,656 B (Exact: the pooled outputs are references now, under every policy) vs
    # 309,096 B with exact pool units (1.15x: the units feeding a pool hold most of VGG's
    # activations) and vs 92,680 B with quantised pool units (3.83x; the float32 network input is
    # 14% of the exact total here).
    assert ratio > (1.12 if exact_pool_units else 3.7), ratio


# --------------------------------------------------------------------------- #
# 5. Clear errors
# --------------------------------------------------------------------------- #
ERRORS = {
    "unknown name": (lambda: nn.build_model("resnet21"), r"unknown model 'resnet21'; expected one of resnet8, "
                     r"resnet20, .*vgg11, vgg16, densenet40"),
    "resnet size": (lambda: nn.build_model("resnet20", input_size=30), r"resnet20 needs input height and width "
                    r"divisible by 4 .*got input_size \(30, 30\)"),
    "vgg size": (lambda: nn.build_model("vgg11", input_size=(32, 16)), r"vgg11 with 5 max-pools needs input "
                 r"height and width divisible by 32, got input_size \(32, 16\)"),
    "densenet size": (lambda: nn.build_model("densenet40", input_size=10),
                      r"divisible by 4 .*got input_size \(10, 10\)"),
    "bad size": (lambda: nn.build_model("resnet20", input_size=(8, 8, 8)), r"input_size must be a positive int "
                 r"or an \(H, W\) pair"),
    "width": (lambda: nn.build_model("resnet20", width=0), r"width must be a positive integer, got 0"),
    "classes": (lambda: nn.build_model("vgg11", num_classes=0), r"num_classes must be a positive integer"),
    "shortcut on vgg": (lambda: nn.build_model("vgg11", shortcut="projection"), r"shortcut applies to ResNets only"),
    "shortcut name": (lambda: nn.build_model("resnet20", shortcut="conv"), r"shortcut must be 'pad' or 'projection'"),
    "vgg config": (lambda: nn.VGG("vgg12"), r"unknown VGG config 'vgg12'; expected one of vgg11, vgg13, vgg16"),
    "vgg custom config": (lambda: nn.VGG(("M", 8)), r"starting with a conv"),
    "vgg width": (lambda: nn.VGG("vgg11", width_mult=0), r"width_mult must be a positive number, got 0"),
    "vgg classifier": (lambda: nn.VGG("vgg11", classifier="max"), r"classifier must be 'avg' or 'flatten'"),
    "densenet depth": (lambda: nn.DenseNet(depth=41), r"bottleneck layers has depth 6n \+ 4 .*got 41"),
    "densenet plain depth": (lambda: nn.DenseNet(depth=12, bottleneck=False), r"plain layers has depth 3n \+ 4"),
    "densenet growth": (lambda: nn.DenseNet(growth_rate=0), r"growth_rate must be a positive integer"),
    "densenet compression": (lambda: nn.DenseNet(compression=0), r"compression must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_bad_arguments_give_clear_errors(case):
    fn, match = ERRORS[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_inputs_give_clear_errors():
    nn.manual_seed(0)
    vgg = nn.VGG("vgg11", width_mult=1 / 16, classifier="flatten")
    with pytest.raises(ValueError, match=r"divisible by 32 \(5 2x2 max-pools\), got \(16, 16\)"):
        vgg(_x((2, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"built for input size \(32, 32\), got \(64, 64\)"):
        vgg(_x((2, 3, 64, 64)))
    with pytest.raises(ValueError, match=r"VGG expects input \(N, 3, H, W\), got shape \(2, 1, 32, 32\)"):
        vgg(_x((2, 1, 32, 32)))
    dense = nn.DenseNet(depth=10, growth_rate=2, input_size=8)
    with pytest.raises(ValueError, match=r"DenseNet: input height and width must be divisible by 4 .*got \(6, 8\)"):
        dense(_x((2, 3, 6, 8)))
    avg = nn.VGG("vgg11", width_mult=1 / 16)   # the average-pool head takes any multiple of 32
    with no_grad():
        assert avg(_x((1, 3, 64, 32))).shape == (1, 10)


def test_a_registered_model_is_built_by_name(capsys):
    """``register_model`` is the one step: ``build_model``, ``input_divisor`` and the
    command line's model list read ``nn.MODELS``."""
    def build(num_classes, in_channels, size, width, **options):
        return nn.Sequential(nn.GlobalAvgPool2d(), nn.Linear(in_channels, num_classes))

    nn.register_model("tinypool", build, divisor=2)
    try:
        m = nn.build_model("TinyPool", num_classes=3, in_channels=2, input_size=4)
        with no_grad():
            assert m(np.ones((5, 2, 4, 4), np.float32)).shape == (5, 3)
        assert nn.input_divisor("tinypool") == 2
        with pytest.raises(ValueError, match="shortcut applies to ResNets only, not to tinypool"):
            nn.build_model("tinypool", shortcut="pad")
        with pytest.raises(SystemExit):
            cli.main(["train", "--help"])
        assert "tinypool" in capsys.readouterr().out
    finally:
        del nn.MODELS["tinypool"]
    with pytest.raises(ValueError, match="unknown model 'tinypool'"):
        nn.build_model("tinypool")
