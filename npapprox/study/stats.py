"""The statistics of a study: per-policy squared norms, the noise yardstick, ``Study``."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ..policy import Exact
from .grads import DEFAULT_POLICIES, INPUT, draws_of, gradients, is_stochastic, label_of, layer_order
from .tables import fmt, jsonable, ratio, sumsq, write_csv


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


def _policy_grads(label, stochastic, draws, exact) -> PolicyGrads:
    names = list(exact)
    sq_diff = {n: [sumsq(g[n] - exact[n]) for g in draws] for n in names}
    sq_g = {n: [sumsq(g[n]) for g in draws] for n in names}
    dot = {n: [float(np.dot(g[n].ravel(), exact[n].ravel())) for g in draws] for n in names}
    sq_bias, sq_spread = {}, {}
    for n in names:
        mean = np.mean([g[n] for g in draws], axis=0) if len(draws) > 1 else draws[0][n]
        sq_bias[n] = sumsq(mean - exact[n])
        sq_spread[n] = (sum(sumsq(g[n] - mean) for g in draws) / (len(draws) - 1)) if len(draws) > 1 else 0.0
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
    return Noise(m, len(batches[0][1]), {n: sum(sumsq(g[n] - mean[n]) for g in grads) / (m - 1) for n in names},
                 {n: sumsq(mean[n]) for n in names})


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
               "bias": ratio(np.sqrt(sum(r.sq_bias[n] for n in names)), ex_norm),
               "spread": ratio(np.sqrt(sum(r.sq_spread[n] for n in names)), ex_norm)}
        if self.noise is not None and all(n in self.noise.sq_noise for n in names):
            noise = np.sqrt(sum(self.noise.sq_noise[n] for n in names))
            out["noise"] = ratio(noise, ex_norm)
            out["err_over_noise"] = ratio(float(diff.mean()), noise)
            if r.sq_avg_diff is not None:
                avg = np.sqrt(sum(r.sq_avg_diff[n] for n in names))
                out["avg_err"] = ratio(avg, np.sqrt(sum(self.noise.sq_mean[n] for n in names)))
                out["persistence"] = ratio(avg, np.sqrt(sum(r.sq_batch_diff[n] for n in names)))
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
            cells = [r["policy"], fmt(r["rel_err"]), f"{r['cosine']:.6f}",
                     fmt(r["bias"]) + (f" (R={r['draws']})" if r["stochastic"] else ""),
                     fmt(r["spread"]) if r["stochastic"] else "-"]
            if has_noise:
                cells.append(fmt(r.get("err_over_noise")))
            if has_avg:
                cells += [fmt(r.get("avg_err")), fmt(r.get("persistence"))]
            cells.append(" / ".join(fmt(r[k]) for k in ("first_third", "middle_third", "last_third")))
            lines.append("| " + " | ".join(cells) + " |")
        if has_noise:
            noise = self.stats(self.policies[0]).get("noise")
            lines.append("")
            lines.append(f"SGD minibatch noise (std of a batch-{self.noise.batch_size} exact gradient over "
                         f"{self.noise.batches} minibatches) = {fmt(noise)} x ||g_exact||.")
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
        paths = [write_csv(out / f"{prefix}overall.csv", self.overall_rows()),
                 write_csv(out / f"{prefix}layers.csv", self.layer_rows()),
                 write_csv(out / f"{prefix}params.csv", self.param_rows())]
        (out / f"{prefix}study.json").write_text(json.dumps(jsonable(self.to_dict()), indent=1))
        (out / f"{prefix}table.md").write_text(self.table() + "\n")
        return paths + [out / f"{prefix}study.json", out / f"{prefix}table.md"]


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
    if include_exact and "exact" not in [label_of(s) for s in specs]:
        specs = ["exact"] + specs
    labels = [label_of(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"study_gradients: a policy is listed twice: {labels}")
    exact = gradients(model, x, y, Exact(), input_grad)
    shapes = {n: g.shape for n, g in exact.items()}
    results = {}
    for spec, label in zip(specs, labels, strict=True):
        t = time.perf_counter()
        draws = [gradients(model, x, y, p, input_grad) for p in draws_of(spec, repeats, seed)]
        results[label] = _policy_grads(label, is_stochastic(spec), draws, exact)
        results[label].seconds = time.perf_counter() - t
        say(f"  {label:<10} {len(draws)} draw(s) {results[label].seconds:6.2f} s")
    noise = None
    if noise_batches is not None:
        exact_m = [gradients(model, bx, by) for bx, by in noise_batches]
        noise = minibatch_noise(model, noise_batches, exact_m)
        if systematic:
            for spec, label in zip(specs, labels, strict=True):
                acc = {n: np.zeros(shapes[n]) for n in exact_m[0]}
                sq = dict.fromkeys(acc, 0.0)
                pols = draws_of(spec, repeats, seed + 1)
                for i, (bx, by) in enumerate(noise_batches):
                    g = gradients(model, bx, by, pols[i % len(pols)])
                    for n in acc:
                        e = g[n] - exact_m[i][n]
                        acc[n] += e
                        sq[n] += sumsq(e) / len(noise_batches)
                results[label].sq_avg_diff = {n: sumsq(a / len(noise_batches)) for n, a in acc.items()}
                results[label].sq_batch_diff = sq
    meta = {"repeats": repeats, "seed": seed, "batch_size": int(len(y)), "seconds": time.perf_counter() - t0,
            "input_grad": input_grad}
    return Study(labels, layer_order(model, x), shapes, {n: sumsq(g) for n, g in exact.items()},
                 results, noise, meta)
