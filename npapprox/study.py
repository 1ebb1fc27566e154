"""The gradient-error study: approximate against exact backprop, measured.

For one model, one batch (x, y) and a list of storage policies,
``study_gradients`` computes the exact gradient and each policy's gradient at
the same parameters on the same batch, and reports, per parameter tensor, per
layer (in forward order) and overall:

* ``rel_err``: ||g - g_exact|| / ||g_exact|| (for a stochastic policy: the mean
  over its R draws of the single-draw error);
* ``cosine``: <g, g_exact> / (||g|| ||g_exact||) (mean over draws);
* ``bias``: ||mean_r g_r - g_exact|| / ||g_exact||, the error of the mean of R
  draws with different seeds (equal to ``rel_err`` for a deterministic policy);
  for an unbiased policy it falls like ``spread / sqrt(R)``;
* ``spread``: sqrt(sum_r ||g_r - mean_r g_r||^2 / (R - 1)) / ||g_exact||, the
  draw-to-draw standard deviation (0 for a deterministic policy);
* the yardstick, SGD's own minibatch noise at the same parameters: exact
  gradients of M minibatches of the same size, ``noise`` = sqrt(sum_m ||g_m -
  mean_m g_m||^2 / (M - 1)) / ||g_exact|| (the standard deviation of a
  minibatch gradient, in units of the studied batch's exact gradient norm), and
  ``err_over_noise`` = ||g - g_exact|| / (that standard deviation). A ratio well
  below 1 means the approximation moves the gradient by much less than the
  choice of minibatch does;
* optionally (``systematic=True``) ``avg_err``: the relative error of the
  gradient averaged over the M noise minibatches, ||mean_m (g_m - g_exact,m)||
  / ||mean_m g_exact,m||. Noise averages out over SGD steps, a systematic error
  does not: this is the error of the descent direction over M steps.

Every gradient pass restores the model's parameters and buffers (BN running
statistics) afterwards, so the passes do not drift: all policies see the same
state. Under an exact-forward policy (paper, generic) the forward pass is
bit-identical to the exact one; under naive and approximate-forward it is the
policy's own forward (that is what those baselines are).

Layer depth: the modules that own parameters, numbered in the order their
``forward`` is first entered during one forward pass of the model (for a
pre-activation ResNet-20: 0 = the first conv, then bn1, conv1, bn2, conv2 of
each block, ..., 37 = the last BN, 38 = the classifier). A parameter's depth is
its module's.

``python -m npapprox.cli study`` (``npapprox study``) runs the ready-made
experiments: ``depth``, ``activations``, ``training``, ``optimizers``, ``window``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from . import ops
from .backend import on_gpu, to_device
from .policy import Exact, Generic, Policy, policy_from_name, storage_policy
from .tensor import Tensor

DEFAULT_POLICIES = ("paper8", "paper4", "naive8", "naive4", "generic2", "generic4", "generic8",
                    "generic2s", "generic4s", "generic8s", "approx4")
INPUT = "<input>"          # the key of the input gradient (``input_grad=True``)
EXPERIMENTS = ("depth", "activations", "training", "optimizers", "window")


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def _as_policy(spec, seed: int = 0) -> Policy:
    return policy_from_name(spec, seed=seed) if isinstance(spec, str) else spec


def _label(spec) -> str:
    return spec if isinstance(spec, str) else repr(spec)


def is_stochastic(spec) -> bool:
    p = _as_policy(spec)
    return isinstance(p, Generic) and p.stochastic


def _draws(spec, repeats: int, seed: int) -> list:
    """The policies of the R draws of ``spec``: R seeds for a stochastic policy, one otherwise."""
    if not is_stochastic(spec):
        return [_as_policy(spec, seed)]
    if isinstance(spec, str):
        return [policy_from_name(spec, seed=seed * 1000 + r) for r in range(repeats)]
    return [Generic(spec.bits, spec.group, stochastic=True, seed=spec.seed + seed * 1000 + r) for r in range(repeats)]


def _input_tensor(model, x, requires_grad=False) -> Tensor:
    data = x.data if isinstance(x, Tensor) else x
    params = model.parameters()
    if params and on_gpu(params[0].data) and not on_gpu(data):
        data = to_device(data, "gpu")
    return Tensor(data, requires_grad=requires_grad)


def gradients(model, x, y, policy=None, input_grad: bool = False) -> dict:
    """One forward + backward of ``cross_entropy(model(x), y)`` under ``policy``
    (a Policy or a name; default exact) in the model's current mode. Returns
    {parameter name: float64 NumPy gradient} (and ``INPUT``: the gradient with
    respect to x when ``input_grad``). The model's parameters and buffers are
    restored afterwards (the forward pass updates BN running statistics), and
    its ``.grad`` fields cleared."""
    policy = Exact() if policy is None else _as_policy(policy)
    state = model.state_dict()
    try:
        model.zero_grad()
        xt = _input_tensor(model, x, input_grad)
        with storage_policy(policy):
            loss = ops.cross_entropy(model(xt), y)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else np.zeros(p.shape, np.float32)
            grads[name] = np.asarray(to_device(g, "cpu"), np.float64)
        if input_grad:
            grads[INPUT] = np.asarray(to_device(xt.grad, "cpu"), np.float64)
        return grads
    finally:
        model.load_state_dict(state)
        model.zero_grad()


@dataclasses.dataclass
class Layer:
    depth: int
    module: str
    kind: str            # the module's class name (Conv2d, BatchNorm2d, Linear, ...)
    params: list         # parameter names, in registration order


def layer_order(model, x) -> list:
    """The modules owning parameters, in the order their ``forward`` is first
    entered during one forward pass on ``x`` (modules the forward never enters
    come last, in ``named_modules`` order). Runs under ``no_grad``; the model's
    state is restored afterwards."""
    from .nn.module import Parameter  # noqa: PLC0415
    from .tensor import no_grad  # noqa: PLC0415

    owners = []
    for name, m in model.named_modules():
        own = [f"{name}.{attr}" if name else attr for attr, v in m.__dict__.items() if isinstance(v, Parameter)]
        if own:
            owners.append((name, m, own))
    order = []

    def wrap(entry):
        m, inner = entry[1], entry[1].forward

        def forward(*args):
            if not any(e is entry for e in order):
                order.append(entry)
            return inner(*args)
        object.__setattr__(m, "forward", forward)

    state = model.state_dict()
    try:
        for entry in owners:
            wrap(entry)
        with no_grad():
            model(_input_tensor(model, x))
    finally:
        for _, m, _ in owners:
            m.__dict__.pop("forward", None)
        model.load_state_dict(state)
    order += [e for e in owners if not any(e is o for o in order)]
    return [Layer(depth, name or "-", type(m).__name__, own) for depth, (name, m, own) in enumerate(order)]


# --------------------------------------------------------------------------- #
# Data: the studied batch and the minibatches of the noise yardstick
# --------------------------------------------------------------------------- #
def sample_batches(x, y, batch_size: int, count: int, seed: int = 0) -> list:
    """``count`` disjoint minibatches of ``batch_size`` drawn from (x, y) by a
    seeded permutation (with replacement between batches only when the data run
    out). The first one is the studied batch."""
    n = len(y)
    rng = np.random.default_rng([seed, 0x57D])
    idx = np.concatenate([rng.permutation(n) for _ in range(-(-batch_size * count // n))])
    return [(x[idx[i * batch_size:(i + 1) * batch_size]], y[idx[i * batch_size:(i + 1) * batch_size]])
            for i in range(count)]


# --------------------------------------------------------------------------- #
# The study
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class PolicyGrads:
    """Per-parameter squared norms and dot products of one policy's draws
    (float64; each list holds one entry per draw)."""

    label: str
    stochastic: bool
    draws: int
    sq_diff: dict        # name -> [||g_r - g_exact||^2]
    sq_g: dict           # name -> [||g_r||^2]
    dot: dict            # name -> [<g_r, g_exact>]
    sq_bias: dict        # name -> ||mean_r g_r - g_exact||^2
    sq_spread: dict      # name -> sum_r ||g_r - mean g||^2 / (R - 1)  (0 for one draw)
    sq_avg_diff: dict | None = None   # name -> ||mean_m (g_m - g_exact,m)||^2 over the noise batches
    sq_batch_diff: dict | None = None  # name -> mean_m ||g_m - g_exact,m||^2
    seconds: float = 0.0


def _sumsq(a) -> float:
    return float(np.dot(a.ravel(), a.ravel()))


def _policy_grads(label, stochastic, draws, exact) -> PolicyGrads:
    names = list(exact)
    sq_diff = {n: [_sumsq(g[n] - exact[n]) for g in draws] for n in names}
    sq_g = {n: [_sumsq(g[n]) for g in draws] for n in names}
    dot = {n: [float(np.dot(g[n].ravel(), exact[n].ravel())) for g in draws] for n in names}
    sq_bias, sq_spread = {}, {}
    for n in names:
        mean = np.mean([g[n] for g in draws], axis=0) if len(draws) > 1 else draws[0][n]
        sq_bias[n] = _sumsq(mean - exact[n])
        sq_spread[n] = (sum(_sumsq(g[n] - mean) for g in draws) / (len(draws) - 1)) if len(draws) > 1 else 0.0
    return PolicyGrads(label, stochastic, len(draws), sq_diff, sq_g, dot, sq_bias, sq_spread)


@dataclasses.dataclass
class Noise:
    """SGD's minibatch noise at the studied parameters: M exact minibatch gradients."""

    batches: int
    batch_size: int
    sq_noise: dict       # name -> sum_m ||g_m - mean g||^2 / (M - 1)
    sq_mean: dict        # name -> ||mean_m g_m||^2


def minibatch_noise(model, batches, grads=None) -> Noise:
    """The spread of exact gradients over ``batches`` (a list of (x, y), M >= 2)
    at the model's current parameters. ``grads``: their exact gradients when
    already computed."""
    if len(batches) < 2:
        raise ValueError("minibatch_noise needs at least two minibatches")
    grads = grads if grads is not None else [gradients(model, bx, by) for bx, by in batches]
    names = list(grads[0])
    mean = {n: np.mean([g[n] for g in grads], axis=0) for n in names}
    m = len(grads)
    return Noise(m, len(batches[0][1]), {n: sum(_sumsq(g[n] - mean[n]) for g in grads) / (m - 1) for n in names},
                 {n: _sumsq(mean[n]) for n in names})


@dataclasses.dataclass
class Study:
    """The result of ``study_gradients``: exact squared norms, each policy's
    statistics, the layers in forward order, the noise yardstick (or None)."""

    policies: list            # labels, in the order given
    layers: list              # Layer, in forward order
    shapes: dict              # parameter name -> shape
    sq_exact: dict            # parameter name -> ||g_exact||^2
    results: dict             # label -> PolicyGrads
    noise: Noise | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    # --- aggregation -----------------------------------------------------------
    def depth_of(self) -> dict:
        return {n: layer.depth for layer in self.layers for n in layer.params}

    def stats(self, policy: str, names=None) -> dict:
        """The statistics of ``policy`` over the parameters ``names`` (default:
        every parameter, not ``INPUT``; their gradients concatenated into one vector)."""
        r = self.results[policy]
        names = [n for n in self.sq_exact if n != INPUT] if names is None else list(names)
        ex = sum(self.sq_exact[n] for n in names)
        ex_norm = np.sqrt(ex)
        diff = np.sqrt(np.sum([r.sq_diff[n] for n in names], axis=0))      # one per draw
        gn = np.sqrt(np.sum([r.sq_g[n] for n in names], axis=0))
        dot = np.sum([r.dot[n] for n in names], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(diff == 0, 0.0, diff / ex_norm)
            cos = np.where(diff == 0, 1.0, np.clip(dot / (gn * ex_norm), -1.0, 1.0))
        out = {"policy": policy, "stochastic": r.stochastic, "draws": r.draws, "numel":
               int(sum(int(np.prod(self.shapes[n])) for n in names if n in self.shapes)),
               "exact_norm": float(ex_norm), "rel_err": float(rel.mean()), "rel_err_max": float(rel.max()),
               "cosine": float(cos.mean()),
               "bias": _ratio(np.sqrt(sum(r.sq_bias[n] for n in names)), ex_norm),
               "spread": _ratio(np.sqrt(sum(r.sq_spread[n] for n in names)), ex_norm)}
        if self.noise is not None and all(n in self.noise.sq_noise for n in names):
            noise = np.sqrt(sum(self.noise.sq_noise[n] for n in names))
            out["noise"] = _ratio(noise, ex_norm)
            out["err_over_noise"] = _ratio(float(diff.mean()), noise)
            if r.sq_avg_diff is not None:
                avg = np.sqrt(sum(r.sq_avg_diff[n] for n in names))
                out["avg_err"] = _ratio(avg, np.sqrt(sum(self.noise.sq_mean[n] for n in names)))
                out["persistence"] = _ratio(avg, np.sqrt(sum(r.sq_batch_diff[n] for n in names)))
        return out

    def param_rows(self) -> list:
        depth = self.depth_of()
        module = {n: layer.module for layer in self.layers for n in layer.params}
        rows = []
        for p in self.policies:
            for n in self.sq_exact:
                rows.append({"param": n, "module": module.get(n, "-"), "depth": depth.get(n, -1),
                             **self.stats(p, [n])})
        return rows

    def layer_rows(self) -> list:
        return [row for p in self.policies for row in self.layer_rows_of(p)]

    def depth_thirds(self, policy: str) -> tuple:
        """Median of the per-layer relative error over the first, middle and
        last third of the layers (forward order): the depth trend."""
        errs = np.array([row["rel_err"] for row in self.layer_rows_of(policy)])
        parts = np.array_split(errs, 3) if len(errs) >= 3 else [errs] * 3
        return tuple(float(np.median(p)) if len(p) else float("nan") for p in parts)

    def layer_rows_of(self, policy: str) -> list:
        """One row per layer (forward order): ``stats`` over the layer's parameters."""
        out = []
        for layer in self.layers:
            names = [n for n in layer.params if n in self.sq_exact]
            if names:
                out.append({"depth": layer.depth, "module": layer.module, "kind": layer.kind,
                            **self.stats(policy, names)})
        return out

    def overall_rows(self) -> list:
        rows = []
        for p in self.policies:
            row = self.stats(p)
            row["first_third"], row["middle_third"], row["last_third"] = self.depth_thirds(p)
            if INPUT in self.sq_exact:
                row["input_rel_err"] = self.stats(p, [INPUT])["rel_err"]
            rows.append(row)
        return rows

    # --- output ----------------------------------------------------------------
    def table(self) -> str:
        """The overall table (markdown): one row per policy."""
        rows = self.overall_rows()
        has_noise = any("noise" in r for r in rows)
        has_avg = any("avg_err" in r for r in rows)
        head = ["policy", "rel. error", "cosine", "bias (R draws)", "spread"]
        if has_noise:
            head += ["error / noise"]
        if has_avg:
            head += ["avg-grad error", "persistence"]
        head += ["rel. error by depth: first / middle / last third"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["policy"], _fmt(r["rel_err"]), f"{r['cosine']:.6f}",
                     _fmt(r["bias"]) + (f" (R={r['draws']})" if r["stochastic"] else ""),
                     _fmt(r["spread"]) if r["stochastic"] else "-"]
            if has_noise:
                cells.append(_fmt(r.get("err_over_noise")))
            if has_avg:
                cells += [_fmt(r.get("avg_err")), _fmt(r.get("persistence"))]
            cells.append(" / ".join(_fmt(r[k]) for k in ("first_third", "middle_third", "last_third")))
            lines.append("| " + " | ".join(cells) + " |")
        if has_noise:
            noise = self.stats(self.policies[0]).get("noise")
            lines.append("")
            lines.append(f"SGD minibatch noise (std of a batch-{self.noise.batch_size} exact gradient over "
                         f"{self.noise.batches} minibatches) = {_fmt(noise)} x ||g_exact||.")
            if has_avg:
                lines.append(f"avg-grad error: relative error of the gradient averaged over the {self.noise.batches}"
                             f" minibatches; persistence: ||mean error|| / rms error over them (1: the same error"
                             f" every batch; {1 / np.sqrt(self.noise.batches):.2f}: independent errors).")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "policies": self.policies,
                "layers": [dataclasses.asdict(layer) for layer in self.layers],
                "overall": self.overall_rows(), "per_layer": self.layer_rows(), "per_param": self.param_rows(),
                "noise": None if self.noise is None else
                {"batches": self.noise.batches, "batch_size": self.noise.batch_size}}

    def write(self, out, prefix: str = "") -> list:
        """Write ``{prefix}overall.csv``, ``layers.csv``, ``params.csv``,
        ``study.json`` and ``table.md`` into ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [_write_csv(out / f"{prefix}overall.csv", self.overall_rows()),
                 _write_csv(out / f"{prefix}layers.csv", self.layer_rows()),
                 _write_csv(out / f"{prefix}params.csv", self.param_rows())]
        (out / f"{prefix}study.json").write_text(json.dumps(_jsonable(self.to_dict()), indent=1))
        (out / f"{prefix}table.md").write_text(self.table() + "\n")
        return paths + [out / f"{prefix}study.json", out / f"{prefix}table.md"]


def _ratio(a, b) -> float:
    a, b = float(a), float(b)
    if a == 0:
        return 0.0
    return a / b if b > 0 else float("inf")


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if not np.isfinite(v):
        return str(v)
    return f"{v:.{digits}e}" if (abs(v) < 1e-2 or abs(v) >= 1e3) else f"{v:.{digits + 1}f}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_csv(path: Path, rows: list) -> Path:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def study_gradients(model, x, y, policies=DEFAULT_POLICIES, repeats: int = 8, seed: int = 0,
                    noise_batches=None, systematic: bool = False, input_grad: bool = False,
                    include_exact: bool = True, log=None) -> Study:
    """Exact against approximate gradients of ``model`` on the batch (x, y).

    ``policies``: names (``policy_from_name``) or Policy objects; ``"exact"`` is
    added first when ``include_exact`` (its error is 0: a check on the set-up).
    ``repeats``: the R draws of each stochastic policy (seeds ``1000 seed + r``).
    ``noise_batches``: a list of (x, y) minibatches of the same size (M >= 2)
    for the SGD-noise yardstick, or None. ``systematic``: also run every policy
    on each noise batch and report ``avg_err`` (M passes per policy and draw
    more). ``input_grad``: include the gradient with respect to x (``INPUT``).
    See the module docstring for the definitions."""
    t0 = time.perf_counter()
    say = log or (lambda *_: None)
    specs = list(policies)
    if include_exact and "exact" not in [_label(s) for s in specs]:
        specs = ["exact"] + specs
    labels = [_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"study_gradients: a policy is listed twice: {labels}")
    exact = gradients(model, x, y, Exact(), input_grad)
    shapes = {n: g.shape for n, g in exact.items()}
    results = {}
    for spec, label in zip(specs, labels):
        t = time.perf_counter()
        draws = [gradients(model, x, y, p, input_grad) for p in _draws(spec, repeats, seed)]
        results[label] = _policy_grads(label, is_stochastic(spec), draws, exact)
        results[label].seconds = time.perf_counter() - t
        say(f"  {label:<10} {len(draws)} draw(s) {results[label].seconds:6.2f} s")
    noise = None
    if noise_batches is not None:
        exact_m = [gradients(model, bx, by) for bx, by in noise_batches]
        noise = minibatch_noise(model, noise_batches, exact_m)
        if systematic:
            for spec, label in zip(specs, labels):
                acc = {n: np.zeros(shapes[n]) for n in exact_m[0]}
                sq = dict.fromkeys(acc, 0.0)
                pols = _draws(spec, repeats, seed + 1)
                for i, (bx, by) in enumerate(noise_batches):
                    g = gradients(model, bx, by, pols[i % len(pols)])
                    for n in acc:
                        e = g[n] - exact_m[i][n]
                        acc[n] += e
                        sq[n] += _sumsq(e) / len(noise_batches)
                results[label].sq_avg_diff = {n: _sumsq(a / len(noise_batches)) for n, a in acc.items()}
                results[label].sq_batch_diff = sq
    meta = {"repeats": repeats, "seed": seed, "batch_size": int(len(y)), "seconds": time.perf_counter() - t0,
            "input_grad": input_grad}
    return Study(labels, layer_order(model, x), shapes, {n: _sumsq(g) for n, g in exact.items()},
                 results, noise, meta)


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #
def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    return plt


_FAMILY = (("paper", "Blues", "-"), ("naive", "Oranges", ":"), ("approx", "Reds", "-."),
           ("generic", "Greens", "--"))


def _family(label):
    import re  # noqa: PLC0415

    m = re.fullmatch(r"([a-z]+)(\d)(s?).*", label)
    if m is None:
        return "Greys", "-", 0.6
    kind, bits, stoch = m.group(1), int(m.group(2)), bool(m.group(3))
    cmap, ls = next(((c, l) for k, c, l in _FAMILY if k == kind), ("Greys", "-"))
    if kind == "generic" and stoch:
        cmap, ls = "Purples", (0, (5, 1.5))
    return cmap, ls, {1: 0.35, 2: 0.45, 4: 0.7, 8: 0.95}.get(bits, 0.6)


def _line(plt, label):
    """Colour and line style of a policy: one colour family per kind, darker for more bits."""
    cmap, ls, shade = _family(label)
    return {"color": plt.get_cmap(cmap)(shade), "linestyle": ls}


def _save(plt, fig, path, title: str) -> Path:
    """Title, layout, a 100-dpi PNG at ``path``; the figure is closed."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _positive(values):
    """Zeros (an exactly stored layer) as gaps on a log axis."""
    return [v if v > 0 else np.nan for v in values]


def plot_depth(study: Study, path, title: str = "", policies=None) -> Path | None:
    """Relative gradient error against layer depth, one line per policy: weight
    layers (conv, linear) and BN layers in two panels, with the minibatch noise
    (same units) as a grey band."""
    plt = _pyplot()
    if plt is None:
        return None
    policies = [p for p in (policies or study.policies) if p != "exact"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    groups = (("conv / linear weights", lambda r: r["kind"] in ("Conv2d", "Linear")),
              ("BN (gamma, beta)", lambda r: r["kind"] == "BatchNorm2d"))
    for ax, (name, keep) in zip(axes, groups):
        for p in policies:
            rows = [r for r in study.layer_rows_of(p) if keep(r)]
            if rows:
                ax.plot([r["depth"] for r in rows], _positive([r["rel_err"] for r in rows]), label=p, lw=1.4,
                        marker=".", ms=3, **_line(plt, p))
        rows = [r for r in study.layer_rows_of(policies[0]) if keep(r) and "noise" in r] if policies else []
        if rows:
            ax.plot([r["depth"] for r in rows], [r["noise"] for r in rows], color="0.4", lw=3, alpha=0.35,
                    label="SGD minibatch noise")
        ax.set_yscale("log")
        ax.set_xlabel("layer depth (forward order)")
        ax.set_title(name)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("||g - g_exact|| / ||g_exact||  (gaps: 0, stored exactly)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(plt, fig, path, title)


def plot_training(points: list, path, title: str = "") -> Path | None:
    """Overall relative error (and error / noise) against the training iteration."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    policies = [p for p in points[0]["study"].policies if p != "exact"]
    its = [pt["iteration"] for pt in points]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for p in policies:
        rows = [next(r for r in pt["overall"] if r["policy"] == p) for pt in points]
        axes[0].plot(its, _positive([r["rel_err"] for r in rows]), label=p, marker=".", lw=1.4, **_line(plt, p))
        if "err_over_noise" in rows[0]:
            axes[1].plot(its, _positive([r["err_over_noise"] for r in rows]), label=p, marker=".", lw=1.4,
                         **_line(plt, p))
    noise = [next(iter(pt["overall"]))["noise"] if "noise" in pt["overall"][0] else None for pt in points]
    if all(v is not None for v in noise):
        axes[0].plot(its, noise, color="0.4", lw=3, alpha=0.35, label="SGD minibatch noise")
        axes[1].axhline(1.0, color="0.4", lw=3, alpha=0.35)
    for ax, lab in zip(axes, ("||g - g_exact|| / ||g_exact||", "error / minibatch noise")):
        ax.set_yscale("log")
        ax.set_xlabel("training iteration (exact SGD)")
        ax.set_ylabel(lab)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(plt, fig, path, title)


def plot_activations(rows: list, path, title: str = "") -> Path | None:
    """Grouped bars: overall relative error per policy, one group per activation."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "exact"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(acts)
    for j, a in enumerate(acts):
        vals = [next((r["rel_err"] for r in rows if r["activation"] == a and r["policy"] == p), np.nan)
                for p in policies]
        ax.bar(np.arange(len(policies)) + (j - (len(acts) - 1) / 2) * width, _positive(vals), width, label=a)
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
    return _save(plt, fig, path, "")


def plot_optimizers(rows: list, path, title: str = "") -> Path | None:
    """Final test accuracy per optimizer and policy (bars: mean over seeds; dots: seeds)."""
    plt = _pyplot()
    if plt is None or not rows:
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
    return _save(plt, fig, path, title)


# --------------------------------------------------------------------------- #
# The ready-made experiments (``npapprox study --experiment ...``)
# --------------------------------------------------------------------------- #
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
    from . import nn  # noqa: PLC0415
    from .data import load_dataset  # noqa: PLC0415

    data = load_dataset(cfg.data, path=cfg.data_path, size=cfg.size, seed=cfg.seed)
    nn.manual_seed(cfg.seed)
    net = nn.build_model(model or cfg.model or "resnet20", num_classes=data.num_classes,
                         in_channels=data.in_channels, input_size=data.image_size, width=cfg.width,
                         activation=activation)
    return data, net


def train_exact(model, data, iterations: int, batch_size: int, seed: int = 0, lr: float = 0.1,
                schedule: str = "cosine", every: int | None = None, on_checkpoint=None) -> list:
    """Train ``model`` with exact backprop: SGD (momentum 0.9, weight decay 2e-4 on
    kernels), batches as ``npapprox train`` draws them. ``on_checkpoint(i, losses)``
    is called before iteration i for i = 0, every, 2 every, ... and after the last
    (with the training losses since the previous checkpoint). Returns every loss."""
    from . import optim  # noqa: PLC0415
    from .data import batches, batches_per_epoch  # noqa: PLC0415

    opt = optim.make_optimizer("sgd", model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4, decay="kernels")
    sched = optim.make_schedule(schedule, lr, max(iterations, 1))
    per_epoch = batches_per_epoch(len(data.y_train), batch_size)
    losses, since, it = [], [], 0
    model.train()
    while it < iterations:
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=seed, epoch=it // per_epoch,
                              start=it % per_epoch):
            if on_checkpoint is not None and every and it % every == 0:
                on_checkpoint(it, since)
                since = []
            opt.lr = sched.lr_at(it)
            with storage_policy(Exact()):
                loss = ops.cross_entropy(model(Tensor(xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            since.append(losses[-1])
            it += 1
            if it >= iterations:
                break
    if on_checkpoint is not None:
        on_checkpoint(it, since)
    return losses


def evaluate(model, data, batch_size: int = 500) -> float:
    """Test accuracy (BN running statistics)."""
    from .tensor import no_grad  # noqa: PLC0415

    model.eval()
    correct = 0
    try:
        with no_grad():
            for i in range(0, len(data.y_test), batch_size):
                logits = model(_input_tensor(model, data.x_test[i:i + batch_size]))
                correct += int((np.asarray(to_device(logits.data, "cpu")).argmax(1)
                                == data.y_test[i:i + batch_size]).sum())
    finally:
        model.train()
    return correct / len(data.y_test)


def _measure(cfg, model, data, repeats, noise_m, systematic, log):
    batches = sample_batches(data.x_train, data.y_train, cfg.batch_size, max(noise_m, 1), cfg.seed)
    x, y = batches[0]
    return study_gradients(model, x, y, cfg.policies, repeats=repeats, seed=cfg.seed,
                           noise_batches=batches if noise_m >= 2 else None, systematic=systematic, log=log)


def _default(value, default):
    return default if value is None else value


def _model_name(cfg, default="resnet20"):
    return cfg.model or default


def run_depth(cfg: StudyConfig, log=print) -> dict:
    """Error against layer depth for one batch: does it accumulate?"""
    out = Path(cfg.out) / "depth"
    data, model = _setup(cfg)
    if cfg.warmup:
        log(f"warm-up: {cfg.warmup} iterations of exact SGD")
        train_exact(model, data, cfg.warmup, cfg.batch_size, cfg.seed, cfg.lr)
    st = _measure(cfg, model, data, _default(cfg.repeats, 8), _default(cfg.noise_batches, 16), cfg.systematic, log)
    st.meta.update(experiment="depth", model=_model_name(cfg), data=cfg.data, warmup=cfg.warmup)
    title = (f"{_model_name(cfg)} on {cfg.data}, batch {cfg.batch_size}"
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
            train_exact(model, data, cfg.warmup, cfg.batch_size, cfg.seed, cfg.lr)
        log(f"== activation {act}")
        st = _measure(cfg, model, data, _default(cfg.repeats, 8), _default(cfg.noise_batches, 16), False, None)
        st.meta.update(experiment="activations", activation=act, model=_model_name(cfg), warmup=cfg.warmup)
        studies[act] = st
        for r in st.overall_rows():
            rows.append({"activation": act, **r})
    table = activations_table(rows)
    title = (f"{_model_name(cfg)} on {cfg.data}, batch {cfg.batch_size}, activation in place of ReLU"
             + (f", after {cfg.warmup} exact SGD iterations" if cfg.warmup else ", at initialisation"))
    log(f"\n{title}\n")
    log(table)
    files = [_write_csv(out / "activations.csv", rows)]
    (out / "activations.json").write_text(json.dumps(_jsonable(
        {"config": dataclasses.asdict(cfg), "rows": rows,
         "per_layer": {a: s.layer_rows() for a, s in studies.items()}}), indent=1))
    (out / "table.md").write_text(table + "\n")
    files += [out / "activations.json", out / "table.md"]
    png = plot_activations(rows, out / "activations.png", title)
    return {"rows": rows, "studies": studies, "files": files + ([png] if png else []), "title": title}


def activations_table(rows) -> str:
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows)]
    head = ["policy"] + [f"{a}: rel. error (error / noise)" for a in acts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        cells = [p]
        for a in acts:
            r = next((r for r in rows if r["activation"] == a and r["policy"] == p), None)
            cells.append("-" if r is None else f"{_fmt(r['rel_err'])} ({_fmt(r.get('err_over_noise'))})")
        lines.append("| " + " | ".join(cells) + " |")
    noise = [next((r.get("noise") for r in rows if r["activation"] == a), None) for a in acts]
    lines.append("")
    lines.append("minibatch noise (x ||g_exact||): " + ", ".join(f"{a} {_fmt(n)}" for a, n in zip(acts, noise)))
    return "\n".join(lines)


def run_training(cfg: StudyConfig, log=print) -> dict:
    """Train with exact SGD; at every ``every`` iterations measure each policy's
    gradient error on a fixed batch (and the minibatch noise) at the current weights."""
    out = Path(cfg.out) / "training"
    out.mkdir(parents=True, exist_ok=True)
    data, model = _setup(cfg)
    total = _default(cfg.iterations, 400)
    repeats, noise_m = _default(cfg.repeats, 4), _default(cfg.noise_batches, 8)
    points = []

    def checkpoint(it, since):
        st = _measure(cfg, model, data, repeats, noise_m, False, None)
        acc = evaluate(model, data)
        loss = float(np.mean(since)) if since else float("nan")
        points.append({"iteration": it, "train_loss": loss, "test_acc": acc, "study": st,
                       "overall": st.overall_rows()})
        r = {row["policy"]: row for row in points[-1]["overall"]}
        log(f"it {it:>5}  train loss {loss:>7.4f}  test acc {acc:.3f}  rel. error: "
            + "  ".join(f"{p} {_fmt(r[p]['rel_err'])}" for p in st.policies if p != "exact"))

    train_exact(model, data, total, cfg.batch_size, cfg.seed, cfg.lr, every=cfg.every, on_checkpoint=checkpoint)
    rows = [{"iteration": pt["iteration"], "train_loss": pt["train_loss"], "test_acc": pt["test_acc"], **r}
            for pt in points for r in pt["overall"]]
    table = training_table(points)
    title = f"{_model_name(cfg)} on {cfg.data}, exact SGD training, batch {cfg.batch_size}"
    log(f"\n{title}\n")
    log(table)
    files = [_write_csv(out / "training.csv", rows)]
    (out / "training.json").write_text(json.dumps(_jsonable({"config": dataclasses.asdict(cfg), "rows": rows}),
                                                  indent=1))
    (out / "table.md").write_text(table + "\n")
    files += [out / "training.json", out / "table.md"]
    png = plot_training(points, out / "training.png", title)
    return {"points": points, "rows": rows, "files": files + ([png] if png else []), "title": title}


def training_table(points) -> str:
    policies = [p for p in points[0]["study"].policies if p != "exact"]
    head = ["iteration", "train loss", "test acc", "noise"] + policies
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pt in points:
        r = {row["policy"]: row for row in pt["overall"]}
        noise = next(iter(r.values())).get("noise")
        loss = f"{pt['train_loss']:.4f}" if np.isfinite(pt["train_loss"]) else "-"
        lines.append("| " + " | ".join([str(pt["iteration"]), loss, f"{pt['test_acc']:.3f}",
                                        _fmt(noise)] + [_fmt(r[p]["rel_err"]) for p in policies]) + " |")
    lines.append("")
    lines.append("Entries: relative gradient error ||g - g_exact|| / ||g_exact|| on a fixed batch; noise: the "
                 "standard deviation of a minibatch gradient in the same units; train loss: mean since the "
                 "previous checkpoint.")
    return "\n".join(lines)


def _parse_optimizer(text):
    name, _, lr = text.partition(":")
    return name.strip().lower(), (float(lr) if lr else {"sgd": 0.1, "adam": 0.003, "rmsprop": 0.001}.get(
        name.strip().lower(), 0.01))


def run_optimizers(cfg: StudyConfig, log=print) -> dict:
    """SGD, Adam and RMSprop trained with approximate gradients: final test accuracy."""
    from .train import Trainer, TrainConfig  # noqa: PLC0415

    out = Path(cfg.out) / "optimizers"
    out.mkdir(parents=True, exist_ok=True)
    model = _model_name(cfg, "resnet8")
    total = _default(cfg.iterations, 200)
    rows = []
    for spec in cfg.optimizers:
        opt, lr = _parse_optimizer(spec)
        for policy in cfg.opt_policies:
            for seed in cfg.seeds:
                t0 = time.perf_counter()
                tc = TrainConfig(model=model, data=cfg.data, data_path=cfg.data_path, size=cfg.size, width=cfg.width,
                                 policy=policy, optimizer=opt, lr=lr, momentum=0.9 if opt == "sgd" else 0.0,
                                 schedule="cosine", epochs=None, iterations=total, batch_size=cfg.batch_size,
                                 seed=seed, out=None)
                trainer = Trainer(tc, progress=False, log=lambda *_: None)
                last = trainer.run()
                rows.append({"optimizer": opt, "lr": lr, "policy": policy, "seed": seed,
                             "test_acc": last["test_acc"], "train_loss": last["train_loss"],
                             "test_loss": last["test_loss"], "seconds": time.perf_counter() - t0})
                log(f"{opt:<8} lr {lr:<6g} {policy:<8} seed {seed}: test acc {last['test_acc']:.4f}  "
                    f"train loss {last['train_loss']:.4f}  ({rows[-1]['seconds']:.1f} s)")
    table = optimizers_table(rows)
    title = f"{model} on {cfg.data}, {total} iterations of batch {cfg.batch_size}, cosine schedule"
    log(f"\n{title}\n")
    log(table)
    files = [_write_csv(out / "optimizers.csv", rows)]
    (out / "optimizers.json").write_text(json.dumps(_jsonable({"config": dataclasses.asdict(cfg), "rows": rows}),
                                                    indent=1))
    (out / "table.md").write_text(table + "\n")
    files += [out / "optimizers.json", out / "table.md"]
    png = plot_optimizers(rows, out / "optimizers.png", title)
    return {"rows": rows, "files": files + ([png] if png else []), "title": title}


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


# --------------------------------------------------------------------------- #
# The BN window: fixed windows of +-W against the fitted one
# --------------------------------------------------------------------------- #
def cifar_like(n_train: int = 512, n_test: int = 256, classes: int = 10, size: int = 32, seed: int = 0):
    """CIFAR-shaped random-ish data (3 x size x size, ``classes`` classes): each class a
    smooth random template (4x4 noise blown up), each image ``0.5 template + N(0, 1)``,
    minus its own mean. Learnable, not trivial; what ``load_dataset`` returns, in the
    attributes the study uses."""
    import types  # noqa: PLC0415

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
    from .window import WindowMonitor, monitoring  # noqa: PLC0415

    exact = gradients(model, x, y, Exact(), input_grad=True)
    params = [n for n in exact if n != INPUT]
    ex = np.sqrt(sum(_sumsq(exact[n]) for n in params))
    rows, units = [], []
    for label in labels:
        policy, monitor = policy_from_name(label), WindowMonitor(names)
        with monitoring(policy, monitor):
            g = gradients(model, x, y, policy, input_grad=True)
        diff = np.sqrt(sum(_sumsq(g[n] - exact[n]) for n in params))
        dot = sum(float(np.dot(g[n].ravel(), exact[n].ravel())) for n in params)
        gn = np.sqrt(sum(_sumsq(g[n]) for n in params))
        units += [{"policy": label, **u} for u in monitor.rows]
        rows.append({"policy": label, "rel_err": _ratio(diff, ex), "cosine": _ratio(dot, gn * ex),
                     "input_rel_err": _ratio(np.sqrt(_sumsq(g[INPUT] - exact[INPUT])), np.sqrt(_sumsq(exact[INPUT]))),
                     "clipped": float(np.mean([u["clipped"] for u in monitor.rows])) if monitor.rows else 0.0,
                     "flagged_units": sum(u["outside"] > 0 for u in monitor.rows)})
    return rows, units


def run_window(cfg: StudyConfig, log=print) -> dict:
    """Gradient error of fixed windows (+-W, ``paperK-wW``) and the fitted window (``fitK``)
    at initialisation and over exact training, on digits and on CIFAR-shaped random-ish data,
    over ``window_seeds``; then a short training run of ``window_train`` policies per seed."""
    from . import nn  # noqa: PLC0415
    from .data import load_dataset  # noqa: PLC0415
    from .train import TrainConfig, Trainer  # noqa: PLC0415
    from .window import names_of  # noqa: PLC0415

    out = Path(cfg.out) / "window"
    out.mkdir(parents=True, exist_ok=True)
    labels = window_policies(cfg.window_bits, cfg.windows)
    model_name, total = _model_name(cfg), _default(cfg.iterations, 50)
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
                    f"{r['policy']} {_fmt(r['rel_err'])}" for r in point))

            train_exact(model, data, total, cfg.batch_size, seed, cfg.lr, every=cfg.every, on_checkpoint=checkpoint)
    train_rows = []
    for policy in cfg.window_train:
        for seed in cfg.window_seeds:
            t0 = time.perf_counter()
            tc = TrainConfig(model=model_name, data="digits", data_path=None, size=cfg.size, width=cfg.width,
                             policy=policy, optimizer="sgd", lr=cfg.lr, momentum=0.9, schedule="cosine", epochs=None,
                             iterations=_default(cfg.window_train_iterations, 3 * total), batch_size=cfg.batch_size,
                             seed=seed, out=None)
            last = Trainer(tc, progress=False, log=lambda *_: None).run()
            train_rows.append({"policy": policy, "seed": seed, "test_acc": last["test_acc"],
                               "train_loss": last["train_loss"], "seconds": time.perf_counter() - t0})
            log(f"train {policy:<8} seed {seed}: test acc {last['test_acc']:.4f}  train loss "
                f"{last['train_loss']:.4f}")
    table = window_table(rows, train_rows)
    title = (f"{model_name}, batch {cfg.batch_size}: gradient error of the BN window "
             f"(seeds {', '.join(map(str, cfg.window_seeds))})")
    log(f"\n{title}\n")
    log(table)
    files = [_write_csv(out / "window.csv", rows), _write_csv(out / "units.csv", units)]
    if train_rows:
        files.append(_write_csv(out / "training.csv", train_rows))
    (out / "window.json").write_text(json.dumps(_jsonable({"config": dataclasses.asdict(cfg), "rows": rows,
                                                           "training": train_rows}), indent=1))
    (out / "table.md").write_text(table + "\n")
    files += [out / "window.json", out / "table.md"]
    png = plot_window(rows, train_rows, out / "window.png", title)
    return {"rows": rows, "units": units, "training": train_rows, "files": files + ([png] if png else []),
            "title": title}


def _mean_sd(values) -> str:
    v = np.asarray(values, float)
    return _fmt(v.mean()) + (f" ± {_fmt(v.std(ddof=1))}" if len(v) > 1 else "")


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
                cells.append(_mean_sd([r["rel_err"] for r in rows if (r["policy"], r["data"], r["iteration"])
                                       == (p, d, it)]))
        sel = [r for r in rows if r["policy"] == p and r["iteration"] == first]
        cells += [f"{np.mean([r['cosine'] for r in sel]):.5f}", _mean_sd([r["input_rel_err"] for r in sel]),
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
            lines.append(f"| {p} | {_mean_sd([r['test_acc'] for r in sel])} | "
                         f"{_mean_sd([r['train_loss'] for r in sel])} |")
    return "\n".join(lines)


def plot_window(rows, train_rows, path, title: str = "") -> Path | None:
    """Per data set: relative error against W for each K (solid: first iteration, dashed:
    last; bars: sd over seeds), the fitted window at the right; then the training runs."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    import re  # noqa: PLC0415

    datas = list(dict.fromkeys(r["data"] for r in rows))
    first, last = min(r["iteration"] for r in rows), max(r["iteration"] for r in rows)
    fig, axes = plt.subplots(1, len(datas) + bool(train_rows), figsize=(5 * (len(datas) + bool(train_rows)), 4.2))
    axes = np.atleast_1d(axes)
    parsed = {p: re.fullmatch(r"(paper|fit)(\d)(?:-w([\d.]+))?", p) for p in dict.fromkeys(r["policy"] for r in rows)}
    bits = sorted({int(m.group(2)) for m in parsed.values() if m})
    ws = sorted({float(m.group(3)) for m in parsed.values() if m and m.group(3)})
    fit_x = (max(ws) if ws else 0) + 2
    for ax, d in zip(axes, datas):
        for j, k in enumerate(bits):
            for it, ls in ((first, "-"), (last, "--")):
                pts = []
                for p, m in parsed.items():
                    if m and int(m.group(2)) == k:
                        v = [r["rel_err"] for r in rows if (r["policy"], r["data"], r["iteration"]) == (p, d, it)]
                        if v:
                            pts.append((float(m.group(3)) if m.group(3) else fit_x, np.mean(v),
                                        np.std(v, ddof=1) if len(v) > 1 else 0.0, m.group(1)))
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
    return _save(plt, fig, path, title)


RUNNERS = {"depth": run_depth, "activations": run_activations, "training": run_training,
           "optimizers": run_optimizers, "window": run_window}


def run(experiment: str, cfg: StudyConfig, log=print) -> dict:
    """Run one experiment (or ``"all"``: each in turn); returns its result."""
    if experiment == "all":
        return {e: RUNNERS[e](cfg, log) for e in EXPERIMENTS}
    if experiment not in RUNNERS:
        raise ValueError(f"unknown experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)} or all")
    return RUNNERS[experiment](cfg, log)
