"""Measured peak memory and the budget search.

``measure_peak(model, x, labels, policy)`` measures the peak of traced host
memory over forward + backward (tracemalloc; NumPy reports its buffers to it),
or, for a model on the GPU, of the bytes in use in CuPy's memory pool;
``measure_profile`` the peak of every stretch between two ops; ``max_batch`` the
largest batch whose measured peak fits a budget (docs/storage.md, "The budget
search"); ``PeakProbe`` the peak of one training step (``train``).
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from .backend import gpu_memory_peak, on_gpu
from .ledger import forward_loss
from .limits import fmt_bytes
from .policy import Policy, current_policy, storage_policy
from .tensor import Tensor, observing

__all__ = ["LINE_BATCHES", "MAX_PROBES", "PeakProbe", "max_batch", "measure_peak", "measure_profile"]


class PeakProbe:
    """Peak memory of one step: tracemalloc on the CPU, CuPy's pool on the GPU."""

    def __init__(self, device: str):
        self.device = device
        if device == "gpu":
            self.gpu = gpu_memory_peak()
            self.tracker = self.gpu.__enter__()
        else:
            tracemalloc.start()

    def stop(self) -> int:
        if self.device == "gpu":
            self.gpu.__exit__(None, None, None)
            return int(self.tracker.peak)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak


def measure_peak(model, x, labels, policy: Policy | None = None) -> int:
    """Peak memory (bytes above the start) over forward + backward: traced host
    memory (tracemalloc) for a model on the CPU; for a model on the GPU, the bytes
    in use in CuPy's memory pool (``backend.gpu_memory_peak``; ``x`` is moved to
    the GPU first, outside the measurement)."""
    policy = current_policy() if policy is None else policy
    x = x if isinstance(x, Tensor) else Tensor(x)
    params = model.parameters()
    if params and on_gpu(params[0].data):
        model.zero_grad()
        if not on_gpu(x.data):
            x = x.to("gpu")
        with gpu_memory_peak() as tracker:
            with storage_policy(policy):
                loss = forward_loss(model, x, labels)
            loss.backward()
            del loss
            return tracker.peak
    return int(measure_profile(model, x, labels, policy).max())


def measure_profile(model, x, labels, policy: Policy | None = None) -> np.ndarray:
    """The measured peak (traced host memory above the start, tracemalloc) of each
    stretch of forward + backward between two ops: after every op's forward and
    every backward step (``tensor.observing``) -> int64 array in run order; its
    maximum is ``measure_peak``. The same model and policy give the same stretches
    at every batch, each one's peak linear in the batch (``max_batch``)."""
    policy = current_policy() if policy is None else policy
    x = x if isinstance(x, Tensor) else Tensor(x)
    model.zero_grad()
    peaks = []
    # An earlier run's garbage is freed now, not inside this measurement, and no collection
    # runs during it: the engine makes no reference cycles, but a collection's pause shifts
    # how the conv workers' chunk buffers interleave (peaks 5% lower, at random).
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]

        def mark():
            peaks.append(tracemalloc.get_traced_memory()[1] - start)
            tracemalloc.reset_peak()

        with observing(mark):
            with storage_policy(policy):
                loss = forward_loss(model, x, labels)
            loss.backward()
        mark()
    finally:
        tracemalloc.stop()
        if gc_was_enabled:
            gc.enable()
    return np.array(peaks, dtype=np.int64)


def _stretch_lines(pa, pb, a: int, b: int, budget: int) -> tuple[int, float]:
    """The largest batch at which no stretch's line (``measure_profile`` at ``a`` and
    ``b`` images, one line per stretch) passes ``budget`` -> (batch, per-image bytes of
    the stretch that binds it). Lines that do not grow never bind."""
    slope = (pb - pa) / (b - a)
    grows = slope > 0
    if not grows.any():
        return b, 0.0
    at = b + np.floor((budget - pb[grows]) / slope[grows])
    k = int(np.argmin(at))
    return int(at[k]), float(slope[grows][k])


def max_batch(model, input_shape, num_classes: int, policy: Policy, budget: int, log=None,
              details: dict | None = None, confirm: bool = True, confirm_next: bool = False
              ) -> tuple[int, int | None]:
    """The largest batch whose measured peak (forward + backward) fits ``budget``
    bytes -> (batch, its measured peak).

    Prediction, then probes. Above a few images (once every conv worker's chunk is
    full) the peak of each stretch between two ops (``measure_profile``) is linear
    in the batch: the ledger grows by the bytes stored per image and the transients
    by a few activation buffers per image (docs/storage.md, "Transients"); which
    stretch holds the peak can change with the batch (the workspaces, fixed, weigh
    less in a large one). The profiles of the two largest ``LINE_BATCHES`` that fit
    give one line per stretch; the prediction is the largest batch under which none
    passes the budget, and it is measured. When it fits and the lines put one image
    more over the budget, that is the answer (one large probe; ``confirm_next``:
    measure the next batch too). Otherwise the line through the nearest measured
    peaks below and above the budget refines it until a measured batch fits and the
    next one measured does not, at most ``MAX_PROBES`` large probes.
    ``details["confirmed"]``: the next batch was measured over the budget.
    ``confirm=False`` skips the large probes: the answer is the prediction (its
    peak is returned as None; ``details["residual"]``: how far the lines miss the
    peak of ``LINE_BATCHES[0]`` images, in bytes). Budgets under the peak of 64,
    32, 16 or 4 images are searched between the measured points the same way; under
    the peak of 2 images: a ValueError. ``details`` (a dict) receives the
    prediction, the probes and ``confirmed``."""
    rng = np.random.default_rng(0)
    measured, profiles = {}, {}

    def peak(n):
        if n not in measured:
            x = rng.standard_normal((n,) + tuple(input_shape), dtype=np.float32)
            profiles[n] = measure_profile(model, x, rng.integers(0, num_classes, n), policy)
            measured[n] = int(profiles[n].max())
            if log:
                log(f"  batch {n:>6}: measured peak {fmt_bytes(measured[n])}")
        return measured[n]

    if peak(4) > budget:                   # below the line's first point: the smallest batches
        small = [n for n in (2, 3) if peak(n) <= budget]
        if not small:
            raise ValueError(f"even a batch of 2 needs a measured peak of {fmt_bytes(measured[2])}, "
                             f"more than the budget of {fmt_bytes(budget)}")
        return small[-1], measured[small[-1]]
    for n in LINE_BATCHES:
        if peak(n) > budget:
            break
    fits = sorted(n for n in measured if measured[n] <= budget)
    a, b = fits[-2:] if len(fits) >= 2 else sorted(measured)[:2]
    predicted, slope = _stretch_lines(profiles[a], profiles[b], a, b, budget)
    predicted = max(predicted, 1)
    # how far the lines miss the smallest of the line's batches (0 on a straight stretch)
    first = LINE_BATCHES[0]
    residual = None
    if first in measured and first not in (a, b):
        lines = profiles[b] + (profiles[b] - profiles[a]) / (b - a) * (first - b)
        residual = int(measured[first] - lines.max())
    if details is not None:
        details.update(predicted=predicted, per_image=slope)
    if log:
        log(f"  predicted from the lines of {len(profiles[b])} stretches through {a} and {b} images "
            f"({fmt_bytes(slope)} per image where it binds): {predicted}")
    for _ in range(MAX_PROBES):
        fits = [n for n, p in measured.items() if p <= budget]
        over = [n for n, p in measured.items() if p > budget]
        lo, hi = max(fits), min(over, default=None)
        if hi == lo + 1:
            break                                           # lo fits and lo + 1 does not
        if not confirm and predicted > max(LINE_BATCHES):
            break                                           # the lines' answer, not measured
        if not confirm_next and lo == predicted and measured[lo] + slope > budget:
            break                                           # the lines put lo + 1 over: not measured
        if hi is None:       # the lines through the two largest fits, at least one image on
            p = sorted(fits)[-2]
            guess = max(lo + 1, _stretch_lines(profiles[p], profiles[lo], p, lo, budget)[0])
        else:                # interpolate between the nearest fit and the nearest overshoot
            guess = lo + int((budget - measured[lo]) * (hi - lo) // max(measured[hi] - measured[lo], 1))
            guess = min(max(guess, lo + 1), hi - 1)
        if not measured.keys() & {predicted} and predicted > lo and (hi is None or predicted < hi):
            guess = predicted                               # the prediction first
        peak(guess)
    best = max(n for n, p in measured.items() if p <= budget)
    if not confirm and predicted > max(LINE_BATCHES):
        best = predicted
    if details is not None:
        details.update(probes=sorted(measured), measured=best in measured, confirmed=best + 1 in measured,
                       residual=residual)
    return best, measured.get(best)


#: the most probes above the line's batches that ``max_batch`` makes
MAX_PROBES = 8
#: the small batches whose measured profiles give ``max_batch`` its lines (through the two largest
#: that fit: conv chunks are full from a few images on, and from about 128 images the stretches' peaks
#: are straight to within 0.2% in ResNets on 32x32 inputs)
LINE_BATCHES = (32, 64, 128, 256)
