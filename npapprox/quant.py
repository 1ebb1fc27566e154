"""The quantizers as math: per-channel parameters of the paper's BN window and
the per-group parameters of the generic quantizer. The kernels
(``npapprox.kernels``) apply them; this module decides them.

Paper scheme (METHOD.md section 4), K bits, NB = 2^K bins of width D = 6/NB in
units of the BN input's standard deviation. For one channel with BN output
``y = gamma * xhat + beta`` we quantize ``q = y / |gamma|`` (so ``y > 0 <=> q > 0``
whatever the sign of gamma)::

    b = beta / |gamma|                       (0 when beta == 0)
    s = clip(NB/2 - floor(b / D), 1, NB - 1)  the code of the first positive bin
    code = s - 1 + ceil(q / D), clipped to [0, NB-1], then forced to the side of y > 0
    q_hat = (code - s + 1/2) * D              the bin centre

so the window is ``[b - 3, b + 3]`` (up to one bin), ReLU's threshold ``q = 0``
lies on a bin edge, and the mask ``code >= s`` equals ``y > 0`` exactly (the
kernel forces it; this is where npapprox departs from the released code, whose
``s`` can exceed NB - 1 and whose threshold has a 1e-6 offset).

Rebuilt from the codes, per channel:

    h    = relu(y)  ~ |gamma| * q_hat * [code >= s]        step D*|gamma|, off 0
    xhat = (y - beta) / gamma ~ sign(gamma) * q_hat - beta/gamma
                                                          step sign(gamma)*D, off -beta/gamma

A channel with gamma == 0 has ``y = beta`` whatever x: its codes carry only the
mask (exact), and its ``xhat`` is rebuilt as 0.

Limitation of the scheme (the paper's, kept): the window must keep q = 0 on a
bin edge, so ``s`` is clipped to [1, NB-1] and, when |beta/gamma| exceeds about
3, the window cannot follow beta/gamma: values saturate and the rebuilt xhat is
off by up to about |beta/gamma| - 3 (a channel with small gamma and large beta).
The mask stays exact; the gamma gradient and BN's variance term suffer.
"""
from __future__ import annotations

import numpy as np

from .backend import array_module, to_device

SUPPORTED_BITS = (1, 2, 4, 8)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def bin_width(bits: int) -> float:
    """D = 6 / 2^K: the window is +-3 standard deviations."""
    return 6.0 / (1 << bits)


def _upload(params: dict, xp) -> dict:
    """The (C,) arrays of ``params`` (4-byte dtypes) on the device, in one transfer."""
    buf = xp.asarray(np.concatenate([np.ascontiguousarray(v).view(np.uint8) for v in params.values()]))
    out, at = {}, 0
    for key, v in params.items():
        out[key] = buf[at:at + v.nbytes].view(v.dtype)
        at += v.nbytes
    return out


def paper_params(gamma, beta, bits: int) -> dict:
    """Per-channel parameters of the BN window for one unit.

    Returns float32/int32 arrays of shape (C,): ``k`` (encode scale 1/(D|gamma|),
    0 where gamma == 0), ``s`` (first positive code), and the decode affine maps
    ``h_step, h_off`` (for relu(y)) and ``x_step, x_off`` (for xhat).

    Computed on the host, also for a model on the GPU (one read-back of gamma and
    beta, one upload of the results): CuPy's float64 -> float32 casts flush a
    subnormal ``k`` or ``h_step`` (extreme gamma) to zero, and ``s`` is valid by
    construction here, so the kernels need not read it back to check it."""
    xp = array_module(gamma)
    if xp is not np:
        gb = to_device(xp.stack([xp.asarray(gamma, np.float64), xp.asarray(beta, np.float64)]), "cpu")
        return _upload(paper_params(gb[0], gb[1], bits), xp)
    nb, d = 1 << bits, bin_width(bits)
    g = gamma.astype(np.float64)
    b = beta.astype(np.float64)
    ag = xp.abs(g)
    zero = ag == 0
    safe = xp.where(zero, 1.0, ag)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = xp.where(zero, xp.sign(b) * np.inf, b / safe)        # beta / |gamma|
    rel = xp.where(b == 0, 0.0, rel)
    s = xp.clip(nb / 2 - xp.floor(xp.clip(rel / d, -2.0 * nb, 2.0 * nb)), 1, nb - 1).astype(np.int32)
    sign = xp.where(g < 0, -1.0, 1.0)
    with np.errstate(over="ignore"):  # denormal or huge gamma: k or step is inf, codes saturate, mask stays exact
        k = xp.where(zero, 0.0, 1.0 / (d * safe)).astype(np.float32)
        h_step = (d * ag).astype(np.float32)
        x_off = xp.where(zero, 0.0, -b / xp.where(zero, 1.0, g)).astype(np.float32)
    return {
        "k": k,
        "s": s,
        "h_step": h_step,
        "h_off": xp.zeros_like(k),
        "x_step": xp.where(zero, 0.0, sign * d).astype(np.float32),
        "x_off": x_off,
    }
