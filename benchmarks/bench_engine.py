"""Side-by-side timing: npapprox (exact mode) against PyTorch on the CPU; storage policies' steps.

One training step (forward, backward, SGD) of pre-activation ResNet-20 on
32x32x3 inputs, and convolution forward / forward+backward at CIFAR shapes.
Each engine is timed in its own worker process (their thread pools would
otherwise spin against each other on the same cores), with the same number of
threads; the workers alternate, and the table shows the median (and min) of all
repeats and the ratio npapprox / PyTorch.

    python benchmarks/bench_engine.py [--batch 128] [--repeats 5] [--threads 2] [--rounds 2]

Needs the oracle extra (torch==2.13.0).

``--isa avx2`` runs both engines on their AVX2 code paths on an AVX-512 machine
(a stand-in for an AVX2 machine: same cores and memory, narrower vector units):
OpenBLAS's Haswell kernels (OPENBLAS_CORETYPE), PyTorch's AVX2 kernels
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), and npapprox built for AVX2
(``NPAPPROX_MARCH=haswell python setup.py build_ext --inplace --force``; the
benchmark refuses a build with another vector unit)::

    python benchmarks/bench_engine.py --isa avx2

``--policies`` times instead one SGD step of each model under each storage
policy (exact, paper4, paper2 by default), the policies interleaved in one
process so that they share the machine's state; the table shows medians and
each policy's ratio to exact (no torch needed):

    python benchmarks/bench_engine.py --policies [--models resnet20,resnet164] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_kernels import _cpu_model, count, name_list  # the script's own directory is on sys.path

CONVS = [  # (C, F, H, k, stride, pad)
    (16, 16, 32, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 32, 16, 3, 1, 1),
    (32, 64, 16, 3, 2, 1), (64, 64, 8, 3, 1, 1), (3, 16, 32, 3, 1, 1), (64, 64, 8, 1, 1, 0),
]


def _times(fn, repeats: int, warmup: int = 1) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _worker(engine: str, batch: int, repeats: int, threads: int, skip_step: bool) -> dict:
    """Time every benchmark with one engine; returns {name: [seconds, ...]}."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(threads)
    rng = np.random.default_rng(0)
    n, res = batch, {}
    if engine == "torch":
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from torch_models import TorchPreActResNet
        info = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"kernels {torch.backends.cpu.get_cpu_capability()}")
    else:
        import npapprox as na
        from npapprox.kernels import im2col as k
        blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, {i['num_threads']} threads)"
                for i in threadpool_info() if i["user_api"] == "blas"]
        info = (f"npapprox {na.__version__} (kernels built for {_built_simd()}), numpy BLAS {'; '.join(blas)}, "
                f"compiled im2row {k.compiled_available()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    for c, f, h, kk, s, pad in CONVS:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = (rng.standard_normal((f, c, kk, kk)) * 0.1).astype(np.float32)
        name = f"conv {c}->{f} {h}x{h} k{kk} s{s}"
        if engine == "torch":
            xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()

            def fwd():
                with torch.no_grad():
                    F.conv2d(xt, wt, stride=s, padding=pad)

            def fwd_bwd():
                y = F.conv2d(xt, wt, stride=s, padding=pad)
                y.backward(torch.ones_like(y))
        else:
            xa, wa = na.Tensor(x, requires_grad=True), na.Tensor(w, requires_grad=True)

            def fwd():
                with na.no_grad():
                    na.ops.conv2d(xa, wa, stride=s, padding=pad)

            def fwd_bwd():
                y = na.ops.conv2d(xa, wa, stride=s, padding=pad)
                y.backward(np.ones(y.shape, np.float32))
        res[name + " fwd"] = _times(fwd, repeats)
        res[name + " fwd+bwd"] = _times(fwd_bwd, repeats)

    if not skip_step:
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, n)
        if engine == "torch":
            model = TorchPreActResNet(depth=20)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)

            def step():
                loss = F.cross_entropy(model(xt), yt)
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            na.nn.manual_seed(0)
            model = na.nn.preact_resnet20()
            opt = na.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)

            def step():
                loss = na.ops.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        res[f"ResNet-20 train step, batch {n}"] = _times(step, repeats)
    return {"info": info, "times": res}


def policy_steps(models: list, policies: list, batch: int, repeats: int, threads: int) -> None:
    """Median time of one SGD step per model and storage policy, interleaved; ratios to the first policy."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    import npapprox as na
    from npapprox.policy_names import policy_from_name

    threadpool_limits(threads)
    blas = "; ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, {i['num_threads']} threads)"
                     for i in threadpool_info() if i["user_api"] == "blas")
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores); npapprox {na.__version__}, BLAS {blas}; "
          f"batch {batch}, medians of {repeats} interleaved steps after one warm-up round")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    print(f"{'model':<10} " + " ".join(f"{p + ' ms':>11} {'ratio':>6}" for p in policies), flush=True)
    for name in models:
        na.nn.manual_seed(0)
        model = na.nn.build_model(name, num_classes=10, in_channels=3, input_size=32)
        opt = na.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times = {p: [] for p in policies}
        for r in range(repeats + 1):
            for p in policies:
                t0 = time.perf_counter()
                with na.storage_policy(policy_from_name(p)):
                    loss = na.ops.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if r:
                    times[p].append(time.perf_counter() - t0)
        med = {p: statistics.median(v) for p, v in times.items()}
        print(f"{name:<10} " + " ".join(f"{med[p] * 1e3:>11.0f} {med[p] / med[policies[0]]:>6.2f}" for p in policies),
              flush=True)


#: --isa avx2: the environment of both workers (OpenBLAS, PyTorch's ATen and oneDNN on AVX2 code)
AVX2_ENV = {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _built_simd() -> str:
    """The vector unit npapprox's kernels were built for (``npapprox._quant.SIMD``)."""
    try:
        from npapprox._quant import SIMD
    except ImportError:
        return "none (not built)"
    return SIMD


def side_by_side_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every side-by-side benchmark (this one, bench_conv.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--batch", type=count(), default=128)
    p.add_argument("--repeats", type=count(), default=5)
    p.add_argument("--threads", type=count(), default=2)
    p.add_argument("--rounds", type=count(), default=2, help="alternating worker runs per engine")
    return p


def main(argv=None):
    p = side_by_side_parser(__doc__)
    p.add_argument("--skip-step", action="store_true", help="only the per-op table")
    p.add_argument("--policies", nargs="?", const="exact,paper4,paper2", metavar="LIST",
                   help="time steps under these storage policies instead (default exact,paper4,paper2)")
    p.add_argument("--models", default="resnet20,resnet164", help="with --policies (default resnet20,resnet164)")
    p.add_argument("--worker", choices=["npapprox", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: both engines on their AVX2 code paths (see the module docstring)")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.isa == "avx2" and not args.worker:
        if _built_simd() != "avx2":
            print(f"bench_engine: --isa avx2 needs npapprox built for AVX2 (this build: {_built_simd()}); "
                  "run NPAPPROX_MARCH=haswell python setup.py build_ext --inplace --force", file=sys.stderr)
            sys.exit(2)
        env.update(AVX2_ENV)
    if args.policies:
        from npapprox.nn.zoo import input_divisor
        from npapprox.policy_names import policy_from_name
        policy_steps(name_list(p, "--models", args.models, input_divisor),
                     name_list(p, "--policies", args.policies, policy_from_name), args.batch, args.repeats,
                     args.threads)
        return
    if args.worker:
        print(json.dumps(_worker(args.worker, args.batch, args.repeats, args.threads, args.skip_step)))
        return

    merged = {"npapprox": {}, "torch": {}}
    infos = {}
    for r in range(args.rounds):
        for engine in ("npapprox", "torch"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)] + (
                   ["--skip-step"] if args.skip_step else [])
            print(f"round {r + 1}/{args.rounds}: {engine} ...", file=sys.stderr, flush=True)
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            infos[engine] = out["info"]
            for name, ts in out["times"].items():
                merged[engine].setdefault(name, []).extend(ts)
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores); --isa {args.isa}")
    print(f"threads={args.threads}, batch={args.batch}, {args.rounds} rounds x {args.repeats} repeats per engine, "
          f"OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE', '-')}")
    for engine, info in infos.items():
        print(f"  {engine}: {info}")
    names = list(merged["npapprox"])
    w = max(len(n) for n in names)
    print(f"\n{'benchmark':<{w}}  {'npapprox ms':>12} {'(min)':>8}  {'torch ms':>9} {'(min)':>8}  {'ratio':>6}")
    for name in names:
        a, b = merged["npapprox"][name], merged["torch"][name]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<{w}}  {ma * 1e3:>12.1f} {min(a) * 1e3:>8.1f}  {mb * 1e3:>9.1f} {min(b) * 1e3:>8.1f}  "
              f"{ma / mb:>6.2f}")


if __name__ == "__main__":
    main()
