"""CIFAR-10 and CIFAR-100 from the standard *python* archives (nothing is downloaded).

Accepted forms of ``path`` (``str`` or ``os.PathLike``):

* the archive itself: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (any file name);
* a directory holding that archive (used in preference to an extracted folder beside it);
* the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or a directory holding it.

The archive is read in one sequential pass with :mod:`tarfile` and never extracted to disk. Each
member is a (Python 2) pickle of a dict with ``b"data"``: uint8 ``(N, 3072)``, one row per image,
holding the red, green and blue 32x32 planes one after the other, each row-major; so
``data.reshape(N, 3, 32, 32)`` is NCHW. Labels: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` /
``b"coarse_labels"`` (CIFAR-100).

The pickles are read by a restricted unpickler that only builds NumPy arrays, dtypes, lists,
dicts, ints and strings: a tampered archive cannot run code.

Errors
  * nothing found: :class:`FileNotFoundError` naming the expected archive and folder, every place
    looked at, the official MD5 of the archive and where to get it;
  * unreadable or wrong content (bad gzip, missing member, array of the wrong shape or dtype, label
    out of range, ...): :class:`ValueError` naming the file (and member) and what is wrong, with the
    file's MD5 next to the official one (the MD5 is only computed then, or with ``verify=True``).

``verify=True`` hashes the archive (or, for an extracted folder, each member file) first and raises
:class:`ValueError` on a mismatch with the official checksum.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CIFAR10", "CIFAR100", "CifarData", "CifarSpec", "file_md5", "find_cifar",
           "load_cifar10", "load_cifar100"]

_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    """What one of the two archives must contain. ``member_md5`` are the official checksums of the
    extracted files (used to verify an extracted folder)."""
    title: str
    archive: str
    archive_md5: str
    folder: str
    train_members: tuple
    test_member: str
    meta_member: str
    member_md5: dict = field(default_factory=dict)

    @property
    def members(self) -> tuple:
        return (*self.train_members, self.test_member, self.meta_member)

    @property
    def accepted(self) -> str:
        """What a path may name, for messages."""
        return (f"the {self.archive} archive (MD5 {self.archive_md5}, from {_URL}), the folder holding it, "
                f"or the extracted {self.folder} folder")


CIFAR10 = CifarSpec(
    title="CIFAR-10", archive="cifar-10-python.tar.gz", archive_md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_members=tuple(f"data_batch_{i}" for i in range(1, 6)), test_member="test_batch",
    meta_member="batches.meta",
    member_md5={"data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                "test_batch": "40351d587109b95175f43aff81a1287e",
                "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"})

CIFAR100 = CifarSpec(
    title="CIFAR-100", archive="cifar-100-python.tar.gz", archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python", train_members=("train",), test_member="test", meta_member="meta",
    member_md5={"train": "16019d7e3df5f24257cddd939b257f8d",
                "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"})

_OTHER = {CIFAR10.archive: CIFAR100, CIFAR100.archive: CIFAR10}


@dataclass
class CifarData:
    """Raw decoded images: ``x_*`` uint8 (N, 3, 32, 32) NCHW RGB, ``y_*`` int64."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple
    source: str            # the archive or folder actually read


# --------------------------------------------------------------------------- checksums

def file_md5(path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _md5_note(path: Path, spec: CifarSpec, member: str | None = None) -> str:
    """' This file's MD5 is X; the official <name> has MD5 Y. ...' (hashes only now, on error)."""
    try:
        got = file_md5(path)
    except OSError as e:
        got = f"unavailable ({e.strerror or e})"
    if member is None:
        official = f"the official {spec.archive} has MD5 {spec.archive_md5}"
    else:
        official = (f"the official {member} has MD5 {spec.member_md5.get(member, '?')} (and the official "
                    f"archive {spec.archive} has MD5 {spec.archive_md5})")
    return (f" This file's MD5 is {got}; {official}. Re-download {spec.archive} from {_URL} "
            f"(it must not be modified).")


# --------------------------------------------------------------------------- locating

def find_cifar(path, spec: CifarSpec) -> tuple[str, Path]:
    """Resolve ``path`` to ``("archive", file)`` or ``("folder", directory)``; raise
    :class:`FileNotFoundError` listing every place looked at otherwise."""
    if path is None:
        raise ValueError(f"{spec.title} needs a path: {spec.accepted}")
    p = Path(os.fspath(path)).expanduser()
    looked = []
    if p.is_file():
        return "archive", p
    if p.is_dir():
        candidates = [("archive", p / spec.archive), ("folder", p / spec.folder), ("folder", p)]
        for kind, c in candidates:
            if kind == "archive" and c.is_file():
                return kind, c
            if kind == "folder" and c.is_dir() and _looks_extracted(c, spec):
                return kind, c
            looked.append(str(c) if kind == "archive" else f"{c}{os.sep} (extracted folder)")
    else:
        looked.append(f"{p} (does not exist)")
    hint = ""
    if p.is_dir():
        other = _OTHER[spec.archive]
        if (p / other.archive).is_file() or (p / other.folder).is_dir() or p.name == other.folder:
            hint = f" (found {other.title} there instead: did you mean that data set?)"
    raise FileNotFoundError(
        f"{spec.title} not found{hint}. Looked for {spec.archive} or the extracted {spec.folder} folder "
        f"(with {', '.join(spec.members)}) at: {'; '.join(looked)}. Download {spec.archive} "
        f"(MD5 {spec.archive_md5}) from {_URL} and pass the archive, the folder holding it, or the "
        f"extracted {spec.folder} folder.")


def _looks_extracted(d: Path, spec: CifarSpec) -> bool:
    return d.name == spec.folder or any((d / m).is_file() for m in spec.members)


# --------------------------------------------------------------------------- unpickling

def _numpy_globals() -> dict:
    """The only globals a CIFAR pickle may name, under their NumPy 1 and NumPy 2 module paths
    (the official files, written by NumPy 1 under Python 2, name ``numpy.core.multiarray``;
    resolving them here avoids NumPy 2's deprecation shim)."""
    reconstruct = np.ndarray((0,), np.uint8).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.ndarray((1,), np.uint8).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module, name):
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _numpy_globals()
        try:
            return _SafeUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only "
                                         f"NumPy arrays, lists, ints and strings)") from None


def _unpickle(f) -> object:
    return _SafeUnpickler(f, encoding="bytes").load()


class _Corrupt(Exception):
    """Internal: what is wrong with one member (turned into a ValueError naming the file)."""


# --------------------------------------------------------------------------- reading

def _read_members(kind: str, where: Path, spec: CifarSpec) -> dict:
    """``{member: unpickled object}`` for every member of ``spec``; raises ValueError on damage."""
    wanted = set(spec.members)
    if kind == "folder":
        missing = [m for m in spec.members if not (where / m).is_file()]
        if missing:
            raise ValueError(f"{spec.title} folder {where} is incomplete: missing {', '.join(missing)} "
                             f"(expected {', '.join(spec.members)}). Extract {spec.archive} "
                             f"(MD5 {spec.archive_md5}, from {_URL}) again.")
        out = {}
        for m in spec.members:
            try:
                with open(where / m, "rb") as f:
                    out[m] = _unpickle(f)
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                    IndexError, KeyError, MemoryError, UnicodeDecodeError) as e:
                raise ValueError(f"{spec.title} file {where / m} is corrupt: cannot unpickle it "
                                 f"({type(e).__name__}: {e})." + _md5_note(where / m, spec, m)) from e
        return out

    out = {}
    try:
        with tarfile.open(where, "r:gz") as tar:
            for info in tar:                      # one sequential pass: no backward seeks in the gzip
                name = posixpath.normpath(info.name)
                folder, base = posixpath.split(name)
                if folder != spec.folder or base not in wanted or not info.isfile():
                    continue
                f = tar.extractfile(info)
                try:
                    out[base] = _unpickle(f)
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                        IndexError, KeyError, MemoryError, UnicodeDecodeError) as e:
                    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)) and not str(e).startswith("Ran out"):
                        raise                      # the gzip stream itself broke: reported below
                    raise _Corrupt(f"member {name} cannot be unpickled ({type(e).__name__}: {e})") from e
    except _Corrupt as e:
        raise ValueError(f"{spec.title} archive {where} is corrupt: {e}." + _md5_note(where, spec)) from e
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{spec.title} archive {where} is not a readable gzip-compressed tar file "
                         f"({type(e).__name__}: {e}); it may be truncated or damaged."
                         + _md5_note(where, spec)) from e
    missing = [f"{spec.folder}/{m}" for m in spec.members if m not in out]
    if missing:
        raise ValueError(f"{spec.title} archive {where} is corrupt: missing member(s) {', '.join(missing)}."
                         + _md5_note(where, spec))
    return out


def _field(d: dict, key: str):
    """``d[b"key"]`` (also accepting a str key, for files re-pickled under Python 3)."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise _Corrupt(f"has no {key.encode()!r} entry (keys: {sorted(map(repr, d))})")


def _images(d: dict) -> np.ndarray:
    data = _field(d, "data")
    if not isinstance(data, np.ndarray):
        raise _Corrupt(f"b'data' is a {type(data).__name__}, expected a NumPy uint8 array")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise _Corrupt(f"b'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, {_PIXELS}) "
                       f"(3 planes of 32x32)")
    return data.reshape(-1, 3, 32, 32)             # R, G, B planes, each row-major: already NCHW


def _labels(d: dict, key: str, n: int, num_classes: int) -> np.ndarray:
    raw = _field(d, key)
    try:
        y = np.asarray(raw)
    except (TypeError, ValueError) as e:
        raise _Corrupt(f"{key.encode()!r} is not a list of integers ({e})") from e
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise _Corrupt(f"{key.encode()!r} is not a flat list of integers (got {y.dtype} of shape {y.shape})")
    if len(y) != n:
        raise _Corrupt(f"has {len(y)} {key.encode()!r} for {n} images")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise _Corrupt(f"{key.encode()!r} range over [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]")
    return y.astype(np.int64)


def _names(d, key: str, count: int) -> tuple:
    names = _field(d, key)
    if not isinstance(names, list) or len(names) != count:
        raise _Corrupt(f"{key.encode()!r} should list {count} class names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def _load(path, spec: CifarSpec, label_key: str, num_classes: int, names_key: str, verify: bool) -> CifarData:
    kind, where = find_cifar(path, spec)
    if verify:
        _verify(kind, where, spec)
    members = _read_members(kind, where, spec)

    def member_error(member: str, e: _Corrupt) -> ValueError:
        if kind == "archive":
            return ValueError(f"{spec.title} archive {where} is corrupt: member {spec.folder}/{member} {e}."
                              + _md5_note(where, spec))
        return ValueError(f"{spec.title} file {where / member} is corrupt: it {e}."
                          + _md5_note(where / member, spec, member))

    def split(members_: tuple):
        xs, ys = [], []
        for m in members_:
            try:
                d = members[m]
                if not isinstance(d, dict):
                    raise _Corrupt(f"holds a {type(d).__name__}, expected a dict")
                x = _images(d)
                xs.append(x)
                ys.append(_labels(d, label_key, len(x), num_classes))
            except _Corrupt as e:
                raise member_error(m, e) from None
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = split(spec.train_members)
    x_test, y_test = split((spec.test_member,))
    try:
        meta = members[spec.meta_member]
        if not isinstance(meta, dict):
            raise _Corrupt(f"holds a {type(meta).__name__}, expected a dict")
        class_names = _names(meta, names_key, num_classes)
    except _Corrupt as e:
        raise member_error(spec.meta_member, e) from None
    if len(x_train) == 0:
        raise member_error(spec.train_members[0], _Corrupt("holds no training images"))
    if len(x_test) == 0:
        raise member_error(spec.test_member, _Corrupt("holds no test images"))
    return CifarData(x_train, y_train, x_test, y_test, num_classes, class_names, str(where))


def _verify(kind: str, where: Path, spec: CifarSpec) -> None:
    if kind == "archive":
        got = file_md5(where)
        if got != spec.archive_md5:
            raise ValueError(f"{spec.title} archive {where} fails verification: its MD5 is {got}, the official "
                             f"{spec.archive} has MD5 {spec.archive_md5}. Re-download it from {_URL}.")
        return
    bad = []
    for m in spec.members:
        f = where / m
        if not f.is_file():
            bad.append(f"{m} is missing")
        elif (got := file_md5(f)) != spec.member_md5[m]:
            bad.append(f"{m} has MD5 {got}, expected {spec.member_md5[m]}")
    if bad:
        raise ValueError(f"{spec.title} folder {where} fails verification: {'; '.join(bad)}. Extract the "
                         f"official {spec.archive} (MD5 {spec.archive_md5}, from {_URL}) again.")


def load_cifar10(path, *, verify: bool = False) -> CifarData:
    """CIFAR-10: 50000 training (``data_batch_1..5`` in order) and 10000 test images, 10 classes."""
    return _load(path, CIFAR10, "labels", 10, "label_names", verify)


def load_cifar100(path, *, label_mode: str = "fine", verify: bool = False) -> CifarData:
    """CIFAR-100: 50000 training and 10000 test images; ``label_mode="fine"`` (100 classes, the
    default) or ``"coarse"`` (the 20 superclasses)."""
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    n = 100 if label_mode == "fine" else 20
    return _load(path, CIFAR100, f"{label_mode}_labels", n, f"{label_mode}_label_names", verify)
