"""Side-by-side timing: npapprox (exact mode) against PyTorch on the CPU.

One training step (forward, backward, SGD) of pre-activation ResNet-20 on
32x32x3 inputs, and convolution forward / backward at CIFAR shapes. Both
engines run in the same process with the same number of threads; the table
shows the median (and min) of the repeats and the ratio npapprox / PyTorch.

    python benchmarks/bench_engine.py [--batch 128] [--repeats 5] [--threads 2]

Needs the oracle extra (torch==2.13.0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _timeit(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-step", action="store_true", help="only the per-op table")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from threadpoolctl import threadpool_info, threadpool_limits

    import npapprox as na
    from npapprox.kernels import im2col as k

    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)
    blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, {i['num_threads']} threads)"
            for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"threads={args.threads}  numpy BLAS: {'; '.join(blas)}  torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)  compiled im2col: {k.compiled_available()}  "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")
    rng = np.random.default_rng(0)
    n = args.batch
    rows = []

    # --- per-op convolution ---------------------------------------------------------
    shapes = [  # (C, F, H, k, stride, pad)
        (16, 16, 32, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 32, 16, 3, 1, 1),
        (32, 64, 16, 3, 2, 1), (64, 64, 8, 3, 1, 1), (3, 16, 32, 3, 1, 1), (64, 64, 8, 1, 1, 0),
    ]
    for c, f, h, kk, s, pad in shapes:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = (rng.standard_normal((f, c, kk, kk)) * 0.1).astype(np.float32)
        xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
        xa, wa = na.Tensor(x, requires_grad=True), na.Tensor(w, requires_grad=True)
        name = f"conv {c}->{f} {h}x{h} k{kk} s{s}"

        def na_fwd():
            with na.no_grad():
                na.ops.conv2d(xa, wa, stride=s, padding=pad)

        def pt_fwd():
            with torch.no_grad():
                F.conv2d(xt, wt, stride=s, padding=pad)

        def na_fb():
            y = na.ops.conv2d(xa, wa, stride=s, padding=pad)
            y.backward(np.ones(y.shape, np.float32))

        def pt_fb():
            y = F.conv2d(xt, wt, stride=s, padding=pad)
            y.backward(torch.ones_like(y))

        rows.append((name + " fwd", _timeit(na_fwd, args.repeats), _timeit(pt_fwd, args.repeats)))
        rows.append((name + " fwd+bwd", _timeit(na_fb, args.repeats), _timeit(pt_fb, args.repeats)))

    # --- one training step of pre-activation ResNet-20 --------------------------------------
    if not args.skip_step:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from torch_models import TorchPreActResNet  # the oracle's mirror of the model

        na.nn.manual_seed(0)
        model = na.nn.preact_resnet20()
        tmodel = TorchPreActResNet(depth=20)
        tmodel.load_from_npapprox(model.state_dict())
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, n)
        opt = na.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def na_step():
            loss = na.ops.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def pt_step():
            loss = F.cross_entropy(tmodel(xt), yt)
            topt.zero_grad()
            loss.backward()
            topt.step()

        rows.append((f"ResNet-20 train step, batch {n}", _timeit(na_step, args.repeats),
                     _timeit(pt_step, args.repeats)))

    w = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark':<{w}}  {'npapprox ms':>12} {'(min)':>8}  {'torch ms':>9} {'(min)':>8}  {'ratio':>6}")
    for name, (na_med, na_min), (pt_med, pt_min) in rows:
        print(f"{name:<{w}}  {na_med * 1e3:>12.1f} {na_min * 1e3:>8.1f}  {pt_med * 1e3:>9.1f} "
              f"{pt_min * 1e3:>8.1f}  {na_med / pt_med:>6.2f}")


if __name__ == "__main__":
    main()
