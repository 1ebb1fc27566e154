"""Modules: layers, containers and models."""
from .layers import (GELU, AvgPool2d, BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Identity, Linear,
                     MaxPool2d, ReLU, Sigmoid, Tanh, he_normal, manual_seed)
from .models import PreActBlock, PreActBottleneck, PreActResNet, preact_resnet20, preact_resnet164
from .module import Module, Parameter, Sequential

__all__ = ["GELU", "AvgPool2d", "BatchNorm2d", "Conv2d", "Flatten", "GlobalAvgPool2d", "Identity",
           "Linear", "MaxPool2d", "Module", "Parameter", "PreActBlock", "PreActBottleneck", "PreActResNet", "ReLU",
           "Sequential", "Sigmoid", "Tanh", "he_normal", "manual_seed", "preact_resnet20", "preact_resnet164"]
