"""Optimizers: SGD, Momentum, AdaGrad, Adam, each with ``update(params, grads)``.

``params`` is a mapping name -> array (a network's ``params``), ``grads`` a
dict with the same keys.  Updates are in place where the array allows it
(NumPy, CuPy, torch, array_api_strict); otherwise ``params[name]`` is rebound to
the new array, which a network's :class:`~xpnet.nets.Parameters` view passes on
to the layer that owns it.  State (velocities, moments) is created on each
parameter's device, in its dtype.  Hyperparameters are Python floats, never
NumPy scalars (those would promote float32 to float64).
"""

from __future__ import annotations

import math
import numbers

from .backend import is_writable, namespace, to_device, to_numpy

__all__ = ["SGD", "AdaGrad", "Adam", "Momentum", "Optimizer"]  # exported by xpnet/__init__


def _hyper(name: str, value, *, low: float = 0.0, high: float = math.inf, closed_low=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok_low = v >= low if closed_low else v > low
    if not (math.isfinite(v) and ok_low and v < high):
        bound = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")
    return v


class Optimizer:
    """Base class: checks the keys and shapes, then applies :meth:`_step` to each parameter."""

    def __init__(self, lr: float):
        self.lr = _hyper("lr", lr)
        self.state: dict = {}  # name -> dict of state arrays, on the parameter's device
        self.steps = 0

    def __repr__(self):
        extra = self.hyperparameters()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in extra.items())})"

    def update(self, params, grads) -> None:
        """Apply one step to every parameter, in place where possible (see the module docstring)."""
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        if missing or extra:
            raise ValueError(
                f"grads must have the keys of params: missing {missing}, unexpected {extra}"
            )
        spaces = {}  # every pair is checked before any parameter changes
        for name in params:
            p, g = params[name], grads[name]
            spaces[name] = namespace(**{f"params[{name!r}]": p, f"grads[{name!r}]": g})
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"grads[{name!r}] has shape {tuple(g.shape)}, params[{name!r}] has "
                    f"{tuple(p.shape)}"
                )
        self.steps += 1
        for name, xp in spaces.items():
            p = params[name]
            delta = self._step(xp, name, p, grads[name])
            if is_writable(p):
                p += delta
            else:
                params[name] = p + delta

    def _state(self, xp, name: str, key: str, like):
        slot = self.state.setdefault(name, {})
        if key not in slot:
            slot[key] = xp.zeros(like.shape, dtype=like.dtype, device=like.device)
        return slot[key]

    def _step(self, xp, name, p, g):  # pragma: no cover - abstract
        """Return the change to add to ``p`` (updating any state in place)."""
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------

    HYPERPARAMETERS: tuple = ("lr",)

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    def state_dict(self) -> dict:
        """``{"type", "hyper", "steps", "state": {param: {key: host NumPy copy}}}``."""
        return {
            "type": type(self).__name__,
            "hyper": self.hyperparameters(),
            "steps": self.steps,
            "state": {n: {k: to_numpy(v) for k, v in s.items()} for n, s in self.state.items()},
        }

    def load_state_dict(self, state: dict, device: str) -> None:
        """Restore :meth:`state_dict` output, moving the state arrays to ``device``."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"the saved optimizer is {state.get('type')!r}, this one is "
                             f"{type(self).__name__}")
        hyper = state.get("hyper", {})
        if set(hyper) != set(self.hyperparameters()):
            raise ValueError(f"saved hyperparameters {sorted(hyper)} are not "
                             f"{type(self).__name__}'s {sorted(self.hyperparameters())}")
        for k, v in hyper.items():
            setattr(self, k, _hyper(k, v, closed_low=k in ("momentum", "beta1", "beta2"),
                                    high=1.0 if k in ("momentum", "beta1", "beta2") else math.inf))
        self.steps = int(state["steps"])
        self.state = {n: {k: to_device(v, device, copy=True) for k, v in s.items()}
                      for n, s in state["state"].items()}


class SGD(Optimizer):
    """Plain gradient descent: ``p -= lr * g``."""

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)

    def _step(self, xp, name, p, g):
        return -self.lr * g


class Momentum(Optimizer):
    """Heavy-ball momentum: ``v = momentum * v - lr * g;  p += v``."""

    HYPERPARAMETERS = ("lr", "momentum")

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = _hyper("momentum", momentum, high=1.0, closed_low=True)

    def _step(self, xp, name, p, g):
        v = self._state(xp, name, "v", p)
        v *= self.momentum
        v -= self.lr * g
        return v


class AdaGrad(Optimizer):
    """AdaGrad: ``h += g * g;  p -= lr * g / (sqrt(h) + eps)``.

    ``eps`` keeps the first steps finite where h is still 0.
    """

    HYPERPARAMETERS = ("lr", "eps")

    def __init__(self, lr: float = 0.01, eps: float = 1e-7):
        super().__init__(lr)
        self.eps = _hyper("eps", eps)

    def _step(self, xp, name, p, g):
        h = self._state(xp, name, "h", p)
        h += g * g
        return -self.lr * g / (xp.sqrt(h) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction.

    ``m += (1 - beta1) (g - m);  v += (1 - beta2) (g**2 - v);
    p -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)``.
    """

    HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        super().__init__(lr)
        self.beta1 = _hyper("beta1", beta1, high=1.0, closed_low=True)
        self.beta2 = _hyper("beta2", beta2, high=1.0, closed_low=True)
        self.eps = _hyper("eps", eps)

    def _step(self, xp, name, p, g):
        m = self._state(xp, name, "m", p)
        v = self._state(xp, name, "v", p)
        m += (1.0 - self.beta1) * (g - m)
        v += (1.0 - self.beta2) * (g * g - v)
        t = self.steps
        lr_t = self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        return -lr_t * m / (xp.sqrt(v) + self.eps)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adagrad": 0.01, "adam": 0.001}


def make_optimizer(name: str, lr: float | None = None) -> Optimizer:
    """An optimizer by name (``sgd``, ``momentum``, ``adagrad``, ``adam``); ``lr`` defaults to
    a value that trains the book's nets well (SGD 0.1, Momentum 0.05, AdaGrad 0.01, Adam 0.001)."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](DEFAULT_LR[key] if lr is None else lr)
