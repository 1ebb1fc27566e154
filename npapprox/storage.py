"""Stored forms: what a policy keeps for one saved entry, and how it comes back.

A stored form answers three questions the memory ledger asks (docs/design.md
property 1): which ``form`` it is, how many ``bits`` per value, how many bytes
of ``payload`` and of ``meta``data it holds. ``restore()`` gives back an array
of the saved shape and dtype.

The forms: ``Full`` and ``ParamRef`` (exact), ``GenericPacked`` (per-group K-bit
codes) and the references ``SharedRef``, ``UnitRef`` (a consumer's reference to
its producer's stored form or unit) and ``PooledRef`` (a max-pool output rebuilt
from its input's form and the argmax). The units of a BN -> ReLU op
(``ExactUnit``, ``PaperUnit``, ``FitUnit``, ``GenericUnit``: what a
``BNReLUUnit`` is stored as) live in ``npapprox.units``.
"""
from __future__ import annotations

import math

from .backend import array_module
from .kernels import generic_decode


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

    def output(self):
        """The array a consumer sharing this form gets back (``SharedRef``): what was saved."""
        return self.restore()

    def sample_reader(self):
        """A function ``sl -> output()[sl]`` (``sl``: a slice of samples) for consumers that
        work a few samples at a time (conv backward). Here the whole array is rebuilt
        once; forms that can rebuild a slice on its own override it, so no rebuilt
        array of the whole batch exists."""
        a = self.output()
        return lambda sl: a[sl]

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

    def sample_reader(self):
        return lambda sl: self.array[sl]


class ParamRef(Full):
    """A parameter array kept by reference. Its bytes belong to the model, not
    to the activations, so the ledger counts it as zero payload."""

    __slots__ = ()
    form = "param"

    @property
    def payload_nbytes(self) -> int:
        return 0


class GenericPacked(Stored):
    """K-bit codes with a (lo, scale) pair per group of ``group`` consecutive
    values: x ~ lo + code * scale (see ``kernels.generic_pack``)."""

    form = "generic"
    __slots__ = ("packed", "lo", "scale", "bits", "group")

    def __init__(self, packed, lo, scale, bits, group, shape, dtype):
        self.packed, self.lo, self.scale = packed, lo, scale
        self.bits, self.group, self.shape, self.dtype = bits, group, tuple(shape), dtype

    @property
    def payload_nbytes(self) -> int:
        return int(self.packed.nbytes)

    @property
    def meta_nbytes(self) -> int:
        return int(self.lo.nbytes + self.scale.nbytes)

    def restore(self):
        return generic_decode(self.packed, self.lo, self.scale, self.bits, self.group,
                              self.shape).astype(self.dtype, copy=False)

    def sample_reader(self):
        # samples decoded from their own codes and groups when every sample starts on a
        # byte and on a group (both run in C order); else the whole array, rebuilt once
        return self.samples if samples_aligned(self.shape, self.bits, self.group) else super().sample_reader()

    def samples(self, sl):
        """``restore()[sl]`` for a slice ``sl`` of samples, decoding only theirs (needs
        ``samples_aligned``)."""
        a, b, count = value_range(self.shape, sl)
        g0, g1 = a // self.group, -(-b // self.group)
        return generic_decode(self.packed[a * self.bits // 8:b * self.bits // 8], self.lo[g0:g1],
                              self.scale[g0:g1], self.bits, self.group,
                              (count,) + self.shape[1:]).astype(self.dtype, copy=False)


def value_range(shape, sl):
    """``(a, b, count)``: the flat values ``[a, b)`` of the ``count`` samples ``sl`` (a
    slice of step 1) of an array of ``shape`` in C order."""
    start, stop, _ = sl.indices(shape[0])
    per = math.prod(shape[1:])
    count = max(0, stop - start)
    return start * per, (start + count) * per, count


def samples_aligned(shape, bits, group=1) -> bool:
    """Every sample of ``shape`` starts on a byte of its ``bits``-bit codes and on a group."""
    per = math.prod(shape[1:])
    return per % group == 0 and (per * bits) % 8 == 0


class SharedRef(Stored):
    """A consumer's saved input that its producer already stored (a relu, sigmoid
    or tanh output, in whatever form the policy gave it): a reference to that
    stored form, so the activation is kept once."""

    __slots__ = ("target",)

    def __init__(self, target: Stored):
        self.target = target
        self.shape, self.dtype = target.shape, target.dtype

    form = property(lambda self: f"ref:{self.target.form}")
    bits = property(lambda self: 0)
    payload_nbytes = property(lambda self: 0)

    def restore(self):
        return self.target.output()

    def sample_reader(self):
        return self.target.sample_reader()


class UnitRef(SharedRef):
    """A consumer's saved input that is a unit's output h: rebuilt from the
    unit's stored form (``Unit.output``: h), so it costs nothing (docs/design.md
    property 4)."""

    __slots__ = ()
    unit = property(lambda self: self.target)


class PooledRef(Stored):
    """A consumer's saved input that is a max-pool output: rebuilt from the stored
    form of the pool's input (a unit's codes, a shared output) and the pool's
    argmax (its INDEX entry), ``y[n,c,i,j] = xpad[n,c,i*s+p,j*s+q]`` with
    ``p*k+q = argmax[n,c,i,j]`` (xpad: the rebuilt input padded with -inf). Exact
    when the input's form is; costs nothing beyond the argmax the pool keeps anyway."""

    __slots__ = ("source", "argmax", "kernel", "stride", "padding")

    def __init__(self, source: Stored, argmax, kernel, stride, padding, dtype):
        self.source, self.argmax = source, argmax
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.shape, self.dtype = tuple(argmax.shape), dtype

    form = property(lambda self: f"ref:pool:{self.source.form}")
    bits = property(lambda self: 0)
    payload_nbytes = property(lambda self: 0)

    def restore(self):
        x = self.source.output()
        xp = array_module(x)
        k, st, pad = self.kernel, self.stride, self.padding
        n, c, h, w = x.shape
        oh, ow = self.shape[2:]
        if pad:
            xpad = xp.full((n, c, h + 2 * pad, w + 2 * pad), -xp.inf, dtype=x.dtype)
            xpad[:, :, pad:pad + h, pad:pad + w] = x
        else:
            xpad = x
        p, q = self.argmax // k, self.argmax % k                          # (N, C, OH, OW) each
        rows = p + (st * xp.arange(oh))[:, None]
        cols = q + (st * xp.arange(ow))[None, :]
        return xpad[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None], rows, cols]
