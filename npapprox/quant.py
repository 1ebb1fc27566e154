"""The quantizers as math: per-channel parameters of the paper's BN window and
the per-group parameters of the generic quantizer. The kernels
(``npapprox.kernels``) apply them; this module decides them.

Paper scheme (docs/method.md section 4), K bits, NB = 2^K bins of width D = 2W/NB in
units of the BN input's standard deviation (the window is +-W, W = 3 in the paper
and by default; ``Paper(K, window=W)`` changes it). For one channel with BN output
``y = gamma * xhat + beta`` we quantize ``q = y / |gamma|`` (so ``y > 0 <=> q > 0``
whatever the sign of gamma)::

    b = beta / |gamma|                       (0 when beta == 0)
    s = clip(NB/2 - floor(b / D), 1, NB - 1)  the code of the first positive bin
    code = s - 1 + ceil(q / D), clipped to [0, NB-1], then forced to the side of y > 0
    q_hat = (code - s + 1/2) * D              the bin centre

so the window is ``[b - W, b + W]`` (up to one bin), ReLU's threshold ``q = 0``
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
W, the window cannot follow beta/gamma: values saturate and the rebuilt xhat is
off by up to about |beta/gamma| - W (a channel with small gamma and large beta).
The mask stays exact; the gamma gradient and BN's variance term suffer. Even
for beta = 0 a fixed window clips the tails (0.27% of Gaussian values at W = 3),
and at 8 bits that clipping, not the rounding, dominates the error.

Fitted window (``fit_params``, the ``FitWindow`` policy): the same codes and
kernels, but per channel the bin width D and ``s`` are fitted to the batch's own
range of y (min / max per channel), cut per K (``FIT_WINDOW``; no cut at 8 bits,
where nothing then clips), so the window follows beta/gamma wherever it goes; D
is stored as one float32 per channel.
"""
from __future__ import annotations

import numpy as np

from .backend import array_module, to_device

SUPPORTED_BITS = (1, 2, 4, 8)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


DEFAULT_WINDOW = 3.0
#: FitWindow's cut per K: the window holds at most (b - below, b + above), in
#: standard deviations (inf: the batch's whole range). Measured (docs/study.md):
#: at K <= 4 rounding dominates and a cut beats the whole range, and the negative
#: side (it only feeds xhat; h and the mask live on the positive side) can be cut
#: much shorter; at 8 bits clipping dominates and nothing is cut.
FIT_WINDOW = {1: (1.0, 2.5), 2: (1.0, 2.5), 4: (1.5, 3.5), 8: (float("inf"), float("inf"))}


def _upload(params: dict, xp) -> dict:
    """The (C,) arrays of ``params`` (4-byte dtypes) on the device, in one transfer."""
    buf = xp.asarray(np.concatenate([np.ascontiguousarray(v).view(np.uint8) for v in params.values()]))
    out, at = {}, 0
    for key, v in params.items():
        out[key] = buf[at:at + v.nbytes].view(v.dtype)
        at += v.nbytes
    return out


def _on_host(params, xp, arrays, *args) -> dict:
    """``params(*arrays, *args)`` computed on the host for device arrays, uploaded in
    one transfer: CuPy's float64 -> float32 casts flush a subnormal ``k`` or
    ``h_step`` (extreme gamma) to zero, and ``s`` is valid by construction here,
    so the kernels need not read it back to check it."""
    host = to_device(xp.stack([xp.asarray(a, np.float64) for a in arrays]), "cpu")
    return _upload(params(*host, *args), xp)


def check_fit_window(window) -> tuple:
    """A cut ``(below, above)`` from one number (both sides) or a pair; each > 0, inf allowed."""
    pair = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    if len(pair) != 2:
        raise ValueError(f"window must be a number or a pair (below, above), got {window!r}")
    return tuple(w if w == np.inf else check_window(w) for w in pair)


def check_window(window) -> float:
    """The half-width W of the paper's window, in batch standard deviations: finite, > 0."""
    if isinstance(window, bool) or not isinstance(window, (int, float, np.integer, np.floating)) \
            or not np.isfinite(window) or window <= 0:
        raise ValueError(f"window must be a positive number of standard deviations, got {window!r}")
    return float(window)


def bin_width(bits: int, window: float = DEFAULT_WINDOW) -> float:
    """D = 2W / 2^K: the window is +-W standard deviations (W = 3: the paper's)."""
    return 2.0 * window / (1 << bits)


def beta_over_gamma(gamma, beta):
    """b = beta / |gamma| per channel, float64 (0 where beta == 0, +-inf where gamma == 0)."""
    xp = array_module(gamma)
    g, b = gamma.astype(np.float64), beta.astype(np.float64)
    ag = xp.abs(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = xp.where(ag == 0, xp.sign(b) * np.inf, b / xp.where(ag == 0, 1.0, ag))
    return xp.where(b == 0, 0.0, rel)


def paper_params(gamma, beta, bits: int, window: float = DEFAULT_WINDOW) -> dict:
    """Per-channel parameters of the BN window (+-``window`` standard deviations) for one unit.

    Returns float32/int32 arrays of shape (C,): ``k`` (encode scale 1/(D|gamma|),
    0 where gamma == 0), ``s`` (first positive code), and the decode affine maps
    ``h_step, h_off`` (for relu(y)) and ``x_step, x_off`` (for xhat). Computed on
    the host, also for a model on the GPU (``_on_host``)."""
    nb, d = 1 << bits, bin_width(bits, check_window(window))
    xp = array_module(gamma)
    if xp is not np:
        return _on_host(paper_params, xp, (gamma, beta), bits, window)
    rel = beta_over_gamma(gamma, beta)
    s = xp.clip(nb / 2 - xp.floor(xp.clip(rel / d, -2.0 * nb, 2.0 * nb)), 1, nb - 1).astype(np.int32)
    return _window_params(gamma, beta, s, d)


def fit_params(gamma, beta, ymin, ymax, bits: int, window=(float("inf"), float("inf"))) -> dict:
    """Per-channel parameters of the *fitted* window (``policy.FitWindow``): the
    narrowest window of 2^K bins with ReLU's threshold on a bin edge that holds
    the batch's range ``[ymin, ymax]`` (per channel, of y), cut to at most
    ``[b - below, b + above]`` (``window = (below, above)``, ``b = beta/|gamma|``, the
    mean of q; inf: no cut, nothing clips).

    With ``q = y/|gamma|``, ``qlo = max(ymin/|gamma|, b - below)``, ``qhi = min(ymax/|gamma|, b + above)``,
    ``lo = max(-qlo, 0)``, ``hi = max(qhi, 0)``::

        D(s) = max(lo / s, hi / (NB - s))        s negative bins, NB - s positive ones
        s    = the smallest argmin of D(s) over s in [1, NB - 1];  D = D(s) (1 + 2^-16)

    (the margin keeps the extremes strictly inside after float32 rounding). A
    channel with gamma == 0, an empty or all-zero range, or a non-finite one
    falls back to the paper's window. Same output as ``paper_params`` plus ``d``
    (float32 (C,), the bin width: per-channel metadata of the stored form).
    Computed on the host, also for a model on the GPU (``_on_host``)."""
    xp = array_module(gamma)
    if xp is not np:
        return _on_host(fit_params, xp, (gamma, beta, ymin, ymax), bits, window)
    nb = 1 << bits
    ag = xp.abs(gamma.astype(np.float64))
    safe = xp.where(ag == 0, 1.0, ag)
    with np.errstate(all="ignore"):
        qlo, qhi = ymin.astype(np.float64) / safe, ymax.astype(np.float64) / safe
        below, above = check_fit_window(window)
        b = beta_over_gamma(gamma, beta)
        qlo, qhi = xp.maximum(qlo, b - below), xp.minimum(qhi, b + above)
        lo = xp.maximum(-qlo, 0.0)                                          # (C,)
        hi = xp.maximum(qhi, 0.0)
        n_neg = xp.arange(1, nb, dtype=np.float64)[:, None]                 # (NB-1, 1): candidate s
        dd = xp.maximum(lo[None, :] / n_neg, hi[None, :] / (nb - n_neg))    # (NB-1, C)
    best = xp.argmin(dd, axis=0)                                            # first minimum
    d = dd[best, xp.arange(dd.shape[1])] * (1.0 + 2.0 ** -16)
    fallback = paper_params(gamma, beta, bits)
    with np.errstate(over="ignore"):   # d beyond float32 (|beta/gamma| ~ 1e39 at a denormal gamma): fall back
        ok = (ag > 0) & xp.isfinite(d.astype(np.float32)) & (d > 0)
    s = xp.where(ok, best + 1, fallback["s"]).astype(np.int32)
    d = xp.where(ok, d, bin_width(bits))
    params = _window_params(gamma, beta, s, d)
    params["d"] = d.astype(np.float32)
    return params


def _window_params(gamma, beta, s, d) -> dict:
    """k, s and the decode maps for first-positive codes ``s`` and bin widths ``d`` (scalar or (C,))."""
    xp = array_module(gamma)
    g = gamma.astype(np.float64)
    b = beta.astype(np.float64)
    ag = xp.abs(g)
    zero = ag == 0
    safe = xp.where(zero, 1.0, ag)
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
