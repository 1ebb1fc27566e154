"""Stored forms the engine does not have: torch tensors kept as they are
(``Kept``, ``Alias``), sizes without bytes (``Sized``: the shape-only pass on
the meta device, what the ledger of a large model needs), a unit under an exact
policy (``TorchExactUnit``) and a max-pool output rebuilt from its input's form
(``TorchPooledRef``)."""
from __future__ import annotations

import torch

from ..kernels.reference import num_groups, packed_nbytes
from ..policy import FitWindow, Generic, Paper, Policy
from ..storage import PooledRef, Stored
from ..units import FitUnit, PaperUnit, Unit
from .views import as_tensor


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


def bn_forward(x, gamma, beta, running_mean, running_var, momentum, eps):
    """torch's batch-norm forward as ``F.batch_norm`` dispatches it (native kernel on
    the CPU, cuDNN where torch would use it) -> (y, mean, invstd, reserve, impl)."""
    return torch.ops.aten._batch_norm_impl_index(x, gamma, beta, running_mean, running_var, True, momentum, eps,
                                                 torch.backends.cudnn.enabled)


class TorchExactUnit(Unit):
    """A unit under an exact policy: the BN input x in full precision plus the
    batch mean (the engine's ``ExactUnit``). Backward recomputes y with the kernel
    the forward used (``bn_forward``; stand-in running statistics with momentum 0
    where the forward had real ones, so the same path runs) and calls torch's own
    backward, so every gradient is bit-identical to plain torch's."""

    __slots__ = ("x", "mean", "invstd", "gamma", "beta", "eps", "running", "reserve", "impl")

    def __init__(self, x, mean, invstd, gamma, beta, eps, running, reserve, impl):
        self.x, self.mean, self.invstd, self.gamma, self.beta, self.eps = x, mean, invstd, gamma, beta, eps
        self.running, self.reserve, self.impl = running, reserve, impl
        self.shape, self.dtype = tuple(x.shape), x.dtype

    form = property(lambda self: str(self.dtype).removeprefix("torch."))
    bits = property(lambda self: 8 * self.x.element_size())
    payload_nbytes = property(lambda self: self.x.numel() * self.x.element_size())
    meta_nbytes = property(lambda self: self.mean.numel() * self.mean.element_size())

    def _stand_ins(self):
        return (torch.zeros_like(self.mean), torch.ones_like(self.mean)) if self.running else (None, None)

    def _y(self):
        return bn_forward(self.x, self.gamma, self.beta, *self._stand_ins(), 0.0, self.eps)[0]

    def h(self):
        return torch.relu(self._y())

    def backward(self, gh, need):
        """(gx, ggamma, gbeta) as torch's autograd computes them for relu(batch_norm(x))."""
        g = torch.ops.aten.threshold_backward(gh, torch.relu(self._y()), 0)
        return torch.ops.aten._batch_norm_impl_index_backward(
            self.impl, self.x, g, self.gamma, *self._stand_ins(), self.mean, self.invstd, True, self.eps,
            list(need), self.reserve)


def window_starts(s, pad, out_shape, device):
    """(row, column) of each output's window's first position in the input, (OH, 1) and (1, OW)."""
    oh, ow = out_shape[2:]
    return ((torch.arange(oh, device=device) * s - pad)[:, None],
            (torch.arange(ow, device=device) * s - pad)[None, :])


class TorchPooledRef(PooledRef):
    """``storage.PooledRef`` on torch tensors: the pool's output rebuilt by gathering
    the rebuilt input at the argmax (``argmax``: uint8 window offsets ``p*k+q``).
    Exact when the input's form is."""

    __slots__ = ("x_shape",)

    def __init__(self, source, argmax, kernel, stride, padding, dtype, x_shape):
        super().__init__(source, argmax, kernel, stride, padding, dtype)
        self.x_shape = tuple(x_shape)

    def indices(self):
        """torch's max-pool indices (int64, flat in each input plane) from the offsets."""
        k, w = self.kernel, self.x_shape[3]
        r0, c0 = window_starts(self.stride, self.padding, self.shape, self.argmax.device)
        a = self.argmax.long()
        return (r0 + a // k) * w + (c0 + a % k)

    def restore(self):
        x = as_tensor(self.source.output())
        return x.flatten(2).gather(2, self.indices().flatten(2)).view(self.shape)
