"""scikit-learn's digits: 1797 real 8x8 grey-level scans of handwritten digits,
shipped inside scikit-learn, so it loads without any download."""
from __future__ import annotations

import numpy as np


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """Returns ``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) float32
    in [0, 1] minus each image's mean (the paper's normalisation), labels int64.
    The split is a seeded permutation, stratified by class."""
    from sklearn.datasets import load_digits as _sk_digits  # noqa: PLC0415 (heavy import)

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    d = _sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]                  # (1797, 1, 8, 8)
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


def iterate_minibatches(x, y, batch_size: int, rng=None):
    """Yield (x_batch, y_batch); shuffled when ``rng`` is given. The last
    partial batch is kept."""
    order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
