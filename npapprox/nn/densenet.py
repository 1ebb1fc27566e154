"""DenseNet-BC for small images (Huang et al. 2017, "Densely connected
convolutional networks"), built from the same fused BN -> ReLU units as the
pre-activation ResNets.

Why DenseNet matters for the method: every layer reads the concatenation of all
earlier feature maps of its block, so each layer's unit normalises a wide,
freshly concatenated tensor. A standard framework keeps that concatenation (the
BN input) alive for every layer: memory quadratic in the block's depth. Under
the paper's policy a unit keeps only K-bit codes of its output (plus sigma per
channel); the concatenation itself is freed after the forward. The conv that
reads the unit's output stores a reference, and a concat saves nothing. The
ledger shows it (``tests/test_models.py`` states the ratio).
"""
from __future__ import annotations

from .. import ops
from ..policy import Exact
from ..validate import check_count, check_model_input, check_size_pair
from .layers import BatchNorm2d, Conv2d, Linear
from .module import Module


class DenseLayer(Module):
    """One layer of a dense block; its input is the concatenation of ``features``.

    bottleneck (the "B" of DenseNet-BC):
        h = conv2(relu(bn2(conv1(relu(bn1(concat(features)))))))
        conv1: 1x1 cin -> 4k;  conv2: 3x3 4k -> k
    plain:
        h = conv1(relu(bn1(concat(features))))      conv1: 3x3 cin -> k
    Returns the k new channels only."""

    def __init__(self, cin: int, growth_rate: int, bottleneck: bool = True):
        super().__init__()
        self.bn1 = BatchNorm2d(cin, relu=True)
        if bottleneck:
            self.conv1 = Conv2d(cin, 4 * growth_rate, 1)
            self.bn2 = BatchNorm2d(4 * growth_rate, relu=True)
            self.conv2 = Conv2d(4 * growth_rate, growth_rate, 3, padding=1)
        else:
            self.conv1 = Conv2d(cin, growth_rate, 3, padding=1)
        self.bottleneck = bottleneck

    def forward(self, *features):
        x = features[0] if len(features) == 1 else ops.concat_channels(*features)
        h = self.conv1(self.bn1(x))
        return self.conv2(self.bn2(h)) if self.bottleneck else h


class DenseBlock(Module):
    """``n`` dense layers (``layer1`` ... ``layerN``): layer i reads
    concat(x, h_1, ..., h_{i-1}); returns concat(x, h_1, ..., h_n) with
    cin + n * k channels."""

    def __init__(self, cin: int, n: int, growth_rate: int, bottleneck: bool = True):
        super().__init__()
        self.n = n
        for i in range(n):
            setattr(self, f"layer{i + 1}", DenseLayer(cin + i * growth_rate, growth_rate, bottleneck))
        self.out_channels = cin + n * growth_rate

    def forward(self, x):
        features = [x]
        for i in range(self.n):
            features.append(getattr(self, f"layer{i + 1}")(*features))
        return ops.concat_channels(*features)


class Transition(Module):
    """Between blocks: conv1x1(relu(bn(x))) (cin -> cout) then 2x2 average pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = BatchNorm2d(cin, relu=True)
        self.conv = Conv2d(cin, cout, 1)

    def forward(self, x):
        return ops.avg_pool2d(self.conv(self.bn(x)), 2)


class DenseNet(Module):
    """DenseNet(-BC) for small images: conv3x3(in, c0) -> block1 -> trans1 ->
    block2 -> trans2 -> block3 -> BN -> ReLU -> global average pool -> linear.

    ``depth`` counts conv and linear layers: with bottleneck layers (2 convs each)
    depth = 6n + 4, else 3n + 4, n layers per block (DenseNet-BC-40: n = 6;
    DenseNet-BC-100: n = 16). ``growth_rate`` k; ``compression`` theta: a
    transition maps c channels to floor(theta * c); ``init_channels`` c0 defaults
    to 2k. Input (N, in_channels, H, W) with H and W divisible by 4 (two
    transitions). The last unit (before global pooling) is stored exactly
    (``exact_last_unit``), as the paper's released code does for ResNets."""

    def __init__(self, depth: int = 40, growth_rate: int = 12, compression: float = 0.5,
                 bottleneck: bool = True, num_classes: int = 10, in_channels: int = 3, input_size=32,
                 init_channels: int | None = None, exact_last_unit: bool = True):
        super().__init__()
        per = 6 if bottleneck else 3
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < per + 4 or (depth - 4) % per:
            examples = "10, 16, 40, 100, 190" if bottleneck else "7, 10, 40, 100"
            raise ValueError(f"a DenseNet with {'bottleneck' if bottleneck else 'plain'} layers has depth "
                             f"{per}n + 4 ({examples}), got {depth!r}")
        growth_rate = check_count("DenseNet", "growth_rate", growth_rate)
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 0 < compression <= 1:
            raise ValueError(f"DenseNet: compression must be in (0, 1], got {compression!r}")
        self.input_size = check_size_pair("DenseNet", input_size)
        if self.input_size[0] % 4 or self.input_size[1] % 4:
            raise ValueError(f"DenseNet needs input height and width divisible by 4 (two 2x2 average-pooling "
                             f"transitions), got input_size {self.input_size} (pad or resize the images)")
        n = (depth - 4) // per
        self.depth, self.growth_rate, self.in_channels = depth, growth_rate, in_channels
        c = 2 * growth_rate if init_channels is None else init_channels
        self.conv = Conv2d(in_channels, c, 3, padding=1)
        for b in (1, 2, 3):
            block = DenseBlock(c, n, growth_rate, bottleneck)
            setattr(self, f"block{b}", block)
            c = block.out_channels
            if b < 3:
                cout = max(1, int(compression * c))
                setattr(self, f"trans{b}", Transition(c, cout))
                c = cout
        self.bn = BatchNorm2d(c, relu=True)
        if exact_last_unit:  # as the paper's code does for the last unit before pooling
            self.bn.storage = Exact()
        self.fc = Linear(c, num_classes)

    def forward(self, x):
        x = check_model_input(self, x, 4, "two 2x2 average-pooling transitions")
        h = self.trans1(self.block1(self.conv(x)))
        h = self.block3(self.trans2(self.block2(h)))
        return self.fc(ops.global_avg_pool2d(self.bn(h)))


def densenet_bc(depth: int = 100, growth_rate: int = 12, **kwargs) -> DenseNet:
    """DenseNet-BC (bottleneck layers, compression 0.5)."""
    return DenseNet(depth=depth, growth_rate=growth_rate, compression=0.5, bottleneck=True, **kwargs)
