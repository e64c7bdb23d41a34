"""xpnet: neural-network layers with explicit forward()/backward(), written once against the
Python Array API, so the same code runs on NumPy (CPU), CuPy (GPU), torch, JAX and array_api_strict.

The layers (:mod:`xpnet.layers`), optimizers (:mod:`xpnet.optim`) and nets
(:mod:`xpnet.nets`) are exported here by their modules' ``__all__``: a new layer,
optimizer or net is public once its own module lists it.
"""

__version__ = "0.1.0"

from . import callbacks, checkpoint, datasets, functional, layers, nets, optim, schedules
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
from .layers import *  # noqa: F403 - Layer, ForwardNotCalledError and every layer class
from .nets import *  # noqa: F403 - Sequential, TwoLayerNet, MultiLayerNet, ...
from .optim import *  # noqa: F403 - SGD, Momentum, AdaGrad, Adam, Optimizer
from .evaluation import Evaluation, evaluate
from .train import DivergenceError, History, Trainer

# Everything that exists only for speed, imported here and nowhere else: it fills the slots
# of xpnet.speedups and registers its runner with xpnet.runners.  Without the files, the
# library is the same, slower.
import importlib.util as _util

if _util.find_spec("._fast", __name__) is not None:
    from . import _fast  # noqa: F401
if _util.find_spec("._graphs", __name__) is not None:  # compile=True on CUDA: CUDA graphs
    from . import _graphs  # noqa: F401
del _util

__all__ = sorted([
    *layers.__all__,
    *nets.__all__,
    *optim.__all__,
    "BackendUnavailableError",
    "DeviceMismatchError",
    "DivergenceError",
    "Evaluation",
    "GradientCheckError",
    "GradientCheckReport",
    "History",
    "Trainer",
    "__version__",
    "available_backends",
    "callbacks",
    "check_gradients",
    "check_layer",
    "checkpoint",
    "datasets",
    "device_of",
    "evaluate",
    "functional",
    "namespace",
    "numerical_gradient",
    "optim",
    "resolve_device",
    "schedules",
    "to_device",
    "to_numpy",
])
