"""scikit-learn's digits: 1797 real 8x8 grey-level scans of handwritten digits,
shipped inside scikit-learn, so it loads without any download.

Also :func:`resize_images`, which brings 8x8 images to a size the models accept:

* ``"pad"`` (the default of :func:`npapprox.data.load_dataset`): the image is centred on a zero
  canvas (an odd margin puts the extra row/column at the bottom/right). The digits' background is
  0, so this only widens the background, keeps every original pixel value, and leaves a margin
  (4 pixels for 8 -> 16) that pad-4 random crops never push the digit out of.
* ``"nearest"``: output pixel ``o`` takes input pixel ``floor((o + 0.5) * in / out)`` (for an
  integer factor, plain pixel replication).
* ``"bilinear"``: half-pixel centres, ``src = (o + 0.5) * in / out - 0.5`` clamped to the image,
  separable linear interpolation (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``,
  no antialiasing).

Resizing happens on the [0, 1] pixels, before normalisation.
"""
from __future__ import annotations

import numpy as np

__all__ = ["RESIZE_MODES", "digits_split", "iterate_minibatches", "load_digits", "resize_images"]

RESIZE_MODES = ("pad", "nearest", "bilinear")


def digits_split(test_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` with images (N, 1, 8, 8) float32 in [0, 1]
    (un-normalised), labels int64; the split is a seeded permutation, stratified by class."""
    from sklearn.datasets import load_digits as _sk_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    d = _sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]                  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """Returns ``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) float32
    in [0, 1] minus each image's mean (the paper's normalisation), labels int64.
    The split is a seeded permutation, stratified by class."""
    x_train, y_train, x_test, y_test = digits_split(test_fraction, seed)
    x_train -= x_train.mean(axis=(1, 2, 3), keepdims=True)
    x_test -= x_test.mean(axis=(1, 2, 3), keepdims=True)
    return x_train, y_train, x_test, y_test


def iterate_minibatches(x, y, batch_size: int, rng=None):
    """Yield (x_batch, y_batch); shuffled when ``rng`` is given. The last
    partial batch is kept. (See :func:`npapprox.data.batches` for augmentation and
    resumable, seed-derived shuffling.)"""
    order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


# --------------------------------------------------------------------------- resizing

def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _bilinear_weights(n_in: int, n_out: int):
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_images(x: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Square NCHW images ``x`` to ``size x size`` by ``mode`` (see the module docstring).
    ``"pad"`` needs ``size >= H``; the others work both ways. Returns a new float32 array."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {x.shape}")
    size = int(size)
    n, c, h, w = x.shape
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if (h, w) == (size, size):
        return x.astype(np.float32, copy=True)
    if mode == "pad":
        if size < h or size < w:
            raise ValueError(f"cannot pad {h}x{w} images to the smaller size {size}; "
                             f"use resize='nearest' or 'bilinear'")
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, c, size, size), np.float32)
        out[:, :, top:top + h, left:left + w] = x
        return out
    if mode == "nearest":
        return np.ascontiguousarray(x[:, :, _nearest_index(h, size)][:, :, :, _nearest_index(w, size)],
                                    dtype=np.float32)
    x = x.astype(np.float32, copy=False)
    i0, i1, wt = _bilinear_weights(h, size)
    rows = x[:, :, i0, :] * (1 - wt)[:, None] + x[:, :, i1, :] * wt[:, None]
    j0, j1, wt = _bilinear_weights(w, size)
    return np.ascontiguousarray(rows[..., j0] * (1 - wt) + rows[..., j1] * wt, dtype=np.float32)
