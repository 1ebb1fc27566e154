"""Storage-kernel throughput against the machine's own memory bandwidth.

Pack (encode) and unpack (decode) throughput of the storage kernels, compiled
Cython (``npapprox.kernels.cpu``) and NumPy reference side by side, for

* the paper's BN-window scheme at K = 8 and K = 4 (decode with ReLU, as the conv
  weight gradient uses it),
* the generic per-group quantizer at K = 4, group 256, deterministic and stochastic,

next to the read bandwidth (``x.sum()``) and copy bandwidth (``np.copyto``)
measured in the same run with the same number of threads (the array is split in
equal parts summed / copied by that many Python threads: NumPy releases the GIL
in both). Throughput is the float32 bytes of the tensor over the time: the
*input* for pack, the *output* for decode. Every figure is the median of the
repeats; the load average before and after is printed, since other processes on
a small machine skew the numbers.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 7] [--sizes small,large]

Sizes: ``small`` = 128x16x32x32 float32 (8 MiB, a CIFAR activation; stays in the
last-level cache on many machines), ``large`` = 256x64x64x64 float32 (256 MiB,
memory-bound). Target: compiled pack and unpack at K = 4 reach at least 60% of the
read bandwidth with 2 threads (checked on the large size).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

SIZES = {"small": (128, 16, 32, 32), "large": (256, 64, 64, 64)}
TARGET = 0.60


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of the compiled kernels and bandwidths")
    p.add_argument("--ref-repeats", type=int, default=3, help="timed repeats of the (slow) NumPy reference")
    p.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference rows")
    return p.parse_args(argv)


def _median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv=None):
    args = _parse(argv)
    # before numpy / the extension load their thread pools
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # BLAS is not used here; keep it from competing

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import npapprox.kernels as K
    from npapprox.kernels import reference as R

    if not K.compiled_available():
        sys.exit("npapprox._quant is not built: pip install -e . first")
    from npapprox.kernels import cpu

    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(limits=args.threads, user_api="openmp")
        pools = "; ".join(f"{i['user_api']}:{i['internal_api']} {i['num_threads']} threads"
                          for i in threadpool_info())
    except ImportError:
        pools = "threadpoolctl not installed"

    load0 = os.getloadavg()
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs)   numpy {np.__version__}   "
          f"python {platform.python_version()}")
    print(f"threads={args.threads}  OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}  "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}  "
          f"MKL_NUM_THREADS={os.environ.get('MKL_NUM_THREADS')}")
    print(f"thread pools: {pools}")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}   "
          f"repeats: {args.repeats} (reference {args.ref_repeats}), median reported")

    pool = ThreadPoolExecutor(args.threads)
    rng = np.random.default_rng(0)
    verdicts = []

    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        shape = SIZES[size]
        N, C = shape[:2]
        y = rng.standard_normal(shape, dtype=np.float32)
        nbytes = y.nbytes
        flat = y.reshape(-1)
        parts = np.array_split(flat, args.threads)
        out = np.empty_like(flat)
        out_parts = np.array_split(out, args.threads)

        t_read = _median_time(lambda: list(pool.map(np.sum, parts)), args.repeats)
        t_copy = _median_time(lambda: list(pool.map(lambda ab: np.copyto(*ab), zip(out_parts, parts))),
                              args.repeats)
        read_bw, copy_bw = nbytes / t_read / 1e9, nbytes / t_copy / 1e9
        del out, out_parts

        gamma = (0.5 + rng.random(C)).astype(np.float32)
        beta = rng.standard_normal(C).astype(np.float32)
        rows = []

        def bench(name, impl, fn, repeats):
            t = _median_time(fn, repeats)
            gbs = nbytes / t / 1e9
            rows.append((name, impl, t * 1e3, gbs, gbs / read_bw, gbs / copy_bw))
            return gbs

        impls = [("cython", cpu, args.repeats)]
        if not args.no_reference:
            impls.append(("reference", R, args.ref_repeats))
        for bits in (8, 4):
            nb = 2 ** bits
            D = 6.0 / nb
            b = beta.astype(np.float64) / np.abs(gamma.astype(np.float64))
            s = np.clip(nb / 2 - np.floor(b / D), 1, nb - 1).astype(np.int32)
            k = (1.0 / (D * np.abs(gamma.astype(np.float64)))).astype(np.float32)
            step = (D * np.abs(gamma.astype(np.float64))).astype(np.float32)
            packed, _ = cpu.paper_pack(y, k, s, bits)
            for impl, mod, reps in impls:
                g = bench(f"paper K={bits} pack", impl, lambda: mod.paper_pack(y, k, s, bits), reps)
                if impl == "cython" and bits == 4:
                    verdicts.append((size, "pack", g / read_bw))
            for impl, mod, reps in impls:
                g = bench(f"paper K={bits} decode+relu", impl,
                          lambda: mod.paper_decode(packed, shape, s, step, beta, bits, True), reps)
                if impl == "cython" and bits == 4:
                    verdicts.append((size, "decode", g / read_bw))
            del packed
        for stochastic in (False, True):
            label = "stochastic" if stochastic else "deterministic"
            for impl, mod, reps in impls:
                bench(f"generic K=4 G=256 {label} pack", impl,
                      lambda: mod.generic_pack(y, 4, 256, stochastic, 12345), reps)
        packed, lo, scale, _ = cpu.generic_pack(y, 4, 256, False, 0)
        for impl, mod, reps in impls:
            bench("generic K=4 G=256 decode", impl,
                  lambda: mod.generic_decode(packed, lo, scale, 4, 256, shape), reps)
        del packed, lo, scale, y, flat, parts

        print()
        print(f"== {size}: {'x'.join(map(str, shape))} float32 = {nbytes / 2**20:.0f} MiB   "
              f"read {read_bw:.1f} GB/s (x.sum, {args.threads} threads)   "
              f"copy {copy_bw:.1f} GB/s (np.copyto, {args.threads} threads, source bytes)")
        print(f"{'kernel':36s} {'impl':10s} {'ms':>9s} {'GB/s':>8s} {'/read':>7s} {'/copy':>7s}")
        for name, impl, ms, gbs, r_read, r_copy in rows:
            print(f"{name:36s} {impl:10s} {ms:9.2f} {gbs:8.2f} {r_read:7.0%} {r_copy:7.0%}")

    load1 = os.getloadavg()
    print()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("   (other processes were running: numbers are pessimistic)"
             if max(load0[0], load1[0]) > args.threads * 0.75 else ""))
    print(f"target: compiled paper K=4 pack and decode >= {TARGET:.0%} of read bandwidth "
          f"with {args.threads} threads")
    for size, what, ratio in verdicts:
        print(f"  {size:6s} {what:7s} {ratio:6.0%}  {'MET' if ratio >= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
