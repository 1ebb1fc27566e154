"""Storage policies for PyTorch: what a torch forward keeps for backward.

Inside ``storage_policy(policy)`` (the engine's policy objects, ``npapprox.policy``):

* a BN -> ReLU unit in batch-statistics mode runs as one autograd Function,
  ``BatchNormReLU``. Its forward is torch's own: the batch-norm kernel that
  ``F.batch_norm`` dispatches to, then ``relu`` (bit-identical to
  ``F.relu(F.batch_norm(...))``). What it keeps is ``policy.store_unit(...)``,
  the engine's own call, on zero-copy array views of torch's ``y`` (``Paper``:
  K-bit codes + ``s`` per channel; ``Generic``: codes + a 1-bit mask); its
  backward is the engine's ``kernels.bn.bn_backward`` with the exact mask and
  xhat rebuilt from the codes. Under an exact policy it keeps
  ``TorchExactUnit`` (the BN input), recomputes y and runs torch's own backward,
  so gradients are bit-identical to plain torch's.
* every other tensor an op saves goes through ``saved_tensors_hooks``:

    saved tensor, in the order checked         kind        kept as
    a unit's output h (the next conv's input)  ACTIVATION  ``UnitRef``: rebuilt from the unit, 0 bytes
    a tensor saved before (tanh's output, then  ACTIVATION  ``SharedRef`` to the first save's form, 0 bytes
      the next conv's input)
    a max-pool output whose input is one of    ACTIVATION  ``PooledRef``: the input's form + the pool's
      the above (VGG: the conv after a pool)                argmax, 0 bytes
    an integer tensor (indices, labels)        INDEX       the tensor
    a parameter (leaf needing grad, or a view) PARAM       the tensor (0 bytes: the model's)
    fewer than 2 dims (statistics, scalars)    STAT        the tensor
    another leaf (the network input)           ACTIVATION  the tensor (exact, as in the engine)
    a softmax / log-softmax output (the loss)  STAT        the tensor (the engine's loss keeps p)
    any other float32 / float64 tensor         ACTIVATION  ``policy.store_activation`` (Paper:
                                                           its fallback, generic K-bit)

* a non-overlapping average pool (the ResNets' pad shortcut, DenseNet's
  transitions) runs as ``AvgPool`` (torch's forward, a backward that needs no
  saved input), as the engine's pool saves nothing; a max pool runs as
  ``MaxPool`` (torch's forward and backward), keeping what the engine's keeps:
  the argmax's window offset (uint8), not its input.

CPU tensors reach the Cython kernels as NumPy views (``Tensor.numpy()``), run on
torch's own OpenMP threads (``views.kernel_stream``), CUDA tensors the CUDA
kernels as CuPy arrays through DLPack, on torch's current stream; both zero-copy.
Tensors on the ``meta`` device give a shape-only pass (``Sized`` forms): the
ledger of a large model without computing it.
"""
from __future__ import annotations

import contextlib
import copy
import types
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..function import ACTIVATION, INDEX, PARAM, STAT, UNIT
from ..kernels.bn import as_ncm, bn_backward
from ..ledger import Entry, Ledger
from ..policy import Exact, Paper, Policy
from ..storage import SharedRef, UnitRef
from ..units import BNReLUUnit
from .forms import (
    Alias,
    Kept,
    TorchExactUnit,
    TorchPooledRef,
    bn_forward,
    exact_activations,
    exact_units,
    sized_activation,
    sized_unit,
    window_starts,
)
from .views import as_array, as_tensor, kernel_stream

_stack: list = []            # policies in force, innermost last; empty: plain torch
_names: list = []            # names of the bridge modules whose forward runs
_units: dict = {}            # id(unit output h) -> (weakref to h, its stored unit)
_shared: dict = {}           # id(saved activation) -> (weakref to it, its stored form): saved once
_pooled: dict = {}           # id(max-pool output) -> (weakref to it, its PooledRef)
_records: list = []          # lists collecting (Entry, stored) while ``record()`` runs
_kept: dict = {}             # tensors kept as they are while recording (to count each once)

#: outputs kept exactly: the loss's probabilities (the engine's SoftmaxCrossEntropy keeps p as STAT)
EXACT_OUTPUTS = ("LogSoftmaxBackward0", "SoftmaxBackward0")


def _op(name: str, module=None):
    """The ``ctx`` the engine's policies take (they read ``ctx.fn.__name__`` for errors;
    a window monitor names the unit by ``ctx.module``)."""
    return types.SimpleNamespace(fn=types.SimpleNamespace(__name__=name), module=module)


# --- policies ----------------------------------------------------------------
def check_policy(policy) -> Policy:
    """``policy`` if the bridge can apply it; a clear error naming it otherwise."""
    if not isinstance(policy, Policy):
        raise TypeError(f"npapprox.bridge.storage_policy expects an npapprox Policy (Exact(), Paper(4), "
                        f"Generic(4, ...)), got {type(policy).__name__}")
    if policy.approximates_forward or not policy.share_units:
        raise ValueError(f"npapprox.bridge cannot apply {policy!r}: it changes the forward pass (decoded "
                         "activations propagate), and the bridge keeps torch's exact forward; use Exact(), "
                         "Paper(K) or Generic(K, ...)")
    if isinstance(policy, Paper):
        check_policy(policy.fallback)
    return policy


def current_policy() -> Policy | None:
    """The policy in force (None outside ``storage_policy``: plain torch)."""
    return _stack[-1] if _stack else None


@contextlib.contextmanager
def storage_policy(policy: Policy):
    """Every torch forward inside keeps for backward what the engine keeps under ``policy``."""
    _stack.append(check_policy(policy))
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield policy
    finally:
        _stack.pop()


@contextlib.contextmanager
def module_scope(module):
    """Inside a bridge module's forward: its name (for the ledger) and its
    ``storage`` override (as ``npapprox.nn.Module.storage``) in force."""
    override = getattr(module, "storage", None)
    _names.append(getattr(module, "_bridge_name", type(module).__name__))
    pushed = bool(_stack) and override is not None
    if pushed:
        _stack.append(check_policy(override))
    try:
        yield
    finally:
        if pushed:
            _stack.pop()
        _names.pop()


# --- the ledger's view of what is saved --------------------------------------
@contextlib.contextmanager
def record():
    """Collect ``(Entry, stored form)`` for every save made inside (forward order)."""
    out: list = []
    _records.append(out)
    try:
        yield out
    finally:
        _records.remove(out)
        if not _records:
            _kept.clear()


def _note(op, name, kind, stored, policy):
    if _records:
        e = Entry(_names[-1] if _names else "-", op, name, kind, stored.form, stored.bits, tuple(stored.shape),
                  stored.payload_nbytes, stored.meta_nbytes, repr(policy))
        for out in _records:
            out.append((e, stored))


def ledger(module, x, labels=None, policy: Policy | None = None) -> Ledger:
    """One recorded forward of ``module`` on ``x`` (and the cross-entropy loss when
    ``labels`` are given) under ``policy`` (default: the one in force, else
    ``Exact()``); every saved entry, as ``npapprox.ledger`` lists them (same
    ``Entry``/``Ledger`` classes, same totals; like it, a training-mode forward
    updates the running statistics). Entries the hooks record name the op that
    produced the saved tensor; a tensor saved twice counts once (form ``alias``).
    ``x`` on the ``meta`` device runs a
    shape-only pass on a meta copy of ``module`` (nothing computed: cheap for any size)."""
    policy = (current_policy() or Exact()) if policy is None else policy
    if x.device.type == "meta":
        module = copy.deepcopy(module).to("meta")
    with record() as saved, storage_policy(policy):
        out = module(x)
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device)
            F.cross_entropy(out, labels)
    return Ledger([e for e, _ in saved], repr(policy))


# --- saved-tensor hooks ------------------------------------------------------
def _lookup(table: dict, t):
    hit = table.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


def _shared_form(t):
    """The stored form from which ``t`` is rebuilt for free (the engine's
    ``Policy.shared_form``): a reference to its unit, to its first save, or its
    pool's; None when nothing stored it."""
    unit = _lookup(_units, t)
    if unit is not None:
        return UnitRef(unit)
    shared = _lookup(_shared, t)                    # saved before (a tanh's output, then its conv's input)
    return SharedRef(shared) if shared is not None else _lookup(_pooled, t)


def _remember(table: dict, t, stored) -> None:
    """``table[id(t)] = stored`` while ``t`` lives."""
    key = id(t)
    table[key] = (weakref.ref(t, lambda _, k=key: table.pop(k, None)), stored)


def _classify(t, policy):
    """(kind, stored form) for a tensor an op saves (table in the module docstring)."""
    shared = _shared_form(t)
    if shared is not None:
        return ACTIVATION, shared
    base = t._base if t._is_view() else t
    if not t.is_floating_point():
        return INDEX, Kept(t)
    if base.grad_fn is None and base.requires_grad:
        return PARAM, Kept(t, param=True)
    if t.dim() < 2:
        return STAT, Kept(t)
    if base.grad_fn is None:
        return ACTIVATION, Kept(t)
    producer = type(t.grad_fn).__name__
    if producer in EXACT_OUTPUTS or t.dtype not in (torch.float32, torch.float64) or exact_activations(policy):
        return (STAT if producer in EXACT_OUTPUTS else ACTIVATION), Kept(t)
    if t.is_meta:
        stored = sized_activation(policy, t)
    else:
        with kernel_stream(t.device):
            stored = policy.store_activation(_op(f"saved output of {producer}"), "saved", as_array(t))
    _remember(_shared, t, stored)
    return ACTIVATION, stored


def _pack(t):
    policy = _stack[-1]
    kind, stored = _classify(t, policy)
    if _records and type(stored) is Kept and not stored.param:
        key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if key in _kept:
            stored = Alias(t)
        _kept[key] = t
    _note("torch-saved", "-" if t.grad_fn is None else type(t.grad_fn).__name__, kind, stored, policy)
    return t.device, stored


def _unpack(packed):
    device, stored = packed
    with kernel_stream(device):
        return as_tensor(stored.restore())


# --- the two autograd Functions ----------------------------------------------
def _store_unit(policy, x, y, mean, invstd, gamma, beta, eps, running=False, reserve=None, impl=0, module=None):
    if exact_units(policy):
        return TorchExactUnit(x.detach(), mean, invstd, gamma.detach(), beta.detach(), eps, running, reserve, impl)
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"npapprox.bridge: {policy!r} stores float32 or float64 activations, got {x.dtype} "
                         "(use Exact() for other dtypes)")
    if x.is_meta:
        return sized_unit(policy, x)
    with kernel_stream(x.device):   # gamma, beta copied: the unit must not follow a later optimiser step
        u = BNReLUUnit(None, as_array(y), None, as_array(invstd), as_array(gamma).copy(), as_array(beta).copy())
        return policy.store_unit(_op("BatchNormReLU", module), "unit", u)


class BatchNormReLU(torch.autograd.Function):
    """h = relu(y), y = gamma * (x - mu) / sigma + beta; x (N, C, H, W), gamma,
    beta (C,). ``batch``: mu, sigma are the batch statistics over (N, H, W), and
    the running statistics (when given) are updated in place, as ``F.batch_norm``
    does; otherwise (a K-bit policy in eval mode) mu, sigma^2 are the running
    statistics, and BN's backward drops the batch terms (``kernels.bn.bn_backward``).

    Keeps: one stored unit (``policy.store_unit``), gamma (a reference) and
    1/sigma (C floats). Backward: g = gh * [y > 0] (mask exact from the codes),
    then BN's backward with xhat rebuilt from the codes (``kernels.bn.bn_backward``)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, momentum, eps, policy, batch=True, module=None):
        if batch:
            y, mean, invstd, reserve, impl = bn_forward(x, gamma, beta, running_mean, running_var, momentum, eps)
        else:   # torch's eval forward; 1/sigma with the engine's bits (a test pins it)
            y = F.batch_norm(x, running_mean, running_var, gamma, beta, training=False, eps=eps)
            mean, invstd, reserve, impl = running_mean.clone(), torch.rsqrt(running_var + eps), None, 0
        ctx.batch = batch
        ctx.unit = _store_unit(policy, x, y, mean, invstd, gamma, beta, eps, running_mean is not None, reserve, impl,
                               module)
        h = y.relu_()       # in place: the unit keeps codes of y (or x), never y itself
        ctx.gamma, ctx.invstd = gamma.detach(), invstd
        _note("BatchNormReLU", "unit", UNIT, ctx.unit, policy)
        _note("BatchNormReLU", "gamma", PARAM, Kept(gamma, param=True), policy)
        _note("BatchNormReLU", "inv_sigma", STAT, Kept(invstd), policy)
        _remember(_units, h, ctx.unit)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, gh):
        unit, ctx.unit = ctx.unit, None       # freed as backward walks
        if unit is None:
            raise RuntimeError("BatchNormReLU: saved state was already freed (backward runs once per graph)")
        need = ctx.needs_input_grad[:3]
        if isinstance(unit, TorchExactUnit):
            gx, ggamma, gbeta = unit.backward(gh.contiguous(), need)
        else:
            with kernel_stream(gh.device):
                gx, ggamma, gbeta = bn_backward(as_ncm(as_array(gh)), unit.bn_source(), as_array(ctx.gamma),
                                                as_array(ctx.invstd), batch_stats=ctx.batch, need_gx=need[0])
            gx = None if gx is None else as_tensor(gx).reshape(gh.shape)
            ggamma, gbeta = as_tensor(ggamma), as_tensor(gbeta)
        return gx, ggamma, gbeta, None, None, None, None, None, None, None


def _stand_in(x_meta):
    """An uninitialised tensor of the input's (shape, dtype, device): what torch's pool
    backward kernels read of their input (its sizes), without keeping the input."""
    shape, dtype, device = x_meta
    return torch.empty(shape, dtype=dtype, device=device)


class AvgPool(torch.autograd.Function):
    """y = average of each k x k block (stride k, no padding), x (N, C, H, W) ->
    (N, C, H//k, W//k). Backward gx = gy / k^2 spread over its block (0 on rows or
    columns the pool dropped): torch's own average-pool backward, which reads only
    the input's sizes, so nothing is saved and the gradient is torch's, bit for bit."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k, ctx.x_meta = k, (x.shape, x.dtype, x.device)
        return F.avg_pool2d(x, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        k = [ctx.k, ctx.k]
        return torch.ops.aten.avg_pool2d_backward(gy, _stand_in(ctx.x_meta), k, k, [0, 0], False, True, None), None


class MaxPool(torch.autograd.Function):
    """y[n,c,i,j] = max of x over window (i, j) (k x k, stride s, padding -inf);
    x (N, C, H, W) -> (N, C, OH, OW): torch's max pool. Keeps what the engine's
    ``ops.MaxPool2d`` keeps: the argmax as a window offset ``p*k+q`` (uint8, INDEX),
    and the stored form of x when x has one, from which a consumer of y rebuilds it
    (``TorchPooledRef``, 0 bytes). Backward: torch's max-pool backward on the
    indices rebuilt from the offsets (bit-identical to plain torch's)."""

    @staticmethod
    def forward(ctx, x, k, s, pad, source, policy):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x, k, s, pad)
        r0, c0 = window_starts(s, pad, y.shape, x.device)
        w = x.shape[3]
        argmax = ((idx // w - r0) * k + (idx % w - c0)).to(torch.uint8)
        ctx.pooled = TorchPooledRef(source, argmax, k, s, pad, x.dtype, x.shape)
        ctx.args, ctx.x_meta = (k, s, pad), (x.shape, x.dtype, x.device)
        _note("MaxPool2d", "argmax", INDEX, Kept(argmax), policy)
        if source is not None:
            _remember(_pooled, y, ctx.pooled)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        pooled, ctx.pooled = ctx.pooled, None
        gx = torch.ops.aten.max_pool2d_with_indices_backward(gy, _stand_in(ctx.x_meta), *ctx.args, 1, False,
                                                             pooled.indices())
        return gx, None, None, None, None, None


# --- what the bridge modules call --------------------------------------------
def _recording(*tensors) -> bool:
    return bool(_stack) and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def batch_norm(bn, x):
    """The forward of a bridge ``BatchNorm2d`` (see ``npapprox.nn.BatchNorm2d``)."""
    batch = bn.training or bn.eval_batch_stats
    running = (bn.running_mean, bn.running_var) if bn.training or not batch else (None, None)
    # under an exact policy in eval mode plain torch already keeps what the engine keeps
    if bn.relu and _recording(x, bn.weight, bn.bias) and (batch or not exact_units(_stack[-1])):
        return BatchNormReLU.apply(x, bn.weight, bn.bias, *running, bn.momentum, bn.eps, _stack[-1], batch, bn)
    y = F.batch_norm(x, *running, bn.weight, bn.bias, training=batch, momentum=bn.momentum, eps=bn.eps)
    return F.relu(y) if bn.relu else y


def max_pool2d(x, kernel: int, stride: int | None = None, padding: int = 0):
    stride = kernel if stride is None else stride
    if _recording(x):
        return MaxPool.apply(x, kernel, stride, padding, _shared_form(x), _stack[-1])
    return F.max_pool2d(x, kernel, stride, padding)


def avg_pool2d(x, kernel: int, stride: int | None = None):
    stride = kernel if stride is None else stride
    if stride == kernel and _recording(x):
        return AvgPool.apply(x, kernel)
    return F.avg_pool2d(x, kernel, stride)


__all__ = ["AvgPool", "BatchNormReLU", "EXACT_OUTPUTS", "MaxPool", "as_array", "as_tensor", "avg_pool2d",
           "batch_norm", "check_policy", "current_policy", "ledger", "max_pool2d", "module_scope", "record",
           "storage_policy"]
