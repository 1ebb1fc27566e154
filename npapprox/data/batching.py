"""Mini-batches: shuffling and augmentation that are deterministic, and resumable mid-epoch without
saving any random state.

Seed scheme (``rng`` an int seed ``s``, the trainer's choice)
  * epoch ``e`` visits the examples in the order ``np.random.default_rng([s, 1, e]).permutation(N)``;
  * batch ``i`` of epoch ``e`` is augmented with ``np.random.default_rng([s, 2, e, i])``.

Every batch is thus a pure function of ``(s, e, i)``: resuming at iteration ``k`` means starting
epoch ``k // batches_per_epoch`` at batch ``k % batches_per_epoch`` (``start=``), and reproduces the
uninterrupted run exactly. The tags 1 and 2 keep the two streams apart: NumPy's ``SeedSequence``
pads the entropy with zeros, so ``default_rng([s, e])`` and ``default_rng([s, e, 0])`` would be the
*same* stream (and ``default_rng(s)``, a typical model-initialisation generator, equals
``default_rng([s, 0])``).

With a ``numpy.random.Generator`` instead, the permutation and then each batch's augmentation are
drawn from it in sequence: deterministic given its state, but not resumable mid-epoch.
"""
from __future__ import annotations

import operator
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .augment import Augment

__all__ = ["Batch", "augment_rng", "batch_stream", "batches", "batches_per_epoch", "epoch_permutation"]

PERMUTATION_TAG = 1
AUGMENT_TAG = 2


def _seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    try:
        s = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    if s < 0:
        raise ValueError(f"seed must be non-negative, got {s}")
    return s


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples."""
    return np.random.default_rng([_seed(seed), PERMUTATION_TAG, _seed(epoch)]).permutation(n)


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that augments batch ``index`` of epoch ``epoch``."""
    return np.random.default_rng([_seed(seed), AUGMENT_TAG, _seed(epoch), _seed(index)])


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng=None,
            augment: Callable | bool | None = None, drop_last: bool = False, *,
            seed: int | None = None, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(x_batch, y_batch)``.

    ``rng``: ``None`` (data order, no augmentation allowed), an int seed (the resumable scheme of
    the module docstring, for epoch ``epoch`` starting at batch ``start``), or a
    ``numpy.random.Generator`` (drawn from in sequence); ``seed=`` is the same as an int ``rng``.
    ``augment(x_batch, generator)`` returns the augmented batch, e.g. :class:`npapprox.data.Augment`;
    ``True`` means ``Augment.for_size(image side)`` (pad 4 and flip at 32x32), ``False``/``None`` none.
    ``drop_last`` drops a final partial batch. Batches are new arrays (the inputs are never modified).
    """
    if seed is not None:
        if rng is not None:
            raise ValueError("give rng or seed, not both")
        rng = _seed(seed)
    if augment is True:
        augment = Augment.for_size(np.shape(x)[-1])
    elif augment is False:
        augment = None
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    total = batches_per_epoch(n, batch_size, drop_last)
    start = operator.index(start)
    if not 0 <= start <= total:
        raise ValueError(f"start must lie in [0, {total}] (batches in this epoch), got {start}")
    if rng is None:
        if augment is not None:
            raise ValueError("augmentation needs rng (a seed or a numpy Generator)")
        order, seed = None, None
    elif isinstance(rng, np.random.Generator):
        if start or epoch:
            raise ValueError("start/epoch need an int seed as rng (a Generator's state cannot be "
                             "derived from the position); see npapprox.data.batching")
        order, seed = rng.permutation(n), None
    else:
        seed = _seed(rng)
        order = epoch_permutation(seed, epoch, n)
    for i in range(start, total):
        idx = slice(i * batch_size, (i + 1) * batch_size)
        idx = idx if order is None else order[idx]
        xb, yb = x[idx], y[idx]
        if order is None:
            xb, yb = xb.copy(), yb.copy()
        if augment is not None:
            xb = augment(xb, rng if seed is None else augment_rng(seed, epoch, i))
        yield xb, yb


class Batch(NamedTuple):
    epoch: int
    index: int          # within the epoch
    iteration: int      # since the start of training
    x: np.ndarray
    y: np.ndarray


def batch_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 augment: Callable | bool | None = None, drop_last: bool = True, *,
                 start_iteration: int = 0) -> Iterator[Batch]:
    """Endless :class:`Batch` stream over epochs 0, 1, 2, ... with the seed scheme; starting at
    ``start_iteration`` yields exactly the tail of the stream started at 0."""
    per_epoch = batches_per_epoch(len(x), batch_size, drop_last)
    if per_epoch == 0:
        raise ValueError(f"{len(x)} examples make no batch of {batch_size} (drop_last={drop_last})")
    k = operator.index(start_iteration)
    if k < 0:
        raise ValueError(f"start_iteration must be non-negative, got {k}")
    epoch, index = divmod(k, per_epoch)
    while True:
        for xb, yb in batches(x, y, batch_size, seed, augment, drop_last, epoch=epoch, start=index):
            yield Batch(epoch, index, k, xb, yb)
            index += 1
            k += 1
        epoch, index = epoch + 1, 0
