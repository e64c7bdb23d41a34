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


def make_specs(rng: np.random.Generator) -> list[Spec]:
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
