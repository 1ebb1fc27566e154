"""Layers wrapping the functional ops, with He initialisation."""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..validate import check_count
from .module import Module, Parameter

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator that initialises new layers (for reproducible models)."""
    global _rng
    _rng = np.random.default_rng(seed)


def he_normal(shape, fan_in: int, dtype=np.float32):
    """N(0, 2 / fan_in): He et al. 2015, for layers followed by ReLU."""
    return (_rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


class Conv2d(Module):
    """NCHW convolution, weight (out, in, k, k), He-normal, no bias by default
    (a BN follows every conv in the ResNets)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size)):
            check_count("Conv2d", name, v)
        self.stride, self.padding = stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = Parameter(he_normal((out_channels, in_channels, kernel_size, kernel_size), fan_in))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class BatchNorm2d(Module):
    """Batch norm with gamma = 1, beta = 0 and running statistics.

    training: batch statistics, running statistics updated;
    eval: running statistics, or batch statistics (not updated) when
    ``eval_batch_stats=True``, as the paper's released code evaluates.
    ``relu=True`` makes it a BN -> ReLU unit (one op, one stored unit)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5,
                 eval_batch_stats: bool = False, relu: bool = False):
        super().__init__()
        self.channels, self.momentum, self.eps, self.relu = channels, momentum, eps, relu
        self.eval_batch_stats = eval_batch_stats
        self.weight = Parameter(np.ones(channels, np.float32))
        self.bias = Parameter(np.zeros(channels, np.float32))
        self.register_buffer("running_mean", np.zeros(channels, np.float32))
        self.register_buffer("running_var", np.ones(channels, np.float32))

    def forward(self, x):
        batch = self.training or self.eval_batch_stats
        return ops.batch_norm2d(x, self.weight, self.bias, self.running_mean, self.running_var,
                                use_batch_stats=batch, update_running=self.training,
                                momentum=self.momentum, eps=self.eps, relu=self.relu)


class Linear(Module):
    """y = x w^T + b; weight (out, in) ~ N(0, 1/in) (a classifier has no ReLU
    after it), bias zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = Parameter(he_normal((out_features, in_features), 2 * in_features))
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


def _stateless(name, fn, doc):
    """A parameter-free layer class applying ``fn``."""
    return type(name, (Module,), {"forward": lambda self, x: fn(x), "__doc__": doc})


ReLU = _stateless("ReLU", ops.relu, "max(x, 0)")
Sigmoid = _stateless("Sigmoid", ops.sigmoid, "1 / (1 + exp(-x))")
Tanh = _stateless("Tanh", ops.tanh, "tanh(x)")
GELU = _stateless("GELU", ops.gelu, "x * Phi(x) (exact, erf-based)")
Flatten = _stateless("Flatten", ops.flatten, "(N, ...) -> (N, prod(...))")
GlobalAvgPool2d = _stateless("GlobalAvgPool2d", ops.global_avg_pool2d, "(N, C, H, W) -> (N, C)")
Identity = _stateless("Identity", lambda x: x, "returns its input")


class AvgPool2d(Module):
    def __init__(self, kernel: int, stride: int | None = None):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return ops.avg_pool2d(x, self.kernel, self.stride)


class MaxPool2d(Module):
    def __init__(self, kernel: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel, self.stride, self.padding)
