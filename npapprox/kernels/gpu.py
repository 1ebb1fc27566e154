"""Storage kernels on the GPU: the CUDA kernels of ``quant.cu`` through CuPy.

Same names, signatures and return values as :mod:`npapprox.kernels.reference`
(the same argument checks, :mod:`npapprox.kernels.checks`), identical output
bytes, CuPy arrays out. The source ``quant.cu`` ships as package data; it is
compiled at run time by CuPy's ``RawModule`` (NVRTC) with ``--fmad=false``, once
per device (CuPy also caches the binary on disk).

The wrappers below only validate, allocate and launch: every function is written
against a small *launcher* (:class:`DeviceLauncher` here; the tests plug in a
launcher that runs the same kernels compiled for the host, see
tests/support.py and tests/test_parity.py), so everything but the CuPy calls themselves is exercised on
machines without a GPU.

Two fused BN -> ReLU passes sit here too (:func:`bn_apply_pack`,
:func:`bn_backward_codes`): their contract is :mod:`npapprox.kernels.bn`'s
(element-wise outputs bit-identical given the same per-channel constants, sums
in float64); :mod:`npapprox.kernels.bn` sends a unit's codes on CuPy arrays to
the backward.

Launch rules: 1-D grids of ``BLOCK`` threads, one thread per output byte for
packing (no atomics) and one per element for decoding; reductions write
per-thread partials that a second kernel combines in a fixed order; every argument is a
C-contiguous array of the kernel's element type or a NumPy scalar of exactly the
kernel's parameter type (``KERNELS`` lists the signatures; a test checks them
against the ``.cu`` source).
"""
from __future__ import annotations

import contextlib
import threading
from importlib import resources

import numpy as np

from npapprox import backend
from npapprox.kernels import checks

__all__ = ["paper_pack", "paper_decode", "paper_mask", "generic_pack", "generic_decode", "pack_bits",
           "unpack_bits", "counter_uniform", "bn_apply_pack", "bn_backward_codes", "KERNELS", "OPTIONS",
           "source", "DeviceLauncher"]

#: NVRTC options. --fmad=false: no contraction of a multiply and an add. CuPy adds
#: -ftz=true to every RawModule after these (it cannot be turned off from here);
#: quant.cu is written so that it does not matter (inline PTX without .ftz).
OPTIONS = ("--fmad=false", "-std=c++17")

BLOCK = 256          # threads per block
SUB = 32             # generic min/max: elements per partial task (interleaved within a group)
MAX_SUB_TASKS = 1 << 16   # at most this many partial tasks per group (per channel for the BN sums)
BN_SUB = 64          # BN backward sums: values per partial task (interleaved within a channel)

# Parameters of every kernel, in order (tests/test_cuda.py checks them against quant.cu):
# "in:T" / "out:T" a pointer to a C-contiguous array of element type T that the kernel
# reads (const) / writes; "T" alone a scalar passed as that exact NumPy type.
# T: f32 float, f64 double, i32 int, i64 long long, u32 unsigned int, u8 unsigned char.
KERNELS = {
    "npx_paper_pack": ("in:f32", "in:f32", "in:i32", "i64", "i64", "i64", "i32", "out:u8", "out:u8"),
    "npx_paper_decode": ("in:u8", "in:i32", "in:f32", "in:f32", "i64", "i64", "i64", "i32", "i32",
                         "out:f32"),
    "npx_paper_mask": ("in:u8", "in:i32", "i64", "i64", "i64", "i32", "out:u8"),
    "npx_bn_apply_pack": ("in:f32", "in:f32", "in:f32", "in:f32", "in:f32", "in:i32", "i64", "i64", "i64", "i32",
                          "out:f32", "out:u8", "out:u8"),
    "npx_bn_codes_sums": ("in:f32", "in:u8", "in:i32", "in:f32", "in:f32", "i64", "i64", "i64", "i32", "i64",
                          "out:f64", "out:f64"),
    "npx_bn_codes_finish": ("in:f64", "in:f64", "i64", "i64", "i64", "i32", "out:f64", "out:f64", "out:f32",
                            "out:f32"),
    "npx_bn_codes_grad": ("in:f32", "in:u8", "in:i32", "in:f32", "in:f32", "in:f32", "in:f32", "in:f32", "i64",
                          "i64", "i64", "i32", "i32", "out:f32"),
    "npx_generic_minmax": ("in:f32", "i64", "i64", "i64", "i64", "out:i32", "out:i32", "out:i32"),
    "npx_generic_params": ("in:i32", "in:i32", "in:i32", "i64", "i64", "i32", "out:f32", "out:f32",
                           "out:f32", "out:i64"),
    "npx_generic_encode": ("in:f32", "in:f32", "in:f32", "i64", "i64", "i32", "i32", "u32", "out:u8"),
    "npx_generic_decode": ("in:u8", "in:f32", "in:f32", "i64", "i64", "i32", "out:f32"),
    "npx_pack_bits": ("in:u8", "i64", "i32", "out:u8"),
    "npx_unpack_bits": ("in:u8", "i64", "i32", "out:u8"),
    "npx_counter_uniform": ("i64", "u32", "out:f32"),
}

#: NumPy type of each element / scalar type code
TYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64, "u32": np.uint32, "u8": np.uint8}


def source() -> str:
    """The CUDA source ``quant.cu`` (package data)."""
    return resources.files("npapprox.kernels").joinpath("quant.cu").read_text(encoding="utf-8")


def check_args(name, args, is_array) -> None:
    """Arguments match ``KERNELS[name]``: arrays of the element type, contiguous; scalars
    of exactly the NumPy type (a Python int would be passed with the wrong width)."""
    sig = KERNELS[name]
    if len(args) != len(sig):
        raise TypeError(f"{name} takes {len(sig)} arguments, got {len(args)}")
    for k, (code, a) in enumerate(zip(sig, args, strict=True)):
        want = TYPES[code.rpartition(":")[2]]
        if ":" in code:
            if not is_array(a) or a.dtype != want or not a.flags.c_contiguous:
                raise TypeError(f"{name} argument {k}: expected a C-contiguous {np.dtype(want)} array, "
                                f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
        elif type(a) is not want:
            raise TypeError(f"{name} argument {k}: expected {want.__name__}, got {type(a).__name__}")


class DeviceLauncher:
    """Runs the kernels of ``quant.cu`` on the current CUDA device (CuPy)."""

    _modules: dict = {}          # device id -> cupy.RawModule (compiled once per device)
    _functions: dict = {}        # (device id, kernel name) -> its cupy function
    _lock = threading.Lock()

    def __init__(self):
        self.xp = backend.cupy()

    def asarray(self, a):
        return self.xp.asarray(a)

    def _function(self, name):
        dev = self.xp.cuda.Device().id
        fn = self._functions.get((dev, name))
        if fn is None:
            with self._lock:
                mod = self._modules.get(dev)
                if mod is None:
                    mod = self._modules[dev] = self.xp.RawModule(code=source(), options=OPTIONS)
                fn = self._functions[(dev, name)] = mod.get_function(name)
        return fn

    def launch(self, name, threads, *args):
        """Run kernel ``name`` with at least ``threads`` threads (none when 0)."""
        check_args(name, args, lambda a: isinstance(a, self.xp.ndarray))
        if threads <= 0:
            return
        grid = (int(threads) + BLOCK - 1) // BLOCK
        self._function(name)((grid,), (BLOCK,), args)


def _launcher():
    return DeviceLauncher()


# --------------------------------------------------------------------------- #
# The kernels, written against a launcher (``run``: DeviceLauncher or a test's)
# --------------------------------------------------------------------------- #
def _i64(v):
    return np.int64(v)


def paper_pack_with(run, y, k, s, bits):
    xp = run.xp
    y, k, s, bits, shape, C, hw = checks.check_paper_pack(run.asarray(y), run.asarray(k), s, bits)
    n = int(y.size)
    nbytes = checks.packed_nbytes(n, bits)
    out = xp.empty(nbytes, dtype=np.uint8)
    bad = xp.empty(nbytes, dtype=np.uint8)           # non-finite values per byte, summed below
    run.launch("npx_paper_pack", nbytes, y.reshape(-1), k, s, _i64(n), _i64(C), _i64(hw), np.int32(bits),
               out, bad)
    return out, bad.sum(dtype=np.int64) if nbytes else 0     # on the device: no read-back here


def paper_decode_with(run, packed, shape, s, step, off, bits, relu=False):
    xp = run.xp
    packed, shape, C, hw, s, step, off, bits = checks.check_paper_decode(
        run.asarray(packed), shape, s, run.asarray(step), run.asarray(off), bits)
    out = xp.empty(shape, dtype=np.float32)
    n = int(out.size)
    run.launch("npx_paper_decode", n, packed, s, step, off, _i64(n), _i64(C), _i64(hw), np.int32(bits),
               np.int32(1 if relu else 0), out.reshape(-1))
    return out


def paper_mask_with(run, packed, shape, s, bits):
    xp = run.xp
    packed, shape, C, hw, s, _, _, bits = checks.check_paper_decode(run.asarray(packed), shape, s, None, None, bits)
    out = xp.empty(shape, dtype=np.bool_)
    n = int(out.size)
    run.launch("npx_paper_mask", n, packed, s, _i64(n), _i64(C), _i64(hw), np.int32(bits),
               out.reshape(-1).view(np.uint8))
    return out


def bn_apply_pack_with(run, x, mu, scale, beta, k, s, bits):
    xp = run.xp
    x, k, s, bits, shape, C, hw = checks.check_paper_pack(run.asarray(x), run.asarray(k), s, bits)
    mu, scale, beta = (checks.check_channel_param(xp, a, C, np.float32, name)
                       for a, name in ((mu, "mu"), (scale, "scale"), (beta, "beta")))
    n = int(x.size)
    nbytes = checks.packed_nbytes(n, bits)
    h = xp.empty(shape, dtype=np.float32)
    out = xp.empty(nbytes, dtype=np.uint8)
    bad = xp.empty(nbytes, dtype=np.uint8)
    run.launch("npx_bn_apply_pack", nbytes, x.reshape(-1), mu, scale, beta, k, s, _i64(n), _i64(C), _i64(hw),
               np.int32(bits), h.reshape(-1), out, bad)
    return h, out, bad.sum(dtype=np.int64) if nbytes else 0


def bn_backward_codes_with(run, gy, packed, s, x_step, x_off, bits, scale, batch_stats=True, need_gx=True):
    xp = run.xp
    gy = checks.check_float32(run.asarray(gy), "gy")
    packed, shape, C, hw, s, x_step, x_off, bits = checks.check_paper_decode(
        run.asarray(packed), gy.shape, s, run.asarray(x_step), run.asarray(x_off), bits)
    scale = checks.check_channel_param(xp, scale, C, np.float32, "scale")
    N, n = shape[0], int(gy.size)
    gx = xp.empty(shape, dtype=np.float32) if need_gx else None
    gbeta, ggamma = xp.zeros(C, dtype=np.float64), xp.zeros(C, dtype=np.float64)
    if n == 0:
        return gx, ggamma, gbeta
    nsub = min(-(-(N * hw) // BN_SUB), MAX_SUB_TASKS)   # partial tasks per channel
    part_g = xp.empty(C * nsub, dtype=np.float64)
    part_gx = xp.empty(C * nsub, dtype=np.float64)
    a = xp.empty(C, dtype=np.float32)
    kk = xp.empty(C, dtype=np.float32)
    stats = np.int32(1 if batch_stats else 0)
    gyf = gy.reshape(-1)
    run.launch("npx_bn_codes_sums", C * nsub, gyf, packed, s, x_step, x_off, _i64(N), _i64(C), _i64(hw),
               np.int32(bits), _i64(nsub), part_g, part_gx)
    run.launch("npx_bn_codes_finish", C, part_g, part_gx, _i64(C), _i64(nsub), _i64(N * hw), stats,
               gbeta, ggamma, a, kk)
    if need_gx:
        run.launch("npx_bn_codes_grad", n, gyf, packed, s, x_step, x_off, scale, a, kk, _i64(n), _i64(C), _i64(hw),
                   np.int32(bits), stats, gx.reshape(-1))
    return gx, ggamma, gbeta


def generic_pack_with(run, x, bits, group, stochastic=False, seed=0):
    xp = run.xp
    x, bits, group, seed = checks.check_generic_pack(run.asarray(x), bits, group, seed)
    n = int(x.size)
    ng = checks.num_groups(n, group)
    out = xp.empty(checks.packed_nbytes(n, bits), dtype=np.uint8)
    lo = xp.empty(ng, dtype=np.float32)
    scale = xp.empty(ng, dtype=np.float32)
    if n == 0:
        return out, lo, scale, 0
    G = min(group, n)                                # group >= n: one group of n values
    nsub = min(-(-G // SUB), MAX_SUB_TASKS)          # partial tasks per group
    ntasks = ng * nsub
    kmin = xp.empty(ntasks, dtype=np.int32)
    kmax = xp.empty(ntasks, dtype=np.int32)
    bad = xp.empty(ntasks, dtype=np.int32)
    inv = xp.empty(ng, dtype=np.float32)
    gbad = xp.empty(ng, dtype=np.int64)
    xf = x.reshape(-1)
    run.launch("npx_generic_minmax", ntasks, xf, _i64(n), _i64(G), _i64(nsub), _i64(ntasks), kmin, kmax, bad)
    run.launch("npx_generic_params", ng, kmin, kmax, bad, _i64(ng), _i64(nsub), np.int32(bits),
               lo, scale, inv, gbad)
    run.launch("npx_generic_encode", out.size, xf, lo, inv, _i64(n), _i64(G), np.int32(bits),
               np.int32(1 if stochastic else 0), np.uint32(seed), out)
    return out, lo, scale, gbad.sum()                # on the device: no read-back here


def generic_decode_with(run, packed, lo, scale, bits, group, shape):
    xp = run.xp
    packed, lo, scale, bits, group, shape, n = checks.check_generic_decode(
        run.asarray(packed), run.asarray(lo), run.asarray(scale), bits, group, shape)
    out = xp.empty(shape, dtype=np.float32)
    if n:
        run.launch("npx_generic_decode", n, packed, lo, scale, _i64(n), _i64(min(group, n)), np.int32(bits),
                   out.reshape(-1))
    return out


def pack_bits_with(run, codes, bits):
    xp = run.xp
    codes, bits = checks.check_codes(run.asarray(codes), bits)
    n = int(codes.size)
    out = xp.empty(checks.packed_nbytes(n, bits), dtype=np.uint8)
    run.launch("npx_pack_bits", out.size, codes, _i64(n), np.int32(bits), out)
    return out


def unpack_bits_with(run, packed, n, bits):
    xp = run.xp
    packed, n, bits = checks.check_unpack_bits(run.asarray(packed), n, bits)
    out = xp.empty(n, dtype=np.uint8)
    run.launch("npx_unpack_bits", n, packed, _i64(n), np.int32(bits), out)
    return out


def counter_uniform_with(run, n, seed):
    seed = checks.check_seed(seed)
    n = int(n)
    out = run.xp.empty(n, dtype=np.float32)
    run.launch("npx_counter_uniform", n, _i64(n), np.uint32(seed), out)
    return out


def _device_of(a):
    """``with a.device:`` for a CuPy array (its kernels launch, and its outputs are
    allocated, on the device that holds it, not the current one); nothing otherwise."""
    dev = getattr(a, "device", None)
    return dev if hasattr(dev, "__enter__") else contextlib.nullcontext()


# --------------------------------------------------------------------------- #
# Public functions: the reference's names and signatures, CuPy arrays out
# --------------------------------------------------------------------------- #
def paper_pack(y, k, s, bits):
    """See :func:`npapprox.kernels.reference.paper_pack`. Returns ``(packed, n_nonfinite)``."""
    with _device_of(y):
        return paper_pack_with(_launcher(), y, k, s, bits)


def paper_decode(packed, shape, s, step, off, bits, relu=False):
    """See :func:`npapprox.kernels.reference.paper_decode`."""
    with _device_of(packed):
        return paper_decode_with(_launcher(), packed, shape, s, step, off, bits, relu)


def paper_mask(packed, shape, s, bits):
    """See :func:`npapprox.kernels.reference.paper_mask`."""
    with _device_of(packed):
        return paper_mask_with(_launcher(), packed, shape, s, bits)


def bn_apply_pack(x, mu, scale, beta, k, s, bits):
    """The forward of a BN -> ReLU unit and its paper-scheme storage in one pass.

    ``x`` float32 ``(N, C, *spatial)``; ``mu``, ``scale = gamma * inv_sigma``, ``beta``
    float32 ``(C,)`` (as :func:`npapprox.kernels.bn.bn_apply` takes them); ``k``, ``s``,
    ``bits`` the paper parameters (as :func:`paper_pack`). With ``y = (x - mu) * scale +
    beta`` (``bn_apply``'s bytes; y itself is never stored) returns ``(h, packed,
    n_nonfinite)``: ``h = y * (y > 0)`` of x's shape, and ``paper_pack(y, k, s, bits)``'s
    bytes and non-finite count (a 0-d device array, not read back)."""
    with _device_of(x):
        return bn_apply_pack_with(_launcher(), x, mu, scale, beta, k, s, bits)


def bn_backward_codes(gy, packed, s, x_step, x_off, bits, scale, batch_stats=True, need_gx=True):
    """BN's backward of a BN -> ReLU unit straight from its paper codes (``BNSource.codes``).

    ``gy`` float32 ``(N, C, *spatial)`` (the unit's output gradient); ``packed``, ``s``,
    ``x_step``, ``x_off``, ``bits`` the unit's codes and xhat map; ``scale = gamma *
    inv_sigma`` (C,). xhat and the mask are rebuilt from the codes per element, no decoded
    array exists. Returns ``(gx or None, ggamma, gbeta)``: gx float32 of gy's shape
    (:func:`npapprox.kernels.bn.bn_backward`'s formula, bit for bit given its per-channel
    constants), ggamma and gbeta float64 ``(C,)`` summed in float64 (order: quant.cu,
    ``npx_bn_codes_sums``). Three launches: partial sums, per-channel sums, gx."""
    with _device_of(gy):
        return bn_backward_codes_with(_launcher(), gy, packed, s, x_step, x_off, bits, scale, batch_stats, need_gx)


def generic_pack(x, bits, group, stochastic=False, seed=0):
    """See :func:`npapprox.kernels.reference.generic_pack`. Returns ``(packed, lo, scale, n_nonfinite)``."""
    with _device_of(x):
        return generic_pack_with(_launcher(), x, bits, group, stochastic, seed)


def generic_decode(packed, lo, scale, bits, group, shape):
    """See :func:`npapprox.kernels.reference.generic_decode`."""
    with _device_of(packed):
        return generic_decode_with(_launcher(), packed, lo, scale, bits, group, shape)


def pack_bits(codes, bits):
    """See :func:`npapprox.kernels.reference.pack_bits`."""
    with _device_of(codes):
        return pack_bits_with(_launcher(), codes, bits)


def unpack_bits(packed, n, bits):
    """See :func:`npapprox.kernels.reference.unpack_bits`."""
    with _device_of(packed):
        return unpack_bits_with(_launcher(), packed, n, bits)


def counter_uniform(n, seed, xp=None):
    """See :func:`npapprox.kernels.reference.counter_uniform` (CuPy array out, on the current
    device; ``xp`` is ignored)."""
    return counter_uniform_with(_launcher(), n, seed)
