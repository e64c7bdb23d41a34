"""Layers with explicit ``forward()`` / ``backward()``: the :class:`Layer` protocol, and Mul,
Add, Relu, Sigmoid, Affine, SoftmaxWithLoss, Convolution, Pooling, BatchNormalization, Dropout.

Each backward sits next to the forward math it differentiates.  The layers are
written against the Python Array API: they run unchanged on NumPy, CuPy, torch
and array_api_strict arrays, on the device of their inputs, in their dtype.
No layer writes into an argument: ``backward`` returns new arrays.

A layer of your own is a subclass of :class:`Layer` that names its parameters
and writes ``forward`` and ``backward``::

    class Scale(xpnet.Layer):
        param_names = ("w",)          # params == {"w": self.w}, grads == {"w": self.dw}

        def __init__(self, w):
            self.w = w

        def forward(self, x):
            self.x = x
            return x * self.w

        def backward(self, dout):
            self.dw = xp.sum(dout * self.x, axis=0)   # xp = xpnet.namespace(dout=dout)
            return dout * self.w
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

from . import speedups
from ._checks import (
    check_affine_input,
    check_array,
    check_bias,
    check_flag,
    check_image_batch,
    check_logits,
    check_nonzero_in,
    check_seed,
    check_targets,
    check_windows_fit,
    checked_state_value,
    describe_array,
    dout_error,
    int_option,
    real_option,
    require_array,
)
from .backend import (
    HOST_ARRAY,
    computes_on_inputs,
    describe,
    device_context,
    dropout_mask,
    dtype_name,
    is_array,
    is_scalar,
    namespace,
    native_device,
    recorded_device_context,
)
from .functional import (
    add_at_windows,
    affine,
    col2im,
    conv_output_size,
    im2col,
    live_windows,
    matmul,
    one_hot_rows,
    pad_spatial,
    softmax_cross_entropy,
    stable_sigmoid,
)

__all__ = [
    "Add",
    "Affine",
    "BatchNormalization",
    "Convolution",
    "Dropout",
    "ForwardNotCalledError",
    "Layer",
    "Mul",
    "Pooling",
    "Relu",
    "Sigmoid",
    "SoftmaxWithLoss",
]  # exported by xpnet/__init__; the helpers find_params and grad_name are not


class ForwardNotCalledError(RuntimeError, ValueError):
    """``backward()`` was called on a layer whose ``forward()`` has not run.

    A :class:`RuntimeError` (wrong call order) and, like every xpnet input
    error, a :class:`ValueError`.
    """


def grad_name(param: str) -> str:
    """The attribute that holds the gradient of parameter ``param``: the book's ``dW`` for ``W``."""
    return "d" + param


# -- the protocol --------------------------------------------------------------------------------


class _NotRun:
    """What a layer remembers of its output before any forward (or after reset)."""

    def __repr__(self):
        return "<forward not run>"


_NOT_RUN = _NotRun()
_CLASSES: dict = {}  # "module.QualName" -> the Layer subclass defined last under that name


def _recorded(forward):
    """Wrap a subclass's forward: check its inputs (``check_forward``), run it with their
    device current (CuPy), and after it succeeds, remember its output's shape, dtype and
    device.  The unwrapped forward stays reachable (:func:`unchecked`)."""

    def checked(self, *args, **kwargs):
        self.check_forward(*args, **kwargs)
        return forward(self, *args, **kwargs)

    checked_on_device = computes_on_inputs(checked)

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if args and type(args[0]) is HOST_ARRAY:  # NumPy: no device to make current
            out = checked(self, *args, **kwargs)
        else:
            out = checked_on_device(self, *args, **kwargs)
        self._output = describe(out)  # plain values: a layer stays cheap to deep-copy
        return out

    wrapper._xpnet_wrapped = True
    wrapper._xpnet_unchecked = forward
    return wrapper


def undeclared_params(layer) -> list:
    """The array attributes ``X`` of ``layer`` that ``backward`` gave a gradient ``dX`` (an
    array) but that its declared parameters (``param_names``, or a ``params`` dict) and
    ``state_names`` leave out: weights a net would never update, nor save."""
    declared = set(find_params(layer)) | set(getattr(layer, "state_names", ()))
    return sorted(name for name, value in vars(layer).items()
                  if not name.startswith("_") and name not in declared and is_array(value)
                  and is_array(getattr(layer, grad_name(name), None)))


_SCANNED: set = set()  # the Layer classes whose first backward was looked at (undeclared_params)


def _warn_undeclared(layer) -> None:
    """Once per class: a warning naming the weights a layer's backward gave gradients to
    without declaring them (``param_names``), which a net would silently never train."""
    cls = type(layer)
    if cls in _SCANNED:
        return
    _SCANNED.add(cls)
    names = undeclared_params(layer)
    if names:
        warnings.warn(f"{cls.__name__}.backward set gradients {[grad_name(n) for n in names]} "
                      f"for {names}, which its param_names {tuple(cls.param_names)} does not "
                      "list: a net would never update or save them (declare them in "
                      "param_names)", UserWarning, stacklevel=3)


def _checked(backward):
    """Wrap a subclass's backward: raise unless forward ran and dout fits its output, then
    run it with dout's device current (or, for a loss layer's default dout, its arrays')."""

    @functools.wraps(backward)
    def wrapper(self, *args, **kwargs):
        if args or "dout" in kwargs:
            dout = args[0] if args else kwargs["dout"]
            self.check_dout(dout)
            if type(dout) is HOST_ARRAY:  # NumPy: no device to make current
                context = contextlib.nullcontext()
            else:
                context = device_context(dout)
        else:  # backward() with its default dout (a loss layer's 1): its output's device
            self.check_dout(None)
            out = self._output
            context = (contextlib.nullcontext() if out is None or out[0] == "numpy"
                       else recorded_device_context(out[0], out[3]))
        with context:
            result = backward(self, *args, **kwargs)
        if type(self) not in _SCANNED:
            _warn_undeclared(self)
        return result

    wrapper._xpnet_wrapped = True
    wrapper._xpnet_unchecked = backward
    return wrapper


def unchecked(layer, name: str):
    """``type(layer).<name>`` (``"forward"`` or ``"backward"``) without the checks that
    :class:`Layer` wraps around it: the math alone, called as ``f(layer, ...)`` by code that
    has checked its data once (the Trainer's runners, inside the data's device context).
    A method no Layer wrapped (a loss object of another kind) comes back as it is."""
    method = getattr(type(layer), name)
    return getattr(method, "_xpnet_unchecked", method)


def _check_no_empty_axis(W, name: str, axes: str) -> None:
    """A weight array with a zero-size axis (no filters, no inputs) computes nothing."""
    if 0 in tuple(W.shape):
        raise ValueError(f"{name} must have every axis of {axes} at least 1, got shape "
                         f"{tuple(W.shape)}")


class Layer:
    """The base class of every layer: ours, and yours.

    A subclass names its parameters once, in the class attribute
    ``param_names`` (e.g. ``("W", "b")``), keeps each as an attribute of that
    name, and sets the gradient of each in ``d<name>`` (``dW``, ``db``) in
    ``backward``, as in the book.  From that alone come:

    * ``params`` and ``grads``: dicts ``{name: array}`` (empty for a layer
      without parameters, like Relu), which networks and the gradient checker use;
    * the "backward before forward" error (:class:`ForwardNotCalledError`);
    * the ``dout`` check: ``backward(dout)`` raises a clear error unless dout is
      an array of the last forward output's shape, dtype, library and device
      (a Python number is accepted where the output was a number or a 0-d loss);
    * :meth:`reset`, which forgets the last forward;
    * saving and loading inside a :class:`xpnet.Sequential` net, which rebuilds the
      layer as ``Cls(**params, **layer.config())``: a layer whose constructor takes more
      than its parameters returns those options (JSON values) from :meth:`config`.

    ``forward`` and ``backward`` are written as in the book, the math alone; layers with a
    train/inference difference take ``forward(x, train=True)`` and set the
    class attribute ``has_train_mode = True`` so that networks pass it on.  What a
    forward's inputs must be is checked in :meth:`check_forward`, which every direct call
    of ``forward`` runs first; the Trainer checks a run's data once, at its start, and its
    steps call the math alone.

    Two more class attributes, both empty by default:

    * ``state_names``: attributes that are neither parameters nor a forward's cache but
      part of the model (BatchNormalization's running mean and variance, Dropout's count
      of masks drawn): arrays or Python ints, kept by :meth:`reset`, saved with the net,
      restored from training checkpoints, and put back by the gradient checker before
      each evaluation;
    * ``decay_names``: the parameters that a net's ``weight_decay`` applies to (the
      weights ``W`` of Affine and Convolution; never biases).
    """

    param_names: tuple = ()
    state_names: tuple = ()
    decay_names: tuple = ()
    has_train_mode: bool = False
    _output = _NOT_RUN  # (library, shape, dtype, device name) of the last forward's output

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CLASSES[type_name(cls)] = cls  # a class defined again (a notebook cell) replaces it
        for name, wrap in (("forward", _recorded), ("backward", _checked)):
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_xpnet_wrapped", False):
                setattr(cls, name, wrap(method))

    def forward(self, *inputs):  # pragma: no cover - every layer defines its own
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def backward(self, dout):  # pragma: no cover - every layer defines its own
        raise NotImplementedError(f"{type(self).__name__} must define backward()")

    @property
    def params(self) -> dict:
        """``{name: array}`` for every name in ``param_names``."""
        return {name: getattr(self, name) for name in self.param_names}

    @property
    def grads(self) -> dict:
        """``{name: gradient from the last backward, or None}``, keyed like :attr:`params`."""
        return {name: getattr(self, grad_name(name), None) for name in self.param_names}

    def reset(self) -> None:
        """Forget the last forward: ``backward`` raises until ``forward`` runs again, the
        gradients become None, and every other array the layer holds besides its parameters
        (the forward's cache) is dropped."""
        keep = {*self.param_names, *self.state_names}
        for name, value in list(vars(self).items()):
            if name not in keep and is_array(value):
                setattr(self, name, None)
        for name in self.param_names:
            setattr(self, grad_name(name), None)
        self._output = _NOT_RUN

    def config(self) -> dict:
        """The constructor's options besides the parameters, as JSON values (none by default)."""
        return {}

    def check_forward(self, *inputs, **options) -> None:
        """Raise a clear ValueError/TypeError unless ``forward(*inputs, **options)`` can run
        (arrays of the parameters' library, device and dtype, of shapes that fit).  Called
        before every direct call of ``forward``; accepts everything by default."""

    def check_dout(self, dout) -> None:
        """Raise unless forward has run and ``dout`` fits its output (see the class docstring)."""
        out = self._output
        name = type(self).__name__
        if out is _NOT_RUN:
            raise ForwardNotCalledError(
                f"{name}.backward() was called before {name}.forward(): "
                "run forward on a batch first, then backward with the gradient of its output"
            )
        if out is None:
            return  # a number came out (Mul of two numbers): any number or array may go back
        if out[1] == ():  # a scalar (a loss): a number, or a 0-d array of its library and device
            if dout is None or is_scalar(dout):
                return
            if getattr(dout, "ndim", None) != 0:
                raise ValueError(f"{name}.backward: dout is the gradient of a scalar output and "
                                 "must be a number or a 0-d array, got shape "
                                 f"{tuple(getattr(dout, 'shape', ()))}")
            out = (*out[:2], dout.dtype, out[3])  # a loss layer casts a 0-d dout to its dtype
        got = describe(dout)
        if got != out:  # (library, shape, dtype, device name): say which differs
            dout_error(f"{name}.backward", dout, got, *out)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.params.items()
                           if hasattr(v, "shape"))
        return f"{type(self).__name__}({shapes})"


def type_name(cls: type) -> str:
    """How files name a layer class: ``"xpnet.layers.Affine"``, ``"mymodule.Scale"``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def layer_class(name: str) -> type:
    """The :class:`Layer` subclass that :func:`type_name` called ``name``; ValueError if no
    such class has been defined (imported) in this process."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"no xpnet.Layer subclass is called {name!r}; import the module "
                         "that defines it first") from None


def find_params(layer) -> dict:
    """``{name: gradient attribute}`` for the parameters of any layer-like object.

    A :class:`Layer` names them in ``param_names``; an object with a ``params``
    dict (and a ``grads`` dict) is taken at its word; a book-style class is
    searched for array attributes ``X`` that have a gradient attribute ``dX``.
    A gradient attribute of None means "look in ``layer.grads``".
    """
    if isinstance(layer, Layer):
        return {name: grad_name(name) for name in layer.param_names}
    if isinstance(getattr(type(layer), "params", None), property) or isinstance(
            getattr(layer, "params", None), dict):
        return dict.fromkeys(dict(layer.params))
    return {name: grad_name(name) for name, v in vars(layer).items()
            if is_array(v) and hasattr(layer, grad_name(name)) and not name.startswith("_")}


# -- the layers ----------------------------------------------------------------------------------


def _sum_to(g, like):
    """Reduce gradient ``g`` to the shape of the forward operand ``like`` (undo broadcasting)."""
    if is_scalar(like):
        if is_scalar(g):
            return g
        return namespace(g=g).sum(g)
    if is_scalar(g) or tuple(g.shape) == tuple(like.shape):
        return g
    xp = namespace(g=g)
    lead = g.ndim - like.ndim
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(like.shape) if n == 1 and g.shape[lead + i] != 1
    )
    return xp.reshape(xp.sum(g, axis=axes), tuple(like.shape))


class Mul(Layer):
    """Multiplication node ``out = x * y`` (Python numbers or arrays; broadcasting allowed).

    ``backward(dout)`` returns ``(dout * y, dout * x)``, each summed back to
    the shape of its operand.
    """

    def __init__(self):
        self.x = None
        self.y = None

    def check_forward(self, x, y):
        if not (is_scalar(x) and is_scalar(y)):
            namespace(x=x, y=y)  # same library and device, or a clear error

    def forward(self, x, y):
        self.x, self.y = x, y
        return x * y

    def backward(self, dout):
        # d(xy)/dx = y, d(xy)/dy = x: each input's gradient is dout times the *other* input.
        return _sum_to(dout * self.y, self.x), _sum_to(dout * self.x, self.y)


class _Shape:
    """Stand-in for an array operand: what ``_sum_to`` needs (shape and ndim)."""

    __slots__ = ("shape", "ndim")

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _shape_of(v):
    return v if is_scalar(v) else _Shape(v.shape)


def _copy_grad(dout, like):
    g = _sum_to(dout, like)
    if g is dout and not is_scalar(g):
        g = namespace(dout=dout).asarray(g, copy=True)
    return g


class Add(Layer):
    """Addition node ``out = x + y`` (Python numbers or arrays; broadcasting allowed).

    ``backward(dout)`` passes dout through to both inputs, summed back to the
    shape of each; the two results never alias ``dout`` or each other.
    """

    def __init__(self):
        self.x = None
        self.y = None

    check_forward = Mul.check_forward

    def forward(self, x, y):
        # Only the operands' shapes matter for backward; keep a zero-size stand-in, not the data.
        self.x, self.y = _shape_of(x), _shape_of(y)
        return x + y

    def backward(self, dout):
        # d(x+y)/dx = d(x+y)/dy = 1: dout flows unchanged to both sides.
        return _copy_grad(dout, self.x), _copy_grad(dout, self.y)


class Relu(Layer):
    """Rectified linear unit ``out = max(x, 0)``.

    The derivative is 1 where x > 0 and 0 where x <= 0 (0 at the kink, as in
    PyTorch).  NaN inputs propagate.

    ``backward`` multiplies ``dout`` by a 0/1 mask kept from ``forward``: on
    NumPy a ``where`` over a random mask costs 15 times as much (branch
    mispredictions).  A non-finite ``dout`` where x <= 0 hence gives NaN, not 0.

    Attributes
    ----------
    mask : bool array of x's shape, True where x <= 0 (from the last forward).
    """

    def __init__(self):
        self._keep = None  # 1 where x > 0, else 0, in x's dtype

    @property
    def mask(self):
        return None if self._keep is None else self._keep == 0

    def check_forward(self, x):
        check_array(namespace(x=require_array(x, "x")), x, "x")

    def forward(self, x):
        xp = namespace(x)
        self._keep = xp.astype(x > 0, x.dtype)
        # A 0-d zero of x's dtype and device, so maximum never promotes float32.
        return xp.maximum(x, xp.zeros((), dtype=x.dtype, device=native_device(x)))

    def backward(self, dout):
        # Gradient flows only where the input was positive; a new array, dout is left as it was.
        return dout * self._keep


class Sigmoid(Layer):
    """Logistic sigmoid ``out = 1 / (1 + exp(-x))``, stable for any x.

    Attributes
    ----------
    out : the forward output y, which is all backward needs: dy/dx = y (1 - y).
    """

    def __init__(self):
        self.out = None

    check_forward = Relu.check_forward

    def forward(self, x):
        self.out = stable_sigmoid(namespace(x), x)
        return self.out

    def backward(self, dout):
        # d sigmoid(x)/dx = y * (1 - y)
        return dout * (1.0 - self.out) * self.out


def in_params_dtype(layer, xp, x, like):
    """``x`` in the dtype of the layer's parameters ``like``, its own dtype remembered in
    ``layer.x_dtype`` (:func:`as_input_dtype` gives the input's gradient back in it).

    A layer computes in its parameters' dtype: real floating input of another precision is
    converted on entry. float32 data into the book's float64 weights computes in float64,
    exactly as NumPy's promotion does; float64 data (NumPy's default) into a float32 net
    computes in float32, so a GPU net never slides into float64 by accident.
    """
    layer.x_dtype = x.dtype
    return x if x.dtype == like.dtype else xp.astype(x, like.dtype)


def as_input_dtype(layer, xp, dx):
    """The gradient ``dx`` in the dtype the last forward's input had (see
    :func:`in_params_dtype`)."""
    dtype = getattr(layer, "x_dtype", None)
    return dx if dtype is None or dx.dtype == dtype else xp.astype(dx, dtype)


class Affine(Layer):
    """Fully connected layer ``out = x W + b``.

    Parameters
    ----------
    W : array of shape (D, M), real floating
    b : array of shape (M,), same dtype and device as W
    input_grad : bool, default True
        Whether ``backward`` computes dx.  A network's first layer sets it to
        False: nobody needs the gradient with respect to the data, and it costs
        a third of the layer's backward FLOPs.  ``backward`` then returns None.

    ``forward(x)`` takes x of shape (N, D) or (N, d1, ..., dk) with
    d1 * ... * dk = D (flattened to (N, D)), of any real floating dtype: the layer computes
    in W's (float32 data into float64 weights computes in float64, as NumPy's promotion
    would; float64 data into float32 weights in float32).  ``backward(dout)`` takes dout
    of shape (N, M), returns dx in x's original shape and dtype and sets ``dW`` (D, M)
    and ``db`` (M,).

    Attributes
    ----------
    W, b : the parameters (the layer reads them at every call, so assigning a
        new array takes effect at the next forward).
    dW, db : gradients from the last backward.
    x : the flattened (N, D) input of the last forward; ``x_shape`` its original shape.
    """

    param_names = ("W", "b")
    decay_names = ("W",)

    def __init__(self, W, b, *, input_grad: bool = True):
        xp = namespace(W=W, b=b)
        check_array(xp, W, "W", ndim=2)
        _check_no_empty_axis(W, "W", "(D inputs, M outputs)")
        check_bias(xp, W, b, "(M,)", 1)
        self.W, self.b = W, b
        self.input_grad = check_flag("input_grad", input_grad)
        self.x = self.x_shape = self.x_dtype = self.dW = self.db = None

    def __repr__(self):
        return f"Affine(W: {tuple(self.W.shape)} {dtype_name(self.W.dtype)}, b: {tuple(self.b.shape)})"

    def config(self) -> dict:
        return {"input_grad": self.input_grad}

    def check_forward(self, x):
        check_affine_input(namespace(x=require_array(x, "x"), W=self.W, b=self.b), x, self.W)

    def forward(self, x):
        xp = namespace(x)
        self.x_shape = x.shape
        x = in_params_dtype(self, xp, x, self.W)
        self.x = x if x.ndim == 2 else xp.reshape(x, (x.shape[0], -1))  # (N, d1, ..., dk) -> (N, D)
        return affine(self.x, self.W, self.b)  # x W + b

    def backward(self, dout):
        xp = namespace(dout)
        # out = x W + b  =>  dW = x^T dout,  db = sum_n dout,  dx = dout W^T
        self.dW = matmul(xp.matrix_transpose(self.x), dout)
        self.db = xp.sum(dout, axis=0)
        return self.input_gradient(xp, dout)

    def input_gradient(self, xp, dout):
        """dx = dout W^T in the shape of forward's x (None when ``input_grad`` is False)."""
        if not self.input_grad:
            return None
        dx = as_input_dtype(self, xp, matmul(dout, xp.matrix_transpose(self.W)))
        return dx if len(self.x_shape) == 2 else xp.reshape(dx, self.x_shape)


class SoftmaxWithLoss(Layer):
    """Softmax followed by the mean cross-entropy loss over the batch.

    ``forward(x, t, *, check_labels=True)`` takes scores x of shape (N, C) and
    targets t, either integer class labels of shape (N,) in [0, C) or one-hot /
    probability rows of shape (N, C); it returns the loss as a 0-d array on x's
    device in x's dtype.  ``check_labels=False`` skips the label range check
    (one device-to-host read) for labels the caller has already checked, as the
    Trainer does once per dataset.  ``backward(dout=1)`` returns dL/dx times ``dout``.

    Attributes
    ----------
    y : softmax output (N, C) of the last forward.
    t : the targets as rows (N, C) in x's dtype (one-hot for integer labels).
    loss : the last loss.
    """

    def __init__(self):
        self.loss = None
        self.y = None
        self.t = None
        self._row_sums = None

    def check_forward(self, x, t, *, check_labels: bool = True):
        xp = namespace(x=x, t=t)
        check_logits(xp, x)
        check_targets(xp, x, t, check_labels=check_labels)

    def forward(self, x, t, *, check_labels: bool = True):
        xp = namespace(x)
        if t.ndim == 1:  # integer labels: one-hot rows, each summing to 1
            rows, self._row_sums = one_hot_rows(xp, t, x.shape[1], x.dtype), None
        else:  # probability rows: dL/dx = (y * sum_c t - t) / N
            rows = t if t.dtype == x.dtype else xp.astype(t, x.dtype)
            self._row_sums = xp.sum(rows, axis=1, keepdims=True)
        self.y, self.loss = softmax_cross_entropy(xp, x, rows, self._row_sums)
        self.t = rows
        return self.loss

    def backward(self, dout=1):
        y = self.y
        if dout is None or isinstance(dout, (int, float)):  # a number (the default 1)
            scale = float(1 if dout is None else dout) / y.shape[0]
        else:
            xp = namespace(dout)
            scale = (dout if dout.dtype == y.dtype else xp.astype(dout, y.dtype)) / y.shape[0]
        if self._row_sums is not None:
            y = y * self._row_sums
        # d/dx of -sum(t * log softmax(x)) / N is (softmax(x) * sum(t) - t) / N, times dout.
        return (y - self.t) * scale


# -- chapters 6 to 8: convolution, pooling, batch normalization, dropout -------------------------


class Convolution(Layer):
    """2-D convolution (cross-correlation, as in every framework) by im2col.

    Parameters
    ----------
    W : array (FN, C, FH, FW), real floating: FN filters of C channels, FH x FW
    b : array (FN,), W's dtype and device
    stride : int >= 1, default 1
    pad : int >= 0, default 0
        Zeros added on every side of H and W.
    input_grad : bool, default True
        Whether ``backward`` computes dx (a net's first layer does not need it: the
        data's gradient; ``backward`` then returns None).

    ``forward(x)`` takes x (N, C, H, W) and returns (N, FN, OH, OW) with
    ``OH = (H + 2 pad - FH) // stride + 1`` (likewise OW).  The windows are unrolled into
    the rows of a matrix (:func:`xpnet.functional.im2col`: strided slices, stacked; the
    padding by array-api-extra's ``pad``), so the convolution is one matrix product;
    ``backward`` folds the rows' gradient back with ``col2im`` (array-api-extra's
    ``at(...).add(...)``: in place where the array allows it, functional on JAX).

    Attributes
    ----------
    W, b, stride, pad : as given.  dW, db : gradients from the last backward.
    col : the unrolled input (C * FH * FW, N * OH * OW) of the last forward.
    """

    param_names = ("W", "b")
    decay_names = ("W",)

    def __init__(self, W, b, stride: int = 1, pad: int = 0, *, input_grad: bool = True):
        xp = namespace(W=W, b=b)
        check_array(xp, W, "W", ndim=4)
        _check_no_empty_axis(W, "W", "(FN filters, C channels, FH, FW)")
        check_bias(xp, W, b, "(FN,)", 0)
        self.stride, self.pad = int_option("stride", stride, 1), int_option("pad", pad, 0)
        self.W, self.b = W, b
        self.input_grad = check_flag("input_grad", input_grad)
        self.col = self.x_shape = self.x_dtype = self.dW = self.db = None

    def __repr__(self):
        return (f"Convolution(W: {tuple(self.W.shape)} {dtype_name(self.W.dtype)}, "
                f"stride={self.stride}, pad={self.pad})")

    def config(self) -> dict:
        return {"stride": self.stride, "pad": self.pad, "input_grad": self.input_grad}

    def check_forward(self, x):
        xp = namespace(x=require_array(x, "x"), W=self.W, b=self.b)
        check_image_batch(xp, x, "x", self.W.shape[1])
        window = tuple(self.W.shape[2:])
        check_windows_fit(x.shape, window, self.pad, _windows(self, x.shape, *window), "Convolution")

    def forward(self, x):
        xp = namespace(x)
        fn, c, fh, fw = self.W.shape
        oh, ow = _windows(self, x.shape, fh, fw)
        x = in_params_dtype(self, xp, x, self.W)
        self.col, self.x_shape = im2col(xp, x, fh, fw, self.stride, self.pad), tuple(x.shape)
        # One product for every window: (FN, C FH FW) @ (C FH FW, N OH OW) + b.
        w = xp.reshape(self.W, (fn, -1))
        out = NotImplemented if speedups.filters is None else speedups.filters(w, self.col,
                                                                             self.b)
        if out is NotImplemented:
            out = matmul(w, self.col) + xp.reshape(self.b, (fn, 1))
        return xp.permute_dims(xp.reshape(out, (fn, x.shape[0], oh, ow)), (1, 0, 2, 3))

    def backward(self, dout):
        xp = namespace(dout)
        fn, c, fh, fw = self.W.shape
        # Back to the product's layout: (N, FN, OH, OW) -> (FN, N OH OW).
        d = xp.reshape(xp.permute_dims(dout, (1, 0, 2, 3)), (fn, -1))
        self.db = xp.sum(d, axis=1)
        self.dW = xp.reshape(matmul(d, xp.matrix_transpose(self.col)), tuple(self.W.shape))
        if not self.input_grad:
            return None
        dcol = matmul(xp.matrix_transpose(xp.reshape(self.W, (fn, -1))), d)  # summed per pixel
        return as_input_dtype(self, xp, col2im(xp, dcol, self.x_shape, fh, fw, self.stride,
                                               self.pad))


def _windows(layer, x_shape, fh: int, fw: int) -> tuple:
    """(OH, OW): how many (fh, fw) windows of ``layer`` (its stride and pad) fit in x (N, C, H, W)."""
    return (conv_output_size(x_shape[2], fh, layer.stride, layer.pad),
            conv_output_size(x_shape[3], fw, layer.stride, layer.pad))


_POOL_MODES = ("max", "avg")


class Pooling(Layer):
    """Max or average pooling over (pool_h, pool_w) windows of each channel.

    Parameters
    ----------
    pool_h, pool_w : int >= 1
    stride : int >= 1, default the pool size (``pool_h``; non-overlapping windows)
    pad : int >= 0, default 0
        Padding on every side of H and W: with -inf for max pooling (a padded position is
        never the maximum), with zeros for average pooling, which divides by the whole
        window (padding included), like PyTorch's ``avg_pool2d`` by default.
    mode : {"max", "avg"}

    ``forward(x)`` takes (N, C, H, W) and returns (N, C, OH, OW), a new array.  Max
    pooling's ``backward`` routes each window's gradient to one position: the window's
    first NaN if it holds one (its output is NaN), else the first maximum in row-major
    order when several are equal (``argmax``'s choice, and PyTorch's); a padding cell never
    takes it, even from a window of -inf.  Average pooling spreads it evenly.  Where windows
    overlap, the contributions add up.  A window larger than the input costs the input's
    size, not the window's.
    """

    def __init__(self, pool_h: int, pool_w: int, stride: int | None = None, pad: int = 0, *,
                 mode: str = "max"):
        self.pool_h, self.pool_w = int_option("pool_h", pool_h, 1), int_option("pool_w", pool_w, 1)
        self.stride = self.pool_h if stride is None else int_option("stride", stride, 1)
        self.pad = int_option("pad", pad, 0)
        if mode not in _POOL_MODES:
            raise ValueError(f"mode must be one of {_POOL_MODES}, got {mode!r}")
        if self.pad and (2 * self.pad > self.pool_h or 2 * self.pad > self.pool_w):
            raise ValueError(f"pad must be at most half the pool size (pool {self.pool_h}x"
                             f"{self.pool_w}), got pad={self.pad}: a window of padding alone "
                             "has no input")
        self.mode = mode
        self.arg = self.x_shape = None  # arg: the offset of each window's maximum (max mode)
        self.offsets = None  # the window offsets that reach the input (the portable forward's)

    def __repr__(self):
        return (f"Pooling({self.pool_h}, {self.pool_w}, stride={self.stride}, pad={self.pad}, "
                f"mode={self.mode!r})")

    def config(self) -> dict:
        return {"pool_h": self.pool_h, "pool_w": self.pool_w, "stride": self.stride,
                "pad": self.pad, "mode": self.mode}

    def check_forward(self, x):
        check_image_batch(namespace(x=require_array(x, "x")), x, "x")
        window = (self.pool_h, self.pool_w)
        check_windows_fit(x.shape, window, self.pad, _windows(self, x.shape, *window), "Pooling")

    def forward(self, x):
        xp = namespace(x)
        window = (self.pool_h, self.pool_w)
        oh, ow = _windows(self, x.shape, *window)
        self.x_shape = tuple(x.shape)
        if self.mode == "max" and speedups.max_pool is not None:  # one pass, where it can
            fast = speedups.max_pool(x, *window, self.stride, self.pad, oh, ow)
            if fast is not NotImplemented:
                (out, self.arg), self.offsets = fast, None
                return out
        padded = pad_spatial(xp, x, self.pad, -math.inf if self.mode == "max" else 0.0)
        # One strided view per window offset that reaches the input: k elementwise passes,
        # no (..., k) stack to reduce.
        live = live_windows(*window, self.stride, self.pad, x.shape[2], x.shape[3], oh, ow)
        self.offsets = [k for k, *_ in live]
        pieces = [padded[:, :, rows, cols] for _, rows, cols, _ in live]
        if self.mode == "avg":  # (the offsets left out add zeros; the divisor counts them)
            return sum(pieces[1:], pieces[0]) / (self.pool_h * self.pool_w)
        device = native_device(x)
        # The first NaN of a window wins (its gradient goes to it), else the first maximum
        # (row-major); a padding cell never wins, even over -inf.
        out = xp.asarray(pieces[0], copy=True) if len(pieces) == 1 else pieces[0]  # (not x's)
        arg = xp.full(out.shape, live[0][0], dtype=xp.int32, device=device)
        real = self._real_mask(xp, live[0][3], device)  # where out holds an input element
        for (k, _, _, mask), piece in zip(live[1:], pieces[1:]):
            # Larger, or a NaN where out is not one yet: not (piece <= out), unless out is NaN.
            larger = ~(piece <= out) & (out == out)
            if real is not None:
                larger = larger | ~real
            mask = self._real_mask(xp, mask, device)
            if mask is not None:
                larger = larger & mask
                real = None if real is None else real | mask
            elif real is not None:
                real = None
            arg = xp.where(larger, xp.asarray(k, dtype=xp.int32, device=device), arg)
            # (maximum, not where: a third of the time; NaN stays NaN, and of two equal values
            # it keeps the later's bits, -0.0 or 0.0, as the compiled kernels do)
            out = xp.maximum(out, piece)
        self.arg = arg
        return out

    @staticmethod
    def _real_mask(xp, real, device):
        """:func:`live_windows`'s host masks as one (OH, OW) boolean array, or None."""
        if real is None:
            return None
        rows, cols = real
        grid = [[a and b for b in cols] for a in rows]
        return xp.asarray(grid, dtype=xp.bool, device=device)

    def backward(self, dout):
        xp = namespace(dout)
        k = self.pool_h * self.pool_w
        offsets = self.offsets
        if offsets is None:  # (the forward's fast path ran)
            offsets = [i for i, *_ in live_windows(self.pool_h, self.pool_w, self.stride,
                                                   self.pad, *self.x_shape[2:], *dout.shape[2:])]
        if self.mode == "avg":  # d mean / d x_i = 1 / k for each of the k positions
            pieces = [dout / k] * len(offsets)
        else:  # d max / d x_i = 1 at the chosen maximum, 0 elsewhere
            if speedups.max_pool_backward is not None:
                fast = speedups.max_pool_backward(dout, self.arg, self.x_shape, self.pool_h,
                                                  self.pool_w, self.stride, self.pad)
                if fast is not NotImplemented:
                    return fast
            zero = xp.zeros((), dtype=dout.dtype, device=native_device(dout))
            pieces = [xp.where(self.arg == i, dout, zero) for i in offsets]
        return add_at_windows(xp, pieces, self.x_shape, self.pool_h, self.pool_w, self.stride,
                              self.pad, offsets)


class BatchNormalization(Layer):
    """Batch normalization: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Per feature for (N, D) input, per channel for (N, C, H, W) input (the statistics over
    N, H and W, as PyTorch's ``BatchNorm2d`` and every framework do; the book's code
    normalizes each pixel of each channel on its own instead).

    Parameters
    ----------
    gamma, beta : arrays (D,) or (C,), one dtype and device
    momentum : float in [0, 1], default 0.9
        ``running = momentum * running + (1 - momentum) * batch statistic`` (the book's
        convention; PyTorch's ``momentum`` is 1 minus this).
    eps : float > 0, default 1e-5

    ``forward(x, train=True)``: in training mode, normalizes with the batch's mean and
    (biased) variance and updates the running mean and variance; with ``train=False``
    it uses the running statistics (which start at 0 and 1).  ``backward`` differentiates
    the mode of the last forward.

    Attributes
    ----------
    gamma, beta : parameters; dgamma, dbeta : their gradients.
    running_mean, running_var : the running statistics (``state_names``: saved with the
        net and in training checkpoints).
    """

    param_names = ("gamma", "beta")
    state_names = ("running_mean", "running_var")
    has_train_mode = True

    def __init__(self, gamma, beta, momentum: float = 0.9, running_mean=None, running_var=None,
                 *, eps: float = 1e-5):
        xp = namespace(gamma=gamma, beta=beta)
        check_array(xp, gamma, "gamma", ndim=1)
        check_array(xp, beta, "beta", ndim=1)
        if tuple(beta.shape) != tuple(gamma.shape) or beta.dtype != gamma.dtype:
            raise ValueError(f"gamma and beta must share a shape and dtype, got gamma "
                             f"{describe_array(gamma)} and beta {describe_array(beta)}")
        self.momentum = real_option("momentum", momentum, 0.0, 1.0)
        self.eps = real_option("eps", eps, 0.0, math.inf)
        if self.eps == 0.0:
            raise ValueError("eps must be > 0: it keeps the division finite for a constant feature")
        check_nonzero_in("eps", self.eps, gamma.dtype)  # (1e-50 is 0 in float32: NaN)
        self.gamma, self.beta = gamma, beta
        device = native_device(gamma)
        self.running_mean = xp.zeros(gamma.shape, dtype=gamma.dtype, device=device)
        self.running_var = xp.ones(gamma.shape, dtype=gamma.dtype, device=device)
        for name, given in (("running_mean", running_mean), ("running_var", running_var)):
            if given is not None:  # (the book's constructor takes them)
                setattr(self, name, checked_state_value(name, given, getattr(self, name), self,
                                                        name))
        self.xn = self.std = self.dgamma = self.dbeta = self.x_dtype = None
        self.train_mode = True

    def config(self) -> dict:
        return {"momentum": self.momentum, "eps": self.eps}

    def check_state_value(self, name: str, value, where: str) -> None:
        """A running variance below 0 would make every prediction NaN (sqrt)."""
        if name == "running_var" and bool((value < 0).any()):
            raise ValueError(f"{where} holds negative values; a variance is >= 0")

    def check_forward(self, x, train: bool = True):
        xp = namespace(x=require_array(x, "x"), gamma=self.gamma, beta=self.beta)
        check_array(xp, x, "x")
        train = check_flag("train", train)
        d = self.gamma.shape[0]
        if x.ndim not in (2, 4) or x.shape[1] != d or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, {d}) or (N, {d}, H, W) for "
                             f"{d} features, got shape {tuple(x.shape)}")
        check_nonzero_in("eps", self.eps, self.gamma.dtype)
        if train and math.prod(x.shape) // d < 2:
            raise ValueError(f"BatchNormalization in training needs more than one value per "
                             f"feature to normalize, got x of shape {tuple(x.shape)} (one value "
                             "per feature): pass train=False, or a larger batch")

    def forward(self, x, train: bool = True):
        xp = namespace(x)
        x = in_params_dtype(self, xp, x, self.gamma)  # (computes in gamma's dtype)
        d = self.gamma.shape[0]  # the statistics' axes, and the shape (C,) arrays broadcast as
        axes, shape = ((0,), (1, d)) if x.ndim == 2 else ((0, 2, 3), (1, d, 1, 1))
        if train:
            mean = xp.mean(x, axis=axes, keepdims=True)
            xc = x - mean
            var = xp.mean(xc * xc, axis=axes, keepdims=True)  # two passes: no cancellation
            m = self.momentum
            self.running_mean = m * self.running_mean + (1 - m) * xp.reshape(mean, (-1,))
            self.running_var = m * self.running_var + (1 - m) * xp.reshape(var, (-1,))
        else:
            xc, var = x - xp.reshape(self.running_mean, shape), xp.reshape(self.running_var, shape)
        self.std = xp.sqrt(var + self.eps)
        self.xn, self.train_mode = xc / self.std, bool(train)
        return xp.reshape(self.gamma, shape) * self.xn + xp.reshape(self.beta, shape)

    def backward(self, dout):
        xp = namespace(dout)
        axes = (0,) if dout.ndim == 2 else (0, 2, 3)
        self.dbeta = xp.sum(dout, axis=axes)
        self.dgamma = xp.sum(dout * self.xn, axis=axes)
        dxn = dout * xp.reshape(self.gamma, (1, -1) if dout.ndim == 2 else (1, -1, 1, 1))
        if not self.train_mode:  # the statistics are constants
            return as_input_dtype(self, xp, dxn / self.std)
        # The batch mean and variance depend on x too: dx = (dxn - mean(dxn)
        # - xn * mean(dxn * xn)) / std, the means over the normalized axes.
        return as_input_dtype(self, xp, (dxn - xp.mean(dxn, axis=axes, keepdims=True)
                                         - self.xn * xp.mean(dxn * self.xn, axis=axes,
                                                             keepdims=True)) / self.std)


class Dropout(Layer):
    """Inverted dropout: in training, each element is zeroed with probability ``ratio`` and
    the rest scaled by ``1 / (1 - ratio)``; at inference, the identity (x itself).

    Parameters
    ----------
    ratio : float in [0, 1), default 0.5
    seed : int, default 0

    The k-th mask (``draws`` counts them) comes from NumPy's generator seeded with
    ``(seed, k)`` on the host and is copied to x's device: the same seed gives the same
    masks, hence the same training curve, on every backend and dtype, and a run resumed
    from a checkpoint (which keeps ``draws``) draws what an uninterrupted one would.
    The copy is one host-to-device transfer per training step (never a read back).

    ``seed`` and ``draws`` are the layer's state (``state_names``): a net saves them with
    its weights and a training checkpoint restores them.
    """

    state_names = ("seed", "draws")  # where the stream of masks stands
    has_train_mode = True

    def __init__(self, ratio: float = 0.5, *, seed: int = 0):
        self.ratio = real_option("ratio", ratio, 0.0, 1.0, high_open=True)
        self.seed = check_seed(seed)
        self.draws = 0
        self.mask = None

    def __repr__(self):
        return f"Dropout(ratio={self.ratio}, seed={self.seed})"

    def config(self) -> dict:
        return {"ratio": self.ratio}

    def check_forward(self, x, train: bool = True):
        check_array(namespace(x=require_array(x, "x")), x, "x")
        check_flag("train", train)

    def forward(self, x, train: bool = True):
        if not train or self.ratio == 0.0:
            self.mask = None
            return x
        mask = NotImplemented if speedups.dropout_mask is None else speedups.dropout_mask(self, x)
        self.mask = dropout_mask(x, self.ratio, self.seed, self.draws) \
            if mask is NotImplemented else mask
        self.draws += 1
        return x * self.mask

    def backward(self, dout):
        # d(x * mask)/dx = mask; the identity passes dout on (as a new array).
        if self.mask is None:
            return namespace(dout).asarray(dout, copy=True)
        return dout * self.mask
