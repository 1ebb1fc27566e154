"""Augmentation for NCHW batches: pad-and-random-crop and horizontal flip (the paper: pad 4 on
32x32, random 32x32 crop, flip with probability 1/2), vectorised over the batch.

The padding is **zeros applied to the normalised images**: with the paper's per-image-mean
normalisation a padded pixel equals the image's mean, with per-channel normalisation the data
set's mean colour (the usual CIFAR practice).

Randomness comes only from the ``numpy.random.Generator`` passed in, in a fixed order: for
:class:`Augment`, first the crop offsets ``rng.integers(0, 2 * pad + 1, size=(N, 2))`` (row, column),
then the flips ``rng.random(N) < p_flip``. The same generator state therefore gives the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augment", "crop", "flip", "random_crop", "random_flip"]


def crop(x: np.ndarray, pad: int, offsets: np.ndarray) -> np.ndarray:
    """Zero-pad each image of ``x`` (N, C, H, W) by ``pad`` on every side and cut out the H x W
    window whose top-left corner is ``offsets[n] = (row, col)`` in the padded image (``(pad, pad)``
    is the identity). Returns a new array."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    if pad == 0:
        return x.copy()
    if offsets.size and (offsets.min() < 0 or offsets.max() > 2 * pad):
        raise ValueError(f"crop offsets must lie in [0, {2 * pad}]")
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = offsets[:, 0, None] + np.arange(h)                       # (N, H)
    cols = offsets[:, 1, None] + np.arange(w)                       # (N, W)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def flip(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror left-right the images where ``mask`` is true. Returns a new array."""
    x = np.asarray(x)
    mask = np.asarray(mask, dtype=bool).reshape(len(x), 1, 1, 1)
    return np.where(mask, x[..., ::-1], x)


def random_crop(x: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`crop` with offsets ``rng.integers(0, 2 * pad + 1, size=(N, 2))``."""
    return crop(x, pad, rng.integers(0, 2 * pad + 1, size=(len(x), 2)))


def random_flip(x: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """:func:`flip` with mask ``rng.random(N) < p``."""
    return flip(x, rng.random(len(x)) < p)


@dataclass(frozen=True)
class Augment:
    """``Augment(pad=4, flip=True)(x, rng)``: random crop (when ``pad > 0``) then random flip (when
    ``flip``). Use :meth:`for_size` for the paper's ratio at other sizes."""
    pad: int = 4
    flip: bool = True
    p_flip: float = 0.5

    def __post_init__(self):
        if int(self.pad) != self.pad or self.pad < 0:
            raise ValueError(f"pad must be a non-negative integer, got {self.pad!r}")
        if not 0 <= self.p_flip <= 1:
            raise ValueError(f"p_flip must lie in [0, 1], got {self.p_flip!r}")

    @classmethod
    def for_size(cls, image_size: int, flip: bool = True) -> Augment:
        """Pad ``image_size / 8`` (4 for 32x32, as in the paper; 2 for 16x16; at least 1)."""
        return cls(pad=max(1, round(image_size / 8)), flip=flip)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.pad:
            x = random_crop(x, int(self.pad), rng)
        if self.flip:
            x = random_flip(x, rng, self.p_flip)
        return x
