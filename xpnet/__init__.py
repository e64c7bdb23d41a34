"""xpnet: neural-network layers with explicit forward()/backward(), written once against the
Python Array API, so the same code runs on NumPy (CPU), CuPy (GPU), torch and array_api_strict.
"""

__version__ = "0.1.0"

from . import functional
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
from .layers import Add, Affine, ForwardNotCalledError, Mul, Relu, Sigmoid, SoftmaxWithLoss
from .nets import MultiLayerNet, TwoLayerNet

__all__ = [
    "Add",
    "Affine",
    "BackendUnavailableError",
    "DeviceMismatchError",
    "ForwardNotCalledError",
    "GradientCheckError",
    "GradientCheckReport",
    "Mul",
    "MultiLayerNet",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "TwoLayerNet",
    "__version__",
    "available_backends",
    "check_gradients",
    "check_layer",
    "device_of",
    "functional",
    "namespace",
    "numerical_gradient",
    "resolve_device",
    "to_device",
    "to_numpy",
]
