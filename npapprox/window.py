"""Saturation of the BN window, made visible.

A ``Paper`` policy (and its relatives) calls ``policy.monitor.record(...)`` for
every unit it stores when a monitor is attached. ``WindowMonitor`` counts, per
unit and channel, the values the window clips -- those whose code is clamped
to 0 or 2^K - 1, i.e. ``u = float32(y * k)`` outside ``[-s, NB - s]`` (the
kernel's own product, so the count is what the codes saw) -- and flags the
channels where ``|beta/gamma|`` exceeds the window's half-width W: there the
fixed window cannot follow the data at all (a fitted window always does, so
``FitWindow`` flags none).

Uses: ``ledger.ledger`` adds the rows to the ledger; the study's ``window``
experiment writes them per policy; ``watch_training`` logs a warning when a
unit saturates persistently during ``npapprox train``.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import quant
from .backend import to_device
from .kernels.bn import as_ncm
from .policy import FitWindow

#: a checked unit saturates when it clips more than this fraction of its values ...
CLIP_WARN = 0.01


def clipped_per_channel(y, k, s, bits):
    """How many values of each channel the window clips: ``(C,)`` int64 NumPy.

    ``u = float32(y * k)`` (the kernel's product), clipped when ``u < -s`` or
    ``u > NB - s`` (the bins are ``(j - 1, j]`` in u, code ``s - 1 + j``)."""
    y3 = as_ncm(y)
    nb = 1 << bits
    with np.errstate(all="ignore"):
        u = y3 * k.astype(np.float32)[None, :, None]
        s3 = s.astype(np.float32)[None, :, None]
        out = (u < -s3) | (u > nb - s3)
    return np.asarray(to_device(out.sum(axis=(0, 2)), "cpu"), np.int64)


def unit_row(module: str, y, params, bits: int, window: float | None) -> dict:
    """One unit's saturation: ``clipped`` (fraction of all its values),
    ``max_channel_clipped``, ``channels``, ``outside`` (channels with
    ``|beta/gamma| > window``, filled in by the monitor) and ``max_abs_b``."""
    counts = clipped_per_channel(y, params["k"], params["s"], bits)
    per = y.size // max(y.shape[1], 1)
    return {"module": module, "channels": int(y.shape[1]), "values": int(y.size),
            "clipped": float(counts.sum() / max(y.size, 1)),
            "max_channel_clipped": float(counts.max() / max(per, 1)) if counts.size else 0.0,
            "outside": 0, "max_abs_b": 0.0, "window": window}


class WindowMonitor:
    """Collects ``unit_row`` for the units a policy stores (see the module doc).

    ``names``: {id(module): name} (``names_of(model)``); ``every``: check one
    store in ``every`` per unit (each check is one extra pass over the unit's
    y); ``keep``: keep the rows (``rows``) or only the latest per unit
    (``latest``)."""

    def __init__(self, names: dict | None = None, every: int = 1, keep: bool = True):
        self.names, self.every, self.keep = names or {}, max(int(every), 1), keep
        self.rows, self.latest, self._seen = [], {}, {}

    def name_of(self, ctx) -> str:
        return self.names.get(id(getattr(ctx, "module", None)), "-")

    def record(self, ctx, u, params, policy) -> None:
        name = self.name_of(ctx)
        seen = self._seen[name] = self._seen.get(name, 0) + 1
        if (seen - 1) % self.every:
            return
        fitted = isinstance(policy, FitWindow)
        row = unit_row(name, u.y, params, policy.bits, policy.window)
        b = np.abs(np.asarray(to_device(quant.beta_over_gamma(u.gamma, u.beta), "cpu")))
        row["max_abs_b"] = float(b.max()) if b.size else 0.0
        row["fitted"] = fitted
        row["outside"] = 0 if fitted else int((b > policy.window).sum())
        row["policy"] = repr(policy)
        self.latest[name] = row
        if self.keep:
            self.rows.append(row)
        self.checked(row)

    def checked(self, row) -> None:
        """Called with every row (a hook for subclasses)."""


def names_of(model) -> dict:
    return {id(m): (n or type(m).__name__) for n, m in model.named_modules()}


@contextlib.contextmanager
def monitoring(policy, monitor):
    """Attach ``monitor`` to ``policy`` (when it stores windows) for the block."""
    if not hasattr(policy, "monitor"):
        yield None
        return
    previous, policy.monitor = policy.monitor, monitor
    try:
        yield monitor
    finally:
        policy.monitor = previous


def table(rows) -> str:
    """The rows as a fixed-width text table (the ledger's window section)."""
    if not rows:
        return ""
    head = f"{'unit':<22} {'channels':>8} {'clipped':>9} {'max chan':>9} {'|b|>W':>6} {'max |b|':>8}  window"
    lines = [head, "-" * len(head)]
    for r in rows:
        w = (("fitted" if min(r["window"]) == np.inf else "fitted, cut -{:g}/+{:g}".format(*r["window"]))
             if r.get("fitted") else f"+-{r['window']:g}")
        lines.append(f"{r['module'][:22]:<22} {r['channels']:>8} {100 * r['clipped']:>8.3f}% "
                     f"{100 * r['max_channel_clipped']:>8.2f}% {r['outside']:>6} {r['max_abs_b']:>8.2f}  {w}")
    return "\n".join(lines)


class TrainingWatch(WindowMonitor):
    """Warns (through ``log``) once per unit when it saturates at ``persist``
    consecutive checks: clips more than ``threshold`` of its values, or has a
    channel with |beta/gamma| beyond the window. A fitted window follows the data
    and its cut clips by design: it never warns."""

    def __init__(self, names, log, every: int = 10, persist: int = 5, threshold: float = CLIP_WARN):
        super().__init__(names, every, keep=False)
        self.log, self.persist, self.threshold = log, persist, threshold
        self.streak, self.warned = {}, set()

    def checked(self, row) -> None:
        name = row["module"]
        if row.get("fitted"):
            return
        bad = row["clipped"] > self.threshold or row["outside"] > 0
        self.streak[name] = self.streak.get(name, 0) + 1 if bad else 0
        if self.streak[name] >= self.persist and name not in self.warned:
            self.warned.add(name)
            self.log(f"warning: unit {name} saturates its BN window ({row['policy']}) at {self.persist} "
                     f"consecutive checks: {100 * row['clipped']:.2f}% of values clipped, {row['outside']} of "
                     f"{row['channels']} channels with |beta/gamma| > {row['window']:g} (max {row['max_abs_b']:.1f});"
                     " the rebuilt xhat is off there (a wider -wW window or fitK follows it)")


def watch_training(policy, model, log, every: int = 10, persist: int = 5):
    """Attach a ``TrainingWatch`` to ``policy`` (a ``Paper``-family policy;
    otherwise nothing) for the rest of its life; returns it or None."""
    if not hasattr(policy, "monitor"):
        return None
    policy.monitor = TrainingWatch(names_of(model), log, every, persist)
    return policy.monitor
