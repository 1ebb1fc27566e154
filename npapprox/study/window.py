"""The BN window experiment: fixed windows of +-W against the fitted one."""
from __future__ import annotations

import functools
import types
from pathlib import Path

import numpy as np

from .. import nn
from ..data import load_dataset
from ..policy import Exact, policy_from_name
from ..window import WindowMonitor, monitoring, names_of
from .experiments import StudyConfig, config_model, exact_trainer, or_default, train_policy
from .grads import INPUT, gradients, sample_batches
from .plots import plot_window
from .tables import fmt, ratio, sumsq, window_table, write_results


def cifar_like(n_train: int = 512, n_test: int = 256, classes: int = 10, size: int = 32, seed: int = 0):
    """CIFAR-shaped random-ish data (3 x size x size, ``classes`` classes): each class a
    smooth random template (4x4 noise blown up), each image ``0.5 template + N(0, 1)``,
    minus its own mean. Learnable, not trivial; what ``load_dataset`` returns, in the
    attributes the study uses."""

    rng = np.random.default_rng([seed, 0xC1FA])
    cell = -(-size // 4)
    templates = np.kron(rng.standard_normal((classes, 3, 4, 4)), np.ones((1, 1, cell, cell)))[..., :size, :size]

    def draw(n):
        y = rng.integers(0, classes, n)
        x = 0.5 * templates[y] + rng.standard_normal((n, 3, size, size))
        return (x - x.mean(axis=(1, 2, 3), keepdims=True)).astype(np.float32), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = draw(n_train), draw(n_test)
    return types.SimpleNamespace(name="random", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                                 num_classes=classes, in_channels=3, image_size=size)


def window_policies(bits=(2, 4, 8), windows=(2, 3, 4, 6)) -> list:
    """``paperK-wW`` for every K and W, then ``fitK``, K by K."""
    return [p for k in bits for p in [f"paper{k}-w{w:g}" for w in windows] + [f"fit{k}"]]


def _window_point(model, x, y, labels, names) -> tuple:
    """Relative error and cosine (all parameters; and the input gradient) of each policy on
    one batch, and the per-unit saturation rows (``window.unit_row``) of its forward pass."""

    exact = gradients(model, x, y, Exact(), input_grad=True)
    params = [n for n in exact if n != INPUT]
    ex = np.sqrt(sum(sumsq(exact[n]) for n in params))
    rows, units = [], []
    for label in labels:
        policy, monitor = policy_from_name(label), WindowMonitor(names)
        with monitoring(policy, monitor):
            g = gradients(model, x, y, policy, input_grad=True)
        diff = np.sqrt(sum(sumsq(g[n] - exact[n]) for n in params))
        dot = sum(float(np.dot(g[n].ravel(), exact[n].ravel())) for n in params)
        gn = np.sqrt(sum(sumsq(g[n]) for n in params))
        units += [{"policy": label, **u} for u in monitor.rows]
        rows.append({"policy": label, "rel_err": ratio(diff, ex), "cosine": ratio(dot, gn * ex),
                     "input_rel_err": ratio(np.sqrt(sumsq(g[INPUT] - exact[INPUT])), np.sqrt(sumsq(exact[INPUT]))),
                     "clipped": float(np.mean([u["clipped"] for u in monitor.rows])) if monitor.rows else 0.0,
                     "flagged_units": sum(u["outside"] > 0 for u in monitor.rows)})
    return rows, units


def run_window(cfg: StudyConfig, log=print) -> dict:
    """Gradient error of fixed windows (+-W, ``paperK-wW``) and the fitted window (``fitK``)
    at initialisation and over exact training, on digits and on CIFAR-shaped random-ish data,
    over ``window_seeds``; then a short training run of ``window_train`` policies per seed."""

    out = Path(cfg.out) / "window"
    out.mkdir(parents=True, exist_ok=True)
    labels = window_policies(cfg.window_bits, cfg.windows)
    model_name, total = config_model(cfg), or_default(cfg.iterations, 50)
    rows, units = [], []
    for data_name in cfg.window_data:
        for seed in cfg.window_seeds:
            data = (cifar_like(seed=seed) if data_name == "random" else
                    load_dataset(data_name, path=cfg.data_path, size=cfg.size, seed=seed))
            nn.manual_seed(seed)
            model = nn.build_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels,
                                   input_size=data.image_size, width=cfg.width)
            names = names_of(model)

            def checkpoint(it, since, data=data, model=model, names=names, seed=seed, data_name=data_name):
                x, y = sample_batches(data.x_train, data.y_train, cfg.batch_size, 1, seed)[0]
                point, point_units = _window_point(model, x, y, labels, names)
                key = {"data": data_name, "seed": seed, "iteration": it}
                rows.extend({**key, **r} for r in point)
                units.extend({**key, **u} for u in point_units)
                log(f"{data_name:<7} seed {seed} it {it:>4}: " + "  ".join(
                    f"{r['policy']} {fmt(r['rel_err'])}" for r in point))

            exact_trainer(model, data, total, cfg.batch_size, seed, cfg.lr).fit(cfg.every, checkpoint)
    train_rows = []
    for policy in cfg.window_train:
        for seed in cfg.window_seeds:
            last = train_policy(cfg, model_name, "digits", None, policy, seed,
                                or_default(cfg.window_train_iterations, 3 * total))
            train_rows.append({"policy": policy, "seed": seed, "test_acc": last["test_acc"],
                               "train_loss": last["train_loss"], "seconds": last["seconds"]})
            log(f"train {policy:<8} seed {seed}: test acc {last['test_acc']:.4f}  train loss "
                f"{last['train_loss']:.4f}")
    table = window_table(rows, train_rows)
    title = (f"{model_name}, batch {cfg.batch_size}: gradient error of the BN window "
             f"(seeds {', '.join(map(str, cfg.window_seeds))})")
    csvs = {"units.csv": units, **({"training.csv": train_rows} if train_rows else {})}
    files = write_results(out, "window", cfg, title, table, rows, log, functools.partial(plot_window, rows, train_rows),
                          csvs, training=train_rows)
    return {"rows": rows, "units": units, "training": train_rows, "files": files, "title": title}
