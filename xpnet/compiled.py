"""Compiled training: the Trainer's steps as one compiled program (``Trainer(compile=...)``).

The net's own layers are traced, unchanged, into a pure function of arrays: the
parameters, the optimizer's state, the step count and the optimizer's hyperparameters
go in; the new parameters, state, step count and the loss come out.  While tracing, the
net's parameters are the traced values; afterwards the net gets its arrays back and
every layer forgets what it cached (no layer keeps a traced value).  Nothing in the
compiled program reads a value back to the host: the label range and the data are
checked once, before compiling (by the Trainer), and a NaN loss is caught where the
Trainer reads the losses back, as without compiling.

Two modes:

* ``"step"``: one compiled program per training step (``jax.jit``), the batch gathered
  inside it from the dataset on the device;
* ``"epoch"``: the epoch's full batches as one loop inside one program (``lax.scan``);
  the last, smaller batch (when the batch size does not divide the dataset) runs as one
  compiled step.  The loop stops where the Trainer must act between steps: at a
  checkpoint, a progress-bar update, the end of the epoch (so a Ctrl-C is seen there).

Hyperparameters are arguments of the program, not constants in it: changing
``optimizer.lr`` between epochs (a schedule in ``on_epoch``) takes effect without
recompiling.  The backend must compile (:attr:`xpnet.backend.Backend.compiles`: JAX).
"""

from __future__ import annotations

import contextlib
import copy

from . import speedups
from .backend import compiling_backend, namespace
from .layers import Layer
from .nets import runs_plain_steps
from .optim import Optimizer
from .runners import Runner

__all__ = ["MODES", "CompiledSteps", "check_compilable", "compile_mode", "compiled_steps"]

MODES = ("epoch", "step")  # compile=True means the first


def compile_mode(value) -> str | None:
    """The Trainer's ``compile`` argument as a mode (None: train eagerly)."""
    if value is False or value is None:
        return None
    if value is True:
        return MODES[0]
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(f"compile must be True, False or one of {MODES}, got {value!r}")


def check_compilable(net, optimizer, *, plain: bool = False, allowed: tuple = ()) -> None:
    """TypeError or ValueError unless ``compile=`` can run ``net``'s steps with ``optimizer``:
    an xpnet optimizer, no layer whose masks or statistics change outside the step (dropout,
    batch normalization) but those of the classes ``allowed``, and with ``plain``, a
    :class:`xpnet.Sequential` that keeps its own step methods (what a CUDA graph captures:
    its layers' math)."""
    for attr in ("pure_update", "initial_state", "hyperparameters"):
        if not callable(getattr(optimizer, attr, None)):
            raise TypeError(f"compile needs an xpnet optimizer (SGD, Momentum, AdaGrad, "
                            f"Adam), got {type(optimizer).__name__} (it has no {attr})")
    if plain and not (runs_plain_steps(net) and type(optimizer).update is Optimizer.update):
        raise TypeError(f"compile on {net.device} needs an xpnet Sequential net (TwoLayerNet, "
                        "MultiLayerNet, SimpleConvNet, ...) that keeps its own steps and an "
                        f"optimizer that keeps Optimizer.update; got {type(net).__name__} and "
                        f"{type(optimizer).__name__}: train them without compile")
    stateful = sorted({type(layer).__name__ for layer in getattr(net, "layers", {}).values()
                       if (getattr(layer, "has_train_mode", False)
                           or getattr(layer, "state_names", ()))
                       and type(layer) not in allowed})
    if stateful:
        raise ValueError(f"compile does not support nets with {', '.join(stateful)} yet "
                         "(their dropout masks and running statistics change outside the "
                         "compiled step); train this net without compile")


def compiled_steps(net, optimizer, mode, batch_size: int):
    """The compiled runner for ``net``: :class:`CompiledSteps` on a backend that compiles
    (JAX), the CUDA-graph steps on CuPy's and torch's CUDA devices (where the speed module
    has them: :data:`xpnet.speedups.graph_steps`), else the ValueError naming both."""
    if speedups.graph_steps is not None:
        steps = speedups.graph_steps(net, optimizer, mode, batch_size)
        if steps is not NotImplemented:
            return steps
    try:
        return CompiledSteps(net, optimizer, mode, batch_size)
    except ValueError as exc:
        if speedups.graph_steps is None or "runs eagerly" not in str(exc):
            raise
        raise ValueError(f"{exc}; or a CUDA device of CuPy or torch ('cuda', 'torch:cuda'), "
                         "where the step is captured as a CUDA graph") from None


class CompiledSteps(Runner):
    """The compiled training steps of one net and optimizer (see the module docstring).

    Parameters
    ----------
    net : a net with ``params`` (a view that takes assignment: Sequential's) and
        ``loss_and_gradient(x, t, check_labels=False)`` (or ``loss`` and ``gradient``)
    optimizer : an :class:`xpnet.optim.Optimizer` (its ``pure_update`` is traced)
    mode : ``"epoch"`` or ``"step"``
    batch_size : int
    """

    name = "compiled"

    def __init__(self, net, optimizer, mode: str, batch_size: int = 100):
        super().__init__(net, optimizer, batch_size)
        mode = compile_mode(mode)
        self.backend = compiling_backend(net.device)
        check_compilable(net, optimizer)
        self.mode = mode
        self._step = self.backend.jit(self._pure_step_at)
        self._loop = self.backend.jit(self._pure_loop)
        self._correct = self.backend.jit(self._pure_correct)

    def check_device(self) -> None:
        """ValueError unless the net is (still) on a backend that compiles."""
        compiling_backend(self.net.device)

    # -- the pure functions (traced once per shape) --------------------------------------------

    @contextlib.contextmanager
    def _bound(self, params: dict):
        """The net with ``params`` (traced) in place of its own arrays, for the trace; then
        its own arrays back, and no traced value left in any layer."""
        net = self.net
        own = dict(net.params)
        try:
            for name, value in params.items():
                net.params[name] = value
            yield net
        finally:
            for name, value in own.items():
                net.params[name] = value
            for layer in (*getattr(net, "layers", {}).values(), getattr(net, "last_layer", None)):
                if isinstance(layer, Layer):
                    layer.reset()  # drop the traced caches

    def _loss_and_gradient(self, params: dict, x, t):
        with self._bound(params) as net:
            if hasattr(net, "loss_and_gradient"):
                loss, grads = net.loss_and_gradient(x, t, check_labels=False)
            else:
                loss, grads = net.loss(x, t), net.gradient(x, t)
            return loss, dict(grads)

    def _pure_correct(self, params, x, t):
        """How many samples of the batch the net classifies right (a 0-d integer array)."""
        with self._bound(params) as net:
            scores = net.predict(x)
        xp = namespace(scores=scores, t=t)
        labels = xp.argmax(t, axis=1) if t.ndim == 2 else t
        return xp.count_nonzero(xp.argmax(scores, axis=1) == labels)

    def _pure_step(self, params, state, steps, hyper, x, t):
        """One step: ``(params, state, steps, loss)`` after it."""
        loss, grads = self._loss_and_gradient(params, x, t)
        optimizer = copy.copy(self.optimizer)  # with the traced hyperparameters
        for name, value in hyper.items():
            setattr(optimizer, name, value)
        steps = steps + 1
        params, state = optimizer.pure_update(params, grads, state, steps)
        return params, state, steps, loss

    def _pure_step_at(self, params, state, steps, hyper, x, t, ids):
        """One step on the samples ``ids`` of ``(x, t)``; its loss weighted by their count."""
        xp = namespace(x=x)
        *out, loss = self._pure_step(params, state, steps, hyper, xp.take(x, ids, axis=0),
                                     xp.take(t, ids, axis=0))
        return *out, loss * ids.shape[0]

    def _pure_loop(self, params, state, steps, hyper, x, t, ids):
        """One step per row of ``ids`` (k, batch), as one loop: the (weighted) losses are (k,)."""
        def body(carry, row):
            *carry, loss = self._pure_step_at(*carry, hyper, x, t, row)
            return tuple(carry), loss

        (params, state, steps), losses = self.backend.scan(body, (params, state, steps), ids)
        return params, state, steps, losses

    # -- running them --------------------------------------------------------------------------

    def advance(self, run, order, start: int, stop: int) -> tuple:
        return self.run(run.x, run.t, order, start, stop, self.batch_size)

    def run(self, x, t, order, start: int, stop: int, batch_size: int) -> tuple:
        """Take steps ``start, start + 1, ...`` (before ``stop``) of an epoch whose samples come
        in ``order``: ``(steps taken, their losses weighted by batch size)`` (an array of
        one or more).  The net's parameters and the optimizer's state and step count are
        updated afterwards, as an eager step updates them."""
        n = x.shape[0]
        full = n // batch_size  # batches of the full size; a smaller last one runs alone
        if self.mode == "epoch" and start < full:
            count = min(stop, full) - start
            xp = namespace(order=order)
            ids = xp.reshape(order[start * batch_size:(start + count) * batch_size],
                             (count, batch_size))
            function = self._loop
        else:
            count = 1
            ids = order[start * batch_size:min((start + 1) * batch_size, n)]
            function = self._step
        params, state, _, losses = function(*self._inputs(), x, t, ids)
        self._store(params, state, count)
        return count, losses

    def accuracy(self, x, t, *, batch_size: int) -> float:
        """``net.accuracy(x, t)`` with each batch's forward pass compiled (for the Trainer's
        evaluation; the targets were checked when the data were prepared)."""
        n, params, correct = x.shape[0], dict(self.net.params), 0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            correct = correct + self._correct(params, x[start:stop, ...], t[start:stop, ...])
        return int(correct) / n  # one read

    def _inputs(self) -> tuple:
        params = dict(self.net.params)
        opt = self.optimizer
        return params, opt.initial_state(params), opt.steps, opt.hyperparameters()

    def _store(self, params: dict, state: dict, count: int) -> None:
        for name, value in params.items():
            self.net.params[name] = value
        self.optimizer.record_steps(count, state)
