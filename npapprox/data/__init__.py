"""Data sets. The embedded default is scikit-learn's digits (real 8x8 scans, offline);
CIFAR-10/100 load from the standard python archives at a given path (never downloaded).

* :func:`load_dataset` -> :class:`Dataset` (float32 NCHW images, int64 labels), normalised per
  image (the paper) or per channel; :mod:`.cifar`, :mod:`.digits` hold the loaders.
* :class:`Augment`: pad-and-random-crop and horizontal flip, vectorised, driven by a Generator.
* :func:`batches` / :func:`batch_stream`: shuffled, augmented mini-batches that are a pure function
  of (seed, epoch, batch), so a run resumes mid-epoch without saving random state (see
  :mod:`.batching`).
"""
from .augment import Augment, crop, flip, random_crop, random_flip
from .batching import Batch, augment_rng, batch_stream, batches, batches_per_epoch, epoch_permutation
from .cifar import CIFAR10, CIFAR100, CifarData, file_md5, load_cifar10, load_cifar100
from .dataset import (
    DATASETS,
    NORMALIZATIONS,
    Dataset,
    channel_normalize,
    channel_stats,
    image_mean_normalize,
    load_dataset,
    normalize_splits,
)
from .digits import RESIZE_MODES, digits_split, iterate_minibatches, load_digits, resize_images

__all__ = ["CIFAR10", "CIFAR100", "DATASETS", "NORMALIZATIONS", "RESIZE_MODES", "Augment", "Batch",
           "CifarData", "Dataset", "augment_rng", "batch_stream", "batches", "batches_per_epoch",
           "channel_normalize", "channel_stats", "crop", "digits_split", "epoch_permutation",
           "file_md5", "flip", "image_mean_normalize", "iterate_minibatches", "load_cifar10",
           "load_cifar100", "load_dataset", "load_digits", "normalize_splits", "random_crop",
           "random_flip", "resize_images"]
