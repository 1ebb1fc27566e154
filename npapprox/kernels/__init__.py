"""Low-level kernels, each with one dispatch point.

* Storage kernels (this module): the K-bit encoders and decoders behind the
  storage policies -- :func:`paper_pack`, :func:`paper_decode`, :func:`paper_mask`
  (the paper's "BN window" scheme), :func:`generic_pack`, :func:`generic_decode`
  (per-group min/max, deterministic or stochastic rounding), and the helpers
  :func:`pack_bits`, :func:`unpack_bits`, :func:`counter_uniform`. The byte
  contract is :mod:`npapprox.kernels.reference` (docs/kernels.md).
* Data movement for convolutions: ``from npapprox.kernels.im2col import im2row,
  row2im`` (not re-exported here, so ``npapprox.kernels.im2col`` stays the module).

Dispatch (the functions below): NumPy arrays go to the compiled Cython kernels
(:mod:`npapprox.kernels.cpu`, extension ``npapprox._quant``) when the extension
imported; CuPy arrays go to the CUDA kernels (:mod:`npapprox.kernels.gpu`,
``quant.cu`` compiled at run time by CuPy). One switch forces the reference
everywhere, for the storage kernels and im2row alike:
``NPAPPROX_REFERENCE_KERNELS=1`` in the environment (read once, at import) or
:func:`use_reference` (both in :mod:`npapprox.kernels.switch`; the same function as
``npapprox.kernels.im2col.use_reference``).
All implementations give identical bytes, so the switch changes speed, never
results (one exception, on CuPy arrays only: CuPy's own elementwise kernels flush
float32 subnormals to zero, so the reference run *on CuPy arrays* can differ from
the contract where subnormals occur; the CUDA kernels of ``gpu.py`` do not flush).
"""
from __future__ import annotations

import math

import numpy as np

from npapprox.backend import on_gpu
from npapprox.kernels import gpu as _gpu  # imports no CuPy until a kernel runs
from npapprox.kernels import reference
from npapprox.kernels.checks import num_groups, packed_nbytes
from npapprox.kernels.switch import reference_forced, use_reference

try:  # needs the extension npapprox._quant, built by ``pip install .`` from src/_quant.pyx
    from npapprox.kernels import cpu as _cpu
except ImportError:  # pragma: no cover - only when the package was not built
    _cpu = None

__all__ = ["paper_pack", "paper_decode", "paper_sample_decoder", "paper_mask", "generic_pack", "generic_decode",
           "pack_bits", "unpack_bits", "counter_uniform", "packed_nbytes", "num_groups", "use_reference",
           "compiled_available", "implementation"]


def compiled_available() -> bool:
    """True when the Cython storage kernels (``npapprox._quant``) imported."""
    return _cpu is not None


def _impl(a):
    """The module that serves array ``a``: ``cpu`` (NumPy), ``gpu`` (CuPy) or ``reference``."""
    if reference_forced():
        return reference
    if on_gpu(a):
        return _gpu
    if isinstance(a, np.ndarray):
        return reference if _cpu is None else _cpu
    return reference


def implementation(a) -> str:
    """``"cpu"``, ``"gpu"`` or ``"reference"``: which implementation the dispatch picks for ``a``."""
    impl = _impl(a)
    return "cpu" if impl is _cpu else "gpu" if impl is _gpu else "reference"


def paper_pack(y, k, s, bits):
    """Paper scheme encode of float32 ``y`` ``(N, C, *spatial)`` -> ``(packed uint8, n_nonfinite)``
    (``n_nonfinite``: an integer; for CuPy arrays a 0-d device array, not read back)."""
    return _impl(y).paper_pack(y, k, s, bits)


def paper_decode(packed, shape, s, step, off, bits, relu=False):
    """Paper scheme decode -> float32 of ``shape``: ``(code - s + 0.5) * step + off`` (0 where relu and negative)."""
    return _impl(packed).paper_decode(packed, shape, s, step, off, bits, relu)


def paper_sample_decoder(packed, shape, s, step, off, bits, relu=False):
    """``paper_decode`` of one tensor's codes a range of samples at a time (a conv
    backward's chunks), its arguments checked once -> ``decode(a, b)``, float32
    ``(b - a, *shape[1:])``: the bytes of ``paper_decode(...)[a:b]``. The samples must
    start on whole bytes of ``packed`` (``prod(shape[1:]) * bits`` a multiple of 8)."""
    per = math.prod(int(d) for d in shape[1:])
    if per * int(bits) % 8:
        raise ValueError(f"samples of shape {tuple(shape[1:])} at {bits} bits do not start on whole bytes")
    impl = _impl(packed)
    if impl is _cpu:
        return _cpu.paper_sample_decoder(packed, shape, s, step, off, bits, relu)
    tail = tuple(shape[1:])
    return lambda a, b: impl.paper_decode(packed[a * per * bits // 8:b * per * bits // 8], (b - a,) + tail,
                                          s, step, off, bits, relu)


def paper_mask(packed, shape, s, bits):
    """The exact ReLU mask ``y > 0`` (``code >= s``) -> bool of ``shape``."""
    return _impl(packed).paper_mask(packed, shape, s, bits)


def generic_pack(x, bits, group, stochastic=False, seed=0):
    """Per-group min/max K-bit encode -> ``(packed, lo, scale, n_nonfinite)`` (``n_nonfinite``
    as for :func:`paper_pack`)."""
    return _impl(x).generic_pack(x, bits, group, stochastic, seed)


def generic_decode(packed, lo, scale, bits, group, shape):
    """Per-group decode -> float32 of ``shape``: ``lo + code * scale``."""
    return _impl(packed).generic_decode(packed, lo, scale, bits, group, shape)


def pack_bits(codes, bits):
    """Pack uint8 codes, ``8 // bits`` per byte, first value in the low bits."""
    return _impl(codes).pack_bits(codes, bits)


def unpack_bits(packed, n, bits):
    """The first ``n`` codes of ``packed`` (uint8)."""
    return _impl(packed).unpack_bits(packed, n, bits)


def counter_uniform(n, seed, xp=np):
    """Counter-based noise ``r[i]`` in [0, 1) for ``i < n`` (lowbias32); ``xp`` picks NumPy or CuPy."""
    if not reference_forced():
        if xp is np and _cpu is not None:
            return _cpu.counter_uniform(n, seed)
        if xp is not np:
            return _gpu.counter_uniform(n, seed)
    return reference.counter_uniform(n, seed, xp=xp)
