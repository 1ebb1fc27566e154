"""Storage policies: the one place that decides how saved activations are kept.

Ops declare what they save (``Function.SAVES``) and call ``ctx.save`` /
``ctx.restore``; they never look at the policy. The policy turns each saved
value into a stored form (``npapprox.storage``) and may, for the baselines that
approximate the forward pass, replace what an op propagates
(``forward_output``).

Choose one for a block of code, or per module (``module.storage = Exact()``)::

    with npapprox.storage_policy(npapprox.Paper(bits=4)):
        loss = ops.cross_entropy(model(x), y)

Kinds of saved entries (declared per op; defined with the op protocol in
``npapprox.function``):

* ``ACTIVATION``: activation-sized arrays; the policy decides their form. An
  input that its producer already stored -- a BN -> ReLU unit's output, the
  output a relu, sigmoid or tanh op saved, a max-pool output over either -- is
  stored as a reference to that stored form (costs nothing, ``shared_form``);
  the network input (a leaf) stays exact.
* ``UNIT``:       a BN -> ReLU unit (``units.BNReLUUnit``): one stored form
  rebuilds the unit's mask and xhat and its output for every consumer.
* ``PARAM``:      parameter arrays, kept by reference (cost nothing extra).
* ``STAT``:       small per-channel or per-sample statistics, kept exactly.
* ``INDEX``:      integer indices (max-pool argmax, class labels), kept exactly.

Policies (docs/method.md, sections 3 to 5):

=====================  ==========================  =============================
policy                 forward propagates           backward uses
=====================  ==========================  =============================
``Exact()``            exact values                 exact values (float32 stored)
``Paper(K)``           exact values                 K-bit BN-window codes per unit
``FitWindow(K)``       exact values                 the same, window fitted per batch
``Generic(K, ...)``    exact values                 per-group K-bit codes
``Naive(K)``           decoded K-bit values         the same decoded values
``ApproxForward(K)``   decoded K-bit values         exact values of that forward
=====================  ==========================  =============================
"""
from __future__ import annotations

import numpy as np

from . import checks, quant
from .backend import array_module
from .function import ACTIVATION, INDEX, KINDS, PARAM, STAT, UNIT, current_policy, storage_policy
from .kernels import generic_pack, pack_bits
from .kernels.bn import as_ncm
from .policy_names import (
    POLICIES,
    PolicyName,
    PolicySpec,
    parse_policy_name,
    policy_from_name,
    policy_help,
    register_policy,
)
from .storage import Full, GenericPacked, ParamRef, PooledRef, SharedRef, Stored, UnitRef
from .units import BNReLUUnit, ExactUnit, FitUnit, GenericUnit, PaperUnit, Unit

__all__ = ["ACTIVATION", "INDEX", "KINDS", "MAX_GROUP", "PARAM", "POLICIES", "STAT", "UNIT",
           "ApproxForward", "Exact", "FitWindow", "Generic", "Naive", "Paper", "Policy", "PolicyName", "PolicySpec",
           "current_policy", "parse_policy_name", "policy_from_name", "policy_help", "register_policy",
           "storage_policy"]

#: the largest generic group. A group larger than the tensor is one group of all
#: its values, so a larger bound buys nothing; this one keeps the kernels' 64-bit
#: index arithmetic (n + group - 1, ...) far from overflow.
MAX_GROUP = 2**31 - 1


def _check_finite(n_nonfinite, ctx, name: str) -> None:
    """Refuse NaN/inf: at once for a host count, at the end of backward for a device
    count (``npapprox.checks``: no read-back from the GPU per pack)."""
    fn = ctx.fn.__name__
    checks.nonfinite(n_nonfinite, lambda n: f"{fn}: {n} non-finite value(s) in the activation {name!r}; "
                                            "K-bit storage refuses NaN/inf (the forward pass diverged)")


class Policy:
    """Base policy: everything exact. Subclasses override ``store_unit`` and
    ``store_activation`` (and ``forward_output`` for approximate forwards)."""

    #: store a consumer's input that is a unit output as a reference to the unit
    share_units = True
    #: the forward pass depends on what is stored (saves are made even under no_grad)
    approximates_forward = False

    @property
    def name(self) -> str:
        return repr(self)

    def save(self, ctx, name: str, kind: str, value) -> Stored:
        """The stored form of ``value``, saved by ``ctx``'s op under ``name`` as
        ``kind`` (one of ``KINDS``): parameters by reference, a unit through
        ``store_unit``, an activation as a reference to its producer's unit or
        through ``store_activation`` (the network input stays exact), the rest
        exact. ``ctx.restore(name)`` calls the form's ``restore()``."""
        if kind == PARAM:
            return ParamRef(value)
        if kind == UNIT:
            return self.store_unit(ctx, name, value)
        if kind == ACTIVATION:
            source = ctx.source_of(value)
            if source is not None and source._ctx is None:
                return Full(value)                  # a leaf: the network input stays exact
            shared = self.shared_form(ctx, value)
            return shared if shared is not None else self.store_activation(ctx, name, value)
        return Full(value)

    def shared_form(self, ctx, value) -> Stored | None:
        """A reference to the stored form from which the producer of input ``value``
        of ``ctx`` rebuilds it, or None (no producer stored it, or ``share_units``
        is off): the unit's form for a unit output, the producer's own saved form
        for an output it saved (relu, sigmoid, tanh), and for a max-pool output
        the pool's input form plus its argmax (``storage.PooledRef``)."""
        source = ctx.source_of(value) if self.share_units else None
        producer = getattr(source, "_ctx", None)
        if producer is None or producer.saved is None:
            return None
        unit = _unit_in(producer)
        if unit is not None:
            return UnitRef(unit)
        own = producer.stored_for(value)
        if own is not None and tuple(own.shape) == tuple(value.shape) and own.dtype == value.dtype:
            return SharedRef(own)
        pool = getattr(producer, "pool_input", None)
        if pool is not None:
            return PooledRef(pool, producer.saved["argmax"].restore(), producer.kernel, producer.stride,
                             producer.padding, value.dtype)
        return None

    def store_unit(self, ctx, name: str, u: BNReLUUnit) -> Unit:
        return ExactUnit(u.x, u.mu, u.inv_sigma, u.gamma, u.beta)

    def store_activation(self, ctx, name: str, array) -> Stored:
        return Full(array)

    def forward_output(self, ctx, y):
        """What the forward pass propagates from an op's output (identity here)."""
        return y

    def state_dict(self) -> dict:
        """What a checkpoint must keep for a resumed run to store the same bytes."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self):
        return f"{type(self).__name__}()"


def _unit_in(ctx):
    """The Unit that ``ctx`` stored, if any."""
    if ctx is None or not ctx.saved:
        return None
    return next((s for s in ctx.saved.values() if isinstance(s, Unit)), None)


@register_policy("exact", options="", help="float32, the baseline")
class Exact(Policy):
    """float32 stored: the paper's exact baseline (one float32 tensor per unit)."""


@register_policy("generic", options="Ksg", style=("Greens", "--"), help="per-group min/max codes")
class Generic(Policy):
    """Per-group K-bit min/max quantizer for every activation (units: codes of y
    plus an exact 1-bit mask). ``stochastic=True`` rounds up with probability
    equal to the fractional part (unbiased), noise from a counter-based hash
    seeded by ``seed`` and a per-save counter."""

    def __init__(self, bits: int = 8, group: int = 256, stochastic: bool = False, seed: int = 0):
        self.bits = quant.check_bits(bits)
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or not 1 <= group <= MAX_GROUP:
            raise ValueError(f"group must be an integer in [1, {MAX_GROUP}], got {group!r}")
        self.group, self.stochastic, self.seed = int(group), bool(stochastic), int(seed)
        self._counter = 0

    def _next_seed(self) -> int:
        self._counter += 1
        return (self.seed * 0x9E3779B1 + self._counter * 0x85EBCA77) & 0xFFFFFFFF

    def state_dict(self) -> dict:
        return {"counter": self._counter}

    def load_state_dict(self, state: dict) -> None:
        self._counter = int(state["counter"])

    def pack(self, ctx, name, array) -> GenericPacked:
        x = array if array.dtype == np.float32 else array.astype(np.float32)
        packed, lo, scale, bad = generic_pack(x, self.bits, self.group, self.stochastic, self._next_seed())
        _check_finite(bad, ctx, name)
        xp, fn = array_module(scale), ctx.fn.__name__
        checks.nonfinite(xp.count_nonzero(~xp.isfinite(scale)),  # a range wider than float32's
                         lambda n: f"{fn}: the activation {name!r} spans a range wider than float32 can hold; "
                                   "K-bit storage refuses it")
        return GenericPacked(packed, lo, scale, self.bits, self.group, array.shape, array.dtype)

    def store_activation(self, ctx, name, array):
        return self.pack(ctx, name, array)

    def store_unit(self, ctx, name, u):
        mask = pack_bits((u.y > 0).reshape(-1).view(np.uint8), 1)
        return GenericUnit(self.pack(ctx, name, u.y), mask, u.gamma, u.beta)

    def __repr__(self):
        rounding = "stochastic" if self.stochastic else "nearest"
        return f"Generic(bits={self.bits}, group={self.group}, {rounding})"


@register_policy("paper", options="Kw", style=("Blues", "-"), help="the paper's BN window, W = 3 by default")
class Paper(Policy):
    """The paper's scheme: each BN -> ReLU unit stores K-bit BN-window codes
    (``npapprox.quant``) in a window of +-``window`` batch standard deviations
    (3: the paper's); activations no BN precedes use ``fallback`` (default: the
    generic quantizer with the same K, nearest rounding). ``monitor``: an object
    with ``record(ctx, unit, params, policy)`` told about every stored unit
    (``npapprox.window.WindowMonitor``: the clipped fraction per unit)."""

    unit_form = PaperUnit

    def __init__(self, bits: int = 4, fallback: Policy | None = None, window: float = quant.DEFAULT_WINDOW):
        self.bits = quant.check_bits(bits)
        self.window = quant.check_window(window)
        self.fallback = Generic(bits) if fallback is None else fallback
        self.monitor = None

    def unit_params(self, u: BNReLUUnit) -> dict:
        """The per-channel window of one unit (``quant.paper_params``)."""
        return quant.paper_params(u.gamma, u.beta, self.bits, self.window)

    def store_unit(self, ctx, name, u):
        # the window depends on gamma and beta only, so the codes are written in the BN
        # pass itself (BNReLUUnit.pack); FitWindow reads y's range first (its own pass)
        params = self.unit_params(u)
        if self.monitor is not None:
            self.monitor.record(ctx, u, params, self)
        packed, bad = u.pack(params["k"], params["s"], self.bits)
        _check_finite(bad, ctx, name)
        return self.unit_form(packed, params, self.bits, u.shape, u.dtype)

    def store_activation(self, ctx, name, array):
        return self.fallback.store_activation(ctx, name, array)

    def state_dict(self) -> dict:
        return {"fallback": self.fallback.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fallback.load_state_dict(state["fallback"])

    def _window_repr(self) -> str:
        return "" if self.window == quant.DEFAULT_WINDOW else f", window={self.window:g}"

    def __repr__(self):
        return f"Paper(bits={self.bits}{self._window_repr()})"


@register_policy("fit", options="Kw", help="the window fitted to each batch's range, cut at W")
class FitWindow(Paper):
    """The paper's codes in a *fitted* window: per channel, the narrowest window
    of 2^K bins with ReLU's threshold on a bin edge that holds the batch's range
    of y, cut to at most ``window = (below, above)`` standard deviations around
    beta/gamma (one number: both sides; ``quant.fit_params``; one min/max
    reduction over y per unit). The window follows beta/gamma wherever it goes and
    the mask stays exact; the stored form adds the bin width, one float32 per
    channel (``FitUnit``). ``window=None``: ``quant.FIT_WINDOW[bits]`` (no cut at
    8 bits: nothing clips)."""

    unit_form = FitUnit

    def __init__(self, bits: int = 4, fallback: Policy | None = None, window=None):
        super().__init__(bits, fallback)
        self.window = quant.check_fit_window(quant.FIT_WINDOW[self.bits] if window is None else window)

    def unit_params(self, u: BNReLUUnit) -> dict:
        if u.y.size == 0:
            return quant.paper_params(u.gamma, u.beta, self.bits)
        y3 = as_ncm(u.y)                                       # (N, C, HW)
        with np.errstate(invalid="ignore"):                    # NaN: refused after packing
            return quant.fit_params(u.gamma, u.beta, y3.min(axis=(0, 2)), y3.max(axis=(0, 2)), self.bits,
                                    self.window)

    def __repr__(self):
        below, above = self.window
        w = ("" if self.window == quant.FIT_WINDOW[self.bits] else
             f", window={below:g}" if below == above else f", window=({below:g}, {above:g})")
        return f"FitWindow(bits={self.bits}{w})"


@register_policy("naive", options="Kw", style=("Oranges", ":"), help="K-bit forward and backward")
class Naive(Paper):
    """Naive low precision: the decoded K-bit approximation is what the next layer
    receives *and* what backward uses, so errors accumulate through the depth.
    Applies to units (their output h) and to ops that save their own output
    (relu, sigmoid, tanh: generic codes)."""

    approximates_forward = True

    def forward_output(self, ctx, y):
        stored = ctx.stored_for(y) or _unit_in(ctx)
        if isinstance(stored, Unit):
            return stored.h()
        if isinstance(stored, GenericPacked):
            return stored.restore()
        return y

    def __repr__(self):
        return f"Naive(bits={self.bits}{self._window_repr()})"


@register_policy("approx", options="Kw", style=("Reds", "-."), help="approximate forward, exact backward")
class ApproxForward(Paper):
    """Approximate forward, exact backward (the reviewers' ablation): units (and
    ops that save their own output) propagate a decoded K-bit approximation, but
    every op keeps its own inputs exactly, so backward is exact for the forward
    that was computed."""

    approximates_forward = True
    share_units = False

    def store_unit(self, ctx, name, u):
        return ExactUnit(u.x, u.mu, u.inv_sigma, u.gamma, u.beta)

    def store_activation(self, ctx, name, array):
        return Full(array)

    def forward_output(self, ctx, y):
        unit = _unit_in(ctx)
        if unit is not None:
            u = unit  # ExactUnit: pack its exact pre-ReLU output as the paper would
            y_pre = u.pre_relu()
            return super().store_unit(ctx, "forward", BNReLUUnit(u.x, y_pre, u.mu, u.inv_sigma,
                                                                  u.gamma, u.beta)).h()
        stored = ctx.stored_for(y)
        if isinstance(stored, Full):
            return self.fallback.store_activation(ctx, "forward", y).restore()
        return y

    def __repr__(self):
        return f"ApproxForward(bits={self.bits}{self._window_repr()})"
