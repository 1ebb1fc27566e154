"""The study's figures (matplotlib, optional: each function returns None without it)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..policy import POLICIES, parse_policy_name
from .stats import Study


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def with_pyplot(plot):
    """Decorator: ``plot(plt, *args)`` gets matplotlib's pyplot (Agg) as ``plt``;
    without matplotlib the call returns None."""
    @functools.wraps(plot)
    def call(*args, **kwargs):
        plt = pyplot()
        return None if plt is None else plot(plt, *args, **kwargs)
    return call


def _family(label):
    """(colormap, line style, shade) of a policy name: its family's registered style
    (``policy.POLICIES``), stochastic names in purple, darker for more bits."""
    try:
        spec = parse_policy_name(label)
    except ValueError:
        return "Greys", "-", 0.6
    cmap, ls = POLICIES[spec.family].style
    if spec.stochastic:
        cmap, ls = "Purples", (0, (5, 1.5))
    return cmap, ls, {1: 0.35, 2: 0.45, 4: 0.7, 8: 0.95}.get(spec.bits, 0.6)


def line_style(plt, label):
    """Colour and line style of a policy: one colour family per kind, darker for more bits."""
    cmap, ls, shade = _family(label)
    return {"color": plt.get_cmap(cmap)(shade), "linestyle": ls}


def save_figure(plt, fig, path, title: str, legend_beside=None) -> Path:
    """Title, layout, a 100-dpi PNG at ``path``; the figure is closed. ``legend_beside``:
    a panel whose legend goes to its right."""
    if legend_beside is not None:
        legend_beside.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def log_panel(ax, xlabel: str, ylabel: str | None = None, title: str | None = None) -> None:
    """A panel with a log y axis, its labels and a light grid."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)


def positive(values):
    """Zeros (an exactly stored layer) as gaps on a log axis."""
    return [v if v > 0 else np.nan for v in values]


@with_pyplot
def plot_depth(plt, study: Study, path, title: str = "", policies=None) -> Path | None:
    """Relative gradient error against layer depth, one line per policy: weight
    layers (conv, linear) and BN layers in two panels, with the minibatch noise
    (same units) as a grey band."""
    policies = [p for p in (policies or study.policies) if p != "exact"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    groups = (("conv / linear weights", lambda r: r["kind"] in ("Conv2d", "Linear")),
              ("BN (gamma, beta)", lambda r: r["kind"] == "BatchNorm2d"))
    for ax, (name, keep) in zip(axes, groups, strict=True):
        for p in policies:
            rows = [r for r in study.layer_rows_of(p) if keep(r)]
            if rows:
                ax.plot([r["depth"] for r in rows], positive([r["rel_err"] for r in rows]), label=p, lw=1.4,
                        marker=".", ms=3, **line_style(plt, p))
        rows = [r for r in study.layer_rows_of(policies[0]) if keep(r) and "noise" in r] if policies else []
        if rows:
            ax.plot([r["depth"] for r in rows], [r["noise"] for r in rows], color="0.4", lw=3, alpha=0.35,
                    label="SGD minibatch noise")
        log_panel(ax, "layer depth (forward order)", title=name)
    axes[0].set_ylabel("||g - g_exact|| / ||g_exact||  (gaps: 0, stored exactly)")
    return save_figure(plt, fig, path, title, legend_beside=axes[1])


@with_pyplot
def plot_training(plt, points: list, path, title: str = "") -> Path | None:
    """Overall relative error (and error / noise) against the training iteration."""
    if not points:
        return None
    policies = [p for p in points[0]["study"].policies if p != "exact"]
    its = [pt["iteration"] for pt in points]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for p in policies:
        rows = [next(r for r in pt["overall"] if r["policy"] == p) for pt in points]
        axes[0].plot(its, positive([r["rel_err"] for r in rows]), label=p, marker=".", lw=1.4, **line_style(plt, p))
        if "err_over_noise" in rows[0]:
            axes[1].plot(its, positive([r["err_over_noise"] for r in rows]), label=p, marker=".", lw=1.4,
                         **line_style(plt, p))
    noise = [next(iter(pt["overall"]))["noise"] if "noise" in pt["overall"][0] else None for pt in points]
    if all(v is not None for v in noise):
        axes[0].plot(its, noise, color="0.4", lw=3, alpha=0.35, label="SGD minibatch noise")
        axes[1].axhline(1.0, color="0.4", lw=3, alpha=0.35)
    for ax, lab in zip(axes, ("||g - g_exact|| / ||g_exact||", "error / minibatch noise"), strict=True):
        log_panel(ax, "training iteration (exact SGD)", lab)
    return save_figure(plt, fig, path, title, legend_beside=axes[1])


@with_pyplot
def plot_activations(plt, rows: list, path, title: str = "") -> Path | None:
    """Grouped bars: overall relative error per policy, one group per activation."""
    if not rows:
        return None
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "exact"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(acts)
    for j, a in enumerate(acts):
        vals = [next((r["rel_err"] for r in rows if r["activation"] == a and r["policy"] == p), np.nan)
                for p in policies]
        ax.bar(np.arange(len(policies)) + (j - (len(acts) - 1) / 2) * width, positive(vals), width, label=a)
    noise = {a: next((r.get("noise") for r in rows if r["activation"] == a), None) for a in acts}
    for j, a in enumerate(acts):
        if noise[a] is not None:
            ax.axhline(noise[a], color=f"C{j}", ls=":", lw=1)
    ax.set_xticks(np.arange(len(policies)))
    ax.set_xticklabels(policies, rotation=30, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("||g - g_exact|| / ||g_exact||  (no bar: 0)")
    ax.legend(title="activation (dotted: minibatch noise)", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(plt, fig, path, "")


@with_pyplot
def plot_optimizers(plt, rows: list, path, title: str = "") -> Path | None:
    """Final test accuracy per optimizer and policy (bars: mean over seeds; dots: seeds)."""
    if not rows:
        return None
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(policies)
    for ax, key, lab in ((axes[0], "test_acc", "final test accuracy"), (axes[1], "train_loss",
                                                                         "final training loss (last epoch)")):
        for j, p in enumerate(policies):
            pos = np.arange(len(opts)) + (j - (len(policies) - 1) / 2) * width
            vals = [[r[key] for r in rows if r["optimizer"] == o and r["policy"] == p] for o in opts]
            ax.bar(pos, [np.mean(v) for v in vals], width, label=p, color=f"C{j}", alpha=0.7)
            for k, v in enumerate(vals):
                ax.plot([pos[k]] * len(v), v, "k.", ms=4)
        ax.set_xticks(np.arange(len(opts)))
        ax.set_xticklabels(opts)
        ax.set_ylabel(lab)
        ax.grid(True, axis="y", alpha=0.3)
    accs = [r["test_acc"] for r in rows]
    axes[0].set_ylim(max(0.0, min(accs) - 0.05), 1.0)
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, path, title)


@with_pyplot
def plot_window(plt, rows, train_rows, path, title: str = "") -> Path | None:
    """Per data set: relative error against W for each K (solid: first iteration, dashed:
    last; bars: sd over seeds), the fitted window at the right; then the training runs."""
    if not rows:
        return None

    datas = list(dict.fromkeys(r["data"] for r in rows))
    first, last = min(r["iteration"] for r in rows), max(r["iteration"] for r in rows)
    fig, axes = plt.subplots(1, len(datas) + bool(train_rows), figsize=(5 * (len(datas) + bool(train_rows)), 4.2))
    axes = np.atleast_1d(axes)
    parsed = {p: parse_policy_name(p) for p in dict.fromkeys(r["policy"] for r in rows)}
    parsed = {p: s for p, s in parsed.items() if s.family in ("paper", "fit")}
    bits = sorted({s.bits for s in parsed.values()})
    ws = sorted({s.window for s in parsed.values() if s.window is not None})
    fit_x = (max(ws) if ws else 0) + 2
    for ax, d in zip(axes, datas, strict=False):
        for j, k in enumerate(bits):
            for it, ls in ((first, "-"), (last, "--")):
                pts = []
                for p, s in parsed.items():
                    if s.bits == k:
                        v = [r["rel_err"] for r in rows if (r["policy"], r["data"], r["iteration"]) == (p, d, it)]
                        if v:
                            pts.append((s.window if s.window is not None else fit_x, np.mean(v),
                                        np.std(v, ddof=1) if len(v) > 1 else 0.0, s.family))
                fixed = sorted(p for p in pts if p[3] == "paper")
                if fixed:
                    ax.errorbar([p[0] for p in fixed], [p[1] for p in fixed], [p[2] for p in fixed], color=f"C{j}",
                                linestyle=ls, marker="o", ms=4, capsize=2,
                                label=f"K={k}, it {it}" if it == first or first != last else f"K={k}")
                for p in pts:
                    if p[3] == "fit":
                        ax.errorbar([p[0]], [p[1]], [p[2]], color=f"C{j}", marker="*" if ls == "-" else "P",
                                    ms=10, capsize=2)
        ax.set_yscale("log")
        ax.set_xticks(ws + [fit_x])
        ax.set_xticklabels([f"{w:g}" for w in ws] + ["fitted"])
        ax.set_xlabel("window half-width W (batch std devs); right: the fitted window")
        ax.set_ylabel("relative gradient error")
        ax.set_title(f"{d} (solid/star: it {first}, dashed/plus: it {last})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if train_rows:
        ax = axes[-1]
        pols = list(dict.fromkeys(r["policy"] for r in train_rows))
        for i, p in enumerate(pols):
            acc = [r["test_acc"] for r in train_rows if r["policy"] == p]
            ax.bar(i, np.mean(acc), 0.6, color=f"C{i}", alpha=0.7)
            ax.plot([i] * len(acc), acc, "k.", ms=5)
        ax.set_xticks(range(len(pols)))
        ax.set_xticklabels(pols)
        accs = [r["test_acc"] for r in train_rows]
        ax.set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.02))
        ax.set_ylabel("test accuracy (digits), dots: seeds")
        ax.set_title("training with the approximate gradients", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, path, title)
