"""Whole-model comparison against a PyTorch mirror (shared by the model tests).

The mirror's weights are copied from the npapprox model by state_dict name; a
training forward + backward (logits, loss, every gradient, running statistics)
and an eval forward must agree within float32 tolerances."""
from __future__ import annotations

import numpy as np

from npapprox import Tensor, nn, no_grad, ops


def close(a, b, rtol, atol, what=""):
    """|a - b| <= rtol |b| + atol max|b| (atol relative to the reference's scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = float(np.abs(b).max()) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale + 1e-30, err_msg=what)


def randomise_bn(model, rng):
    """Non-trivial gamma/beta/running stats so that every BN term is exercised."""
    for _, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.channels
            mod.weight.data[...] = rng.uniform(0.5, 1.5, c)
            mod.bias.data[...] = 0.1 * rng.standard_normal(c)
            mod.running_mean[...] = 0.1 * rng.standard_normal(c)
            mod.running_var[...] = rng.uniform(0.5, 1.5, c)
    model.fc.bias.data[...] = 0.1 * rng.standard_normal(model.fc.bias.shape)


def against_torch(torch, model, tmodel, x, classes=10, seed=4):
    """Copy model's weights into tmodel by state_dict name, then compare a training
    forward + backward (logits, loss, every gradient, running statistics) and an eval forward."""
    rng = np.random.default_rng(seed)
    randomise_bn(model, rng)
    sd = model.state_dict()
    tkeys = {k for k in tmodel.state_dict() if not k.endswith("num_batches_tracked")}
    assert tkeys == set(sd), f"structure differs: {sorted(tkeys ^ set(sd))}"
    for k, v in tmodel.state_dict().items():
        if k in sd:
            assert tuple(v.shape) == sd[k].shape, k
    tmodel.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=False)
    model.train()
    tmodel.train()
    labels = rng.integers(0, classes, x.shape[0])

    logits = model(Tensor(x))
    loss = ops.cross_entropy(logits, labels)
    loss.backward()
    tx = torch.from_numpy(x)
    tlogits = tmodel(tx)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels))
    tloss.backward()

    close(logits.data, tlogits.detach().numpy(), 1e-4, 1e-5, "logits")
    close(loss.data, tloss.detach().numpy(), 1e-5, 0, "loss")
    tparams = dict(tmodel.named_parameters())
    assert {n for n, _ in model.named_parameters()} == set(tparams)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        close(p.grad, tparams[name].grad.numpy(), 5e-4, 5e-5, f"gradient of {name}")
    tbuffers = dict(tmodel.named_buffers())
    for name, buf in model.named_buffers():
        close(buf, tbuffers[name].numpy(), 1e-4, 1e-5, f"buffer {name} after one training forward")
    model.eval()
    tmodel.eval()
    with no_grad(), torch.no_grad():
        close(model(Tensor(x)).data, tmodel(tx).numpy(), 1e-4, 1e-5, "eval logits")
