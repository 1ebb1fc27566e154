"""Directional gradient check in float64 (the independent oracle for every backward).

For ``y = f(X_1, ..., X_m)`` pick a random cotangent ``R`` (shape of ``y``) and a random
direction ``V_i`` for each differentiable input. With ``L(X) = sum(f(X) * R)``:

    analytic  = sum_i <dL/dX_i, V_i>                      (npapprox backward)
    numeric   = (L(X + eps V) - L(X - eps V)) / (2 eps)   (central difference)

In float64 with eps = 1e-6 the central difference is accurate to ~1e-10 relative
(truncation O(eps^2), rounding O(1e-16 / eps)), so we require

    |analytic - numeric| <= rtol * scale,   scale = sum_i sum |dL/dX_i * V_i|

with rtol = 1e-6: ``scale`` is what the inner product would be without cancellation, so a
wrong factor, sign, index or missing term anywhere in a gradient shows up far above it
(``test_gradcheck_catches_*`` prove the check can fail). One floor is added for the
rounding noise of the difference quotient, ~2^-52 / eps times the size of the values the
op computes with: 1e-9 * (sum|f(X) R| + sum|R| max_i max|X_i|). It only matters where
the gradient is tiny next to those values (GELU or cross-entropy deep in a tail, where
1 + erf(x) or a log-sum-exp of large logits cancels); elsewhere it is >1000x below
rtol * scale.
"""
from __future__ import annotations

import numpy as np

from npapprox import Tensor, no_grad
from npapprox.ops import mul, sum_all


def directional_check(f, inputs, diff, seed=0, eps=1e-6, rtol=1e-6):
    """Check ``f``'s backward. ``inputs``: float64 arrays (or anything else passed as is,
    e.g. integer labels); ``diff``: indices of the inputs to differentiate.
    Returns (analytic, numeric, scale)."""
    # a stream of its own: R and V must not repeat the draws that made the inputs
    rng = np.random.default_rng((seed, 0x6AD))
    diff = tuple(diff)
    for i in diff:
        assert inputs[i].dtype == np.float64, "gradcheck runs in float64"

    def tensors(arrays, grad):
        return [Tensor(a, requires_grad=grad and i in diff) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                else a for i, a in enumerate(arrays)]

    xs = tensors([a.copy() if isinstance(a, np.ndarray) else a for a in inputs], True)
    y = f(*xs)
    assert y.dtype == np.float64, f"op output dtype {y.dtype}, expected float64"
    r = rng.standard_normal(y.shape)
    loss = sum_all(mul(y, Tensor(r)))
    loss.backward()
    v = {i: rng.standard_normal(np.shape(inputs[i])) for i in diff}
    for i in diff:
        g = xs[i].grad
        assert g is not None, f"input {i} got no gradient"
        assert g.shape == inputs[i].shape, f"input {i}: gradient shape {g.shape} != {inputs[i].shape}"
        assert g.dtype == np.float64, f"input {i}: gradient dtype {g.dtype}"
    analytic = float(sum(np.sum(xs[i].grad * v[i]) for i in diff))
    scale = float(sum(np.sum(np.abs(xs[i].grad * v[i])) for i in diff))

    def L(sign):
        moved = [a + sign * eps * v[i] if i in v else a for i, a in enumerate(inputs)]
        with no_grad():
            out = f(*tensors(moved, False))
        return float(np.sum(out.data * r))

    numeric = (L(+1) - L(-1)) / (2 * eps)
    size = max(float(np.abs(inputs[i]).max()) if inputs[i].size else 0.0 for i in diff)
    noise = 1e-9 * (float(np.sum(np.abs(y.data * r))) + float(np.sum(np.abs(r))) * size)
    err = abs(analytic - numeric)
    assert err <= rtol * scale + noise, (
        f"directional derivative mismatch: analytic {analytic!r}, numeric {numeric!r}, "
        f"|diff| {err:.3e} > {rtol:g} * scale {scale:.3e} + noise {noise:.1e}")
    return analytic, numeric, scale


def away_from_zero(rng, shape, margin=0.1):
    """Values with |x| >= margin (so a kink at 0 is never crossed by eps * V)."""
    u = rng.standard_normal(shape)
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0) * (margin + np.abs(u))


def distinct_values(rng, shape, step=0.1):
    """A random permutation of 0, step, 2 step, ...: no ties anywhere (max-pool windows)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) - n / 2) * step
