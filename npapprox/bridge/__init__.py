"""PyTorch bridge: npapprox's storage policies, quantizers and kernels applied
to PyTorch models (docs/bridge.md).

* ``to_torch(model)`` / ``from_torch(module)``: an npapprox model (pre-activation
  ResNets, VGG, DenseNet-BC) as an equivalent ``torch.nn.Module`` with the same
  parameter and buffer names, and back; ``state_dict_to_arrays`` /
  ``arrays_to_state_dict`` convert state dicts by name.
* ``storage_policy(policy)``: inside it, every torch forward keeps for backward
  what the engine keeps under the same policy object (``npapprox.Paper(4)``,
  ``Generic(...)``, ``Exact()``): K-bit codes per BN -> ReLU unit, references
  for the convs that read a unit, the policy's fallback for other activations.
* ``ledger(module, x, labels, policy)``: every saved entry, as ``npapprox.ledger``.
* ``npapprox.bridge.ddp``: multi-process data parallel training (gloo / NCCL).

PyTorch is optional for npapprox; this subpackage is the only place that needs it.
"""
try:
    import torch  # noqa: F401  (imported only to fail here, naming the extra)
except ImportError:
    raise ImportError("npapprox.bridge needs PyTorch: pip install 'npapprox[torch]'") from None

from .modules import arrays_to_state_dict, from_torch, state_dict_to_arrays, to_torch
from .storage import current_policy, ledger, storage_policy

__all__ = ["arrays_to_state_dict", "current_policy", "from_torch", "ledger", "state_dict_to_arrays",
           "storage_policy", "to_torch"]
