"""The GPU code paths that can be checked without a GPU (issue 16, part 1).

* backend: how CuPy is imported and probed -- a CuPy that fails to import, one that
  warns while importing (pytest turns warnings into errors), one without a device,
  one that cannot compile a kernel (CuPy 14 without the CUDA headers) -- and the
  reasons shown in skips and errors;
* device-to-host syncs per training step, counted with a CuPy stand-in
  (``tests/fake_device.py``) while the CUDA kernels run through their host build;
* the convolution's chunk plan on each backend, im2row as one strided copy;
* kernels launched in the arrays' device context; ``peak.PeakProbe`` left clean when
  a measured step raises.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import sys
import textwrap
import tracemalloc
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import erf

import npapprox.kernels as K
from npapprox import backend, checks, cli, ops, quant
from npapprox import peak as peak_module
from npapprox.kernels import bn as BN
from npapprox.kernels import gpu
from npapprox.kernels import im2col as IM
from npapprox.ops import conv
from npapprox.policy import Generic
from npapprox.quant import paper_params
from npapprox.tensor import Tensor
from npapprox.train import NonFiniteLoss, TrainConfig, Trainer

import fake_device as FD
from support import HostLauncher

F32 = np.float32


# --------------------------------------------------------------------------- #
# backend: import and probe
# --------------------------------------------------------------------------- #
@pytest.fixture
def fresh_backend(monkeypatch):
    """The backend as if nothing had been tried yet (restored after the test)."""
    for name, value in (("_cupy", None), ("_cupy_tried", False), ("_cupy_error", None), ("_gpu_state", None)):
        monkeypatch.setattr(backend, name, value)
    for mod in [m for m in sys.modules if m == "cupy" or m.startswith(("cupy.", "cupyx"))]:
        monkeypatch.delitem(sys.modules, mod)
    return monkeypatch


@contextlib.contextmanager
def _warnings_as_errors():
    """What pytest's ``filterwarnings = error`` does (a warning raises), recording what is shown."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("error")
        yield log


def _package(tmp_path, monkeypatch, files: dict):
    """Install a fake package tree (``{"cupy/__init__.py": source}``) first on sys.path."""
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def test_cupy_that_fails_to_import_is_reported_not_swallowed(fresh_backend, tmp_path, capsys):
    _package(tmp_path, fresh_backend,
             {"cupy/__init__.py": 'raise OSError("libcudart.so.13: cannot open shared object file")\n'})
    status = backend.gpu_status()
    assert (status.available, status.kind, status.broken) == (False, "import-failed", True)
    assert "libcudart.so.13: cannot open shared object file" in status.reason and "OSError" in status.reason
    assert not backend.gpu_available()
    with pytest.raises(backend.DeviceError, match="libcudart.so.13") as info:
        backend.cupy()
    assert isinstance(info.value.__cause__, OSError)                 # the import's exception, kept
    with pytest.raises(backend.DeviceError, match="needs CuPy.*libcudart.so.13"):
        backend.to_device(np.zeros(3, F32), "gpu")
    # the error --device gpu gives: one line, exit status 2, with the reason
    assert cli.main(["train", "--device", "gpu", "--iterations", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs CuPy" in err and "libcudart.so.13" in err and "Traceback" not in err


def test_cupy_that_warns_while_importing_still_imports(fresh_backend, tmp_path):
    """Under filterwarnings = error a warning during ``import cupy`` would become the
    import's exception; the backend imports with warnings left as warnings."""
    _package(tmp_path, fresh_backend, {"cupy/__init__.py": """
        import types, warnings
        warnings.warn("this CUDA driver is old", DeprecationWarning)
        class ndarray:
            pass
        def _count():
            return 0
        cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=_count))
        """})
    with _warnings_as_errors() as shown:
        status = backend.gpu_status()
    assert [str(w.message) for w in shown] == ["this CUDA driver is old"]        # shown, not raised
    assert backend._cupy is not None and backend._cupy.__name__ == "cupy"
    assert (status.available, status.kind, status.broken) == (False, "no-device", False)
    assert "0 devices" in status.reason


def _stub_cupy(elementwise=None, devices=1, raw_result=1.0):
    """A module with what ``backend._probe`` uses; counts the kernels it builds."""
    cp = types.ModuleType("cupy")
    cp.built = []
    cp.ndarray = type("ndarray", (), {})
    cp.float32 = np.float32
    cp.arange = np.arange
    cp.asnumpy = np.asarray

    def count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))

    def ElementwiseKernel(in_params, out_params, operation, name):
        cp.built.append(name)
        if elementwise is not None:
            raise elementwise
        return lambda x: x + x

    class RawKernel:
        def __init__(self, code, name):
            cp.built.append(name)

        def __call__(self, grid, block, args):
            args[0][:block[0]] += F32(raw_result)

    cp.ElementwiseKernel, cp.RawKernel = ElementwiseKernel, RawKernel
    return cp


def test_gpu_available_means_a_kernel_compiled_and_ran(fresh_backend):
    cp = _stub_cupy()
    fresh_backend.setitem(sys.modules, "cupy", cp)
    assert backend.gpu_available() and backend.gpu_status().kind == "ok"
    assert backend.gpu_available()                       # cached: the probe ran once
    assert cp.built == ["npapprox_probe_double", "npapprox_probe_inc"]


@pytest.mark.parametrize("cp, kind, words", [
    (_stub_cupy(elementwise=RuntimeError("Failed to find CUDA headers (CUDA_PATH)")), "probe-failed",
     "Failed to find CUDA headers"),
    (_stub_cupy(raw_result=0.0), "probe-failed", "probe kernels computed"),
    (_stub_cupy(devices=0), "no-device", "0 devices"),
    (_stub_cupy(devices=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")), "no-device",
     "cudaErrorNoDevice"),
], ids=["no-headers", "wrong-result", "zero-devices", "no-driver"])
def test_gpu_status_keeps_the_failure_reason(fresh_backend, cp, kind, words):
    fresh_backend.setitem(sys.modules, "cupy", cp)
    status = backend.gpu_status()
    assert not status.available and status.kind == kind and words in status.reason
    assert status.broken == (kind == "probe-failed")
    built = list(cp.built)
    assert backend.gpu_status() is status and cp.built == built      # cached with its reason


def test_lazy_cupyx_import_fails_clearly_and_tolerates_warnings(fresh_backend, tmp_path, monkeypatch):
    fake = FD.install(monkeypatch)
    x = fake.asarray(np.float32([0.0, 0.5, -1.0]))
    monkeypatch.setitem(sys.modules, "cupyx", None)                 # "import cupyx" raises ImportError
    with pytest.raises(backend.DeviceError, match="cupyx.scipy.special"):
        backend.erf(x)
    monkeypatch.delitem(sys.modules, "cupyx")
    _package(tmp_path, monkeypatch, {"cupyx/__init__.py": "", "cupyx/scipy/__init__.py": "",
                                     "cupyx/scipy/special.py": """
        import warnings
        from scipy.special import erf as _erf
        warnings.warn("cupyx.scipy.special: experimental", FutureWarning)
        def erf(x):
            return _erf(x)
        """})
    with _warnings_as_errors() as shown:
        got = backend.erf(x)
    assert [str(w.message) for w in shown] == ["cupyx.scipy.special: experimental"]
    assert np.allclose(np.asarray(got), erf(np.float32([0.0, 0.5, -1.0])))


# --------------------------------------------------------------------------- #
# syncs per step (a CuPy stand-in that counts read-backs)
# --------------------------------------------------------------------------- #
class FakeDeviceLauncher(HostLauncher):
    """gpu.py's launcher on DeviceArrays: the host build of quant.cu, no counted reads."""

    def __init__(self, lib, xp):
        super().__init__(lib)
        self.xp = xp

    def asarray(self, a):
        return self.xp.asarray(a)

    def launch(self, name, threads, *args):
        assert FD._DEVICE.active, f"{name} launched outside its arrays' device context"
        args = [a.view(np.ndarray) if isinstance(a, FD.DeviceArray) else a for a in args]
        return super().launch(name, threads, *args)


@pytest.fixture
def device(monkeypatch, host_lib):
    fake = FD.install(monkeypatch)
    monkeypatch.setattr(gpu, "_launcher", lambda: FakeDeviceLauncher(host_lib, fake))
    checks._pending.clear()
    yield fake
    checks._pending.clear()


def _trainer(policy, model="resnet8"):
    cfg = TrainConfig(model=model, width=4, data="digits", batch_size=32, policy=policy, iterations=3,
                      device="gpu", lr=0.05)
    return Trainer(cfg, progress=False, log=lambda *a: None)


def _syncs_of_a_step(t, xb, yb):
    t.step(xb, yb)                                       # warm-up
    FD.reset()
    value, right = t.step(xb, yb)
    return FD.total(), value, right


def test_kernels_see_device_arrays_and_run_in_their_device_context(device):
    y = device.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(F32))
    assert K.implementation(y) == "gpu"
    entered = FD._DEVICE.entered
    packed, nf = K.paper_pack(y, device.asarray(np.ones(3, F32)), device.asarray(np.int32([8, 8, 8])), 4)
    assert FD._DEVICE.entered == entered + 1 and FD._DEVICE.active == 0
    assert isinstance(packed, FD.DeviceArray) and isinstance(nf, FD.DeviceArray)   # the count stays on the device


def test_bn_backward_of_device_codes_launches_the_fused_pass_and_decodes_nothing(device, host_lib, monkeypatch):
    """A paper unit's BN backward on device arrays runs quant.cu's fused pass (partial sums,
    per-channel sums, gx) straight from the codes: no decoder runs, nothing is read back,
    and the result is the CPU's (the Cython fused pass) up to the sums' rounding."""
    launches = []

    class Recording(FakeDeviceLauncher):
        def launch(self, name, threads, *args):
            launches.append(name)
            return super().launch(name, threads, *args)

    monkeypatch.setattr(gpu, "_launcher", lambda: Recording(host_lib, device))
    rng = np.random.default_rng(4)
    shape = (3, 4, 5, 5)
    gamma, beta = np.float32([1.2, -0.6, 0.0, 2.0]), np.float32([0.1, 0.5, 1.0, -7.0])
    p = paper_params(gamma, beta, 4)
    y = (rng.standard_normal(shape) * gamma[:, None, None] + beta[:, None, None]).astype(F32)
    packed, _ = K.reference.paper_pack(y, p["k"], p["s"], 4)
    gy, inv_sigma = rng.standard_normal(shape).astype(F32), np.float32([0.5, 1.0, 2.0, 3.0])
    codes = (packed, shape, p["s"], p["x_step"], p["x_off"], 4)
    on_device = BN.BNSource(None, codes=tuple(device.asarray(a) if isinstance(a, np.ndarray) else a for a in codes))
    FD.reset()
    got = BN.bn_backward(BN.as_ncm(device.asarray(gy)), on_device, device.asarray(gamma), device.asarray(inv_sigma))
    assert launches == ["npx_bn_codes_sums", "npx_bn_codes_finish", "npx_bn_codes_grad"]
    assert FD.total() == 0 and all(isinstance(a, FD.DeviceArray) for a in got)
    want = BN.bn_backward(BN.as_ncm(gy), BN.BNSource(None, codes=codes), gamma, inv_sigma)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))


@pytest.mark.parametrize("policy", ["exact", "paper4", "generic4"])
def test_a_training_step_reads_back_twice_plus_once_per_paper_unit(device, monkeypatch, policy):
    """Before issue 16 a ResNet-8 step read back 5 (exact), 61 (paper4) and 19 (generic4)
    times: s's range at every paper pack/decode/mask (2 each), the non-finite count of
    every pack, isfinite(scale) of every generic pack, the labels' range (2), the loss
    (twice), the predictions. Now: backward's one check of the pending non-finite counts
    (the loss among them) and one read of loss and predictions; a paper unit adds one
    read of its gamma and beta (its parameters are computed on the host)."""
    t = _trainer(policy)
    xb, yb = t.data.x_train[:32], t.data.y_train[:32]
    units = []
    real = quant.paper_params
    monkeypatch.setattr(quant, "paper_params", lambda g, *a: (backend.on_gpu(g) and units.append(1)) or real(g, *a))
    n, value, right = _syncs_of_a_step(t, xb, yb)
    assert len(units) == (12 if policy == "paper4" else 0)     # the 6 BN -> ReLU units of ResNet-8, 2 steps
    assert n == 2 + len(units) // 2, dict(FD.SYNCS)
    assert np.isfinite(value) and 0 <= right <= 32 and checks.pending() == 0


def test_paper_parameters_of_device_gamma_are_the_host_bytes(device):
    """Computed on the host (CuPy's float64 -> float32 casts would flush the subnormal
    k / h_step of extreme gamma): one read-back of gamma and beta, one upload."""
    gamma = np.float32([1e-38, 3e-39, -1e-45, 1e38, 1.0, 0.0, -2.0])
    beta = np.float32([1e-38, -1e-39, 0.0, 1e38, 2.5, 1.0, 0.5])
    for bits in (1, 4, 8):
        host = paper_params(gamma, beta, bits)
        assert ((host["h_step"] > 0) & (host["h_step"] < np.finfo(F32).tiny)).any()       # subnormals kept
        dg, db = device.asarray(gamma), device.asarray(beta)
        FD.reset()
        got = paper_params(dg, db, bits)
        assert FD.total() == 1 and FD.UPLOADS[0] == 1, (dict(FD.SYNCS), FD.UPLOADS)
        assert set(got) == set(host)
        for key, v in host.items():
            assert isinstance(got[key], FD.DeviceArray) and got[key].dtype == v.dtype
            assert np.asarray(got[key]).tobytes() == v.tobytes(), key


def test_max_pool_argmax_has_no_boolean_mask_write(device):
    x = Tensor(device.asarray(np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(F32)),
               requires_grad=True)
    FD.reset()
    ops.max_pool2d(x, 3, 2, 1).sum().backward()
    assert FD.total() == 1, dict(FD.SYNCS)               # backward's check of the loss, nothing else


def test_nonfinite_activations_on_the_device_are_reported_at_the_end_of_backward(device):
    t = _trainer("paper4")
    xb, yb = t.data.x_train[:32].copy(), t.data.y_train[:32]
    xb[3, 0, 2, 2] = np.nan
    before = {n: np.asarray(p.data).copy() for n, p in t.model.named_parameters()}
    FD.reset()
    with pytest.raises(NonFiniteLoss, match="the loss is nan"):
        t.step(xb, yb)
    assert checks.pending() == 0
    assert all(np.array_equal(np.asarray(p.data), before[n]) for n, p in t.model.named_parameters())
    # a pack on the device does not raise; the pending count does, at the next flush (end of backward)
    ctx = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="ReLU"))
    Generic(4).pack(ctx, "h", device.asarray(np.float32([1.0, np.inf, 2.0, -np.inf])))
    Generic(4).pack(ctx, "g", device.asarray(np.float32([3e38, -3e38])))          # range wider than float32
    assert checks.pending() == 4                         # (non-finite, range) per pack
    with pytest.raises(FloatingPointError, match="ReLU: 2 non-finite value.s. in the activation 'h'"):
        checks.flush()
    Generic(4).pack(ctx, "g", device.asarray(np.float32([3e38, -3e38])))
    with pytest.raises(FloatingPointError, match="'g' spans a range wider than float32"):
        checks.flush()


def test_host_counts_raise_at_once_and_device_counts_are_read_back_once(device):
    with pytest.raises(FloatingPointError, match="3 bad"):
        checks.nonfinite(3, lambda n: f"{n} bad")
    checks.nonfinite(0, lambda n: "never")
    for v in (0, 0, 5, 7):
        checks.nonfinite(device.asarray(np.int64(v)), lambda n: f"{n} bad on the device")
    assert checks.pending() == 4
    FD.reset()
    with pytest.raises(FloatingPointError, match="^5 bad on the device$"):
        checks.flush()
    assert FD.total() == 1 and checks.pending() == 0
    checks.flush()                                       # nothing pending: no read-back
    assert FD.total() == 1


# --------------------------------------------------------------------------- #
# convolution chunks, im2row
# --------------------------------------------------------------------------- #
def test_conv_chunk_plan_per_backend(monkeypatch):
    fake = FD.FakeCupy()
    # ResNet-20's widest 3x3 conv at batch 128: 32x32 positions, K = 9*16 (576 KiB of rows per sample)
    shares, m = conv.chunk_plan(128, 1024, 144, 4, fake)
    assert shares == [[slice(0, 128)]] and m == 128 * 1024                # one chunk: one im2row, one GEMM
    shares, m = conv.chunk_plan(128, 1024, 144, 4, np)                        # CPU: 2 MiB chunks of 3 samples
    flat = [s for share in shares for s in share]
    assert m == 3 * 1024 and {s.stop - s.start for s in flat} <= {2, 3} and flat[-1].stop == 128
    assert len({len(share) for share in shares}) == 1                          # as many chunks per worker
    # a batch whose rows exceed the device budget is split into bounded chunks
    monkeypatch.setattr(conv, "GPU_CHUNK_BYTES", 10 * 1024 * 144 * 4)
    shares, m = conv.chunk_plan(128, 1024, 144, 4, fake)
    flat = [s for share in shares for s in share]
    assert all(s.stop - s.start <= 10 for s in flat) and flat[0].start == 0 and flat[-1].stop == 128
    assert m == 10 * 1024


def test_im2row_reference_is_one_strided_copy_of_any_view():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((3, 4, 9, 11)).astype(F32)
    for x in (base, base[:, ::-1, :, ::2], base.transpose(0, 1, 3, 2)):
        for kh, kw, stride, pad in ((3, 3, 1, 1), (3, 2, 2, 0), (1, 1, 2, 0), (5, 3, 3, 2)):
            want = IM.im2row(np.ascontiguousarray(x), kh, kw, stride, pad)      # compiled (independent code)
            got = IM.im2row_reference(x, kh, kw, stride, pad)
            assert got.dtype == want.dtype and np.array_equal(got, want)


# --------------------------------------------------------------------------- #
# PeakProbe
# --------------------------------------------------------------------------- #
def _failing_run(t, monkeypatch):
    def boom(xb, yb):
        raise RuntimeError("step failed")
    monkeypatch.setattr(t, "step", boom)
    monkeypatch.setattr(t, "stored_bytes", lambda: 0)
    with pytest.raises(RuntimeError, match="step failed"):
        t.run()


def test_peak_probe_stops_tracing_when_the_step_raises(monkeypatch):
    t = Trainer(TrainConfig(model="resnet8", width=4, data="digits", iterations=2), progress=False)
    _failing_run(t, monkeypatch)
    assert not tracemalloc.is_tracing()


def test_peak_probe_removes_the_gpu_memory_hook_when_the_step_raises(device, monkeypatch):
    events = []

    class Hook:
        def __enter__(self):
            events.append("enter")
            return types.SimpleNamespace(peak=0)

        def __exit__(self, *exc):
            events.append("exit")

    monkeypatch.setattr(peak_module, "gpu_memory_peak", Hook)
    _failing_run(_trainer("exact"), monkeypatch)
    assert events == ["enter", "exit"]


def test_the_gpu_extra_brings_nvrtc_and_the_cuda_headers():
    """CuPy 14 compiles every kernel with NVRTC and the CUDA runtime headers; its [ctk]
    extra installs them (cuda-toolkit[cudart,nvrtc,...]) -- without it gpu_available()
    would be False on a machine with a GPU ("Failed to find CUDA headers")."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r"^gpu = (.*)$", extras, re.M) == ['["cupy-cuda13x[ctk]"]']
