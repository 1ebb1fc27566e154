"""Storage-kernel throughput against the machine's own memory bandwidth.

Pack (encode) and unpack (decode) throughput of the storage kernels, side by
side: the compiled loops on preallocated outputs (``kernel``: ``npapprox._quant``),
the public compiled call that also allocates its output (``cython``:
``npapprox.kernels.cpu``), and the NumPy reference (``reference``), for

* the paper's BN-window scheme at K = 8 and K = 4 (decode with ReLU, as the conv
  weight gradient uses it),
* the generic per-group quantizer at K = 4, group 256, deterministic and stochastic,

next to the read bandwidth (``x.sum()``), copy bandwidth (``np.copyto``) and
write bandwidth (``ndarray.fill``) measured in the same run with the same number
of threads (the array is split in equal parts summed / copied / filled by that
many Python threads: NumPy releases the GIL in all three). Decode writes four
bytes per element and reads half a byte (K = 4), so its ceiling is the write
bandwidth rather than the read bandwidth. Throughput is the float32 bytes of the tensor over the time: the
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


def count(minimum=1):
    """An argparse ``type`` for a count of at least ``minimum`` (the benchmarks' repeats,
    rounds, threads, batch): anything else is argparse's one-line error, exit 2."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n
    return parse


def name_list(p, option, text, check):
    """The comma list ``text`` given to ``option``, every name passed to ``check`` (which
    raises ValueError for an unknown one) before any work: argparse's one-line error."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        p.error(f"{option}: an empty list")
    for name in names:
        try:
            check(name)
        except ValueError as e:
            p.error(f"{option}: {e}")
    return names


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=count(), default=2)
    p.add_argument("--repeats", type=count(), default=7, help="timed repeats of the compiled kernels and bandwidths")
    p.add_argument("--ref-repeats", type=count(), default=3, help="timed repeats of the (slow) NumPy reference")
    p.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference rows")
    args = p.parse_args(argv)
    args.sizes = name_list(p, "--sizes", args.sizes, _known_size)
    return args


def _known_size(name):
    if name not in SIZES:
        raise ValueError(f"unknown {name}; expected a comma list of {', '.join(SIZES)}")


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
    from npapprox import _quant
    from npapprox.kernels import cpu
    from npapprox.quant import paper_params

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

    for size in args.sizes:
        shape = SIZES[size]
        N, C = shape[:2]
        y = rng.standard_normal(shape, dtype=np.float32)
        nbytes = y.nbytes
        flat = y.reshape(-1)
        parts = np.array_split(flat, args.threads)
        out = np.empty_like(flat)
        out_parts = np.array_split(out, args.threads)

        t_read = _median_time(lambda: list(pool.map(np.sum, parts)), args.repeats)
        t_copy = _median_time(lambda: list(pool.map(lambda ab: np.copyto(*ab), zip(out_parts, parts, strict=True))),
                              args.repeats)
        t_write = _median_time(lambda: list(pool.map(lambda o: o.fill(1.0), out_parts)), args.repeats)
        read_bw, copy_bw, write_bw = (nbytes / t / 1e9 for t in (t_read, t_copy, t_write))
        out = out_parts = None   # freed before the kernels run (a del would unbind the closures' names)

        gamma = (0.5 + rng.random(C)).astype(np.float32)
        beta = rng.standard_normal(C).astype(np.float32)
        hw = flat.size // (N * C)
        fout = np.empty(flat.size, np.float32)       # preallocated outputs for the "kernel" rows
        rows = []

        def bench(name, impl, fn, repeats):
            t = _median_time(fn, repeats)
            gbs = nbytes / t / 1e9
            rows.append((name, impl, t * 1e3, gbs))
            return gbs

        # "kernel": npapprox._quant on preallocated outputs (the loops alone);
        # "cython": the public call (npapprox.kernels.cpu), which also allocates its output --
        #           fresh pages from the OS for a large array, i.e. page faults and zeroing;
        # "reference": the NumPy reference (the contract, not meant to be fast).
        def paper_rows(bits):
            p = paper_params(gamma, beta, bits)                  # what the Paper policy passes
            k, s, step, off = p["k"], p["s"], p["h_step"], p["h_off"]
            packed, _ = cpu.paper_pack(y, k, s, bits)
            pout = np.empty_like(packed)
            g = bench(f"paper K={bits} pack", "kernel",
                      lambda: _quant.paper_pack(flat, k, s, bits, C, hw, pout), args.repeats)
            if bits == 4:
                verdicts.append((size, "pack", "kernel", g / read_bw))
            g = bench(f"paper K={bits} pack", "cython", lambda: cpu.paper_pack(y, k, s, bits), args.repeats)
            if bits == 4:
                verdicts.append((size, "pack", "cython", g / read_bw))
            if not args.no_reference:
                bench(f"paper K={bits} pack", "reference", lambda: R.paper_pack(y, k, s, bits), args.ref_repeats)
            g = bench(f"paper K={bits} decode+relu", "kernel",
                      lambda: _quant.paper_decode(packed, s, step, off, bits, C, hw, True, fout), args.repeats)
            if bits == 4:
                verdicts.append((size, "decode", "kernel", g / read_bw))
            g = bench(f"paper K={bits} decode+relu", "cython",
                      lambda: cpu.paper_decode(packed, shape, s, step, off, bits, True), args.repeats)
            if bits == 4:
                verdicts.append((size, "decode", "cython", g / read_bw))
            if not args.no_reference:
                bench(f"paper K={bits} decode+relu", "reference",
                      lambda: R.paper_decode(packed, shape, s, step, off, bits, True), args.ref_repeats)

        def generic_rows():
            packed, lo, scale, _ = cpu.generic_pack(y, 4, 256, False, 0)
            pout, lout, sout = np.empty_like(packed), np.empty_like(lo), np.empty_like(scale)
            for stochastic in (False, True):
                name = f"generic K=4 G=256 {'stochastic' if stochastic else 'deterministic'} pack"
                bench(name, "kernel", lambda: _quant.generic_pack(flat, 4, 256, stochastic, 12345,
                                                                  pout, lout, sout), args.repeats)
                bench(name, "cython", lambda: cpu.generic_pack(y, 4, 256, stochastic, 12345), args.repeats)
                if not args.no_reference:
                    bench(name, "reference", lambda: R.generic_pack(y, 4, 256, stochastic, 12345),
                          args.ref_repeats)
            name = "generic K=4 G=256 decode"
            bench(name, "kernel", lambda: _quant.generic_decode(packed, lo, scale, 4, 256, fout), args.repeats)
            bench(name, "cython", lambda: cpu.generic_decode(packed, lo, scale, 4, 256, shape), args.repeats)
            if not args.no_reference:
                bench(name, "reference", lambda: R.generic_decode(packed, lo, scale, 4, 256, shape),
                      args.ref_repeats)

        paper_rows(8)
        paper_rows(4)
        generic_rows()
        y = flat = parts = fout = None   # freed before the next size allocates

        print()
        print(f"== {size}: {'x'.join(map(str, shape))} float32 = {nbytes / 2**20:.0f} MiB   "
              f"read {read_bw:.1f} GB/s (x.sum, {args.threads} threads)   "
              f"copy {copy_bw:.1f} GB/s (np.copyto, source bytes)   "
              f"write {write_bw:.1f} GB/s (ndarray.fill)")
        print(f"{'kernel':36s} {'impl':10s} {'ms':>9s} {'GB/s':>8s} {'/read':>7s} {'/copy':>7s} {'/write':>7s}")
        for name, impl, ms, gbs in rows:
            print(f"{name:36s} {impl:10s} {ms:9.2f} {gbs:8.2f} {gbs / read_bw:7.0%} {gbs / copy_bw:7.0%} "
                  f"{gbs / write_bw:7.0%}")

    load1 = os.getloadavg()
    print()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("   (other processes were running: numbers are pessimistic)"
             if max(load0[0], load1[0]) > args.threads * 0.75 else ""))
    print(f"target: compiled paper K=4 pack and decode >= {TARGET:.0%} of read bandwidth "
          f"with {args.threads} threads")
    for size, what, impl, ratio in verdicts:
        print(f"  {size:6s} {what:7s} {impl:7s} {ratio:6.0%}  {'MET' if ratio >= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
