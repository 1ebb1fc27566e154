#!/usr/bin/env bash
# gpu_check.sh -- one-shot GPU check of npapprox (about 12 minutes at most). Run from the repo root:
#     bash benchmarks/gpu_check/gpu_check.sh            (results in $OUT if set, else ./gpu_out)
#     bash benchmarks/gpu_check/gpu_check.sh --dry-run  (no GPU needed: checks the probe script and the
#                                                        pytest selections, runs nothing else)
# Downloads nothing, and builds the Cython extensions afresh (a build from another machine is removed
# first). Needs Python 3 with numpy, scipy, Cython, pytest, hypothesis, threadpoolctl, tqdm, CuPy for
# CUDA 13 (with NVRTC and the CUDA headers) and g++. Everything lands in $OUT: env.txt, build.log,
# probes_*.json/log, pytest_*.log, junit_*.xml, bench_*.log, timeline.txt; a compact summary is printed last.
set -u -o pipefail
DRY=0; [[ ${1:-} == --dry-run ]] && DRY=1
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
T0=$SECONDS; BUDGET=${BUDGET:-690}                   # seconds for the whole script
left()  { echo $(( BUDGET - (SECONDS - T0) )); }
cap()   { local w=$1 r=${2:-0} l; l=$(( $(left) - r )); (( l < w )) && w=$l; (( w < 10 )) && w=10; echo "$w"; }
stamp() { echo "=== [+$((SECONDS - T0))s, $(left)s left] $*" | tee -a "$OUT/timeline.txt"; }

export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
       CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/npx_cupy_kernel_cache} CUPY_DUMP_CUDA_SOURCE_ON_ERROR=1
unset CUPY_TF32 NVIDIA_TF32_OVERRIDE CUPY_ACCELERATORS NPAPPROX_REFERENCE_KERNELS NPAPPROX_REQUIRE_NVCC \
      NPAPPROX_REQUIRE_ORACLE 2>/dev/null || true

# ---------------------------------------------------------------------------------------------- the probes
cat > "$OUT/gpu_probe.py" <<'PYEOF'
"""Targeted GPU probes for npapprox: facts the test suite only shows indirectly.

usage: python gpu_probe.py [basic] [big] [resnet] [perf]      (results: $OUT/probes_<group>.json and stdout)
"""
import json
import os
import sys
import time
import traceback

import numpy as np

OUT = os.environ.get("OUT", ".")
GROUPS = set(sys.argv[1:]) or {"basic"}
results = {}


def probe(fn):
    """Run fn() now; record OK/FAIL with its info, never stop the script."""
    name, t0 = fn.__name__, time.perf_counter()
    try:
        info = fn()
        results[name] = {"ok": True, "s": round(time.perf_counter() - t0, 2), "info": info}
    except Exception as e:  # noqa: BLE001
        results[name] = {"ok": False, "s": round(time.perf_counter() - t0, 2), "error": f"{type(e).__name__}: {e}"}
        traceback.print_exc(limit=4)
    r = results[name]
    print(f"PROBE {name}: {'OK' if r['ok'] else 'FAIL'} {r['s']}s {r.get('info', r.get('error'))}", flush=True)
    with open(os.path.join(OUT, f"probes_{'_'.join(sorted(GROUPS))}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return fn


import npapprox.backend as B  # noqa: E402

print("gpu_available:", B.gpu_available(), "| gpu_status:", B.gpu_status(), flush=True)
import cupy as cp  # noqa: E402  (raises visibly if CuPy does not import)

import npapprox.kernels as K  # noqa: E402
from npapprox.kernels import gpu as G  # noqa: E402
from npapprox.kernels import reference as R  # noqa: E402


def hexs(a):
    return [hex(int(v)) for v in np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32).ravel()]


def same(dev, host):
    """dtype, shape and bytes equal (dev: device or host array)."""
    d, h = cp.asnumpy(dev), np.asarray(host)
    return d.dtype == h.dtype and d.shape == h.shape and np.ascontiguousarray(d).tobytes() == np.ascontiguousarray(h).tobytes()


def free():
    cp.get_default_memory_pool().free_all_blocks()


def fill(n, seed):
    """float32 (n,) on the device from a tiled random block (fast for n > 2^31)."""
    blk = cp.asarray(np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32))
    x = cp.empty(n, np.float32)
    m = n // blk.size
    x[: m * blk.size].reshape(m, blk.size)[...] = blk
    x[m * blk.size:] = blk[: n - m * blk.size]
    return x


# --------------------------------------------------------------------------- basic
if "basic" in GROUPS:
    @probe
    def versions():
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info = {"cupy": cp.__version__, "numpy": np.__version__, "python": sys.version.split()[0], "device": name,
                "cc": dev.compute_capability, "runtime": cp.cuda.runtime.runtimeGetVersion(),
                "driver": cp.cuda.runtime.driverGetVersion(),
                "free/total GiB": [round(v / 2 ** 30, 1) for v in cp.cuda.runtime.memGetInfo()],
                "pool": type(cp.get_default_memory_pool()).__name__}
        for key, get in (("nvrtc", lambda: cp.cuda.nvrtc.getVersion()),
                         ("accelerators", lambda: cp._core.get_routine_accelerators())):
            try:
                info[key] = get()
            except Exception as e:  # noqa: BLE001
                info[key] = repr(e)
        return info

    @probe
    def cupy_elementwise_compile():     # needs NVRTC + CUDA headers (CuPy 14 refuses to compile without them)
        t = time.perf_counter()
        s = float((cp.arange(10, dtype=cp.float32) * np.float32(2) + 1).sum())
        return {"sum (expect 100.0)": s, "first-use s": round(time.perf_counter() - t, 2)}

    @probe
    def rawmodule_compile():            # quant.cu through cupy.RawModule with gpu.OPTIONS (+ CuPy's -ftz=true)
        launcher, t = G.DeviceLauncher(), time.perf_counter()
        for name in G.KERNELS:
            launcher._function(name)
        return {"kernels": len(G.KERNELS), "compile s": round(time.perf_counter() - t, 2), "options": G.OPTIONS}

    @probe
    def nan_payload_generic_decode():   # GPU f32 arithmetic gives 0x7fffffff; the decoders write 0x7fc00000
        x = np.float32([1.0, np.nan, 2.0, 3.0, 3e38, -3e38, 1.0, 0.5])   # group 0: a NaN; group 1: range > FLT_MAX
        ref, got = R.generic_pack(x, 4, 4), K.generic_pack(cp.asarray(x), 4, 4)
        dec_ref = R.generic_decode(*ref[:3], 4, 4, x.shape)
        dec_gpu = K.generic_decode(*(cp.asarray(a) for a in ref[:3]), 4, 4, x.shape)
        return {"packed/lo/scale same": [same(g, r) for g, r in zip(got[:3], ref[:3])], "nonfinite": (got[3], ref[3]),
                "decode same": same(dec_gpu, dec_ref), "decode ref": hexs(dec_ref), "decode gpu": hexs(cp.asnumpy(dec_gpu)),
                "cupy NaN+1": hexs(cp.asnumpy(cp.asarray(np.float32([np.nan])) + np.float32(1)))}

    @probe
    def subnormals_without_ftz():
        y = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, 5.877472e-39]).reshape(6, 1, 1)
        k, s, step, off = np.float32([1.0]), np.int32([1]), np.float32([1e-40]), np.float32([-1e-45])
        info = {}
        for bits in (1, 4, 8):
            rp, rn = R.paper_pack(y, k, s, bits)
            gp, gn = K.paper_pack(cp.asarray(y), cp.asarray(k), cp.asarray(s), bits)
            rd = R.paper_decode(rp, y.shape, s, step, off, bits)
            gd = K.paper_decode(cp.asarray(rp), y.shape, cp.asarray(s), cp.asarray(step), cp.asarray(off), bits)
            info[f"paper K={bits} pack, decode"] = (bool(same(gp, rp) and gn == rn), bool(same(gd, rd)))
        x = np.float32([1e-45, 2e-45, 3e-42, 1.0, 1e-45, 0.0])
        for g in (2, 3, 6):
            ref, got = R.generic_pack(x, 8, g), K.generic_pack(cp.asarray(x), 8, g)
            info[f"generic G={g} packed/lo/scale"] = [bool(same(a, b)) for a, b in zip(got[:3], ref[:3])]
        t = cp.asarray(np.float32([1e-45, 1e-40]))
        info["CuPy ufunc t*1 (flushes?)"] = hexs(cp.asnumpy(t * np.float32(1)))
        info["CuPy ufunc t>0"] = cp.asnumpy(t > 0).tolist()
        return info

    @probe
    def nan_payload_paper_decode():     # step / off NaN with payloads, inf - inf: every NaN is 0x7fc00000
        C = 4
        step = np.uint32([0x7fc00001, 0xffc00000, 0x3f800000, 0x7f800000]).view(np.float32)
        off = np.uint32([0, 0, 0xffffffff, 0xff800000]).view(np.float32)
        s = np.full(C, 2, np.int32)
        packed = R.pack_bits(np.tile(np.arange(4, dtype=np.uint8), C), 2)
        info = {}
        for relu in (False, True):
            ref = R.paper_decode(packed, (1, C, 4), s, step, off, 2, relu)
            got = K.paper_decode(cp.asarray(packed), (1, C, 4), cp.asarray(s), cp.asarray(step), cp.asarray(off),
                                 2, relu)
            info[f"relu={relu} same"] = bool(same(got, ref))
            info[f"relu={relu} NaN patterns gpu"] = sorted(set(h for h, v in zip(hexs(cp.asnumpy(got)),
                                                                                  np.isnan(ref).ravel()) if v))
        return info

    @probe
    def fused_bn_kernels():             # npx_bn_apply_pack, npx_bn_codes_*: bytes vs the reference, timing
        from npapprox.kernels import bn as BN
        from npapprox.kernels import use_reference
        from npapprox.quant import paper_params
        rng = np.random.default_rng(12)
        shape, C = (8, 16, 9, 11), 16                     # odd planes: codes end inside bytes
        x = rng.standard_normal(shape).astype(np.float32)
        x[0, 0, 0, :3] = [np.nan, np.inf, 1e-45]
        gamma = rng.uniform(-2, 2, C).astype(np.float32)
        gamma[1] = 0
        beta = rng.uniform(-1, 1, C).astype(np.float32)
        beta[2] = 5 * abs(gamma[2])
        mu, scale = rng.standard_normal(C).astype(np.float32), (gamma * rng.uniform(0.5, 2, C)).astype(np.float32)
        with np.errstate(all="ignore"):
            y = ((x.reshape(8, C, -1) - mu[:, None]) * scale[:, None] + beta[:, None]).reshape(shape)
            h = y * (y > 0)
        gy = rng.standard_normal(shape).astype(np.float32)
        info = {}
        for bits in (1, 2, 4, 8):
            p = paper_params(gamma, beta, bits)
            rp, rn = R.paper_pack(y, p["k"], p["s"], bits)
            gh, gp, gn = G.bn_apply_pack(*(cp.asarray(a) for a in (x, mu, scale, beta, p["k"], p["s"])), bits)
            hd, nan = cp.asnumpy(gh), np.isnan(h)
            info[f"apply_pack K={bits} packed, count, h (NaN payloads aside)"] = [
                same(gp, rp), int(gn) == rn, bool((np.isnan(hd) == nan).all() and hd[~nan].tobytes() == h[~nan].tobytes())]
            dev = [cp.asarray(a) for a in (gy, rp, p["s"], p["x_step"], p["x_off"])]
            gx, gg, gb = G.bn_backward_codes(*dev, bits, cp.asarray(scale))
            gg, gb = cp.asnumpy(gg), cp.asnumpy(gb)
            xh = R.paper_decode(rp, shape, p["s"], p["x_step"], p["x_off"], bits).reshape(8, C, -1)
            g = gy.reshape(8, C, -1) * R.paper_mask(rp, shape, p["s"], bits).reshape(8, C, -1)
            t = (g * xh).astype(np.float64)
            n = g.shape[0] * g.shape[2]                   # N*M values per channel
            a, k = (gb / n).astype(np.float32), (gg / n).astype(np.float32)
            want = scale[:, None] * (g - a[:, None] - xh * k[:, None])
            close = [bool((np.abs(got - terms.sum(axis=(0, 2))) <= 1e-12 * np.abs(terms).sum(axis=(0, 2))).all())
                     for got, terms in ((gb, g.astype(np.float64)), (gg, t))]
            info[f"backward K={bits} gx bits, gbeta, ggamma"] = [same(gx, want.reshape(shape))] + close
        shape = (64, 16, 32, 32)                          # speed: fused pass vs decoding first (CuPy reference)
        y = cp.asarray(rng.standard_normal(shape).astype(np.float32))
        p = paper_params(np.ones(16, np.float32), np.zeros(16, np.float32), 4)
        packed, _ = K.paper_pack(y, cp.asarray(p["k"]), cp.asarray(p["s"]), 4)
        codes = (packed, shape, cp.asarray(p["s"]), cp.asarray(p["x_step"]), cp.asarray(p["x_off"]), 4)
        gy3, one = BN.as_ncm(y), cp.ones(16, cp.float32)
        for label, forced in (("fused ms", False), ("decode-first ms", True)):
            use_reference(forced)
            try:
                BN.bn_backward(gy3, BN.BNSource(None, codes=codes), one, one)
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    BN.bn_backward(gy3, BN.BNSource(None, codes=codes), one, one)
                cp.cuda.Device().synchronize()
                info[f"bn_backward 64x16x32x32 K=4 {label}"] = round(100 * (time.perf_counter() - t0), 3)
            finally:
                use_reference(False)
        return info

    @probe
    def paper_params_extreme_gamma():   # computed on the host: CuPy's f64 -> f32 casts would flush k / h_step
        from npapprox.quant import paper_params
        gamma = np.float32([1e-38, 3e-39, -1e-45, 1e38, 1.0, 0.0])
        beta = np.float32([1e-38, -1e-39, 0.0, 1e38, 2.5, 1.0])
        info = {}
        for bits in (1, 4, 8):
            h, d = paper_params(gamma, beta, bits), paper_params(cp.asarray(gamma), cp.asarray(beta), bits)
            info[f"K={bits} same"] = {key: bool(same(d[key], h[key])) for key in h}
            info[f"K={bits} device arrays"] = all(isinstance(v, cp.ndarray) for v in d.values())
        return info

    @probe
    def device_counts_and_deferred_check():   # non-finite counts stay on the device until backward's end
        from npapprox import checks
        from npapprox.policy import Generic
        x = cp.asarray(np.float32([1.0, np.inf, 2.0, np.nan]))
        out = K.generic_pack(x, 4, 4)
        ctx = type("C", (), {"fn": type("F", (), {"__name__": "Probe"})})()
        Generic(4).pack(ctx, "x", x)
        pending = checks.pending()
        try:
            checks.flush()
            raised = None
        except FloatingPointError as e:
            raised = str(e)
        return {"count type": type(out[3]).__name__, "count": int(out[3]), "pending": pending, "raised": raised}

    @probe
    def pool_peak_hook():
        with B.gpu_memory_peak() as tr:
            a = cp.empty(3 << 20, cp.uint8)
            b = cp.empty(1 << 20, cp.uint8)
            del a, b
            c = cp.empty(1 << 20, cp.uint8)
            del c
        return {"peak B": tr.peak, "expected >=": 4 << 20}

# --------------------------------------------------------------------------- big (> 2^31 and > 2^32 elements)
if "big" in GROUPS:
    FREE = cp.cuda.runtime.memGetInfo()[0]
    SH = int(os.environ.get("PROBE_SHIFT", "32"))          # sizes ~2^SH elements (smaller only for smoke tests)
    BIG = FREE > 64 * 2 ** 30 or os.environ.get("PROBE_FORCE") == "1"
    print(f"big probes: {FREE / 2 ** 30:.0f} GiB free -> {'run' if BIG else 'skipped'}", flush=True)

    @probe
    def big_counter_uniform_index_wrap():
        if not BIG:
            return "skipped"
        n = (1 << 32) + 16                               # the noise index is i mod 2^32 (64-bit thread index)
        r = K.counter_uniform(n, 7, xp=cp)
        idx = np.arange((1 << 31) - 4, (1 << 31) + 4, dtype=np.uint64).astype(np.uint32)
        info = {"r[2^32+j] == r[j]": same(r[1 << 32:], cp.asnumpy(r[:16])),
                "r around 2^31 == reference": same(r[(1 << 31) - 4:(1 << 31) + 4], R._hash_uniform(np, idx, 7))}
        del r
        free()
        return info

    @probe
    def big_bits_and_generic():
        if not BIG:
            return "skipped"
        info = {}
        n = (1 << SH) + 77
        codes = cp.zeros(n, cp.uint8)
        start = (n - 4096) // 8 * 8
        codes[start:] = cp.asarray(np.random.default_rng(1).integers(0, 2, n - start).astype(np.uint8))
        packed = K.pack_bits(codes, 1)
        info["pack_bits(1) tail"] = same(packed[start // 8:], R.pack_bits(cp.asnumpy(codes[start:]), 1))
        info["unpack_bits(1) tail"] = same(K.unpack_bits(packed, n, 1)[start:], cp.asnumpy(codes[start:]))
        del codes, packed
        free()
        n = (1 << SH) + 40                           # generic K=4, G=256, nearest: the last full and the partial group
        x = fill(n, 2)
        got = K.generic_pack(x, 4, 256)
        start = (n // 256 - 1) * 256
        xt = cp.asnumpy(x[start:])
        ref = R.generic_pack(xt, 4, 256)
        info["generic tail packed, lo, scale"] = [same(got[0][start // 2:], ref[0]), same(got[1][-2:], ref[1]),
                                                 same(got[2][-2:], ref[2])]
        info["generic nonfinite (expect 0)"] = got[3]
        del x
        dec = K.generic_decode(got[0], got[1], got[2], 4, 256, (n,))
        info["generic decode tail"] = same(dec[start:], R.generic_decode(*ref[:3], 4, 256, xt.shape))
        del dec, got
        free()
        return info

    @probe
    def big_paper():
        if not BIG:
            return "skipped"
        HW = (1 << (SH - 3)) + 8
        shape, n, L = (4, 2, HW), 8 * HW, min(1 << 20, HW // 2)   # n = 2^32 + 64; the tail crosses flat index 2^32
        y = fill(n, 3).reshape(shape)
        k, s = np.float32([2.0, 0.7]), np.int32([8, 5])
        step, off = np.float32([0.1, 0.2]), np.float32([0.0, -1.0])
        packed, nf = K.paper_pack(y, cp.asarray(k), cp.asarray(s), 4)
        start = n - L                                   # inside the last channel plane (channel 1), byte aligned
        yt = cp.asnumpy(y.reshape(-1)[start:]).reshape(1, 1, L)
        del y
        free()
        rp, rn = R.paper_pack(yt, k[1:], s[1:], 4)
        info = {"pack tail": same(packed[start // 2:], rp), "nonfinite (expect 0)": nf}
        dec = K.paper_decode(packed, shape, cp.asarray(s), cp.asarray(step), cp.asarray(off), 4, relu=True)
        info["decode+relu tail"] = same(dec.reshape(-1)[start:],
                                        R.paper_decode(rp, (1, 1, L), s[1:], step[1:], off[1:], 4, relu=True).reshape(-1))
        del dec
        free()
        mask = K.paper_mask(packed, shape, cp.asarray(s), 4)
        info["mask tail"] = same(mask.reshape(-1)[start:], R.paper_mask(rp, (1, 1, L), s[1:], 4).reshape(-1))
        del mask, packed
        free()
        return info

# --------------------------------------------------------------------------- resnet
if "resnet" in GROUPS:
    @probe
    def resnet_cpu_vs_gpu():            # every gradient's relative error (the test only reports the first failure)
        from npapprox import nn, ops
        from npapprox.policy import Exact, Generic, Paper, storage_policy
        from npapprox.tensor import Tensor
        rng = np.random.default_rng(20190121)
        X = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
        T = rng.integers(0, 5, 16)

        def make():
            nn.manual_seed(1)
            return nn.PreActResNet(depth=8, num_classes=5, in_channels=3, width=8)

        cpu, gpu = make(), make().to("gpu")
        info = {}
        for pol in (Exact(), Paper(4), Generic(4)):
            runs = []
            for m, x, t in ((cpu, X, T), (gpu, cp.asarray(X), cp.asarray(T))):
                m.zero_grad()
                t0 = time.perf_counter()
                with storage_policy(pol):
                    loss = ops.cross_entropy(m(Tensor(x)), t)
                loss.backward()
                grads = {n: cp.asnumpy(p.grad).astype(np.float64) for n, p in m.named_parameters()}
                runs.append((grads, loss.item(), round(time.perf_counter() - t0, 2)))
            (gc, lc, tc), (gg, lg, tg) = runs
            rel = {n: float(np.linalg.norm(gg[n] - gc[n]) / max(np.linalg.norm(gc[n]), 1e-30)) for n in gc}
            info[repr(pol)] = {"loss cpu, gpu": (lc, lg), "s cpu, gpu": (tc, tg),
                               "worst rel": [(n, f"{v:.2e}") for n, v in sorted(rel.items(), key=lambda kv: -kv[1])[:3]]}
        return info

# --------------------------------------------------------------------------- perf
if "perf" in GROUPS:
    @probe
    def conv_chunking_and_syncs():
        """ResNet-20 step at batch 128: one im2row chunk per conv (GPU_CHUNK_BYTES, the default) vs
        2 MiB chunks (the CPU's cache sizing, what the GPU used before issue 16)."""
        import npapprox as na
        import npapprox.ops.conv as C
        rng, nb = np.random.default_rng(0), int(os.environ.get("PROBE_PERF_BATCH", "128"))
        x = cp.asarray(rng.standard_normal((nb, 3, 32, 32)).astype(np.float32))
        t = cp.asarray(rng.integers(0, 10, nb))
        info, default = {}, C.GPU_CHUNK_BYTES
        try:
            for label, chunk in (("2 MiB chunks", 2 << 20), ("one chunk", default)):
                C.GPU_CHUNK_BYTES = chunk
                for pname, pol in (("exact", na.Exact()), ("paper4", na.Paper(4))):
                    na.nn.manual_seed(0)
                    model = na.nn.preact_resnet20(num_classes=10).to("gpu")
                    opt = na.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                    ts = []
                    for i in range(4):
                        cp.cuda.Device().synchronize()
                        t0 = time.perf_counter()
                        opt.zero_grad()
                        with na.storage_policy(pol):
                            loss = na.ops.cross_entropy(model(na.Tensor(x)), t)
                        loss.backward()
                        opt.step()
                        cp.cuda.Device().synchronize()
                        ts.append(time.perf_counter() - t0)
                    info[f"{label} {pname} ms/step"] = round(1e3 * float(np.median(ts[1:])), 1)
        finally:
            C.GPU_CHUNK_BYTES = default
        return info
PYEOF

if (( DRY )); then   # what can be checked without a GPU: the probe script compiles, the selections collect
  rc=0
  $PY -m py_compile "$OUT/gpu_probe.py" && echo "dry run: gpu_probe.py compiles" || rc=1
  for sel in tests/test_parity.py tests/test_gpu.py; do
    n=$($PY -m pytest -p no:cacheprovider --collect-only -q "$sel" 2>/dev/null | grep -c '::')
    echo "dry run: '$sel' collects $n tests"; (( n > 0 )) || rc=1
  done
  n=$($PY -m pytest -p no:cacheprovider --collect-only -q --ignore=tests/test_gpu.py --ignore=tests/test_parity.py tests \
      2>/dev/null | grep -c '::')
  echo "dry run: the rest of the suite collects $n tests"; (( n > 0 )) || rc=1
  exit $rc
fi

# ---------------------------------------------------------------------------------------------- 0. environment
stamp "0. environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,compute_cap --format=csv 2>&1
  echo; $PY -VV; command -v nvcc && nvcc --version | tail -n 2; command -v g++ && g++ --version | head -n 1
  $PY -m pip list 2>/dev/null | grep -iE '^(cupy|numpy|scipy|cython|setuptools|wheel|pytest|hypothesis|nvidia|cuda|fastrlock|threadpoolctl|scikit-learn|tqdm|matplotlib|torch)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 60 $PY -c 'import cupy; cupy.show_config()' > "$OUT/cupy_config.txt" 2>&1   # NVRTC/headers/paths, not printed
# The suite runs with filterwarnings=error: a warning raised while CuPy imports (during collection) becomes an
# exception that backend._try_cupy swallows, and every GPU test then SKIPS as "no CUDA device". Check it here.
timeout 90 $PY -W error -c 'import cupy, cupyx.scipy.special; print("cupy", cupy.__version__, "| devices", cupy.cuda.runtime.getDeviceCount(), "| nvrtc", cupy.cuda.nvrtc.getVersion())' \
  > "$OUT/cupy_import_Werror.txt" 2>&1
echo "import cupy + cupyx.scipy.special under -W error: rc=$?"; tail -n 3 "$OUT/cupy_import_Werror.txt"

# ---------------------------------------------------------------------------------------------- 1. build
stamp "1. build: pip install --no-build-isolation --no-deps -e . (after removing builds from other machines)"
rm -rf build npapprox/_quant.*.so npapprox/_bn.*.so npapprox/_im2col.*.so src/*.c
timeout "$(cap 200 420)" $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "pip rc=$?"; tail -n 3 "$OUT/build.log"
NOEXT=0
if ! $PY -c 'import npapprox._quant, npapprox._bn, npapprox._im2col' >> "$OUT/build.log" 2>&1; then
  echo "!! compiled extensions missing: retrying with setup.py build_ext --inplace" | tee -a "$OUT/build.log"
  timeout "$(cap 120 420)" $PY setup.py build_ext --inplace -j 8 >> "$OUT/build.log" 2>&1
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c 'import npapprox._quant, npapprox._bn, npapprox._im2col' >> "$OUT/build.log" 2>&1 || NOEXT=1
  (( NOEXT )) && echo "!! no Cython extensions: the CPU side uses the reference kernels; bench kernel rows skipped"
fi
$PY -c 'import npapprox, npapprox.kernels as K, npapprox.backend as B; print("npapprox from", npapprox.__file__, "| cython kernels", K.compiled_available(), "|", B.gpu_status())' 2>&1 | tee -a "$OUT/build.log"

# ---------------------------------------------------------------------------------------------- 2. probes
stamp "2. probes: versions, RawModule compile, NaN patterns, host-side paper parameters, deferred checks, subnormals, pool hook, > 2^32 elements"
OUT=$OUT timeout -s INT -k 10 "$(cap 90 340)" $PY "$OUT/gpu_probe.py" basic big > "$OUT/probes.log" 2>&1
echo "probes rc=$?"; grep -E '^(PROBE|gpu_available|big probes)' "$OUT/probes.log" | cut -c1-700

# ---------------------------------------------------------------------------------------------- 3. tests
# Two GPU processes (the parity suite, its device implementation included | test_gpu.py: models, training,
# memory, CLI), the rest of the suite on the CPU in a third; SIGINT at the time limit still writes the junit
# XML and the summary.
stamp "3. pytest: tests/test_parity.py and tests/test_gpu.py (2 processes on the GPU) and the rest (CPU), in parallel"
COMMON=(-p no:cacheprovider -q -rfEs --durations=15 --tb=short)
run_pytest() {   # run_pytest NAME TIMEOUT ARGS...
  local name=$1 t=$2; shift 2
  timeout -s INT -k 15 "$t" $PY -m pytest "${COMMON[@]}" --junitxml="$OUT/junit_$name.xml" "$@" \
    > "$OUT/pytest_$name.log" 2>&1
  echo "pytest($name) rc=$?" >> "$OUT/pytest_$name.log"
}
TT=$(cap 320 90)
OMP_NUM_THREADS=6 OPENBLAS_NUM_THREADS=6 run_pytest rest "$TT" --ignore=tests/test_gpu.py --ignore=tests/test_parity.py tests &
P_REST=$!
OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 run_pytest gpu_models "$TT" tests/test_gpu.py &
P_MODELS=$!
OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 run_pytest gpu_kernels "$TT" tests/test_parity.py
wait "$P_MODELS" "$P_REST"
for name in gpu_kernels gpu_models rest; do
  echo "--- $name"; grep -E '^(FAILED|ERROR)|^SKIPPED|passed|failed|error|rc=' "$OUT/pytest_$name.log" | cut -c1-220 | tail -n 25
done
sed -n '/slowest 15 durations/,/^$/p' "$OUT/pytest_gpu_models.log" | head -n 17

# ---------------------------------------------------------------------------------------------- 4. benchmarks
stamp "4a. bench_gpu.py, reduced sizes"
BK=(); (( NOEXT )) && BK=(--skip-kernels)
timeout -s INT -k 10 "$(cap 100 10)" $PY benchmarks/bench_gpu.py --shape 32,64,64,64 --repeats 5 --batch 64 \
  --steps 5 --warmup 2 --policies exact,paper4,generic4 --skip-batch ${BK[@]+"${BK[@]}"} > "$OUT/bench_small.log" 2>&1
echo "bench(small) rc=$?" >> "$OUT/bench_small.log"; cut -c1-200 "$OUT/bench_small.log" | tail -n 30
if (( $(left) > 60 )); then
  stamp "4b. probes: CPU-vs-GPU ResNet gradients (all rel. errors); ResNet-20 step, one conv chunk vs 2 MiB chunks"
  OUT=$OUT timeout -s INT -k 5 "$(cap 70 5)" $PY "$OUT/gpu_probe.py" resnet perf > "$OUT/probes_2.log" 2>&1
  grep '^PROBE' "$OUT/probes_2.log" | cut -c1-700
fi
if (( $(left) > 45 )); then
  stamp "4c. bench_gpu.py largest batch in a 160 MiB budget"
  timeout -s INT -k 5 "$(cap 40 5)" $PY benchmarks/bench_gpu.py --skip-kernels --skip-train --budget-mib 160 \
    --policies exact,paper4 > "$OUT/bench_batch.log" 2>&1; echo "rc=$?"; tail -n 5 "$OUT/bench_batch.log"
fi
if (( $(left) > 40 && ! NOEXT )); then
  stamp "4d. bench_gpu.py kernels at the default 256 MiB tensor"
  timeout -s INT -k 5 "$(cap 40 2)" $PY benchmarks/bench_gpu.py --skip-train --skip-batch --repeats 10 \
    > "$OUT/bench_kernels_256MiB.log" 2>&1; echo "rc=$?"; tail -n 16 "$OUT/bench_kernels_256MiB.log"
fi

# ---------------------------------------------------------------------------------------------- 5. summary
stamp "5. summary"
$PY - "$OUT" <<'EOF'
import collections, json, pathlib, sys, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
for name in ("junit_gpu_kernels.xml", "junit_gpu_models.xml", "junit_rest.xml"):
    p = out / name
    if not p.exists():
        print(f"{name}: missing (the run did not finish?)"); continue
    root = ET.parse(p).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    print(name, {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")})
    bad = collections.defaultdict(list)
    for tc in root.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None and (kind != "skipped" or name.startswith("junit_gpu")):
                key = f"{kind.upper():8} {tc.get('classname')}::{tc.get('name', '').split('[')[0]}"
                bad[key].append((el.get("message") or "").splitlines()[0][:200] if el.get("message") else "")
    for key, msgs in bad.items():
        print(f"  {key}  x{len(msgs)}  {msgs[0]}")
for p in sorted(out.glob("probes_*.json")):
    for k, v in json.loads(p.read_text()).items():
        print(f"probe {k}: {'OK' if v.get('ok') else 'FAIL'} {str(v.get('info', v.get('error')))[:400]}")
EOF
cat "$OUT/timeline.txt"
