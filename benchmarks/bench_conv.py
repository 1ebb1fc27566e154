"""3x3 stride-1 convolutions, forward+backward: im2row vs Winograd vs PyTorch, side by side.

Every 3x3 stride-1 conv shape of pre-activation ResNet-20 (and a few others with
``--more``), timed under each algorithm of ``npapprox.ops.conv`` (forced with
``NPAPPROX_CONV``: im2row, winograd2 = F(2x2,3x3), winograd4 = F(4x4,3x3), and
auto = the rule the engine uses) and with PyTorch, each in its own worker
process with the same number of threads; the workers alternate over
``--rounds``. The table shows the median time and ratios to PyTorch, plus the
error of each Winograd tile against im2row (max |diff| / max |im2row| of y, gx, gw).

    python benchmarks/bench_conv.py [--batch 128] [--repeats 5] [--threads 2] [--rounds 2] [--more]

Needs the oracle extra (torch==2.13.0) for the PyTorch column.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import _times, side_by_side_parser  # noqa: E402  (the benchmarks directory is not a package)
from bench_kernels import _cpu_model  # noqa: E402  (likewise, after the sys.path insert)

RESNET20 = [(3, 16, 32), (16, 16, 32), (32, 32, 16), (64, 64, 8)]        # (C, F, H), 3x3, stride 1, pad 1
MORE = [(8, 8, 32), (16, 16, 8), (100, 12, 32), (128, 128, 4), (256, 256, 2), (64, 64, 32)]
ENGINES = ("im2row", "winograd2", "winograd4", "auto", "torch")


def _inputs(c, f, h, n):
    import numpy as np
    rng = np.random.default_rng((c, f, h))
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = (rng.standard_normal((f, c, 3, 3)) / (3 * c ** 0.5)).astype(np.float32)
    g = rng.standard_normal((n, f, h, h)).astype(np.float32)
    return x, w, g


def _worker(engine: str, shapes, batch: int, repeats: int, threads: int) -> dict:
    """{"info": str, "shapes": {name: {"times": [s, ...], "tile": Winograd tile or 0}}}; with
    $BENCH_CONV_DUMP, y, gx and gw of each shape are saved to $BENCH_CONV_DUMP-<engine>-<C>-<F>-<H>.npz."""
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(threads)
    res = {}
    if engine == "torch":
        import torch
        torch.set_num_threads(threads)
        info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        import npapprox as na
        from npapprox.ops import conv
        blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, {i['num_threads']} threads)"
                for i in threadpool_info() if i["user_api"] == "blas"]
        info = f"npapprox {na.__version__}, numpy BLAS {'; '.join(blas)}"
    for c, f, h in shapes:
        x, w, g = _inputs(c, f, h, batch)
        if engine == "torch":
            xt, wt, gt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_(), torch.from_numpy(g)

            def fwd_bwd():
                xt.grad = wt.grad = None
                torch.nn.functional.conv2d(xt, wt, padding=1).backward(gt)
        else:
            xa, wa = na.Tensor(x, requires_grad=True), na.Tensor(w, requires_grad=True)
            tile = conv.winograd_tile(x.shape, w.shape, 1, 1)

            def fwd_bwd():
                xa.grad = wa.grad = None
                na.ops.conv2d(xa, wa, padding=1).backward(g)
        name = f"{c}->{f} {h}x{h}"
        res[name] = {"times": _times(fwd_bwd, repeats)}
        if engine != "torch":
            res[name]["tile"] = tile
            dump = os.environ.get("BENCH_CONV_DUMP")
            if dump:  # y, gx, gw of this engine, for the error columns
                import numpy as np
                xa.grad = wa.grad = None
                y = na.ops.conv2d(xa, wa, padding=1)
                y.backward(g)
                np.savez(f"{dump}-{engine}-{c}-{f}-{h}.npz", y=y.data, gx=xa.grad, gw=wa.grad)
    return {"info": info, "shapes": res}


def _errors(dump, shapes):
    """max |a - im2row| / max |im2row| of y, gx, gw, per Winograd engine and shape."""
    import numpy as np
    out = {}
    for c, f, h in shapes:
        ref = np.load(f"{dump}-im2row-{c}-{f}-{h}.npz")
        for eng in ("winograd2", "winograd4"):
            got = np.load(f"{dump}-{eng}-{c}-{f}-{h}.npz")
            out[(eng, f"{c}->{f} {h}x{h}")] = [float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max())
                                              for k in ("y", "gx", "gw")]
    return out


def main(argv=None):
    p = side_by_side_parser(__doc__)
    p.add_argument("--more", action="store_true", help="also shapes outside ResNet-20 (the auto rule's evidence)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--shapes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, json.loads(args.shapes), args.batch, args.repeats, args.threads)))
        return
    shapes = RESNET20 + (MORE if args.more else [])
    import tempfile
    dump_dir = tempfile.mkdtemp(prefix="bench-conv-")
    dump = os.path.join(dump_dir, "out")
    times, infos, tiles = {e: {} for e in ENGINES}, {}, {}
    for r in range(args.rounds):
        for engine in ENGINES:
            env = dict(os.environ, BENCH_CONV_DUMP=dump)
            if engine != "torch":
                env["NPAPPROX_CONV"] = engine
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--shapes", json.dumps(shapes),
                   "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            print(f"round {r + 1}/{args.rounds}: {engine} ...", file=sys.stderr, flush=True)
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            infos["torch" if engine == "torch" else "npapprox"] = out["info"]
            for name, d in out["shapes"].items():
                times[engine].setdefault(name, []).extend(d["times"])
                if engine == "auto":
                    tiles[name] = d["tile"]
    errs = _errors(dump, shapes)
    print(f"CPU: {_cpu_model()}; threads={args.threads}, batch={args.batch}, "
          f"{args.rounds} rounds x {args.repeats} repeats per engine; 3x3 stride 1 pad 1, forward+backward")
    for engine, info in infos.items():
        print(f"  {engine}: {info}")
    med = {e: {n: statistics.median(t) for n, t in times[e].items()} for e in ENGINES}
    print(f"\n{'shape':<14} {'im2row':>8} {'wino2':>8} {'wino4':>8} {'torch':>8}   {'ratios to torch:':<16}"
          f"{'im2row':>7} {'wino2':>6} {'wino4':>6} {'auto':>6} (auto=)   err wino2 / wino4 (y, gx, gw)")
    for name in med["im2row"]:
        t = {e: med[e][name] for e in ENGINES}
        auto = f"wino{tiles[name]}" if tiles[name] else "im2row"
        e2 = " ".join(f"{v:.0e}" for v in errs[("winograd2", name)])
        e4 = " ".join(f"{v:.0e}" for v in errs[("winograd4", name)])
        print(f"{name:<14} " + " ".join(f"{t[e] * 1e3:>8.1f}" for e in ENGINES if e != "auto") + " ms" + " " * 16
              + " ".join(f"{t[e] / t['torch']:>6.2f}" for e in ("im2row", "winograd2", "winograd4", "auto"))
              + f" ({auto})   {e2} / {e4}")


if __name__ == "__main__":
    main()
