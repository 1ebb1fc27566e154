"""Storage policies: the one place that decides how saved activations are kept.

Ops declare what they save (``Function.SAVES``) and call ``ctx.save`` /
``ctx.restore``; they never look at the policy. The policy turns each saved
array into a stored form (``npapprox.storage``) and may, for the naive
low-precision baseline, replace what the forward pass propagates
(``forward_output``).

Choose one for a block of code::

    with npapprox.storage_policy(npapprox.Exact()):
        loss = model(x) ...

The default is ``Exact``. Kinds of saved entries (declared per op):

* ``ACTIVATION``: activation-sized arrays; the policy decides their form.
* ``PARAM``:      parameter arrays, kept by reference (cost nothing extra).
* ``STAT``:       small per-channel or per-sample statistics, kept exactly.
* ``INDEX``:      integer indices (max-pool argmax, class labels), kept exactly.
"""
from __future__ import annotations

import contextlib

from .storage import Full, ParamRef, Stored

ACTIVATION = "activation"
PARAM = "param"
STAT = "stat"
INDEX = "index"
KINDS = (ACTIVATION, PARAM, STAT, INDEX)


class Policy:
    """Base policy: everything kept exactly. Subclasses override ``store_activation``."""

    name = "exact"

    def save(self, ctx, name: str, kind: str, array) -> Stored:
        if kind == PARAM:
            return ParamRef(array)
        if kind == ACTIVATION:
            return self.store_activation(ctx, name, array)
        return Full(array)

    def store_activation(self, ctx, name: str, array) -> Stored:
        return Full(array)

    def forward_output(self, ctx, y):
        """What the forward pass propagates from an op's output (identity here;
        the naive low-precision baseline returns its decoded approximation)."""
        return y

    def __repr__(self):
        return f"{type(self).__name__}()"


class Exact(Policy):
    """float32 (or float64) activations stored as they are: the exact baseline."""


_stack: list[Policy] = [Exact()]


def current_policy() -> Policy:
    return _stack[-1]


@contextlib.contextmanager
def storage_policy(policy: Policy):
    """Use ``policy`` for every op recorded inside the ``with`` block."""
    if not isinstance(policy, Policy):
        raise TypeError(f"storage_policy expects a Policy instance, got {type(policy).__name__}")
    _stack.append(policy)
    try:
        yield policy
    finally:
        _stack.pop()
