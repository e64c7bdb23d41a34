"""xpnet: neural-network layers with explicit forward()/backward(), written once against the
Python Array API, so the same code runs on NumPy (CPU), CuPy (GPU), torch and array_api_strict.
"""

__version__ = "0.1.0"

from . import checkpoint, datasets, functional, optim
from .backend import (
    BackendUnavailableError,
    DeviceMismatchError,
    available_backends,
    device_of,
    namespace,
    resolve_device,
    to_device,
    to_numpy,
)
from .gradcheck import (
    GradientCheckError,
    GradientCheckReport,
    check_gradients,
    check_layer,
    numerical_gradient,
)
from .layers import (
    Add,
    Affine,
    ForwardNotCalledError,
    Layer,
    Mul,
    Relu,
    Sigmoid,
    SoftmaxWithLoss,
)
from .nets import MultiLayerNet, Sequential, TwoLayerNet
from .optim import SGD, AdaGrad, Adam, Momentum
from .train import DivergenceError, History, Trainer

__all__ = [
    "SGD",
    "Sequential",
    "AdaGrad",
    "Adam",
    "Add",
    "Affine",
    "BackendUnavailableError",
    "DeviceMismatchError",
    "DivergenceError",
    "ForwardNotCalledError",
    "GradientCheckError",
    "GradientCheckReport",
    "History",
    "Layer",
    "Momentum",
    "Mul",
    "MultiLayerNet",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "Trainer",
    "TwoLayerNet",
    "__version__",
    "available_backends",
    "check_gradients",
    "check_layer",
    "checkpoint",
    "datasets",
    "device_of",
    "functional",
    "namespace",
    "numerical_gradient",
    "optim",
    "resolve_device",
    "to_device",
    "to_numpy",
]
