"""Stored forms the engine does not have: torch tensors kept as they are
(``Kept``, ``Alias``), and sizes without bytes (``Sized``: the shape-only pass on
the meta device, what the ledger of a large model needs)."""
from __future__ import annotations

from ..kernels.reference import num_groups, packed_nbytes
from ..policy import FitWindow, Generic, Paper, Policy
from ..storage import Stored
from ..units import FitUnit, PaperUnit


def exact_units(policy: Policy) -> bool:
    return type(policy).store_unit is Policy.store_unit


def exact_activations(policy: Policy) -> bool:
    return type(policy).store_activation is Policy.store_activation


class Kept(Stored):
    """A torch tensor kept as it is (by reference, as torch would)."""

    __slots__ = ("tensor", "param")

    def __init__(self, t, param=False):
        self.tensor, self.param = t, param
        self.shape, self.dtype = tuple(t.shape), t.dtype

    form = property(lambda self: "param" if self.param else str(self.dtype).removeprefix("torch."))
    bits = property(lambda self: 8 * self.tensor.element_size())
    payload_nbytes = property(lambda self: 0 if self.param else self.tensor.numel() * self.tensor.element_size())

    def restore(self):
        return self.tensor


class Alias(Kept):
    """A tensor that an earlier save already keeps (torch saves the loss's
    log-probabilities twice): the same memory, counted once."""

    __slots__ = ()
    form = "alias"
    payload_nbytes = 0


class Sized(Stored):
    """A stored form's sizes without its bytes (the shape-only pass on the meta device)."""

    __slots__ = ("form", "bits", "payload", "meta")

    def __init__(self, form, bits, shape, payload, meta=0):
        self.form, self.bits, self.shape, self.dtype = form, bits, tuple(shape), None
        self.payload, self.meta = int(payload), int(meta)

    payload_nbytes = property(lambda self: self.payload)
    meta_nbytes = property(lambda self: self.meta)

    def restore(self):
        raise RuntimeError("a shape-only (meta device) pass has no values to run backward on")


def sized_activation(policy: Policy, t) -> Sized:
    n = t.numel()
    while isinstance(policy, Paper):
        policy = policy.fallback
    if isinstance(policy, Generic):
        return Sized("generic", policy.bits, t.shape, packed_nbytes(n, policy.bits), 8 * num_groups(n, policy.group))
    if exact_activations(policy):
        return Sized(str(t.dtype).removeprefix("torch."), 8 * t.element_size(), t.shape, n * t.element_size())
    raise ValueError(f"npapprox.bridge: no shape-only ledger for {policy!r}")


def sized_unit(policy: Policy, x) -> Sized:
    n, c, size = x.numel(), x.shape[1], x.element_size()
    if exact_units(policy):
        return Sized(str(x.dtype).removeprefix("torch."), 8 * size, x.shape, n * size, c * size)
    if isinstance(policy, Paper):
        unit = FitUnit if isinstance(policy, FitWindow) else PaperUnit
        return Sized(unit.form, policy.bits, x.shape, packed_nbytes(n, policy.bits), unit.META_PER_CHANNEL * c)
    if isinstance(policy, Generic):
        return Sized("generic+mask", policy.bits + 1, x.shape,
                     packed_nbytes(n, policy.bits) + packed_nbytes(n, 1), 8 * num_groups(n, policy.group))
    raise ValueError(f"npapprox.bridge: no shape-only ledger for {policy!r}")
