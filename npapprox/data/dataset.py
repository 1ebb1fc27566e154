"""One entry point for every data set: :func:`load_dataset` returns a :class:`Dataset`.

Normalisation (``normalize=``)
  * ``"image-mean"`` (default, the paper, docs/method.md section 6): pixels scaled to [0, 1], then each
    image minus its own mean over all its pixels and channels.
  * ``"channel"``: pixels in [0, 1], then per channel ``(x - mean_c) / std_c`` with mean and
    (population) standard deviation over the *training* split's images and pixels, applied to both
    splits (a constant channel keeps std 1). The statistics are kept in ``Dataset.norm_stats``.
  * ``"none"``: pixels in [0, 1].

Images are resized (``size=``) before normalisation; see :func:`npapprox.data.resize_images`.
A size whose images would not fit in the memory available is refused before anything is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import limits
from .augment import Augment
from .cifar import CIFAR10, CIFAR100, load_cifar10, load_cifar100
from .digits import RESIZE_MODES, digits_split, resize_images

__all__ = ["DATASETS", "NATIVE", "NORMALIZATIONS", "Dataset", "channel_normalize", "channel_stats",
           "image_mean_normalize", "load_dataset", "normalize_splits"]

DATASETS = ("digits", "cifar10", "cifar100")
NORMALIZATIONS = ("image-mean", "channel", "none")
NATIVE = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}   # channels, side, classes
_CHUNK = 4096                       # images per step when converting (bounds temporaries)


@dataclass(repr=False)
class Dataset:
    """Images float32 NCHW, labels int64."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple = ()
    normalize: str = "image-mean"
    norm_stats: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def default_augment(self) -> Augment:
        """The paper's augmentation scaled to this size (pad 4 at 32x32)."""
        return Augment.for_size(self.image_size)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}: {self.n_train} train / {self.n_test} test, "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
                f"normalize={self.normalize!r})")


# --------------------------------------------------------------------------- normalisation

def _to_unit(x: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: uint8 is divided by 255, floats are taken as already in [0, 1]."""
    if x.dtype == np.uint8:
        out = np.empty(x.shape, np.float32)
        for s in range(0, len(x), _CHUNK):
            np.multiply(x[s:s + _CHUNK], np.float32(1 / 255), out=out[s:s + _CHUNK], dtype=np.float32)
        return out
    return np.array(x, dtype=np.float32)


def image_mean_normalize(x: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] (uint8 / 255, floats as given) minus each image's mean over all its pixels
    and channels. Returns a new float32 array."""
    x = _to_unit(x)
    for s in range(0, len(x), _CHUNK):
        b = x[s:s + _CHUNK]
        b -= b.mean(axis=(1, 2, 3), keepdims=True)
    return x


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (float64) of ``x`` (N, C, H, W), pixels in [0, 1]
    (uint8 / 255), accumulated in float64 over chunks."""
    n, c = x.shape[:2]
    count = n * x.shape[2] * x.shape[3]
    if count == 0:
        raise ValueError("cannot compute channel statistics of an empty split")
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    total = np.zeros(c)
    for s in range(0, n, _CHUNK):
        total += x[s:s + _CHUNK].sum(axis=(0, 2, 3), dtype=np.float64)
    mean = total * scale / count
    sq = np.zeros(c)
    for s in range(0, n, _CHUNK):
        d = x[s:s + _CHUNK].astype(np.float64) * scale - mean[:, None, None]
        sq += np.einsum("nchw,nchw->c", d, d)
    return mean, np.sqrt(sq / count)


def channel_normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """``(x - mean_c) / std_c`` on pixels in [0, 1]; a zero std is taken as 1. New float32 array."""
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    std = np.where(std > 0, std, 1.0)
    x = _to_unit(x)
    m = mean.astype(np.float32)[:, None, None]
    inv = (1 / std).astype(np.float32)[:, None, None]
    for s in range(0, len(x), _CHUNK):
        b = x[s:s + _CHUNK]
        b -= m
        b *= inv
    return x


def normalize_splits(x_train: np.ndarray, x_test: np.ndarray, normalize: str = "image-mean"):
    """``(x_train, x_test, stats)`` normalised by ``normalize`` (see the module docstring);
    ``stats`` holds ``mean``/``std`` lists for ``"channel"``."""
    if normalize == "image-mean":
        return image_mean_normalize(x_train), image_mean_normalize(x_test), {}
    if normalize == "channel":
        mean, std = channel_stats(x_train)
        stats = {"mean": mean.tolist(), "std": std.tolist()}
        return channel_normalize(x_train, mean, std), channel_normalize(x_test, mean, std), stats
    if normalize == "none":
        return _to_unit(x_train), _to_unit(x_test), {}
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


# --------------------------------------------------------------------------- loading

def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"data set name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def load_dataset(name: str, path=None, size: int | None = None, normalize: str = "image-mean",
                 seed: int = 0, *, resize: str = "pad", label_mode: str = "fine",
                 test_fraction: float = 0.2, verify: bool = False,
                 max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """Load ``"digits"`` (embedded, 1x8x8, 10 classes), ``"cifar10"`` or ``"cifar100"`` (3x32x32,
    from ``path``: the archive, its folder, or the extracted folder; see :mod:`npapprox.data.cifar`).

    ``size``: output side (``None``: native) reached by ``resize`` (``"pad"``, ``"nearest"`` or
    ``"bilinear"``). ``normalize``: ``"image-mean"`` | ``"channel"`` | ``"none"``. ``seed`` and
    ``test_fraction``: the digits' stratified split (CIFAR's split is fixed). ``label_mode``:
    CIFAR-100 ``"fine"``/``"coarse"``. ``verify``: check the CIFAR MD5 first. ``max_train`` /
    ``max_test``: keep only the first so many images of each split (quick runs; taken before the
    channel statistics are computed).
    """
    key = _canonical(name)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    for label, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and v < 1:
            raise ValueError(f"{label} must be positive, got {v}")
    if key == "digits":
        if path is not None:
            raise ValueError("the digits set is embedded (scikit-learn); it takes no path")
        x_tr, y_tr, x_te, y_te = digits_split(test_fraction, seed)
        num_classes, names, source = 10, tuple(str(i) for i in range(10)), "sklearn.datasets.load_digits"
    else:
        if path is None:
            spec = CIFAR10 if key == "cifar10" else CIFAR100
            raise ValueError(f"{key} needs path=: {spec.accepted}; nothing is downloaded")
        raw = (load_cifar10(path, verify=verify) if key == "cifar10"
               else load_cifar100(path, label_mode=label_mode, verify=verify))
        x_tr, y_tr, x_te, y_te = raw.x_train, raw.y_train, raw.x_test, raw.y_test
        num_classes, names, source = raw.num_classes, raw.class_names, raw.source
    x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    x_te, y_te = x_te[:max_test], y_te[:max_test]
    native = x_tr.shape[-1]
    if size is not None and int(size) != native:
        need, avail = 4 * (len(x_tr) + len(x_te)) * x_tr.shape[1] * int(size) ** 2, limits.available_memory()
        if need > avail:
            raise ValueError(f"{len(x_tr) + len(x_te)} {key} images resized to {x_tr.shape[1]}x{size}x{size} "
                             f"float32 would take {limits.fmt_bytes(need)}, more than the "
                             f"{limits.fmt_bytes(avail)} of memory available")
        x_tr = resize_images(_to_unit(x_tr), size, resize)
        x_te = resize_images(_to_unit(x_te), size, resize)
    x_tr, x_te, stats = normalize_splits(x_tr, x_te, normalize)
    return Dataset(name=key, x_train=x_tr, y_train=np.ascontiguousarray(y_tr, np.int64), x_test=x_te,
                   y_test=np.ascontiguousarray(y_te, np.int64), num_classes=num_classes,
                   in_channels=x_tr.shape[1], image_size=x_tr.shape[-1], class_names=names,
                   normalize=normalize, norm_stats=stats, source=source)
