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
from .gradcheck import numerical_gradient
from .layers import Add, Affine, ForwardNotCalledError, Mul, Relu, Sigmoid, SoftmaxWithLoss

__all__ = [
    "Add",
    "Affine",
    "BackendUnavailableError",
    "DeviceMismatchError",
    "ForwardNotCalledError",
    "Mul",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
    "__version__",
    "available_backends",
    "device_of",
    "functional",
    "namespace",
    "numerical_gradient",
    "resolve_device",
    "to_device",
    "to_numpy",
]
