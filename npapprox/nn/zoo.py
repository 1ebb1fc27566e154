"""Models by name, for the command line and the training loop.

======================  ============================================  ==================
name                    network                                       ``width`` means
======================  ============================================  ==================
resnet8 .. resnet110    pre-activation ResNet, basic blocks, 6n + 2   first-stage channels (16)
resnet164               pre-activation ResNet, bottleneck, 9n + 2     first-stage width (16; x4 out)
vgg11, vgg16            VGG with BN, 5 max-pools                      first-stage channels (64;
                                                                      all stages scale with it)
densenet40, densenet100 DenseNet-BC (compression 0.5)                 growth rate k (12)
======================  ============================================  ==================

Input sizes: ResNets and DenseNets need H and W divisible by 4, VGGs by 32.
"""
from __future__ import annotations

import numpy as np

from .densenet import DenseNet
from .models import PreActResNet
from .vgg import VGG, VGG_CONFIGS, _size_pair

_RESNETS = {"resnet8": (8, "basic"), "resnet20": (20, "basic"), "resnet32": (32, "basic"),
            "resnet56": (56, "basic"), "resnet110": (110, "basic"), "resnet164": (164, "bottleneck")}
_VGGS = ("vgg11", "vgg16")
_DENSENETS = {"densenet40": 40, "densenet100": 100}

MODEL_NAMES = tuple(_RESNETS) + _VGGS + tuple(_DENSENETS)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"build_model: {name} must be a positive integer, got {value!r}")
    return int(value)


def input_divisor(name: str) -> int:
    """What the input height and width of model ``name`` must be divisible by:
    4 for ResNets and DenseNets (two stride-2 stages), 2^pools for VGGs."""
    key = name.lower() if isinstance(name, str) else name
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return 2 ** VGG_CONFIGS[key].count("M") if key in _VGGS else 4


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, input_size=32, width: int | None = None,
                shortcut: str | None = None, activation: str | None = None, **options):
    """The model called ``name`` (one of ``MODEL_NAMES``) for ``num_classes``
    classes and inputs (N, in_channels, H, W), ``input_size`` = H = W or (H, W).

    ``width``: the network's base width (see the module docstring; None: the
    standard one). ``shortcut``: "pad" (the paper's, default) or "projection",
    ResNets only. ``activation``: "relu" (default), or "sigmoid", "tanh", "gelu"
    in place of every ReLU, ResNets only (see ``PreActBlock``). Further
    ``options`` go to the constructor (e.g. ``exact_pool_units`` or
    ``classifier`` for VGG, ``compression`` for DenseNet, ``exact_last_unit``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    if width is not None:
        width = _positive_int("width", width)
    size = _size_pair("build_model", input_size)
    if shortcut is not None and key not in _RESNETS:
        raise ValueError(f"build_model: shortcut applies to ResNets only, not to {key}")
    if activation is not None and activation != "relu" and key not in _RESNETS:
        raise ValueError(f"build_model: activation {activation!r} applies to ResNets only, not to {key}")
    if key in _RESNETS:
        depth, block = _RESNETS[key]
        if size[0] % 4 or size[1] % 4:
            raise ValueError(f"{key} needs input height and width divisible by 4 (two stride-2 stages), "
                             f"got input_size {size} (pad or resize the images)")
        return PreActResNet(depth=depth, num_classes=num_classes, in_channels=in_channels,
                            width=16 if width is None else width, shortcut=shortcut or "pad", block=block,
                            activation=activation or "relu", **options)
    if key in _VGGS:
        return VGG(key, num_classes=num_classes, in_channels=in_channels, input_size=size,
                   width_mult=1.0 if width is None else width / 64, **options)
    return DenseNet(depth=_DENSENETS[key], growth_rate=12 if width is None else width, compression=0.5,
                    bottleneck=True, num_classes=num_classes, in_channels=in_channels, input_size=size, **options)
