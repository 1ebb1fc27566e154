"""Pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks")."""
from __future__ import annotations

import contextlib

from .. import ops
from ..policy import Exact, storage_policy
from ..validate import check_model_input
from .layers import BatchNorm2d, Conv2d, Linear
from .module import Module, Sequential

ACTIVATIONS = {"relu": ops.relu, "sigmoid": ops.sigmoid, "tanh": ops.tanh, "gelu": ops.gelu}


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation


def _bn(channels: int, activation: str) -> BatchNorm2d:
    """The BN of a unit: fused with the ReLU (one stored unit) for ``"relu"``,
    plain BN (its activation applied after it by ``_unit``) otherwise."""
    return BatchNorm2d(channels, relu=activation == "relu")


def _unit(owner, bn, x):
    """act(bn(x)): one fused BN -> ReLU op for ``"relu"``; otherwise BN, then the
    activation op (under the BN module's storage override, if it has one, so an
    exactly stored last unit stays exact)."""
    h = bn(x)
    if owner.activation == "relu":
        return h
    with storage_policy(bn.storage) if bn.storage is not None else contextlib.nullcontext():
        return ACTIVATIONS[owner.activation](h)


class PreActBlock(Module):
    """Basic pre-activation block:

        h   = relu(bn1(x))
        out = conv2(relu(bn2(conv1(h)))) + shortcut

    shortcut = x when shapes agree; otherwise ``"pad"`` (the paper's): average
    pooling of x with stride s and zero channels appended, parameter-free; or
    ``"projection"``: a strided 1x1 conv of h (it reads the same h as conv1).

    ``activation``: ``"relu"`` (fused BN -> ReLU units, what the paper's scheme
    compresses) or ``"sigmoid"``, ``"tanh"``, ``"gelu"`` in its place (plain BN,
    then the activation op; stored by the generic quantizer). The parameter and
    buffer names are the same for every activation."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "pad", activation: str = "relu"):
        super().__init__()
        self.activation = _check_activation(activation)
        self.bn1 = _bn(cin, activation)
        self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn2 = _bn(cout, activation)
        self.conv2 = Conv2d(cout, cout, 3, stride=1, padding=1)
        _init_shortcut(self, cin, cout, stride, shortcut)

    def forward(self, x):
        return _residual(self, x, (self.conv1, self.bn2, self.conv2))


class PreActBottleneck(Module):
    """Bottleneck pre-activation block (ResNet-164): with w = cout // 4,

        h   = relu(bn1(x))
        out = conv3(relu(bn3(conv2(relu(bn2(conv1(h))))))) + shortcut
        conv1: 1x1 cin -> w;  conv2: 3x3 w -> w, stride s;  conv3: 1x1 w -> cout

    Shortcuts and ``activation`` as in ``PreActBlock``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "pad", activation: str = "relu"):
        super().__init__()
        w = cout // 4
        self.activation = _check_activation(activation)
        self.bn1 = _bn(cin, activation)
        self.conv1 = Conv2d(cin, w, 1)
        self.bn2 = _bn(w, activation)
        self.conv2 = Conv2d(w, w, 3, stride=stride, padding=1)
        self.bn3 = _bn(w, activation)
        self.conv3 = Conv2d(w, cout, 1)
        _init_shortcut(self, cin, cout, stride, shortcut)

    def forward(self, x):
        return _residual(self, x, (self.conv1, self.bn2, self.conv2, self.bn3, self.conv3))


def _init_shortcut(block, cin, cout, stride, shortcut):
    """Set up a block's shortcut: identity when shapes agree, else ``shortcut``."""
    if shortcut not in ("pad", "projection"):
        raise ValueError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
    block.stride, block.extra = stride, cout - cin
    block.shortcut = shortcut if (stride != 1 or cin != cout) else "identity"
    if block.shortcut == "projection":
        block.proj = Conv2d(cin, cout, 1, stride=stride)
    elif block.shortcut == "pad" and cout < cin:
        raise ValueError(f"the 'pad' shortcut cannot narrow {cin} -> {cout} channels")


def _residual(block, x, path):
    """bn1's unit h, then ``path`` (convs and the BNs of the units between them)
    on it, plus the shortcut. Each intermediate is dropped as soon as the next op
    has it (what backward needs, the ops saved), so the forward holds x, the
    current activation and the op's output, not every activation of the block."""
    out = _unit(block, block.bn1, x)
    h = out if block.shortcut == "projection" else None      # a projection reads h after the branch
    for layer in path:
        out = _unit(block, layer, out) if isinstance(layer, BatchNorm2d) else layer(out)
    return ops.add(out, shortcut(block, x, h))


def shortcut(block, x, h, pool=ops.avg_pool2d, pad_channels=ops.pad_channels):
    """The block's shortcut branch: x, a projection of h, or pooled + zero-padded x
    (``pool(x, stride)``, ``pad_channels(x, before, after)``: the engine's ops, or
    the PyTorch bridge's)."""
    if block.shortcut == "identity":
        return x
    if block.shortcut == "projection":
        return block.proj(h)
    sc = pool(x, block.stride) if block.stride > 1 else x
    return pad_channels(sc, block.extra // 2, block.extra - block.extra // 2)


class PreActResNet(Module):
    """Pre-activation ResNet for small images: conv3x3(in, w) -> 3 stages of n
    blocks (stride 2 at stage changes) -> bn -> relu -> global average pool ->
    linear. ``block="basic"``: depth 6n + 2, stage widths w, 2w, 4w;
    ``block="bottleneck"``: depth 9n + 2, stage outputs 4w, 8w, 16w (ResNet-164
    is depth 164, w = 16, as in the paper).
    Input (N, in_channels, H, W) with H and W divisible by 4. Every BN is fused
    with the ReLU after it (one stored unit); the last unit is stored exactly
    (``exact_last_unit``), the first conv's input is the network input (a leaf,
    always exact). ``activation``: ``"relu"`` (default) or ``"sigmoid"``,
    ``"tanh"``, ``"gelu"`` in place of every ReLU (see ``PreActBlock``; same
    ``state_dict`` keys)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: str = "pad", exact_last_unit: bool = True, block: str = "basic",
                 activation: str = "relu"):
        super().__init__()
        self.activation = _check_activation(activation)
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        per = 6 if block == "basic" else 9
        if depth < per + 2 or (depth - 2) % per:
            examples = "8, 14, 20, 32, 56, 110" if block == "basic" else "11, 20, 29, 56, 164"
            raise ValueError(f"a {block}-block pre-activation ResNet has depth {per}n + 2 ({examples}), got {depth}")
        n = (depth - 2) // per
        self.depth, self.in_channels = depth, in_channels
        self.conv = Conv2d(in_channels, width, 3, padding=1)
        blocks, cin = [], width
        make, grow = (PreActBlock, 1) if block == "basic" else (PreActBottleneck, 4)
        for stage, cout in enumerate((grow * width, 2 * grow * width, 4 * grow * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(make(cin, cout, stride, shortcut, activation))
                cin = cout
        self.blocks = Sequential(*blocks)
        self.bn = _bn(cin, activation)
        if exact_last_unit:  # the paper keeps the last unit before pooling in full precision
            self.bn.storage = Exact()
        self.fc = Linear(cin, num_classes)

    def forward(self, x):
        x = check_model_input(self, x, 4, "two stride-2 stages")
        box = [self.conv(x)]              # held by the box alone: blocks drop it once used
        self.blocks._run(box)
        return self.fc(ops.global_avg_pool2d(_unit(self, self.bn, box.pop())))


def preact_resnet20(**kwargs) -> PreActResNet:
    return PreActResNet(depth=20, **kwargs)


def preact_resnet164(**kwargs) -> PreActResNet:
    """The paper's CIFAR network: bottleneck blocks, 3 x 18, widths 16/32/64 x4."""
    return PreActResNet(depth=164, block="bottleneck", **kwargs)
