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

from typing import Callable, NamedTuple

from ..validate import check_count, check_size_pair
from .densenet import DenseNet
from .resnet import PreActResNet
from .vgg import VGG, VGG_CONFIGS


class ModelEntry(NamedTuple):
    """A registered model: ``build(num_classes, in_channels, size, width, **options)``,
    its input divisor and the ``build_model`` keywords only it takes."""

    build: Callable
    divisor: int
    takes: tuple = ()


#: name -> ModelEntry; ``build_model``, ``input_divisor`` and the command line read it
MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, build: Callable, divisor: int, takes: tuple = ()) -> None:
    """Make ``build_model(name, ...)`` call ``build``; ``takes``: the keywords of
    ``build_model`` that apply to this model only (``shortcut``, ``activation``)."""
    MODELS[name] = ModelEntry(build, divisor, takes)


def _resnet(depth: int, block: str):
    def build(num_classes, in_channels, size, width, shortcut=None, activation=None, **options):
        if size[0] % 4 or size[1] % 4:
            raise ValueError(f"resnet{depth} needs input height and width divisible by 4 (two stride-2 stages), "
                             f"got input_size {size} (pad or resize the images)")
        return PreActResNet(depth=depth, num_classes=num_classes, in_channels=in_channels,
                            width=16 if width is None else width, shortcut=shortcut or "pad", block=block,
                            activation=activation or "relu", **options)
    return build


def _vgg(name: str):
    def build(num_classes, in_channels, size, width, **options):
        return VGG(name, num_classes=num_classes, in_channels=in_channels, input_size=size,
                   width_mult=1.0 if width is None else width / 64, **options)
    return build


def _densenet(depth: int):
    def build(num_classes, in_channels, size, width, **options):
        return DenseNet(depth=depth, growth_rate=12 if width is None else width, compression=0.5,
                        bottleneck=True, num_classes=num_classes, in_channels=in_channels, input_size=size,
                        **options)
    return build


for _depth in (8, 20, 32, 56, 110):
    register_model(f"resnet{_depth}", _resnet(_depth, "basic"), 4, ("shortcut", "activation"))
register_model("resnet164", _resnet(164, "bottleneck"), 4, ("shortcut", "activation"))
for _name in ("vgg11", "vgg16"):
    register_model(_name, _vgg(_name), 2 ** VGG_CONFIGS[_name].count("M"))
for _depth in (40, 100):
    register_model(f"densenet{_depth}", _densenet(_depth), 4)

MODEL_NAMES = tuple(MODELS)     # the models registered here (``MODELS`` also holds later registrations)


def _entry(name) -> tuple[str, ModelEntry]:
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return key, MODELS[key]


def input_divisor(name: str) -> int:
    """What the input height and width of model ``name`` must be divisible by:
    4 for ResNets and DenseNets (two stride-2 stages), 2^pools for VGGs."""
    return _entry(name)[1].divisor


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, input_size=32, width: int | None = None,
                shortcut: str | None = None, activation: str | None = None, **options):
    """The model called ``name`` (a key of ``MODELS``) for ``num_classes``
    classes and inputs (N, in_channels, H, W), ``input_size`` = H = W or (H, W).

    ``width``: the network's base width (see the module docstring; None: the
    standard one). ``shortcut``: "pad" (the paper's, default) or "projection",
    ResNets only. ``activation``: "relu" (default), or "sigmoid", "tanh", "gelu"
    in place of every ReLU, ResNets only (see ``PreActBlock``). Further
    ``options`` go to the constructor (e.g. ``exact_pool_units`` or
    ``classifier`` for VGG, ``compression`` for DenseNet, ``exact_last_unit``)."""
    key, entry = _entry(name)
    num_classes = check_count("build_model", "num_classes", num_classes)
    in_channels = check_count("build_model", "in_channels", in_channels)
    if width is not None:
        width = check_count("build_model", "width", width)
    size = check_size_pair("build_model", input_size)
    if shortcut is not None and "shortcut" not in entry.takes:
        raise ValueError(f"build_model: shortcut applies to ResNets only, not to {key}")
    if activation is not None and activation != "relu" and "activation" not in entry.takes:
        raise ValueError(f"build_model: activation {activation!r} applies to ResNets only, not to {key}")
    given = {k: v for k, v in (("shortcut", shortcut), ("activation", activation)) if k in entry.takes}
    return entry.build(num_classes, in_channels, size, width, **given, **options)
