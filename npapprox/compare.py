"""``npapprox compare``: several storage policies (and seeds) trained from the same
seed, summarised as a table and as plots (training loss against iterations and
against wall-clock time, test accuracy, gradient error against exact,
stored-activation memory).

Within each seed the policies run one after the other (exact, paper8, ... then
the next seed), so a drift of the machine's load spreads over all policies. A
comparison owns its output folder: ``start`` replaces an earlier comparison
there (recognised by ``compare.json``) and refuses a folder holding other files.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from .backend import to_device
from .runfolder import STEPS, claim, read_jsonl
from .study import study_gradients
from .train import make_trainer

MARKER = "compare.json"
PLOTS = ("loss_vs_iterations.png", "loss_vs_time.png", "test_accuracy.png", "gradient_error.png", "memory.png")
OUTPUTS = ("results.md", "results.csv") + PLOTS
GRAD_KEYS = ("grad_rel_err", "grad_cosine")


def run_folder(policy: str, seed: int) -> str:
    return f"{policy}/seed{seed}"


def start(out, policies, seeds, log=print) -> None:
    """Make ``out`` ready for a new comparison: remove an earlier comparison's runs and
    results there (never other files), refuse a folder that holds anything else,
    and record this comparison's runs in ``compare.json``."""
    out = Path(out)
    marker = out / MARKER
    if marker.exists():
        try:
            folders = [f for f in json.loads(marker.read_text())["runs"]
                       if re.fullmatch(r"[A-Za-z0-9_.-]+/seed-?[0-9]+", f) and ".." not in f]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{marker} is damaged: remove {out} or choose another --out") from None
        for folder in folders:
            if (out / folder).is_dir():
                claim(out / folder, overwrite=True)
                for empty in (out / folder, (out / folder).parent):
                    try:
                        empty.rmdir()
                    except OSError:                    # not empty: someone else's files stay
                        pass
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        log(f"note: {out} held an earlier comparison; it is replaced by this one")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds other files, not a comparison: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"policies": list(policies), "seeds": list(seeds),
                                  "runs": [run_folder(p, s) for s in seeds for p in policies]}) + "\n")


def gradient_probe(policy: str, batch_size: int):
    """``probe(trainer)`` for ``Trainer``: the relative error ||g - g_exact|| / ||g_exact||
    and the cosine of ``policy``'s gradient against the exact one, over all parameter
    gradients, on the first ``batch_size`` training images (the same batch every epoch)
    at the trainer's current weights (``study.study_gradients``; one draw), measured
    by the engine (a torch run's model converted by ``bridge.from_torch``)."""

    def probe(trainer) -> dict:
        d = trainer.data
        model = trainer.engine_model()          # the torch engine's model: its npapprox copy, on the host
        x, y = d.x_train[:batch_size], to_device(d.y_train[:batch_size], trainer.cfg.device if model is
                                                 trainer.model else "cpu")
        st = study_gradients(model, x, y, [policy], repeats=1, include_exact=False)
        stats = st.stats(st.policies[0])
        return {"grad_rel_err": stats["rel_err"], "grad_cosine": stats["cosine"]}

    return probe


def run_one(cfg, progress: bool = True) -> dict:
    """Train one configuration (a fresh run in ``cfg.out``) with the gradient probe;
    returns its epoch history and per-step log."""

    trainer = make_trainer(cfg, progress=progress, probe=gradient_probe(cfg.policy, cfg.batch_size))
    trainer.run()
    steps = read_jsonl(Path(cfg.out) / STEPS) if cfg.out else []
    return {"history": trainer.history, "steps": steps}


def _final(runs, policy, seeds, key):
    """The last epoch's ``key`` of each seed's run (NaN where it is missing)."""
    values = [runs[(policy, s)]["history"][-1].get(key) for s in seeds]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _fmt(values, scale=1.0, digits=3):
    """Mean ± sample std over the seeds that have a value; "-" where none has."""
    v = values[np.isfinite(values)] * scale
    if not len(v):
        return "-"
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def title(cfg) -> str:
    """What the plots and the table are about: model, data, batch."""
    width = f" (width {cfg.width})" if cfg.width else ""
    return f"{cfg.model}{width} on {cfg.data}, batch {cfg.batch_size}"


def summarize(runs, policies, seeds, heading: str = "") -> str:
    """A markdown table: final accuracy and loss (mean ± sample std over seeds), the
    gradient's relative error and cosine against exact, stored activations (and the
    ratio to the first policy), peak, speed."""
    base = _final(runs, policies[0], seeds, "stored_bytes").mean()
    head = ("| policy | test acc | train loss | grad rel. err | grad cosine | stored act. MiB | vs " + policies[0] +
            " | peak MiB | images/s | train time s |")
    rows = ([heading, ""] if heading else []) + [head, "|" + "---|" * 10]
    for p in policies:
        stored = _final(runs, p, seeds, "stored_bytes")
        rows.append(f"| {p} | {_fmt(_final(runs, p, seeds, 'test_acc'))} | "
                    f"{_fmt(_final(runs, p, seeds, 'train_loss'), 1, 4)} | "
                    f"{_fmt(_final(runs, p, seeds, 'grad_rel_err'), 1, 3)} | "
                    f"{_fmt(_final(runs, p, seeds, 'grad_cosine'), 1, 4)} | {stored.mean() / 2**20:.2f} | "
                    f"{base / stored.mean():.2f}x | {_fmt(_final(runs, p, seeds, 'peak_bytes'), 2**-20, 1)} | "
                    f"{_fmt(_final(runs, p, seeds, 'images_per_s'), 1, 0)} | "
                    f"{_fmt(_final(runs, p, seeds, 'time'), 1, 1)} |")
    n = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sample std" if len(seeds) > 1
         else f"seed {seeds[0]}")
    return "\n".join(rows) + (
        f"\n\n{n}; accuracy, loss and gradient error after the last epoch (the gradient against the exact one "
        "on one fixed training batch at the policy's own weights, over all parameters). images/s and time: "
        "measured on this machine in this one run, the policies taking turns within each seed; "
        "\"-\": no timed step (the first step of each epoch measures the peak and is not timed).")


def write_csv(runs, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        keys = ["epoch", "iteration", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                "stored_bytes", "peak_bytes", "images_per_s", *GRAD_KEYS]
        w.writerow(["policy", "seed"] + keys)
        for (policy, seed), run in runs.items():
            for row in run["history"]:
                w.writerow([policy, seed] + [row.get(k) for k in keys])


def plot(runs, policies, seeds, out: Path, heading: str = "") -> list:
    """The PNGs of ``PLOTS`` in ``out``, titled ``heading``; returns their paths
    ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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
        line, = ax.plot(x, y.mean(axis=0), label=label, marker="o" if n < 30 else None)
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
        ("gradient_error.png", "epoch", "gradient relative error against exact",
         lambda r: [h["epoch"] for h in r["history"]], lambda r: [h.get("grad_rel_err", np.nan) for h in r["history"]]),
    ]
    for name, xlabel, ylabel, xs_of, ys_of in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        shown = [p for p in policies if not (name == "gradient_error.png" and p == "exact")]  # 0 on a log scale
        if not shown:
            continue
        for p in shown:
            band(ax, xs_of, ys_of, p)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(heading + (" (exact: 0)" if len(shown) < len(policies) else ""), fontsize=10)
        if "loss" in name or name == "gradient_error.png":
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
    ax.set_title(heading, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    written.append(out / "memory.png")
    return written
