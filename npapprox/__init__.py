"""npapprox: backprop with approximate activations, a from-scratch reference.

Start reading at ``tensor.py`` (the backward walk), ``function.py`` (the op
protocol), ``policy.py`` (how saved activations are stored) and ``ops/``.
"""
from . import nn, ops, optim
from .function import Context, Function
from .policy import ApproxForward, Exact, Generic, Naive, Paper, Policy, current_policy, storage_policy
from .report import ledger, measure_peak
from .tensor import Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["ApproxForward", "Context", "Exact", "Function", "Generic", "Naive", "Paper", "Policy", "Tensor",
           "current_policy", "ledger", "measure_peak", "nn", "no_grad", "ops", "optim", "storage_policy"]
