"""Optimizers. SGD with momentum (the paper's); more arrive with the training issue."""
from __future__ import annotations

from .backend import array_module


class SGD:
    """v <- momentum * v + (g + wd * w);  w <- w - lr * v   (PyTorch's convention;
    Nesterov: w <- w - lr * (g + wd * w + momentum * v)).

    ``decay="kernels"`` applies weight decay only to parameters with ndim >= 2
    (conv and linear kernels, as in the paper); ``"all"`` to every parameter."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, decay: str = "kernels"):
        if lr <= 0:
            raise ValueError(f"SGD: lr must be positive, got {lr}")
        if decay not in ("kernels", "all"):
            raise ValueError(f"SGD: decay must be 'kernels' or 'all', got {decay!r}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov, self.decay = nesterov, decay
        self.velocity = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay and (self.decay == "all" or p.data.ndim >= 2):
                g = g + self.weight_decay * p.data
            if self.momentum:
                v = self.velocity[i]
                v = g.copy() if v is None else self.momentum * v + g
                self.velocity[i] = v
                g = g + self.momentum * v if self.nesterov else v
            p.data -= (self.lr * g).astype(p.data.dtype, copy=False)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        xp = array_module(self.params[0].data) if self.params else None
        return {"lr": self.lr, "velocity": [None if v is None else xp.asarray(v).copy() for v in self.velocity]}

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]
        self.velocity = [None if v is None else v.copy() for v in state["velocity"]]
