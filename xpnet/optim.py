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
from collections.abc import Mapping

import numpy as np

from ._checks import MAX_COUNT
from .backend import (
    HOST_ARRAY,
    device_context,
    dtype_name,
    is_dtype,
    is_writable,
    namespace,
    native_device,
    to_device,
    to_numpy,
)

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
        """Apply one step to every parameter, in place where possible (see the module docstring).

        Everything is checked before anything changes: a bad gradient (another shape or
        dtype, None, not an array) raises and leaves every parameter and the step count as
        they were.
        """
        spaces = self._check_update(params, grads)
        first = params[next(iter(spaces))] if spaces else None
        if first is None or type(first) is HOST_ARRAY:
            self.apply(params, grads)
        else:
            with device_context(first):  # the parameters' GPU current (CuPy)
                self.apply(params, grads)

    def apply(self, params, grads) -> None:
        """:meth:`update` without its checks, for callers that checked once that ``grads``
        fit ``params`` (the Trainer's steps) and run inside the parameters' device context.
        The same arithmetic as :meth:`update`."""
        self.steps += 1
        xp, state, steps = None, self.state, self.steps
        for name, g in grads.items():
            p = params[name]
            if xp is None:
                xp = namespace(p)
            slots = state.get(name)
            if slots is None and self.STATE_SLOTS:
                slots = self.slots(name, p)
            delta = self._step(xp, slots, g, steps)
            if p.flags.writeable if type(p) is HOST_ARRAY else is_writable(p):
                p += delta
            else:  # JAX: a new array, which the net's params view hands to the owning layer
                params[name] = p + delta

    def record_steps(self, count: int, state: dict | None = None) -> None:
        """Count ``count`` steps taken outside :meth:`update` (a fused or compiled loop that
        ran this optimizer's arithmetic itself) and, where given, take the state they left
        (``{name: {slot: array}}``, every slot of :attr:`STATE_SLOTS`)."""
        self.steps += int(count)
        if state is not None:
            self.state = state

    def pure_update(self, params: dict, grads: dict, state: dict, steps):
        """One step as a pure function, for compiled training: ``(new params, new state)``
        from ``params``, ``grads``, ``state`` (``{name: {slot: array}}``, every slot present:
        :meth:`initial_state`) and ``steps``, the step count after this step (an int, or a
        0-d integer array traced by ``jax.jit``).  Reads no attribute it changes and changes
        nothing: ``self.state`` and ``self.steps`` are left as they are."""
        new_params, new_state = {}, {}
        for name, p in params.items():
            xp = namespace(p=p)
            # _step updates writable slots in place: copies of them, the caller's are kept.
            slots = {k: xp.asarray(v, copy=True) if is_writable(v) else v
                     for k, v in state.get(name, {}).items()}
            new_params[name] = p + self._step(xp, slots, grads[name], steps)
            if slots:
                new_state[name] = slots
        return new_params, new_state

    def initial_state(self, params) -> dict:
        """``self.state`` with every slot of every parameter present (zeros where no step has
        made it yet): the state a compiled step carries.  Changes nothing."""
        state = {name: dict(slots) for name, slots in self.state.items()}
        for name, p in params.items():
            if self.STATE_SLOTS and set(state.get(name, ())) != set(self.STATE_SLOTS):
                xp = namespace(p=p)
                zeros = {k: xp.zeros(p.shape, dtype=p.dtype, device=native_device(p))
                         for k in self.STATE_SLOTS}
                state[name] = {**zeros, **state.get(name, {})}
        return state

    def _check_update(self, params, grads) -> dict:
        """``{name: namespace}`` for an update of ``params`` by ``grads``, or a clear error."""
        for arg, value in (("params", params), ("grads", grads)):
            if not isinstance(value, Mapping):
                raise TypeError(f"{arg} must be a mapping {{name: array}} (a net's params, its "
                                f"gradient()), got {type(value).__name__}")
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        if missing or extra:
            raise ValueError(
                f"grads must have the keys of params: missing {missing}, unexpected {extra}"
            )
        spaces = {}
        for name in params:
            p, g = params[name], grads[name]
            if g is None:
                raise TypeError(f"grads[{name!r}] is None: no gradient was computed for it "
                                "(run the net's backward, e.g. net.gradient(x, t), first)")
            spaces[name] = xp = namespace(**{f"params[{name!r}]": p, f"grads[{name!r}]": g})
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"grads[{name!r}] has shape {tuple(g.shape)}, params[{name!r}] has "
                    f"{tuple(p.shape)}"
                )
            if not is_dtype(xp, p.dtype, "real floating"):
                raise TypeError(f"params[{name!r}] has dtype {dtype_name(p.dtype)}; an optimizer "
                                "updates float32 or float64 parameters")
            if g.dtype != p.dtype:
                raise TypeError(f"grads[{name!r}] has dtype {dtype_name(g.dtype)}, "
                                f"params[{name!r}] has {dtype_name(p.dtype)}")
        return spaces

    def slots(self, name: str, like) -> dict:
        """The state arrays of parameter ``name`` (``{slot: array}``; empty for SGD), made as
        zeros of ``like``'s shape, dtype and device on first use.  A fused loop updates them
        in place (NumPy) or stores new arrays into the returned dict."""
        slots = self.state.get(name)
        if slots is None:
            if not self.STATE_SLOTS:
                return {}
            xp = namespace(like)
            slots = self.state[name] = {
                k: xp.zeros(like.shape, dtype=like.dtype, device=native_device(like))
                for k in self.STATE_SLOTS}
        return slots

    def check_state_fits(self, params) -> None:
        """ValueError naming the parameter unless each state array this optimizer holds
        has its parameter's shape (a net whose layers were replaced since the last step)."""
        for name, slots in self.state.items():
            if name not in params:
                raise ValueError(f"{type(self).__name__} holds state for {name!r}, which is not "
                                 f"a parameter of the net (its parameters are {list(params)})")
            for k, v in slots.items():
                if tuple(v.shape) != tuple(params[name].shape):
                    raise ValueError(f"{type(self).__name__}'s {k} of {name!r} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(params[name].shape)}: "
                                     "the net changed; make a new optimizer for it")

    def _step(self, xp, slots: dict, g, steps):  # pragma: no cover - abstract
        """Return the change to add to the parameter whose gradient is ``g``.

        ``slots`` holds its state arrays: update each in place where the array allows it
        and store it back (``slots["v"] = v``), which keeps the new array where it cannot be
        updated in place (JAX, a traced step).  ``steps`` counts this step too (an int, or
        a traced 0-d integer array in a compiled step).
        """
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------

    HYPERPARAMETERS: tuple = ("lr",)
    STATE_SLOTS: tuple = ()  # the state arrays each parameter gets (Momentum's "v", ...)

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

    def load_state_dict(self, state: dict, device: str, params=None) -> None:
        """Restore :meth:`state_dict` output, moving the state arrays to ``device``.

        Everything is checked (:meth:`check_state_dict`) before anything changes.
        """
        hyper, steps, slots = self.check_state_dict(state, params)
        # In each parameter's dtype where the net is given (a float64 slot of a float32 net
        # would turn its updates float64).
        moved = {n: {k: to_device(v, device, copy=True, dtype=None if params is None
                                  else dtype_name(params[n].dtype)) for k, v in s.items()}
                 for n, s in slots.items()}
        for k, v in hyper.items():
            setattr(self, k, v)
        self.steps, self.state = steps, moved

    def check_state_dict(self, state: dict, params=None):
        """``(hyperparameters, steps, state)`` of a :meth:`state_dict` for this optimizer, or
        ValueError saying what does not fit.  With ``params`` (a net's), each state array
        must belong to a parameter and have its shape, and after a step every parameter
        must have all of this optimizer's slots (``STATE_SLOTS``)."""
        name = type(self).__name__
        if not isinstance(state, Mapping) or state.get("type") != name:
            kind = state.get("type") if isinstance(state, Mapping) else state
            raise ValueError(f"the saved optimizer is {kind!r}, this one is {name}")
        hyper = state.get("hyper")
        if not isinstance(hyper, Mapping) or set(hyper) != set(self.hyperparameters()):
            raise ValueError(f"saved hyperparameters {hyper!r} are not {name}'s "
                             f"{sorted(self.hyperparameters())}")
        hyper = {k: _hyper(k, v, **_BOUNDS.get(k, {})) for k, v in hyper.items()}
        steps = state.get("steps")
        if (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0
                or steps > MAX_COUNT):
            raise ValueError(f"the saved step count must be an int in [0, {MAX_COUNT}], got "
                             f"{steps!r}")
        slots = state.get("state")
        if not isinstance(slots, Mapping) or not all(
                isinstance(s, Mapping) and set(s) == set(self.STATE_SLOTS) for s in slots.values()):
            raise ValueError(f"{name}'s saved state must hold the arrays {self.STATE_SLOTS} for "
                             f"each parameter, got {_describe_slots(slots)}")
        if params is not None:
            _check_slots_fit(name, slots, params, steps > 0 and self.STATE_SLOTS)
        return hyper, int(steps), {n: dict(s) for n, s in slots.items()}


def _describe_slots(slots) -> str:
    if not isinstance(slots, Mapping):
        return type(slots).__name__
    return "{" + ", ".join(f"{n}: {sorted(s) if isinstance(s, Mapping) else s!r}"
                           for n, s in slots.items()) + "}"


def _check_slots_fit(optimizer: str, slots, params, every: bool) -> None:
    unknown = sorted(set(slots) - set(params))
    missing = sorted(set(params) - set(slots)) if every else []
    if unknown or missing:
        raise ValueError(f"{optimizer}'s saved state does not fit the net: state for "
                         f"{unknown} that are not parameters, none for {missing}")
    for n, s in slots.items():
        for k, v in s.items():
            if tuple(getattr(v, "shape", ())) != tuple(params[n].shape):
                raise ValueError(f"{optimizer}'s saved state {n}/{k} has shape "
                                 f"{tuple(getattr(v, 'shape', ()))}, the parameter {n} has "
                                 f"{tuple(params[n].shape)}")
            _check_slot_values(f"{optimizer}'s saved state {n}/{k}", v, params[n],
                               k in _NONNEGATIVE_SLOTS.get(optimizer, ()))


# The slots that hold sums of squares: a negative value would make sqrt NaN.
_NONNEGATIVE_SLOTS = {"AdaGrad": ("h",), "Adam": ("v",)}


def _check_slot_values(where: str, value, param, nonnegative: bool) -> None:
    """A saved slot as it will be held: real floats, finite in the parameter's dtype (1e300
    is inf in float32), >= 0 where the slot is a sum of squares.  ValueError otherwise."""
    host = to_numpy(value)
    if not np.issubdtype(host.dtype, np.floating):
        raise ValueError(f"{where} has dtype {host.dtype}, expected real floats")
    with np.errstate(over="ignore", invalid="ignore"):
        held = host.astype(dtype_name(param.dtype))
    if not np.all(np.isfinite(held)):
        raise ValueError(f"{where} holds NaN or infinite values in {dtype_name(param.dtype)}")
    if nonnegative and np.any(held < 0):
        raise ValueError(f"{where} holds negative values; it is a sum of squares (>= 0)")


# Bounds of the hyperparameters other than the default (0, inf): the momentum-like ones.
_BOUNDS = {k: {"high": 1.0, "closed_low": True} for k in ("momentum", "beta1", "beta2")}


class SGD(Optimizer):
    """Plain gradient descent: ``p -= lr * g``."""

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)

    def _step(self, xp, slots, g, steps):
        return -self.lr * g


class Momentum(Optimizer):
    """Heavy-ball momentum: ``v = momentum * v - lr * g;  p += v``."""

    HYPERPARAMETERS = ("lr", "momentum")
    STATE_SLOTS = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = _hyper("momentum", momentum, **_BOUNDS["momentum"])

    def _step(self, xp, slots, g, steps):
        v = slots["v"]
        v *= self.momentum  # in place where v allows it; else (JAX) v is a new array
        v -= self.lr * g
        slots["v"] = v
        return v


class AdaGrad(Optimizer):
    """AdaGrad: ``h += g * g;  p -= lr * g / (sqrt(h) + eps)``.

    ``eps`` keeps the first steps finite where h is still 0.
    """

    HYPERPARAMETERS = ("lr", "eps")
    STATE_SLOTS = ("h",)

    def __init__(self, lr: float = 0.01, eps: float = 1e-7):
        super().__init__(lr)
        self.eps = _hyper("eps", eps)

    def _step(self, xp, slots, g, steps):
        h = slots["h"]
        h += g * g
        slots["h"] = h
        return -self.lr * g / (xp.sqrt(h) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction.

    ``m += (1 - beta1) (g - m);  v += (1 - beta2) (g**2 - v);
    p -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)``.
    """

    HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps")
    STATE_SLOTS = ("m", "v")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        super().__init__(lr)
        self.beta1 = _hyper("beta1", beta1, **_BOUNDS["beta1"])
        self.beta2 = _hyper("beta2", beta2, **_BOUNDS["beta2"])
        self.eps = _hyper("eps", eps)

    def _step(self, xp, slots, g, steps):
        m, v = slots["m"], slots["v"]
        m += (1.0 - self.beta1) * (g - m)
        v += (1.0 - self.beta2) * (g * g - v)
        slots["m"], slots["v"] = m, v
        return -self._corrected_lr(xp, steps, g.dtype) * m / (xp.sqrt(v) + self.eps)

    def _corrected_lr(self, xp, t, dtype):
        """``lr * sqrt(1 - beta2**t) / (1 - beta1**t)``: a Python float for a step count t,
        a 0-d array of ``dtype`` for a traced one (a compiled step)."""
        if isinstance(t, int):
            return self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        t = xp.astype(t, dtype)
        return self.lr * xp.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adagrad": 0.01, "adam": 0.001}


def make_optimizer(name: str, lr: float | None = None) -> Optimizer:
    """An optimizer by name (``sgd``, ``momentum``, ``adagrad``, ``adam``); ``lr`` defaults to
    a value that trains the book's nets well (SGD 0.1, Momentum 0.05, AdaGrad 0.01, Adam 0.001)."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](DEFAULT_LR[key] if lr is None else lr)
