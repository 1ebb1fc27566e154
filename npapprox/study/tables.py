"""Numbers as text: formatting, CSV and JSON output, the experiments' markdown tables."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np


def sumsq(a) -> float:
    return float(np.dot(a.ravel(), a.ravel()))


def ratio(a, b) -> float:
    a, b = float(a), float(b)
    if a == 0:
        return 0.0
    return a / b if b > 0 else float("inf")


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if not np.isfinite(v):
        return str(v)
    return f"{v:.{digits}e}" if (abs(v) < 1e-2 or abs(v) >= 1e3) else f"{v:.{digits + 1}f}"


def mean_sd(values) -> str:
    v = np.asarray(values, float)
    return fmt(v.mean()) + (f" ± {fmt(v.std(ddof=1))}" if len(v) > 1 else "")


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_csv(path: Path, rows: list) -> Path:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def write_results(out: Path, name: str, cfg, title: str, table: str, rows: list, log, plot=None,
                  csvs: dict | None = None, **more) -> list:
    """Print ``title`` and ``table``; write ``{name}.csv`` (``rows``), one CSV per entry
    of ``csvs`` (file name -> rows), ``{name}.json`` (the config, the rows and
    ``more``), ``table.md`` and, with ``plot(path, title)``, ``{name}.png`` into
    ``out``. Returns the paths written."""
    log(f"\n{title}\n")
    log(table)
    files = [write_csv(out / f"{name}.csv", rows)]
    files += [write_csv(out / f, r) for f, r in (csvs or {}).items()]
    (out / f"{name}.json").write_text(json.dumps(jsonable({"config": dataclasses.asdict(cfg), "rows": rows, **more}),
                                                 indent=1))
    (out / "table.md").write_text(table + "\n")
    png = plot(out / f"{name}.png", title) if plot is not None else None
    return files + [out / f"{name}.json", out / "table.md"] + ([png] if png else [])


def activations_table(rows) -> str:
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows)]
    head = ["policy"] + [f"{a}: rel. error (error / noise)" for a in acts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        cells = [p]
        for a in acts:
            r = next((r for r in rows if r["activation"] == a and r["policy"] == p), None)
            cells.append("-" if r is None else f"{fmt(r['rel_err'])} ({fmt(r.get('err_over_noise'))})")
        lines.append("| " + " | ".join(cells) + " |")
    noise = [next((r.get("noise") for r in rows if r["activation"] == a), None) for a in acts]
    lines.append("")
    lines.append("minibatch noise (x ||g_exact||): "
                 + ", ".join(f"{a} {fmt(n)}" for a, n in zip(acts, noise, strict=True)))
    return "\n".join(lines)


def training_table(points) -> str:
    policies = [p for p in points[0]["study"].policies if p != "exact"]
    head = ["iteration", "train loss", "test acc", "noise"] + policies
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pt in points:
        r = {row["policy"]: row for row in pt["overall"]}
        noise = next(iter(r.values())).get("noise")
        loss = f"{pt['train_loss']:.4f}" if np.isfinite(pt["train_loss"]) else "-"
        lines.append("| " + " | ".join([str(pt["iteration"]), loss, f"{pt['test_acc']:.3f}",
                                        fmt(noise)] + [fmt(r[p]["rel_err"]) for p in policies]) + " |")
    lines.append("")
    lines.append("Entries: relative gradient error ||g - g_exact|| / ||g_exact|| on a fixed batch; noise: the "
                 "standard deviation of a minibatch gradient in the same units; train loss: mean since the "
                 "previous checkpoint.")
    return "\n".join(lines)


def optimizers_table(rows) -> str:
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    head = ["optimizer (lr)"] + [f"{p}: test acc / train loss" for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in opts:
        lr = next(r["lr"] for r in rows if r["optimizer"] == o)
        cells = [f"{o} ({lr:g})"]
        for p in policies:
            sel = [r for r in rows if r["optimizer"] == o and r["policy"] == p]
            acc = np.array([r["test_acc"] for r in sel])
            loss = np.array([r["train_loss"] for r in sel])
            spread = f" ± {acc.std(ddof=1):.3f}" if len(acc) > 1 else ""
            cells.append(f"{acc.mean():.3f}{spread} / {loss.mean():.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append("")
    lines.append(f"mean ± sample std over seeds {', '.join(map(str, seeds))}; train loss: mean over the last epoch.")
    return "\n".join(lines)


def window_table(rows, train_rows=()) -> str:
    """Relative gradient error (mean ± sd over seeds) per policy, data set, at the first and
    last measured iteration; the fixed windows' mean clipped fraction; the training runs."""
    datas = list(dict.fromkeys(r["data"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    first, last = min(r["iteration"] for r in rows), max(r["iteration"] for r in rows)
    head = ["policy"] + [f"{d}, it {it}" for d in datas for it in dict.fromkeys((first, last))]
    head += ["cosine (first)", "input-grad error (first)", "clipped (first)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        cells = [p]
        for d in datas:
            for it in dict.fromkeys((first, last)):
                cells.append(mean_sd([r["rel_err"] for r in rows if (r["policy"], r["data"], r["iteration"])
                                       == (p, d, it)]))
        sel = [r for r in rows if r["policy"] == p and r["iteration"] == first]
        cells += [f"{np.mean([r['cosine'] for r in sel]):.5f}", mean_sd([r["input_rel_err"] for r in sel]),
                  f"{100 * np.mean([r['clipped'] for r in sel]):.3f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Entries: ||g - g_exact|| / ||g_exact|| over all parameters, mean ± sample sd over seeds (the "
                 "seed draws the model, the batch and, for the random set, the data); clipped: fraction of the "
                 "stored units' values outside the window, mean over units.")
    if train_rows:
        lines += ["", "| policy | test acc | final train loss |", "|---|---|---|"]
        for p in dict.fromkeys(r["policy"] for r in train_rows):
            sel = [r for r in train_rows if r["policy"] == p]
            lines.append(f"| {p} | {mean_sd([r['test_acc'] for r in sel])} | "
                         f"{mean_sd([r['train_loss'] for r in sel])} |")
    return "\n".join(lines)
