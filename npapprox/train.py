"""A minimal training loop (exact mode): SGD over epochs with progress bars.

The training issue extends this with schedules, checkpoints, CIFAR and the
storage policies; the loop's shape stays the same."""
from __future__ import annotations

import time

import numpy as np

from . import ops
from .data import iterate_minibatches
from .tensor import Tensor, no_grad


def evaluate(model, x, y, batch_size: int = 500) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    with no_grad():
        for xb, yb in iterate_minibatches(x, y, batch_size):
            logits = model(Tensor(xb))
            total_loss += ops.cross_entropy(logits, yb).item() * len(yb)
            correct += int((logits.numpy().argmax(axis=1) == yb).sum())
    model.train()
    return total_loss / len(y), correct / len(y)


def train_epoch(model, optimizer, x, y, batch_size: int, rng, progress=None) -> dict:
    """One pass over (x, y). Returns mean training loss, accuracy, images/s."""
    model.train()
    losses, correct, seen, t0 = [], 0, 0, time.perf_counter()
    for xb, yb in iterate_minibatches(x, y, batch_size, rng):
        logits = model(Tensor(xb))
        loss = ops.cross_entropy(logits, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        correct += int((logits.numpy().argmax(axis=1) == yb).sum())
        seen += len(yb)
        if progress is not None:
            progress.update(len(yb))
            progress.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{correct / seen:.3f}",
                                 img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return {"loss": float(np.mean(losses)), "acc": correct / seen,
            "images_per_s": seen / (time.perf_counter() - t0)}
