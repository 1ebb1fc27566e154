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
    through ``gpu.py``'s own wrappers (a host *launcher* in place of CuPy's): its
    bytes against the reference are part of the parity suite (tests/test_parity.py);
    here, what is particular to the launches: any launch geometry and any split of
    a group's min / max give the same bytes, no kernel reads or writes past its
    arrays (guard pages), and the argument checks run before any launch.

g++ is always present: a missing g++ fails (c), it does not skip it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import mmap
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import npapprox.kernels as K
from npapprox import quant
from npapprox.kernels import gpu
from npapprox.kernels import reference as R

from support import (
    BITS,
    CANARY,
    KERNEL_DIR,
    ROOT,
    SCALARS,
    HostLauncher,
    bn_output,
    channel_params,
    check_bn_apply_pack,
    check_bn_backward_codes,
    check_generic,
    check_paper_gb,
    declare_host_functions,
    generic_input,
    host_impl,
    same,
)

CU_FILES = sorted(KERNEL_DIR.glob("*.cu"))
REQUIRE_NVCC_ENV = "NPAPPROX_REQUIRE_NVCC"


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
        assert not re.search(r"\b(fma|mad)\.\S*f(32|64)", ptx)


def _find_nvrtc():
    env = os.environ.get("NPAPPROX_NVRTC")
    if env:
        return env
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
_C_TYPES = {"float": "f32", "double": "f64", "int": "i32", "long long": "i64", "unsigned int": "u32",
            "unsigned char": "u8"}


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
        K.use_reference(True)
        assert K.implementation(FakeDeviceArray()) == "reference"
    finally:
        K.use_reference(False)
    assert K.implementation(np.zeros(1, np.float32)) == "cpu"


# --------------------------------------------------------------------------- #
# (c) the host build
# --------------------------------------------------------------------------- #
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
        for code, a in zip(gpu.KERNELS[name], args, strict=True):
            if ":" not in code:
                cargs.append(SCALARS[code](int(a)))
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


def _check_fused_bn(run, rng, y, gamma, beta, bits):
    """Both fused BN passes of quant.cu on the unit with BN output ``y`` (see support.py's checks)."""
    C = y.shape[1]
    p = quant.paper_params(gamma, beta, bits)
    mu, scale = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    check_bn_apply_pack(run, y, mu, scale, beta, p["k"], p["s"], bits)
    packed, _ = R.paper_pack(y, p["k"], p["s"], bits)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    for batch_stats in (True, False):
        check_bn_backward_codes(run, gy, packed, p["s"], p["x_step"], p["x_off"], bits, gamma * scale, batch_stats)


def _guard_page_child(lib_path):
    """Run every kernel through GuardPageLauncher on odd sizes (the child of the test below)."""
    lib = ctypes.CDLL(lib_path)
    declare_host_functions(lib)
    run = host_impl(lib, launcher=GuardPageLauncher, block=32, extra_blocks=2)
    rng = np.random.default_rng(0)
    for shape in ((0, 2, 3, 3), (1, 1, 1, 1), (1, 3, 1, 3), (3, 2, 5, 1), (2, 3, 17)):
        gamma, beta = channel_params(rng, shape[1])
        y = bn_output(rng, shape, gamma, beta, special=0.3, nonfinite=0.05)
        for bits in BITS:
            check_paper_gb(run, y, gamma, beta, bits)
            _check_fused_bn(run, rng, y, gamma, beta, bits)
            for group in (1, 3, 8, 13, 2 ** 40):
                for stochastic in (False, True):
                    check_generic(run, y, bits, group, stochastic, 5)
            codes = rng.integers(0, 2 ** bits, y.size).astype(np.uint8)
            assert same(run("pack_bits", codes, bits), R.pack_bits(codes, bits))
            assert same(run("unpack_bits", R.pack_bits(codes, bits), y.size, bits), codes)
        assert same(run("counter_uniform", y.size, 1), R.counter_uniform(y.size, 1))
    print("guard pages: all kernels stayed inside their arrays")


@pytest.mark.parametrize("sub, max_tasks", [(1, 1 << 16), (5, 1 << 16), (32, 3), (7, 2)])
def test_host_generic_any_split_of_a_group_gives_the_same_bytes(host_lib, monkeypatch, sub, max_tasks):
    """The partial min/max tasks (interleaved, capped per group) only change the order of
    an order-independent reduction."""
    monkeypatch.setattr(gpu, "SUB", sub)
    monkeypatch.setattr(gpu, "MAX_SUB_TASKS", max_tasks)
    rng = np.random.default_rng(sub * 100 + max_tasks)
    for n, group in ((1000, 1000), (999, 64), (3001, 300), (50, 7)):
        for kind in ("normal", "zeros", "specials", "nonfinite"):
            check_generic(host_impl(host_lib), generic_input(rng, n, kind), 4, group, kind == "normal", 3)


@pytest.mark.parametrize("sub, max_tasks", [(1, 1 << 16), (5, 1 << 16), (64, 3), (7, 1)])
def test_host_fused_bn_sums_any_split_of_a_channel(host_lib, monkeypatch, sub, max_tasks):
    """The partial BN sums (interleaved tasks per channel, capped) only change the order of a
    float64 sum: every split stays within its rounding bound and gives the formula's gx."""
    monkeypatch.setattr(gpu, "BN_SUB", sub)
    monkeypatch.setattr(gpu, "MAX_SUB_TASKS", max_tasks)
    rng = np.random.default_rng(sub * 100 + max_tasks)
    for shape in ((3, 2, 7, 5), (1, 3, 1, 1), (9, 4), (2, 1, 300)):
        gamma, beta = channel_params(rng, shape[1])
        _check_fused_bn(host_impl(host_lib), rng, bn_output(rng, shape, gamma, beta), gamma, beta, 4)


@pytest.mark.parametrize("block, extra", [(1, 0), (3, 2), (32, 0), (97, 1), (1024, 3)])
def test_host_launch_geometry_does_not_change_bytes(host_lib, block, extra):
    run = host_impl(host_lib, block=block, extra_blocks=extra)
    rng = np.random.default_rng(block)
    gamma, beta = channel_params(rng, 5)
    y = bn_output(rng, (3, 5, 7, 3), gamma, beta, special=0.3, nonfinite=0.05)
    for bits in BITS:
        check_paper_gb(run, y, gamma, beta, bits)
        for group in (1, 5, 64, 400):
            for stochastic in (False, True):
                check_generic(run, y, bits, group, stochastic, 11)
        assert same(run("counter_uniform", 333, 5), R.counter_uniform(333, 5))
        _check_fused_bn(run, rng, bn_output(rng, y.shape, gamma, beta), gamma, beta, bits)


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
    with pytest.raises(ValueError, match="mu must have shape"):
        gpu.bn_apply_pack_with(host, y, k[:2], k, k, k, s, 4)
    with pytest.raises(ValueError, match="float32"):
        gpu.bn_apply_pack_with(host, y.astype(np.float64), k, k, k, k, s, 4)
    with pytest.raises(ValueError, match="packed holds"):
        gpu.bn_backward_codes_with(host, y, np.zeros(3, np.uint8), s, k, k, 4, k)
    with pytest.raises(ValueError, match="scale must have shape"):
        gpu.bn_backward_codes_with(host, y, np.zeros(24, np.uint8), s, k, k, 2, k[:1])
    with pytest.raises(ValueError, match="gy must be float32"):
        gpu.bn_backward_codes_with(host, y.astype(np.float16), np.zeros(24, np.uint8), s, k, k, 2, k)
    assert host.launches == []                                  # checks run before any launch
