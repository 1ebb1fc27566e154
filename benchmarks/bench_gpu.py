"""GPU benchmark: storage kernels against the device's copy bandwidth, training
step time exact vs paper 4-bit, and the largest batch per policy in a GPU memory
budget. Needs CuPy and a CUDA device; refuses (exit status 2) without one.

    python benchmarks/bench_gpu.py [--shape 256,64,64,64] [--repeats 20]
                                   [--batch 128] [--steps 20] [--budget-mib 2048]
                                   [--policies exact,paper8,paper4,paper2,generic4]
                                   [--skip-kernels] [--skip-train] [--skip-batch]

1. Kernels, on one float32 tensor (default 256x64x64x64 = 256 MiB): paper K = 8, 4
   pack and decode+ReLU, generic K = 4 group 256 pack (nearest, stochastic) and
   decode. Throughput = float32 bytes of the tensor / time (the input for pack,
   the output for decode), median of the repeats, timed with CUDA events.
   ``kernel`` = the launches alone on preallocated outputs (``gpu.DeviceLauncher``);
   ``call`` = the public function (``npapprox.kernels``), which also allocates its
   outputs and, for pack, sums the non-finite counts on the device (the total
   stays there: no synchronisation); the generic pack (three kernels:
   partial min/max, per-group parameters, encoding) is timed as a call only. Reference: the device's copy
   bandwidth, ``cupy.copyto`` between two tensors of that size, reported as
   source bytes / time (like benchmarks/bench_kernels.py; the DRAM traffic is
   twice that), and a read (``x.sum()``). Every benchmarked result is first
   checked byte for byte against the Cython kernels on the host. Then the fused
   BN -> ReLU passes at K = 4 (``gpu.bn_apply_pack``, ``gpu.bn_backward_codes``)
   and, for comparison, the backward that decodes xhat and the mask first.
2. Training: pre-activation ResNet-20 (CIFAR shapes, 3x32x32, 10 classes), SGD
   with momentum, batch 128 of random data on the device: median time of one
   step (forward + backward + update, synchronised) under each policy, warm-up
   steps excluded; and the measured peak of one forward + backward (CuPy memory
   pool, ``peak.measure_peak``).
3. Largest batch per policy whose measured pool peak (forward + backward of
   ResNet-20) fits ``--budget-mib``: doubling from 16, then bisection.

Numbers depend on the GPU, the driver and the CuPy version; the script prints
them. Nothing here runs without a GPU.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
from bench_kernels import count  # the script's own directory is on sys.path

POLICY_NAMES = "exact,paper8,paper4,paper2,generic4"
MiB = 2.0 ** 20


def _policy(name):
    """exact | paperK | genericK (nearest, group 256) | genericKs (stochastic) | naiveK."""
    import npapprox as na
    if name == "exact":
        return na.Exact()
    for prefix, make in (("paper", na.Paper), ("naive", na.Naive)):
        if name.startswith(prefix):
            return make(int(name[len(prefix):]))
    if name.startswith("generic"):
        stochastic = name.endswith("s")
        return na.Generic(int(name[len("generic"):len(name) - stochastic]), stochastic=stochastic)
    raise SystemExit(f"bench_gpu: unknown policy {name!r} (exact, paperK, naiveK, genericK, genericKs)")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="256,64,64,64", help="kernel tensor shape N,C,H,W (float32)")
    p.add_argument("--repeats", type=count(), default=20, help="timed repeats per kernel row")
    p.add_argument("--batch", type=count(), default=128, help="training batch size")
    p.add_argument("--steps", type=count(), default=20, help="timed training steps per policy")
    p.add_argument("--warmup", type=count(0), default=3, help="untimed training steps per policy")
    p.add_argument("--budget-mib", type=float, default=2048.0, help="GPU memory budget for the batch search")
    p.add_argument("--policies", default=POLICY_NAMES, help="comma list of policy names (npapprox.policy)")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-batch", action="store_true")
    return p.parse_args(argv)


def _gpu_time(cp, fn, repeats, warmup=2):
    """Median milliseconds of fn() between CUDA events (fn may synchronise itself)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(ts)


def _same(dev, host):
    d = dev.get()
    return d.dtype == host.dtype and d.shape == host.shape and np.array_equal(
        np.ascontiguousarray(d).view(np.uint8), np.ascontiguousarray(host).view(np.uint8))


def bench_kernels(cp, args):
    import npapprox.kernels as K
    from npapprox.kernels import cpu, gpu
    from npapprox.quant import paper_params

    shape = tuple(int(v) for v in args.shape.split(","))
    N, C = shape[:2]
    hw = int(np.prod(shape[2:]))
    rng = np.random.default_rng(0)
    y_host = rng.standard_normal(shape, dtype=np.float32)
    y = cp.asarray(y_host)
    nbytes = y.nbytes
    n = y.size

    dst = cp.empty_like(y)
    t_copy = _gpu_time(cp, lambda: cp.copyto(dst, y), args.repeats)
    t_read = _gpu_time(cp, lambda: y.sum(), args.repeats)
    copy_bw, read_bw = nbytes / (t_copy * 1e-3) / 1e9, nbytes / (t_read * 1e-3) / 1e9
    print(f"\n## Storage kernels, {shape} float32 ({nbytes / MiB:.0f} MiB)\n")
    print(f"copy (cupy.copyto, source bytes / time): {copy_bw:.0f} GB/s ({t_copy:.3f} ms);  "
          f"read (x.sum()): {read_bw:.0f} GB/s ({t_read:.3f} ms)\n")
    print("| kernel | impl | ms | GB/s | / copy | bytes == Cython |")
    print("|---|---|---|---|---|---|")

    run = gpu.DeviceLauncher()
    gamma = (0.5 + rng.random(C)).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    fout = cp.empty(n, dtype=np.float32)

    def row(name, impl, fn, ok):
        ms = _gpu_time(cp, fn, args.repeats)
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"| {name} | {impl} | {ms:.3f} | {gbs:.0f} | {gbs / copy_bw:.0%} | {'yes' if ok else 'NO'} |",
              flush=True)

    for bits in (8, 4):
        p = paper_params(gamma, beta, bits)                      # what the Paper policy passes
        k, s, step, off = p["k"], p["s"], p["h_step"], p["h_off"]
        host_packed, host_nf = cpu.paper_pack(y_host, k, s, bits)
        host_dec = cpu.paper_decode(host_packed, shape, s, step, off, bits, True)
        dk, ds, dstep, doff = (cp.asarray(a) for a in (k, s, step, off))
        packed, nf = K.paper_pack(y, dk, ds, bits)
        ok_pack = _same(packed, host_packed) and nf == host_nf
        ok_dec = _same(K.paper_decode(packed, shape, ds, dstep, doff, bits, True), host_dec)
        pout = cp.empty_like(packed)
        bad = cp.empty_like(packed)
        yf = y.reshape(-1)
        row(f"paper K={bits} pack", "kernel",
            lambda: run.launch("npx_paper_pack", pout.size, yf, dk, ds, np.int64(n), np.int64(C), np.int64(hw),
                               np.int32(bits), pout, bad), ok_pack)
        row(f"paper K={bits} pack", "call", lambda: K.paper_pack(y, dk, ds, bits), ok_pack)
        row(f"paper K={bits} decode+relu", "kernel",
            lambda: run.launch("npx_paper_decode", n, packed, ds, dstep, doff, np.int64(n), np.int64(C),
                               np.int64(hw), np.int32(bits), np.int32(1), fout), ok_dec)
        row(f"paper K={bits} decode+relu", "call",
            lambda: K.paper_decode(packed, shape, ds, dstep, doff, bits, True), ok_dec)

    for stochastic in (False, True):
        host = cpu.generic_pack(y_host, 4, 256, stochastic, 12345)
        got = K.generic_pack(y, 4, 256, stochastic, 12345)
        ok = all(_same(a, b) for a, b in zip(got[:3], host[:3], strict=True)) and got[3] == host[3]
        name = f"generic K=4 G=256 {'stochastic' if stochastic else 'nearest'} pack"
        row(name, "call", lambda: K.generic_pack(y, 4, 256, stochastic, 12345), ok)
    host = cpu.generic_pack(y_host, 4, 256, False, 0)        # decode the host's codes on the device
    dp, dlo, dsc = (cp.asarray(a) for a in host[:3])
    ok = _same(K.generic_decode(dp, dlo, dsc, 4, 256, shape), cpu.generic_decode(*host[:3], 4, 256, shape))
    row("generic K=4 G=256 decode", "kernel",
        lambda: run.launch("npx_generic_decode", n, dp, dlo, dsc, np.int64(n), np.int64(256), np.int32(4), fout),
        ok)
    row("generic K=4 G=256 decode", "call", lambda: K.generic_decode(dp, dlo, dsc, 4, 256, shape), ok)
    _bench_fused_bn(cp, row, y, y_host, gamma, beta)


def _bench_fused_bn(cp, row, y, y_host, gamma, beta):
    """The fused BN -> ReLU passes at K = 4 (y stands for x and for gy): the forward
    (h and the codes from x, no y kept) and the backward from the codes, against the
    backward that decodes xhat and the mask into arrays first (the path before the
    fused kernels). Checked on the host: the codes against the Cython paper_pack of
    NumPy's y, h and gx bit for bit (gx at the kernel's own per-channel constants)."""
    import npapprox.kernels as K
    from npapprox.kernels import bn as B
    from npapprox.kernels import cpu, gpu
    from npapprox.quant import paper_params

    shape, C = y_host.shape, y_host.shape[1]
    p = paper_params(gamma, beta, 4)
    mu, d = np.zeros(C, np.float32), {key: cp.asarray(v) for key, v in p.items()}
    dmu, dscale, dbeta = cp.asarray(mu), cp.asarray(gamma), cp.asarray(beta)
    x3 = y_host.reshape(shape[0], C, -1)
    yy = ((x3 - mu[:, None]) * gamma[:, None] + beta[:, None]).reshape(shape)     # bn_apply's formula
    h, packed, nf = gpu.bn_apply_pack(y, dmu, dscale, dbeta, d["k"], d["s"], 4)
    ok = _same(packed, cpu.paper_pack(yy, p["k"], p["s"], 4)[0]) and _same(h, yy * (yy > 0)) and int(nf) == 0
    row("BN+ReLU forward and K=4 codes (fused)", "call",
        lambda: gpu.bn_apply_pack(y, dmu, dscale, dbeta, d["k"], d["s"], 4), ok)
    codes = (packed, d["s"], d["x_step"], d["x_off"])
    gx, ggamma, gbeta = gpu.bn_backward_codes(y, *codes, 4, dscale)
    host_packed = packed.get()
    xhat = cpu.paper_decode(host_packed, shape, p["s"], p["x_step"], p["x_off"], 4).reshape(x3.shape)
    g = x3 * cpu.paper_mask(host_packed, shape, p["s"], 4).reshape(x3.shape)
    count = x3.shape[0] * x3.shape[2]
    a, k = (gbeta.get() / count).astype(np.float32), (ggamma.get() / count).astype(np.float32)
    ok = _same(gx, (gamma[:, None] * (g - a[:, None] - xhat * k[:, None])).reshape(shape))
    row("BN+ReLU backward from K=4 codes (fused)", "call",
        lambda: gpu.bn_backward_codes(y, *codes, 4, dscale), ok)
    one, y3 = cp.ones(C, np.float32), B.as_ncm(y)

    def decode_first():
        xh = K.paper_decode(packed, shape, d["s"], d["x_step"], d["x_off"], 4)
        return B.bn_backward(y3, B.BNSource(B.as_ncm(xh), mask=K.paper_mask(packed, shape, d["s"], 4)), dscale, one)

    row("BN+ReLU backward, xhat and mask decoded first", "call", decode_first, True)


def _train_setup(cp, batch, seed=0):
    import npapprox as na
    na.nn.manual_seed(seed)
    model = na.nn.preact_resnet20(num_classes=10).to("gpu")
    opt = na.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    x = cp.asarray(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32))
    t = cp.asarray(rng.integers(0, 10, batch))
    return model, opt, x, t


def bench_train(cp, args, policies):
    import npapprox as na
    from npapprox.peak import measure_peak

    print(f"\n## Training step, pre-activation ResNet-20, batch {args.batch}, 3x32x32 on the GPU\n")
    print("| policy | ms / step | images / s | vs exact | pool peak MiB (fwd+bwd) | final loss |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, policy in policies:
        model, opt, x, t = _train_setup(cp, args.batch)

        def step():
            opt.zero_grad()
            with na.storage_policy(policy):
                loss = na.ops.cross_entropy(model(na.Tensor(x)), t)
            loss.backward()
            opt.step()
            return loss

        for _ in range(args.warmup):
            step()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            cp.cuda.Device().synchronize()
            ts.append(time.perf_counter() - t0)
        ms = statistics.median(ts) * 1e3
        base = ms if base is None else base
        peak = measure_peak(model, x, t, policy)
        print(f"| {name} | {ms:.1f} | {args.batch / ms * 1e3:.0f} | {ms / base:.2f}x | {peak / MiB:.1f} | "
              f"{loss.item():.3f} |", flush=True)


def bench_max_batch(cp, args, policies):
    from npapprox.peak import measure_peak

    budget = int(args.budget_mib * MiB)
    print(f"\n## Largest batch in a {args.budget_mib:.0f} MiB budget (CuPy pool peak of forward + backward, "
          f"ResNet-20, 3x32x32)\n")
    print("| policy | largest batch | its peak MiB | vs exact |")
    print("|---|---|---|---|")
    base = None
    for name, policy in policies:
        model, _, _, _ = _train_setup(cp, 1)
        rng = np.random.default_rng(1)
        cache = {}

        def peak(b):
            if b not in cache:
                x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
                t = rng.integers(0, 10, b)
                try:
                    cache[b] = measure_peak(model, x, t, policy)
                except cp.cuda.memory.OutOfMemoryError:
                    cache[b] = float("inf")
                cp.get_default_memory_pool().free_all_blocks()
            return cache[b]

        lo, hi = 0, 16
        while peak(hi) <= budget:                    # double until over the budget
            lo, hi = hi, hi * 2
        while hi - lo > 1:                           # peak(lo) fits (or lo == 0), peak(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
        base = lo if base is None else base
        rel = f"{lo / base:.2f}x" if base else "-"
        print(f"| {name} | {lo} | {cache.get(lo, 0) / MiB:.1f} | {rel} |", flush=True)


def main(argv=None):
    args = _parse(argv)
    from npapprox.backend import gpu_status
    status = gpu_status()
    if not status.available:
        print(f"bench_gpu: no usable CUDA device ({status.reason}). Nothing was measured.", file=sys.stderr)
        return 2
    from npapprox.backend import cupy

    cp = cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = cp.cuda.runtime.memGetInfo()
    print(f"GPU: {name} (device {dev.id}, compute capability {dev.compute_capability}, "
          f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free)   CuPy {cp.__version__}   "
          f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}   driver {cp.cuda.runtime.driverGetVersion()}   "
          f"numpy {np.__version__}   python {platform.python_version()}")
    policies = [(p.strip(), _policy(p.strip())) for p in args.policies.split(",") if p.strip()]
    if not args.skip_kernels:
        bench_kernels(cp, args)
    if not args.skip_train:
        bench_train(cp, args, policies)
    if not args.skip_batch:
        bench_max_batch(cp, args, policies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
