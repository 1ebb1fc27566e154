"""Gradients of one batch under a storage policy, the layers in forward order, the batches."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import ops
from ..backend import on_gpu, to_device
from ..nn.module import Parameter, trace_modules
from ..policy import Exact, Generic, Policy, policy_from_name, storage_policy
from ..tensor import Tensor, no_grad

DEFAULT_POLICIES = ("paper8", "paper4", "naive8", "naive4", "generic2", "generic4", "generic8",
                    "generic2s", "generic4s", "generic8s", "approx4")
INPUT = "<input>"          # the key of the input gradient (``input_grad=True``)


def as_policy(spec, seed: int = 0) -> Policy:
    return policy_from_name(spec, seed=seed) if isinstance(spec, str) else spec


def label_of(spec) -> str:
    return spec if isinstance(spec, str) else repr(spec)


def is_stochastic(spec) -> bool:
    p = as_policy(spec)
    return isinstance(p, Generic) and p.stochastic


def draws_of(spec, repeats: int, seed: int) -> list:
    """The policies of the R draws of ``spec``: R seeds for a stochastic policy, one otherwise."""
    if not is_stochastic(spec):
        return [as_policy(spec, seed)]
    if isinstance(spec, str):
        return [policy_from_name(spec, seed=seed * 1000 + r) for r in range(repeats)]
    return [Generic(spec.bits, spec.group, stochastic=True, seed=spec.seed + seed * 1000 + r) for r in range(repeats)]


def input_tensor(model, x, requires_grad=False) -> Tensor:
    data = x.data if isinstance(x, Tensor) else x
    params = model.parameters()
    if params and on_gpu(params[0].data) and not on_gpu(data):
        data = to_device(data, "gpu")
    return Tensor(data, requires_grad=requires_grad)


def gradients(model, x, y, policy=None, input_grad: bool = False) -> dict:
    """One forward + backward of ``cross_entropy(model(x), y)`` under ``policy``
    (a Policy or a name; default exact) in the model's current mode. Returns
    {parameter name: float64 NumPy gradient} (and ``INPUT``: the gradient with
    respect to x when ``input_grad``). The model's parameters and buffers are
    restored afterwards (the forward pass updates BN running statistics), and
    its ``.grad`` fields cleared."""
    policy = Exact() if policy is None else as_policy(policy)
    state = model.state_dict()
    try:
        model.zero_grad()
        xt = input_tensor(model, x, input_grad)
        with storage_policy(policy):
            loss = ops.cross_entropy(model(xt), y)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else np.zeros(p.shape, np.float32)
            grads[name] = np.asarray(to_device(g, "cpu"), np.float64)
        if input_grad:
            grads[INPUT] = np.asarray(to_device(xt.grad, "cpu"), np.float64)
        return grads
    finally:
        model.load_state_dict(state)
        model.zero_grad()


@dataclasses.dataclass
class Layer:
    depth: int
    module: str
    kind: str            # the module's class name (Conv2d, BatchNorm2d, Linear, ...)
    params: list         # parameter names, in registration order


def layer_order(model, x) -> list:
    """The modules owning parameters, in the order they are first called during
    one forward pass on ``x`` (modules the forward never calls come last, in
    ``named_modules`` order). Runs under ``no_grad``; the model's state is
    restored afterwards."""
    owners = []
    for name, m in model.named_modules():
        own = [f"{name}.{attr}" if name else attr for attr, v in m.__dict__.items() if isinstance(v, Parameter)]
        if own:
            owners.append((name, m, own))
    state = model.state_dict()
    try:
        with no_grad(), trace_modules() as called:
            model(input_tensor(model, x))
    finally:
        model.load_state_dict(state)
    first = {}
    for m in called:
        first.setdefault(id(m), len(first))
    order = sorted(owners, key=lambda e: first.get(id(e[1]), len(first)))   # stable: uncalled keep their order
    return [Layer(depth, name or "-", type(m).__name__, own) for depth, (name, m, own) in enumerate(order)]


def sample_batches(x, y, batch_size: int, count: int, seed: int = 0) -> list:
    """``count`` disjoint minibatches of ``batch_size`` drawn from (x, y) by a
    seeded permutation (with replacement between batches only when the data run
    out). The first one is the studied batch."""
    n = len(y)
    rng = np.random.default_rng([seed, 0x57D])
    idx = np.concatenate([rng.permutation(n) for _ in range(-(-batch_size * count // n))])
    return [(x[idx[i * batch_size:(i + 1) * batch_size]], y[idx[i * batch_size:(i + 1) * batch_size]])
            for i in range(count)]
