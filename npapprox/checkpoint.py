"""Checkpoint files: named arrays plus JSON metadata, with a checksum, and no code.

The file is in the safetensors layout, so ``safetensors.numpy.load_file`` and
``safetensors.torch.load_file`` read its arrays as they are:

    bytes 0..8     N: the header's length in bytes, unsigned 64-bit little-endian
    bytes 8..8+N   the header: a JSON object, padded with spaces to a multiple of 8 bytes,
                     {"<array name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                      "__metadata__": {"format": "npapprox-checkpoint", "version": "1",
                                       "meta": "<the metadata as JSON text>", "sha256": "<hex>"}}
    the rest       the arrays' raw bytes (C order, little-endian) back to back; data_offsets
                   count from the first byte after the header

``sha256`` is taken over the header without its own entry (as JSON with sorted
keys, no spaces) followed by every byte after the header: a changed name, shape,
value or metadata field is refused. Reading never runs code from the file (no
pickle); every failure is a ``CheckpointError`` whose one-line message names the
file and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

FORMAT, VERSION = "npapprox-checkpoint", "1"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
MAX_HEADER = 100 * 2**20           # safetensors' own limit


class CheckpointError(ValueError):
    pass


def _digest(header: dict, data) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def dumps(arrays: dict, meta: dict) -> bytes:
    """The file's bytes for ``arrays`` ({name: NumPy array}) and ``meta`` (JSON-able)."""
    header, chunks, offset = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in CODES:
            raise TypeError(f"checkpoint: array {name!r} has dtype {a.dtype}, which the format cannot hold")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    header["__metadata__"] = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta)}
    header["__metadata__"]["sha256"] = _digest(header, data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def save(path, arrays: dict, meta: dict) -> None:
    """Write atomically: a temporary file, fsync, rename (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(dumps(arrays, meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path) -> tuple[dict, dict]:
    """``(arrays, meta)`` from ``path``, after checking the layout and the checksum."""
    path = Path(path)

    def fail(what):
        return CheckpointError(f"checkpoint {path}: {what}")

    if path.is_dir():
        raise fail("is a folder, not a file")
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:  # a folder, a FIFO, no permission
        raise fail(f"cannot be read ({e.strerror})") from None
    if len(blob) < 8:
        raise fail(f"is empty or truncated ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(len(blob) - 8, MAX_HEADER):
        raise fail(f"is truncated or not a checkpoint (its header claims {n} bytes, the file has {len(blob)})")
    try:
        header = json.loads(blob[8:8 + n])
        info = header.pop("__metadata__")
        assert isinstance(info, dict)
    except (ValueError, KeyError, AttributeError, AssertionError):
        raise fail("is not a checkpoint (no readable safetensors header)") from None
    if info.get("format") != FORMAT:
        raise fail("is a safetensors file but not an npapprox checkpoint")
    if info.get("version") != VERSION:
        raise fail(f"has format version {info.get('version')!r}; this npapprox reads version {VERSION}")
    data = memoryview(blob)[8 + n:]
    table, end = [], 0
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    except (KeyError, TypeError, IndexError, AttributeError):
        raise fail("has a malformed array table") from None
    for name, entry in entries:
        try:
            begin, stop = entry["data_offsets"]
            dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise fail(f"array {name!r} has a malformed entry") from None
        if begin != end or stop - begin != dtype.itemsize * int(np.prod(shape)):
            raise fail(f"array {name!r} does not match its offsets")
        table.append((name, dtype, shape, begin, stop))
        end = stop
    if end != len(data):
        raise fail(f"is truncated ({end} bytes of arrays expected, {len(data)} found)" if end > len(data) else
                   f"holds {len(data) - end} bytes after its last array")
    expected = info.pop("sha256", None)
    if _digest({**header, "__metadata__": info}, data) != expected:
        raise fail("is damaged (checksum mismatch)")
    arrays = {name: np.frombuffer(data[begin:stop], dtype).reshape(shape).astype(dtype.newbyteorder("="))
              for name, dtype, shape, begin, stop in table}
    try:
        meta = json.loads(info["meta"])
    except (KeyError, TypeError, ValueError):
        raise fail("has no readable metadata") from None
    return {name: arrays[name] for name in header}, meta      # in the written order


def check_arrays(path, arrays: dict, own: dict, expected) -> None:
    """Refuse ``arrays`` (read from ``path``) that are not this model's: a name of
    ``own`` missing, a name ``expected(name)`` does not know (None), or another
    shape or dtype than ``expected(name)``'s (CheckpointError, one line)."""
    foreign = sorted(set(own) - set(arrays)) + [k for k in arrays if expected(k) is None]
    if foreign:
        raise CheckpointError(f"checkpoint {path}: its arrays are not this model's "
                              f"({len(foreign)} names differ, e.g. {foreign[0]!r})")
    for k, v in arrays.items():
        if v.shape != expected(k).shape or v.dtype != expected(k).dtype:
            raise CheckpointError(f"checkpoint {path}: array {k!r} is {v.dtype}{list(v.shape)}, "
                                  f"this model's is {expected(k).dtype}{list(expected(k).shape)}")
