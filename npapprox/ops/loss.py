"""Softmax cross-entropy, numerically stable, mean over the batch."""
from __future__ import annotations

import numpy as np

from ..backend import array_module, on_gpu, to_device
from ..function import INDEX, STAT, Function
from ..validate import as_tensor, check_float, check_rank


class SoftmaxCrossEntropy(Function):
    """loss = mean_n [ logsumexp(z_n) - z_n[t_n] ],
    logsumexp(z) = m + log sum_k exp(z_k - m),  m = max_k z_k  (no overflow);
    gz = gy * (softmax(z) - onehot(t)) / N.
    Shapes: z (N, K) float, t (N,) int -> scalar. Saves the probabilities and labels."""

    SAVES = {"p": STAT, "t": INDEX}

    @staticmethod
    def forward(ctx, z, t):
        xp = array_module(z)
        n = z.shape[0]
        shifted = z - z.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=1))              # (N,)
        loss = (lse - shifted[xp.arange(n), t]).mean()
        ctx.save(p=xp.exp(shifted - lse[:, None]), t=t)
        return xp.asarray(loss, dtype=z.dtype)

    @staticmethod
    def backward(ctx, gy):
        p, t = ctx.restore("p", "t")
        n = p.shape[0]
        g = p.copy()
        g[array_module(p).arange(n), t] -= 1
        return g * (gy / n), None


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels."""
    z = as_tensor(logits, "logits")
    check_rank("cross_entropy", "logits", z, 2, "(N, classes)")
    check_float("cross_entropy", logits=z)
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"cross_entropy: needs at least one sample and one class, got logits {tuple(z.shape)}")
    t = labels.data if hasattr(labels, "requires_grad") else labels
    xp = array_module(z.data)
    t = t if on_gpu(t) else np.asarray(t)       # host labels are checked on the host, then moved
    if t.ndim != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: labels must have shape ({z.shape[0]},), got {tuple(t.shape)}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integers, got dtype {t.dtype}")
    if t.size:
        lo, hi = (int(v) for v in to_device(array_module(t).stack([t.min(), t.max()]), "cpu"))  # one read-back
        if lo < 0 or hi >= z.shape[1]:
            raise ValueError(f"cross_entropy: labels must lie in [0, {z.shape[1]}), got range [{lo}, {hi}]")
    return SoftmaxCrossEntropy.apply(z, xp.asarray(t).astype(xp.int64, copy=False))
