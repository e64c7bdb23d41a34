"""Networks built from the layers: MultiLayerNet and its two-layer case, TwoLayerNet.

Every parameter array has one owner, the Affine layer that uses it; ``net.params``
is a live view onto those layers.  Reading ``net.params["W1"]`` gives the layer's
array, writing into it in place changes the layer's array, and assigning
``net.params["W1"] = new`` rebinds the layer's attribute, so an optimizer's update
is always what the next forward uses, however the namespace lets it update.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import MutableMapping

import numpy as np

from ._io import read_npz, write_npz
from .backend import (
    device_of,
    dtype_name,
    namespace,
    resolve_device,
    resolve_dtype,
    to_device,
    to_numpy,
)
from .gradcheck import numerical_gradients
from .layers import Affine, Relu, Sigmoid, SoftmaxWithLoss

__all__ = ["MultiLayerNet", "Parameters", "TwoLayerNet"]

_ACTIVATIONS = {"relu": Relu, "sigmoid": Sigmoid}


class Parameters(MutableMapping):
    """A live ``{name: array}`` view onto the attributes of the layers that own them.

    Assignment replaces the layer's array and must keep its shape, dtype and
    device (a ValueError/TypeError says which differs); names cannot be added
    or removed.
    """

    def __init__(self, slots: dict):
        self._slots = dict(slots)  # name -> (owner object, attribute name)

    def __getitem__(self, name):
        owner, attr = self._slots[name]
        return getattr(owner, attr)

    def __setitem__(self, name, value):
        if name not in self._slots:
            raise KeyError(f"unknown parameter {name!r}; the parameters are {list(self._slots)}")
        old = self[name]
        namespace(**{name: value, "current value": old})
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"params[{name!r}] must keep its shape {tuple(old.shape)}, got {tuple(value.shape)}"
            )
        if value.dtype != old.dtype:
            raise TypeError(
                f"params[{name!r}] must keep its dtype {dtype_name(old.dtype)}, "
                f"got {dtype_name(value.dtype)}"
            )
        owner, attr = self._slots[name]
        setattr(owner, attr, value)

    def __delitem__(self, name):
        raise TypeError("a network's parameters cannot be removed")

    def move(self, convert) -> None:
        """Replace every array by ``convert(array)``, which may change its device and dtype.
        All are converted before any is replaced: a failure leaves the net as it was."""
        converted = {name: convert(self[name]) for name in self._slots}
        for name, (owner, attr) in self._slots.items():
            setattr(owner, attr, converted[name])

    def gradients(self) -> dict:
        """The owners' gradients from their last backward: ``{name: d<attribute>}``."""
        return {name: getattr(owner, "d" + attr) for name, (owner, attr) in self._slots.items()}

    def __iter__(self):
        return iter(self._slots)

    def __len__(self):
        return len(self._slots)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.items())
        return f"Parameters({shapes})"


def _init_std(weight_init, fan_in: int) -> float:
    if weight_init == "he":  # keeps the variance of ReLU activations constant across layers
        return math.sqrt(2.0 / fan_in)
    if weight_init == "xavier":  # the same for sigmoid/tanh
        return math.sqrt(1.0 / fan_in)
    if isinstance(weight_init, numbers.Real) and not isinstance(weight_init, bool):
        std = float(weight_init)
        if math.isfinite(std) and std > 0:
            return std
    raise ValueError(
        f"weight_init must be 'he', 'xavier' or a positive standard deviation, got {weight_init!r}"
    )


def _check_sizes(sizes) -> list[int]:
    sizes = list(sizes)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        raise TypeError(f"layer sizes must be ints, got {sizes!r}")
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(
            f"sizes must list an input and an output size (and any hidden sizes), each >= 1, "
            f"got {sizes!r}"
        )
    return [int(s) for s in sizes]


class MultiLayerNet:
    """A fully connected network: (Affine, activation) * (L - 1), Affine, SoftmaxWithLoss.

    Parameters
    ----------
    sizes : sequence of int
        ``[input_size, hidden_1, ..., hidden_k, output_size]``.
    activation : {"relu", "sigmoid"}
    weight_init : "he", "xavier" or float
        He (sqrt(2 / fan_in)), Xavier (sqrt(1 / fan_in)) or a fixed standard
        deviation for the normal initial weights; biases start at zero.
    seed : int
        Seed of the host ``numpy.random.Generator`` the weights are drawn from:
        the same seed gives the same initial weights on every backend.
    device : str
        A device string (``"cpu"``, ``"cuda"``, ``"torch:cpu"``, ...).
    dtype : {"float32", "float64"}

    Attributes
    ----------
    params : Parameters
        ``W1, b1, ..., WL, bL``, a live view onto the Affine layers.
    layers : dict
        ``Affine1, Relu1, ..., AffineL`` in order.
    last_layer : SoftmaxWithLoss
    """

    def __init__(self, sizes, *, activation: str = "relu", weight_init="he", seed: int = 0,
                 device: str = "cpu", dtype: str = "float32"):
        self.sizes = _check_sizes(sizes)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.weight_init = weight_init
        dev = resolve_device(device)
        dt = resolve_dtype(dev.xp, dtype)
        if not dev.xp.isdtype(dt, "real floating"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        rng = np.random.default_rng(seed)
        self.layers = {}
        slots = {}
        n_layers = len(self.sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            std = _init_std(weight_init, fan_in)
            W = to_device(std * rng.standard_normal((fan_in, fan_out)), dev, dtype=dtype)
            b = to_device(np.zeros(fan_out), dev, dtype=dtype)
            # The first layer's input is the data: its gradient is never needed.
            affine = Affine(W, b, input_grad=i > 1)
            self.layers[f"Affine{i}"] = affine
            slots[f"W{i}"], slots[f"b{i}"] = (affine, "W"), (affine, "b")
            if i < n_layers:
                self.layers[f"{activation.capitalize()}{i}"] = _ACTIVATIONS[activation]()
        self.last_layer = SoftmaxWithLoss()
        self.params = Parameters(slots)

    # -- where the net lives -------------------------------------------------------------------

    @property
    def device(self) -> str:
        """The device string of the parameters."""
        return device_of(self.params["W1"]).name

    @property
    def dtype(self) -> str:
        """The parameters' dtype name, ``"float32"`` or ``"float64"``."""
        return dtype_name(self.params["W1"].dtype)

    def to(self, device: str, dtype: str | None = None):
        """Move the parameters to ``device`` (and ``dtype``), in place; returns ``self``.

        As with ``torch.nn.Module.to``, create the optimizer after moving the net.
        """
        dev = resolve_device(device)
        self.params.move(lambda value: to_device(value, dev, dtype=dtype))
        self._reset_caches()
        return self

    def _reset_caches(self) -> None:
        # Forward caches live on the old device; drop them so nothing stale is reused.
        for name, layer in self.layers.items():
            if isinstance(layer, Affine):
                layer.x = layer.x_shape = layer.dW = layer.db = None
            else:
                self.layers[name] = type(layer)()
        self.last_layer = SoftmaxWithLoss(check_labels=self.last_layer.check_labels)

    def __repr__(self):
        return (
            f"{type(self).__name__}(sizes={self.sizes}, activation={self.activation!r}, "
            f"device={self.device!r}, dtype={self.dtype!r})"
        )

    # -- the math --------------------------------------------------------------------------------

    def predict(self, x):
        """Scores (N, C) for inputs x of shape (N, D) (or (N, d1, ..., dk)) on the net's device."""
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        """Mean cross-entropy loss, a 0-d array on the net's device."""
        return self.last_layer.forward(self.predict(x), t)

    def accuracy(self, x, t, *, batch_size: int | None = None) -> float:
        """Fraction of samples whose highest score is the label, as a Python float.

        ``t`` holds labels (N,) or one-hot rows (N, C).  ``batch_size`` bounds
        the memory of the forward pass on large inputs.
        """
        n = x.shape[0]
        if t.shape[0] != n:
            raise ValueError(f"x has {n} samples but t has {t.shape[0]}")
        if n == 0:
            raise ValueError("accuracy of an empty batch is undefined")
        step = n if batch_size is None else int(batch_size)
        correct = 0
        for start in range(0, n, step):
            stop = min(start + step, n)  # the standard leaves out-of-bounds stops unspecified
            xb, tb = x[start:stop, ...], t[start:stop, ...]
            xp = namespace(x=xb, t=tb)
            pred = xp.argmax(self.predict(xb), axis=1)
            labels = tb if tb.ndim == 1 else xp.argmax(tb, axis=1)
            correct += int(xp.count_nonzero(pred == labels))
        return correct / n

    def gradient(self, x, t) -> dict:
        """Backprop gradients of the loss, ``{name: array}`` keyed and shaped like ``params``."""
        return self.loss_and_gradient(x, t)[1]

    def loss_and_gradient(self, x, t):
        """``(loss, gradient)`` from one forward and one backward pass."""
        loss = self.loss(x, t)
        dout = self.last_layer.backward(1.0)
        for layer in reversed(self.layers.values()):
            dout = layer.backward(dout)
        return loss, self.params.gradients()

    def train_step(self, x, t, optimizer):
        """One optimizer step on the batch ``(x, t)``; returns its loss (before the step).

        The same as ``loss, grads = loss_and_gradient(x, t)`` followed by
        ``optimizer.update(params, grads)``, except with plain SGD, whose step is
        fused into the backward pass (:meth:`Affine.backward_sgd`): every dx is
        computed with the weights before the step, and then ``W -= lr x^T dout``
        is one accumulating matrix product, with no gradient array.  The
        weights then differ from the unfused update by rounding only (a few
        units in the last place per step).
        """
        lr = optimizer.sgd_lr() if hasattr(optimizer, "sgd_lr") else None
        if lr is None:
            loss, grads = self.loss_and_gradient(x, t)
            optimizer.update(self.params, grads)
            return loss
        loss = self.loss(x, t)
        dout = self.last_layer.backward(1.0)
        for layer in reversed(self.layers.values()):
            dout = layer.backward_sgd(dout, lr) if isinstance(layer, Affine) else layer.backward(dout)
        optimizer.steps += 1
        return loss

    def numerical_gradient(self, x, t) -> dict:
        """Centered-difference gradients, computed on a float64 host copy of the net
        (see :func:`xpnet.gradcheck.numerical_gradients`); returned like :meth:`gradient`,
        on the net's device in its dtype.  Slow: two loss evaluations per parameter element.
        """
        host = numerical_gradients(self, x, t)
        return {k: to_device(v, self.device, dtype=self.dtype) for k, v in host.items()}


    # -- checkpoints -----------------------------------------------------------------------

    CHECKPOINT_FORMAT = "xpnet-net-1"

    def config(self) -> dict:
        """What it takes to rebuild this net (without its weights)."""
        return {"class": type(self).__name__, "sizes": self.sizes, "activation": self.activation,
                "weight_init": self.weight_init, "dtype": self.dtype}

    def save(self, path) -> None:
        """Write the parameters and the config to ``path`` as ``.npz``, atomically (no pickle).

        A model on any device is saved from a host copy and loads on any device.
        """
        arrays = {name: to_numpy(value) for name, value in self.params.items()}
        write_npz(path, {"format": self.CHECKPOINT_FORMAT, **self.config()}, arrays)

    @classmethod
    def _from_config(cls, config: dict, device: str, dtype: str):
        return cls(config["sizes"], activation=config["activation"],
                   weight_init=config["weight_init"], device=device, dtype=dtype)

    @classmethod
    def load(cls, path, device: str = "cpu", dtype: str | None = None):
        """Load a net written by :meth:`save` onto ``device`` (in its saved dtype unless ``dtype``).

        Raises ``ValueError`` for anything that is not such a checkpoint: an
        unreadable file, a missing or foreign header, wrong parameter names or
        shapes, non-float arrays.  Never unpickles.
        """
        arrays, config = _read_checkpoint(path)
        kind = {"TwoLayerNet": TwoLayerNet, "MultiLayerNet": MultiLayerNet}.get(config.get("class"))
        if kind is None or not issubclass(kind, cls):
            raise ValueError(f"{path}: holds a {config.get('class')!r}, which {cls.__name__}.load "
                             "cannot build; load it with its own class")
        try:
            net = kind._from_config(config, device, dtype or config["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: its config {config} does not build a net: {exc}") from None
        missing = sorted(set(net.params) - set(arrays))
        unexpected = sorted(set(arrays) - set(net.params))
        if missing or unexpected:
            raise ValueError(f"{path}: parameters missing {missing}, unexpected {unexpected}")
        for name in net.params:
            a = arrays[name]
            expected = tuple(net.params[name].shape)
            if a.shape != expected:
                raise ValueError(f"{path}: {name} has shape {a.shape}, expected {expected}")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"{path}: {name} has dtype {a.dtype}, expected a float dtype")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{path}: {name} holds NaN or infinite values")
            net.params[name] = to_device(a, device, dtype=net.dtype, copy=True)
        return net


def _read_checkpoint(path):
    """The arrays and the config of an xpnet model checkpoint; ValueError if it is not one."""
    config, arrays = read_npz(path)
    if config.get("format") != MultiLayerNet.CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {config.get('format')!r}")
    return arrays, config


class TwoLayerNet(MultiLayerNet):
    """The book's two-layer net: Affine1, Relu1, Affine2, SoftmaxWithLoss.

    Parameters
    ----------
    input_size, hidden_size, output_size : int
    weight_init_std : float, default 0.01
        Standard deviation of the normal initial weights (biases start at zero).
    seed, device, dtype : see :class:`MultiLayerNet`.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 weight_init_std: float = 0.01, *, seed: int = 0, device: str = "cpu",
                 dtype: str = "float32"):
        super().__init__([input_size, hidden_size, output_size], activation="relu",
                         weight_init=weight_init_std, seed=seed, device=device, dtype=dtype)

    def __repr__(self):
        d, h, c = self.sizes
        return f"TwoLayerNet({d}, {h}, {c}, device={self.device!r}, dtype={self.dtype!r})"

    @classmethod
    def _from_config(cls, config: dict, device: str, dtype: str):
        sizes = config["sizes"]
        if len(sizes) != 3 or config["activation"] != "relu":
            raise ValueError(f"a TwoLayerNet has 3 sizes and ReLU, got {sizes}, "
                             f"{config['activation']!r}")
        return cls(*sizes, weight_init_std=config["weight_init"], device=device, dtype=dtype)
