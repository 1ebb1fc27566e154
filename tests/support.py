"""Helpers shared by the test modules (no test module imports another).

* byte comparison (:func:`same`) and the Hypothesis settings of the kernel tests;
* inputs of the storage kernels: the paper's per-channel parameters as the policy
  computes them, BN outputs and generic vectors full of edge cases;
* the host build of ``quant.cu`` (g++ with cuda_shim.h) and :class:`HostLauncher`,
  ``gpu.py``'s launcher interface running that build on NumPy arrays;
* the implementations of the storage kernels behind one interface (:class:`Impl`) and
  the parity checks against the reference (:func:`check_paper`, :func:`check_generic`);
* the method's plain-NumPy oracles (BN, the paper's codes, conv and BN->ReLU backward)
  and one BN->ReLU unit through the engine (:func:`unit_problem`, :func:`engine_unit`).
"""
from __future__ import annotations

import ctypes
import importlib
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from npapprox import Tensor, nn, ops
from npapprox.kernels import gpu
from npapprox.kernels import reference as R
from npapprox.kernels.bn import bn_stats
from npapprox.policy import storage_policy

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "npapprox" / "kernels"
BITS = (1, 2, 4, 8)
F32, F64 = np.float32, np.float64


def SETTINGS(n):
    # derandomize comes from the profile in conftest.py ("npapprox": derandomized)
    return settings(deadline=None, max_examples=n,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def as_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8)


def same(a, b):
    """Same dtype, same shape, same bytes (NaN payloads and signed zeros included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(as_bytes(a), as_bytes(b))


# --------------------------------------------------------------------------- #
# Inputs: the paper's per-channel parameters, edge-case values
# --------------------------------------------------------------------------- #
def paper_params(gamma, beta, bits):
    """k, s from gamma, beta as the storage policy computes them (float64, then cast)."""
    g = np.asarray(gamma, np.float64)
    be = np.asarray(beta, np.float64)
    nb = 2 ** bits
    D = 6.0 / nb
    with np.errstate(all="ignore"):
        b = np.where(be == 0, 0.0, be / np.abs(g))
        s = np.clip(nb / 2 - np.floor(b / D), 1, nb - 1).astype(np.int32)
        k = np.where(g == 0, 0.0, 1.0 / (D * np.abs(g))).astype(np.float32)
    return k, s


def paper_step(gamma, bits):
    """Decode step that maps a bin centre back to y units: D * |gamma| (float32)."""
    return (6.0 / 2 ** bits * np.abs(np.asarray(gamma, np.float64))).astype(np.float32)


GAMMAS = [1.0, 0.3, 2.5, -1.0, -0.2, 0.0, 1e-30, -1e-30, 1e-38, 1e3]
BETA_OVER_GAMMA = [0.0, 0.5, -0.5, 2.9, -2.9, 3.5, -3.5, 1e3, -1e3]
SPECIALS = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-7, 5e-7, 1e-6, -1e-6, 1.0, -1.0,
                     3e38, -3e38, 1e30, -1e30, 2.0 ** -20], np.float32)
NONFINITE = np.array([np.nan, np.inf, -np.inf, -np.nan], np.float32)


def channel_params(rng, C):
    """Per-channel gamma, beta covering gamma <= 0, == 0, tiny, and beta/gamma far outside +-3."""
    gamma = rng.choice(np.array(GAMMAS), C)
    beta = rng.choice(np.array(BETA_OVER_GAMMA), C) * np.abs(gamma)
    beta = np.where(gamma == 0, rng.choice([0.0, 1.0, -1.0], C), beta)
    return gamma.astype(np.float32), beta.astype(np.float32)


def bn_output(rng, shape, gamma, beta, special=0.2, nonfinite=0.0):
    """y = gamma * xhat + beta per channel, with a fraction of the entries replaced by specials."""
    C = shape[1]
    xhat = rng.standard_normal(shape) * 2.0
    g = np.asarray(gamma, np.float64).reshape((1, C) + (1,) * (len(shape) - 2))
    b = np.asarray(beta, np.float64).reshape(g.shape)
    with np.errstate(all="ignore"):
        y = (g * xhat + b).astype(np.float32)
    pick = rng.random(shape) < special
    y[pick] = rng.choice(SPECIALS, int(pick.sum()))
    if nonfinite:
        bad = rng.random(shape) < nonfinite
        y[bad] = rng.choice(NONFINITE, int(bad.sum()))
    return y


def generic_input(rng, n, kind):
    """float32 vectors of several kinds (normal, wide range, constant runs, specials, non-finite)."""
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "wide":
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
    elif kind == "constant":
        x = np.repeat(rng.standard_normal(max(1, n // 50 + 1)), 50)[:n]
    elif kind == "zeros":
        x = rng.choice(np.array([0.0, -0.0]), n)
    elif kind == "specials":
        x = rng.choice(SPECIALS.astype(np.float64), n)
    else:  # "nonfinite"
        x = rng.standard_normal(n)
        bad = rng.random(n) < 0.05
        x[bad] = rng.choice(NONFINITE.astype(np.float64), int(bad.sum()))
    with np.errstate(all="ignore"):
        return x.astype(np.float32)


@st.composite
def paper_cases(draw, max_side=4, nonfinite=True):
    bits = draw(st.sampled_from(BITS))
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 4)),
             draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    gamma, beta = channel_params(rng, shape[1])
    y = bn_output(rng, shape, gamma, beta, nonfinite=0.05 if nonfinite and draw(st.booleans()) else 0.0)
    k, s = paper_params(gamma, beta, bits)
    return bits, y, gamma, beta, k, s


# --------------------------------------------------------------------------- #
# The host build of quant.cu
# --------------------------------------------------------------------------- #
GUARD = 64  # bytes of canary on each side of every array a kernel sees
CANARY = 0xA5
SCALARS = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32}


def build_host_lib(folder):
    """quant.cu compiled by g++ with cuda_shim.h into ``folder``, loaded with ctypes
    (the session fixture ``host_lib`` of conftest.py calls this once)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ is required to build the CUDA kernels on the host (it is always present)")
    out = Path(folder) / "libnpx_quant.so"
    cmd = [gxx, "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-x", "c++", "-std=c++17", "-Wall",
           "-I", str(KERNEL_DIR), str(KERNEL_DIR / "quant.cu"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert "warning" not in r.stderr.lower(), r.stderr
    lib = ctypes.CDLL(str(out))
    assert lib.npx_host_abi_version() == 1
    declare_host_functions(lib)
    return lib


def declare_host_functions(lib):
    """ctypes signatures of the host launchers ``npx_host_<kernel>(grid, block, *args)``."""
    for name, sig in gpu.KERNELS.items():
        fn = getattr(lib, "npx_host_" + name[len("npx_"):])
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if ":" in code else SCALARS[code] for code in sig]


class HostLauncher:
    """gpu.py's launcher interface, running the host build of quant.cu on NumPy arrays.

    Every array argument is copied into a buffer with CANARY guard zones on both
    sides; outputs start filled with CANARY too. After the kernel: the guards are
    intact (nothing written outside an array), inputs are unchanged, and outputs
    are copied back (so a byte the kernel forgot to write shows up as a difference
    from the reference). ``extra_blocks`` launches more threads than the work needs
    (the bounds checks must make them do nothing)."""

    xp = np

    def __init__(self, lib, block=256, extra_blocks=1):
        self.lib, self.block, self.extra_blocks = lib, block, extra_blocks
        self.launches = []

    @staticmethod
    def asarray(a):
        return np.asarray(a)

    def launch(self, name, threads, *args):
        gpu.check_args(name, args, lambda a: isinstance(a, np.ndarray))
        grid = -(-int(threads) // self.block) + self.extra_blocks
        self.launches.append(name)
        cargs, arrays = [], []
        for code, a in zip(gpu.KERNELS[name], args, strict=True):
            if ":" not in code:
                cargs.append(SCALARS[code](int(a)))
                continue
            raw = a.reshape(-1).view(np.uint8)
            buf = np.full(raw.size + 2 * GUARD, CANARY, np.uint8)
            if code.startswith("in:"):
                buf[GUARD:GUARD + raw.size] = raw
            cargs.append(ctypes.c_void_p(buf.ctypes.data + GUARD))
            arrays.append((code, raw, buf))
        getattr(self.lib, "npx_host_" + name[len("npx_"):])(grid, self.block, *cargs)
        for k, (code, raw, buf) in enumerate(arrays):
            inner = buf[GUARD:GUARD + raw.size]
            assert (buf[:GUARD] == CANARY).all() and (buf[GUARD + raw.size:] == CANARY).all(), \
                f"{name} wrote outside its array argument {k} ({code})"
            if code.startswith("in:"):
                assert np.array_equal(inner, raw), f"{name} wrote into its input {k}"
            else:
                raw[...] = inner


# --------------------------------------------------------------------------- #
# Implementations of the storage kernels, and the parity checks against the reference
# --------------------------------------------------------------------------- #
class Impl:
    """One implementation of the storage kernels behind the reference's names and
    signatures: ``impl("paper_pack", y, k, s, bits)``. NumPy arrays go in (``put``
    moves them where the implementation wants them) and come back (``get``)."""

    def __init__(self, name, call, put=None, get=None):
        self.name, self._call = name, call
        self.put = put or (lambda a: a)
        self.get = get or (lambda a: a)

    def __call__(self, kernel, *args):
        return self.direct(kernel, *(self.put(a) if isinstance(a, np.ndarray) else a for a in args))

    def direct(self, kernel, *args):
        """Like calling the implementation, without moving the arguments first."""
        out = self._call(kernel, *args)
        return tuple(self.get(o) for o in out) if isinstance(out, tuple) else self.get(out)


def cpu_impl():
    """The Cython kernels. An ImportError here fails the test: the package is always built."""
    importlib.import_module("npapprox._quant")
    cpu = importlib.import_module("npapprox.kernels.cpu")
    return Impl("cpu", lambda kernel, *a: getattr(cpu, kernel)(*a))


def host_impl(lib, launcher=HostLauncher, **launcher_kw):
    """quant.cu's host build behind gpu.py's own wrappers (``<kernel>_with``), a fresh launcher per call."""
    return Impl("host", lambda kernel, *a: getattr(gpu, kernel + "_with")(launcher(lib, **launcher_kw), *a))


def check_paper(impl, y, k, s, bits, step, off):
    """paper_pack, paper_decode (both relu) and paper_mask of ``impl`` give the reference's bytes."""
    ref_packed, ref_nf = R.paper_pack(y, k, s, bits)
    packed, nf = impl("paper_pack", y, k, s, bits)
    assert same(packed, ref_packed), f"{impl.name}: packed bytes differ"
    assert nf == ref_nf, f"{impl.name}: non-finite count {nf} != {ref_nf}"
    for relu in (False, True):
        assert same(impl("paper_decode", ref_packed, y.shape, s, step, off, bits, relu),
                    R.paper_decode(ref_packed, y.shape, s, step, off, bits, relu)), f"{impl.name}: decode relu={relu}"
    mask = impl("paper_mask", ref_packed, y.shape, s, bits)
    assert same(mask, R.paper_mask(ref_packed, y.shape, s, bits)), f"{impl.name}: mask differs"
    return packed, mask


def check_paper_gb(impl, y, gamma, beta, bits):
    """:func:`check_paper` with the policy's parameters for ``gamma``, ``beta``."""
    k, s = paper_params(gamma, beta, bits)
    return check_paper(impl, y, k, s, bits, paper_step(gamma, bits), np.asarray(beta, np.float32))


def check_generic(impl, x, bits, group, stochastic, seed):
    """generic_pack (packed, lo, scale, count) and generic_decode of ``impl`` give the reference's bytes."""
    ref = R.generic_pack(x, bits, group, stochastic, seed)
    got = impl("generic_pack", x, bits, group, stochastic, seed)
    assert same(got[0], ref[0]), f"{impl.name}: packed bytes differ"
    assert same(got[1], ref[1]), f"{impl.name}: lo differs"
    assert same(got[2], ref[2]), f"{impl.name}: scale differs"
    assert got[3] == ref[3], f"{impl.name}: non-finite count differs"
    assert same(impl("generic_decode", *ref[:3], bits, group, x.shape),
                R.generic_decode(*ref[:3], bits, group, x.shape)), f"{impl.name}: decode differs"
    return ref


def same_but_nan_payloads(a, b):
    """``same`` except that NaNs may carry any payload: element-wise BN outputs keep the
    hardware's NaN (x86: the operand's payload, as NumPy; a GPU: 0x7fffffff)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(as_bytes(a[~nan]), as_bytes(b[~nan])))


def _same_bn(impl, a, b):
    """Bytes equal; on a real device up to NaN payloads (``same_but_nan_payloads``)."""
    return same(a, b) if impl.name != "device" else same_but_nan_payloads(a, b)


def check_bn_apply_pack(impl, x, mu, scale, beta, k, s, bits):
    """The fused forward of a BN -> ReLU unit against its definition: y = (x - mu) * scale +
    beta (NumPy float32, bn_apply's formula), h = y * (y > 0), paper_pack(y) of the reference
    (bytes and non-finite count). Returns y."""
    shape = x.shape
    x3 = x.reshape(shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)))
    with np.errstate(all="ignore"):
        y = ((x3 - mu[:, None]) * scale[:, None] + beta[:, None]).reshape(shape)
        h = y * (y > 0)
    ref_packed, ref_nf = R.paper_pack(y, k, s, bits)
    got_h, packed, nf = impl("bn_apply_pack", x, mu, scale, beta, k, s, bits)
    assert same(packed, ref_packed), f"{impl.name}: packed bytes differ"
    assert nf == ref_nf == int(np.sum(~np.isfinite(y))), f"{impl.name}: non-finite count {nf} != {ref_nf}"
    assert _same_bn(impl, got_h, h), f"{impl.name}: h differs"
    return y


def _fsum_bound(terms):
    """The exact sum of each channel's float64 ``terms (N, C, M)`` and the bound of a float64
    sum of them in any order, ``(n - 1) * 2^-53 * sum |terms|`` (inf / NaN where one is)."""
    flat = terms.transpose(1, 0, 2).reshape(terms.shape[1], -1)
    exact = np.array([math.fsum(row) if np.isfinite(row).all() else row.sum() for row in flat])
    with np.errstate(all="ignore"):
        bound = max(flat.shape[1] - 1, 0) * 2.0 ** -53 * np.abs(flat).sum(axis=1)
    return exact, bound


def check_bn_backward_codes(impl, gy, packed, s, x_step, x_off, bits, scale, batch_stats):
    """The fused backward of a unit from its codes against its definition, with xhat and
    the mask decoded by the reference (``paper_decode``, ``paper_mask``) and g = gy * mask:

    * gbeta, ggamma (float64): within the float64 rounding bound of the exact sums of
      the terms g and g * xhat (float32 products, the reference's terms; ``math.fsum``);
      NaN / inf exactly where the float64 sum of the terms has them;
    * gx: bit for bit the reference's formula at the kernel's own constants
      a = float32(gbeta / count), k = float32(ggamma / count) (running statistics:
      scale * g), and None when not asked for, with the same sums."""
    shape = gy.shape
    N, C, M = shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))
    gx, ggamma, gbeta = impl("bn_backward_codes", gy, packed, s, x_step, x_off, bits, scale, batch_stats, True)
    xhat = R.paper_decode(packed, shape, s, x_step, x_off, bits).reshape(N, C, M)
    mask = R.paper_mask(packed, shape, s, bits).reshape(N, C, M)
    gy3 = gy.reshape(N, C, M)
    with np.errstate(all="ignore"):
        g = gy3 * mask
        terms = g * xhat
    for got, what, tm in ((gbeta, "gbeta", g), (ggamma, "ggamma", terms)):
        assert got.dtype == np.float64 and got.shape == (C,), f"{impl.name}: {what} {got.dtype} {got.shape}"
        exact, bound = _fsum_bound(tm.astype(np.float64))
        fin = np.isfinite(exact)
        assert same(np.isnan(got), np.isnan(exact)) and same(got[np.isinf(exact)], exact[np.isinf(exact)]), what
        assert (np.abs(got[fin] - exact[fin]) <= bound[fin]).all(), f"{impl.name}: {what} {got} vs {exact}"
    count = gy3.shape[0] * gy3.shape[2]
    with np.errstate(all="ignore"):
        if batch_stats:
            a = (gbeta / count).astype(np.float32)[:, None]
            k = (ggamma / count).astype(np.float32)[:, None]
            want = scale[:, None] * (g - a - xhat * k)
        else:
            want = scale[:, None] * g
    assert want.dtype == np.float32
    assert _same_bn(impl, gx, want.reshape(shape)), f"{impl.name}: gx differs (batch_stats={batch_stats})"
    none, ggamma2, gbeta2 = impl("bn_backward_codes", gy, packed, s, x_step, x_off, bits, scale, batch_stats, False)
    assert none is None and same(ggamma2, ggamma) and same(gbeta2, gbeta)
    return gx, ggamma, gbeta


# --------------------------------------------------------------------------- #
# The method's oracles, in plain NumPy, from the written contracts (docs/method.md)
# --------------------------------------------------------------------------- #
def unpack_codes(packed, n, bits):
    """Value i lives in byte i // V at bits [(i % V) K, (i % V) K + K), V = 8 // K."""
    v = 8 // bits
    i = np.arange(n)
    return (packed[i // v].astype(np.int64) >> ((i % v) * bits)) & ((1 << bits) - 1)


def c4(a):
    """A per-channel vector (C,) as (1, C, 1, 1), to broadcast over (N, C, H, W)."""
    return a[None, :, None, None]


def bn_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mu) / sigma + beta, in float32 (batch statistics, biased variance);
    returns y (N, C, H, W) and 1/sigma (C,). The statistics are the engine's own
    (``kernels.bn.bn_stats``, checked against a float64 oracle in test_bn.py): the
    reductions' last bits depend on the summation order; everything after them is
    rebuilt here independently, bit for bit."""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    mu, var = bn_stats(x3)
    inv_sigma = (F32(1) / np.sqrt(var + F32(eps))).astype(F32)
    y = (x3 - mu[:, None]) * (gamma * inv_sigma)[:, None] + beta[:, None]
    return y.reshape(x.shape).astype(F32), inv_sigma


def paper_oracle(y, gamma, beta, bits):
    """The paper scheme per quant.py / reference.paper_pack for gamma != 0:
    q = y / |gamma|, D = 6 / 2^K, s = clip(NB/2 - floor((beta/|gamma|) / D), 1, NB-1),
    code = clip(s - 1 + ceil(q / D), 0, NB-1) forced to the side of y > 0 (with q / D
    evaluated as the contract does: float32(y * float32(1 / (D |gamma|)))),
    q_hat = (code - s + 1/2) D; h_hat = |gamma| q_hat [code >= s];
    xhat_hat = sign(gamma) q_hat - beta / gamma."""
    assert np.all(gamma != 0)
    nb, d = 1 << bits, 6.0 / (1 << bits)
    g, b = gamma.astype(F64), beta.astype(F64)
    s = np.clip(nb / 2 - np.floor((b / np.abs(g)) / d), 1, nb - 1).astype(np.int64)
    k = (1.0 / (d * np.abs(g))).astype(F32)
    u = np.clip(y * c4(k), -(nb + 1), nb + 1)          # float32 product, as in the contract
    code = np.clip(c4(s) - 1 + np.ceil(u).astype(np.int64), 0, nb - 1)
    code = np.where(y > 0, np.maximum(code, c4(s)), np.minimum(code, c4(s) - 1))
    q_hat = (code - c4(s) + 0.5) * d
    h_hat = c4(np.abs(g)) * q_hat * (code >= c4(s))
    xhat_hat = c4(np.sign(g)) * q_hat - c4(b / g)
    return code, s, h_hat, xhat_hat


def conv3x3_oracle(h, w, r):
    """out = conv(h, w) (3x3, pad 1, stride 1) and, for L = sum(out * r):
    dL/dw using h, and dL/dh (which uses w only)."""
    n, c, hh, ww = h.shape
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], hh, ww))
    gw = np.zeros(w.shape)
    ghp = np.zeros(hp.shape)
    for p in range(3):
        for q in range(3):
            win = hp[:, :, p:p + hh, q:q + ww]
            out += np.einsum("ncij,fc->nfij", win, w[:, :, p, q])
            gw[:, :, p, q] = np.einsum("nfij,ncij->fc", r, win)
            ghp[:, :, p:p + hh, q:q + ww] += np.einsum("nfij,fc->ncij", r, w[:, :, p, q])
    return out, gw, ghp[:, :, 1:-1, 1:-1]


def proj_oracle(h, w, r):
    """1x1 conv with stride 2: out[n,f,i,j] = sum_c w[f,c] h[n,c,2i,2j]; dL/dw, dL/dh."""
    hs = h[:, :, ::2, ::2]
    out = np.einsum("ncij,fc->nfij", hs, w[:, :, 0, 0])
    gw = np.einsum("nfij,ncij->fc", r, hs)[:, :, None, None]
    gh = np.zeros(h.shape)
    gh[:, :, ::2, ::2] = np.einsum("nfij,fc->ncij", r, w[:, :, 0, 0])
    return out, gw, gh


def bn_relu_backward_oracle(gh, mask, xhat, gamma, inv_sigma):
    """ReLU then BN backward: g = gh [y > 0]; gbeta = sum g; ggamma = sum g xhat;
    gx = gamma / sigma (g - mean g - xhat mean(g xhat))."""
    m = gh.shape[0] * gh.shape[2] * gh.shape[3]
    g = gh * mask
    gbeta = g.sum(axis=(0, 2, 3))
    ggamma = (g * xhat).sum(axis=(0, 2, 3))
    gx = c4(gamma * inv_sigma) * (g - c4(gbeta / m) - xhat * c4(ggamma / m))
    return gx, ggamma, gbeta


def assert_close(actual, expected, rtol=1e-5, what=""):
    """Elementwise, with an absolute floor of rtol * max|expected| (float32 engine vs float64 oracle)."""
    expected = np.asarray(expected, F64)
    np.testing.assert_allclose(np.asarray(actual, F64), expected, rtol=rtol,
                               atol=rtol * float(np.abs(expected).max()), err_msg=what)


def max_rel(a, b):
    """max|a - b| / max|b|."""
    return float(np.abs(np.asarray(a, F64) - b).max() / np.abs(b).max())


def resnet(seed=0, **kw):
    nn.manual_seed(seed)
    args = dict(depth=8, num_classes=5, in_channels=3, width=4)
    args.update(kw)
    return nn.PreActResNet(**args)


def resnet_forward_backward(model, x, labels, policy):
    model.zero_grad()
    with storage_policy(policy):
        logits = model(Tensor(x))
        loss = ops.cross_entropy(logits, labels)
    loss.backward()
    return logits.data, loss.data, {n: p.grad.copy() for n, p in model.named_parameters()}


def unit_problem(seed=7):
    """x, gamma, beta of one BN->ReLU unit read by a 3x3 conv (w1) and a strided 1x1 projection (w2),
    and the weights r1, r2 of the loss (see :func:`engine_unit`)."""
    rng = np.random.default_rng(seed)
    n, c, hw = 4, 6, 8
    # channels with different means and scales, so the stats are not trivial
    x = (rng.standard_normal((n, c, hw, hw)) * rng.uniform(0.5, 2.0, c)[None, :, None, None]
         + rng.uniform(-1, 1, c)[None, :, None, None]).astype(F32)
    gamma = np.array([1.3, -0.7, 0.5, -1.9, 2.0, 0.9], F32)          # two negative gammas
    beta = np.array([0.2, -0.3, 0.0, 0.5, -1.0, 0.1], F32)
    w1 = (rng.standard_normal((5, c, 3, 3)) * 0.3).astype(F32)        # 3x3 conv, pad 1
    w2 = (rng.standard_normal((7, c, 1, 1)) * 0.3).astype(F32)        # 1x1 projection, stride 2
    r1 = rng.standard_normal((n, 5, hw, hw)).astype(F32)
    r2 = rng.standard_normal((n, 7, hw // 2, hw // 2)).astype(F32)
    return x, gamma, beta, w1, w2, r1, r2


def engine_unit(problem, policy):
    """h = relu(bn(x)); loss = sum(conv3x3(h) * r1) + sum(proj1x1(h) * r2). Returns the
    forward values, what the unit stored (copied before backward frees it) and the grads."""
    x, gamma, beta, w1, w2, r1, r2 = problem
    X, G, B = Tensor(x, True), Tensor(gamma, True), Tensor(beta, True)
    W1, W2 = Tensor(w1, True), Tensor(w2, True)
    with storage_policy(policy):
        h = ops.batch_norm2d(X, G, B, relu=True)
        o1 = ops.conv2d(h, W1, padding=1)
        o2 = ops.conv2d(h, W2, stride=2)
        loss = ops.add(ops.sum_all(ops.mul(o1, Tensor(r1))), ops.sum_all(ops.mul(o2, Tensor(r2))))
    saved = {"unit": h._ctx.saved["unit"], "conv1_x": o1._ctx.saved["x"], "proj_x": o2._ctx.saved["x"]}
    info = {"form": saved["unit"].form, "conv_forms": (saved["conv1_x"].form, saved["proj_x"].form),
            "conv_payload": saved["conv1_x"].payload_nbytes + saved["proj_x"].payload_nbytes,
            "packed": getattr(saved["unit"], "packed", None), "s": getattr(saved["unit"], "s", None),
            "h_restored": saved["conv1_x"].restore().copy(), "mask": saved["unit"].mask().copy()}
    if info["packed"] is not None:
        info["packed"] = info["packed"].copy()
    loss.backward()
    return {"h": h.data, "o1": o1.data, "o2": o2.data, "gx": X.grad, "ggamma": G.grad, "gbeta": B.grad,
            "gw1": W1.grad, "gw2": W2.grad}, info
