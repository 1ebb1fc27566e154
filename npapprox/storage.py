"""Stored forms: what a policy keeps for one saved entry, and how it comes back.

A stored form answers three questions the memory ledger asks (DESIGN.md
property 1): which ``form`` it is, how many ``bits`` per value, how many bytes
of ``payload`` and of ``meta``data it holds. ``restore()`` gives back an array
of the saved shape and dtype.

Only the exact forms exist in the core engine; the approximate forms (K-bit
codes, references to a producer's codes) plug in beside them.
"""
from __future__ import annotations


class Stored:
    """Base class. Subclasses set ``form`` and ``bits`` and implement restore."""

    form = "?"
    bits = 0
    __slots__ = ("shape", "dtype")

    @property
    def payload_nbytes(self) -> int:
        raise NotImplementedError

    @property
    def meta_nbytes(self) -> int:
        return 0

    def restore(self):
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(form={self.form}, bits={self.bits}, shape={self.shape}, "
                f"payload={self.payload_nbytes} B, meta={self.meta_nbytes} B)")


class Full(Stored):
    """The array itself, kept by reference (ops never write into saved arrays)."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    @property
    def bits(self):
        return 8 * self.dtype.itemsize

    @property
    def form(self):
        return str(self.dtype)

    @property
    def payload_nbytes(self) -> int:
        return int(self.array.nbytes)

    def restore(self):
        return self.array


class ParamRef(Full):
    """A parameter array kept by reference. Its bytes belong to the model, not
    to the activations, so the ledger counts it as zero payload."""

    __slots__ = ()
    form = "param"

    @property
    def payload_nbytes(self) -> int:
        return 0
