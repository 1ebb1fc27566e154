"""Module, Parameter, Sequential: containers for parameters, buffers and sub-modules."""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import numpy as np

from ..backend import array_module, to_device
from ..function import MODULE_STACK
from ..policy import storage_policy
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that requires grad and is registered by the Module that owns it."""

    __slots__ = ()

    def __init__(self, data):
        super().__init__(data, requires_grad=True)


class _Traces(threading.local):
    """The lists that ``trace_modules`` blocks open in this thread are filling."""

    def __init__(self):
        self.lists = []


_traces = _Traces()


@contextlib.contextmanager
def trace_modules():
    """Record every module called in this thread while the block runs, in call
    order (a module called twice appears twice)::

        with trace_modules() as called:
            model(x)
    """
    called = []
    _traces.lists.append(called)
    try:
        yield called
    finally:
        _traces.lists.remove(called)


class Module:
    """Base class. Attributes that are Parameters, Modules or registered buffers
    are discovered in assignment order, which fixes ``state_dict`` key order."""

    def __init__(self):
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "storage", None)

    def forward(self, *args):
        raise NotImplementedError

    def __call__(self, *args):
        """forward(*args), with this module's storage policy override (if any)
        in force and the module recorded on every op it runs (for the ledger)."""
        with self._running():
            return self.forward(*args)

    @contextlib.contextmanager
    def _running(self):
        MODULE_STACK.append(self)
        for called in _traces.lists:
            called.append(self)
        try:
            with storage_policy(self.storage) if self.storage is not None else contextlib.nullcontext():
                yield
        finally:
            MODULE_STACK.pop()

    def register_buffer(self, name: str, array) -> None:
        """Non-trainable state (BN running statistics) saved in ``state_dict``."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def __setattr__(self, name, value):
        if "_buffers" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._buffers:
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    # --- traversal --------------------------------------------------------------
    def named_children(self):
        for name, v in self.__dict__.items():
            if isinstance(v, Module):
                yield name, v

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = ""):
        for mod_name, mod in self.named_modules(prefix):
            for name, v in mod.__dict__.items():
                if isinstance(v, Parameter):
                    yield (f"{mod_name}.{name}" if mod_name else name), v

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for mod_name, mod in self.named_modules():
            for name, v in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), v

    # --- modes, devices, dtypes ---------------------------------------------------
    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def _map_arrays(self, fn) -> None:
        for _, mod in self.named_modules():
            for v in list(mod.__dict__.values()):
                if isinstance(v, Parameter):
                    v.data, v.grad = fn(v.data), None
            for name, arr in list(mod._buffers.items()):
                mod.register_buffer(name, fn(arr))

    def to(self, device: str):
        """Move parameters and buffers to ``"cpu"`` or ``"gpu"`` (in place)."""
        self._map_arrays(lambda a: to_device(a, device))
        return self

    def astype(self, dtype):
        """Cast parameters and buffers (float64 for gradient checks), in place."""
        self._map_arrays(lambda a: a.astype(dtype))
        return self

    # --- state -----------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers as host NumPy copies, in a fixed order."""
        sd = OrderedDict((n, to_device(p.data, "cpu").copy()) for n, p in self.named_parameters())
        sd.update((n, to_device(b, "cpu").copy()) for n, b in self.named_buffers())
        return sd

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays into the existing parameters and buffers (shapes must match)."""
        own = dict(self.named_parameters())
        own_buffers = dict(self.named_buffers())
        missing = [k for k in list(own) + list(own_buffers) if k not in state]
        unexpected = [k for k in state if k not in own and k not in own_buffers]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        pairs = []
        for name, value in state.items():
            target = own[name].data if name in own else own_buffers.get(name)
            if target is None:
                continue
            if tuple(target.shape) != tuple(np.shape(value)):
                raise ValueError(f"load_state_dict: {name} has shape {tuple(np.shape(value))}, "
                                 f"the model expects {tuple(target.shape)}")
            pairs.append((target, value))
        for target, value in pairs:  # all checked first: a failed load changes nothing
            target[...] = array_module(target).asarray(value, dtype=target.dtype)

    def save(self, path) -> None:
        np.savez(path, **self.state_dict())

    def load(self, path) -> None:
        with np.load(path) as f:
            self.load_state_dict({k: f[k] for k in f.files})

    def __repr__(self):
        children = [f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in self.named_children()]
        return f"{type(self).__name__}(" + ("\n" + "\n".join(children) + "\n" if children else "") + ")"


class Sequential(Module):
    """Applies its modules in order."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __iter__(self):
        return (m for _, m in self.named_children())

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def __getitem__(self, i):
        return list(self)[i]

    def __call__(self, x):
        # not through forward(*args): the argument tuple (and, for nested Sequentials,
        # each caller's loop variable) would hold an activation-sized input until the
        # last layer returned. Here only the layer running holds its input.
        box = [x]
        del x
        self._run(box)
        return box.pop()

    def _run(self, box: list) -> None:
        """Apply the layers in turn to ``box``'s one element, in place."""
        with self._running():
            for m in self:
                if isinstance(m, Sequential) and type(m).__call__ is Sequential.__call__:
                    m._run(box)
                else:
                    box.append(m(box.pop()))

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
