"""Function / Context: the op protocol.

An op is a ``Function`` subclass with

* ``SAVES``: what it keeps for backward, name -> kind (the kinds below);
* ``forward(ctx, *arrays, **options) -> array``;
* ``backward(ctx, gy) -> tuple of arrays`` (one per positional input, ``None``
  where no gradient is needed).

Forward and backward take and return raw arrays (``numpy`` or ``cupy``).
``Function.apply`` wraps them: it unwraps tensors, decides whether to record,
calls ``forward``, and links the output tensor to its ``Context``.

``ctx.save(name=array)`` hands the array to the current storage policy, which
returns a stored form; ``ctx.restore("name")`` gives the array back (exact or
approximate, the op does not know). Plain Python attributes (shapes, strides)
are set on ``ctx`` directly. After the node's backward, ``release()`` drops
everything it held, so memory is freed as backward walks.

The kinds of saved entries (``npapprox.policy`` says how each is stored):
``ACTIVATION`` (activation-sized; the policy picks the form), ``UNIT`` (a BN ->
ReLU unit, ``units.BNReLUUnit``), ``PARAM`` (parameters, by reference),
``STAT`` (small statistics, exact), ``INDEX`` (integer indices, exact).

Each thread has a stack of storage policies (``storage_policy`` blocks) and of
running modules (``Module.__call__``); an op records the innermost of each.
"""
from __future__ import annotations

import contextlib
import threading

from .tensor import Tensor, is_grad_enabled, notify_observers

ACTIVATION = "activation"
UNIT = "unit"
PARAM = "param"
STAT = "stat"
INDEX = "index"
KINDS = (ACTIVATION, UNIT, PARAM, STAT, INDEX)


class _PolicyStack(threading.local):
    """The policies of the ``storage_policy`` blocks open in this thread (innermost
    last) above its base ``Exact()``; a thread never sees another's blocks."""

    def __init__(self):
        self.policies = []


_stack = _PolicyStack()


def current_policy():
    """The storage policy in force in the calling thread."""
    policies = _stack.policies
    if not policies:                           # the thread's base, made on first use
        from .policy import Exact
        policies.append(Exact())
    return policies[-1]


@contextlib.contextmanager
def storage_policy(policy):
    """Use ``policy`` (a ``policy.Policy``) for every op recorded inside the ``with`` block."""
    from .policy import Policy
    if not isinstance(policy, Policy):
        raise TypeError(f"storage_policy expects a Policy instance, got {type(policy).__name__}")
    _stack.policies.append(policy)
    try:
        yield policy
    finally:
        _stack.policies.pop()


class _ModuleStack(threading.local):
    """The modules whose forward is running in this thread (innermost last)."""

    def __init__(self):
        self.modules = []

    def append(self, module) -> None:
        self.modules.append(module)

    def pop(self):
        return self.modules.pop()

    def innermost(self):
        return self.modules[-1] if self.modules else None


#: ops record the innermost module of their own thread
MODULE_STACK = _ModuleStack()


class Context:
    """One op call's record: the op (``fn``), the policy and module in force, the
    graph links (``parents``: per input, the producing Context, the leaf Tensor or
    None) and the stored forms of what forward saved (``save`` / ``restore``).
    Options forward computes for backward (shapes, strides) are set as attributes."""

    def __init__(self, fn: type, policy, recording: bool, inputs: tuple):
        self.fn = fn
        self.module = MODULE_STACK.innermost()
        self.policy = policy
        self.recording = recording
        self.inputs = inputs  # positional arguments of apply; dropped once forward returns
        self.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in inputs)
        # the graph: per input, the Context that produced it, the leaf Tensor itself, or None.
        # Contexts, not tensors, so an activation nobody saved is freed after the forward.
        self.parents = tuple((a._ctx if a._ctx is not None else a) if needs else None
                             for a, needs in zip(inputs, self.needs_input_grad, strict=True))
        self.saved: dict | None = {}
        self._origin: dict = {}  # id(saved array) -> its stored form, for forward_output
        self.released = False

    def save(self, **arrays) -> None:
        """Store arrays for backward under the names declared in ``fn.SAVES``."""
        for name, array in arrays.items():
            kind = self.fn.SAVES.get(name)
            if kind is None:
                raise KeyError(f"{self.fn.__name__} saves {name!r}, which its SAVES does not declare")
            if self.recording or self.policy.approximates_forward:
                stored = self.saved[name] = self.policy.save(self, name, kind, array)
                self._origin[id(array)] = stored

    def stored_for(self, array):
        """The stored form made from ``array`` by this op's ``save``, or None."""
        return self._origin.get(id(array))

    def restore(self, *names):
        """The saved arrays, in the order asked (one name -> one array)."""
        if self.released:
            raise RuntimeError(f"{self.fn.__name__}: saved state was already freed "
                               "(backward runs once per graph)")
        arrays = tuple(self.saved[n].restore() for n in names)
        return arrays[0] if len(arrays) == 1 else arrays

    def sample_reader(self, name):
        """A function ``sl -> the saved array's samples sl`` (``Stored.sample_reader``):
        forms that can rebuild a slice of samples on its own do so per call."""
        if self.released:
            self.restore(name)                                  # raises the usual error
        return self.saved[name].sample_reader()

    def shared_form(self, array):
        """The stored form (a reference) from which the producer of input ``array``
        rebuilds it, or None (``Policy.shared_form``). Valid during forward only."""
        return self.policy.shared_form(self, array) if self.recording else None

    def source_of(self, array):
        """The input Tensor whose data *is* ``array`` (for policies that store a
        reference to what the producer of that tensor already stored), or None.
        Valid during forward only."""
        for a in self.inputs:
            if isinstance(a, Tensor) and a.data is array:
                return a
        return None

    def release(self) -> None:
        self.saved = None
        self._origin = {}
        self.module = None
        self.inputs = self.parents = ()
        self.released = True


class Function:
    """An op: subclasses declare ``SAVES`` and define ``forward(ctx, *arrays,
    **options) -> array`` and ``backward(ctx, gy) -> tuple`` (one gradient or
    None per positional input) on raw arrays; users call ``apply``."""

    SAVES: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, kind in cls.SAVES.items():
            if kind not in KINDS:
                raise TypeError(f"{cls.__name__}.SAVES[{name!r}] = {kind!r}; expected one of {KINDS}")

    @staticmethod
    def forward(ctx, *arrays, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, gy):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **options) -> Tensor:
        """Run ``forward`` on the arrays of ``args`` (Tensors unwrapped) under the
        current policy; the output Tensor links to the op's Context when grad is
        enabled and some input requires grad, otherwise the Context is released."""
        record = is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        policy = current_policy()
        ctx = Context(cls, policy, record, args)
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        y = policy.forward_output(ctx, cls.forward(ctx, *arrays, **options))
        ctx.inputs = ()
        out = Tensor(y, requires_grad=record)
        if record:
            out._ctx = ctx
        else:
            ctx.release()
        notify_observers()
        return out
