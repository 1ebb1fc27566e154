"""Where the worker pool's cores idle: one ResNet-20 training step (batch 128)
per storage policy, each parallel region's time and the seconds the calling
thread waited for the other workers after its own share (``parallel.timing``).
First, the hand-over itself: an empty region (``run`` of a function that does
nothing) with the waits polling for ``parallel.SPIN_SECONDS`` and with blocking
waits (``SPIN_SECONDS = 0``), interleaved in one process.

    python benchmarks/bench_pool.py [--policies exact,paper4] [--steps 5] [--batch 128]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench_kernels import _cpu_model, count, name_list  # the script's own directory is on sys.path
from threadpoolctl import threadpool_info

import npapprox as na
from npapprox import parallel
from npapprox.policy_names import policy_from_name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="exact,paper4")
    ap.add_argument("--steps", type=count(), default=5)
    ap.add_argument("--batch", type=count(), default=128)
    args = ap.parse_args(argv)
    policies = [(name, policy_from_name(name)) for name in name_list(ap, "--policies", args.policies, policy_from_name)]
    blas = "; ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, {i['num_threads']} threads)"
                     for i in threadpool_info() if i["user_api"] == "blas")
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores); BLAS {blas}; "
          f"{parallel.workers()} workers; ResNet-20, batch {args.batch}, per step over {args.steps} steps")
    _empty_regions(parallel.workers())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    for name, policy in policies:
        na.nn.manual_seed(0)
        model = na.nn.preact_resnet20()
        opt = na.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            with na.storage_policy(policy):
                loss = na.ops.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()                                              # warm-up: workers, caches
        with parallel.timing() as times:
            for _ in range(args.steps):
                step()
        rows = sorted(times.items(), key=lambda kv: -kv[1][1])
        rows.append(("all regions", [sum(t for t, _ in times.values()), sum(w for _, w in times.values())]))
        print(f"\n{name}: {'region':<44} {'in regions ms':>14} {'waiting ms':>11}")
        for region, (total, wait) in rows:
            ms = 1e3 / args.steps
            print(f"{'':<{len(name) + 2}}{region:<44} {total * ms:>14.1f} {wait * ms:>11.1f}")


def _empty_regions(n, rounds=200):
    """Median and min time of an empty region on ``n`` workers, polling and blocking."""
    if n < 2:
        print("one worker: no regions")
        return
    spin = parallel.SPIN_SECONDS
    times = {spin: [], 0.0: []}
    try:
        for _ in range(rounds):
            for s in times:
                parallel.SPIN_SECONDS = s
                parallel.run(lambda k: None, n)            # the worker is waiting as it does in a step
                t = time.perf_counter()
                parallel.run(lambda k: None, n)
                times[s].append(time.perf_counter() - t)
    finally:
        parallel.SPIN_SECONDS = spin
    for s, ts in times.items():
        what = f"polling {s * 1e6:.0f} us, then blocking" if s else "blocking at once"
        print(f"empty region on {n} workers, {what}: median {np.median(ts) * 1e6:.0f} us, "
              f"min {min(ts) * 1e6:.0f} us ({rounds} each, interleaved)")


if __name__ == "__main__":
    main()
