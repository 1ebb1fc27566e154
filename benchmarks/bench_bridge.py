"""The PyTorch bridge's cost: one training step of pre-activation ResNet-20 in
PyTorch on the CPU, plain torch against the bridge under Paper(4), Paper(8) and
Generic(4).

All variants run in one process on the same model and batch, interleaved round
by round (so a change in machine load hits them alike); the table gives the
median (and min) step time and the ratio to plain torch, the bytes kept for
backward (plain torch: every distinct saved storage, counted by a saved-tensor
hook; the bridge: its ledger) and the measured peak of torch's allocator over
the step (torch profiler memory events; the bridge's NumPy codes are not torch
allocations: tracemalloc's peak is listed beside it). "ratio" compares medians,
"min ratio" the fastest steps (less sensitive to other jobs on the machine).
``--cpu-time`` times each step by the process's CPU time instead of the wall
clock: with ``--threads 1`` it counts the work done and not the time other jobs
hold the cores (for a loaded machine; the wall clock is what users see).
``--pool`` adds Paper(4) with the bridge's CPU kernels on npapprox's worker pool
instead of torch's own OpenMP threads (docs/bridge.md, Threads).

    python benchmarks/bench_bridge.py [--batch 128] [--repeats 5] [--rounds 2] [--threads N] [--cpu-time] [--pool]

Needs the torch extra (torch==2.13.0). Target: Paper(4) within 1.10x of plain torch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np
import torch
import torch.nn.functional as F
from bench_kernels import count  # the script's own directory is on sys.path
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import npapprox as na
from npapprox import bridge
from npapprox.bridge import views

VARIANTS = {"plain torch": None, "bridge Paper(4)": na.Paper(4), "bridge Paper(8)": na.Paper(8),
            "bridge Generic(4)": na.Generic(4)}
#: with --pool: the bridge's CPU kernels on npapprox's worker pool, beside torch's OpenMP threads
POOLED = {"bridge Paper(4) on pool": na.Paper(4)}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def thread_pools() -> str:
    """The BLAS and OpenMP libraries loaded, their kernels and thread counts (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i['internal_api']} {i.get('version') or ''} ({i.get('architecture') or '-'}, "
                     f"{i['num_threads']} threads)" for i in threadpool_info())


@contextlib.contextmanager
def on_pool(pooled: bool):
    """When ``pooled``: the bridge's CPU kernels on npapprox's worker pool (``npapprox.parallel``)
    instead of torch's own OpenMP threads (``views.kernel_stream``), for comparison."""
    team = views.openmp_team
    if pooled:
        views.openmp_team = lambda n: contextlib.nullcontext()
    try:
        yield
    finally:
        views.openmp_team = team


def step(model, opt, x, y, policy, pooled=False):
    opt.zero_grad(set_to_none=True)
    with on_pool(pooled):
        with bridge.storage_policy(policy) if policy is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    opt.step()


def plain_saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages plain torch saves for backward (parameters excluded)."""
    seen = {}

    def pack(t):
        base = t._base if t._is_view() else t
        if not (base.grad_fn is None and base.requires_grad):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


def measured_peak(model, opt, x, y, policy, pooled=False) -> tuple[int, int]:
    """(torch allocator peak over one step, from profiler memory events; tracemalloc peak: NumPy)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, x, y, policy, pooled)
    np_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak, np_peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=count(), default=128)
    ap.add_argument("--repeats", type=count(), default=5, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=count(), default=2)
    ap.add_argument("--threads", type=count(), default=None,
                    help="threads of torch and of npapprox's kernels (BLAS and OpenMP pools; default: as they start)")
    ap.add_argument("--cpu-time", action="store_true", help="time steps by process CPU time (use with --threads 1)")
    ap.add_argument("--pool", action="store_true",
                    help="also Paper(4) with the kernels on npapprox's worker pool instead of torch's OpenMP threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)          # BLAS sets npapprox.parallel's worker count
    clock = time.process_time if args.cpu_time else time.perf_counter
    na.nn.manual_seed(0)
    base = bridge.to_torch(na.nn.preact_resnet20())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, args.batch))
    variants = {name: (policy, False) for name, policy in VARIANTS.items()}
    variants.update({name: (policy, True) for name, policy in POOLED.items()} if args.pool else {})
    runs = {}
    for name, variant in variants.items():
        model = copy.deepcopy(base)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), [])
        step(runs[name][0], runs[name][1], x, y, *variant)          # warm-up
    for _ in range(args.rounds):
        for name, variant in variants.items():
            model, opt, times = runs[name]
            for _ in range(args.repeats):
                t0 = clock()
                step(model, opt, x, y, *variant)
                times.append(clock() - t0)

    print(f"ResNet-20, batch {args.batch}, one training step (forward, backward, SGD); "
          f"{args.rounds} rounds x {args.repeats} steps per variant, interleaved")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; times: {'process CPU time' if args.cpu_time else 'wall clock'}")
    print(f"thread pools and BLAS: {thread_pools()}; torch: MKL {torch.backends.mkl.is_available()}, "
          f"oneDNN {torch.backends.mkldnn.is_available()}")
    plain = statistics.median(runs["plain torch"][2])
    plain_min = min(runs["plain torch"][2])
    head = (f"{'variant':<23} {'median ms':>10} {'min ms':>8} {'ratio':>6} {'min ratio':>9} {'saved for backward':>19} "
            f"{'torch peak':>11} {'NumPy peak':>11}")
    print(head)
    print("-" * len(head))
    meta = torch.empty(x.shape, device="meta")
    for name, (policy, pooled) in variants.items():
        model, opt, times = runs[name]
        med = statistics.median(times)
        saved = plain_saved_bytes(model, x, y) if policy is None else bridge.ledger(model, meta, y, policy).stored
        peak, np_peak = measured_peak(model, opt, x, y, policy, pooled)
        print(f"{name:<23} {1e3 * med:>10.1f} {1e3 * min(times):>8.1f} {med / plain:>5.2f}x "
              f"{min(times) / plain_min:>8.2f}x "
              f"{saved / 2**20:>15.1f} MiB {peak / 2**20:>7.1f} MiB {np_peak / 2**20:>7.1f} MiB")


if __name__ == "__main__":
    main()
