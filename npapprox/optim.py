"""Optimizers (SGD, Adam, RMSprop) and learning-rate schedules.

Every optimizer follows PyTorch's update rule for the same hyperparameters, with
one addition: ``decay`` chooses which parameters weight decay reaches,
``"kernels"`` (ndim >= 2: conv and linear kernels, as in the paper) or
``"all"``. Weight decay is L2 added to the gradient (``g + wd * w``), as in
``torch.optim``, for all three.

The shared machinery lives in ``Optimizer``: parameter list, ``lr`` attribute,
``zero_grad``, the decay mask, per-parameter state arrays and step counters, and
``state_dict()`` / ``load_state_dict()`` (host NumPy copies; resuming from a
saved state reproduces the uninterrupted run bit for bit). A subclass writes
only ``_update(p, g, state, step)``.

Schedules are small objects with ``lr_at(iteration) -> float`` (iteration 0 is
the first step); the training loop sets ``optimizer.lr = schedule.lr_at(i)``
before step ``i``. ``make_optimizer`` and ``make_schedule`` build them by name
for the command line.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module, on_gpu, to_device
from .validate import check_int, check_number

DECAYS = ("kernels", "all")


class Optimizer:
    """Base class: ``params`` (Parameters, updated in place), ``lr`` (plain
    attribute, a schedule may set it before each step), ``weight_decay`` and
    ``decay`` ("kernels": ndim >= 2 only, the paper; "all"), per-parameter
    ``state`` (dict of arrays) and ``steps`` (how many updates each parameter
    has had: a parameter whose ``grad`` is None is skipped and not counted)."""

    #: hyperparameter attribute names saved in ``state_dict`` (besides lr)
    HYPER: tuple = ()

    def __init__(self, params, lr: float, weight_decay: float = 0.0, decay: str = "kernels"):
        name = type(self).__name__
        self.lr = check_number(name, "lr", lr, lo=0, lo_open=True)
        self.weight_decay = check_number(name, "weight_decay", weight_decay, lo=0)
        if decay not in DECAYS:
            raise ValueError(f"{name}: decay must be 'kernels' or 'all', got {decay!r}")
        self.decay = decay
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{name}: got an empty parameter list")
        for i, p in enumerate(self.params):
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"{name}: parameter {i} is a {type(p).__name__}, not a Parameter/Tensor")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError(f"{name}: a parameter appears more than once in the list")
        self.state: list[dict] = [{} for _ in self.params]
        self.steps: list[int] = [0] * len(self.params)

    # --- the shared step ------------------------------------------------------------
    def decays(self, p) -> bool:
        """Whether weight decay reaches ``p`` (the mask)."""
        return bool(self.weight_decay) and (self.decay == "all" or p.data.ndim >= 2)

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.decays(p):
                g = g + self.weight_decay * p.data          # L2 in the gradient (PyTorch)
            self.steps[i] += 1
            delta = self._update(p, g, self.state[i], self.steps[i])
            p.data -= delta.astype(p.data.dtype, copy=False)

    def _update(self, p, g, state: dict, step: int):
        """The amount to subtract from ``p.data``; ``state`` is updated in place
        (``step``: this parameter's update count, 1 on its first update)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # --- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain Python values and host NumPy
        copies: ``{"type", "lr", "hyper", "steps", "state"}``."""
        return {"type": type(self).__name__, "lr": self.lr,
                "hyper": {k: getattr(self, k) for k in ("weight_decay", "decay") + self.HYPER},
                "steps": list(self.steps),
                "state": [{k: np.array(to_device(v, "cpu"), copy=True) for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (hyperparameters included, as PyTorch
        does). Everything is checked before anything changes."""
        name = type(self).__name__
        if not isinstance(state, dict) or not {"type", "lr", "hyper", "steps", "state"} <= set(state):
            raise ValueError(f"{name}.load_state_dict: not an optimizer state (expected the keys "
                             f"type, lr, hyper, steps, state)")
        if state["type"] != name:
            raise ValueError(f"{name}.load_state_dict: the state was saved by {state['type']}")
        if len(state["state"]) != len(self.params) or len(state["steps"]) != len(self.params):
            raise ValueError(f"{name}.load_state_dict: the state holds {len(state['state'])} parameters, "
                             f"this optimizer has {len(self.params)}")
        for i, (p, s) in enumerate(zip(self.params, state["state"], strict=True)):
            for k, v in s.items():
                if tuple(np.shape(v)) != tuple(p.data.shape):
                    raise ValueError(f"{name}.load_state_dict: state {k!r} of parameter {i} has shape "
                                     f"{tuple(np.shape(v))}, the parameter has {tuple(p.data.shape)}")
        new_state = []
        for p, s in zip(self.params, state["state"], strict=True):
            device = "gpu" if on_gpu(p.data) else "cpu"
            new_state.append({k: to_device(np.array(v, copy=True), device) for k, v in s.items()})
        self.state, self.steps = new_state, [int(n) for n in state["steps"]]
        self.lr = float(state["lr"])
        for k, v in state["hyper"].items():
            setattr(self, k, v)

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.HYPER + ("weight_decay", "decay"))
        return f"{type(self).__name__}(lr={self.lr!r}, {hyper})"


class SGD(Optimizer):
    """v <- momentum * v + (g + wd * w);  w <- w - lr * v   (PyTorch's convention;
    Nesterov: w <- w - lr * (g + wd * w + momentum * v)).  The first update sets
    v = g + wd * w. Without momentum: w <- w - lr * (g + wd * w).

    ``decay="kernels"`` applies weight decay only to parameters with ndim >= 2
    (conv and linear kernels, as in the paper); ``"all"`` to every parameter."""

    HYPER = ("momentum", "nesterov")

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, decay: str = "kernels"):
        super().__init__(params, lr, weight_decay, decay)
        self.momentum = check_number("SGD", "momentum", momentum, lo=0)
        self.nesterov = bool(nesterov)

    def _update(self, p, g, state, step):
        if not self.momentum:
            return self.lr * g
        v = state.get("momentum_buffer")
        v = g.copy() if v is None else self.momentum * v + g
        state["momentum_buffer"] = v
        return self.lr * (g + self.momentum * v if self.nesterov else v)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) as ``torch.optim.Adam`` (amsgrad off); t is the
    parameter's update count, g includes the L2 term wd * w:

        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)"""

    HYPER = ("betas", "eps")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: str = "kernels"):
        super().__init__(params, lr, weight_decay, decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(check_number("Adam", f"betas[{i}]", b, lo=0, hi=1, hi_open=True)
                           for i, b in enumerate(betas))
        self.eps = check_number("Adam", "eps", eps, lo=0)

    def _update(self, p, g, state, step):
        b1, b2 = self.betas
        xp = array_module(g)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p.data), xp.zeros_like(p.data)
        m = state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * g
        v = state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * (g * g)
        step_size = self.lr / (1 - b1 ** step)
        denom = xp.sqrt(v) / math.sqrt(1 - b2 ** step) + self.eps
        return step_size * m / denom


class RMSprop(Optimizer):
    """RMSprop as ``torch.optim.RMSprop`` (not centred); g includes wd * w:

        s <- alpha s + (1 - alpha) g^2
        u  = g / (sqrt(s) + eps)
        momentum > 0:  b <- momentum b + u;  w <- w - lr b      (b starts at 0)
        else:          w <- w - lr u"""

    HYPER = ("alpha", "eps", "momentum")

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0, decay: str = "kernels"):
        super().__init__(params, lr, weight_decay, decay)
        self.alpha = check_number("RMSprop", "alpha", alpha, lo=0, hi=1)
        self.eps = check_number("RMSprop", "eps", eps, lo=0)
        self.momentum = check_number("RMSprop", "momentum", momentum, lo=0)

    def _update(self, p, g, state, step):
        xp = array_module(g)
        s = state.get("square_avg")
        s = xp.zeros_like(p.data) if s is None else s
        s = state["square_avg"] = self.alpha * s + (1 - self.alpha) * (g * g)
        u = g / (xp.sqrt(s) + self.eps)
        if self.momentum:
            b = state.get("momentum_buffer")
            b = state["momentum_buffer"] = u if b is None else self.momentum * b + u
            return self.lr * b
        return self.lr * u


OPTIMIZER_NAMES = ("sgd", "adam", "rmsprop")


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   decay: str = "kernels", nesterov: bool = False) -> Optimizer:
    """An optimizer by name: ``"sgd"`` (momentum, Nesterov), ``"adam"`` (default
    betas; ``momentum`` is not used: Adam's first-moment decay is betas[0]) or
    ``"rmsprop"`` (``momentum`` passed on). ``nesterov`` applies to SGD only."""
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if nesterov and key != "sgd":
        raise ValueError(f"nesterov applies to sgd only, not to {key}")
    if key == "sgd":
        if nesterov and not momentum:
            raise ValueError("sgd: nesterov needs a momentum > 0")
        return SGD(params, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, decay=decay)
    if key == "adam":
        return Adam(params, lr, weight_decay=weight_decay, decay=decay)
    return RMSprop(params, lr, momentum=momentum, weight_decay=weight_decay, decay=decay)


# --------------------------------------------------------------------------- #
# Learning-rate schedules
# --------------------------------------------------------------------------- #
def _milestones(owner: str, milestones) -> tuple:
    try:
        ms = tuple(milestones)
    except TypeError:
        raise ValueError(f"{owner}: milestones must be a sequence of iterations, got {milestones!r}") from None
    ms = tuple(check_int(owner, "each milestone", m, 1) for m in ms)
    if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ValueError(f"{owner}: milestones must be strictly increasing, got {ms}")
    return ms


class Schedule:
    """Base: ``lr_at(iteration) -> float``; ``schedule(i)`` is the same."""

    def lr_at(self, iteration: int) -> float:
        raise NotImplementedError

    def __call__(self, iteration: int) -> float:
        return self.lr_at(iteration)


class ConstantSchedule(Schedule):
    """lr at every iteration."""

    def __init__(self, lr: float):
        self.lr = check_number("ConstantSchedule", "lr", lr, lo=0, lo_open=True)

    def lr_at(self, iteration):
        check_int("ConstantSchedule.lr_at", "the iteration", iteration, 0)
        return self.lr

    def __repr__(self):
        return f"ConstantSchedule(lr={self.lr!r})"


class StepSchedule(Schedule):
    """base_lr * gamma^k, k = how many milestones are <= iteration."""

    def __init__(self, base_lr: float, milestones, gamma: float = 0.1):
        self.base_lr = check_number("StepSchedule", "base_lr", base_lr, lo=0, lo_open=True)
        self.milestones = _milestones("StepSchedule", milestones)
        self.gamma = check_number("StepSchedule", "gamma", gamma, lo=0, lo_open=True)

    def lr_at(self, iteration):
        i = check_int(f"{type(self).__name__}.lr_at", "the iteration", iteration, 0)
        return self.base_lr * self.gamma ** sum(1 for m in self.milestones if i >= m)

    def __repr__(self):
        return f"StepSchedule(base_lr={self.base_lr!r}, milestones={self.milestones}, gamma={self.gamma!r})"


class PaperSchedule(StepSchedule):
    """The paper's CIFAR schedule (docs/method.md section 6): ``warmup_lr`` (0.01) for
    the first ``warmup_iters`` (400) iterations, then ``base_lr`` (0.1), times
    ``gamma`` (0.1) from each milestone (32k, 48k) on; 64k iterations in all.
    ``PaperSchedule.scaled(total)`` keeps the same fractions for a shorter run."""

    #: the paper's run: 64k iterations, warm-up 400, milestones at 1/2 and 3/4
    PAPER_TOTAL, PAPER_WARMUP = 64000, 400

    def __init__(self, base_lr: float = 0.1, warmup_lr: float = 0.01, warmup_iters: int = 400,
                 milestones=(32000, 48000), gamma: float = 0.1):
        super().__init__(base_lr, milestones, gamma)
        self.warmup_lr = check_number("PaperSchedule", "warmup_lr", warmup_lr, lo=0, lo_open=True)
        self.warmup_iters = check_int("PaperSchedule", "warmup_iters", warmup_iters, 0)
        if self.milestones and self.warmup_iters > self.milestones[0]:
            raise ValueError(f"PaperSchedule: the warm-up ({self.warmup_iters} iterations) must end "
                             f"by the first milestone ({self.milestones[0]})")

    @classmethod
    def scaled(cls, total_iters: int, base_lr: float = 0.1, warmup_lr: float | None = None,
               gamma: float = 0.1) -> "PaperSchedule":
        """The paper's schedule stretched to ``total_iters``: warm-up for
        floor(total * 400/64000) iterations at ``warmup_lr`` (default base_lr / 10,
        the paper's ratio), milestones at floor(total/2) and floor(3 total/4).
        ``scaled(64000)`` is the paper's schedule."""
        total = check_int("PaperSchedule.scaled", "total_iters", total_iters, 1)
        warmup = total * cls.PAPER_WARMUP // cls.PAPER_TOTAL
        milestones = tuple(m for m in (total // 2, 3 * total // 4) if m >= 1)
        milestones = tuple(sorted(set(milestones)))
        base_lr = check_number("PaperSchedule.scaled", "base_lr", base_lr, lo=0, lo_open=True)
        return cls(base_lr, base_lr / 10 if warmup_lr is None else warmup_lr, warmup, milestones, gamma)

    def lr_at(self, iteration):
        i = check_int("PaperSchedule.lr_at", "the iteration", iteration, 0)
        return self.warmup_lr if i < self.warmup_iters else super().lr_at(i)

    def __repr__(self):
        return (f"PaperSchedule(base_lr={self.base_lr!r}, warmup_lr={self.warmup_lr!r}, "
                f"warmup_iters={self.warmup_iters}, milestones={self.milestones}, gamma={self.gamma!r})")


class CosineSchedule(Schedule):
    """Linear warm-up to ``base_lr`` over ``warmup_iters`` (lr = base_lr (i+1)/warmup),
    then cosine annealing: with t = (i - warmup) / (total - warmup),
    lr = min_lr + (base_lr - min_lr) (1 + cos(pi t)) / 2; min_lr from ``total_iters`` on."""

    def __init__(self, base_lr: float, total_iters: int, warmup_iters: int = 0, min_lr: float = 0.0):
        self.base_lr = check_number("CosineSchedule", "base_lr", base_lr, lo=0, lo_open=True)
        self.total_iters = check_int("CosineSchedule", "total_iters", total_iters, 1)
        self.warmup_iters = check_int("CosineSchedule", "warmup_iters", warmup_iters, 0)
        if self.warmup_iters >= self.total_iters:
            raise ValueError(f"CosineSchedule: warmup_iters ({self.warmup_iters}) must be below "
                             f"total_iters ({self.total_iters})")
        self.min_lr = check_number("CosineSchedule", "min_lr", min_lr, lo=0, hi=self.base_lr)

    def lr_at(self, iteration):
        i = check_int("CosineSchedule.lr_at", "the iteration", iteration, 0)
        if i < self.warmup_iters:
            return self.base_lr * (i + 1) / self.warmup_iters
        t = min(1.0, (i - self.warmup_iters) / (self.total_iters - self.warmup_iters))
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2

    def __repr__(self):
        return (f"CosineSchedule(base_lr={self.base_lr!r}, total_iters={self.total_iters}, "
                f"warmup_iters={self.warmup_iters}, min_lr={self.min_lr!r})")


SCHEDULE_NAMES = ("paper", "step", "cosine", "constant")


def make_schedule(name: str, base_lr: float, total_iters: int) -> Schedule:
    """A schedule by name, for a run of ``total_iters`` iterations:
    ``"paper"``: ``PaperSchedule.scaled(total_iters, base_lr)`` (warm-up at base_lr/10);
    ``"step"``: x0.1 at 1/2 and 3/4 of the run; ``"cosine"``: cosine to 0, no
    warm-up; ``"constant"``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
    total = check_int("make_schedule", "total_iters", total_iters, 1)
    if key == "paper":
        return PaperSchedule.scaled(total, base_lr=base_lr)
    if key == "step":
        return StepSchedule(base_lr, tuple(sorted({m for m in (total // 2, 3 * total // 4) if m >= 1})), 0.1)
    if key == "cosine":
        return CosineSchedule(base_lr, total)
    return ConstantSchedule(base_lr)


__all__ = ["Adam", "ConstantSchedule", "CosineSchedule", "OPTIMIZER_NAMES", "Optimizer", "PaperSchedule",
           "RMSprop", "SCHEDULE_NAMES", "SGD", "Schedule", "StepSchedule", "make_optimizer", "make_schedule"]
