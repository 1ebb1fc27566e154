"""npapprox models as torch modules and back, with the same names.

``to_torch(model)`` walks the npapprox module tree and builds, for each module,
the bridge class of the same name below: parameters and buffers are copied
(float32 tensors), sub-modules converted, and every other attribute (stride,
shortcut kind, activation, a ``storage`` policy override, ...) copied as is, in
the original order, so that ``from_torch`` rebuilds the same npapprox model.
Each bridge class's ``run`` is its npapprox twin's ``forward`` written with
torch ops (the same ops as the independent mirror ``tests/torch_models.py``);
inside ``npapprox.bridge.storage_policy`` the BN -> ReLU units and the
non-overlapping average pools become the bridge's autograd Functions
(``npapprox.bridge.storage``), and every other saved tensor follows the policy.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .. import nn
from ..backend import to_device
from ..nn.module import Module, Parameter
from ..nn.resnet import shortcut
from . import storage


class BridgeModule(torch.nn.Module):
    """Base: ``forward`` runs ``run`` with the module's name and ``storage``
    override in force (``storage.module_scope``)."""

    storage = None

    def forward(self, *args):
        with storage.module_scope(self):
            return self.run(*args)

    def run(self, *args):
        raise NotImplementedError


class Conv2d(BridgeModule):
    def run(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class BatchNorm2d(BridgeModule):
    def run(self, x):
        return storage.batch_norm(self, x)


class Linear(BridgeModule):
    def run(self, x):
        return F.linear(x, self.weight, self.bias)


class AvgPool2d(BridgeModule):
    def run(self, x):
        return storage.avg_pool2d(x, self.kernel, self.stride)


class MaxPool2d(BridgeModule):
    def run(self, x):
        return storage.max_pool2d(x, self.kernel, self.stride, self.padding)


class Sequential(BridgeModule):
    def run(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}


def _unit(owner, bn, x):
    """act(bn(x)), as ``npapprox.nn.resnet._unit``: the activation runs under the BN's override."""
    h = bn(x)
    if owner.activation == "relu":
        return h
    with storage.module_scope(bn):
        return ACTIVATIONS[owner.activation](h)


def _shortcut(block, x, h):
    """The engine's shortcut (``nn.resnet.shortcut``) on torch's pool and pad."""
    return shortcut(block, x, h, storage.avg_pool2d, lambda t, a, b: F.pad(t, (0, 0, 0, 0, a, b)))


class PreActBlock(BridgeModule):
    def run(self, x):
        h = _unit(self, self.bn1, x)
        out = self.conv2(_unit(self, self.bn2, self.conv1(h)))
        return out + _shortcut(self, x, h)


class PreActBottleneck(BridgeModule):
    def run(self, x):
        h = _unit(self, self.bn1, x)
        out = self.conv3(_unit(self, self.bn3, self.conv2(_unit(self, self.bn2, self.conv1(h)))))
        return out + _shortcut(self, x, h)


class PreActResNet(BridgeModule):
    def run(self, x):
        h = self.blocks(self.conv(x))
        return self.fc(_unit(self, self.bn, h).mean(dim=(2, 3)))


class VGG(BridgeModule):
    def run(self, x):
        h = self.features(x)
        return self.fc(h.mean(dim=(2, 3)) if self.classifier == "avg" else h.flatten(1))


class DenseLayer(BridgeModule):
    def run(self, *features):
        x = features[0] if len(features) == 1 else torch.cat(features, 1)
        h = self.conv1(self.bn1(x))
        return self.conv2(self.bn2(h)) if self.bottleneck else h


class DenseBlock(BridgeModule):
    def run(self, x):
        features = [x]
        for i in range(self.n):
            features.append(getattr(self, f"layer{i + 1}")(*features))
        return torch.cat(features, 1)


class Transition(BridgeModule):
    def run(self, x):
        return storage.avg_pool2d(self.conv(self.bn(x)), 2)


class DenseNet(BridgeModule):
    def run(self, x):
        h = self.trans1(self.block1(self.conv(x)))
        h = self.block3(self.trans2(self.block2(h)))
        return self.fc(self.bn(h).mean(dim=(2, 3)))


def _stateless(np_cls, fn):
    return type(np_cls.__name__, (BridgeModule,), {"run": lambda self, x: fn(x), "__module__": __name__})


#: npapprox class -> bridge class
PAIRS = {nn.Conv2d: Conv2d, nn.BatchNorm2d: BatchNorm2d, nn.Linear: Linear, nn.AvgPool2d: AvgPool2d,
         nn.MaxPool2d: MaxPool2d, nn.Sequential: Sequential, nn.PreActBlock: PreActBlock,
         nn.PreActBottleneck: PreActBottleneck, nn.PreActResNet: PreActResNet, nn.VGG: VGG,
         nn.DenseLayer: DenseLayer, nn.DenseBlock: DenseBlock, nn.Transition: Transition, nn.DenseNet: DenseNet}
for _np_cls, _fn in ((nn.ReLU, F.relu), (nn.Sigmoid, torch.sigmoid), (nn.Tanh, torch.tanh), (nn.GELU, F.gelu),
                     (nn.Flatten, lambda x: x.flatten(1)), (nn.GlobalAvgPool2d, lambda x: x.mean(dim=(2, 3))),
                     (nn.Identity, lambda x: x)):
    PAIRS[_np_cls] = _stateless(_np_cls, _fn)
    globals()[_np_cls.__name__] = PAIRS[_np_cls]   # picklable by name (torch.save, spawn)
BACK = {t: n for n, t in PAIRS.items()}
_SKIP = ("_buffers", "training")


def to_torch(model: Module) -> torch.nn.Module:
    """``model`` as an equivalent torch module: same parameter and buffer names
    and values (copies), same training mode and storage overrides."""
    def convert(m, name):
        cls = PAIRS.get(type(m))
        if cls is None:
            raise TypeError(f"to_torch: cannot convert module {name or '(root)'!r} of type "
                            f"{type(m).__module__}.{type(m).__qualname__}; supported: "
                            f"{', '.join(sorted(c.__name__ for c in PAIRS))}")
        t = cls()
        t._bridge_name, t._np_order = name or type(m).__name__, []
        for key, v in m.__dict__.items():
            if key in _SKIP:
                continue
            t._np_order.append(key)
            if isinstance(v, Parameter):
                t.register_parameter(key, torch.nn.Parameter(torch.from_numpy(to_device(v.data, "cpu").copy())))
            elif isinstance(v, Module):
                t.add_module(key, convert(v, f"{name}.{key}" if name else key))
            elif key in m._buffers:
                t.register_buffer(key, torch.from_numpy(to_device(v, "cpu").copy()))
            else:
                setattr(t, key, copy.deepcopy(v))
        t.train(m.training)
        return t

    return convert(model, "")


def from_torch(module: torch.nn.Module) -> Module:
    """The npapprox model that ``to_torch`` made ``module`` from, with ``module``'s
    current parameters, buffers, training mode and storage overrides."""
    def convert(t, name):
        cls = BACK.get(type(t))
        if cls is None or not hasattr(t, "_np_order"):
            raise TypeError(f"from_torch: module {name or '(root)'!r} ({type(t).__name__}) was not made by "
                            "npapprox.bridge.to_torch; convert a model built with npapprox.nn")
        m = cls.__new__(cls)
        Module.__init__(m)
        for key in t._np_order:
            if key in t._parameters and t._parameters[key] is not None:
                setattr(m, key, Parameter(t._parameters[key].detach().cpu().numpy().copy()))
            elif key in t._modules:
                setattr(m, key, convert(t._modules[key], f"{name}.{key}" if name else key))
            elif key in t._buffers:
                m.register_buffer(key, t._buffers[key].detach().cpu().numpy().copy())
            else:
                setattr(m, key, copy.deepcopy(getattr(t, key)))
        object.__setattr__(m, "training", t.training)
        return m

    return convert(module, "")


def state_dict_to_arrays(state: dict) -> dict:
    """A torch state dict as NumPy arrays under the same names (copies; torch's
    ``num_batches_tracked`` counters, which npapprox has no use for, dropped):
    what ``npapprox.nn.Module.load_state_dict`` takes."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def arrays_to_state_dict(arrays: dict) -> dict:
    """NumPy arrays (an npapprox ``state_dict``) as torch tensors under the same names (copies)."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
