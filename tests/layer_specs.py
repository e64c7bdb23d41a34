"""A table of layer test problems, shared by the layer tests.

Each spec says how to build a layer from host float64 values, which inputs are
differentiable, which attributes hold parameter gradients, an independent
NumPy float64 forward reference and, where it applies, a torch autograd oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import xpnet


@dataclass
class Spec:
    id: str
    build: Callable[[dict], object]  # params (backend arrays) -> layer
    params: dict  # name -> host float64 array, passed to build
    inputs: list  # host arrays; floats are differentiable unless n_diff says otherwise
    reference: Callable  # numpy float64 forward: (*inputs, **params) -> output
    n_diff: int | None = None  # how many leading inputs get a gradient (default: all)
    param_grads: dict = field(default_factory=dict)  # param name -> gradient attribute
    torch_fn: Callable | None = None  # torch float64 forward, for the autograd oracle
    scalar_output: bool = False

    def __str__(self):
        return self.id

    @property
    def diff_count(self) -> int:
        return len(self.inputs) if self.n_diff is None else self.n_diff


def _away_from_zero(rng, shape, margin=0.1):
    # Relu's kink at 0 would spoil a centered difference; keep every entry at least `margin` away.
    a = rng.standard_normal(shape)
    return np.sign(a) * (np.abs(a) + margin)


def _logsumexp_loss(x, t):
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    rows = np.eye(x.shape[1])[t] if t.ndim == 1 else t
    return -(rows * logp).sum() / x.shape[0]


def _torch_softmax_loss(x, t):
    import torch

    logp = torch.log_softmax(x, dim=1)
    rows = torch.nn.functional.one_hot(t, x.shape[1]).to(x.dtype) if t.ndim == 1 else t
    return -(rows * logp).sum() / x.shape[0]


def _conv_reference(x, W, b, *, stride, pad):
    """A direct nested-loop convolution (no im2col): the independent forward reference."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    fh, fw = W.shape[2:]
    oh, ow = (x.shape[2] - fh) // stride + 1, (x.shape[3] - fw) // stride + 1
    out = np.empty((x.shape[0], W.shape[0], oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride:i * stride + fh, j * stride:j * stride + fw]
            out[:, :, i, j] = np.tensordot(patch, W, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def _pool_reference(x, *, size, stride, pad, mode):
    fill = -np.inf if mode == "max" else 0.0
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    ph, pw = size
    oh, ow = (x.shape[2] - ph) // stride + 1, (x.shape[3] - pw) // stride + 1
    out = np.empty((*x.shape[:2], oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * stride:i * stride + ph, j * stride:j * stride + pw]
            out[:, :, i, j] = window.max(axis=(2, 3)) if mode == "max" else window.mean(axis=(2, 3))
    return out


def _bn_reference(x, gamma, beta, eps=1e-5):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return gamma.reshape(shape) * (x - mean) / np.sqrt(var + eps) + beta.reshape(shape)


def dropout_reference(x, ratio, seed, draw=0):
    """Inverted dropout with the documented mask: NumPy's generator seeded (seed, draw),
    float32 uniforms, kept where >= ratio."""
    keep = np.random.default_rng((seed, draw)).random(x.shape, dtype=np.float32) >= ratio
    return x * keep / (1.0 - ratio)


def _conv_spec(rng, name, w_shape, x_shape, stride, pad):
    return Spec(name, lambda p: xpnet.Convolution(p["W"], p["b"], stride=stride, pad=pad),
                {"W": rng.standard_normal(w_shape), "b": rng.standard_normal(w_shape[0])},
                [rng.standard_normal(x_shape)],
                lambda x, W, b: _conv_reference(x, W, b, stride=stride, pad=pad),
                param_grads={"W": "dW", "b": "db"},
                torch_fn=lambda x, W, b: _torch_f().conv2d(x, W, b, stride=stride, padding=pad))


def _pool_spec(rng, name, size, x_shape, stride, pad, mode):
    def torch_fn(x):
        f = _torch_f().max_pool2d if mode == "max" else _torch_f().avg_pool2d
        return f(x, size, stride=stride, padding=pad)

    return Spec(name, lambda p: xpnet.Pooling(*size, stride=stride, pad=pad, mode=mode), {},
                [rng.standard_normal(x_shape)],
                lambda x: _pool_reference(x, size=size, stride=stride, pad=pad, mode=mode),
                torch_fn=torch_fn)


def _bn_spec(rng, name, x_shape):
    c = x_shape[1]
    return Spec(name, lambda p: xpnet.BatchNormalization(p["gamma"], p["beta"]),
                {"gamma": 1 + 0.5 * rng.standard_normal(c), "beta": rng.standard_normal(c)},
                [2 + 3 * rng.standard_normal(x_shape)], _bn_reference,
                param_grads={"gamma": "dgamma", "beta": "dbeta"},
                torch_fn=lambda x, gamma, beta: _torch_f().batch_norm(
                    x, None, None, gamma, beta, training=True, eps=1e-5))


def _torch_f():
    import torch.nn.functional

    return torch.nn.functional


def chapter_7_8_specs(rng: np.random.Generator) -> list[Spec]:
    """Convolution, Pooling, BatchNormalization (training mode) and Dropout."""
    return [
        _conv_spec(rng, "conv", (3, 2, 3, 3), (2, 2, 5, 5), 1, 0),
        _conv_spec(rng, "conv-stride2-pad1", (4, 2, 3, 3), (2, 2, 6, 5), 2, 1),
        _conv_spec(rng, "conv-nonsquare-pad2", (2, 3, 2, 3), (1, 3, 4, 5), 1, 2),
        _conv_spec(rng, "conv-stride3-1x1", (3, 2, 1, 1), (2, 2, 7, 4), 3, 0),
        _pool_spec(rng, "maxpool-2x2", (2, 2), (2, 3, 4, 6), 2, 0, "max"),
        _pool_spec(rng, "maxpool-3x3-stride2-pad1", (3, 3), (2, 2, 5, 4), 2, 1, "max"),
        _pool_spec(rng, "maxpool-3x2-overlapping", (3, 2), (1, 2, 5, 4), 1, 0, "max"),
        _pool_spec(rng, "avgpool-2x2-odd", (2, 2), (2, 2, 5, 7), 2, 0, "avg"),
        _pool_spec(rng, "avgpool-3x3-stride2-pad1", (3, 3), (2, 2, 5, 4), 2, 1, "avg"),
        _bn_spec(rng, "batchnorm-2d", (6, 4)),
        _bn_spec(rng, "batchnorm-4d", (4, 3, 2, 3)),
        Spec("dropout", lambda p: xpnet.Dropout(0.4, seed=3), {}, [rng.standard_normal((6, 5))],
             lambda x: dropout_reference(x, 0.4, 3)),
    ]


def make_specs(rng: np.random.Generator) -> list[Spec]:
    return _chapter_5_specs(rng) + chapter_7_8_specs(rng)


def _chapter_5_specs(rng: np.random.Generator) -> list[Spec]:
    labels = np.array([0, 3, 1, 3, 2], dtype=np.int64)
    probs = rng.random((5, 4))
    probs /= probs.sum(axis=1, keepdims=True)
    return [
        Spec("mul", lambda p: xpnet.Mul(), {}, [rng.standard_normal((3, 4)),
             rng.standard_normal((3, 4))], lambda x, y: x * y),
        Spec("mul-broadcast", lambda p: xpnet.Mul(), {}, [rng.standard_normal((3, 4)),
             rng.standard_normal((1, 4))], lambda x, y: x * y),
        Spec("add", lambda p: xpnet.Add(), {}, [rng.standard_normal((3, 4)),
             rng.standard_normal((3, 4))], lambda x, y: x + y),
        Spec("add-broadcast", lambda p: xpnet.Add(), {}, [rng.standard_normal((2, 3, 4)),
             rng.standard_normal((4,))], lambda x, y: x + y),
        Spec("relu", lambda p: xpnet.Relu(), {}, [_away_from_zero(rng, (4, 5))],
             lambda x: np.maximum(x, 0.0), torch_fn=lambda x: x.relu()),
        Spec("sigmoid", lambda p: xpnet.Sigmoid(), {}, [3 * rng.standard_normal((4, 5))],
             lambda x: 1.0 / (1.0 + np.exp(-x)), torch_fn=lambda x: x.sigmoid()),
        Spec("affine", lambda p: xpnet.Affine(p["W"], p["b"]),
             {"W": rng.standard_normal((6, 3)), "b": rng.standard_normal(3)},
             [rng.standard_normal((4, 6))], lambda x, W, b: x @ W + b,
             param_grads={"W": "dW", "b": "db"},
             torch_fn=lambda x, W, b: x @ W + b),
        Spec("affine-4d", lambda p: xpnet.Affine(p["W"], p["b"]),
             {"W": rng.standard_normal((12, 5)), "b": rng.standard_normal(5)},
             [rng.standard_normal((3, 2, 3, 2))],
             lambda x, W, b: x.reshape(x.shape[0], -1) @ W + b,
             param_grads={"W": "dW", "b": "db"},
             torch_fn=lambda x, W, b: x.reshape(x.shape[0], -1) @ W + b),
        Spec("softmax-labels", lambda p: xpnet.SoftmaxWithLoss(), {},
             [2 * rng.standard_normal((5, 4)), labels], _logsumexp_loss, n_diff=1,
             torch_fn=_torch_softmax_loss, scalar_output=True),
        Spec("softmax-onehot", lambda p: xpnet.SoftmaxWithLoss(), {},
             [2 * rng.standard_normal((5, 4)), np.eye(4)[labels]], _logsumexp_loss, n_diff=1,
             torch_fn=_torch_softmax_loss, scalar_output=True),
        Spec("softmax-probs", lambda p: xpnet.SoftmaxWithLoss(), {},
             [2 * rng.standard_normal((5, 4)), probs], _logsumexp_loss, n_diff=1,
             torch_fn=_torch_softmax_loss, scalar_output=True),
        # Rows that do not sum to 1 (e.g. a weighted loss): dL/dx is y * sum(t) - t, not y - t.
        Spec("softmax-unnormalized", lambda p: xpnet.SoftmaxWithLoss(), {},
             [2 * rng.standard_normal((5, 4)), 2 * probs], _logsumexp_loss, n_diff=1,
             torch_fn=_torch_softmax_loss, scalar_output=True),
    ]


SPEC_IDS = [s.id for s in make_specs(np.random.default_rng(0))]
TORCH_SPEC_IDS = [s.id for s in make_specs(np.random.default_rng(0)) if s.torch_fn is not None]


def spec_by_id(spec_id: str, seed: int = 0) -> Spec:
    return next(s for s in make_specs(np.random.default_rng(seed)) if s.id == spec_id)


def as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def run_layer(spec: Spec, case, dout_host):
    """Build the layer on ``case``, run forward and backward; return (layer, out, grads)."""
    params = {k: case.asarray(v) for k, v in spec.params.items()}
    layer = spec.build(params)
    inputs = [case.asarray(a) for a in spec.inputs]
    out = layer.forward(*inputs)
    dout = dout_host if spec.scalar_output else case.asarray(dout_host)
    grads = as_tuple(layer.backward(dout))
    return layer, inputs, out, grads


def dout_for(spec: Spec, rng: np.random.Generator):
    if spec.scalar_output:
        return 1.7
    out = spec.reference(*spec.inputs, **spec.params)
    return rng.standard_normal(np.shape(out))
