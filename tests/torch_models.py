"""An independent PyTorch mirror of npapprox's pre-activation ResNet, for
oracle tests and benchmarks. Parameter names follow npapprox's state_dict."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class TorchPreActBlock(tnn.Module):
    def __init__(self, cin, cout, stride, shortcut):
        super().__init__()
        self.bn1, self.bn2 = tnn.BatchNorm2d(cin), tnn.BatchNorm2d(cout)
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.stride, self.extra = stride, cout - cin
        self.kind = shortcut if (stride != 1 or cin != cout) else "identity"
        if self.kind == "projection":
            self.proj = tnn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(h))))
        if self.kind == "identity":
            return out + x
        if self.kind == "projection":
            return out + self.proj(h)
        sc = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        return out + F.pad(sc, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class TorchPreActResNet(tnn.Module):
    def __init__(self, depth=20, num_classes=10, in_channels=3, width=16, shortcut="pad"):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = tnn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(TorchPreActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut))
                cin = cout
        self.blocks = tnn.Sequential(*blocks)
        self.bn = tnn.BatchNorm2d(cin)
        self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))

    def load_from_npapprox(self, state: dict) -> None:
        """Copy an npapprox state_dict in (same key names; BN's num_batches_tracked aside)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"npapprox state lacks {missing}")
        self.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(state[k])) if k in state else v
                              for k, v in own.items()})
