"""Tensor and the backward walk.

``Tensor`` wraps an array (``data``), its gradient (``grad``) and, when it was
produced by a recorded op, the op's ``Context`` (``_ctx``). ``backward()``:

1. orders the graph topologically with an explicit stack (no recursion, so
   graphs of any depth work);
2. walks it from the output back, calling each op's ``backward`` once with the
   sum of the gradients of all its consumers (fan-out accumulates by ``+``,
   into the pending gradient's buffer when the walk alone holds it: ``_accumulate``);
3. releases each node's saved state right after its backward, and drops the
   node's incoming gradient, so memory falls as the walk proceeds.

The graph links Contexts (``ctx.parents``: the producing Context of each input,
or the leaf Tensor), not the intermediate Tensors: an activation is kept alive
only by what the ops saved of it, so what a storage policy saves is what the
graph costs.

Backward runs once per graph. A walk that would reach a node an earlier walk
already released (two losses sharing a sub-graph, each with its own
``backward()``) is refused before any gradient is added, whatever the shared
ops saved: a released node has no links left, so it could only drop the
gradient silently. (PyTorch still walks nodes that saved nothing, such as an
add; here the rule does not depend on what an op saves.) Backpropagate the sum
of the losses instead.

The grad mode (``no_grad``) is per thread, like the storage policy stack.

Gradients are never modified in place, so an array may safely be handed to
several parents.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from . import checks, parallel
from .backend import array_module, to_device


class _GradMode(threading.local):
    enabled = True          # each thread starts with recording on
    observers = ()          # told after each op's forward and each backward step (``observing``)


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    return _grad_mode.enabled


@contextlib.contextmanager
def no_grad():
    """Inside this block ops record nothing and save nothing (in this thread)."""
    previous, _grad_mode.enabled = _grad_mode.enabled, False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


@contextlib.contextmanager
def observing(fn):
    """Call ``fn()`` after every op's forward and every step of a backward walk run
    in this thread inside the block (``peak.measure_profile`` reads memory there)."""
    previous, _grad_mode.observers = _grad_mode.observers, _grad_mode.observers + (fn,)
    try:
        yield
    finally:
        _grad_mode.observers = previous


def notify_observers() -> None:
    for fn in _grad_mode.observers:
        fn()


class Tensor:
    """An array (``data``: NumPy or CuPy) with its gradient (``grad``, filled by
    ``backward``) and, for an op's output, the op's Context (``_ctx``: the graph
    node; None for a leaf). ``+``, ``*``, ``-``, ``sum()`` and ``reshape()`` call
    the ops of ``npapprox.ops``; ``backward()`` walks the graph from here."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        xp = array_module(data)
        self.data = data if hasattr(data, "dtype") and hasattr(data, "shape") else xp.asarray(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None

    # --- views of the data ---------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={tuple(self.shape)}, dtype={self.dtype}{grad})"

    def numpy(self):
        return to_device(self.data, "cpu")

    def item(self) -> float:
        return float(self.numpy().reshape(-1)[0]) if self.size == 1 else self._not_scalar()

    def _not_scalar(self):
        raise ValueError(f"item() needs a tensor with one element, got shape {tuple(self.shape)}")

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def to(self, device: str) -> "Tensor":
        out = Tensor(to_device(self.data, device), requires_grad=self.requires_grad)
        return out

    # --- backward ------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        Without ``grad`` the tensor must hold one finite value (a loss)."""
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a scalar, got shape {tuple(self.shape)}")
            xp = array_module(self.data)
            if xp is np:
                value = self.item()
                if not np.isfinite(value):
                    raise FloatingPointError(f"the loss is not finite ({value}); backward refused. "
                                             "Lower the learning rate or check the inputs.")
            else:  # on the GPU: checked on the device, reported by checks.flush() at the end
                checks.nonfinite(xp.count_nonzero(~xp.isfinite(self.data)),
                                 lambda n: "the loss is not finite; its gradients are garbage. "
                                           "Lower the learning rate or check the inputs.")
            grad = xp.ones_like(self.data)
        elif tuple(grad.shape) != tuple(self.shape):
            raise ValueError(f"gradient shape {tuple(grad.shape)} does not match tensor shape {tuple(self.shape)}")
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(made under no_grad, or from inputs that need no gradient)")
        if self._ctx is None:  # a leaf: d(self)/d(self) = 1
            self.grad = grad if self.grad is None else self.grad + grad
            return
        order = topological_order(self._ctx)
        if any(ctx.released for ctx in order):  # before any gradient is added: all or nothing
            raise RuntimeError("this graph (or a part it shares with an earlier backward) was already "
                               "backpropagated and its saved state freed; call backward() once, on the "
                               "sum of the losses")
        grads = {id(self._ctx): grad}
        while order:
            ctx = order.pop()  # popping drops the walk's reference: a finished node can go
            g = grads.pop(id(ctx), None)
            if g is not None:
                in_grads = ctx.fn.backward(ctx, g)
                if not isinstance(in_grads, tuple):
                    in_grads = (in_grads,)
                for parent, pg in zip(ctx.parents, in_grads, strict=True):
                    if parent is None or pg is None:
                        continue
                    if isinstance(parent, Tensor):  # a leaf
                        parent.grad = pg if parent.grad is None else parent.grad + pg
                    else:
                        _accumulate(grads, id(parent), pg)
            ctx.release()
            del g
            notify_observers()
        checks.flush()  # the GPU's pending non-finite counts: one read-back per backward

    # --- operators (thin wrappers over npapprox.ops) --------------------------
    def __add__(self, other):
        from .ops.elementwise import add
        return add(self, other)

    __radd__ = __add__

    def __mul__(self, other):
        from .ops.elementwise import mul
        return mul(self, other)

    __rmul__ = __mul__

    def __neg__(self):
        from .ops.elementwise import mul
        return mul(self, -1.0)

    def __sub__(self, other):
        return self + (-other)

    def sum(self):
        from .ops.elementwise import sum_all
        return sum_all(self)

    def reshape(self, *shape):
        from .ops.shape import reshape
        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)


def _accumulate(grads: dict, key, pg) -> None:
    """grads[key] = grads[key] + pg, written into the pending gradient's own buffer
    when nothing else can see it (the residual stream's gradient: no third
    activation-sized buffer). Safe only for a buffer this walk alone holds: an
    array (or the view of one) referenced by nothing but ``grads``, so not the
    caller's gradient, not an array handed to two parents (an add's), not a leaf's
    ``.grad``. Adding in place gives the same bits (addition commutes)."""
    old = grads.get(key)
    if old is None:
        grads[key] = pg
        return
    base = old.base
    # references: grads + `old` + getrefcount's argument; a view's base: old.base + `base` + the argument
    sole = sys.getrefcount(old) == 3 and (base is None or (base.base is None and sys.getrefcount(base) == 3))
    del base
    if (sole and getattr(old.flags, "writeable", True) and old.shape == pg.shape
            and old.dtype == array_module(old).result_type(old, pg)):
        parallel.add(old, pg, out=old)
    else:
        grads[key] = parallel.add(old, pg)


def topological_order(root) -> list:
    """The Contexts reachable from ``root`` (a Context), inputs before outputs
    (iterative post-order DFS over ``ctx.parents``; leaves are not listed)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        ctx, expanded = stack.pop()
        if expanded:
            order.append(ctx)
            continue
        if id(ctx) in visited:
            continue
        visited.add(id(ctx))
        stack.append((ctx, True))
        for p in ctx.parents:
            if p is not None and not isinstance(p, Tensor) and id(p) not in visited:
                stack.append((p, False))
    return order
