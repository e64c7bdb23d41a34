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

Dropout and batch normalization: the layers' state arrays (the running statistics) are
carried through the program like the parameters; each Dropout layer's masks for a loop's
steps are drawn on the host exactly as the eager steps draw them (the same seeds and draw
counts, :func:`xpnet.backend.dropout_mask`), copied to the device once per loop and scanned
with the batches, and the draw counts are advanced afterwards.  So compiled and eager runs
take the same masks, and a resumed run the masks an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy

from . import speedups
from .backend import compiling_backend, dropout_masks, dtype_name, is_array, namespace, to_device
from .layers import BatchNormalization, Dropout, Layer
from .nets import runs_plain_steps
from .optim import Optimizer
from .runners import Runner

__all__ = ["MODES", "CompiledSteps", "check_compilable", "compile_mode", "compiled_steps",
           "dropout_layers", "state_arrays"]

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
                         "(a training mode or state of a layer's own changes outside the "
                         "compiled step; xpnet's Dropout and BatchNormalization are taken): "
                         "train this net without compile")


def dropout_layers(net) -> dict:
    """The Dropout layers of ``net`` that draw masks, ``{key: layer}``: what a compiled or
    captured step hands its masks to."""
    return {key: layer for key, layer in getattr(net, "layers", {}).items()
            if isinstance(layer, Dropout) and layer.ratio > 0}


def state_arrays(net) -> dict:
    """``{key: (layer, attr)}`` of the layers' state that is an array (batch normalization's
    running statistics; not Dropout's draw counts): what a compiled or captured step carries."""
    return {key: (layer, attr) for key, (layer, attr) in getattr(net, "_state", {}).items()
            if is_array(getattr(layer, attr))}


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
        check_compilable(net, optimizer, allowed=(Dropout, BatchNormalization))
        self.mode = mode
        self._step = self.backend.jit(self._pure_step_at)
        self._loop = self.backend.jit(self._pure_loop)
        self._correct = self.backend.jit(self._pure_correct)
        self._mask_shapes = None  # {dropout key: (shape of a full batch's mask, dtype)}

    def check_device(self) -> None:
        """ValueError unless the net is (still) on a backend that compiles."""
        compiling_backend(self.net.device)

    # -- what the steps carry besides the parameters -------------------------------------------

    def _layer_state(self) -> dict:
        """The layers' state arrays (batch norm's running statistics), ``{key: array}``."""
        return {key: getattr(layer, attr) for key, (layer, attr) in state_arrays(self.net).items()}

    # -- the pure functions (traced once per shape) --------------------------------------------

    @contextlib.contextmanager
    def _bound(self, params: dict, layer_state=None, masks=None):
        """The net with ``params`` and ``layer_state`` (traced) in place of its own arrays and
        its Dropout layers taking ``masks`` (``{key: array}``), for the trace; then its own
        arrays and draw counts back, and no traced value left in any layer."""
        net = self.net
        own, own_state = dict(net.params), self._layer_state()
        drops = dropout_layers(self.net)
        draws = {key: layer.draws for key, layer in drops.items()}
        by_layer = {id(layer): key for key, layer in drops.items()}
        state_of = state_arrays(net)
        try:
            for name, value in params.items():
                net.params[name] = value
            for key, value in (layer_state or {}).items():
                setattr(*state_of[key], value)
            with speedups.using(dropout_mask=lambda layer, x: masks[by_layer[id(layer)]]
                                if masks is not None and id(layer) in by_layer
                                else NotImplemented):
                yield net
        finally:
            for name, value in own.items():
                net.params[name] = value
            for key, value in own_state.items():
                setattr(*state_of[key], value)
            for key, layer in drops.items():
                layer.draws = draws[key]
            for layer in (*getattr(net, "layers", {}).values(), getattr(net, "last_layer", None)):
                if isinstance(layer, Layer):
                    layer.reset()  # drop the traced caches

    def _loss_and_gradient(self, params: dict, layer_state: dict, masks: dict, x, t):
        with self._bound(params, layer_state, masks) as net:
            if hasattr(net, "loss_and_gradient"):
                loss, grads = net.loss_and_gradient(x, t, check_labels=False)
            else:
                loss, grads = net.loss(x, t), net.gradient(x, t)
            return loss, dict(grads), self._layer_state()

    def _pure_correct(self, params, layer_state, x, t):
        """How many samples of the batch the net classifies right (a 0-d integer array)."""
        with self._bound(params, layer_state) as net:
            scores = net.predict(x)
        xp = namespace(scores=scores, t=t)
        labels = xp.argmax(t, axis=1) if t.ndim == 2 else t
        return xp.count_nonzero(xp.argmax(scores, axis=1) == labels)

    def _pure_step(self, params, state, layer_state, steps, hyper, masks, x, t):
        """One step: ``(params, state, layer_state, steps, loss)`` after it."""
        loss, grads, layer_state = self._loss_and_gradient(params, layer_state, masks, x, t)
        optimizer = copy.copy(self.optimizer)  # with the traced hyperparameters
        for name, value in hyper.items():
            setattr(optimizer, name, value)
        steps = steps + 1
        params, state = optimizer.pure_update(params, grads, state, steps)
        return params, state, layer_state, steps, loss

    def _pure_step_at(self, params, state, layer_state, steps, hyper, x, t, ids, masks):
        """One step on the samples ``ids`` of ``(x, t)``; its loss weighted by their count."""
        xp = namespace(x=x)
        *out, loss = self._pure_step(params, state, layer_state, steps, hyper, masks,
                                     xp.take(x, ids, axis=0), xp.take(t, ids, axis=0))
        return *out, loss * ids.shape[0]

    def _pure_loop(self, params, state, layer_state, steps, hyper, x, t, ids, masks):
        """One step per row of ``ids`` (k, batch) and of each mask (k, ...), as one loop: the
        (weighted) losses are (k,)."""
        def body(carry, rows):
            *carry, loss = self._pure_step_at(*carry, hyper, x, t, *rows)
            return tuple(carry), loss

        carry = (params, state, layer_state, steps)
        (params, state, layer_state, steps), losses = self.backend.scan(body, carry,
                                                                        (ids, masks))
        return params, state, layer_state, steps, losses

    # -- running them --------------------------------------------------------------------------

    def advance(self, run, order, start: int, stop: int) -> tuple:
        return self.run(run.x, run.t, order, start, stop, self.batch_size)

    def run(self, x, t, order, start: int, stop: int, batch_size: int) -> tuple:
        """Take steps ``start, start + 1, ...`` (before ``stop``) of an epoch whose samples come
        in ``order``: ``(steps taken, their losses weighted by batch size)`` (an array of
        one or more).  The net's parameters, layer state and dropout draws and the
        optimizer's state and step count are updated afterwards, as an eager step updates
        them."""
        n = x.shape[0]
        full = n // batch_size  # batches of the full size; a smaller last one runs alone
        if self.mode == "epoch" and start < full:
            count = min(stop, full) - start
            xp = namespace(order=order)
            ids = xp.reshape(order[start * batch_size:(start + count) * batch_size],
                             (count, batch_size))
            masks = self._masks(x, t, ids.shape[1], count)
            function = self._loop
        else:
            count = 1
            ids = order[start * batch_size:min((start + 1) * batch_size, n)]
            masks = {k: m[0] for k, m in self._masks(x, t, ids.shape[0], 1).items()}
            function = self._step
        params, state, layer_state, _, losses = function(*self._inputs(), x, t, ids, masks)
        self._store(params, state, layer_state, count)
        return count, losses

    def _masks(self, x, t, rows: int, count: int) -> dict:
        """``{dropout key: (count, rows, ...) masks}``: the next ``count`` draws of each
        Dropout layer for batches of ``rows`` samples, drawn on the host as the eager steps
        draw them (:func:`xpnet.backend.dropout_mask`) and copied to the device at once."""
        drops = dropout_layers(self.net)
        if not drops:
            return {}
        if self._mask_shapes is None:
            self._mask_shapes = self._probe_masks(x, t)
        masks = {}
        for key, layer in drops.items():
            shape, dtype = self._mask_shapes[key]
            host = dropout_masks((rows, *shape[1:]), dtype, layer.ratio, layer.seed,
                                 layer.draws, count)
            masks[key] = to_device(host, self.net.device)
        return masks

    def _probe_masks(self, x, t) -> dict:
        """The shape and dtype of each Dropout layer's input: one forward pass traced
        abstractly (nothing computed, nothing changed)."""
        found = {}
        drops = {id(layer): key for key, layer in dropout_layers(self.net).items()}

        def record(layer, value):
            found[drops[id(layer)]] = (tuple(value.shape), dtype_name(value.dtype))
            return namespace(value).ones_like(value)

        def forward(params, layer_state, xb, tb):
            with self._bound(params, layer_state), speedups.using(dropout_mask=record):
                return self.net.loss(xb, tb, train=True, check_labels=False)

        rows = min(self.batch_size, x.shape[0])
        self.backend.shapes(forward, dict(self.net.params), self._layer_state(),
                            x[:rows, ...], t[:rows, ...])
        return found

    def accuracy(self, x, t, *, batch_size: int) -> float:
        """``net.accuracy(x, t)`` with each batch's forward pass compiled (for the Trainer's
        evaluation; the targets were checked when the data were prepared)."""
        n, params, correct = x.shape[0], dict(self.net.params), 0
        layer_state = self._layer_state()
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            correct = correct + self._correct(params, layer_state, x[start:stop, ...],
                                              t[start:stop, ...])
        return int(correct) / n  # one read

    def _inputs(self) -> tuple:
        params = dict(self.net.params)
        opt = self.optimizer
        return (params, opt.initial_state(params), self._layer_state(), opt.steps,
                opt.hyperparameters())

    def _store(self, params: dict, state: dict, layer_state: dict, count: int) -> None:
        for name, value in params.items():
            self.net.params[name] = value
        self.optimizer.record_steps(count, state)
        state_of = state_arrays(self.net)
        for key, value in layer_state.items():
            setattr(*state_of[key], value)
        for layer in dropout_layers(self.net).values():
            layer.draws += count
