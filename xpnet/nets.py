"""Networks: :class:`Sequential` (any list of layers and a loss layer), and the book's nets
as thin constructors of it: :class:`MultiLayerNet`, :class:`TwoLayerNet`,
:class:`SimpleConvNet` and :class:`DeepConvNet`.

Every parameter array has one owner, the layer that uses it; ``net.params`` is a
live view onto those layers.  Reading ``net.params["W1"]`` gives the layer's
array, writing into it in place changes the layer's array, and assigning
``net.params["W1"] = new`` rebinds the layer's attribute, so an optimizer's update
is always what the next forward uses, however the namespace lets it update.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, MutableMapping

import numpy as np

from . import checkpoint, speedups
from ._checks import (
    check_flag,
    check_seed,
    check_targets,
    checked_state_value,
    is_int,
    is_real,
)
from .backend import (
    computes_on_inputs,
    device_of,
    dtype_name,
    namespace,
    resolve_device,
    to_device,
    to_numpy,
)
from .functional import conv_output_size
from .gradcheck import numerical_gradients
from .layers import (
    Affine,
    BatchNormalization,
    Convolution,
    Dropout,
    Layer,
    Pooling,
    Relu,
    Sigmoid,
    SoftmaxWithLoss,
    grad_name,
    layer_class,
    type_name,
    unchecked,
)
from .optim import SGD

__all__ = ["DeepConvNet", "Layers", "MultiLayerNet", "Sequential", "SimpleConvNet", "TwoLayerNet"]  # exported by xpnet/__init__

_ACTIVATIONS = {"relu": Relu, "sigmoid": Sigmoid}
_FLOAT_DTYPES = ("float32", "float64")


class Layers(MutableMapping):
    """A net's layers by name, in order: ``net.layers``.

    Replacing a layer (``net.layers["Affine2"] = xpnet.Affine(W, b)``) re-derives the
    net's parameters from the new list at once, so ``net.params``, ``save`` and training
    all see the layer that is there (checked first: an xpnet.Layer whose arrays no other
    layer owns; a refused one changes nothing).  Names cannot be added or removed: build a
    new :class:`Sequential` for another architecture.
    """

    def __init__(self, net, named: dict):
        self._net, self._layers = net, named
        self.version = 0  # counts replacements: what a runner built from the layers checks

    def __getitem__(self, name):
        return self._layers[name]

    def __setitem__(self, name, layer):
        if name not in self._layers:
            raise KeyError(f"{type(self._net).__name__} has no layer {name!r} to replace (its "
                           f"layers are {list(self._layers)}); build a new Sequential to add one")
        named = _name_layers({**self._layers, name: layer})
        self._net._own(named)  # checks every array's owner before anything changes
        self._layers = named
        self.version += 1

    def __delitem__(self, name):
        raise TypeError("a network's layers cannot be removed; build a new Sequential")

    def __iter__(self):
        return iter(self._layers)

    def __len__(self):
        return len(self._layers)

    def values(self):  # the dict's own views: iterated in C at every step
        return self._layers.values()

    def items(self):
        return self._layers.items()

    def __repr__(self):
        return f"Layers({', '.join(self._layers)})"


class Parameters(MutableMapping):
    """A live ``{name: array}`` view onto the parameters of the layers that own them.

    Assignment replaces the layer's array and must keep its shape, dtype and
    device (a ValueError/TypeError says which differs); names cannot be added
    or removed.  Replacing a layer of the net (:class:`Layers`) re-derives the names.
    """

    def __init__(self, owners: dict):
        self._owners = dict(owners)  # name -> (layer, its parameter name)

    def __getitem__(self, name):
        layer, attr = self._owners[name]
        return getattr(layer, attr)

    def __setitem__(self, name, value):
        if name not in self._owners:
            raise KeyError(f"unknown parameter {name!r}; the parameters are {list(self._owners)}")
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
        layer, attr = self._owners[name]
        setattr(layer, attr, value)

    def __delitem__(self, name):
        raise TypeError("a network's parameters cannot be removed")

    def move(self, convert) -> None:
        """Replace every array by ``convert(array)``, which may change its device and dtype.
        All are converted before any is replaced: a failure leaves the net as it was."""
        converted = {name: convert(self[name]) for name in self._owners}
        for name, (layer, attr) in self._owners.items():
            setattr(layer, attr, converted[name])

    def gradients(self) -> dict:
        """The owners' gradients from their last backward, keyed like the parameters."""
        return {name: layer.grads[attr] for name, (layer, attr) in self._owners.items()}

    def __iter__(self):
        return iter(self._owners)

    def __len__(self):
        return len(self._owners)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.items())
        return f"Parameters({shapes})"


def _name_layers(layers) -> dict:
    """``{"Affine1": ..., "Relu1": ..., "Affine2": ...}``: each layer named by its class and
    its rank among the layers of that class (a dict of layers keeps its own names)."""
    if isinstance(layers, Mapping):
        named = dict(layers.items())
    else:
        named, seen = {}, {}
        for layer in layers:
            kind = type(layer).__name__
            seen[kind] = seen.get(kind, 0) + 1
            named[f"{kind}{seen[kind]}"] = layer
    if not named:
        raise ValueError("a Sequential net needs at least one layer")
    for name, layer in named.items():
        if not isinstance(layer, Layer):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not an xpnet.Layer: "
                            "subclass xpnet.Layer and name its parameters in param_names")
    return named


def _book_keys(names_per_layer) -> list:
    """``[[(name, key), ...] per layer]``: the k-th layer that has a parameter named W owns
    W<k>, as in the book (W1 b1 for the first Affine or Convolution, gamma1 beta1 for the
    first BatchNormalization)."""
    seen, keys = {}, []
    for names in names_per_layer:
        layer_keys = []
        for attr in names:
            seen[attr] = seen.get(attr, 0) + 1
            layer_keys.append((attr, f"{attr}{seen[attr]}"))
        keys.append(layer_keys)
    return keys


def _own_parameters(layers: dict) -> dict:
    """``{"W1": (layer, "W"), "b1": (layer, "b"), "W2": ...}``, numbered by :func:`_book_keys`."""
    owners, arrays = {}, {}
    keys = _book_keys(layer.param_names for layer in layers.values())
    for (layer_name, layer), layer_keys in zip(layers.items(), keys):
        for attr, key in layer_keys:
            owners[key] = (layer, attr)
            # One owner per array: an array used twice would take every update twice.
            first = arrays.setdefault(id(getattr(layer, attr)), (key, layer_name))
            if first[0] != key:
                raise ValueError(f"{layer_name}'s parameter {attr} is the array that is already "
                                 f"{first[0]} (of {first[1]}); give each layer arrays of its own "
                                 "(a layer listed twice shares them too)")
    return owners


def _own_state(layers: dict) -> dict:
    """``{"running_mean1": (layer, "running_mean"), ...}``: the layers' ``state_names``,
    numbered like the parameters."""
    keys = _book_keys(layer.state_names for layer in layers.values())
    return {key: (layer, attr) for layer, layer_keys in zip(layers.values(), keys)
            for attr, key in layer_keys}


_STEP_METHODS = ("train_step", "loss", "predict", "loss_and_gradient")


def runs_plain_steps(net) -> bool:
    """Whether ``net`` is a :class:`Sequential` whose class and instance keep Sequential's own
    step methods (``train_step``, ``loss``, ``predict``, ``loss_and_gradient``): the Trainer's
    runners may then run its layers' math themselves (unchecked, fused, compiled).  A net that
    changes one of them (to log, clip, ...) keeps its own step."""
    return isinstance(net, Sequential) and not any(
        name in vars(net) or getattr(type(net), name) is not getattr(Sequential, name)
        for name in _STEP_METHODS)


def _check_weight_decay(value) -> float:
    if not is_real(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {value!r}")
    return float(value)


class Sequential:
    """A network made of a list of layers and a loss layer, with the whole net protocol.

    Parameters
    ----------
    layers : list of :class:`xpnet.Layer` (or a dict ``{name: layer}``)
        Applied in order by :meth:`predict`.  Layers are named ``Affine1``, ``Relu1``,
        ``Affine2``, ... (by class, then rank) in :attr:`layers`.
    loss : Layer, default ``SoftmaxWithLoss()``
        ``forward(scores, t) -> loss`` and ``backward() -> dscores``.
    weight_decay : float >= 0, default 0
        L2 weight decay, as in the book: ``0.5 * weight_decay * sum(W ** 2)`` over the
        weights (each layer's ``decay_names``: the ``W`` of Affine and Convolution, never
        biases or batch-norm scales) is added to :meth:`loss`, and ``weight_decay * W``
        to the gradients.

    Attributes
    ----------
    layers : Layers
        The layers by name, in order (a mapping; replacing one re-derives ``params``).
    last_layer : the loss layer.
    params : Parameters
        A live view ``{"W1": ..., "b1": ..., "W2": ...}`` onto the layers' parameters:
        the k-th layer with a parameter named W owns W<k>.
    state : dict
        The layers' other state (``Layer.state_names``: running statistics, dropout
        counts), keyed likewise (``running_mean1``, ``draws1``); saved with the net and
        in training checkpoints, set with :meth:`load_state`.

    With plain :class:`xpnet.SGD`, :meth:`train_step` updates every parameter inside the
    backward pass (``xpnet._fast``); any other optimizer gets the gradients, then
    ``update``.  ``predict(x, train=...)`` is passed on to the layers whose class sets
    ``has_train_mode``; :meth:`gradient` and :meth:`train_step` run in training mode.
    """

    def __init__(self, layers, loss=None, *, weight_decay: float = 0.0):
        self.weight_decay = _check_weight_decay(weight_decay)
        named = _name_layers(layers)
        self.last_layer = SoftmaxWithLoss() if loss is None else loss
        if not callable(getattr(self.last_layer, "forward", None)) or not callable(
                getattr(self.last_layer, "backward", None)):
            raise TypeError(f"loss must be a layer with forward(scores, t) and backward(), got "
                            f"{type(self.last_layer).__name__}")
        self.params = Parameters({})
        self._own(named)
        self.layers = Layers(self, named)
        try:
            checks = "check_labels" in inspect.signature(self.last_layer.forward).parameters
        except (TypeError, ValueError):
            checks = False
        self._loss_checks_labels = checks
        self._loss_forward = unchecked(self.last_layer, "forward")
        self._loss_options = {"check_labels": False} if checks else {}  # checked once, up front
        self._loss_backward = unchecked(self.last_layer, "backward")

    def _own(self, named: dict) -> None:
        """Derive the parameter and state tables, and the unchecked steps' plan, from the
        layers ``named`` (checked first: a refused list changes nothing)."""
        owners = _own_parameters(named)
        self.params._owners = owners
        self._decayed = [key for key, (layer, attr) in owners.items() if attr in layer.decay_names]
        self._state = _own_state(named)
        # What the Trainer's steps call: each layer's math without its checks (the run's
        # data were checked once, at its start), and where each parameter and gradient is.
        self._table = [(key, layer, attr, grad_name(attr)) for key, (layer, attr) in owners.items()]
        steps = list(named.values())
        if speedups.fuse_layers is not None:  # neighbours that run as one (Relu, max pool)
            steps = speedups.fuse_layers(steps)
        self._forwards = [(unchecked(step, "forward"), step, step.has_train_mode)
                          for step in steps]
        self._backwards = [(unchecked(step, "backward"), step) for step in reversed(steps)]

    # -- where the net lives -------------------------------------------------------------------

    def _first_param(self):
        if not len(self.params):
            raise ValueError(f"{type(self).__name__} has no parameters, so no device or dtype")
        return next(iter(self.params.values()))

    @property
    def device(self) -> str:
        """The device string of the parameters."""
        return device_of(self._first_param()).name

    @property
    def dtype(self) -> str:
        """The parameters' dtype name, ``"float32"`` or ``"float64"``."""
        return dtype_name(self._first_param().dtype)

    def to(self, device: str, dtype: str | None = None):
        """Move the parameters (and the layers' state arrays) to ``device`` (and ``dtype``), in
        place; returns ``self``.

        As with ``torch.nn.Module.to``, create the optimizer after moving the net.
        """
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES} or None, got {dtype!r}")
        dev = resolve_device(device)
        state = {key: value if isinstance(value, int) else to_device(value, dev, dtype=dtype)
                 for key, value in self.state.items()}  # all converted before anything changes
        self.params.move(lambda value: to_device(value, dev, dtype=dtype))
        for key, (layer, attr) in self._state.items():
            setattr(layer, attr, state[key])
        for layer in (*self.layers.values(), self.last_layer):  # caches live on the old device
            if isinstance(layer, Layer):
                layer.reset()
        return self

    def __repr__(self):
        return f"{type(self).__name__}([{', '.join(map(repr, self.layers.values()))}])"

    # -- the math --------------------------------------------------------------------------------

    def predict(self, x, *, train: bool = False):
        """Scores (N, C) for inputs x (N, ...) on the net's device; ``train`` selects the
        training behaviour of the layers that have one (dropout, batch normalization).
        (Each layer makes its inputs' device current itself: no context is taken here.)"""
        train = check_flag("train", train)
        for layer in self.layers.values():
            x = layer.forward(x, train=train) if layer.has_train_mode else layer.forward(x)
        return x

    @computes_on_inputs
    def loss(self, x, t, *, train: bool = False, check_labels: bool = True):
        """The loss, a 0-d array on the net's device.  ``check_labels=False`` skips the
        label range check, for labels the caller has already checked (the Trainer does)."""
        scores = self.predict(x, train=train)
        if self._loss_checks_labels:
            loss = self.last_layer.forward(scores, t, check_labels=check_labels)
        else:
            loss = self.last_layer.forward(scores, t)
        return self._with_decay(loss) if self.weight_decay and self._decayed else loss

    def _with_decay(self, loss):
        """``loss + 0.5 weight_decay sum(W ** 2)`` over the decayed weights."""
        xp = namespace(loss=loss)
        return loss + 0.5 * self.weight_decay * sum(
            xp.sum(self.params[key] * self.params[key]) for key in self._decayed)

    def _decay_gradients(self, grads: dict) -> None:
        """``grads[W] += weight_decay W`` for the decayed weights (new arrays)."""
        for key in self._decayed:  # d/dW of 0.5 lambda sum(W ** 2) is lambda W
            grads[key] = grads[key] + self.weight_decay * self.params[key]

    @computes_on_inputs
    def accuracy(self, x, t, *, batch_size: int | None = None) -> float:
        """Fraction of samples whose highest score is the label, as a Python float.

        ``t`` holds labels (N,) or one-hot rows (N, C).  ``batch_size`` bounds
        the memory of the forward pass on large inputs.
        """
        namespace(x=x, t=t)  # arrays of one library and device, or a TypeError naming them
        n = x.shape[0]
        if t.shape[0] != n:
            raise ValueError(f"x has {n} samples but t has {t.shape[0]}")
        if n == 0:
            raise ValueError("accuracy of an empty batch is undefined")
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        step = n if batch_size is None else int(batch_size)
        correct = 0
        for start in range(0, n, step):
            stop = min(start + step, n)  # the standard leaves out-of-bounds stops unspecified
            xb, tb = x[start:stop, ...], t[start:stop, ...]
            xp = namespace(x=xb, t=tb)
            scores = self.predict(xb)
            # The targets checked against the scores (labels in range, rows >= 0).
            labels = tb if check_targets(xp, scores, tb) else xp.argmax(tb, axis=1)
            correct += int(xp.count_nonzero(xp.argmax(scores, axis=1) == labels))
        return correct / n

    def gradient(self, x, t) -> dict:
        """Backprop gradients of the loss, ``{name: array}`` keyed and shaped like ``params``."""
        return self.loss_and_gradient(x, t)[1]

    @computes_on_inputs
    def loss_and_gradient(self, x, t, *, check_labels: bool = True):
        """``(loss, gradient)`` from one forward and one backward pass, in training mode."""
        loss = self.loss(x, t, train=True, check_labels=check_labels)
        dout = self.last_layer.backward()
        for layer in reversed(self.layers.values()):
            dout = layer.backward(dout)
        grads = self.params.gradients()
        if self.weight_decay:
            self._decay_gradients(grads)
        return loss, grads

    @computes_on_inputs
    def train_step(self, x, t, optimizer, *, check_labels: bool = True):
        """One optimizer step on the batch ``(x, t)``; returns its loss (before the step).

        ``loss, grads = loss_and_gradient(x, t)`` then ``optimizer.update(params, grads)``;
        with plain SGD the update is fused into the backward pass instead (equal up to
        rounding; see :func:`xpnet._fast.sgd_train_step`).
        """
        if speedups.sgd_step is not None and type(optimizer) is SGD:
            return speedups.sgd_step(self, x, t, optimizer, check_labels)
        loss, grads = self.loss_and_gradient(x, t, check_labels=check_labels)
        optimizer.update(self.params, grads)
        return loss

    # -- the Trainer's steps: the layers' math, unchecked ----------------------------------------

    def unchecked_loss(self, x, t):
        """:meth:`loss` in training mode, calling each layer's math without its checks: for
        data checked once (``Trainer.fit`` checks a run's data before its first step).  Run it
        inside the data's device context."""
        for forward, layer, train in self._forwards:
            x = forward(layer, x, train=True) if train else forward(layer, x)
        loss = self._loss_forward(self.last_layer, x, t, **self._loss_options)
        return self._with_decay(loss) if self.weight_decay and self._decayed else loss

    def unchecked_loss_and_gradient(self, x, t):
        """:meth:`loss_and_gradient` without the layers' checks (see :meth:`unchecked_loss`)."""
        loss = self.unchecked_loss(x, t)
        dout = self._loss_backward(self.last_layer)
        for backward, layer in self._backwards:
            dout = backward(layer, dout)
        grads = {key: getattr(layer, grad) for key, layer, _, grad in self._table}
        if self.weight_decay:
            self._decay_gradients(grads)
        return loss, grads

    def unchecked_step(self, x, t, optimizer):
        """:meth:`train_step` without the checks (the net's layers' nor the optimizer's): the
        step the Trainer's eager runner takes, on data checked once, with an optimizer whose
        state fits the parameters.  The same arithmetic as :meth:`train_step`."""
        if speedups.sgd_step is not None and type(optimizer) is SGD:
            return speedups.sgd_step(self, x, t, optimizer, None)
        loss, grads = self.unchecked_loss_and_gradient(x, t)
        params = {key: getattr(layer, attr) for key, layer, attr, _ in self._table}
        optimizer.apply(params, grads)
        for key, layer, attr, _ in self._table:  # a library that rebinds (JAX): the new arrays
            if params[key] is not getattr(layer, attr):
                setattr(layer, attr, params[key])
        return loss

    def summary(self, input_shape=None) -> str:
        """A table of the net: one row per layer (its name, its output's shape for a batch of
        N samples of ``input_shape``, its parameter count), then the totals, as Keras's and
        torchinfo's summaries show them.

        ``input_shape`` is one sample's shape, ``(784,)`` or ``(1, 28, 28)``; by default the
        net's own where it knows it (the book's nets, a first Affine layer), else the shapes
        show as ``?``.  The shapes come from one forward pass of a zero sample in inference
        mode, after which every layer is put back as it was (no statistic or draw changes).
        """
        if input_shape is None:
            input_shape = self._input_shape()
        elif (not isinstance(input_shape, (tuple, list))
              or not all(is_int(d) and d >= 1 for d in input_shape)):
            raise ValueError(f"input_shape must be one sample's shape, ints >= 1 (e.g. (784,) "
                             f"or (1, 28, 28)), got {input_shape!r}")
        shapes = self._output_shapes(tuple(input_shape)) if input_shape else {}
        rows = [(name, type(layer).__name__, shapes.get(name, "?"),
                 sum(math.prod(tuple(p.shape)) for p in layer.params.values()))
                for name, layer in self.layers.items()]
        rows.append(("(loss)", type(self.last_layer).__name__, "", 0))
        total = sum(r[3] for r in rows)
        size = total * (4 if self.dtype == "float32" else 8)
        head = f"{type(self).__name__} on {self.device}, {self.dtype}" + (
            f", input {tuple(input_shape)}" if input_shape else "")
        widths = [max(len(r[0]) for r in rows), max(len(r[1]) for r in rows),
                  max(12, *(len(str(r[2])) for r in rows))]
        lines = [head, f"{'layer':<{widths[0]}}  {'type':<{widths[1]}}  "
                 f"{'output shape':<{widths[2]}}  {'parameters':>10}"]
        lines.append("-" * len(lines[1]))
        lines += [f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {str(shape):<{widths[2]}}  "
                  f"{count:>10,}" for name, kind, shape, count in rows]
        lines.append("-" * len(lines[1]))
        lines.append(f"total: {total:,} parameters ({size / 2**20:.2f} MiB in {self.dtype})")
        return "\n".join(lines)

    def _input_shape(self):
        """One sample's shape where the net knows it (its constructor's sizes or input_dim, a
        first Affine layer's inputs), else None."""
        args = getattr(self, "_args", {})
        if "input_dim" in args:
            return tuple(args["input_dim"])
        if "sizes" in args:
            return (args["sizes"][0],)
        first = next(iter(self.layers.values()), None)
        if isinstance(first, Affine):
            return (int(first.W.shape[0]),)
        return None

    def _output_shapes(self, input_shape: tuple) -> dict:
        """``{layer name: "(N, ...)"}`` from a forward of one zero sample, every layer's
        attributes put back afterwards; ``{}`` where the sample does not fit the layers."""
        saved = {name: dict(vars(layer)) for name, layer in self.layers.items()}
        shapes = {}
        try:
            x = to_device(np.zeros((1, *input_shape)), self.device, dtype=self.dtype)
            for name, layer in self.layers.items():
                x = layer.forward(x, train=False) if layer.has_train_mode else layer.forward(x)
                shapes[name] = "(N" + "".join(f", {d}" for d in tuple(x.shape)[1:]) + ")"
        except (ValueError, TypeError):
            pass  # the rest show as "?"
        finally:
            for name, layer in self.layers.items():
                vars(layer).clear()
                vars(layer).update(saved[name])
        return shapes

    def numerical_gradient(self, x, t) -> dict:
        """Centered-difference gradients, computed on a float64 host copy of the net
        (see :func:`xpnet.gradcheck.numerical_gradients`); returned like :meth:`gradient`,
        on the net's device in its dtype.  Slow: two loss evaluations per parameter element.
        """
        host = numerical_gradients(self, x, t)
        return {k: to_device(v, self.device, dtype=self.dtype) for k, v in host.items()}

    # -- state besides the parameters ----------------------------------------------------------

    @property
    def state(self) -> dict:
        """``{key: value}`` of the layers' ``state_names`` (arrays on the net's device, ints)."""
        return {key: getattr(layer, attr) for key, (layer, attr) in self._state.items()}

    def checked_state(self, values: dict, where: str = "state") -> dict:
        """``values`` (host or device arrays, ints) checked against :attr:`state` and converted
        to what :meth:`load_state` sets; ValueError naming the key otherwise.  Changes nothing."""
        values = dict(values)
        missing, unknown = sorted(set(self._state) - set(values)), sorted(set(values) - set(self._state))
        if missing or unknown:
            raise ValueError(f"{where}: state missing {missing}, unexpected {unknown}")
        return {key: checked_state_value(f"{where}[{key!r}]", values[key], current,
                                          *self._state[key])
                for key, current in self.state.items()}

    def load_state(self, values: dict, where: str = "state") -> None:
        """Set the layers' state from ``values`` (as :attr:`state` gives it, or host copies of
        it); everything is checked before anything is set (errors name ``where``)."""
        checked = self.checked_state(values, where)
        for key, (layer, attr) in self._state.items():
            setattr(layer, attr, checked[key])

    def host_state(self) -> dict:
        """:attr:`state` as host NumPy arrays (ints as 0-d int64), for files."""
        return {key: np.asarray(value, dtype=np.int64) if isinstance(value, int) else to_numpy(value)
                for key, value in self.state.items()}

    # -- files -----------------------------------------------------------------------------------

    def config(self) -> dict:
        """What it takes to rebuild this net around its parameters: each layer's class
        and :meth:`Layer.config`, and the loss layer's."""
        def describe(layer):
            return {"type": type_name(type(layer)), **layer.config()}

        return {"class": "Sequential", "dtype": self.dtype, "weight_decay": self.weight_decay,
                "layers": [describe(layer) for layer in self.layers.values()],
                "loss": describe(self.last_layer)}

    def save(self, path) -> None:
        """Write the parameters and the config to ``path`` as ``.npz``, atomically (no pickle).

        A model on any device is saved from a host copy and loads on any device.
        """
        arrays = {name: to_numpy(value) for name, value in self.params.items()}
        arrays.update({checkpoint.STATE_PREFIX + key: value
                       for key, value in self.host_state().items()})
        checkpoint.save_model(path, self.config(), arrays)

    def save_params(self, file_name="params.pkl") -> None:
        """The book's name for :meth:`save` (``network.save_params("params.pkl")``): the
        weights and layer state written to ``file_name`` exactly, atomically, in xpnet's
        ``.npz`` format, never a pickle, whatever the name says."""
        self.save(file_name)

    def load_params(self, file_name="params.pkl") -> None:
        """The book's ``network.load_params("params.pkl")``: the weights (and layer state) of
        a file written by :meth:`save_params` or :meth:`save` put into this net, in place, on
        its device and in its dtype.  The file must hold this net's parameters by name and
        shape; everything is checked before anything changes (ValueError otherwise)."""
        _, arrays = checkpoint.read_model(file_name)
        state = checkpoint.split_state(arrays)
        checkpoint.check_param_arrays(file_name, arrays, {k: tuple(v.shape) for k, v in
                                                          self.params.items()}, self.dtype)
        checked = self.checked_state(state, where=f"{file_name}: state") if self._state else {}
        moved = {k: to_device(arrays[k], self.device, dtype=self.dtype, copy=True)
                 for k in self.params}
        for k, value in moved.items():  # (nothing can fail from here on)
            self.params[k] = value
        if checked:
            self.load_state(checked)

    @classmethod
    def load(cls, path, device: str = "cpu", dtype: str | None = None):
        """Load a net written by :meth:`save` onto ``device`` (in its saved dtype unless ``dtype``).

        Raises ``ValueError`` for anything that is not such a checkpoint: an
        unreadable file, a missing or foreign header, wrong parameter names or
        shapes, non-float arrays.  Never unpickles.
        """
        resolve_device(device)  # (a device string it does not know: the argument's fault)
        config, arrays = checkpoint.read_model(path)
        state = checkpoint.split_state(arrays)
        kind = _NET_CLASSES.get(config.get("class"))
        if kind is None or not issubclass(kind, cls):
            raise ValueError(f"{path}: holds a {config.get('class')!r}, which {cls.__name__}.load "
                             "cannot build; load it with its own class")
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES} or None, got {dtype!r}")
        if dtype is None and config.get("dtype") not in _FLOAT_DTYPES:
            raise ValueError(f"{path}: its header's dtype {config.get('dtype')!r} is not one of "
                             f"{_FLOAT_DTYPES}")
        dtype = dtype or config["dtype"]
        try:
            # The header must describe the arrays the file holds before anything is built:
            # a header alone may not make us allocate (sizes [6, 10**9, 3] in a 1 kB file).
            expected = kind._param_shapes(config, arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: its config {config} does not build a net: {exc}") from None
        checkpoint.check_param_arrays(path, arrays, expected, dtype)
        try:
            net = kind._from_config(config, arrays, device, dtype)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a foreign config
            raise ValueError(f"{path}: its config {config} does not build a net: {exc}") from None
        net.load_state(state, where=str(path))
        return net

    @classmethod
    def _param_shapes(cls, config: dict, arrays: dict) -> dict:
        """``{name: shape}`` that ``config`` implies, from its header alone.  A Sequential of
        any layers takes each shape from the file's array (its layers check them), so only
        the names come from the header; a name without an array is reported missing."""
        keys = _book_keys(layer_class(spec["type"]).param_names for spec in config["layers"])
        return {key: tuple(arrays[key].shape) if key in arrays else None
                for layer_keys in keys for _, key in layer_keys}

    @classmethod
    def _from_config(cls, config: dict, arrays: dict, device: str, dtype: str):
        """A net of ``config``'s architecture on ``device`` with the (checked) ``arrays``."""
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
        kinds = [layer_class(spec["type"]) for spec in config["layers"]]
        layers = []
        for spec, kind, layer_keys in zip(config["layers"], kinds,
                                          _book_keys(k.param_names for k in kinds)):
            params = {attr: to_device(arrays[key], device, dtype=dtype, copy=True)
                      for attr, key in layer_keys}
            options = {k: v for k, v in spec.items() if k != "type"}
            layers.append(kind(**params, **options))
        options = {k: v for k, v in config["loss"].items() if k != "type"}
        return cls(layers, layer_class(config["loss"]["type"])(**options),
                   weight_decay=config.get("weight_decay", 0.0))


def _init_std(weight_init, fan_in: int) -> float:
    if weight_init == "he":  # keeps the variance of ReLU activations constant across layers
        return math.sqrt(2.0 / fan_in)
    if weight_init == "xavier":  # the same for sigmoid/tanh
        return math.sqrt(1.0 / fan_in)
    if is_real(weight_init):
        std = float(weight_init)
        if math.isfinite(std) and std > 0:
            return std
    raise ValueError(
        f"weight_init must be 'he', 'xavier' or a positive standard deviation, got {weight_init!r}"
    )


def _check_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"sizes must be a sequence of ints [input, hidden..., output], got "
                        f"{type(sizes).__name__} {sizes!r}")
    sizes = list(sizes)
    if not all(is_int(s) for s in sizes):
        raise TypeError(f"layer sizes must be ints, got {sizes!r}")
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(
            f"sizes must list an input and an output size (and any hidden sizes), each >= 1, "
            f"got {sizes!r}"
        )
    return [int(s) for s in sizes]


# -- the book's nets, built from a plan -------------------------------------------------------
#
# A plan is the list of layers a net is made of, as tuples: ("affine", fan_in, fan_out),
# ("conv", (FN, C, FH, FW), stride, pad), ("bn", features), ("pool", size, stride),
# ("dropout", ratio), ("relu",), ("sigmoid",).  The shapes of a saved net's parameters come
# from its plan before anything is allocated; the net itself is built from the same plan.


def _plan_param_names(item) -> tuple:
    return {"affine": ("W", "b"), "conv": ("W", "b"), "bn": ("gamma", "beta")}.get(item[0], ())


def _plan_shapes(plan) -> dict:
    """``{"W1": shape, "b1": shape, ...}`` of the parameters of ``plan``, numbered as the net
    numbers them."""
    shapes = {}
    keys = _book_keys(_plan_param_names(item) for item in plan)
    for item, layer_keys in zip(plan, keys):
        if not layer_keys:
            continue
        weight = (item[1], item[2]) if item[0] == "affine" else item[1]
        for attr, key in layer_keys:
            if attr == "W":
                shapes[key] = tuple(weight)
            elif attr == "b":
                shapes[key] = (weight[1] if item[0] == "affine" else weight[0],)
            else:  # gamma, beta
                shapes[key] = (item[1],)
    return shapes


def _dropout_seeds(seed: int, count: int) -> list:
    """Distinct seeds for the dropout layers of a net seeded with ``seed`` (two layers with one
    seed would drop the same positions)."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(count)]


def _build(plan, weight_init, seed, device, dtype) -> list:
    """The layers of ``plan``: normal weights (std from ``weight_init`` and each layer's fan-in)
    drawn in order from a host generator seeded with ``seed``, zero biases, batch norm at
    gamma 1 and beta 0; the first layer computes no gradient for the data."""
    if dtype not in _FLOAT_DTYPES:  # (float16, as to() and load(dtype=) refuse it too)
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    dev = resolve_device(device)
    rng = np.random.default_rng(check_seed(seed))
    seeds = iter(_dropout_seeds(seed, sum(item[0] == "dropout" for item in plan)))

    def const(value, n):
        return to_device(np.full(n, value), dev, dtype=dtype)

    layers = []
    for kind, *args in plan:
        if kind in ("affine", "conv"):
            shape = tuple(args[:2]) if kind == "affine" else args[0]
            std = _init_std(weight_init, math.prod(shape[:1] if kind == "affine" else shape[1:]))
            W = to_device(std * rng.standard_normal(shape), dev, dtype=dtype)
            b = const(0.0, shape[1] if kind == "affine" else shape[0])
            options = {} if kind == "affine" else {"stride": args[1], "pad": args[2]}
            layers.append((Affine if kind == "affine" else Convolution)(
                W, b, input_grad=bool(layers), **options))  # the data needs no gradient
        elif kind == "bn":
            layers.append(BatchNormalization(const(1.0, args[0]), const(0.0, args[0])))
        elif kind == "pool":
            layers.append(Pooling(args[0], args[0], stride=args[1]))
        elif kind == "dropout":
            layers.append(Dropout(args[0], seed=next(seeds)))
        else:
            layers.append(_ACTIVATIONS[kind]())
    return layers


def _std_or_name(name: str, value):
    """A weight initialization: a name (checked by :func:`_init_std`) or a real number, kept
    as a Python float (a NumPy scalar would not save); TypeError naming ``name`` otherwise."""
    if isinstance(value, str):
        return value
    if not is_real(value):
        raise TypeError(f"{name} must be 'he', 'xavier' or a positive standard deviation, got "
                        f"{type(value).__name__} {value!r}")
    return float(value)


def _check_ratio(name: str, value) -> float:
    if not is_real(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class _PlannedNet(Sequential):
    """A book net: a Sequential built from a plan by its constructor, whose arguments (JSON
    values, besides seed, device and dtype) are its saved config.  (The seed drew the initial
    weights, which the file holds, and the dropout layers' seeds, which their state holds.)"""

    def _setup(self, args: dict, plan, weight_init, seed, device, dtype, weight_decay):
        super().__init__(_build(plan, weight_init, seed, device, dtype),
                         weight_decay=weight_decay)
        self._args = args

    _repr_keys: tuple = ()  # the constructor's arguments that repr shows

    def __repr__(self):
        args = "".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}, "
                       for k, v in ((k, self._args[k]) for k in self._repr_keys))
        return f"{type(self).__name__}({args}device={self.device!r}, dtype={self.dtype!r})"

    def config(self) -> dict:
        """What it takes to rebuild this net (without its weights): its constructor's arguments."""
        return {"class": type(self).__name__, **self._args, "dtype": self.dtype}

    @classmethod
    def _plan_of(cls, config: dict) -> list:  # pragma: no cover - every net defines its own
        raise NotImplementedError

    @classmethod
    def _param_shapes(cls, config: dict, arrays: dict) -> dict:
        return _plan_shapes(cls._plan_of(config))

    @classmethod
    def _from_config(cls, config: dict, arrays: dict, device: str, dtype: str):
        args = {k: v for k, v in config.items() if k not in ("class", "dtype")}
        return cls._with_arrays(cls(**args, device=device, dtype=dtype), arrays, device)

    @staticmethod
    def _with_arrays(net, arrays: dict, device: str):
        """``net`` with its parameters replaced by the (checked) host ``arrays``."""
        for name in net.params:
            net.params[name] = to_device(arrays[name], device, dtype=net.dtype, copy=True)
        return net


def _mlp_plan(sizes, activation, use_batchnorm=False, use_dropout=False, dropout_ratio=0.5):
    """(Affine, [BatchNormalization], activation, [Dropout]) * (L - 1), Affine."""
    sizes = _check_sizes(sizes)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    plan = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        plan.append(("affine", fan_in, fan_out))
        if i < len(sizes) - 2:
            plan += [("bn", fan_out)] * bool(use_batchnorm) + [(activation,)]
            plan += [("dropout", _check_ratio("dropout_ratio", dropout_ratio))] * bool(use_dropout)
    return plan


class MultiLayerNet(_PlannedNet):
    """A fully connected network: (Affine, activation) * (L - 1), Affine, SoftmaxWithLoss;
    with the options of the book's ``MultiLayerNetExtend``, (Affine, BatchNormalization,
    activation, Dropout) for each hidden layer.

    Parameters
    ----------
    sizes : sequence of int
        ``[input_size, hidden_1, ..., hidden_k, output_size]``.
    activation : {"relu", "sigmoid"}
    weight_init : "he", "xavier" or float
        He (sqrt(2 / fan_in)), Xavier (sqrt(1 / fan_in)) or a fixed standard
        deviation for the normal initial weights; biases start at zero.
    use_batchnorm : bool, default False
        A :class:`xpnet.BatchNormalization` after each hidden Affine (parameters
        ``gamma1, beta1, ...``).
    use_dropout : bool, default False
        A :class:`xpnet.Dropout` of ``dropout_ratio`` after each hidden activation.
    dropout_ratio : float in [0, 1), default 0.5
    weight_decay : float >= 0, default 0
        L2 weight decay on the W's (see :class:`Sequential`).
    seed : int
        Seed of the host ``numpy.random.Generator`` the weights are drawn from (the
        same seed gives the same initial weights on every backend), and of the dropout
        masks.
    device : str
        A device string (``"cpu"``, ``"cuda"``, ``"torch:cpu"``, ...).
    dtype : {"float32", "float64"}

    Attributes
    ----------
    params : Parameters
        ``W1, b1, ..., WL, bL`` (and ``gamma1, beta1, ...``), a live view onto the layers.
    layers : dict
        ``Affine1, Relu1, ..., AffineL`` in order.
    last_layer : SoftmaxWithLoss
    """

    def __init__(self, sizes, *, activation: str = "relu", weight_init="he",
                 use_batchnorm: bool = False, use_dropout: bool = False,
                 dropout_ratio: float = 0.5, weight_decay: float = 0.0, seed: int = 0,
                 device: str = "cpu", dtype: str = "float32"):
        use_batchnorm = check_flag("use_batchnorm", use_batchnorm)
        use_dropout = check_flag("use_dropout", use_dropout)
        plan = _mlp_plan(sizes, activation, use_batchnorm, use_dropout, dropout_ratio)
        sizes = _check_sizes(sizes)
        # A standard deviation is kept as a Python float (a NumPy scalar would not save).
        weight_init = _std_or_name("weight_init", weight_init)
        args = {"sizes": sizes, "activation": activation, "weight_init": weight_init,
                "use_batchnorm": use_batchnorm, "use_dropout": use_dropout,
                "dropout_ratio": float(dropout_ratio),
                "weight_decay": _check_weight_decay(weight_decay)}
        self._setup(args, plan, weight_init, seed, device, dtype, weight_decay)
        self.sizes, self.activation, self.weight_init = sizes, activation, weight_init

    def __repr__(self):
        extras = "".join(f", {k}={self._args[k]!r}" for k in ("use_batchnorm", "use_dropout",
                                                              "weight_decay") if self._args[k])
        return (f"{type(self).__name__}(sizes={self.sizes}, activation={self.activation!r}"
                f"{extras}, device={self.device!r}, dtype={self.dtype!r})")

    @classmethod
    def _plan_of(cls, config: dict) -> list:
        return _mlp_plan(config["sizes"], config["activation"],
                         *(config.get(k, d) for k, d in (("use_batchnorm", False),
                                                         ("use_dropout", False),
                                                         ("dropout_ratio", 0.5))))


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
    def _from_config(cls, config: dict, arrays: dict, device: str, dtype: str):
        sizes = config["sizes"]
        if len(sizes) != 3 or config["activation"] != "relu" or any(
                config.get(k) for k in ("use_batchnorm", "use_dropout", "weight_decay")):
            raise ValueError(f"a TwoLayerNet has 3 sizes, ReLU and no batch norm, dropout or "
                             f"weight decay, got {config}")
        return cls._with_arrays(cls(*sizes, weight_init_std=config["weight_init"],
                                    device=device, dtype=dtype), arrays, device)


# -- convolutional nets --------------------------------------------------------------------------

_CONV_KEYS = ("filter_num", "filter_size", "pad", "stride")


def _check_input_dim(input_dim) -> list:
    dims = list(input_dim) if isinstance(input_dim, (list, tuple)) else None
    if dims is None or len(dims) != 3 or not all(
            is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"input_dim must be (channels, height, width), three ints >= 1, got "
                         f"{input_dim!r}")
    return [int(d) for d in dims]


def _check_conv_param(name: str, param) -> dict:
    if not isinstance(param, dict) or set(param) != set(_CONV_KEYS):
        raise ValueError(f"{name} must be a dict with the keys {list(_CONV_KEYS)}, got {param!r}")
    minimum = {"filter_num": 1, "filter_size": 1, "pad": 0, "stride": 1}
    for key in _CONV_KEYS:
        v = param[key]
        if not is_int(v) or v < minimum[key]:
            raise ValueError(f"{name}[{key!r}] must be an int >= {minimum[key]}, got {v!r}")
    return {key: int(param[key]) for key in _CONV_KEYS}


def _conv_plan(dims: list, blocks, name: str) -> tuple:
    """The plan of convolution blocks on inputs of ``dims`` (C, H, W), and the output dims.
    ``blocks``: ``("conv", param_name, param)``, ``("relu",)`` or ``("pool",)`` (2x2, stride 2)."""
    plan = []
    c, h, w = dims
    for block in blocks:
        if block[0] == "conv":
            p = block[2]
            fs = p["filter_size"]
            h, w = (conv_output_size(n, fs, p["stride"], p["pad"]) for n in (h, w))
            plan.append(("conv", (p["filter_num"], c, fs, fs), p["stride"], p["pad"]))
            c = p["filter_num"]
            where = f"{block[1]} {p}"
        elif block[0] == "pool":
            h, w = conv_output_size(h, 2, 2, 0), conv_output_size(w, 2, 2, 0)
            plan.append(("pool", 2, 2))
            where = "2x2 pooling"
        else:
            plan.append(block)
            continue
        if h < 1 or w < 1:
            raise ValueError(f"{name}: after {where} nothing is left of an input of (C, H, W) = "
                             f"{tuple(dims)}; use larger inputs or smaller filters")
    return plan, c * h * w


def _positive(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _simple_conv_plan(input_dim, conv_param, hidden_size, output_size) -> list:
    """Convolution, ReLU, 2x2 max pooling, Affine, ReLU, Affine."""
    param = _check_conv_param("conv_param", conv_param)
    convs, features = _conv_plan(_check_input_dim(input_dim),
                                 [("conv", "conv_param", param), ("relu",), ("pool",)],
                                 "SimpleConvNet")
    hidden, out = _positive("hidden_size", hidden_size), _positive("output_size", output_size)
    return convs + [("affine", features, hidden), ("relu",), ("affine", hidden, out)]


class SimpleConvNet(_PlannedNet):
    _repr_keys = ("input_dim", "conv_param", "hidden_size", "output_size")

    """The book's chapter-7 net: Convolution, ReLU, 2x2 max pooling, Affine, ReLU, Affine,
    SoftmaxWithLoss (parameters W1, b1 of the convolution, W2, b2, W3, b3).

    Parameters
    ----------
    input_dim : (C, H, W), default (1, 28, 28)
    conv_param : dict, default ``{"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}``
    hidden_size, output_size : int, default 100 and 10
    weight_init_std : float, "he" or "xavier", default 0.01
        As the book: normal weights of this standard deviation (or He/Xavier by fan-in).
    weight_decay, seed, device, dtype : see :class:`MultiLayerNet`.

    Inputs are images (N, C, H, W): ``load_mnist(..., flatten=False)``.
    """

    def __init__(self, input_dim=(1, 28, 28), conv_param=None, hidden_size: int = 100,
                 output_size: int = 10, weight_init_std=0.01, *, weight_decay: float = 0.0,
                 seed: int = 0, device: str = "cpu", dtype: str = "float32"):
        if conv_param is None:
            conv_param = {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}
        plan = _simple_conv_plan(input_dim, conv_param, hidden_size, output_size)
        weight_init_std = _std_or_name("weight_init_std", weight_init_std)
        args = {"input_dim": _check_input_dim(input_dim),
                "conv_param": _check_conv_param("conv_param", conv_param),
                "hidden_size": int(hidden_size), "output_size": int(output_size),
                "weight_init_std": weight_init_std,
                "weight_decay": _check_weight_decay(weight_decay)}
        self._setup(args, plan, weight_init_std, seed, device, dtype, weight_decay)

    @classmethod
    def _plan_of(cls, config: dict) -> list:
        return _simple_conv_plan(config["input_dim"], config["conv_param"],
                                 config["hidden_size"], config["output_size"])


def _deep_defaults() -> dict:
    """The book's six 3x3 convolutions: 16, 16, 32, 32, 64, 64 filters, pad 1 (pad 2 for the
    fourth, which brings 14x14 to 16x16 so that the pooling halves it evenly)."""
    return {f"conv_param_{i}": {"filter_num": n, "filter_size": 3, "pad": 2 if i == 4 else 1,
                                "stride": 1}
            for i, n in enumerate((16, 16, 32, 32, 64, 64), start=1)}


def _deep_conv_plan(input_dim, conv_params: dict, hidden_size, output_size, dropout_ratio) -> list:
    """(Convolution, ReLU, Convolution, ReLU, pooling) * 3, Affine, ReLU, Dropout, Affine,
    Dropout."""
    blocks = []
    for i in range(1, 7):
        name = f"conv_param_{i}"
        blocks += [("conv", name, _check_conv_param(name, conv_params[name])), ("relu",)]
        if i % 2 == 0:
            blocks.append(("pool",))
    convs, features = _conv_plan(_check_input_dim(input_dim), blocks, "DeepConvNet")
    hidden, out = _positive("hidden_size", hidden_size), _positive("output_size", output_size)
    ratio = _check_ratio("dropout_ratio", dropout_ratio)
    return convs + [("affine", features, hidden), ("relu",), ("dropout", ratio),
                    ("affine", hidden, out), ("dropout", ratio)]


class DeepConvNet(_PlannedNet):
    _repr_keys = ("input_dim", "hidden_size", "output_size", "dropout_ratio")

    """The book's chapter-8 net: six 3x3 convolutions (16, 16, 32, 32, 64, 64 filters) with
    ReLU and 2x2 max pooling after each pair, Affine (``hidden_size``), ReLU, Dropout,
    Affine, Dropout, SoftmaxWithLoss; He initialisation.  Parameters W1..W6, b1..b6 of the
    convolutions, W7, b7, W8, b8 of the affine layers.

    Parameters
    ----------
    input_dim : (C, H, W), default (1, 28, 28)
    conv_param_1, ..., conv_param_6 : dict, default the book's (see above; pad 1, and 2 for
        the fourth)
    hidden_size, output_size : int, default 50 and 10
    dropout_ratio : float in [0, 1), default 0.5
    weight_decay, seed, device, dtype : see :class:`MultiLayerNet`.
    """

    def __init__(self, input_dim=(1, 28, 28), *, conv_param_1=None, conv_param_2=None,
                 conv_param_3=None, conv_param_4=None, conv_param_5=None, conv_param_6=None,
                 hidden_size: int = 50, output_size: int = 10, dropout_ratio: float = 0.5,
                 weight_decay: float = 0.0, seed: int = 0, device: str = "cpu",
                 dtype: str = "float32"):
        given = (conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5,
                 conv_param_6)
        params = _deep_defaults()
        params.update({f"conv_param_{i}": p for i, p in enumerate(given, start=1) if p is not None})
        plan = _deep_conv_plan(input_dim, params, hidden_size, output_size, dropout_ratio)
        args = {"input_dim": _check_input_dim(input_dim),
                **{k: _check_conv_param(k, v) for k, v in params.items()},
                "hidden_size": int(hidden_size), "output_size": int(output_size),
                "dropout_ratio": float(dropout_ratio),
                "weight_decay": _check_weight_decay(weight_decay)}
        self._setup(args, plan, "he", seed, device, dtype, weight_decay)

    @classmethod
    def _plan_of(cls, config: dict) -> list:
        params = {k: config[k] for k in _deep_defaults()}
        return _deep_conv_plan(config["input_dim"], params, config["hidden_size"],
                               config["output_size"], config["dropout_ratio"])


_NET_CLASSES = {c.__name__: c for c in (Sequential, MultiLayerNet, TwoLayerNet, SimpleConvNet,
                                        DeepConvNet)}
