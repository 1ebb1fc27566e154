"""Modules: layers, containers and models."""
from .densenet import DenseBlock, DenseLayer, DenseNet, Transition, densenet_bc
from .layers import (
    GELU,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Identity,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Tanh,
    he_normal,
    manual_seed,
)
from .module import Module, Parameter, Sequential, trace_modules
from .resnet import PreActBlock, PreActBottleneck, PreActResNet, preact_resnet20, preact_resnet164
from .vgg import VGG, VGG_CONFIGS, vgg11, vgg16
from .zoo import MODEL_NAMES, MODELS, build_model, input_divisor, register_model

__all__ = ["GELU", "AvgPool2d", "BatchNorm2d", "Conv2d", "DenseBlock", "DenseLayer", "DenseNet", "Flatten",
           "GlobalAvgPool2d", "Identity", "Linear", "MODEL_NAMES", "MODELS", "MaxPool2d", "Module", "Parameter",
           "PreActBlock", "PreActBottleneck", "PreActResNet", "ReLU", "Sequential", "Sigmoid", "Tanh",
           "Transition", "VGG", "VGG_CONFIGS", "build_model", "densenet_bc", "he_normal", "input_divisor",
           "manual_seed", "preact_resnet20", "preact_resnet164", "register_model", "trace_modules", "vgg11",
           "vgg16"]
