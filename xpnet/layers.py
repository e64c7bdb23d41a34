"""Layers with explicit ``forward()`` / ``backward()``: Mul, Add, Relu, Sigmoid, Affine,
SoftmaxWithLoss.

Each backward sits next to the forward math it differentiates.  The layers are
written against the Python Array API: they run unchanged on NumPy, CuPy, torch
and array_api_strict arrays, on the device of their inputs, in their dtype.
No layer writes into an argument: ``backward`` returns new arrays.
"""

from __future__ import annotations

import math

from .backend import (
    dtype_name,
    is_scalar,
    is_writable,
    matmul_accumulate,
    matmul_add,
    namespace,
)
from .functional import (
    check_array,
    check_logits,
    sigmoid,
    softmax_cross_entropy,
    targets_as_rows,
)

__all__ = ["Add", "Affine", "ForwardNotCalledError", "Mul", "Relu", "Sigmoid", "SoftmaxWithLoss"]


class ForwardNotCalledError(RuntimeError, ValueError):
    """``backward()`` was called on a layer whose ``forward()`` has not run.

    A :class:`RuntimeError` (wrong call order) and, like every xpnet input
    error, a :class:`ValueError`.
    """


def _require_forward(layer, cached) -> None:
    if cached is None:
        name = type(layer).__name__
        raise ForwardNotCalledError(
            f"{name}.backward() was called before {name}.forward(): "
            "run forward on a batch first, then backward with the gradient of its output"
        )


def _check_dout(xp, dout, out_shape, dtype, layer) -> None:
    """dout must be an array of the forward output's shape and dtype."""
    where = f"{type(layer).__name__}.backward"
    if not hasattr(dout, "shape"):
        raise TypeError(f"{where}: dout must be an array, got {type(dout).__name__}")
    if tuple(dout.shape) != tuple(out_shape):
        raise ValueError(
            f"{where}: dout has shape {tuple(dout.shape)}, but forward's output had shape "
            f"{tuple(out_shape)}"
        )
    if dout.dtype != dtype:
        raise TypeError(
            f"{where}: dout has dtype {dtype_name(dout.dtype)}, but forward's output had "
            f"{dtype_name(dtype)}"
        )


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


class Mul:
    """Multiplication node ``out = x * y`` (Python numbers or arrays; broadcasting allowed).

    ``backward(dout)`` returns ``(dout * y, dout * x)``, each summed back to
    the shape of its operand.
    """

    def __init__(self):
        self.x = None
        self.y = None

    def forward(self, x, y):
        if not (is_scalar(x) and is_scalar(y)):
            namespace(x=x, y=y)  # same library and device, or a clear error
        self.x, self.y = x, y
        return x * y

    def backward(self, dout):
        _require_forward(self, self.x)
        # d(xy)/dx = y, d(xy)/dy = x: each input's gradient is dout times the *other* input.
        return _sum_to(dout * self.y, self.x), _sum_to(dout * self.x, self.y)


class Add:
    """Addition node ``out = x + y`` (Python numbers or arrays; broadcasting allowed).

    ``backward(dout)`` passes dout through to both inputs, summed back to the
    shape of each; the two results never alias ``dout`` or each other.
    """

    def __init__(self):
        self.x = None
        self.y = None

    def forward(self, x, y):
        if not (is_scalar(x) and is_scalar(y)):
            namespace(x=x, y=y)
        # Only the operands' shapes matter for backward; keep a zero-size stand-in, not the data.
        self.x, self.y = _shape_of(x), _shape_of(y)
        return x + y

    def backward(self, dout):
        _require_forward(self, self.x)
        # d(x+y)/dx = d(x+y)/dy = 1: dout flows unchanged to both sides.
        return _copy_grad(dout, self.x), _copy_grad(dout, self.y)


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


class Relu:
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

    def forward(self, x):
        xp = namespace(x=x)
        check_array(xp, x, "x")
        self._keep = xp.astype(x > 0, x.dtype)
        return xp.maximum(x, _zero(xp, x))

    def backward(self, dout):
        _require_forward(self, self._keep)
        xp = namespace(dout=dout, mask=self._keep)
        _check_dout(xp, dout, self._keep.shape, self._keep.dtype, self)
        # Gradient flows only where the input was positive; a new array, dout is left as it was.
        return dout * self._keep


def _zero(xp, like):
    # A 0-d zero of like's dtype and device, so xp.where never promotes float32.
    return xp.zeros((), dtype=like.dtype, device=like.device)


class Sigmoid:
    """Logistic sigmoid ``out = 1 / (1 + exp(-x))``, stable for any x.

    Attributes
    ----------
    out : the forward output y, which is all backward needs: dy/dx = y (1 - y).
    """

    def __init__(self):
        self.out = None

    def forward(self, x):
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout):
        _require_forward(self, self.out)
        xp = namespace(dout=dout, out=self.out)
        _check_dout(xp, dout, self.out.shape, self.out.dtype, self)
        # d sigmoid(x)/dx = y * (1 - y)
        return dout * (1.0 - self.out) * self.out


class Affine:
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
    d1 * ... * dk = D (flattened to (N, D)).  ``backward(dout)`` takes dout of
    shape (N, M), returns dx in x's original shape and sets ``dW`` (D, M) and
    ``db`` (M,).

    Attributes
    ----------
    W, b : the parameters (the layer reads them at every call, so assigning a
        new array takes effect at the next forward).
    dW, db : gradients from the last backward.
    x : the flattened (N, D) input of the last forward.
    params, grads : dicts ``{"W": W, "b": b}`` and ``{"W": dW, "b": db}``
        (the protocol the gradient checker uses to find a layer's parameters).
    """

    def __init__(self, W, b, *, input_grad: bool = True):
        xp = namespace(W=W, b=b)
        check_array(xp, W, "W", ndim=2)
        check_array(xp, b, "b", ndim=1)
        if b.shape[0] != W.shape[1]:
            raise ValueError(
                f"b must have shape (M,) = ({W.shape[1]},) to match W of shape {tuple(W.shape)}, "
                f"got b of shape {tuple(b.shape)}"
            )
        if b.dtype != W.dtype:
            raise TypeError(
                f"W and b must share a dtype, got W {dtype_name(W.dtype)} and b {dtype_name(b.dtype)}"
            )
        self.W = W
        self.b = b
        self.input_grad = bool(input_grad)
        self.x = None
        self.x_shape = None
        self.dW = None
        self.db = None

    @property
    def params(self) -> dict:
        return {"W": self.W, "b": self.b}

    @property
    def grads(self) -> dict:
        return {"W": self.dW, "b": self.db}

    def __repr__(self):
        return f"Affine(W: {tuple(self.W.shape)} {dtype_name(self.W.dtype)}, b: {tuple(self.b.shape)})"

    def forward(self, x):
        W = self.W
        xp = namespace(x=x, W=W, b=self.b)
        check_array(xp, x, "x")
        if x.ndim < 2:
            raise ValueError(
                f"x must have a batch axis, shape (N, D) or (N, d1, ..., dk), got shape "
                f"{tuple(x.shape)}; for a single sample use xp.reshape(x, (1, -1))"
            )
        n = x.shape[0]
        if n == 0:
            raise ValueError(f"x is an empty batch, shape {tuple(x.shape)}")
        d = math.prod(x.shape[1:])
        if d != W.shape[0]:
            raise ValueError(
                f"x of shape {tuple(x.shape)} has {d} features per sample, but W of shape "
                f"{tuple(W.shape)} expects {W.shape[0]}"
            )
        if x.dtype != W.dtype:
            raise TypeError(
                f"x has dtype {dtype_name(x.dtype)} but W has {dtype_name(W.dtype)}; "
                "convert x with xp.astype(x, W.dtype)"
            )
        x2 = x if x.ndim == 2 else xp.reshape(x, (n, d))
        self.x, self.x_shape = x2, tuple(x.shape)
        return matmul_add(x2, W, self.b)  # x W + b, the bias fused in where the backend can

    def _check_backward(self, dout):
        _require_forward(self, self.x)
        xp = namespace(dout=dout, W=self.W)
        _check_dout(xp, dout, (self.x.shape[0], self.W.shape[1]), self.W.dtype, self)
        return xp

    def _dx(self, xp, dout):
        if not self.input_grad:
            return None
        dx = dout @ self.W.T
        return dx if len(self.x_shape) == 2 else xp.reshape(dx, self.x_shape)

    def backward(self, dout):
        xp = self._check_backward(dout)
        # out = x W + b  =>  dx = dout W^T,  dW = x^T dout,  db = sum_n dout
        self.dW = self.x.T @ dout
        self.db = xp.sum(dout, axis=0)
        return self._dx(xp, dout)

    def backward_sgd(self, dout, lr: float):
        """:meth:`backward` fused with the plain SGD step ``W -= lr dW``, ``b -= lr db``.

        Returns dx, computed with the weights before the step.  ``W`` and ``b``
        are updated in place where they are writable (rebound otherwise), and dW
        is never materialized: ``W += -lr x^T dout`` is one accumulating matrix
        product (:func:`xpnet.backend.matmul_accumulate`), which spares the
        passes over W that a separate update costs.  ``dW`` and ``db`` are left
        as None.
        """
        xp = self._check_backward(dout)
        lr = float(lr)
        dx = self._dx(xp, dout)  # before W changes
        self.W = matmul_accumulate(self.W, self.x, dout, -lr, trans_a=True)
        step = lr * xp.sum(dout, axis=0)
        if is_writable(self.b):
            self.b -= step
        else:
            self.b = self.b - step
        self.dW = self.db = None
        return dx


class SoftmaxWithLoss:
    """Softmax followed by the mean cross-entropy loss over the batch.

    ``forward(x, t)`` takes scores x of shape (N, C) and targets t, either
    integer class labels of shape (N,) in [0, C) or one-hot / probability rows
    of shape (N, C); it returns the loss as a 0-d array on x's device in x's
    dtype.  ``backward(dout=1)`` returns dL/dx times ``dout``.

    Parameters
    ----------
    check_labels : bool, default True
        Check integer labels lie in [0, C) at every forward (one device-to-host
        read); a trainer that checked its labels once may turn it off.

    Attributes
    ----------
    y : softmax output (N, C) of the last forward.
    t : the targets as rows (N, C) in x's dtype (one-hot for integer labels).
    loss : the last loss.
    """

    def __init__(self, *, check_labels: bool = True):
        self.check_labels = check_labels
        self.loss = None
        self.y = None
        self.t = None
        self._row_sums = None

    def forward(self, x, t):
        xp = namespace(x=x, t=t)
        check_logits(xp, x)
        rows, from_labels = targets_as_rows(xp, x, t, check_labels=self.check_labels)
        # For probability rows, dL/dx = (y * sum_c t - t) / N; for labels each row sums to 1.
        self._row_sums = None if from_labels else xp.sum(rows, axis=1, keepdims=True)
        self.y, self.loss = softmax_cross_entropy(xp, x, rows, self._row_sums)
        self.t = rows
        return self.loss

    def backward(self, dout=1):
        _require_forward(self, self.y)
        y = self.y
        if is_scalar(dout):
            scale = float(dout) / y.shape[0]
        else:
            xp = namespace(dout=dout, y=y)
            if getattr(dout, "ndim", None) != 0:
                raise ValueError(
                    "SoftmaxWithLoss.backward: dout is the gradient of the scalar loss and must be "
                    f"a number or a 0-d array, got shape {tuple(getattr(dout, 'shape', ()))}"
                )
            scale = (dout if dout.dtype == y.dtype else xp.astype(dout, y.dtype)) / y.shape[0]
        if self._row_sums is not None:
            y = y * self._row_sums
        # d/dx of -sum(t * log softmax(x)) / N is (softmax(x) * sum(t) - t) / N, times dout.
        return (y - self.t) * scale
