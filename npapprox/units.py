"""The stored forms of a BN -> ReLU unit: one object from which the unit's
backward (mask, xhat) and every consumer of its output h = relu(y) rebuild
what they need (docs/storage.md). ``BNReLUUnit`` is what the op hands to
``ctx.save(unit=...)``; a policy stores it as an ``ExactUnit`` (the BN input),
``PaperUnit`` / ``FitUnit`` (K-bit BN-window codes) or ``GenericUnit`` (per-group
codes of y plus the exact mask).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .backend import array_module
from .kernels import paper_decode, paper_mask, paper_pack, paper_sample_decoder, unpack_bits
from .kernels.bn import BNSource, as_ncm, bn_apply, bn_apply_pack
from .storage import GenericPacked, Stored, samples_aligned, value_range


class BNReLUUnit:
    """What a BN -> ReLU op hands to ``ctx.save(unit=...)``: its input x, the
    statistics and parameters (all (N, C, H, W) or (C,)), and its outputs made on
    demand, so that a policy asks for exactly what it keeps:

    * ``y`` -- the pre-ReLU output y = gamma * xhat + beta, computed by one
      ``bn_apply`` pass the first time it is read (or given: the bridge hands over
      a y it already has);
    * ``pack(k, s, bits)`` -- the paper codes of y, ``paper_pack(y, ...)``; before y
      exists, in the pass that writes h (``kernels.bn.bn_apply_pack``), so no y of
      the batch is made;
    * ``output()`` -- h = relu(y) for the next op: the fused pass's h, or y turned
      into h in place, or one ``bn_apply`` pass writing h alone (exact keeps only
      x). All three give the same bits."""

    __slots__ = ("x", "_y", "mu", "inv_sigma", "gamma", "beta", "_h")

    def __init__(self, x, y, mu, inv_sigma, gamma, beta):
        self.x, self._y, self.mu, self.inv_sigma, self.gamma, self.beta = x, y, mu, inv_sigma, gamma, beta
        self._h = None

    shape = property(lambda self: tuple((self.x if self.x is not None else self._y).shape))
    dtype = property(lambda self: (self.x if self.x is not None else self._y).dtype)

    def _args(self):
        return as_ncm(self.x), self.mu, self.gamma * self.inv_sigma, self.beta

    @property
    def y(self):
        if self._y is None:
            self._y = bn_apply(*self._args())[0].reshape(self.x.shape)
        return self._y

    def pack(self, k, s, bits):
        """``paper_pack(y as float32, k, s, bits)`` -> ``(packed, n_nonfinite)``."""
        if self._y is not None or self._h is not None:
            y = self.y
            return paper_pack(y if y.dtype == np.float32 else y.astype(np.float32), k, s, bits)
        h, packed, n_nonfinite = bn_apply_pack(*self._args(), k, s, bits)
        self._h = h.reshape(self.x.shape)
        return packed, n_nonfinite

    def output(self):
        """h = y * (y > 0); the unit lets go of its y and h (y's buffer may have become h)."""
        if self._h is not None:
            h = self._h
        elif self._y is not None:
            h = array_module(self._y).multiply(self._y, self._y > 0, out=self._y)
        else:
            h = bn_apply(*self._args(), want_y=False, want_h=True)[1].reshape(self.x.shape)
        self._y = self._h = None
        return h


class Unit(Stored):
    """Base of the stored forms of a BN -> ReLU unit (``restore()`` returns the
    form itself; ask it for ``xhat()``, ``mask()``, ``h()``, each (N, C, H, W),
    or for ``bn_source()``, what the unit's fused BN backward reads)."""

    __slots__ = ()

    def restore(self):
        return self

    def output(self):
        return self.h()

    def sample_reader(self):
        return self.h_samples

    def h_samples(self, sl):
        """h of the samples ``sl`` (a slice) only; here by rebuilding the whole of h."""
        return self.h()[sl]

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

    def h_samples(self, sl):
        # called by a worker of npapprox.parallel (a conv chunk): on this thread
        x = self.x[sl]
        return bn_apply(as_ncm(x), self.mu, self.gamma * self.inv_sigma, self.beta,
                        want_y=False, want_h=True, serial=True)[1].reshape(x.shape)

    def bn_source(self) -> BNSource:
        # xhat and the mask are rebuilt inside the fused backward pass from x:
        # nothing activation-sized is materialised
        return BNSource(as_ncm(self.x), self.mu, self.inv_sigma, relu_beta=self.beta)


@lru_cache(maxsize=64)
def _host_zeros(c):
    z = np.zeros(c, np.float32)
    z.flags.writeable = False
    return z


def _zeros(s):
    """float32 zeros like the per-channel ``s``: h's offset (0 by construction), one
    read-only host array per channel count, so a conv chunk's decode makes none."""
    xp = array_module(s)
    return _host_zeros(s.shape[0]) if xp is np else xp.zeros(s.shape, np.float32)


class PaperUnit(Unit):
    """The paper's form: K-bit codes of q = y/|gamma| in a per-channel window of
    +-3 batch standard deviations (``npapprox.quant``), plus the per-channel
    parameters decoding needs (metadata, all counted): the first-positive code
    ``s`` (int32) and the affine maps ``h_step, x_step, x_off`` (float32) of
    ``quant.paper_params``: 16 bytes per channel (the encode scale ``k`` is
    dropped once packed; ``h_off`` is 0 by construction).
    gamma and beta are parameters (by reference); sigma is the op's own STAT entry."""

    form = "paper"
    META_PER_CHANNEL = 16          # bytes of metadata per channel (what a shape-only ledger counts)
    __slots__ = ("packed", "s", "bits", "params")

    def __init__(self, packed, params, bits, shape, dtype):
        self.packed, self.bits = packed, bits
        self.params = {key: v for key, v in params.items() if key not in ("k", "h_off")}
        self.s = params["s"]
        self.shape, self.dtype = tuple(shape), dtype

    payload_nbytes = property(lambda self: int(self.packed.nbytes))
    meta_nbytes = property(lambda self: sum(int(v.nbytes) for v in self.params.values()))

    def _decode(self, step, off, relu, sl=slice(None)):
        """Decode the samples ``sl`` (``off`` None: 0): straight from their own bytes when
        they start and end on a byte boundary (codes are packed in C order), else from
        the whole batch."""
        n, per = self.shape[0], math.prod(self.shape[1:])
        start, stop, stride = sl.indices(n)
        packed = self.packed
        if stride != 1:
            return self._decode(step, off, relu)[sl]
        if (start, stop) != (0, n):
            if (start * per * self.bits) % 8 or ((stop * per * self.bits) % 8 and stop != n) or stop <= start:
                return self._decode(step, off, relu)[sl]
            packed = packed[start * per * self.bits // 8:-(-stop * per * self.bits // 8)]
        off = _zeros(self.s) if off is None else self.params[off]
        return paper_decode(packed, (stop - start,) + self.shape[1:], self.s, self.params[step], off, self.bits,
                            relu=relu).astype(self.dtype, copy=False)

    def xhat(self):
        return self._decode("x_step", "x_off", relu=False)

    def h(self):
        return self._decode("h_step", None, relu=True)

    def h_samples(self, sl):
        return self._decode("h_step", None, relu=True, sl=sl)

    def sample_reader(self):
        # samples that do not start on a byte would each decode the whole batch: h once
        if not samples_aligned(self.shape, self.bits):
            return Stored.sample_reader(self)
        # the decode's arguments checked once, not for each of the conv's chunks
        decode = paper_sample_decoder(self.packed, self.shape, self.s, self.params["h_step"], _zeros(self.s),
                                      self.bits, relu=True)

        def read(sl):
            a, b, step = sl.indices(self.shape[0])
            if step != 1 or b <= a:
                return self.h_samples(sl)
            return decode(a, b).astype(self.dtype, copy=False)
        return read

    def mask(self):
        return paper_mask(self.packed, self.shape, self.s, self.bits)

    def bn_source(self) -> BNSource:
        # the codes themselves: the fused BN backward rebuilds xhat and the mask per
        # block (kernels.bn.bn_backward), no decoded array of the unit exists
        p = self.params
        return BNSource(None, codes=(self.packed, self.shape, self.s, p["x_step"], p["x_off"], self.bits))


class FitUnit(PaperUnit):
    """``PaperUnit`` in a fitted window (``policy.FitWindow``): the same codes and
    decoding; the per-channel bin width ``d`` (float32) is metadata too."""

    form = "fit"
    META_PER_CHANNEL = 20
    __slots__ = ()


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

    # y.restore() is a fresh array: h and xhat are computed in it, one pass per operation

    def mask(self):
        n = int(np.prod(self.shape))
        return unpack_bits(self.mask_bits, n, 1).reshape(self.shape).view(bool)    # codes are 0 or 1

    def h(self):
        """y * mask."""
        y = self.y.restore()
        return array_module(y).multiply(y, self.mask(), out=y)

    def _aligned(self) -> bool:
        return samples_aligned(self.shape, self.y.bits, self.y.group) and samples_aligned(self.shape, 1)

    def sample_reader(self):
        # per chunk from its own codes and mask bits; else h rebuilt once, not per chunk
        return self.h_samples if self._aligned() else Stored.sample_reader(self)

    def h_samples(self, sl):
        if not self._aligned():
            return self.h()[sl]
        a, b, count = value_range(self.shape, sl)
        mask = unpack_bits(self.mask_bits[a // 8:-(-b // 8)], b - a, 1).reshape((count,) + self.shape[1:])
        return self.y.samples(sl) * mask.astype(bool)

    def xhat(self):
        """(y - beta) / gamma, 0 where gamma == 0."""
        xp = array_module(self.gamma)
        g = self.gamma.astype(self.dtype)
        y3 = as_ncm(self.y.restore())
        xp.subtract(y3, self.beta[:, None], out=y3)
        zero = g == 0
        xp.divide(y3, xp.where(zero, 1, g)[:, None], out=y3)
        if xp is not np or zero.any():       # (no host read of a device array)
            xp.copyto(y3, 0, where=zero[:, None])
        return y3.reshape(self.shape)
