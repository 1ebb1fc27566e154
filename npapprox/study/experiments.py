"""The ready-made experiments (``npapprox study --experiment ...``)."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np

from .. import nn
from ..data import load_dataset
from ..train import TrainConfig, Trainer
from .grads import DEFAULT_POLICIES, sample_batches
from .plots import plot_activations, plot_depth, plot_optimizers, plot_training
from .stats import study_gradients
from .tables import activations_table, fmt, optimizers_table, training_table, write_results

EXPERIMENTS = ("depth", "activations", "training", "optimizers", "window")


@dataclasses.dataclass
class StudyConfig:
    """Options shared by the experiments (the command line's)."""

    model: str | None = None            # None: resnet20 (resnet8 for ``optimizers``)
    data: str = "digits"
    data_path: str | None = None
    size: int | None = None
    width: int | None = None
    batch_size: int = 64
    policies: tuple = DEFAULT_POLICIES
    repeats: int | None = None          # draws of a stochastic policy (None: 8; 4 for ``training``)
    noise_batches: int | None = None    # M minibatches of the yardstick (None: 16; 8 for ``training``)
    seed: int = 0
    warmup: int = 0                     # exact SGD iterations before measuring (depth, activations)
    lr: float = 0.1                     # SGD learning rate of warm-up / ``training``
    activations: tuple = ("relu", "sigmoid", "tanh", "gelu")
    iterations: int | None = None       # ``training``: 400; ``optimizers``: 200; ``window``: 50
    every: int = 50                     # ``training``: measure every N iterations
    optimizers: tuple = ("sgd:0.1", "adam:0.003", "rmsprop:0.001")   # name:lr
    opt_policies: tuple = ("exact", "paper4", "naive4")
    seeds: tuple = (0, 1)               # ``optimizers``
    systematic: bool = True             # ``depth``: also the error of the gradient averaged over M batches
    window_bits: tuple = (2, 4, 8)      # ``window``: K of the windows measured
    windows: tuple = (2, 3, 4, 6)       # ``window``: half-widths W of the fixed windows (paperK-wW)
    window_data: tuple = ("digits", "random")   # ``window``: data sets ("random": ``cifar_like``)
    window_seeds: tuple = (0, 1, 2)     # ``window``: seeds (model, batch, random data), the error bars
    window_train: tuple = ("paper4", "fit4", "paper2", "fit2")   # ``window``: policies trained per seed
    window_train_iterations: int | None = None   # ``window``: iterations of each training run (3 x iterations)
    out: str = "runs/study"


def _setup(cfg: StudyConfig, activation: str = "relu", model: str | None = None):
    data = load_dataset(cfg.data, path=cfg.data_path, size=cfg.size, seed=cfg.seed)
    nn.manual_seed(cfg.seed)
    net = nn.build_model(model or cfg.model or "resnet20", num_classes=data.num_classes,
                         in_channels=data.in_channels, input_size=data.image_size, width=cfg.width,
                         activation=activation)
    return data, net


def exact_trainer(model, data, iterations: int, batch_size: int, seed: int = 0, lr: float = 0.1) -> Trainer:
    """A ``Trainer`` of ``model`` on ``data`` with exact backprop: SGD (momentum 0.9,
    weight decay 2e-4 on kernels, cosine schedule over ``iterations``), batches as
    ``npapprox train`` draws them, no output folder. ``.fit(every, on_checkpoint)``
    trains; ``.evaluate()`` gives the test loss and accuracy."""
    tc = TrainConfig(model=type(model).__name__, policy="exact", optimizer="sgd", lr=lr, momentum=0.9,
                     schedule="cosine", epochs=None, iterations=iterations, batch_size=batch_size, seed=seed, out=None)
    return Trainer(tc, progress=False, log=lambda *_: None, model=model, data=data)


def _measure(cfg, model, data, repeats, noise_m, systematic, log):
    batches = sample_batches(data.x_train, data.y_train, cfg.batch_size, max(noise_m, 1), cfg.seed)
    x, y = batches[0]
    return study_gradients(model, x, y, cfg.policies, repeats=repeats, seed=cfg.seed,
                           noise_batches=batches if noise_m >= 2 else None, systematic=systematic, log=log)


def or_default(value, default):
    return default if value is None else value


def config_model(cfg, default="resnet20"):
    return cfg.model or default


def run_depth(cfg: StudyConfig, log=print) -> dict:
    """Error against layer depth for one batch: does it accumulate?"""
    out = Path(cfg.out) / "depth"
    data, model = _setup(cfg)
    if cfg.warmup:
        log(f"warm-up: {cfg.warmup} iterations of exact SGD")
        exact_trainer(model, data, cfg.warmup, cfg.batch_size, cfg.seed, cfg.lr).fit()
    st = _measure(cfg, model, data, or_default(cfg.repeats, 8), or_default(cfg.noise_batches, 16), cfg.systematic, log)
    st.meta.update(experiment="depth", model=config_model(cfg), data=cfg.data, warmup=cfg.warmup)
    title = (f"{config_model(cfg)} on {cfg.data}, batch {cfg.batch_size}"
             + (f", after {cfg.warmup} exact SGD iterations" if cfg.warmup else ", at initialisation"))
    log(f"\n{title}\n")
    log(st.table())
    files = st.write(out)
    png = plot_depth(st, out / "depth.png", title)
    return {"study": st, "files": files + ([png] if png else []), "title": title}


def run_activations(cfg: StudyConfig, log=print) -> dict:
    """The same network with ReLU, sigmoid, tanh, GELU: overall error per policy."""
    out = Path(cfg.out) / "activations"
    out.mkdir(parents=True, exist_ok=True)
    rows, studies = [], {}
    for act in cfg.activations:
        data, model = _setup(cfg, activation=act)
        if cfg.warmup:
            exact_trainer(model, data, cfg.warmup, cfg.batch_size, cfg.seed, cfg.lr).fit()
        log(f"== activation {act}")
        st = _measure(cfg, model, data, or_default(cfg.repeats, 8), or_default(cfg.noise_batches, 16), False, None)
        st.meta.update(experiment="activations", activation=act, model=config_model(cfg), warmup=cfg.warmup)
        studies[act] = st
        for r in st.overall_rows():
            rows.append({"activation": act, **r})
    table = activations_table(rows)
    title = (f"{config_model(cfg)} on {cfg.data}, batch {cfg.batch_size}, activation in place of ReLU"
             + (f", after {cfg.warmup} exact SGD iterations" if cfg.warmup else ", at initialisation"))
    files = write_results(out, "activations", cfg, title, table, rows, log, functools.partial(plot_activations, rows),
                          per_layer={a: s.layer_rows() for a, s in studies.items()})
    return {"rows": rows, "studies": studies, "files": files, "title": title}


def run_training(cfg: StudyConfig, log=print) -> dict:
    """Train with exact SGD; at every ``every`` iterations measure each policy's
    gradient error on a fixed batch (and the minibatch noise) at the current weights."""
    out = Path(cfg.out) / "training"
    out.mkdir(parents=True, exist_ok=True)
    data, model = _setup(cfg)
    total = or_default(cfg.iterations, 400)
    repeats, noise_m = or_default(cfg.repeats, 4), or_default(cfg.noise_batches, 8)
    points = []
    trainer = exact_trainer(model, data, total, cfg.batch_size, cfg.seed, cfg.lr)

    def checkpoint(it, since):
        st = _measure(cfg, model, data, repeats, noise_m, False, None)
        acc = trainer.evaluate()[1]
        loss = float(np.mean(since)) if since else float("nan")
        points.append({"iteration": it, "train_loss": loss, "test_acc": acc, "study": st,
                       "overall": st.overall_rows()})
        r = {row["policy"]: row for row in points[-1]["overall"]}
        log(f"it {it:>5}  train loss {loss:>7.4f}  test acc {acc:.3f}  rel. error: "
            + "  ".join(f"{p} {fmt(r[p]['rel_err'])}" for p in st.policies if p != "exact"))

    trainer.fit(cfg.every, checkpoint)
    rows = [{"iteration": pt["iteration"], "train_loss": pt["train_loss"], "test_acc": pt["test_acc"], **r}
            for pt in points for r in pt["overall"]]
    table = training_table(points)
    title = f"{config_model(cfg)} on {cfg.data}, exact SGD training, batch {cfg.batch_size}"
    files = write_results(out, "training", cfg, title, table, rows, log, functools.partial(plot_training, points))
    return {"points": points, "rows": rows, "files": files, "title": title}


def train_policy(cfg: StudyConfig, model: str, data: str, data_path, policy: str, seed: int, iterations: int,
                 optimizer: str = "sgd", lr: float | None = None) -> dict:
    """One ``Trainer`` run of ``model`` on ``data`` under ``policy`` (cosine schedule,
    momentum 0.9 for SGD); its final test accuracy, training and test loss and seconds."""
    t0 = time.perf_counter()
    tc = TrainConfig(model=model, data=data, data_path=data_path, size=cfg.size,
                     width=cfg.width, policy=policy, optimizer=optimizer, lr=cfg.lr if lr is None else lr,
                     momentum=0.9 if optimizer == "sgd" else 0.0, schedule="cosine", epochs=None,
                     iterations=iterations, batch_size=cfg.batch_size, seed=seed, out=None)
    last = Trainer(tc, progress=False, log=lambda *_: None).run()
    return {"test_acc": last["test_acc"], "train_loss": last["train_loss"], "test_loss": last["test_loss"],
            "seconds": time.perf_counter() - t0}


def _parse_optimizer(text):
    name, _, lr = text.partition(":")
    return name.strip().lower(), (float(lr) if lr else {"sgd": 0.1, "adam": 0.003, "rmsprop": 0.001}.get(
        name.strip().lower(), 0.01))


def run_optimizers(cfg: StudyConfig, log=print) -> dict:
    """SGD, Adam and RMSprop trained with approximate gradients: final test accuracy."""

    out = Path(cfg.out) / "optimizers"
    out.mkdir(parents=True, exist_ok=True)
    model = config_model(cfg, "resnet8")
    total = or_default(cfg.iterations, 200)
    rows = []
    for spec in cfg.optimizers:
        opt, lr = _parse_optimizer(spec)
        for policy in cfg.opt_policies:
            for seed in cfg.seeds:
                last = train_policy(cfg, model, cfg.data, cfg.data_path, policy, seed, total, opt, lr)
                rows.append({"optimizer": opt, "lr": lr, "policy": policy, "seed": seed, **last})
                log(f"{opt:<8} lr {lr:<6g} {policy:<8} seed {seed}: test acc {last['test_acc']:.4f}  "
                    f"train loss {last['train_loss']:.4f}  ({rows[-1]['seconds']:.1f} s)")
    table = optimizers_table(rows)
    title = f"{model} on {cfg.data}, {total} iterations of batch {cfg.batch_size}, cosine schedule"
    files = write_results(out, "optimizers", cfg, title, table, rows, log, functools.partial(plot_optimizers, rows))
    return {"rows": rows, "files": files, "title": title}
