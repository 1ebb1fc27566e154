"""npapprox: backprop with approximate activations, a from-scratch reference.

Start reading at ``tensor.py`` (the backward walk), ``function.py`` (the op
protocol), ``policy.py`` (how saved activations are stored) and ``ops/``.
"""
from . import nn, ops, optim
from .function import Context, Function
from .policy import Exact, Policy, current_policy, storage_policy
from .tensor import Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["Context", "Exact", "Function", "Policy", "Tensor", "current_policy", "nn", "no_grad",
           "ops", "optim", "storage_policy"]
