"""npapprox: backprop with approximate activations, a from-scratch reference.

Start reading at ``tensor.py`` (the backward walk), ``function.py`` (the op
protocol), ``policy.py`` (how saved activations are stored) and ``ops/``.
"""
import os
import sys


def _torch_engine_command(argv) -> bool:
    """The command line runs the PyTorch engine (``--engine torch`` / ``--engine=torch``)."""
    pairs = zip(argv, list(argv[1:]) + [""], strict=True)
    return any(a == "--engine=torch" or (a == "--engine" and b == "torch") for a, b in pairs)


# The compiled kernels use OpenMP and NumPy's BLAS has its own thread pool. With
# OpenMP's default (spinning) wait policy the two pools take turns spinning on the
# same cores and every hand-over stalls: convolutions ran 3x slower. Set before
# the extensions load libgomp; an explicit user setting wins. Not for a
# ``--engine torch`` command: there torch's OpenMP threads do the work (npapprox's
# kernels run on them too, docs/bridge.md) and sleeping between ops made torch
# 1.45x slower.
if not _torch_engine_command(sys.argv):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._malloc import reuse_freed_memory

# Freed activation-sized blocks stay in the heap for the next array instead of
# page-faulting back in (glibc only; NPAPPROX_MALLOC=default opts out; _malloc.py).
reuse_freed_memory()

from . import nn, ops, optim
from .function import Context, Function
from .ledger import ledger
from .peak import measure_peak
from .policy import ApproxForward, Exact, Generic, Naive, Paper, Policy, current_policy, storage_policy
from .tensor import Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["ApproxForward", "Context", "Exact", "Function", "Generic", "Naive", "Paper", "Policy", "Tensor",
           "current_policy", "ledger", "measure_peak", "nn", "no_grad", "ops", "optim", "storage_policy"]
