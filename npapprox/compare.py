"""``npapprox compare``: several storage policies (and seeds) trained from the same
seed, summarised as a table and as plots (training loss against iterations and
against wall-clock time, test accuracy, stored-activation memory)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def run_one(cfg, progress: bool = True) -> dict:
    """Train one configuration; returns its epoch history and per-step log."""
    from .train import Trainer  # noqa: PLC0415

    trainer = Trainer(cfg, progress=progress)
    trainer.run()
    steps = []
    if cfg.out:
        with open(Path(cfg.out) / "steps.jsonl") as f:
            steps = [json.loads(line) for line in f]
    return {"history": trainer.history, "steps": steps}


def _final(runs, policy, seeds, key):
    return np.array([runs[(policy, s)]["history"][-1][key] for s in seeds], dtype=float)


def _fmt(values, scale=1.0, digits=3):
    v = values * scale
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def summarize(runs, policies, seeds) -> str:
    """A markdown table: final accuracy and loss (mean ± sample std over seeds),
    stored activations (and the ratio to the first policy), peak, speed."""
    base = _final(runs, policies[0], seeds, "stored_bytes").mean()
    head = ("| policy | test acc | train loss | stored act. MiB | vs " + policies[0] +
            " | peak MiB | images/s | train time s |")
    rows = [head, "|" + "---|" * 8]
    for p in policies:
        stored = _final(runs, p, seeds, "stored_bytes")
        rows.append(f"| {p} | {_fmt(_final(runs, p, seeds, 'test_acc'))} | "
                    f"{_fmt(_final(runs, p, seeds, 'train_loss'), 1, 4)} | {stored.mean() / 2**20:.2f} | "
                    f"{base / stored.mean():.2f}x | {_fmt(_final(runs, p, seeds, 'peak_bytes'), 2**-20, 1)} | "
                    f"{_fmt(_final(runs, p, seeds, 'images_per_s'), 1, 0)} | {_fmt(_final(runs, p, seeds, 'time'), 1, 1)} |")
    n = f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sample std" if len(seeds) > 1 else f"seed {seeds[0]}"
    return "\n".join(rows) + f"\n\n{n}; accuracy and loss after the last epoch."


def write_csv(runs, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        keys = ["epoch", "iteration", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                "stored_bytes", "peak_bytes", "images_per_s"]
        w.writerow(["policy", "seed"] + keys)
        for (policy, seed), run in runs.items():
            for row in run["history"]:
                w.writerow([policy, seed] + [row[k] for k in keys])


def plot(runs, policies, seeds, out: Path) -> list:
    """Four PNGs in ``out``; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    written = []

    def band(ax, xs_of, ys_of, label):
        """Mean curve over seeds with a min-max band (curves cut to the shortest)."""
        xs = [np.asarray(xs_of(runs[(label, s)])) for s in seeds]
        ys = [np.asarray(ys_of(runs[(label, s)])) for s in seeds]
        n = min(len(y) for y in ys)
        x = np.mean([v[:n] for v in xs], axis=0)
        y = np.stack([v[:n] for v in ys])
        line, = ax.plot(x, y.mean(axis=0), label=label)
        if len(seeds) > 1:
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2)

    def smooth(v, k=10):
        v = np.asarray(v, float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v

    figures = [
        ("loss_vs_iterations.png", "iteration", "training loss (moving average)",
         lambda r: smooth([s["iteration"] for s in r["steps"]]), lambda r: smooth([s["loss"] for s in r["steps"]])),
        ("loss_vs_time.png", "training wall-clock time (s)", "training loss (moving average)",
         lambda r: smooth([s["time"] for s in r["steps"]]), lambda r: smooth([s["loss"] for s in r["steps"]])),
        ("test_accuracy.png", "epoch", "test accuracy",
         lambda r: [h["epoch"] for h in r["history"]], lambda r: [h["test_acc"] for h in r["history"]]),
    ]
    for name, xlabel, ylabel, xs_of, ys_of in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            band(ax, xs_of, ys_of, p)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if "loss" in name:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    stored = [_final(runs, p, seeds, "stored_bytes").mean() / 2**20 for p in policies]
    peak = [_final(runs, p, seeds, "peak_bytes").mean() / 2**20 for p in policies]
    x = np.arange(len(policies))
    ax.bar(x - 0.2, stored, 0.4, label="stored for backward (ledger)")
    ax.bar(x + 0.2, peak, 0.4, label="measured peak (tracemalloc)")
    ax.set_xticks(x, policies)
    ax.set_ylabel("MiB per training step")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    written.append(out / "memory.png")
    return written
