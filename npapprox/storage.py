"""Stored forms: what a policy keeps for one saved entry, and how it comes back.

A stored form answers three questions the memory ledger asks (docs/design.md
property 1): which ``form`` it is, how many ``bits`` per value, how many bytes
of ``payload`` and of ``meta``data it holds. ``restore()`` gives back an array
of the saved shape and dtype.

The forms: ``Full`` and ``ParamRef`` (exact), ``GenericPacked`` (per-group K-bit
codes), the units of a BN -> ReLU op (``ExactUnit``, ``PaperUnit``, ``FitUnit``,
``GenericUnit``: what ``BNReLUUnit`` is stored as) and ``UnitRef`` (a consumer's
reference to its producer's unit).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import array_module
from .kernels.bn import BNSource, as_ncm, bn_apply


class BNReLUUnit(NamedTuple):
    """What a BN -> ReLU op hands to ``ctx.save(unit=...)``: its input, its
    pre-ReLU output y = gamma * xhat + beta and the statistics (all (N, C, H, W)
    or (C,))."""

    x: object
    y: object
    mu: object
    inv_sigma: object
    gamma: object
    beta: object


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
        from .kernels import generic_decode  # noqa: PLC0415 (kernels import storage users)
        return generic_decode(self.packed, self.lo, self.scale, self.bits, self.group,
                              self.shape).astype(self.dtype, copy=False)


# --------------------------------------------------------------------------- #
# BN -> ReLU units: one stored object from which the unit's backward (mask,
# xhat) and every consumer of its output h = relu(y) rebuild what they need.
# --------------------------------------------------------------------------- #
class Unit(Stored):
    """Base of the stored forms of a BN -> ReLU unit (``restore()`` returns the
    form itself; ask it for ``xhat()``, ``mask()``, ``h()``, each (N, C, H, W),
    or for ``bn_source()``, what the unit's fused BN backward reads)."""

    __slots__ = ()

    def restore(self):
        return self

    def xhat(self):
        raise NotImplementedError

    def mask(self):
        raise NotImplementedError

    def h(self):
        raise NotImplementedError

    def bn_source(self) -> BNSource:
        """The rebuilt xhat and mask, as ``kernels.bn.bn_backward`` takes them."""
        return BNSource(as_ncm(self.xhat()), mask=self.mask())


class ExactUnit(Unit):
    """The BN input x in full precision plus the per-channel mean: xhat, the mask
    and h are recomputed exactly as the forward computed them (the same
    ``kernels.bn`` pass, so the same bits). One float32 tensor per unit: the
    paper's exact baseline."""

    __slots__ = ("x", "mu", "inv_sigma", "gamma", "beta")

    def __init__(self, x, mu, inv_sigma, gamma, beta):
        self.x, self.mu, self.inv_sigma, self.gamma, self.beta = x, mu, inv_sigma, gamma, beta
        self.shape, self.dtype = tuple(x.shape), x.dtype

    form = property(lambda self: str(self.dtype))
    bits = property(lambda self: 8 * self.dtype.itemsize)
    payload_nbytes = property(lambda self: int(self.x.nbytes))
    meta_nbytes = property(lambda self: int(self.mu.nbytes))

    def _apply(self, **want):
        return bn_apply(as_ncm(self.x), self.mu, self.gamma * self.inv_sigma, self.beta, **want)

    def xhat(self):
        return ((as_ncm(self.x) - self.mu[:, None]) * self.inv_sigma[:, None]).reshape(self.shape)

    def pre_relu(self):
        """y = gamma * xhat + beta, bit-identical to the forward's."""
        return self._apply()[0].reshape(self.shape)

    def mask(self):
        return self.pre_relu() > 0

    def h(self):
        return self._apply(want_y=False, want_h=True)[1].reshape(self.shape)

    def bn_source(self) -> BNSource:
        # xhat and the mask are rebuilt inside the fused backward pass from x:
        # nothing activation-sized is materialised
        return BNSource(as_ncm(self.x), self.mu, self.inv_sigma, relu_beta=self.beta)


class PaperUnit(Unit):
    """The paper's form: K-bit codes of q = y/|gamma| in a per-channel window of
    +-3 batch standard deviations (``npapprox.quant``), plus the first-positive
    code ``s`` per channel (int32 metadata). gamma and beta are parameters
    (by reference); sigma is the op's own STAT entry."""

    form = "paper"
    __slots__ = ("packed", "s", "bits", "params")

    def __init__(self, packed, params, bits, shape, dtype):
        self.packed, self.params, self.bits = packed, params, bits
        self.s = params["s"]
        self.shape, self.dtype = tuple(shape), dtype

    payload_nbytes = property(lambda self: int(self.packed.nbytes))
    meta_nbytes = property(lambda self: int(self.s.nbytes))

    def _decode(self, step, off, relu):
        from .kernels import paper_decode  # noqa: PLC0415
        p = self.params
        return paper_decode(self.packed, self.shape, self.s, p[step], p[off], self.bits,
                            relu=relu).astype(self.dtype, copy=False)

    def xhat(self):
        return self._decode("x_step", "x_off", relu=False)

    def h(self):
        return self._decode("h_step", "h_off", relu=True)

    def mask(self):
        from .kernels import paper_mask  # noqa: PLC0415
        return paper_mask(self.packed, self.shape, self.s, self.bits)


class FitUnit(PaperUnit):
    """``PaperUnit`` in a fitted window (``policy.FitWindow``): the same codes and
    decoding; the per-channel bin width ``d`` (float32) is metadata too."""

    form = "fit"
    __slots__ = ()

    meta_nbytes = property(lambda self: int(self.s.nbytes + self.params["d"].nbytes))


class GenericUnit(Unit):
    """A unit stored with the generic quantizer: per-group K-bit codes of y plus
    an exact 1-bit ReLU mask (the generic window does not put 0 on a bin edge)."""

    __slots__ = ("y", "mask_bits", "gamma", "beta")

    def __init__(self, y: GenericPacked, mask_bits, gamma, beta):
        self.y, self.mask_bits, self.gamma, self.beta = y, mask_bits, gamma, beta
        self.shape, self.dtype = y.shape, y.dtype

    form = property(lambda self: "generic+mask")
    bits = property(lambda self: self.y.bits + 1)
    payload_nbytes = property(lambda self: self.y.payload_nbytes + int(self.mask_bits.nbytes))
    meta_nbytes = property(lambda self: self.y.meta_nbytes)

    def mask(self):
        from .kernels import unpack_bits  # noqa: PLC0415
        n = int(np.prod(self.shape))
        return unpack_bits(self.mask_bits, n, 1).reshape(self.shape).astype(bool)

    def h(self):
        y = self.y.restore()
        return y * self.mask()

    def xhat(self):
        xp = array_module(self.gamma)
        g = self.gamma.astype(self.dtype)
        safe = xp.where(g == 0, 1, g)
        y3 = as_ncm(self.y.restore())
        xhat = xp.where((g == 0)[:, None], 0, (y3 - self.beta[:, None]) / safe[:, None])
        return xhat.astype(self.dtype, copy=False).reshape(self.shape)


class UnitRef(Stored):
    """A consumer's saved input that is a unit's output h: rebuilt from the
    unit's stored form, so it costs nothing (docs/design.md property 4)."""

    __slots__ = ("unit",)

    def __init__(self, unit: Unit):
        self.unit = unit
        self.shape, self.dtype = unit.shape, unit.dtype

    form = property(lambda self: f"ref:{self.unit.form}")
    bits = property(lambda self: 0)
    payload_nbytes = property(lambda self: 0)

    def restore(self):
        return self.unit.h()
