"""An independent PyTorch mirror of npapprox's pre-activation ResNet, for
oracle tests and benchmarks. Parameter names follow npapprox's state_dict."""
from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as F


def _shortcut_setup(block, cin, cout, stride, shortcut):
    block.stride, block.extra = stride, cout - cin
    block.kind = shortcut if (stride != 1 or cin != cout) else "identity"
    if block.kind == "projection":
        block.proj = tnn.Conv2d(cin, cout, 1, stride, bias=False)


def _pad_or_project(block, x, h, out):
    """out + the block's shortcut (identity, 1x1 projection of h, or pooled + zero-padded x)."""
    if block.kind == "identity":
        return out + x
    if block.kind == "projection":
        return out + block.proj(h)
    sc = F.avg_pool2d(x, block.stride) if block.stride > 1 else x
    return out + F.pad(sc, (0, 0, 0, 0, block.extra // 2, block.extra - block.extra // 2))


class TorchPreActBlock(tnn.Module):
    """relu(bn1) -> conv1 3x3 (stride) -> relu(bn2) -> conv2 3x3, + shortcut."""

    def __init__(self, cin, cout, stride, shortcut):
        super().__init__()
        self.bn1, self.bn2 = tnn.BatchNorm2d(cin), tnn.BatchNorm2d(cout)
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        _shortcut_setup(self, cin, cout, stride, shortcut)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        return _pad_or_project(self, x, h, self.conv2(F.relu(self.bn2(self.conv1(h)))))


class TorchPreActBottleneck(tnn.Module):
    """relu(bn1) -> conv1 1x1 -> relu(bn2) -> conv2 3x3 (stride) -> relu(bn3) -> conv3 1x1, + shortcut."""

    def __init__(self, cin, cout, stride, shortcut):
        super().__init__()
        w = cout // 4
        self.bn1, self.bn2, self.bn3 = tnn.BatchNorm2d(cin), tnn.BatchNorm2d(w), tnn.BatchNorm2d(w)
        self.conv1 = tnn.Conv2d(cin, w, 1, bias=False)
        self.conv2 = tnn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.conv3 = tnn.Conv2d(w, cout, 1, bias=False)
        _shortcut_setup(self, cin, cout, stride, shortcut)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        out = self.conv3(F.relu(self.bn3(self.conv2(F.relu(self.bn2(self.conv1(h)))))))
        return _pad_or_project(self, x, h, out)


class TorchPreActResNet(tnn.Module):
    """Basic blocks: depth 6n + 2, stage widths w, 2w, 4w. Bottleneck blocks:
    depth 9n + 2, stage outputs 4w, 8w, 16w. Stride 2 at stage changes."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=16, shortcut="pad", block="basic"):
        super().__init__()
        make, per, grow = (TorchPreActBlock, 6, 1) if block == "basic" else (TorchPreActBottleneck, 9, 4)
        n = (depth - 2) // per
        self.conv = tnn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks, cin = [], width
        for stage, cout in enumerate((grow * width, 2 * grow * width, 4 * grow * width)):
            for i in range(n):
                blocks.append(make(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut))
                cin = cout
        self.blocks = tnn.Sequential(*blocks)
        self.bn = tnn.BatchNorm2d(cin)
        self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- #
# VGG with BN, DenseNet-BC (tests/test_models.py)
# --------------------------------------------------------------------------- #
class TorchBNReLU(tnn.BatchNorm2d):
    """BatchNorm2d followed by ReLU (one module, so parameter names match npapprox's fused unit)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class TorchVGG(tnn.Module):
    """``config``: channel counts and "M"; features.<i> = conv (no bias), BN+ReLU, or 2x2 max-pool."""

    def __init__(self, config, num_classes=10, in_channels=3, input_size=32, width_mult=1.0, classifier="avg"):
        super().__init__()
        layers, cin, pools = [], in_channels, 0
        for v in config:
            if v == "M":
                layers.append(tnn.MaxPool2d(2))
                pools += 1
                continue
            cout = max(1, round(v * width_mult))
            layers += [tnn.Conv2d(cin, cout, 3, 1, 1, bias=False), TorchBNReLU(cout)]
            cin = cout
        self.features = tnn.Sequential(*layers)
        self.classifier = classifier
        side = input_size // 2 ** pools
        self.fc = tnn.Linear(cin if classifier == "avg" else cin * side * side, num_classes)

    def forward(self, x):
        h = self.features(x)
        return self.fc(h.mean(dim=(2, 3)) if self.classifier == "avg" else h.flatten(1))


class TorchDenseLayer(tnn.Module):
    def __init__(self, cin, k):
        super().__init__()
        self.bn1, self.bn2 = tnn.BatchNorm2d(cin), tnn.BatchNorm2d(4 * k)
        self.conv1 = tnn.Conv2d(cin, 4 * k, 1, bias=False)
        self.conv2 = tnn.Conv2d(4 * k, k, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class TorchDenseBlock(tnn.Module):
    def __init__(self, cin, n, k):
        super().__init__()
        self.n = n
        for i in range(n):
            self.add_module(f"layer{i + 1}", TorchDenseLayer(cin + i * k, k))

    def forward(self, x):
        for i in range(self.n):
            x = torch.cat([x, getattr(self, f"layer{i + 1}")(x)], dim=1)
        return x


class TorchTransition(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn = tnn.BatchNorm2d(cin)
        self.conv = tnn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class TorchDenseNetBC(tnn.Module):
    """DenseNet-BC: depth 6n + 4, growth k, compression theta, first conv 3x3 -> 2k channels."""

    def __init__(self, depth=10, k=12, compression=0.5, num_classes=10, in_channels=3):
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * k
        self.conv = tnn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        for b in (1, 2, 3):
            self.add_module(f"block{b}", TorchDenseBlock(c, n, k))
            c += n * k
            if b < 3:
                cout = int(compression * c)
                self.add_module(f"trans{b}", TorchTransition(c, cout))
                c = cout
        self.bn = tnn.BatchNorm2d(c)
        self.fc = tnn.Linear(c, num_classes)

    def forward(self, x):
        h = self.block3(self.trans2(self.block2(self.trans1(self.block1(self.conv(x))))))
        return self.fc(F.relu(self.bn(h)).mean(dim=(2, 3)))
