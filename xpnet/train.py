"""Training: a Trainer that keeps the data on the net's device, and the History it returns.

Rules of the loop (they keep a GPU busy):

* The dataset goes to the net's device once, in the net's dtype.
* Each epoch draws a seeded permutation on the host, sends it over once, and
  gathers the batches on the device with ``xp.take``: every sample once per
  epoch (the last batch may be smaller).
* Per-step losses stay on the device; they are read back once per epoch (and,
  with a progress bar on a terminal, once per ``log_every`` steps), which is
  also when a NaN or infinite loss is caught and named by epoch and step.
* Evaluation is batched on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as files
from . import runners, speedups
from ._checks import (
    all_finite,
    check_label_range,
    check_protocol,
    check_seed,
    check_target_rows,
    int_option,
    is_int,
    is_real,
    positive_int,
    real_option,
    thread_count,
)
from ._io import atomic_write, check_writable
from .backend import (
    device_context,
    device_of,
    dtype_name,
    is_array,
    is_dtype,
    namespace,
    to_device,
    to_numpy,
    untracked,
)
from .compiled import compile_mode, compiled_steps
from .distributed import Solo, Team
from .schedules import Schedule
from .layers import BatchNormalization, Layer

__all__ = ["DivergenceError", "History", "Trainer"]

class DivergenceError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class History:
    """Per-epoch training record.

    Attributes
    ----------
    records : list of dict
        One dict per epoch: ``epoch``, ``train_loss``, ``train_accuracy``,
        ``test_accuracy`` and ``test_loss`` (None without test data), ``val_loss`` and
        ``val_accuracy`` (None without validation data), ``seconds`` (the training part of
        the epoch), ``samples_per_second``, ``lr`` (the learning rate of the epoch's last
        step).  The evaluated values are None in the epochs ``eval_every`` skips.  Each is
        also a list over the epochs: ``history.val_loss``.
    config : dict
        What was trained, how and where.
    """

    records: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds",
               "samples_per_second")
    OPTIONAL = ("lr", "val_loss", "val_accuracy", "test_loss")  # not in older records

    def __len__(self) -> int:
        return len(self.records)

    def __getattr__(self, name):
        # history.train_loss -> [epoch 1's, epoch 2's, ...]
        if name in History.COLUMNS or name in History.OPTIONAL:
            return [r.get(name) for r in self.records]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return {"config": self.config, "epochs": self.records}

    def save(self, path) -> None:
        """Write the history as JSON, atomically."""
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path) -> History:
        with open(path) as f:
            data = json.load(f)
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data, where: str = "history") -> History:
        """The inverse of :meth:`to_dict`; ValueError naming ``where`` if ``data`` is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("epochs"), list):
            raise ValueError(f"{where}: not an xpnet history (no 'epochs' list)")
        for r in data["epochs"]:
            if (not isinstance(r, dict) or not set(cls.COLUMNS) <= set(r)
                    or not set(r) <= {*cls.COLUMNS, *cls.OPTIONAL}):
                raise ValueError(f"{where}: an epoch record must have the keys {cls.COLUMNS} "
                                 f"(and may have {cls.OPTIONAL})")
        config = data.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"{where}: the history's config is not a dict")
        return cls(records=data["epochs"], config=config)


# The forward pass's arrays of an evaluation batch stay under this (the default
# eval_batch_size): DeepConvNet keeps about 1.3 MB per sample, so it evaluates in batches of
# its training batch size (faster than 1000 there: the arrays fit the caches), SimpleConvNet
# about 160 KB (batches of about 200), TwoLayerNet 4 KB (1000).
EVAL_MEMORY = 32 << 20


def _digest(x) -> str | None:
    """An array's shape, dtype and a digest of up to 16 of its rows (evenly spaced): two
    processes holding other data of one shape tell it apart, without reading it all."""
    if x is None:
        return None
    n = x.shape[0]
    rows = np.unique(np.linspace(0, n - 1, num=min(n, 16)).astype(np.int64))
    sample = to_numpy(namespace(x=x).take(x, to_device(rows, device_of(x).name, dtype="int64"),
                                          axis=0)) if n else np.zeros(0)
    digest = hashlib.blake2b(np.ascontiguousarray(sample).tobytes(), digest_size=8).hexdigest()
    return f"{tuple(x.shape)} {dtype_name(x.dtype)} #{digest}"


def _split(x, t, fraction: float, seed: int) -> tuple:
    """``(x_train, t_train, (x_val, t_val))``: ``fraction`` of the samples (at least one, and
    one left to train on) held out, drawn with ``seed`` on the host (the same samples on every
    backend and process count), each part in the original order."""
    n = int(x.shape[0])
    held = min(n - 1, max(1, round(n * fraction)))
    if n < 2:
        raise ValueError(f"validation_split needs at least 2 training samples, got {n}")
    order = np.random.default_rng([seed, 2]).permutation(n)
    xp, device = namespace(x=x), device_of(x).name
    val, train = (to_device(np.sort(order[:held]), device, dtype="int64"),
                  to_device(np.sort(order[held:]), device, dtype="int64"))
    return (xp.take(x, train, axis=0), xp.take(t, train, axis=0),
            (xp.take(x, val, axis=0), xp.take(t, val, axis=0)))


def _callback_entry(callback) -> dict:
    """A callback's state as a checkpoint keeps it (its arrays apart from its JSON values)."""
    state = dict(getattr(callback, "state_dict", dict)() or {})
    arrays = {k: np.asarray(v) for k, v in (state.pop("arrays", None) or {}).items()}
    return {"type": type(callback).__name__, "state": json.loads(json.dumps(state)),
            "arrays": arrays}


def _check_callbacks(callbacks) -> list:
    """``Trainer(callbacks=)``: a list (copied) of objects with ``on_epoch_end``."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"callbacks must be a list of xpnet.callbacks.Callback, got "
                        f"{type(callbacks).__name__}")
    callbacks = list(callbacks)
    for c in callbacks:
        if not callable(getattr(c, "on_epoch_end", None)):
            raise TypeError(f"callbacks must have on_epoch_end(trainer, epoch, logs) "
                            f"(xpnet.callbacks.Callback), got {type(c).__name__}")
    return callbacks


def _hook(callback, name: str, *args) -> None:
    method = getattr(callback, name, None)
    if callable(method):
        method(*args)


def _check_info(info) -> dict:
    """``Trainer(info=)``: a dict of str keys and JSON values, copied; TypeError otherwise."""
    if info is None:
        return {}
    if not isinstance(info, dict) or not all(isinstance(k, str) for k in info):
        raise TypeError(f"info must be a dict with str keys, got {type(info).__name__} {info!r}")
    try:
        return json.loads(json.dumps(info, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"info must hold JSON values (str, numbers, lists, dicts): {exc}") from None


def _check_decay_term(net) -> None:
    """A weight decay whose L2 term ``0.5 * weight_decay * sum(W ** 2)`` is already infinite
    on the net's weights (weight_decay=1e308) is an error naming it, before any step: it
    would stop the run at its first step as a divergence, blamed on the learning rate."""
    decay = getattr(net, "weight_decay", 0.0)
    keys = getattr(net, "_decayed", ())
    if not decay or not keys:
        return
    squares = sum(float(np.sum(np.square(to_numpy(net.params[key]).astype(np.float64))))
                  for key in keys)
    term = 0.5 * decay * squares
    if not math.isfinite(term) or not math.isfinite(float(np.asarray(term, dtype=net.dtype))):
        raise ValueError(f"weight_decay={decay!r} makes the loss's L2 term 0.5 * weight_decay "
                         f"* sum(W ** 2) infinite in {net.dtype} on the net's weights "
                         f"(sum(W ** 2) = {squares:.4g}): lower it")


def _statistics_per_sample(net) -> int | None:
    """After a forward of one sample: the fewest values per feature that one sample gives a
    BatchNormalization layer of ``net`` (1 for (N, D) rows, H * W for images), or None
    without one."""
    counts = [math.prod(layer.xn.shape[2:]) for layer in getattr(net, "layers", {}).values()
              if isinstance(layer, BatchNormalization) and layer.xn is not None]
    return min(counts) if counts else None


def _held_bytes(net) -> int:
    """Bytes of the arrays a forward pass left in ``net``'s layers (besides parameters)."""
    total = 0
    for layer in getattr(net, "layers", {}).values():
        params = set(getattr(layer, "param_names", ()))
        for name, value in vars(layer).items():
            if name not in params and is_array(value):
                total += int(getattr(value, "nbytes", 0) or 0)
    return total


def _lr_of(optimizer) -> float | None:
    """The optimizer's learning rate as a float (the last step's, under a schedule), or None
    for an optimizer without a number ``lr``."""
    lr = getattr(optimizer, "lr", None)
    return float(lr) if is_real(lr) else None


def _int(value) -> int:
    if not is_int(value):
        raise TypeError(f"expected an int, got {value!r}")
    return int(value)


# Inputs far beyond this are unscaled (raw pixels are 0..255): float32 products overflow.
_UNSCALED = 1e4


def _likely_cause(run: _Run) -> str:
    """Why a loss became NaN or infinite: the data, if they explain it, else the learning rate
    (and the weight decay, where the net has one).  (Reads the dataset once more; only after
    a divergence.)"""
    xp, x = run.xp, run.x
    if not all_finite(xp, x):
        return "the training data now hold NaN or infinite values (they changed during training)"
    largest = max(float(xp.max(x)), -float(xp.min(x)))
    if largest > _UNSCALED:
        return (f"the training data reach {largest:.3g}: scale them first (e.g. x / 255, or "
                "load_mnist(normalize=True))")
    if run.weight_decay:
        return (f"the learning rate or the weight decay ({run.weight_decay:g}) is probably too "
                "high")
    return "the learning rate is probably too high"


@dataclass
class _Run:
    """What one call of :meth:`Trainer.fit` works with: the data on the net's device, the
    permutation generator, the history and where the run is."""

    x: object
    t: object
    test: tuple | None
    xp: object
    rng: np.random.Generator
    history: History
    position: _Position
    interrupt: _DeferredInterrupt | None = None
    weight_decay: float = 0.0  # the net's, for the cause of a divergence
    val: tuple | None = None  # the validation data (x, t), on the net's device
    runner: runners.Runner | None = None  # how its steps run (chosen at the run boundary)
    train_eval: tuple | None = None  # (x, t) of the training accuracy, None for none
    eval_batch_size: int = 1000
    layers: object = None  # the net's Layers (their version says whether they were replaced)

    @property
    def n(self) -> int:
        return self.x.shape[0]


@dataclass
class _Position:
    """Where a run is: the next step to take, and what the current epoch has gathered."""

    epoch: int = 1  # 1-based, the epoch in progress
    step: int = 0  # steps of that epoch already taken
    loss_sum: float = 0.0  # their summed (batch-size weighted) losses
    rng_state: dict | None = None  # the generator's state before this epoch's permutation
    global_step: int = 0


class _DeferredInterrupt:
    """While active, a first Ctrl-C only sets a flag, so the loop can stop between steps
    (with the parameters and the optimizer state consistent) and save a checkpoint; a
    second Ctrl-C interrupts at once.  In a distributed run (``team``) the processes stop
    together: the flag goes into each step's exchange (``agreed``: some process had one), and
    a second Ctrl-C stops every process (``team.interrupted_twice``)."""

    def __init__(self, active: bool, team=None):
        self.team = team if team is not None and team.distributed else None
        self.active = ((active or self.team is not None)
                       and threading.current_thread() is threading.main_thread())
        self.requested = False  # this process had a Ctrl-C
        self.agreed = False  # some process had one, as the last exchange said (distributed)
        self._previous = None

    @property
    def stop(self) -> bool:
        """Whether the loop stops at this step: every process at the same one."""
        return self.agreed if self.team is not None else self.requested

    def _handler(self, signum, frame):
        if self.requested:
            if self.team is not None:
                self.team.interrupted_twice()
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self._previous)
        return False


class Trainer:
    """Mini-batch training of a network with an optimizer.

    Parameters
    ----------
    net : a Sequential (TwoLayerNet, MultiLayerNet, ...), or an object with ``params``,
        ``gradient(x, t)``, ``loss(x, t)``, ``accuracy(x, t)`` and a ``device`` / ``dtype``.
        How the steps run is chosen once per fit (:mod:`xpnet.runners`): a Sequential that
        keeps Sequential's step methods, with an optimizer that keeps ``update``, takes its
        unchecked steps (the data were checked at the run's start) or a faster runner (the
        fused loop, compiled, distributed); any other net its own ``train_step`` (else
        ``loss``, ``gradient`` and ``optimizer.update``), with all their checks.
    optimizer : an :mod:`xpnet.optim` optimizer
    batch_size : int, default 100
    epochs : int, default 10
    seed : int, default 0
        Seeds the per-epoch permutations: the same seed on the same backend
        gives the same history.
    progress : bool, default True
        A tqdm progress bar per epoch with the running loss (shown only on a terminal).
    eval_batch_size : int, optional
        Batch size of the accuracy evaluation.  By default the larger of ``batch_size`` and
        what keeps the forward pass's arrays under :data:`EVAL_MEMORY` bytes (measured on
        the first sample; at most 1000): large batches for small nets, the training batch
        for conv nets, whose evaluation is faster and smaller in batches that fit the caches.
        The run's choice is in ``History.config["eval_batch_size"]``.
    eval_every : int, default 1
        Evaluate the accuracies every this many epochs (and always after the last); the
        other epochs record None.
    eval_train : int, optional
        The training accuracy on a fixed sample of this many training samples (drawn once
        with ``seed``, the same every epoch), 0 for none (None in the records); by default
        on the whole training set.  The evaluation shows on the progress bar as it goes.
    log_every : int, default 50
        Steps between updates of the progress bar's running loss (each one a device read).
    checkpoint : path, optional
        Where to keep a training checkpoint: the weights, the optimizer state, the
        epoch and step, the random generator's state and the history so far.  It
        is rewritten atomically (temporary file, fsync, rename) at the end of every
        epoch, every ``checkpoint_every`` steps, and when Ctrl-C stops the run; a
        diverged state is never written.  ``fit(..., resume=path)`` continues from
        it to the same final weights as an uninterrupted run.
    checkpoint_every : int, optional
        Optimizer steps between checkpoints (besides the end of each epoch).
    compile : bool or {"epoch", "step"}, default False
        Run the training steps as compiled programs (:mod:`xpnet.compiled`) on a backend
        that compiles: JAX, ``device="jax:cpu"`` or ``"jax:cuda:N"``.  ``True`` or
        ``"epoch"``: each epoch's full batches as one loop (``lax.scan``), stopped where a
        checkpoint or a progress update is due; ``"step"``: one compiled program per step.
        On ``"cuda"`` (CuPy) and ``"torch:cuda"`` either value captures one training step as
        a CUDA graph and replays it per batch (``xpnet._graphs``).  Checkpoints, resume,
        Ctrl-C (seen between the compiled loops) and divergence detection work as without
        it; results equal the eager ones up to rounding.
    blas_threads : int, optional
        Threads for the CPU's matrix products (NumPy's BLAS) during :meth:`fit`.  By default
        xpnet decides (``xpnet._fast.thread_policy``): one thread where the step's largest
        product is small, so a busy machine does not stall training, every usable core for
        large ones; the environment variable ``XPNET_BLAS_THREADS`` overrides it for every
        run.  The choice and its reason are recorded in ``History.config`` (the thread count
        changes results in the last digits).

    lr_schedule : :class:`xpnet.schedules.Schedule`, optional
        Changes ``optimizer.lr`` as the run goes (:mod:`xpnet.schedules`: ``StepDecay``,
        ``CosineDecay``, each with an optional warm-up): the rate of step ``s`` is the
        optimizer's ``lr`` when ``fit`` starts times the schedule's factor at ``s``.  It is
        recorded in ``History.config["lr_schedule"]`` and each epoch's ``lr``, saved in
        checkpoints (a resumed run continues it bit-identically), and ``optimizer.lr`` is
        the base rate again when ``fit`` returns.

    distributed : bool, default False
        Data-parallel training over MPI (:mod:`xpnet.distributed`; start the processes with
        ``mpiexec -n N``): every process holds the net and takes an even share of each global
        batch of ``batch_size``; the gradients are summed across the processes (weighted by
        their shares) and every process takes the same update, so N processes train what one
        does, up to rounding.  Rank 0's parameters are broadcast at the start; losses and
        accuracies are global; only rank 0 shows a progress bar and writes checkpoints; an
        error on one process is raised, the same, on all.  The fused steps (the SGD step fused
        into backprop, the fused loop) do not apply: each step is ``loss_and_gradient``, an
        allreduce, ``optimizer.update``.  A checkpoint resumes with any number of processes
        (the global batches do not depend on it).  Batch normalization normalizes each
        process's share, and dropout draws its masks per process.

    callbacks : list of :class:`xpnet.callbacks.Callback`, optional
        Run as the fit goes: ``on_train_begin(trainer)``, ``on_epoch_end(trainer, epoch,
        logs)`` with the epoch's record, ``on_train_end(trainer)``; a callback ends the fit
        after an epoch by setting ``trainer.stop_training = True``
        (:class:`~xpnet.callbacks.EarlyStopping`, :class:`~xpnet.callbacks.ModelCheckpoint`).
        Their state is saved in checkpoints and restored by a resume.
    info : dict, optional
        Entries of your own for ``History.config`` (strings as keys, JSON values), saved with
        the history and in checkpoints: ``xpnet train`` records its dataset there, and a
        ``--resume`` reads it back.  They cannot replace the entries the Trainer records.

    On NumPy with numba installed (``pip install 'xpnet[fast]'``), SGD and Momentum training
    of the book's multilayer perceptrons (Affine, Relu or Sigmoid, ..., SoftmaxWithLoss,
    integer labels; no batch norm or dropout) runs as one compiled loop over the steps
    (``xpnet._fused``), with the same results up to rounding; ``History.config["step"]``
    says which way a run went.
    """

    def __init__(self, net, optimizer, *, batch_size: int = 100, epochs: int = 10, seed: int = 0,
                 progress: bool = True, eval_batch_size: int | None = None,
                 log_every: int = 50,
                 checkpoint=None, checkpoint_every: int | None = None, compile=False,
                 blas_threads: int | None = None, distributed: bool = False,
                 lr_schedule: Schedule | None = None, eval_every: int = 1,
                 eval_train: int | None = None, info: dict | None = None, callbacks=None):
        check_protocol("net", net, ("params", "loss", "accuracy", "device", "dtype"),
                       "an xpnet net (Sequential, TwoLayerNet, ...)")
        check_protocol("optimizer", optimizer, ("update", "state_dict"),
                       "an xpnet optimizer (SGD, Momentum, AdaGrad, Adam)")
        self.net = net
        self.optimizer = optimizer
        self.batch_size = positive_int("batch_size", batch_size)
        self.epochs = positive_int("epochs", epochs)
        self.seed = check_seed(seed)
        self.progress = bool(progress)
        self.eval_batch_size = (None if eval_batch_size is None
                                else positive_int("eval_batch_size", eval_batch_size))
        self.eval_every = positive_int("eval_every", eval_every)
        if eval_train is not None:
            eval_train = int_option("eval_train", eval_train, 0)
        self.eval_train = eval_train
        self.info = _check_info(info)
        self.callbacks = _check_callbacks(callbacks)
        self.stop_training = False  # a callback's request to end the fit after this epoch
        self._validation = None  # the run's validation (its split or size): in checkpoints
        self.log_every = positive_int("log_every", log_every)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        if checkpoint_every is not None:
            checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
            if self.checkpoint is None:
                raise ValueError("checkpoint_every needs a checkpoint path")
        self.checkpoint_every = checkpoint_every
        self.compile = compile_mode(compile)
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True or False, got {distributed!r}")
        if distributed and self.compile is not None:
            raise ValueError("distributed=True and compile= do not go together: a distributed "
                             "step exchanges gradients between the processes, which a compiled "
                             "loop cannot do")
        self.blas_threads = None if blas_threads is None else thread_count("blas_threads",
                                                                            blas_threads)
        if speedups.threads_from_environment is not None:
            speedups.threads_from_environment()  # a bad XPNET_BLAS_THREADS: before any data
        if lr_schedule is not None:
            if not isinstance(lr_schedule, Schedule):
                raise TypeError(f"lr_schedule must be an xpnet.schedules.Schedule (StepDecay, "
                                f"CosineDecay) or None, got {type(lr_schedule).__name__}")
            if _lr_of(optimizer) is None:
                raise TypeError(f"lr_schedule needs an optimizer with a number lr, "
                                f"{type(optimizer).__name__} has none")
        self.lr_schedule = lr_schedule
        self._base_lr = None  # the optimizer's lr when a scheduled fit started (while it runs)
        self._sample_bytes = 0  # what a forward pass keeps per sample (measured at the boundary)
        self._statistics_per_sample = None  # (measured there too: _statistics_per_sample)
        # The compiled steps are made (and so checked) now, and kept: one trace per shape.
        self.compiled_steps = None if self.compile is None else compiled_steps(
            net, optimizer, self.compile, self.batch_size)
        # The processes that run the fit together: this one alone, or an MPI world.
        self.team = Team.world() if distributed else Solo()

    # -- data --------------------------------------------------------------------------------

    def _prepare(self, x, t, x_name: str, t_name: str):
        """Validate a dataset once, on the host side where it is, and move it to the net."""
        x, t = untracked(x), untracked(t)  # a torch tensor that requires grad: its data only
        for name, a in ((x_name, x), (t_name, t)):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        xp = namespace(**{x_name: x, t_name: t})
        if not is_dtype(xp, x.dtype, "real floating"):
            raise TypeError(
                f"{x_name} has dtype {dtype_name(x.dtype)}; the net needs floats: scale it "
                "first, e.g. x / 255 (load_mnist(normalize=True) does this)"
            )
        n = x.shape[0]
        if x.ndim < 2 or n == 0:
            raise ValueError(f"{x_name} must be a non-empty batch (N, D), got shape {tuple(x.shape)}")
        if not all_finite(xp, x):
            raise ValueError(f"{x_name} holds NaN or infinite values")
        if t.ndim == 0:
            raise ValueError(f"{t_name} must hold one target per sample, got a 0-d array")
        if t.shape[0] != n:
            raise ValueError(f"{x_name} has {n} samples but {t_name} has {t.shape[0]}")
        classes = self._classes(x, x_name)
        t_dev = self._prepare_targets(xp, t, t_name, classes)
        return to_device(x, self.net.device, dtype=self.net.dtype), t_dev

    def _classes(self, x, x_name: str) -> int | None:
        """How many classes the net scores, found by running its own layers on the first
        sample of ``x`` (inference mode: no running statistic or dropout draw changes); a
        sample the layers refuse is an error naming ``x_name``.  Nets without ``predict``
        are asked for ``sizes``; None where neither tells."""
        net, shape = self.net, tuple(x.shape)
        self._statistics_per_sample = None
        predict = getattr(net, "predict", None)
        if not callable(predict):
            sizes = getattr(net, "sizes", None)
            if sizes and math.prod(shape[1:]) != sizes[0]:
                raise ValueError(f"{x_name} of shape {shape} has {math.prod(shape[1:])} "
                                 f"features per sample, but the net's input size is {sizes[0]}")
            return sizes[-1] if sizes else None
        sample = to_device(x[:1, ...], net.device, dtype=net.dtype)
        try:
            scores = predict(sample)
            self._sample_bytes = _held_bytes(net)  # what its forward keeps, per sample
            self._statistics_per_sample = _statistics_per_sample(net)
        except (ValueError, TypeError) as exc:
            kind = type(exc) if isinstance(exc, TypeError) and not isinstance(
                exc, ValueError) else ValueError
            raise kind(f"{x_name} of shape {shape} does not fit the net's layers (tried on "
                       f"its first sample): {exc}") from None
        finally:
            for layer in getattr(net, "layers", {}).values():
                if isinstance(layer, Layer):
                    layer.reset()  # the probe's caches
        if getattr(scores, "ndim", None) != 2:
            raise ValueError(f"the net turns {x_name} of shape {shape} into an output of shape "
                             f"{tuple(getattr(scores, 'shape', ()))}, not scores (N, C)")
        return int(scores.shape[1])

    def _prepare_targets(self, xp, t, t_name: str, classes: int | None):
        """Check labels (their range, once) or target rows, and move them to the net."""
        if is_dtype(xp, t.dtype, "integral"):
            if t.ndim != 1:
                raise ValueError(f"{t_name} labels must have shape (N,), got {tuple(t.shape)}")
            if classes is not None:
                check_label_range(xp, t, classes, t_name)
            return to_device(t, self.net.device, dtype="int64")
        if is_dtype(xp, t.dtype, "real floating"):
            if t.ndim != 2 or (classes is not None and t.shape[1] != classes):
                raise ValueError(
                    f"{t_name} rows must have shape (N, {classes or 'C'}), got {tuple(t.shape)}"
                )
            if not all_finite(xp, t):
                raise ValueError(f"{t_name} holds NaN or infinite values")
            check_target_rows(xp, t, t_name)
            return to_device(t, self.net.device, dtype=self.net.dtype)
        raise TypeError(f"{t_name} must hold integer labels or float rows, got {dtype_name(t.dtype)}")

    # -- checkpoints -------------------------------------------------------------------------

    def _settings(self, history: History) -> dict:
        """What a checkpoint must share with the run that resumes it (besides net and optimizer)."""
        return {"batch_size": self.batch_size, "seed": self.seed,
                "train_samples": history.config.get("train_samples"),
                "lr_schedule": None if self.lr_schedule is None else self.lr_schedule.config(),
                "validation": self._validation}

    def _net_config(self):
        return self.net.config() if hasattr(self.net, "config") else repr(self.net)

    def save_checkpoint(self, path, position: _Position, history: History) -> None:
        """Write the training state atomically; refuses (DivergenceError) a non-finite one."""
        params = {name: to_numpy(value) for name, value in self.net.params.items()}
        for name, value in params.items():  # the same on every process of a distributed run
            if not np.all(np.isfinite(value)):
                raise DivergenceError(
                    f"{name} became NaN or infinite by epoch {position.epoch}, step "
                    f"{position.step}: the learning rate is probably too high; the checkpoint "
                    "on disk is left as it was"
                )
        with self.team.together():  # written by rank 0 alone; its failure stops every process
            if self.team.root:
                self._write_checkpoint(path, position, history, params)

    def _write_checkpoint(self, path, position: _Position, history: History, params) -> None:
        optimizer = self.optimizer.state_dict()
        if self._base_lr is not None:  # a schedule's run: what it resumes from is the base rate
            optimizer["hyper"] = {**optimizer["hyper"], "lr": self._base_lr}
        files.save_training(path, files.TrainingState(
            net=self._net_config(), trainer=self._settings(history),
            optimizer=optimizer, history=history.to_dict(), params=params,
            net_state=self.net.host_state() if hasattr(self.net, "host_state") else {},
            callbacks=[_callback_entry(c) for c in self.callbacks],
            position={"epoch": position.epoch, "step": position.step,
                      "loss_sum": position.loss_sum, "rng_state": position.rng_state,
                      "global_step": position.global_step}))

    def _restore(self, path, state: files.TrainingState, history: History) -> _Position:
        """Load a checkpoint into the net, the optimizer and ``history``; where to go on from.

        Everything is checked first (that the checkpoint is of this run: the net, the
        settings, the dataset size, the optimizer and its hyperparameters; that its position,
        random state and arrays make sense), so a refused checkpoint changes nothing.
        """
        self._check_same_run(path, state, history)
        position = self._checked_position(path, state.position, history.config["train_samples"])
        records = History.from_dict(state.history, f"{path}: history")
        files.check_param_arrays(path, state.params, {k: tuple(v.shape)
                                                      for k, v in self.net.params.items()},
                                 self.net.dtype)
        try:
            self.optimizer.check_state_dict(state.optimizer, self.net.params)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        layer_state = (self.net.checked_state(state.net_state, where=str(path))
                       if hasattr(self.net, "checked_state") else {})
        self._check_callback_states(path, state.callbacks)
        # Nothing has changed so far; from here on nothing can fail.
        moved = {name: to_device(value, self.net.device, dtype=self.net.dtype, copy=True)
                 for name, value in state.params.items()}
        for name, value in moved.items():
            self.net.params[name] = value
        self.optimizer.load_state_dict(state.optimizer, self.net.device, self.net.params)
        if layer_state:
            self.net.load_state(layer_state)
        for callback, entry in zip(self.callbacks, state.callbacks):
            _hook(callback, "load_state_dict", {**entry["state"], "arrays": entry["arrays"]})
        history.records = records.records
        if "stopped_early_at" in records.config:  # (a run that had stopped stays stopped)
            history.config["stopped_early_at"] = records.config["stopped_early_at"]
        return position

    def _check_callback_states(self, path, entries: list) -> None:
        """The checkpoint's callbacks must be this trainer's, in order (by class)."""
        mine = [type(c).__name__ for c in self.callbacks]
        saved = [e.get("type") for e in entries]
        if saved and saved != mine:
            raise ValueError(f"{path}: the checkpoint was made with the callbacks {saved}, "
                             f"this trainer has {mine}; resume with the same callbacks")

    def _check_same_run(self, path, state: files.TrainingState, history: History) -> None:
        if state.net != self._net_config():
            raise ValueError(f"{path}: the checkpoint is for the net {state.net}, "
                             f"this trainer's net is {self._net_config()}")
        if not isinstance(state.trainer, dict):
            raise ValueError(f"{path}: the checkpoint's trainer settings {state.trainer!r} are "
                             "not a dict")
        mine, saved = self._settings(history), dict(state.trainer)
        saved.setdefault("train_samples", mine["train_samples"])  # not recorded before 0.2
        saved.setdefault("lr_schedule", None)  # nor this
        saved.setdefault("validation", None)  # nor this
        if saved != mine:
            raise ValueError(f"{path}: the checkpoint was made with {state.trainer}, this "
                             f"trainer has {mine}; resume with the same settings and data")
        opt, kind = state.optimizer, type(self.optimizer).__name__
        if opt["type"] == kind and opt["hyper"] != self.optimizer.hyperparameters():
            raise ValueError(f"{path}: the checkpoint was made with {kind}({opt['hyper']}), this "
                             f"run has {self.optimizer!r}; resume with the same hyperparameters")

    def _checked_position(self, path, pos, n: int) -> _Position:
        """The position a checkpoint records, if it is one this run can reach; else ValueError."""
        steps = math.ceil(n / self.batch_size)
        try:
            epoch, step, global_step = (_int(pos[k]) for k in ("epoch", "step", "global_step"))
            loss_sum = float(pos["loss_sum"])
            np.random.default_rng().bit_generator.state = pos["rng_state"]  # a valid state?
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: the checkpoint's position {pos!r} is not valid: "
                             f"{exc}") from None
        if not 1 <= epoch <= self.epochs + 1:
            raise ValueError(f"{path}: the checkpoint is at epoch {epoch}, outside this "
                             f"trainer's 1..{self.epochs} epochs")
        if not 0 <= step <= steps or global_step != (epoch - 1) * steps + step:
            raise ValueError(f"{path}: the checkpoint is at step {step} (overall "
                             f"{global_step}) of epoch {epoch}, which a run of {steps} steps "
                             "per epoch never reaches")
        if not (math.isfinite(loss_sum) and loss_sum >= 0):
            raise ValueError(f"{path}: the checkpoint's loss so far is {loss_sum}")
        return _Position(epoch, step, loss_sum, pos["rng_state"], global_step)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, x_train, t_train, x_test=None, t_test=None, *, on_epoch=None,
            resume=None, validation_split=None, validation_data=None) -> History:
        """Train for ``epochs`` epochs; returns the :class:`History`.

        Parameters
        ----------
        x_train : array (N, D) or (N, d1, ..., dk), floating; NumPy or any backend
        t_train : integer labels (N,) or float rows (N, C)
        x_test, t_test : optional, the same for the test accuracy
        on_epoch : callable, optional
            Called with each epoch's record (a dict) after it is complete.
        resume : path or TrainingState, optional
            A checkpoint written by this trainer's settings (its path, or what
            :func:`xpnet.checkpoint.read_training` read from it): the run continues from
            it (the net's weights and the optimizer state are replaced by its).
        validation_split : float in (0, 1), optional
            Hold out this fraction of the training set (at least one sample, a seeded draw:
            the same samples on every backend and process count), never trained on, and
            record ``val_loss`` and ``val_accuracy`` on it each evaluated epoch.
        validation_data : (x_val, t_val), optional
            A validation set of its own instead (not both).

        Before the first step the whole run is checked once, from the net's own layers: the
        data's shapes, dtypes and values, the labels against the classes the net scores (a
        refused run changes nothing); the steps then run without re-checking the data.

        Raises
        ------
        DivergenceError
            The loss or the weights became NaN or infinite.
        KeyboardInterrupt
            Ctrl-C; with a ``checkpoint`` path, after the checkpoint was saved.
        """
        # (A divergence is found in the global losses: every process raises it alike.)
        with device_context(next(iter(self.net.params.values()), None)), \
                self.team.guard(agreed=(DivergenceError,)):
            run = self._prepare_run(x_train, t_train, x_test, t_test, resume,
                                    validation_split, validation_data)
            try:
                return self._epochs(run, on_epoch)
            finally:
                if self._base_lr is not None:  # the base rate again (also on an error)
                    self.optimizer.lr, self._base_lr = self._base_lr, None

    def _prepare_run(self, x_train, t_train, x_test, t_test, resume, validation_split=None,
                     validation_data=None) -> _Run:
        """The run boundary: every check, the data moved, the way to run steps chosen."""
        with self.team.together():
            run = self._start(x_train, t_train, x_test, t_test, resume, validation_split,
                              validation_data)
        if self.team.distributed:  # one exchange: every process starts the same run
            self.team.agree_on_run(self._run_signature(run))
        self._choose_runner(run)  # (distributed: rank 0's weights to every rank)
        with self.team.together():
            for callback in self.callbacks:
                _hook(callback, "on_train_begin", self)
        return run

    def _run_signature(self, run: _Run) -> dict:
        """What defines a run, which every process of a distributed fit must share (else it
        would wait forever for an exchange the others never make, or train other weights):
        the net and its parameters' shapes, the optimizer, the settings, where it resumes,
        and the data (shapes, dtypes, a digest of a sample of their rows)."""
        params = self.net.params
        test = run.test or (None, None)
        return {
            "net": self._net_config(),
            "parameters": [(k, tuple(params[k].shape), dtype_name(params[k].dtype))
                           for k in params],
            "optimizer": (type(self.optimizer).__name__, self.optimizer.hyperparameters()
                          if hasattr(self.optimizer, "hyperparameters") else None),
            "batch_size": self.batch_size, "epochs": self.epochs, "seed": self.seed,
            "lr_schedule": None if self.lr_schedule is None else self.lr_schedule.config(),
            "compile": self.compile, "checkpoint": self.checkpoint is not None,
            "checkpoint_every": self.checkpoint_every, "eval_every": self.eval_every,
            "eval_train": self.eval_train, "eval_batch_size": run.eval_batch_size,
            "resumed at": (run.position.epoch, run.position.step, run.position.global_step),
            "validation": self._validation,
            "x_train": _digest(run.x), "t_train": _digest(run.t),
            "x_test": _digest(test[0]), "t_test": _digest(test[1]),
        }

    def _choose_runner(self, run: _Run) -> None:
        """How the run's steps go on (:func:`xpnet.runners.choose`), recorded in its history."""
        run.runner = runners.choose(self, run)
        run.history.config["step"] = run.runner.name

    def _epochs(self, run: _Run, on_epoch) -> History:
        config = run.history.config
        threads = config["blas_threads"]
        with _DeferredInterrupt(self.checkpoint is not None, self.team) as run.interrupt, \
                (speedups.blas_threads(threads) if speedups.blas_threads is not None
                 else contextlib.nullcontext()) as running, \
                (speedups.training_memory() if speedups.training_memory is not None
                 else contextlib.nullcontext()) as allocator:
            run.history.config["allocator"] = allocator or "the system's, as it is"
            if threads is not None and running is not None and running != threads:
                # What the BLAS library runs, not what was asked (OpenBLAS caps at its build's)
                config["blas_threads"] = running
                config["thread_policy"] += (f"; {threads} asked, the BLAS library runs at "
                                            f"most {running}")
            for epoch in range(run.position.epoch, self.epochs + 1):
                if self.stop_training:  # (a resumed run that had stopped early)
                    break
                record = self._epoch(run, epoch)
                run.history.records.append(record)
                with self.team.together():  # (before the checkpoint: it keeps their state)
                    for callback in self.callbacks:
                        callback.on_epoch_end(self, epoch, dict(record))
                if self.stop_training:  # (recorded before the checkpoint, which keeps it)
                    run.history.config["stopped_early_at"] = epoch
                if self.checkpoint is not None:
                    run.position = _Position(epoch + 1, 0, 0.0, run.rng.bit_generator.state,
                                             run.position.global_step)
                    self.save_checkpoint(self.checkpoint, run.position, run.history)
                if on_epoch is not None:
                    with self.team.together():
                        on_epoch(record)
                if self.stop_training:
                    break
            with self.team.together():
                for callback in self.callbacks:
                    _hook(callback, "on_train_end", self)
        return run.history

    def _start(self, x_train, t_train, x_test, t_test, resume, validation_split=None,
               validation_data=None) -> _Run:
        """Validate and move the data, set up the history, and restore ``resume`` if given."""
        if (x_test is None) != (t_test is None):
            raise ValueError("pass both x_test and t_test, or neither")
        self.stop_training = False
        if validation_split is not None and validation_data is not None:
            raise ValueError("pass validation_split or validation_data, not both")
        if validation_split is not None:
            validation_split = real_option("validation_split", validation_split, 0.0, 1.0)
            if not 0.0 < validation_split < 1.0:
                raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")
        if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                            or len(validation_data) != 2):
            raise TypeError("validation_data must be a pair (x_val, t_val), got "
                            f"{type(validation_data).__name__}")
        if isinstance(resume, files.TrainingState):  # read by the caller (xpnet train)
            resume_path = resume.path or "the checkpoint given to fit"
        else:
            resume_path, resume = resume, (None if resume is None else files.read_training(resume))
        if self.checkpoint is not None and self.team.root:  # (rank 0 writes it)
            check_writable(self.checkpoint, "checkpoint")
        if (self.checkpoint is not None and self.checkpoint.exists()
                and (resume_path is None
                     or Path(resume_path).resolve() != self.checkpoint.resolve())):
            raise ValueError(f"checkpoint {str(self.checkpoint)!r} already exists: continue its "
                             "run with resume= (xpnet train --resume), or move it away")
        if self.compiled_steps is not None:
            self.compiled_steps.check_device()  # still: the net may have moved since
        x, t = self._prepare(x_train, t_train, "x_train", "t_train")
        test = None if x_test is None else self._prepare(x_test, t_test, "x_test", "t_test")
        val, self._validation = None, None
        if validation_data is not None:
            val = self._prepare(*validation_data, "x_val", "t_val")
            self._validation = {"data": int(val[0].shape[0])}
        elif validation_split is not None:
            x, t, val = _split(x, t, validation_split, self.seed)
            self._validation = {"split": validation_split}
        net = self.net
        history = History(config={
            **self.info,
            "net": repr(net), "optimizer": repr(self.optimizer), "batch_size": self.batch_size,
            "epochs": self.epochs, "seed": self.seed, "device": net.device, "dtype": net.dtype,
            "train_samples": x.shape[0], "compile": self.compile or False,
            "lr_schedule": None if self.lr_schedule is None else self.lr_schedule.config(),
        })
        history.config["blas_threads"], history.config["thread_policy"] = (
            speedups.thread_policy(net, tuple(x.shape[1:]), self.batch_size, self.blas_threads,
                                   processes_per_node=self.team.local_size)
            if speedups.thread_policy is not None
            else (None, "the BLAS library's own (no xpnet._fast)"))
        self._check_batches_normalize(x.shape[0])
        _check_decay_term(net)
        if self._validation is not None:
            history.config["validation"] = dict(self._validation)
        # What the run's records will hold values for (callbacks' monitors check it).
        self.recorded = {"train_loss", "lr", "seconds", "samples_per_second",
                         *(("val_loss", "val_accuracy") if val is not None else ()),
                         *(("test_loss", "test_accuracy") if test is not None else ()),
                         *(("train_accuracy",) if self.eval_train != 0 else ())}
        run = _Run(x, t, test, namespace(x=x), np.random.default_rng(self.seed), history,
                   _Position(), weight_decay=float(getattr(net, "weight_decay", 0.0) or 0.0),
                   val=val)
        if resume is not None:  # (checked against the optimizer's lr: the base rate)
            run.position = self._restore(resume_path, resume, history)
            history.config["resumed_from"] = str(resume_path)
            run.rng.bit_generator.state = run.position.rng_state
        if self.team.distributed:
            history.config["processes"] = self.team.size
        if self.lr_schedule is not None:
            self._base_lr = float(self.optimizer.lr)
        run.eval_batch_size = self.eval_batch_size or max(
            self.batch_size, min(1000, EVAL_MEMORY // max(1, self._sample_bytes)))
        run.train_eval = self._train_sample(run)
        history.config.update(eval_batch_size=run.eval_batch_size, eval_every=self.eval_every,
                              eval_train=self.eval_train)
        return run

    def _check_batches_normalize(self, n: int) -> None:
        """Where the net normalizes by batch statistics one value per sample and feature
        (BatchNormalization of (N, D) rows), every batch, and every process's share of it,
        needs two samples or more: a ValueError before the first step otherwise."""
        per_sample = self._statistics_per_sample
        if per_sample is None or per_sample > 1:
            return
        size, b = self.team.size, self.batch_size
        counts = {min(b, n)} | ({n % b} if n > b and n % b else set())
        smallest = min(counts)
        if smallest // size >= 2:
            return
        where = (f"a last batch of {n % b} sample(s)" if smallest == n % b and n > b
                 else f"batches of {smallest} sample(s)")
        shared = f", split across {size} processes," if size > 1 else ""
        raise ValueError(
            f"batch_size={b} on {n} training samples leaves {where}{shared} and the net's "
            "BatchNormalization cannot normalize one sample's features in training: choose a "
            f"batch_size that leaves at least {2 * size} samples in every batch")

    def _train_sample(self, run: _Run) -> tuple | None:
        """The training data of the training accuracy: all of it, a fixed sample of
        ``eval_train`` (the same on every backend and process), or None."""
        if self.eval_train is None or self.eval_train >= run.n:
            return run.x, run.t
        if self.eval_train == 0:
            return None
        ids = np.sort(np.random.default_rng([self.seed, 1]).permutation(run.n)[:self.eval_train])
        ids = to_device(ids, self.net.device, dtype="int64")
        return run.xp.take(run.x, ids, axis=0), run.xp.take(run.t, ids, axis=0)

    def _epoch(self, run: _Run, epoch: int) -> dict:
        """Train one epoch (from where the run is) and evaluate; returns the epoch's record."""
        if epoch > run.position.epoch or run.position.rng_state is None:
            run.position = _Position(epoch, 0, 0.0, run.rng.bit_generator.state,
                                     run.position.global_step)
        bar = _Progress(self, run, epoch)
        trained = run.n - min(run.n, run.position.step * self.batch_size)  # (resumed: the rest)
        try:
            start = time.perf_counter()
            self._steps(run, epoch, bar)
            seconds = time.perf_counter() - start
            record = self._record(run, epoch, seconds, bar, trained)
            bar.done(record)
        finally:
            bar.close()  # also on Ctrl-C or divergence
        return record

    def _steps(self, run: _Run, epoch: int, bar: _Progress) -> None:
        """The optimizer steps of one epoch, with the losses read back (and checked) once at
        its end, at each checkpoint, and every ``log_every`` steps when a bar is shown."""
        b, n, position = self.batch_size, run.x.shape[0], run.position
        run.layers = getattr(self.net, "layers", None)
        steps = math.ceil(n / b)
        order = to_device(run.rng.permutation(n), self.net.device, dtype="int64")
        losses = _Losses(self, run, epoch)
        shown = self.team.agree_on(bar.shown)  # the losses are read at the same steps everywhere
        i = position.step
        while i < steps:
            if run.runner.version != getattr(run.layers, "version", 0):  # layers replaced
                self._choose_runner(run)
            stop = self._next_stop(i, steps, position.global_step, shown)
            if self._base_lr is not None:  # the schedule's rate for the steps up to stop
                schedule = self.lr_schedule
                self.optimizer.lr = self._base_lr * schedule.factor(
                    position.global_step, steps, self.epochs * steps)
                if schedule.per == "step":
                    stop = i + 1
            count, chunk = run.runner.advance(run, order, i, stop)
            losses.pending.append(chunk)
            i += count
            position.global_step += count
            due = self.checkpoint_every and position.global_step % self.checkpoint_every == 0
            stop_now = run.interrupt.stop
            if due or stop_now or (shown and i % self.log_every == 0):
                position.loss_sum += losses.drain(position.step)
                position.step = i
                if (due or stop_now) and self.checkpoint is not None:
                    self.save_checkpoint(self.checkpoint, position, run.history)
                if stop_now:
                    raise KeyboardInterrupt
                bar.loss(position.loss_sum / min(n, position.step * b))
            bar.update(count)
        position.loss_sum += losses.drain(position.step)  # syncs
        position.step = steps

    def _next_stop(self, i: int, steps: int, global_step: int, shown: bool) -> int:
        """The first step after ``i`` at which the loop must act: the epoch's end, a due
        checkpoint, a progress-bar update."""
        stop = steps
        if self.checkpoint_every:
            stop = min(stop, i + self.checkpoint_every - global_step % self.checkpoint_every)
        if shown:
            stop = min(stop, (i // self.log_every + 1) * self.log_every)
        return stop

    def _record(self, run: _Run, epoch: int, seconds: float, bar: _Progress,
                trained: int) -> dict:
        """The epoch's record: its mean loss and the accuracies (every ``eval_every`` epochs
        and after the last), evaluated in batches with the bar showing how far; its speed is
        of the ``trained`` samples its steps took in ``seconds`` (a resumed epoch's rest)."""
        due = epoch % self.eval_every == 0 or epoch == self.epochs
        train = run.train_eval if due else None
        return {
            "epoch": epoch,
            "train_loss": run.position.loss_sum / run.n,
            "train_accuracy": None if train is None else self._accuracy(run, *train, "train",
                                                                        bar),
            "test_accuracy": None if run.test is None or not due else self._accuracy(
                run, *run.test, "test", bar),
            "test_loss": None if run.test is None or not due else self._loss(run, *run.test),
            "val_loss": None if run.val is None or not due else self._loss(run, *run.val),
            "val_accuracy": None if run.val is None or not due else self._accuracy(
                run, *run.val, "validation", bar),
            "seconds": seconds,
            "samples_per_second": trained / seconds if seconds > 0 else math.inf,
            "lr": _lr_of(self.optimizer),
        }

    def _loss(self, run: _Run, x, t) -> float:
        """The mean loss on ``(x, t)`` in inference mode (the run's evaluation batches)."""
        return run.runner.loss(x, t, batch_size=run.eval_batch_size)

    def _accuracy(self, run: _Run, x, t, what: str, bar: _Progress) -> float:
        """The runner's accuracy on ``(x, t)``, a few evaluation batches at a time so that
        the bar can say how far it is."""
        n, batch = x.shape[0], run.eval_batch_size
        chunk = batch * max(1, math.ceil(n / batch / 20))  # about 20 updates of the bar
        correct = 0
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            bar.evaluating(what, start, n)
            fraction = run.runner.accuracy(x[start:stop, ...], t[start:stop, ...],
                                           batch_size=batch)
            correct += round(fraction * (stop - start))  # exact: a count over stop - start
        return correct / n


class _Progress:
    """An epoch's progress bar (tqdm; shown on a terminal, by the first process only)."""

    def __init__(self, trainer: Trainer, run: _Run, epoch: int):
        from tqdm.auto import tqdm

        steps = math.ceil(run.n / trainer.batch_size)
        self.test = run.test is not None
        # Short enough for 80 columns with the figures at the end (tqdm cuts the right end).
        self.bar = tqdm(total=steps, initial=run.position.step,
                        desc=f"epoch {epoch}/{trainer.epochs}", unit="batch", leave=True,
                        disable=None if trainer.progress and trainer.team.root else True,
                        dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}<{remaining}{postfix}]")
        # (disable=None: tqdm leaves None there on a terminal, True elsewhere.)
        self.shown = not self.bar.disable

    def update(self, count: int) -> None:
        self.bar.update(count)

    def loss(self, value: float) -> None:
        self.bar.set_postfix(loss=f"{value:.4f}", refresh=False)

    def evaluating(self, what: str, done: int, total: int) -> None:
        if self.shown:
            self.bar.set_postfix_str(f"evaluating {what} accuracy {done}/{total}")

    def done(self, record: dict) -> None:
        shown = f"loss={record['train_loss']:.4f}"
        train, test = record["train_accuracy"], record["test_accuracy"]
        if train is not None and test is not None:
            shown += f" acc={train:.4f}/{test:.4f}"  # train/test
        elif test is not None:
            shown += f" test_acc={test:.4f}"
        elif train is not None:
            shown += f" train_acc={train:.4f}"
        self.bar.set_postfix_str(shown)

    def close(self) -> None:
        self.bar.close()


class _Losses:
    """The weighted losses of an epoch's steps, left on the device until drained: one read
    for many steps, where a NaN or infinite loss is caught and named by epoch and step."""

    def __init__(self, trainer: Trainer, run: _Run, epoch: int):
        self.trainer, self.run, self.epoch, self.pending = trainer, run, epoch, []

    def drain(self, first_step: int) -> float:
        """Sum the pending losses (0-d, or 1-d from a loop; one device read); raise
        DivergenceError on NaN/inf, naming the step (``first_step`` + its place)."""
        pending, xp = self.pending, self.run.xp
        if not pending:
            return 0.0
        if any(map(operator.attrgetter("ndim"), pending)):  # (no generator: no call per step)
            chunk = xp.concat([xp.reshape(p, (-1,)) for p in pending])
        else:
            chunk = xp.stack(pending)
        total = float(xp.sum(chunk))
        if not math.isfinite(total):
            values = to_numpy(chunk)
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DivergenceError(
                f"the training loss became {values[bad]} at epoch {self.epoch}, step "
                f"{first_step + bad + 1}: {self.trainer.team.cause(self.run, _likely_cause)}"
            )
        pending.clear()
        return total
