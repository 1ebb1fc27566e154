"""Batch-norm passes against the machine's own copy bandwidth.

Each compiled BN pass (``npapprox.kernels.bn``) at the ResNet-20 activation
shapes, timed side by side with a copy of the same tensor (``np.copyto`` split
over the same workers of ``npapprox.parallel`` that run the passes, so both pay
the same hand-over between threads), and reported
as its *effective bandwidth* -- the bytes the pass must move at least, over its
time -- in % of the copy bandwidth (a copy moves 2 bytes per byte of tensor:
one read, one write). The passes and the bytes they must move (S: the float32
tensor, K: the code width):

=====================  ==========================================  ===========
pass                   what                                        bytes
=====================  ==========================================  ===========
stats                  per-channel mean and variance (training)    S
apply h                h = relu(BN(x)) (exact unit forward; the    2S
                       conv backward's rebuild of h)
apply y                y = BN(x) (plain BN)                        2S
apply+pack K           h and the K-bit codes of y (paper unit      2S + S K/32
                       forward, ``bn_apply_pack``)
backward exact         gx, ggamma, gbeta from gy and x, ReLU mask  3S
                       rebuilt (exact unit)
backward codes K       the same from gy and the K-bit codes        2S + S K/32
                       (paper unit)
=====================  ==========================================  ===========

Outputs go to buffers allocated once (``out=``: the rows ``reused``) and, for
comparison, to fresh arrays per call (``fresh``: page faults and zeroing of new
pages, what a call without ``out`` pays for a large tensor). Timings alternate
copy and pass, ``--repeats`` times; the best of each is reported (the capability
of the machine; the median is printed too, as other processes skew a loaded
machine). Each row prints the copy's own bandwidth next to the pass's: in the
cache it depends on what the pass alternating with it leaves there. Target:
every pass >= 70% of the copy bandwidth at 128x16x32x32.

    python benchmarks/bench_bn.py [--threads N] [--repeats 15] [--bits 4] [--batch 128]

At batch 128 the 8 MiB tensor (and the copy's) stays in a last-level cache of
32 MiB, where a copy runs at cache bandwidth; ``--batch 1024`` (64 MiB) shows
the passes against a copy from and to memory.

Under each shape, the *ceiling* of each pass: its compiled kernel on one thread
over the first 4 samples (a 256 KiB tensor at 16x32x32: inputs and output stay
in a 1 MiB L2, so memory costs next to nothing), repeated, its best effective
bandwidth times the thread count, and how much of it the pass reached on the
whole tensor. The verdicts put the ceiling against the same copy as the pass
(the copy alternating with it): a pass whose ceiling is under the target is
bound by its arithmetic, not by memory -- no memory layout can lift it there,
only less arithmetic per value.

Runs against an older build too (no ``out=``, no ``bn_apply_pack``: then only
the ``fresh`` rows, apply+pack is ``bn_apply`` then ``paper_pack``, and no
ceilings).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from bench_engine import _times  # the script's own directory is on sys.path
from bench_kernels import _cpu_model, count

SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]   # ResNet-20's BN inputs, one sample
TARGET = 0.70
CEILING_SAMPLES = 4


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=count(), default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=count(), default=15)
    p.add_argument("--bits", type=int, default=4, choices=(1, 2, 4, 8))
    p.add_argument("--batch", type=count(), default=128)
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)   # npapprox.parallel's workers = BLAS's thread count
    import numpy as np

    from npapprox import parallel, quant
    from npapprox.kernels import bn as B
    from npapprox.kernels import paper_pack

    if not B.compiled_available():
        sys.exit("npapprox._bn is not built: python setup.py build_ext --inplace")
    fused = hasattr(B, "bn_apply_pack")
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs)   numpy {np.__version__}   "
          f"python {platform.python_version()}")
    try:
        from threadpoolctl import threadpool_info
        pools = "; ".join(f"{i['user_api']}:{i['internal_api']} {i.get('architecture', '')} {i['num_threads']} threads"
                          for i in threadpool_info())
    except ImportError:
        pools = "threadpoolctl not installed"
    print(f"thread pools (BLAS unused here; its thread count sets the workers): {pools}")
    print(f"threads: {args.threads} (npapprox.parallel workers: {parallel.workers()})   "
          f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"repeats: {args.repeats}, best (median) of each; K = {args.bits}; "
          f"{'fused apply+pack' if fused else 'older build: no fused apply+pack, no out='}")
    rng = np.random.default_rng(0)
    shapes = [(args.batch,) + s for s in SHAPES]
    ceilings = {}   # pass name -> its ceiling at the first shape (GB/s)
    for shape in shapes:
        n, c = shape[:2]
        x = rng.standard_normal(shape, dtype=np.float32)
        gy = rng.standard_normal(shape, dtype=np.float32)
        x3, gy3, size = B.as_ncm(x), B.as_ncm(gy), x.nbytes
        dst = np.empty_like(x3)
        parts = list(zip(np.array_split(dst.reshape(-1), args.threads), np.array_split(x.reshape(-1), args.threads),
                         strict=True))
        gamma = (0.5 + rng.random(c)).astype(np.float32)
        beta = rng.standard_normal(c).astype(np.float32)
        mu, _, inv = B.bn_batch_stats(x3, 1e-5)
        scale = gamma * inv
        p = quant.paper_params(gamma, beta, args.bits)
        y, _ = B.bn_apply(x3, mu, scale, beta)
        packed, _ = paper_pack(y, p["k"], p["s"], args.bits)
        codes = B.BNSource(None, codes=(packed, shape, p["s"], p["x_step"], p["x_off"], args.bits))
        exact = B.BNSource(x3, mu, inv, relu_beta=beta)
        code_bytes = size * args.bits // 32
        out = np.empty_like(x3)

        def pack(**o):
            if fused:
                return B.bn_apply_pack(x3, mu, scale, beta, p["k"], p["s"], args.bits, **o)
            return paper_pack(B.bn_apply(x3, mu, scale, beta)[0], p["k"], p["s"], args.bits)

        passes = [  # name, bytes, call writing fresh arrays, call writing into `out` (None: no such variant)
            ("stats", size, lambda: B.bn_batch_stats(x3, 1e-5), None),
            ("apply h", 2 * size, lambda: B.bn_apply(x3, mu, scale, beta, want_y=False, want_h=True),
             lambda: B.bn_apply(x3, mu, scale, beta, want_y=False, want_h=True, out_h=out)),
            ("apply y", 2 * size, lambda: B.bn_apply(x3, mu, scale, beta),
             lambda: B.bn_apply(x3, mu, scale, beta, out_y=out)),
            (f"apply+pack K={args.bits}", 2 * size + code_bytes, pack, (lambda: pack(out_h=out)) if fused else None),
            ("backward exact", 3 * size, lambda: B.bn_backward(gy3, exact, gamma, inv),
             lambda: B.bn_backward(gy3, exact, gamma, inv, out=out)),
            (f"backward codes K={args.bits}", 2 * size + code_bytes, lambda: B.bn_backward(gy3, codes, gamma, inv),
             lambda: B.bn_backward(gy3, codes, gamma, inv, out=out)),
        ]

        def copy(parts=parts):
            return parallel.run(lambda k: np.copyto(*parts[k]), len(parts))

        # pass name -> (its best GB/s, the best GB/s of the copy alternating with it), into reused buffers
        # where the pass has them; at the first shape, the verdicts'
        reached = {}
        if shape == shapes[0]:
            verdicts = reached
        print(f"\n== {'x'.join(map(str, shape))} float32 = {size / 2**20:.0f} MiB")
        print(f"   {'pass':22s} {'buffers':8s} {'ms':>7s} {'GB/s':>7s} {'copy GB/s':>10s} {'% of copy':>10s}"
              "  (median: ms, %)")
        for name, nbytes, fresh, reused in passes:
            for kind, fn in (("reused", reused), ("fresh", fresh)):
                if fn is None or (kind == "reused" and not fused):
                    continue
                tc, tp = _alternate(copy, fn, args.repeats)
                bw_copy = [2 * size / t for t in tc]
                best = nbytes / min(tp) / max(bw_copy)
                if name not in reached or kind == "reused":
                    reached[name] = (nbytes / min(tp), max(bw_copy))
                med = nbytes / _median(tp) / _median(bw_copy)
                print(f"   {name:22s} {kind:8s} {min(tp) * 1e3:7.3f} {nbytes / min(tp) / 1e9:7.1f} "
                      f"{max(bw_copy) / 1e9:10.1f} {100 * best:9.0f}%  ({_median(tp) * 1e3:.3f}, {100 * med:.0f}%)")
        if fused:
            small = _ceiling_kernels(x3, gy3, mu, inv, scale, beta, p, args.bits, packed)
            print(f"   {'ceiling: each kernel on 1 thread over ' + str(CEILING_SAMPLES) + ' samples':48s} "
                  f"{'GB/s':>7s} {'reached':>10s}")
            for (name, nbytes, *_), fn in zip(passes, small, strict=True):
                ceiling = args.threads * nbytes * CEILING_SAMPLES / shape[0] / min(_times(fn, 5 * args.repeats))
                print(f"   {name:22s} {'x ' + str(args.threads):>8s} {'':>7s} {ceiling / 1e9:8.1f} "
                      f"{100 * reached[name][0] / ceiling:9.0f}%")
                if shape == shapes[0]:
                    ceilings[name] = ceiling
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"target: every pass >= {100 * TARGET:.0f}% of copy bandwidth at {'x'.join(map(str, shapes[0]))}")
    for name, (bw, bw_copy) in verdicts.items():
        ratio, ceiling = bw / bw_copy, ceilings.get(name, 0) / bw_copy
        bound = "" if name not in ceilings else f"   (ceiling {100 * ceiling:.0f}%" + (
            ": bound by arithmetic)" if ceiling < TARGET else ")")
        print(f"   {name:22s} {100 * ratio:5.0f}%  {'ok' if ratio >= TARGET else 'BELOW'}{bound}")


def _ceiling_kernels(x3, gy3, mu, inv, scale, beta, p, bits, packed):
    """The compiled kernels of the passes (in the order of ``passes``), each on one thread
    over the first CEILING_SAMPLES samples, writing into buffers allocated here."""
    import numpy as np

    from npapprox import _bn

    x, gy = (np.ascontiguousarray(a[:CEILING_SAMPLES]) for a in (x3, gy3))
    n, c, m = x.shape
    out, part, mask = np.empty_like(x), np.empty((2, n, c)), np.zeros(x.shape, np.uint8)
    ggamma, gbeta, codes = np.empty(c), np.empty(c), packed[:x.size * bits // 8]
    s, step, off = p["s"].astype(np.int32), p["x_step"], p["x_off"]
    return [
        lambda: _bn.row_moments(x, part),
        lambda: _bn.bn_apply(x, mu, scale, beta, None, out),
        lambda: _bn.bn_apply(x, mu, scale, beta, out, None),
        lambda: _bn.bn_apply_pack(x, mu, scale, beta, p["k"], s, bits, out, np.empty(codes.size, np.uint8)),
        lambda: _bn.bn_backward(gy, x, mu, inv, scale, beta, mask, 1, True, out, ggamma, gbeta),
        lambda: _bn.bn_backward_codes(gy, codes, s, step, off, bits, scale, True, out, ggamma, gbeta),
    ]


def _alternate(copy, fn, repeats):
    """Times of ``copy`` and ``fn``, alternating (one warm-up each) -> (copy times, fn times)."""
    copy(), fn()
    tc, tp = [], []
    for _ in range(repeats):
        for f, ts in ((copy, tc), (fn, tp)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return tc, tp


def _median(v):
    s = sorted(v)
    return s[len(s) // 2]


if __name__ == "__main__":
    main()
