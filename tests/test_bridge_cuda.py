"""The bridge on CUDA tensors: the CUDA kernels reached through CuPy and DLPack
(zero-copy) on torch's current stream. Runs wherever torch sees a CUDA device and
CuPy imports; skips visibly elsewhere.

(a) one unit: the codes of a CUDA tensor are the CPU bridge's bytes (same y: the
    engine's kernels are bit-identical across backends), the mask is exact;
(b) ResNet-20 under Paper(4) on CUDA against the CPU bridge: logits and every
    gradient to float32 tolerance (cuDNN and CPU kernels differ in rounding);
    Exact on CUDA: bit-identical to plain torch on CUDA;
(c) zero copy: the array the kernels see shares the tensor's memory;
(d) ``train --engine torch --device cuda``: a few steps, a checkpoint the CPU resumes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import require_gpu, require_torch

import npapprox as na
from npapprox import checkpoint, cli, kernels
from npapprox.train import CHECKPOINT, TrainConfig, make_trainer
from npapprox.units import PaperUnit

torch = require_torch()
from npapprox import bridge
from npapprox.bridge import storage as bstorage


@pytest.fixture(autouse=True)
def _cuda():
    """The bridge's CUDA path needs torch's CUDA and CuPy (``require_gpu``: a broken CuPy fails)."""
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    require_gpu()
F = torch.nn.functional


def test_zero_copy_views():
    t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    a = bstorage.as_array(t)
    assert a.data.ptr == t.data_ptr()
    assert bstorage.as_tensor(a).data_ptr() == t.data_ptr()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unit_codes_on_cuda_are_the_cpu_bytes(bits):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((4, 8, 6, 6)).astype(np.float32)
    gamma = np.array([1.3, -0.7, 0.0, 0.2, 0.1, 1e-40, 0.8, 1.1], np.float32)
    beta = np.array([0.1, 0.3, 0.5, 1.0, -0.5, 0.2, 0.0, -0.2], np.float32)
    units = {}
    for dev in ("cpu", "cuda"):
        args = [torch.from_numpy(a).to(dev) for a in (y, y, np.zeros(8, np.float32), np.ones(8, np.float32),
                                                      gamma, beta)]
        units[dev] = bstorage._store_unit(na.Paper(bits), args[0], args[1], args[2], args[3], args[4], args[5], 1e-5)
        torch.cuda.synchronize()
    assert bytes(units["cuda"].packed.get()) == units["cpu"].packed.tobytes()
    assert np.array_equal(units["cuda"].mask().get(), y > 0)


@pytest.mark.parametrize("policy", [na.Paper(4), na.Exact()], ids=repr)
def test_resnet20_on_cuda_against_the_cpu(policy):
    na.nn.manual_seed(0)
    cpu = bridge.to_torch(na.nn.preact_resnet20())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 8))
    results = {}
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(cpu).to(dev)
        with bstorage.record() as saved, bridge.storage_policy(policy):
            out = m(x.to(dev))
            loss = F.cross_entropy(out, y.to(dev))
        loss.backward()
        results[dev] = out.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}, saved
    (lc, gc, sc), (lg, gg, sg) = results["cpu"], results["cuda"]
    torch.testing.assert_close(lg, lc, rtol=1e-4, atol=1e-4)
    for n in gc:
        scale = float(gc[n].abs().max())
        torch.testing.assert_close(gg[n], gc[n], rtol=0, atol=5e-2 * scale if isinstance(policy, na.Paper)
                                   else 1e-3 * scale, msg=n)
    assert [(e.form, e.payload) for e, _ in sg] == [(e.form, e.payload) for e, _ in sc]
    units = [s for _, s in sg if isinstance(s, PaperUnit)]
    assert len(units) == (18 if isinstance(policy, na.Paper) else 0)
    assert all(kernels.implementation(u.packed) == "gpu" for u in units)   # packed on the device, by quant.cu
    if isinstance(policy, na.Exact):   # the bridge's exact path is torch's own kernels, on CUDA too
        m = copy.deepcopy(cpu).to("cuda")
        out = m(x.cuda())
        F.cross_entropy(out, y.cuda()).backward()
        assert torch.equal(out.detach().cpu(), lg)


def test_torch_engine_trains_on_cuda_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    """``npapprox train --engine torch --device cuda``: 3 steps under Paper(4) (the
    optimizer on CuPy views of the CUDA tensors); the same activation bytes as the
    CPU run, a measured peak, and a checkpoint the CPU trainer resumes."""

    args = ["train", "--engine", "torch", "--model", "resnet8", "--width", "4", "--batch-size", "16",
            "--policy", "paper4", "--iterations", "3", "--quiet"]
    rows = {}
    for device in ("cuda", "cpu"):
        assert cli.main([*args, "--device", device, "--out", str(tmp_path / device)]) == 0
        rows[device] = checkpoint.load(tmp_path / device / CHECKPOINT)[1]["history"][-1]
    assert rows["cuda"]["iteration"] == 3 and rows["cuda"]["peak_bytes"] > 0
    assert rows["cuda"]["stored_bytes"] == rows["cpu"]["stored_bytes"]
    assert abs(rows["cuda"]["train_loss"] - rows["cpu"]["train_loss"]) < 1e-2 * abs(rows["cpu"]["train_loss"])
    cfg = TrainConfig(model="resnet8", width=4, batch_size=16, policy="paper4", iterations=3, engine="torch",
                      out=str(tmp_path / "cuda"))
    t = make_trainer(cfg, progress=False, log=lambda *_: None)     # on the CPU: --device may change on resume
    t.resume()
    assert t.iteration == 3
