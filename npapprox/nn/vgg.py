"""VGG-style networks with batch norm for small images (Simonyan & Zisserman 2015,
with BN as in the common CIFAR variants): a plain stack, no residual paths."""
from __future__ import annotations

from .. import ops
from ..policy import Exact
from ..validate import check_model_input, check_size_pair
from .layers import BatchNorm2d, Conv2d, Linear, MaxPool2d
from .module import Module, Sequential

#: output channels of each 3x3 conv ("M": 2x2 max-pool, stride 2)
VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(Module):
    """conv3x3 -> [BN -> ReLU] units, a 2x2 max-pool after each stage, then a
    classifier: ``"avg"`` (global average pool -> linear, any input size divisible
    by 2^pools) or ``"flatten"`` (flatten -> linear; the input size is fixed by
    ``input_size``).

    ``config``: a name of ``VGG_CONFIGS`` ("vgg11", "vgg13", "vgg16", "vgg19") or a
    sequence of channel counts and "M"; every channel count is scaled by
    ``width_mult`` (rounded, at least 1). Convs have no bias (a BN follows each).
    Parameter names: ``features.<i>.*`` in the order of the config, ``fc.*``.

    Storage: every BN is fused with its ReLU (one stored unit); the conv after a
    unit reads the unit's output (a reference, free under the paper's policy); the
    first conv reads the network input (a leaf, always exact); a conv after a
    max-pool reads the pool's output, which no unit produced, so the policy stores
    it as an ordinary activation (``Paper``: its fallback, generic K-bit).
    ``exact_pool_units=True`` (default) keeps every unit whose output feeds a
    max-pool in float32 (``storage = Exact()`` on that BN): the paper's released
    code keeps max-pool units in full precision (docs/method.md section 3). Nothing in
    this engine requires it (the pool saves only its argmax, and the unit's mask
    and xhat come from its codes as everywhere else); ``False`` quantises them like
    every other unit. In VGG the last unit also feeds a pool, so it is covered by
    the same option."""

    def __init__(self, config="vgg11", num_classes: int = 10, in_channels: int = 3, input_size=32,
                 width_mult: float = 1.0, classifier: str = "avg", exact_pool_units: bool = True):
        super().__init__()
        label = config if isinstance(config, str) else "VGG"
        if isinstance(config, str):
            if config not in VGG_CONFIGS:
                raise ValueError(f"unknown VGG config {config!r}; expected one of {', '.join(VGG_CONFIGS)} "
                                 "or a sequence of channel counts and 'M'")
            config = VGG_CONFIGS[config]
        config = tuple(config)
        if not config or not all(v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                                 for v in config) or config[0] == "M":
            raise ValueError(f"a VGG config is a sequence of positive channel counts and 'M', starting "
                             f"with a conv, got {config!r}")
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"VGG: width_mult must be a positive number, got {width_mult!r}")
        if classifier not in ("avg", "flatten"):
            raise ValueError(f"VGG: classifier must be 'avg' or 'flatten', got {classifier!r}")
        self.in_channels, self.num_classes, self.classifier = in_channels, num_classes, classifier
        self.input_size = check_size_pair("VGG", input_size)
        self.pools = sum(1 for v in config if v == "M")
        self.divisor = 2 ** self.pools
        if self.input_size[0] % self.divisor or self.input_size[1] % self.divisor:
            raise ValueError(f"{label} with {self.pools} max-pools needs input height and width divisible by "
                             f"{self.divisor}, got input_size {self.input_size} (pad or resize the images)")
        layers, cin = [], in_channels
        for i, v in enumerate(config):
            if v == "M":
                layers.append(MaxPool2d(2))
                continue
            cout = max(1, round(v * width_mult))
            bn = BatchNorm2d(cout, relu=True)
            if exact_pool_units and i + 1 < len(config) and config[i + 1] == "M":
                bn.storage = Exact()  # the released code keeps max-pool units in full precision
            layers += [Conv2d(cin, cout, 3, padding=1), bn]
            cin = cout
        self.config = config
        self.features = Sequential(*layers)
        fh, fw = self.input_size[0] // self.divisor, self.input_size[1] // self.divisor
        self.fc = Linear(cin if classifier == "avg" else cin * fh * fw, num_classes)

    def forward(self, x):
        x = check_model_input(self, x, self.divisor, f"{self.pools} 2x2 max-pools")
        if self.classifier == "flatten" and tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"VGG with a flatten classifier was built for input size {self.input_size}, "
                             f"got {tuple(x.shape[2:])}")
        h = self.features(x)
        h = ops.global_avg_pool2d(h) if self.classifier == "avg" else ops.flatten(h)
        return self.fc(h)


def vgg11(**kwargs) -> VGG:
    return VGG("vgg11", **kwargs)


def vgg16(**kwargs) -> VGG:
    return VGG("vgg16", **kwargs)
