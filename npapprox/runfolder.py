"""Output folders: writable before work starts, one run per folder, logs that survive a crash.

* ``check_out(path)``: ``--out`` (a folder, or with ``file=True`` a file) can be
  written; checked before any work, a one-line ``ValueError`` otherwise.
* ``claim(folder, overwrite)``: a new run refuses a folder that holds another
  run's files (``RUN_FILES``) unless ``overwrite``, which removes them first:
  two runs' rows are never mixed in one log.
* ``read_jsonl(path, repair)``: the rows of a JSON-lines log; a bad line is an
  error naming the file and the line, except a torn last line (a crash while
  it was written), which ``repair`` drops.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CHECKPOINT, METRICS, STEPS = "checkpoint.safetensors", "metrics.jsonl", "steps.jsonl"
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".tmp", METRICS, STEPS)


def check_out(path, option: str = "--out", file: bool = False) -> Path:
    """Create the folder (``file``: the file's folder) and prove it writable with a
    temporary file, or raise ValueError naming what is in the way."""
    path = Path(path)
    folder = path.parent if file else path
    if file and path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    if not file and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in {folder} ({e.strerror})") from None
    return path


def run_files(folder) -> list:
    folder = Path(folder)
    return [folder / name for name in RUN_FILES if (folder / name).exists()]


def claim(folder, overwrite: bool = False) -> None:
    """Make ``folder`` ready for a new run (see the module docstring)."""
    found = run_files(folder)
    if found and not overwrite:
        raise ValueError(f"{folder} already holds a run ({', '.join(p.name for p in found)}): continue it with "
                         "--resume, or replace it with --overwrite")
    for p in found:
        try:
            p.unlink()
        except OSError as e:                           # a folder in the file's place, no permission
            raise ValueError(f"--overwrite: cannot remove {p} ({e.strerror})") from None


def read_jsonl(path, repair: bool = False) -> list:
    """The rows of ``path``; ``repair``: drop a torn last line and rewrite the file without it."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if repair and i == len(lines) - 1:        # no newline after it: torn by a crash mid-write
                write_jsonl(path, rows)
                return rows
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e.msg})") from None
    return rows


def write_jsonl(path, rows) -> None:
    """Replace ``path`` atomically by ``rows``, one JSON object a line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        sync(f)
    os.replace(tmp, path)


def sync(f) -> None:
    """Flush ``f`` to the disk: its rows survive a crash (kill -9, power loss) from here on."""
    f.flush()
    os.fsync(f.fileno())


def cut_logs(folder, iteration: int, history: list) -> None:
    """The logs may run past the checkpoint (a crash after it): cut ``steps.jsonl``
    back to ``iteration`` (a torn last line repaired) and rewrite ``metrics.jsonl``
    as ``history``."""
    steps = Path(folder) / STEPS
    if steps.exists():
        rows = read_jsonl(steps, repair=True)
        if not all(isinstance(r, dict) and isinstance(r.get("iteration"), int) for r in rows):
            raise ValueError(f"{steps} holds a line without an iteration: not this run's log")
        write_jsonl(steps, [r for r in rows if r["iteration"] <= iteration])
    write_jsonl(Path(folder) / METRICS, history)
