"""GEMM throughput of the two im2col layouts at CIFAR chunk shapes (GFLOP/s).

For a chunk of B samples of a 3x3 conv with F output channels, K = 9*C and
L = OH*OW positions per sample, compares the products the convolution needs:

* ``batched``: classic columns ``(B, K, L)``, one small product per sample
  (``W2 @ cols_n``, ``W2^T @ gY_n``, ``sum_n gY_n @ cols_n^T``);
* ``tall``: rows ``(B*L, K)`` (``kernels/im2col.py``), one product per chunk
  (``R @ W2^T``, ``gYr @ W2``, ``gYr^T @ R``).

    python benchmarks/bench_gemm_layout.py [--threads 2]

The BLAS kernels in use are printed (threadpoolctl). This workplace pins
OPENBLAS_CORETYPE=Haswell in the environment; unset it together with
OPENBLAS_L2_SIZE in the command to see what a stock NumPy picks on the CPU.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from bench_kernels import count  # the script's own directory is on sys.path
from threadpoolctl import threadpool_info, threadpool_limits

SHAPES = [(16, 144, 1024, 8), (32, 288, 256, 16), (64, 576, 64, 32)]   # (F, K, L, B)


def _best(fn, repeats=20):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=count(), default=2)
    args = p.parse_args(argv)
    threadpool_limits(args.threads)
    arch = [i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"BLAS kernels: {arch}, {args.threads} threads; GFLOP/s (best of 20), batched -> tall")
    rng = np.random.default_rng(0)
    print(f"{'F':>3} {'K':>4} {'L':>5} {'B':>3}  {'forward':>13}  {'input grad':>13}  {'weight grad':>13}")
    for F, K, L, B in SHAPES:
        w2 = rng.standard_normal((F, K), dtype=np.float32)
        cols = rng.standard_normal((B, K, L), dtype=np.float32)
        rows = rng.standard_normal((B * L, K), dtype=np.float32)
        gy = rng.standard_normal((B, F, L), dtype=np.float32)
        gyr = rng.standard_normal((B * L, F), dtype=np.float32)
        pairs = [
            (lambda: np.matmul(w2, cols), lambda: rows @ w2.T),
            (lambda: np.matmul(w2.T, gy), lambda: gyr @ w2),
            (lambda: np.matmul(gy, cols.transpose(0, 2, 1)).sum(0), lambda: gyr.T @ rows),
        ]
        flop = 2 * F * K * L * B
        cells = [f"{flop / _best(a) / 1e9:>5.0f} -> {flop / _best(b) / 1e9:>4.0f}" for a, b in pairs]
        print(f"{F:>3} {K:>4} {L:>5} {B:>3}  " + "  ".join(f"{c:>13}" for c in cells))


if __name__ == "__main__":
    main()
