"""Stored-activation memory per storage policy: ledger totals and measured peaks,
plus the training-step time of each policy against exact mode.

    python benchmarks/bench_memory.py [--batch 128] [--skip-164] [--repeats 3]

* pre-activation bottleneck ResNet-164 (the paper's network), 32x32x3: the
  ledger of one forward pass per policy (no backward);
* pre-activation ResNet-20: ledger, measured peak of forward + backward
  (tracemalloc) and the median time of one SGD step, per policy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import npapprox as na
from npapprox.ledger import ledger, measure_peak

POLICIES = {
    "exact": lambda: na.Exact(),
    "paper 8-bit": lambda: na.Paper(8),
    "paper 4-bit": lambda: na.Paper(4),
    "generic 4-bit": lambda: na.Generic(4),
    "naive 4-bit": lambda: na.Naive(4),
}
MiB = 2.0**20


def _ledger_rows(model, x, y, names):
    print(f"{'policy':<14} {'stored MiB':>10} {'f32/unit MiB':>12} {'ratio':>6} {'std autodiff MiB':>16} {'ratio':>6}")
    for name in names:
        L = ledger(model, x, y, POLICIES[name]())
        print(f"{name:<14} {L.stored / MiB:>10.2f} {L.float32_per_unit / MiB:>12.2f} "
              f"{L.float32_per_unit / L.stored:>6.2f} {L.standard_autodiff / MiB:>16.2f} "
              f"{L.standard_autodiff / L.stored:>6.2f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-164", action="store_true")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)

    if not args.skip_164:
        print(f"== pre-activation bottleneck ResNet-164, batch {args.batch}, 32x32x3: ledger ==")
        na.nn.manual_seed(0)
        _ledger_rows(na.nn.preact_resnet164(), x, y, ["exact", "paper 8-bit", "paper 4-bit"])

    print(f"\n== pre-activation ResNet-20, batch {args.batch}, 32x32x3 ==")
    na.nn.manual_seed(0)
    model = na.nn.preact_resnet20()
    _ledger_rows(model, x, y, list(POLICIES))
    print(f"\n{'policy':<14} {'peak MiB':>9} {'vs exact':>8} {'step ms':>8} {'vs exact':>8}")
    opt = na.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    base_peak = base_time = None
    for name, make in POLICIES.items():
        policy = make()
        peak = measure_peak(model, x, y, policy)

        def step():
            with na.storage_policy(policy):
                loss = na.ops.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        base_peak, base_time = base_peak or peak, base_time or t
        print(f"{name:<14} {peak / MiB:>9.1f} {peak / base_peak:>8.2f} {t * 1e3:>8.0f} {t / base_time:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
