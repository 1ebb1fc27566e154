"""Batch normalisation over (N, H, W) per channel, NCHW."""
from __future__ import annotations

from ..backend import array_module
from ..function import ACTIVATION, PARAM, STAT, UNIT, Function
from ..kernels.bn import BNSource, as_ncm, bn_apply, bn_backward, bn_batch_stats, inv_sigma_of
from ..units import BNReLUUnit
from ..validate import as_tensor, check_float, check_rank


class BatchNorm2d(Function):
    """y = gamma * xhat + beta,  xhat = (x - mu) / sigma,  sigma = sqrt(var + eps)

    Shapes: x (N,C,H,W), gamma (C,), beta (C,) -> y (N,C,H,W).

    With batch statistics (training, or evaluation as in the paper's code)
    mu, var are the per-channel mean and biased variance over M = N*H*W values:
        gbeta  = sum gy
        ggamma = sum gy * xhat
        gx     = gamma / sigma * (gy - gbeta/M - xhat * ggamma/M)
    The last term is BN's *variance term*, the only part of the input gradient
    that an approximate xhat perturbs. With running statistics mu, var are
    constants and gx = gamma / sigma * gy.

    ``update_running`` updates running_mean / running_var in place
    (momentum as in PyTorch; the running variance uses the unbiased estimate).

    The statistics keep BN scale-invariant up to the dtype's range (x around 1e30
    in float32 gives the same y as x; ``kernels.bn.bn_batch_stats``); a variance
    beyond the dtype's range makes the running variance inf, as in PyTorch.
    An empty batch (N = 0) gives an empty output, zero gamma / beta gradients and
    leaves the running statistics alone, as in PyTorch.
    """

    SAVES = {"x": ACTIVATION, "gamma": PARAM, "mu": STAT, "inv_sigma": STAT}

    @staticmethod
    def forward(ctx, x, gamma, beta, **options):
        mu, inv_sigma = _statistics(ctx, x, **options)
        ctx.save(x=x, gamma=gamma, mu=mu, inv_sigma=inv_sigma)
        return bn_apply(as_ncm(x), mu, gamma * inv_sigma, beta)[0].reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x, gamma, mu, inv_sigma = ctx.restore("x", "gamma", "mu", "inv_sigma")
        return _backward(ctx, gy, BNSource(as_ncm(x), mu, inv_sigma), gamma, inv_sigma)


def _statistics(ctx, x, *, running_mean=None, running_var=None, use_batch_stats=True,
                update_running=True, momentum=0.1, eps=1e-5):
    """The statistics both ops normalise with -> mu (C,), inv_sigma (C,); with batch
    statistics, the running ones updated."""
    n, c, h, w = x.shape
    x3 = as_ncm(x)                                               # (N, C, HW)
    m = n * h * w
    if use_batch_stats and m == 0:                               # nothing to normalise or learn from
        xp = array_module(x)
        mu, inv_sigma = xp.zeros(c, x.dtype), xp.ones(c, x.dtype)
    elif use_batch_stats:
        mu, var, inv_sigma = bn_batch_stats(x3, eps)             # (C,), biased variance, 1/sigma
        if update_running and running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mu
            running_var *= 1 - momentum
            running_var += momentum * var * (m / max(m - 1, 1))
    else:
        inv_sigma = inv_sigma_of(running_var.astype(x.dtype), eps)   # (C,)
        mu = running_mean.astype(x.dtype)
    ctx.use_batch_stats = use_batch_stats
    return mu, inv_sigma


def _backward(ctx, gy, source, gamma, inv_sigma):
    """(gx, ggamma, gbeta) of either op: ``kernels.bn.bn_backward`` on (N, C, HW) views."""
    gx, ggamma, gbeta = bn_backward(as_ncm(gy), source, gamma, inv_sigma, batch_stats=ctx.use_batch_stats,
                                    need_gx=ctx.needs_input_grad[0])
    return (None if gx is None else gx.reshape(gy.shape)), ggamma, gbeta


class BatchNormReLU(Function):
    """One pre-activation unit: h = max(y, 0), y = gamma * xhat + beta (BN as in
    ``BatchNorm2d``, then ReLU). Backward: g = gh * [y > 0], then BN's backward
    with g. What it keeps is one stored *unit* (``units.BNReLUUnit``): under the
    paper's policy K-bit codes from which the mask (exactly), xhat (approximately)
    and h (approximately, for the next conv) are all rebuilt; exactly, the BN
    input. Shapes as ``BatchNorm2d``."""

    SAVES = {"unit": UNIT, "gamma": PARAM, "inv_sigma": STAT}

    @staticmethod
    def forward(ctx, x, gamma, beta, **options):
        mu, inv_sigma = _statistics(ctx, x, **options)
        unit = BNReLUUnit(x, None, mu, inv_sigma, gamma, beta)
        ctx.save(unit=unit, gamma=gamma, inv_sigma=inv_sigma)
        # h made only now, from what the policy asked of the unit: the fused pass's h
        # (paper codes written with it), y turned into h in place, or h alone (exact):
        # one activation-sized buffer, never two; the same bits the stored unit rebuilds
        return unit.output()

    @staticmethod
    def backward(ctx, gh):
        unit, gamma, inv_sigma = ctx.restore("unit", "gamma", "inv_sigma")
        return _backward(ctx, gh, unit.bn_source(), gamma, inv_sigma)


def batch_norm2d(x, gamma, beta, running_mean=None, running_var=None, *, use_batch_stats=True,
                 update_running=True, momentum=0.1, eps=1e-5, relu=False):
    """Functional batch norm (see ``BatchNorm2d``); ``relu=True`` applies ReLU
    after it as one unit (``BatchNormReLU``), which is what the storage policies
    compress."""
    x, gamma, beta = as_tensor(x, "x"), as_tensor(gamma, "gamma"), as_tensor(beta, "beta")
    check_rank("batch_norm2d", "x", x, 4, "(N, C, H, W)")
    check_float("batch_norm2d", x=x, gamma=gamma, beta=beta)
    c = x.shape[1]
    for name, t in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"batch_norm2d: {name} has shape {tuple(t.shape)}, expected ({c},) "
                             f"for an input with {c} channels")
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("batch_norm2d: evaluation with running statistics needs running_mean and running_var")
    if use_batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:   # empty is fine (empty out)
        raise ValueError(f"batch_norm2d: batch statistics need more than one value per channel, "
                         f"got input shape {tuple(x.shape)}")
    op = BatchNormReLU if relu else BatchNorm2d
    return op.apply(x, gamma, beta, running_mean=running_mean, running_var=running_var,
                             use_batch_stats=use_batch_stats, update_running=update_running,
                             momentum=momentum, eps=eps)
