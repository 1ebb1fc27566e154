"""Optimizers and learning-rate schedules.

1. SGD, Adam and RMSprop against ``torch.optim`` (same initial parameters and gradient
   sequence, several steps, a parameter without gradient on one step, a learning-rate change
   mid-run, the "kernels" decay mask as torch parameter groups), float32 tolerance; and Adam /
   RMSprop against their formulas in float64 NumPy (SGD's is in test_nn.py);
2. the weight-decay mask;
3. ``state_dict`` / ``load_state_dict``: resuming reproduces the uninterrupted run bit for bit;
   the state is a host copy; a bad state is refused without changing anything;
4. schedules against hand-computed values; ``make_optimizer`` / ``make_schedule``;
5. bad arguments give clear errors.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from npapprox import nn
from npapprox.optim import (
    SGD,
    Adam,
    ConstantSchedule,
    CosineSchedule,
    Optimizer,
    PaperSchedule,
    RMSprop,
    StepSchedule,
    make_optimizer,
    make_schedule,
)

SHAPES = [(2, 3, 3, 3), (2,), (4, 5), (5,)]   # conv kernel, BN/bias vector, linear kernel, bias
STEPS = 6


def _initial(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _gradients(seed=1, steps=STEPS):
    """Per step, one gradient per parameter (None for parameter 3 on step 1: it is skipped)."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        if step == 1:
            grads[3] = None
        out.append(grads)
    return out


def _lr_at(step, lr):
    return lr if step < 3 else lr / 2   # a schedule halves the rate from step 3 on


def _run(opt, params, grads_per_step, lr, start=0):
    for step, grads in enumerate(grads_per_step, start):
        opt.lr = _lr_at(step, lr)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.copy()
        opt.step()


TORCH_CASES = {
    "sgd-momentum": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=5e-4), "kernels"),
    "sgd-nesterov-all": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True), "all"),
    "sgd-plain": ("sgd", dict(lr=0.1, weight_decay=1e-2), "kernels"),
    "adam": ("adam", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), "kernels"),
    "adam-all": ("adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-1), "all"),
    "rmsprop": ("rmsprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=1e-2), "kernels"),
    "rmsprop-momentum-all": ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-7, momentum=0.9, weight_decay=1e-2), "all"),
}
OURS = {"sgd": SGD, "adam": Adam, "rmsprop": RMSprop}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_optimizer_matches_torch(torch, case):
    name, kw, decay = TORCH_CASES[case]
    w0, grads = _initial(), _gradients()
    params = [nn.Parameter(w.copy()) for w in w0]
    opt = OURS[name](params, decay=decay, **kw)

    tparams = [torch.tensor(w.copy(), requires_grad=True) for w in w0]
    tcls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[name]
    wd = kw.get("weight_decay", 0.0)
    if decay == "kernels":   # the mask as torch parameter groups
        groups = [{"params": [t for t in tparams if t.ndim >= 2], "weight_decay": wd},
                  {"params": [t for t in tparams if t.ndim < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": tparams, "weight_decay": wd}]
    topt = tcls(groups, **{k: v for k, v in kw.items() if k != "weight_decay"})

    _run(opt, params, grads, kw["lr"])
    for step, gs in enumerate(grads):
        for group in topt.param_groups:
            group["lr"] = _lr_at(step, kw["lr"])
        for t, g in zip(tparams, gs, strict=True):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
    for i, (p, t) in enumerate(zip(params, tparams, strict=True)):
        assert p.data.dtype == np.float32
        ref = t.detach().numpy()
        np.testing.assert_allclose(p.data, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()),
                                   err_msg=f"{case}: parameter {i}")
        assert not np.array_equal(p.data, w0[i]), "the parameter did not move"
    assert opt.steps == [STEPS, STEPS, STEPS, STEPS - 1]


def _adam_numpy(ws, grads_per_step, lr_of, b1, b2, eps, wd, decay):
    """Adam in float64 from the formula, per-parameter step count t:
    g += wd w (masked); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
    ws = [w.astype(np.float64) for w in ws]
    m = [np.zeros_like(w) for w in ws]
    v = [np.zeros_like(w) for w in ws]
    t = [0] * len(ws)
    for step, grads in enumerate(grads_per_step):
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.astype(np.float64) + (wd * ws[i] if decay == "all" or ws[i].ndim >= 2 else 0)
            t[i] += 1
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ws[i] = ws[i] - lr_of(step) * (m[i] / (1 - b1 ** t[i])) / (np.sqrt(v[i] / (1 - b2 ** t[i])) + eps)
    return ws


def _rmsprop_numpy(ws, grads_per_step, lr_of, alpha, eps, momentum, wd, decay):
    """RMSprop in float64: g += wd w (masked); s = alpha s + (1-alpha) g^2; u = g / (sqrt(s) + eps);
    with momentum b = momentum b + u (b starts at 0), w -= lr b; else w -= lr u."""
    ws = [w.astype(np.float64) for w in ws]
    s = [np.zeros_like(w) for w in ws]
    b = [np.zeros_like(w) for w in ws]
    for step, grads in enumerate(grads_per_step):
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.astype(np.float64) + (wd * ws[i] if decay == "all" or ws[i].ndim >= 2 else 0)
            s[i] = alpha * s[i] + (1 - alpha) * g * g
            u = g / (np.sqrt(s[i]) + eps)
            if momentum:
                b[i] = momentum * b[i] + u
                u = b[i]
            ws[i] = ws[i] - lr_of(step) * u
    return ws


@pytest.mark.parametrize("decay", ["kernels", "all"])
def test_adam_and_rmsprop_match_numpy_formulas(decay):
    w0, grads = _initial(2), _gradients(3)
    def lr_of(step):
        return _lr_at(step, 1e-2)
    cases = [
        (Adam, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
         lambda: _adam_numpy(w0, grads, lr_of, 0.9, 0.999, 1e-8, 1e-2, decay)),
        (RMSprop, dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.5, weight_decay=1e-2),
         lambda: _rmsprop_numpy(w0, grads, lr_of, 0.99, 1e-8, 0.5, 1e-2, decay)),
        (RMSprop, dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=1e-2),
         lambda: _rmsprop_numpy(w0, grads, lr_of, 0.9, 1e-8, 0.0, 1e-2, decay)),
    ]
    for cls, kw, formula in cases:
        params = [nn.Parameter(w.copy()) for w in w0]
        _run(cls(params, decay=decay, **kw), params, grads, kw["lr"])
        for i, (p, e) in enumerate(zip(params, formula(), strict=True)):
            np.testing.assert_allclose(p.data, e, rtol=1e-5, atol=1e-6, err_msg=f"{cls.__name__} parameter {i}")


# --------------------------------------------------------------------------- #
# 2. The weight-decay mask
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("cls", [SGD, Adam, RMSprop])
def test_weight_decay_reaches_kernels_only_by_default(cls):
    for decay in ("kernels", "all"):
        w, b = nn.Parameter(np.ones((2, 2), np.float32)), nn.Parameter(np.ones(2, np.float32))
        opt = cls([w, b], lr=0.1, weight_decay=0.1, decay=decay)
        assert opt.decays(w) and opt.decays(b) == (decay == "all")
        w.grad, b.grad = np.zeros((2, 2), np.float32), np.zeros(2, np.float32)
        opt.step()
        assert np.all(w.data < 1), "the kernel decays"
        if decay == "kernels":
            np.testing.assert_array_equal(b.data, 1.0)   # zero gradient, no decay: untouched
        else:
            assert np.all(b.data < 1)
    opt.zero_grad()
    assert w.grad is None and b.grad is None
    assert not cls([w], lr=0.1).decays(w), "no weight decay: nothing decays"


# --------------------------------------------------------------------------- #
# 3. State: resume bit for bit
# --------------------------------------------------------------------------- #
RESUME_CASES = {
    "sgd": (SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "sgd-plain": (SGD, dict(lr=0.05)),
    "adam": (Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop": (RMSprop, dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_state_dict_resume_is_bit_identical(case):
    cls, kw = RESUME_CASES[case]
    w0, grads = _initial(4), _gradients(5, steps=5)

    full = [nn.Parameter(w.copy()) for w in w0]
    _run(cls(full, **kw), full, grads, kw["lr"])

    first = [nn.Parameter(w.copy()) for w in w0]
    opt = cls(first, **kw)
    _run(opt, first, grads[:2], kw["lr"])
    state = pickle.loads(pickle.dumps(opt.state_dict()))   # as a checkpoint file holds it
    weights = [p.data.copy() for p in first]
    for p in first:        # the saved state is a copy: later changes do not reach it
        p.data[...] = 0
    opt.step()
    assert state["steps"] == [2, 2, 2, 1] and state["type"] == cls.__name__
    assert all(isinstance(a, np.ndarray) for s in state["state"] for a in s.values())

    resumed = [nn.Parameter(w) for w in weights]
    opt2 = cls(resumed, **dict(kw, lr=0.5))   # lr comes from the state
    opt2.load_state_dict(state)
    assert opt2.lr == _lr_at(1, kw["lr"]) and opt2.steps == [2, 2, 2, 1]
    _run(opt2, resumed, grads[2:], kw["lr"], start=2)
    for i, (a, b) in enumerate(zip(full, resumed, strict=True)):
        assert np.array_equal(a.data, b.data), f"{case}: parameter {i} differs after resume"


def test_load_state_dict_refuses_a_bad_state_and_changes_nothing():
    params = [nn.Parameter(w) for w in _initial()]
    opt = Adam(params, lr=1e-2)
    _run(opt, params, _gradients(steps=2), 1e-2)
    before = opt.state_dict()
    other = SGD([nn.Parameter(w) for w in _initial()], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: the state was saved by SGD"):
        opt.load_state_dict(other)
    short = dict(before, state=before["state"][:3], steps=before["steps"][:3])
    with pytest.raises(ValueError, match=r"the state holds 3 parameters, this optimizer has 4"):
        opt.load_state_dict(short)
    bad = pickle.loads(pickle.dumps(before))
    bad["state"][2]["exp_avg"] = np.zeros((5, 4), np.float32)
    bad["lr"] = 9.0
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 2 has shape \(5, 4\), the parameter has \(4, 5\)"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"not an optimizer state"):
        opt.load_state_dict({"lr": 0.1})
    after = opt.state_dict()
    assert after["lr"] == before["lr"] and after["steps"] == before["steps"]
    for s, t in zip(before["state"], after["state"], strict=True):
        assert all(np.array_equal(s[k], t[k]) for k in s)


# --------------------------------------------------------------------------- #
# 4. Schedules and factories
# --------------------------------------------------------------------------- #
def approx(v):
    return pytest.approx(v, rel=1e-12, abs=0)


def test_paper_schedule_boundaries():
    s = PaperSchedule()   # docs/method.md section 6
    expected = {0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01, 48000: 0.001, 63999: 0.001}
    for i, lr in expected.items():
        assert s.lr_at(i) == approx(lr), i
    assert s(400) == s.lr_at(400)
    p = PaperSchedule.scaled(64000)   # the paper's own length gives the paper's schedule
    assert (p.base_lr, p.warmup_lr, p.warmup_iters, p.milestones, p.gamma) == (0.1, 0.01, 400, (32000, 48000), 0.1)
    q = PaperSchedule.scaled(1000, base_lr=0.05)   # warm-up floor(1000/160) = 6; 500, 750
    assert (q.warmup_iters, q.milestones, q.warmup_lr) == (6, (500, 750), approx(0.005))
    for i, lr in {0: 0.005, 5: 0.005, 6: 0.05, 499: 0.05, 500: 0.005, 749: 0.005, 750: 0.0005, 999: 0.0005}.items():
        assert q.lr_at(i) == approx(lr), i
    assert PaperSchedule.scaled(100).warmup_iters == 0 and PaperSchedule.scaled(100).lr_at(0) == 0.1


def test_step_cosine_constant_schedules():
    s = StepSchedule(0.1, (10, 20), gamma=0.5)
    assert [s.lr_at(i) for i in (0, 9, 10, 19, 20, 1000)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    c = CosineSchedule(1.0, 100)
    assert c.lr_at(0) == 1.0 and c.lr_at(50) == approx(0.5) and c.lr_at(100) == 0.0 and c.lr_at(150) == 0.0
    assert c.lr_at(25) == approx((1 + math.cos(math.pi / 4)) / 2)
    c = CosineSchedule(1.0, 110, warmup_iters=10, min_lr=0.1)
    assert c.lr_at(0) == approx(0.1) and c.lr_at(4) == approx(0.5) and c.lr_at(9) == 1.0
    assert c.lr_at(10) == 1.0 and c.lr_at(60) == approx(0.55) and c.lr_at(110) == approx(0.1)
    lrs = [c.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)), "cosine decreases after the warm-up"
    assert ConstantSchedule(0.3).lr_at(12345) == 0.3


def test_make_schedule_and_make_optimizer():
    p = make_schedule("paper", 0.1, 64000)
    assert isinstance(p, PaperSchedule) and p.milestones == (32000, 48000) and p.warmup_iters == 400
    s = make_schedule("step", 0.2, 100)
    assert isinstance(s, StepSchedule) and s.milestones == (50, 75) and s.lr_at(75) == approx(0.002)
    c = make_schedule("cosine", 0.2, 100)
    assert isinstance(c, CosineSchedule) and c.lr_at(0) == 0.2 and c.lr_at(100) == 0.0
    assert make_schedule("Constant", 0.2, 100).lr_at(99) == 0.2
    params = [nn.Parameter(w) for w in _initial()]
    sgd = make_optimizer("sgd", params, lr=0.1, momentum=0.9, weight_decay=2e-4, decay="kernels", nesterov=True)
    assert isinstance(sgd, SGD) and (sgd.momentum, sgd.nesterov, sgd.weight_decay) == (0.9, True, 2e-4)
    adam = make_optimizer("adam", params, lr=1e-3, momentum=0.9, weight_decay=0.0, decay="all", nesterov=False)
    assert isinstance(adam, Adam) and adam.betas == (0.9, 0.999) and adam.decay == "all"
    rms = make_optimizer("RMSprop", params, lr=1e-2, momentum=0.5, weight_decay=1e-4, decay="kernels", nesterov=False)
    assert isinstance(rms, RMSprop) and rms.momentum == 0.5 and isinstance(rms, Optimizer)
    assert "RMSprop(lr=0.01" in repr(rms)


# --------------------------------------------------------------------------- #
# 5. Clear errors
# --------------------------------------------------------------------------- #
def _p():
    return [nn.Parameter(np.ones((2, 2), np.float32))]


ERRORS = {
    "sgd lr": (lambda: SGD(_p(), lr=-1), r"SGD: lr must be positive, got -1"),
    "sgd lr nan": (lambda: SGD(_p(), lr=float("nan")), r"SGD: lr must be positive, got nan"),
    "sgd momentum": (lambda: SGD(_p(), lr=0.1, momentum=-0.5), r"SGD: momentum must be a finite number >= 0"),
    "weight decay": (lambda: Adam(_p(), weight_decay=-1e-4), r"Adam: weight_decay must be a finite number >= 0"),
    "decay": (lambda: RMSprop(_p(), decay="bias"), r"RMSprop: decay must be 'kernels' or 'all', got 'bias'"),
    "empty": (lambda: Adam([], lr=1e-3), r"Adam: got an empty parameter list"),
    "duplicate": (lambda: (lambda p: SGD(p + p, lr=0.1))(_p()), r"appears more than once"),
    "adam betas": (lambda: Adam(_p(), betas=(0.9, 1.0)), r"Adam: betas\[1\] must be a finite number >= 0 and < 1"),
    "adam betas pair": (lambda: Adam(_p(), betas=0.9), r"betas must be a pair"),
    "adam eps": (lambda: Adam(_p(), eps=-1.0), r"Adam: eps must be a finite number >= 0"),
    "rmsprop alpha": (lambda: RMSprop(_p(), alpha=1.5), r"RMSprop: alpha must be a finite number >= 0 and <= 1"),
    "optimizer name": (lambda: make_optimizer("adagrad", _p(), lr=0.1),
                       r"unknown optimizer 'adagrad'; expected one of sgd, adam, rmsprop"),
    "nesterov adam": (lambda: make_optimizer("adam", _p(), lr=0.1, nesterov=True), r"nesterov applies to sgd only"),
    "nesterov no momentum": (lambda: make_optimizer("sgd", _p(), lr=0.1, momentum=0.0, nesterov=True),
                             r"nesterov needs a momentum > 0"),
    "schedule name": (lambda: make_schedule("linear", 0.1, 100),
                      r"unknown schedule 'linear'; expected one of paper, step, cosine, constant"),
    "schedule total": (lambda: make_schedule("cosine", 0.1, 0), r"total_iters must be an integer >= 1, got 0"),
    "milestones order": (lambda: StepSchedule(0.1, (20, 10)), r"milestones must be strictly increasing"),
    "milestone type": (lambda: StepSchedule(0.1, 10), r"milestones must be a sequence"),
    "warm-up past milestone": (lambda: PaperSchedule(warmup_iters=40000), r"must end by the first milestone"),
    "cosine warm-up": (lambda: CosineSchedule(0.1, 10, warmup_iters=10), r"warmup_iters \(10\) must be below"),
    "cosine min_lr": (lambda: CosineSchedule(0.1, 10, min_lr=0.2), r"min_lr must be a finite number >= 0 and <= 0.1"),
    "iteration": (lambda: CosineSchedule(0.1, 10).lr_at(-1), r"the iteration must be an integer >= 0, got -1"),
    "iteration float": (lambda: PaperSchedule().lr_at(1.5), r"the iteration must be an integer >= 0, got 1.5"),
    "base lr": (lambda: ConstantSchedule(0), r"lr must be positive, got 0"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_bad_arguments_give_clear_errors(case):
    fn, match = ERRORS[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_parameter_type_error():
    with pytest.raises(TypeError, match=r"SGD: parameter 0 is a ndarray, not a Parameter/Tensor"):
        SGD([np.ones(3)], lr=0.1)
