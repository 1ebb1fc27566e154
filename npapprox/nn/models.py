"""Pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks")."""
from __future__ import annotations

from .. import ops
from ..policy import Exact
from .layers import BatchNorm2d, Conv2d, Linear
from .module import Module, Sequential


class PreActBlock(Module):
    """Basic pre-activation block:

        h   = relu(bn1(x))
        out = conv2(relu(bn2(conv1(h)))) + shortcut

    shortcut = x when shapes agree; otherwise ``"pad"`` (the paper's): average
    pooling of x with stride s and zero channels appended, parameter-free; or
    ``"projection"``: a strided 1x1 conv of h (it reads the same h as conv1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "pad"):
        super().__init__()
        if shortcut not in ("pad", "projection"):
            raise ValueError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
        self.bn1 = BatchNorm2d(cin, relu=True)
        self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn2 = BatchNorm2d(cout, relu=True)
        self.conv2 = Conv2d(cout, cout, 3, stride=1, padding=1)
        self.stride, self.extra = stride, cout - cin
        self.shortcut = shortcut if (stride != 1 or cin != cout) else "identity"
        if self.shortcut == "projection":
            self.proj = Conv2d(cin, cout, 1, stride=stride)
        elif self.shortcut == "pad" and cout < cin:
            raise ValueError(f"the 'pad' shortcut cannot narrow {cin} -> {cout} channels")

    def forward(self, x):
        h = self.bn1(x)                                  # BN -> ReLU unit
        out = self.conv2(self.bn2(self.conv1(h)))
        if self.shortcut == "identity":
            sc = x
        elif self.shortcut == "projection":
            sc = self.proj(h)
        else:
            sc = ops.avg_pool2d(x, self.stride) if self.stride > 1 else x
            sc = ops.pad_channels(sc, self.extra // 2, self.extra - self.extra // 2)
        return ops.add(out, sc)


class PreActResNet(Module):
    """Pre-activation ResNet for small images, depth 6n + 2 with basic blocks:
    conv3x3(in, w) -> 3 stages of n blocks (widths w, 2w, 4w; stride 2 at
    stage changes) -> bn -> relu -> global average pool -> linear.
    Input (N, in_channels, H, W) with H and W divisible by 4. Every BN is fused
    with the ReLU after it (one stored unit); the last unit is stored exactly
    (``exact_last_unit``), the first conv's input is the network input (a leaf,
    always exact)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: str = "pad", exact_last_unit: bool = True):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a basic-block pre-activation ResNet has depth 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.in_channels = depth, in_channels
        self.conv = Conv2d(in_channels, width, 3, padding=1)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(cin, cout, stride, shortcut))
                cin = cout
        self.blocks = Sequential(*blocks)
        self.bn = BatchNorm2d(cin, relu=True)
        if exact_last_unit:  # the paper keeps the last unit before pooling in full precision
            self.bn.storage = Exact()
        self.fc = Linear(cin, num_classes)

    def forward(self, x):
        x = ops._checks.as_tensor(x, "x")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"input height and width must be divisible by 4 (two stride-2 stages), "
                             f"got {tuple(x.shape[2:])}")
        h = self.blocks(self.conv(x))
        return self.fc(ops.global_avg_pool2d(self.bn(h)))


def preact_resnet20(**kwargs) -> PreActResNet:
    return PreActResNet(depth=20, **kwargs)
