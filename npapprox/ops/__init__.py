"""Functional ops. Each validates its inputs, then calls ``Function.apply``."""
from .activation import gelu, relu, sigmoid, tanh
from .batchnorm import batch_norm2d
from .conv import conv2d
from .elementwise import add, mul, sum_all
from .linear import linear
from .loss import cross_entropy
from .pool import avg_pool2d, global_avg_pool2d, max_pool2d
from .shape import concat_channels, flatten, pad_channels, reshape

__all__ = ["add", "avg_pool2d", "batch_norm2d", "concat_channels", "conv2d", "cross_entropy",
           "flatten", "gelu", "global_avg_pool2d", "linear", "max_pool2d", "mul", "pad_channels",
           "relu", "reshape", "sigmoid", "sum_all", "tanh"]
