"""The CUDA kernels (npapprox/kernels/quant.cu), verified on a machine without a GPU.

(a) every ``.cu`` file compiles with ``nvcc --ptx`` (and ``--cubin``, through
    ptxas) for sm_80 and sm_90 (skipped visibly without nvcc, a failure when
    NPAPPROX_REQUIRE_NVCC=1, as in CI); the PTX has exactly the kernels
    ``gpu.py`` launches, and no fused multiply-add
    and no flush-to-zero on the arithmetic even under CuPy's ``-ftz=true`` and
    ``--use_fast_math``; NVRTC (the compiler CuPy uses) accepts the source with
    gpu.py's options where libnvrtc is found (a visible skip otherwise);
(b) the kernel signatures in ``gpu.KERNELS`` (the argument types gpu.py passes)
    are the ones in the source;
(c) the SAME ``.cu`` file, compiled by g++ on the host with cuda_shim.h, runs
    through ``gpu.py``'s own wrappers (a host *launcher* in place of CuPy's) and
    gives the reference's bytes for every K, both quantizers, deterministic and
    stochastic, odd sizes, partial last groups, saturation, NaN/inf counting,
    subnormals and the paper mask's edge cases; under any launch geometry; and
    every kernel writes all of its outputs and nothing outside them (guard zones).

g++ is always present: a missing g++ fails (c), it does not skip it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npapprox.kernels as K
import test_kernels as TK  # the edge-case generators and naive oracles of the Cython parity tests
from npapprox.kernels import gpu
from npapprox.kernels import reference as R

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "npapprox" / "kernels"
CU_FILES = sorted(KERNEL_DIR.glob("*.cu"))
BITS = (1, 2, 4, 8)
F32 = np.float32
REQUIRE_NVCC_ENV = "NPAPPROX_REQUIRE_NVCC"
_same = TK._same


def SETTINGS(n):
    return settings(deadline=None, max_examples=n,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- #
# (a) nvcc / NVRTC
# --------------------------------------------------------------------------- #
def require_nvcc() -> str:
    """Path of nvcc; skip without it, or fail when NPAPPROX_REQUIRE_NVCC=1 (CI)."""
    candidates = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    if os.environ.get(REQUIRE_NVCC_ENV, "").strip() == "1":
        pytest.fail(f"nvcc is required ({REQUIRE_NVCC_ENV}=1) but was not found on PATH, "
                    "in $CUDA_HOME/bin or /usr/local/cuda/bin")
    pytest.skip(f"nvcc not found (set {REQUIRE_NVCC_ENV}=1 to fail instead)")


def _nvcc_ptx(nvcc, cu, tmp_path, *flags):
    out = tmp_path / (cu.stem + ".ptx")
    cmd = [nvcc, "--ptx", *flags, str(cu), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return out.read_text()


def _entries(ptx):
    return set(re.findall(r"\.entry\s+([A-Za-z_]\w*)", ptx))


def test_there_are_cuda_sources():
    assert [p.name for p in CU_FILES] == ["quant.cu"]
    assert (KERNEL_DIR / "cuda_shim.h").is_file()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_every_cu_file(cu, arch, tmp_path):
    """--ptx as CI requires; then --cubin, which also runs ptxas on the inline PTX."""
    nvcc = require_nvcc()
    ptx = _nvcc_ptx(nvcc, cu, tmp_path, f"-arch={arch}", *gpu.OPTIONS)
    if cu.name == "quant.cu":
        assert _entries(ptx) == set(gpu.KERNELS)
    cmd = [nvcc, "--cubin", f"-arch={arch}", *gpu.OPTIONS, str(cu), "-o", str(tmp_path / (cu.stem + ".cubin"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in (r.stdout + r.stderr).lower(), f"{' '.join(cmd)}\n{r.stderr}"


# float arithmetic that must never flush subnormals or fuse (the conversions of
# already integral values, cvt.rzi.s32, and the negation of a constant may)
_FTZ_FORBIDDEN = re.compile(r"\b(add|sub|mul|div|min|max|setp\.\w+|cvt\.rpi|cvt\.rmi|cvt\.rni)\.\S*ftz")


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_ptx_keeps_subnormals_and_never_fuses_whatever_the_flags(cu, tmp_path):
    """CuPy compiles every RawModule with -ftz=true (after our options); the kernels'
    float operations are inline PTX so that neither it nor fast math changes a byte."""
    nvcc = require_nvcc()
    for flags in (("-ftz=true", "--fmad=true"), ("--use_fast_math",)):
        ptx = _nvcc_ptx(nvcc, cu, tmp_path, "-arch=sm_90", "-std=c++17", *flags)
        assert not _FTZ_FORBIDDEN.search(ptx), _FTZ_FORBIDDEN.search(ptx).group(0)
        assert not re.search(r"\b(fma|mad)\.\S*f32", ptx)


def _find_nvrtc():
    env = os.environ.get("NPAPPROX_NVRTC")
    if env:
        return env
    import ctypes.util  # noqa: PLC0415
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    pats = [os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so*") for p in sys.path if p]
    pats += ["/usr/local/cuda/lib64/libnvrtc.so*", "/usr/local/cuda*/lib64/libnvrtc.so*"]
    for pat in pats:
        libs = sorted(x for x in glob.glob(pat) if "builtins" not in x)
        if libs:
            return libs[0]
    return None


def _nvrtc_compile(lib, src, options):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"quant.cu", 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = ""
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value.decode()
        return rc, log.value.decode(errors="replace"), ptx
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_with_the_runtime_options(arch):
    """What cupy.RawModule does: NVRTC (no host headers), gpu.OPTIONS plus the options
    CuPy adds itself (-arch, --device-as-default-execution-space, -ftz=true)."""
    path = _find_nvrtc()
    if path is None:
        if os.environ.get(REQUIRE_NVCC_ENV, "").strip() == "1":
            pytest.fail(f"libnvrtc is required ({REQUIRE_NVCC_ENV}=1): the test extra installs "
                        "nvidia-cuda-nvrtc==13.0.* on Linux; or set NPAPPROX_NVRTC=path")
        pytest.skip("libnvrtc not found (pip install 'nvidia-cuda-nvrtc==13.0.*', or set NPAPPROX_NVRTC=path)")
    # libnvrtc dlopens its builtins library by name: load it first from the same folder
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    options = list(gpu.OPTIONS) + [f"-arch={arch}", "--device-as-default-execution-space", "-ftz=true"]
    rc, log, ptx = _nvrtc_compile(lib, gpu.source(), options)
    assert rc == 0, log
    assert _entries(ptx) == set(gpu.KERNELS)
    assert not _FTZ_FORBIDDEN.search(ptx)


# --------------------------------------------------------------------------- #
# (b) signatures and packaging
# --------------------------------------------------------------------------- #
_C_TYPES = {"float": "f32", "int": "i32", "long long": "i64", "unsigned int": "u32", "unsigned char": "u8"}


def _source_signatures(text):
    sigs = {}
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)          # comments hold parentheses
    for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', text):
        params = []
        for p in m.group(2).split(","):
            p = " ".join(p.replace("__restrict__", "").split())
            pm = re.fullmatch(r"(const )?([a-z ]+?)\s*(\*)?\s*\w+", p)
            assert pm, f"cannot parse parameter {p!r} of {m.group(1)}"
            t = _C_TYPES[pm.group(2).strip()]
            if pm.group(3):
                t = ("in:" if pm.group(1) else "out:") + t
            params.append(t)
        sigs[m.group(1)] = tuple(params)
    return sigs


def test_kernel_signatures_match_the_source():
    """The argument types gpu.py passes (gpu.KERNELS) are those of the kernels: a
    Python int or an int32 where the kernel reads a long long would be garbage."""
    assert _source_signatures(gpu.source()) == gpu.KERNELS


def test_cuda_source_and_shim_ship_as_package_data():
    text = (ROOT / "setup.py").read_text()
    assert '"*.cu"' in text and '"*.h"' in text
    assert gpu.source() == (KERNEL_DIR / "quant.cu").read_text()


def test_wrapper_rejects_wrong_argument_types():
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="expected int64"):
        gpu.check_args("npx_counter_uniform", (4, np.uint32(0), a), lambda x: isinstance(x, np.ndarray))
    with pytest.raises(TypeError, match="float32 array"):
        gpu.check_args("npx_counter_uniform", (np.int64(4), np.uint32(0), a.astype(np.float64)),
                       lambda x: isinstance(x, np.ndarray))
    with pytest.raises(TypeError, match="takes 3 arguments"):
        gpu.check_args("npx_counter_uniform", (np.int64(4), a), lambda x: isinstance(x, np.ndarray))


def test_dispatch_sends_device_arrays_to_gpu_py(monkeypatch):
    class FakeDeviceArray:
        pass

    monkeypatch.setattr(K, "on_gpu", lambda a: isinstance(a, FakeDeviceArray))
    try:
        assert K.implementation(FakeDeviceArray()) == "gpu"
        assert K._impl(FakeDeviceArray()) is gpu
        K.use_reference(True)
        assert K.implementation(FakeDeviceArray()) == "reference"
    finally:
        K.use_reference(False)
    assert K.implementation(np.zeros(1, np.float32)) == "cpu"


# --------------------------------------------------------------------------- #
# (c) the host build
# --------------------------------------------------------------------------- #
GUARD = 64  # bytes of canary on each side of every array a kernel sees
CANARY = 0xA5
_SCALARS = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32}


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    """quant.cu compiled by g++ with cuda_shim.h, loaded with ctypes (once per session)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ is required to build the CUDA kernels on the host (it is always present)")
    out = tmp_path_factory.mktemp("cuda_host") / "libnpx_quant.so"
    cmd = [gxx, "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-x", "c++", "-std=c++17", "-Wall",
           "-I", str(KERNEL_DIR), str(KERNEL_DIR / "quant.cu"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert "warning" not in r.stderr.lower(), r.stderr
    lib = ctypes.CDLL(str(out))
    assert lib.npx_host_abi_version() == 1
    for name, sig in gpu.KERNELS.items():
        fn = getattr(lib, "npx_host_" + name[len("npx_"):])
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if ":" in code else _SCALARS[code] for code in sig]
    return lib


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
        for code, a in zip(gpu.KERNELS[name], args):
            if ":" not in code:
                cargs.append(_SCALARS[code](int(a)))
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


@pytest.fixture
def host(host_lib):
    return HostLauncher(host_lib)


class GuardPageLauncher(HostLauncher):
    """Like HostLauncher, but each array argument ends exactly where an inaccessible
    page begins: a kernel that reads or writes even one byte past an array dies with
    SIGSEGV (run it in a child process). Catches out-of-bounds *reads* too, which the
    canaries cannot see and which can fault or read garbage on a GPU."""

    def __init__(self, lib, block=256, extra_blocks=1):
        super().__init__(lib, block, extra_blocks)
        import mmap  # noqa: PLC0415
        self.page = mmap.PAGESIZE
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def _guarded(self, nbytes):
        """Address of nbytes of read-write memory followed by a PROT_NONE page (never freed)."""
        data_pages = -(-nbytes // self.page) or 1
        size = (data_pages + 1) * self.page
        base = self.libc.mmap(None, size, 3, 0x22, -1, 0)          # RW, MAP_PRIVATE | MAP_ANONYMOUS
        assert base not in (None, ctypes.c_void_p(-1).value)
        guard = base + data_pages * self.page
        assert self.libc.mprotect(guard, self.page, 0) == 0          # PROT_NONE
        return guard - nbytes

    def launch(self, name, threads, *args):
        gpu.check_args(name, args, lambda a: isinstance(a, np.ndarray))
        grid = -(-int(threads) // self.block) + self.extra_blocks
        cargs, outs = [], []
        for code, a in zip(gpu.KERNELS[name], args):
            if ":" not in code:
                cargs.append(_SCALARS[code](int(a)))
                continue
            raw = a.reshape(-1).view(np.uint8)
            addr = self._guarded(raw.size)
            view = np.ctypeslib.as_array((ctypes.c_uint8 * raw.size).from_address(addr)) if raw.size else None
            if view is not None:
                view[...] = raw if code.startswith("in:") else CANARY
            cargs.append(ctypes.c_void_p(addr))
            if code.startswith("out:") and view is not None:
                outs.append((raw, view))
        getattr(self.lib, "npx_host_" + name[len("npx_"):])(grid, self.block, *cargs)
        for raw, view in outs:
            raw[...] = view


def _guard_page_child(lib_path):
    """Run every kernel through GuardPageLauncher on odd sizes (the child of the test below)."""
    lib = ctypes.CDLL(lib_path)
    for name, sig in gpu.KERNELS.items():
        fn = getattr(lib, "npx_host_" + name[len("npx_"):])
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if ":" in code else _SCALARS[code] for code in sig]
    run = GuardPageLauncher(lib, block=32, extra_blocks=2)
    rng = np.random.default_rng(0)
    for shape in ((0, 2, 3, 3), (1, 1, 1, 1), (1, 3, 1, 3), (3, 2, 5, 1), (2, 3, 17)):
        gamma, beta = TK.channel_params(rng, shape[1])
        y = TK.bn_output(rng, shape, gamma, beta, special=0.3, nonfinite=0.05)
        for bits in BITS:
            _check_paper_gb(run, y, gamma, beta, bits)
            for group in (1, 3, 8, 13, 2 ** 40):
                for stochastic in (False, True):
                    _check_generic(run, y, bits, group, stochastic, 5)
            codes = rng.integers(0, 2 ** bits, y.size).astype(np.uint8)
            assert _same(gpu.pack_bits_with(run, codes, bits), R.pack_bits(codes, bits))
            assert _same(gpu.unpack_bits_with(run, R.pack_bits(codes, bits), y.size, bits), codes)
        assert _same(gpu.counter_uniform_with(run, y.size, 1), R.counter_uniform(y.size, 1))
    print("guard pages: all kernels stayed inside their arrays")


def _check_paper(run, y, k, s, bits, step, off):
    ref_packed, ref_nf = R.paper_pack(y, k, s, bits)
    packed, nf = gpu.paper_pack_with(run, y, k, s, bits)
    assert _same(packed, ref_packed), "packed bytes differ"
    assert nf == ref_nf
    for relu in (False, True):
        assert _same(gpu.paper_decode_with(run, ref_packed, y.shape, s, step, off, bits, relu),
                     R.paper_decode(ref_packed, y.shape, s, step, off, bits, relu)), f"decode (relu={relu})"
    mask = gpu.paper_mask_with(run, ref_packed, y.shape, s, bits)
    assert _same(mask, R.paper_mask(ref_packed, y.shape, s, bits))
    return packed, mask


def _check_paper_gb(run, y, gamma, beta, bits):
    k, s = TK.paper_params(gamma, beta, bits)
    return _check_paper(run, y, k, s, bits, TK.paper_step(gamma, bits), np.asarray(beta, np.float32))


def _check_generic(run, x, bits, group, stochastic, seed):
    ref = R.generic_pack(x, bits, group, stochastic, seed)
    got = gpu.generic_pack_with(run, x, bits, group, stochastic, seed)
    assert _same(got[0], ref[0]), "packed bytes differ"
    assert _same(got[1], ref[1]), "lo differs"
    assert _same(got[2], ref[2]), "scale differs"
    assert got[3] == ref[3]
    assert _same(gpu.generic_decode_with(run, *ref[:3], bits, group, x.shape),
                 R.generic_decode(*ref[:3], bits, group, x.shape))
    return ref


PAPER_SHAPES = [(0, 3, 4, 4), (1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 1, 3), (1, 2, 3), (4, 7),
                (2, 3, 61, 67), (1, 9, 33, 31)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=str)
def test_host_paper_bit_identical_edge_cases(host, bits, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, shape, "cuda")).encode()))
    gamma, beta = TK.channel_params(rng, shape[1])
    y = TK.bn_output(rng, shape, gamma, beta, special=0.3, nonfinite=0.02)
    _check_paper_gb(host, y, gamma, beta, bits)
    # every special value in every channel setting (gamma <= 0, == 0, tiny; beta/gamma far outside +-3)
    C = len(TK.GAMMAS) * len(TK.BETA_OVER_GAMMA)
    gamma = np.repeat(np.array(TK.GAMMAS, np.float32), len(TK.BETA_OVER_GAMMA))
    beta = (np.tile(np.array(TK.BETA_OVER_GAMMA), len(TK.GAMMAS)) * np.abs(gamma)).astype(np.float32)
    vals = np.concatenate([TK.SPECIALS, -TK.SPECIALS, TK.NONFINITE, np.float32([0.5, -0.5, 3.0, 1e-3])])
    with np.errstate(all="ignore"):
        y = np.repeat(vals[:, None], C, axis=1) * np.where(gamma == 0, 1, gamma)[None, :]
    y = np.concatenate([y.astype(np.float32), np.repeat(vals[:, None], C, axis=1)], axis=0)
    _check_paper_gb(host, y, gamma, beta, bits)


@SETTINGS(120)
@given(case=TK.paper_cases(max_side=9))
def test_host_paper_bit_identical_random(host_lib, case):
    bits, y, gamma, beta, k, s = case
    _check_paper(HostLauncher(host_lib), y, k, s, bits, TK.paper_step(gamma, bits), beta)


@pytest.mark.parametrize("bits", BITS)
def test_host_paper_exact_integers_and_clamp_edges(host, bits):
    """u = y*k on, just off and between integers, +-0.0, around the clamps +-(NB+1); k = 0, inf."""
    nb = 2 ** bits
    us = np.arange(-(nb + 3), nb + 4, dtype=np.float32)
    u = np.concatenate([us, np.nextafter(us, F32(np.inf)), np.nextafter(us, F32(-np.inf)),
                        us + F32(0.5), np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45])])
    k = np.float32([1.0, 0.0, np.inf])
    for s_val in sorted({1, nb // 2 if nb > 2 else 1, nb - 1}):
        s = np.full(3, s_val, np.int32)
        y = np.ascontiguousarray(np.broadcast_to(u[:, None], (u.size, 3)))
        _, mask = _check_paper(host, y, k, s, bits, np.float32([0.5, 1.0, 2.0]), np.float32([0, -1, 1]))
        assert _same(mask, y > 0)


@pytest.mark.parametrize("bits", BITS)
def test_host_paper_mask_edge_cases(host, bits):
    """The mask equals y > 0 exactly: gamma <= 0, == 0, tiny (1e-30, 1e-38: k = inf at K = 8),
    beta/gamma = +-1e3, y in (0, 1e-6] (subnormals included), y = +-0.0, NaN -> False."""
    gammas = np.float32([1.0, -1.0, -0.2, 0.0, 1e-30, -1e-30, 1e-38, 2.0, 1e3])
    rel = np.float32([0.0, 1e3, -1e3, 2.9, -3.5])
    gamma = np.repeat(gammas, rel.size)
    beta = (np.tile(rel, gammas.size) * np.abs(gamma)).astype(np.float32)
    beta[gamma == 0] = np.tile(np.float32([0.0, 1.0, -1.0, 0.5, -0.5]), 1)
    tiny = np.float32([1e-45, 3e-45, 1e-40, 1.1754942e-38, 1e-38, 1e-30, 1e-7, 5e-7, 1e-6])
    vals = np.concatenate([tiny, -tiny, np.float32([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0])])
    y = np.ascontiguousarray(np.broadcast_to(vals[:, None], (vals.size, gamma.size)))
    _, mask = _check_paper_gb(host, y.reshape(vals.size, gamma.size, 1, 1), gamma, beta, bits)
    assert _same(mask.reshape(y.shape), y > 0)


def test_host_subnormals_are_kept(host):
    """Values and products in the subnormal range keep their exact IEEE results (CuPy's
    -ftz=true would flush them: the kernels are immune, this pins the host side)."""
    sub = np.float32([1e-45, -1e-45, 3e-42, -7e-40, 1.1754942e-38, 5.877472e-39])
    # paper: k = 1 puts u = y in the subnormal range; ceil(1e-45) = 1 -> first positive bin
    y = np.ascontiguousarray(np.broadcast_to(sub[:, None], (sub.size, 2))).reshape(sub.size, 2, 1)
    for bits in BITS:
        _check_paper(host, y, np.float32([1.0, 2.0 ** 100]), np.int32([1, 2 ** bits - 1]), bits,
                     np.float32([1e-40, 3e-39]), np.float32([-1e-45, 0.0]))
    # generic: groups whose range is subnormal (inv overflows to inf), or whose lo is subnormal
    x = np.concatenate([sub, np.float32([0.0, -0.0, 1e-45, 2e-45, 1.0, 1e-45])])
    for bits in BITS:
        for group in (1, 2, 3, 4, 6, 12):
            for stochastic in (False, True):
                _check_generic(host, x, bits, group, stochastic, 77)


GROUPS = [1, 3, 64, 256, 2048, 2049, 20000]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["det", "sto"])
def test_host_generic_bit_identical_edge_cases(host, bits, group, stochastic):
    rng = np.random.default_rng(bits * 1000 + group + 7)
    for n in (0, 1, 2, 7, group - 1, group, group + 1, 3 * group + 5, 45_001):
        if n < 0:
            continue
        for kind in ("normal", "wide", "constant", "zeros", "specials", "nonfinite"):
            x = TK.generic_input(rng, n, kind)
            _check_generic(host, x, bits, group, stochastic, int(rng.integers(0, 2 ** 32)))


def test_host_generic_group_larger_than_tensor(host):
    x = TK.generic_input(np.random.default_rng(5), 50_001, "normal")
    for group in (50_001, 2 ** 20, 2 ** 40, 2 ** 70):
        for stochastic in (False, True):
            ref = _check_generic(host, x, 4, group, stochastic, 9)
            assert ref[1].shape == (1,) and ref[1][0] == x.min()


@pytest.mark.parametrize("sub, max_tasks", [(1, 1 << 16), (5, 1 << 16), (32, 3), (7, 2)])
def test_host_generic_any_split_of_a_group_gives_the_same_bytes(host, monkeypatch, sub, max_tasks):
    """The partial min/max tasks (interleaved, capped per group) only change the order of
    an order-independent reduction."""
    monkeypatch.setattr(gpu, "SUB", sub)
    monkeypatch.setattr(gpu, "MAX_SUB_TASKS", max_tasks)
    rng = np.random.default_rng(sub * 100 + max_tasks)
    for n, group in ((1000, 1000), (999, 64), (3001, 300), (50, 7)):
        for kind in ("normal", "zeros", "specials", "nonfinite"):
            _check_generic(host, TK.generic_input(rng, n, kind), 4, group, kind == "normal", 3)


@SETTINGS(120)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 3000), group=st.integers(1, 300),
       kind=st.sampled_from(["normal", "wide", "constant", "zeros", "specials", "nonfinite"]),
       stochastic=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_host_generic_bit_identical_random(host_lib, bits, n, group, kind, stochastic, seed):
    x = TK.generic_input(np.random.default_rng(seed), n, kind)
    _check_generic(HostLauncher(host_lib), x, bits, group, stochastic, seed)


@pytest.mark.parametrize("bits", BITS)
def test_host_bit_packing_and_noise(host, bits):
    rng = np.random.default_rng(bits + 40)
    for n in (0, 1, 5, 7, 9, 4097, 50_001):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        packed = R.pack_bits(codes, bits)
        assert _same(gpu.pack_bits_with(host, codes, bits), packed)
        assert _same(gpu.unpack_bits_with(host, packed, n, bits), R.unpack_bits(packed, n, bits))
        # out-of-range codes spill like the reference's uint8 shifts (same bytes, not a feature)
        wild = rng.integers(0, 256, n).astype(np.uint8)
        assert _same(gpu.pack_bits_with(host, wild, bits), R.pack_bits(wild, bits))
    for seed in (0, 1, 12345, 0x9E3779B9, 2 ** 32 - 1):
        assert _same(gpu.counter_uniform_with(host, 70_001, seed), R.counter_uniform(70_001, seed))
    assert _same(gpu.counter_uniform_with(host, 0, 3), R.counter_uniform(0, 3))


@pytest.mark.parametrize("block, extra", [(1, 0), (3, 2), (32, 0), (97, 1), (1024, 3)])
def test_host_launch_geometry_does_not_change_bytes(host_lib, block, extra):
    run = HostLauncher(host_lib, block=block, extra_blocks=extra)
    rng = np.random.default_rng(block)
    gamma, beta = TK.channel_params(rng, 5)
    y = TK.bn_output(rng, (3, 5, 7, 3), gamma, beta, special=0.3, nonfinite=0.05)
    for bits in BITS:
        _check_paper_gb(run, y, gamma, beta, bits)
        for group in (1, 5, 64, 400):
            for stochastic in (False, True):
                _check_generic(run, y, bits, group, stochastic, 11)
        assert _same(gpu.counter_uniform_with(run, 333, 5), R.counter_uniform(333, 5))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages use Linux mmap flags")
def test_host_kernels_never_read_or_write_past_their_arrays(host_lib):
    """Out-of-bounds reads and writes of every kernel, odd sizes, extra threads: any
    access past the end of an array faults on a PROT_NONE page (in a child process)."""
    code = f"import test_cuda; test_cuda._guard_page_child({host_lib._name!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=str(ROOT / "tests"))
    assert r.returncode == 0, (f"a kernel touched memory outside its arrays or differed (exit code "
                               f"{r.returncode}, -11 is SIGSEGV)\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    assert "all kernels stayed inside" in r.stdout


def test_host_nonfinite_inputs_are_counted_and_defined(host):
    rng = np.random.default_rng(21)
    gamma, beta = TK.channel_params(rng, 3)
    for shape in ((2, 3, 4, 5), (1, 3, 1, 1), (5, 3, 3, 3)):
        y = TK.bn_output(rng, shape, gamma, beta, nonfinite=0.3)
        y.reshape(-1)[:3] = np.float32([np.nan, np.inf, -np.inf])
        for bits in BITS:
            packed, _ = _check_paper_gb(host, y, gamma, beta, bits)
            assert gpu.paper_pack_with(host, y, *TK.paper_params(gamma, beta, bits), bits)[1] == \
                int(np.sum(~np.isfinite(y)))
            for group in (1, 4, 64):
                ref = _check_generic(host, y, bits, group, False, 0)
                assert ref[3] == int(np.sum(~np.isfinite(y)))


def test_host_accepts_views_and_odd_shapes(host):
    rng = np.random.default_rng(3)
    gamma, beta = TK.channel_params(rng, 6)
    base = TK.bn_output(rng, (3, 12, 9, 10), np.repeat(gamma, 2), np.repeat(beta, 2))
    y = base[:, ::2, :, ::-1]                                   # not contiguous
    k, s = TK.paper_params(gamma, beta, 4)
    ref = R.paper_pack(np.ascontiguousarray(y), k, s, 4)
    got = gpu.paper_pack_with(host, y, k, s, 4)
    assert _same(got[0], ref[0]) and got[1] == ref[1]
    x = base.transpose(0, 2, 3, 1)                              # not contiguous
    gref = R.generic_pack(np.ascontiguousarray(x), 4, 64, True, 5)
    assert all(_same(a, b) for a, b in zip(gpu.generic_pack_with(host, x, 4, 64, True, 5)[:3], gref[:3]))
    # (N, C) and (N, C, L) shapes of the paper scheme
    for shape in ((7, 3), (2, 3, 5)):
        yy = TK.bn_output(rng, shape, gamma[:3], beta[:3])
        _check_paper_gb(host, yy, gamma[:3], beta[:3], 2)


def test_host_wrappers_raise_the_reference_errors(host):
    y = np.zeros((2, 3, 4, 4), np.float32)
    k, s = np.ones(3, np.float32), np.ones(3, np.int32)
    with pytest.raises(ValueError, match="bits"):
        gpu.paper_pack_with(host, y, k, s, 3)
    with pytest.raises(ValueError, match="k must have shape"):
        gpu.paper_pack_with(host, y, k[:2], s, 4)
    with pytest.raises(ValueError, match="s must lie"):
        gpu.paper_pack_with(host, y, k, np.int32([1, 1, 16]), 4)
    with pytest.raises(ValueError, match="float32"):
        gpu.generic_pack_with(host, y.astype(np.float64), 4, 64)
    with pytest.raises(ValueError, match="group"):
        gpu.generic_pack_with(host, y, 4, 0)
    with pytest.raises(ValueError, match="packed holds"):
        gpu.generic_decode_with(host, np.zeros(2, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32),
                                4, 64, (2, 3))
    with pytest.raises(ValueError, match="seed"):
        gpu.counter_uniform_with(host, 3, -1)
    assert host.launches == []                                  # checks run before any launch


# NaN bit patterns: quiet with payloads, negative, signalling, all ones (what a GPU's arithmetic writes)
NAN_PATTERNS = np.uint32([0x7fc00000, 0x7fc00001, 0xffc00000, 0x7f800001, 0xffffffff, 0x7fffffff]).view(F32)
CANONICAL_NAN = 0x7fc00000


def _nan_bits_are_canonical(out):
    bits = np.ascontiguousarray(out).view(np.uint32).reshape(-1)
    nan = np.isnan(out).reshape(-1)
    return int(nan.sum()), sorted({hex(int(b)) for b in bits[nan]})


def test_every_decoded_nan_is_the_canonical_quiet_nan(host):
    """Decoders write 0x7fc00000 for every NaN, whatever made it: a NaN lo / scale / step / off
    with any payload or sign, 0 * inf (x86 makes 0xffc00000), inf - inf. The host build
    computes with x86 semantics, so without the canonicalisation the payloads would pass
    through here (and a GPU would write 0x7fffffff): reference, Cython and CUDA all pinned."""
    assert K.implementation(np.zeros(1, F32)) == "cpu"
    m = NAN_PATTERNS.size
    # generic: a NaN lo (each pattern), a NaN scale (each pattern), scale = inf (0 * inf at code 0)
    lo = np.concatenate([NAN_PATTERNS, np.ones(m, F32), np.float32([1.0, -3e38])])
    scale = np.concatenate([np.ones(m, F32), NAN_PATTERNS, np.float32([np.inf, np.inf])])
    G = 4
    codes = np.tile(np.arange(G, dtype=np.uint8), lo.size)
    packed = R.pack_bits(codes, 4)
    impls = {"reference": R.generic_decode, "cython": K.generic_decode,
             "cuda (host)": lambda *a: gpu.generic_decode_with(host, *a)}
    for name, decode in impls.items():
        out = decode(packed, lo, scale, 4, G, (codes.size,))
        assert _nan_bits_are_canonical(out) == (2 * m * G + 2, [hex(CANONICAL_NAN)]), name
    # paper: NaN step / off (each pattern), step = inf with off = -inf (inf - inf for t > 0)
    C = 2 * m + 1
    step = np.concatenate([NAN_PATTERNS, np.ones(m, F32), np.float32([np.inf])])
    off = np.concatenate([np.zeros(m, F32), NAN_PATTERNS, np.float32([-np.inf])])
    s = np.full(C, 2, np.int32)
    shape = (1, C, 4)
    codes = np.tile(np.arange(4, dtype=np.uint8), C)                 # t = -1.5, -0.5, 0.5, 1.5
    packed = R.pack_bits(codes, 2)
    impls = {"reference": R.paper_decode, "cython": K.paper_decode,
             "cuda (host)": lambda *a: gpu.paper_decode_with(host, *a)}
    for relu in (False, True):
        want = (2 * m * (2 if relu else 4) + 2, [hex(CANONICAL_NAN)])
        for name, decode in impls.items():
            out = decode(packed, shape, s, step, off, 2, relu)
            assert _nan_bits_are_canonical(out) == want, (name, relu)
