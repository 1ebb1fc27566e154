"""Write small CIFAR-10 / CIFAR-100 archives in the exact format of the official python versions.

The official members were pickled by Python 2 (protocol 2) with NumPy 1: dict keys and strings are
Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING`` opcodes, read back as ``bytes`` with
``encoding="bytes"``), and the arrays name ``numpy.core.multiarray._reconstruct``. :func:`py2_dumps`
reproduces that byte layout, so the loader meets the same opcodes and globals as with the real files.

Pixel values encode their position (:func:`pixel`), so any layout error (channel planes, row-major
order, batch order) changes the decoded values.

Typical use::

    members = cifar10_members()                  # {member name: python object}
    write_archive(tmp / "cifar-10-python.tar.gz", CIFAR10_FOLDER, members)
    write_folder(tmp / CIFAR10_FOLDER, members)
    x_train, y_train, x_test, y_test = expected_cifar10()
"""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_PER_BATCH = 7      # CIFAR-10 images per data_batch_k (5 files); CIFAR-100 train has 5 * 7
N_TEST = 11

_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us replace single opcodes
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:      # NumPy 1's module path, as in the official files
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dumps(obj) -> bytes:
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) wrote the official CIFAR files."""
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def pixel(i, c, r, col):
    """Value of image ``i`` (global index in its split), channel ``c``, row ``r``, column ``col``.
    Distinct steps per coordinate: swapping rows/columns, channels/rows, or images changes values."""
    return (37 * i + 101 * c + 11 * r + 3 * col) % 256


def flat_rows(first: int, n: int) -> np.ndarray:
    """The official (N, 3072) layout computed from the format's definition (no reshape): entry
    ``j = c * 1024 + r * 32 + col`` of a row is channel ``c`` (R, G, B), row ``r``, column ``col``."""
    j = np.arange(3072)
    c, rest = np.divmod(j, 1024)
    r, col = np.divmod(rest, 32)
    i = np.arange(first, first + n)[:, None]
    return pixel(i, c[None], r[None], col[None]).astype(np.uint8)


def expected_images(n: int) -> np.ndarray:
    """What the loader must return for images 0..n-1: uint8 NCHW, ``[i, c, r, col] = pixel(...)``."""
    i, c, r, col = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return pixel(i, c, r, col).astype(np.uint8)


def cifar10_label(i: int, train: bool) -> int:
    return (3 * i + (0 if train else 1)) % 10


def cifar100_fine(i: int, train: bool) -> int:
    return (7 * i + (0 if train else 3)) % 100


def cifar100_coarse(i: int, train: bool) -> int:
    return (cifar100_fine(i, train) * 11) % 20      # not the real superclass map; any 0..19 will do


def cifar10_members(n_per_batch: int = N_PER_BATCH, n_test: int = N_TEST) -> dict:
    members = {}
    for b in range(5):
        first = b * n_per_batch
        members[f"data_batch_{b + 1}"] = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [cifar10_label(first + k, True) for k in range(n_per_batch)],
            b"data": flat_rows(first, n_per_batch),
            b"filenames": [f"img_{first + k}.png".encode() for k in range(n_per_batch)],
        }
    members["test_batch"] = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [cifar10_label(k, False) for k in range(n_test)],
        b"data": flat_rows(0, n_test),
        b"filenames": [f"test_{k}.png".encode() for k in range(n_test)],
    }
    members["batches.meta"] = {b"num_cases_per_batch": n_per_batch,
                               b"label_names": [s.encode() for s in CIFAR10_NAMES], b"num_vis": 3072}
    return members


def cifar100_members(n_train: int = 5 * N_PER_BATCH, n_test: int = N_TEST) -> dict:
    def split(n, train, label):
        return {
            b"filenames": [f"{label}_{k}.png".encode() for k in range(n)],
            b"batch_label": f"{label} batch 1 of 1".encode(),
            b"fine_labels": [cifar100_fine(k, train) for k in range(n)],
            b"coarse_labels": [cifar100_coarse(k, train) for k in range(n)],
            b"data": flat_rows(0, n),
        }
    return {"train": split(n_train, True, "training"), "test": split(n_test, False, "testing"),
            "meta": {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                     b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]}}


def expected_cifar10(n_per_batch: int = N_PER_BATCH, n_test: int = N_TEST):
    n = 5 * n_per_batch
    return (expected_images(n), np.array([cifar10_label(i, True) for i in range(n)]),
            expected_images(n_test), np.array([cifar10_label(i, False) for i in range(n_test)]))


def expected_cifar100(n_train: int = 5 * N_PER_BATCH, n_test: int = N_TEST, label_mode: str = "fine"):
    lab = cifar100_fine if label_mode == "fine" else cifar100_coarse
    return (expected_images(n_train), np.array([lab(i, True) for i in range(n_train)]),
            expected_images(n_test), np.array([lab(i, False) for i in range(n_test)]))


def _payload(obj) -> bytes:
    return obj if isinstance(obj, (bytes, bytearray)) else py2_dumps(obj)


# the official archives list their members in no particular order, with a readme beside them
_EXTRA = {CIFAR10_FOLDER: ("readme.html", b"<html>CIFAR-10 test archive</html>\n"),
          CIFAR100_FOLDER: ("file.txt~", b"")}


def write_archive(path, folder: str, members: dict, order=None) -> Path:
    """Write ``members`` (name -> object to pickle, or raw bytes) as ``folder/name`` in a
    gzip-compressed tar at ``path``, with the folder's own entry first like the official files.
    ``order``: member names in archive order (default: reversed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(order) if order is not None else list(reversed(list(members)))
    with tarfile.open(path, "w:gz") as tar:
        d = tarfile.TarInfo(folder)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_230_000_000
        tar.addfile(d)
        extra_name, extra = _EXTRA.get(folder, ("readme", b""))
        items = [(n, _payload(members[n])) for n in names] + [(extra_name, extra)]
        items.insert(1, items.pop())              # the readme sits among the batches
        for name, data in items:
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_230_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(path, members: dict) -> Path:
    """Write ``members`` as files in the directory ``path`` (an extracted archive)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, obj in members.items():
        (path / name).write_bytes(_payload(obj))
    return path


def make_cifar10(root, form: str = "archive", members: dict | None = None) -> Path:
    """CIFAR-10 under ``root`` as ``"archive"`` (returns the .tar.gz) or ``"folder"`` (returns the
    extracted cifar-10-batches-py folder)."""
    members = cifar10_members() if members is None else members
    if form == "archive":
        return write_archive(Path(root) / CIFAR10_ARCHIVE, CIFAR10_FOLDER, members)
    return write_folder(Path(root) / CIFAR10_FOLDER, members)


def make_cifar100(root, form: str = "archive", members: dict | None = None) -> Path:
    members = cifar100_members() if members is None else members
    if form == "archive":
        return write_archive(Path(root) / CIFAR100_ARCHIVE, CIFAR100_FOLDER, members)
    return write_folder(Path(root) / CIFAR100_FOLDER, members)
