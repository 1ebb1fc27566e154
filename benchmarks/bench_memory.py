"""Stored-activation memory per storage policy: ledger totals, measured peaks, the
transients against their bound, the largest batch under a budget, and the
training-step time of exact against paper4 (side by side, one run).

    python benchmarks/bench_memory.py [--batch 128] [--models resnet20,resnet56,resnet164]
                                      [--budget 2GiB] [--repeats 3]

* per model (pre-activation ResNets, 32x32x3): the ledger and the measured peak
  (tracemalloc, forward + backward) under exact, paper4 and paper2; the
  transients (peak - ledger) against ``ledger.transient_bound`` (docs/storage.md,
  "Transients");
* ResNet-56: the largest batch whose measured peak fits ``--budget`` per policy
  (``peak.max_batch``; ``--budget 0`` skips it);
* ResNet-20: the median time of one SGD step, exact and paper4 interleaved.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from bench_kernels import count, name_list  # the script's own directory is on sys.path

import npapprox as na
from npapprox.cli_options import byte_size
from npapprox.ledger import ledger, transient_bound
from npapprox.nn.zoo import input_divisor
from npapprox.peak import max_batch, measure_peak

POLICIES = {"exact": na.Exact, "paper4": lambda: na.Paper(4), "paper2": lambda: na.Paper(2)}
MiB = 2.0**20


def _model(name):
    na.nn.manual_seed(0)
    return na.nn.build_model(name, num_classes=10, in_channels=3, input_size=32)


def _data(n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n)


def peaks(names, batch):
    x, y = _data(batch)
    print(f"{'model':<10} {'policy':<7} {'ledger MiB':>10} {'peak MiB':>9} {'peak ratio':>10} "
          f"{'transient MiB':>13} {'bound MiB':>9} {'largest act MiB':>15}", flush=True)
    for name in names:
        model = _model(name)
        base = None
        for pname, make in POLICIES.items():
            policy = make()
            led = ledger(model, x, y, policy)
            peak = measure_peak(model, x, y, policy)
            base = base or peak
            act = max(4 * int(np.prod(e.shape)) for e in led.entries if e.kind in ("activation", "unit"))
            print(f"{name:<10} {pname:<7} {led.stored / MiB:>10.1f} {peak / MiB:>9.1f} {base / peak:>10.2f} "
                  f"{(peak - led.stored) / MiB:>13.1f} {transient_bound(led) / MiB:>9.1f} {act / MiB:>15.1f}",
                  flush=True)


def budget_batches(budget):
    model = _model("resnet56")
    exact = None
    for pname, make in POLICIES.items():
        details = {}
        t0 = time.perf_counter()
        batch, peak = max_batch(model, (3, 32, 32), 10, make(), budget, details=details)
        exact = exact or batch
        print(f"resnet56 {pname:<7} largest batch under {budget / 2**30:.2f} GiB: {batch:>6} "
              f"(peak {peak / MiB:.0f} MiB, {batch / exact:.2f}x exact's; predicted {details['predicted']}, "
              f"probes {details['probes']}, confirmed {details['confirmed']}, {time.perf_counter() - t0:.0f} s)",
              flush=True)


def step_times(batch, repeats):
    model = _model("resnet20")
    x, y = _data(batch)
    opt = na.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(policy):
        with na.storage_policy(policy):
            loss = na.ops.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {"exact": [], "paper4": []}
    for _ in range(repeats + 1):                     # interleaved; the first round warms up
        for pname, spent in times.items():
            t0 = time.perf_counter()
            step(POLICIES[pname]())
            spent.append(time.perf_counter() - t0)
    t = {p: statistics.median(v[1:]) for p, v in times.items()}
    print(f"resnet20 batch {batch}: one SGD step exact {t['exact'] * 1e3:.0f} ms, paper4 {t['paper4'] * 1e3:.0f} ms "
          f"(paper4 / exact {t['paper4'] / t['exact']:.2f}; medians of {repeats}, interleaved)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=count(), default=128)
    p.add_argument("--models", default="resnet20,resnet56,resnet164")
    p.add_argument("--budget", type=lambda t: 0 if t == "0" else byte_size(t), default=2 * 2**30)
    p.add_argument("--repeats", type=count(0), default=3, help="timed steps per policy (0: none)")
    args = p.parse_args(argv)
    peaks(name_list(p, "--models", args.models, input_divisor), args.batch)
    if args.repeats:
        step_times(args.batch, args.repeats)
    if args.budget:
        budget_batches(args.budget)


if __name__ == "__main__":
    main()
