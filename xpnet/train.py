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

import json
import math
import numbers
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_write, read_npz, remove_stale_temps, write_npz
from .backend import dtype_name, is_dtype, namespace, to_device, to_numpy
from .functional import check_label_range

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
        ``test_accuracy`` (None without test data), ``seconds`` (the training
        part of the epoch), ``samples_per_second``.
    config : dict
        What was trained, how and where.
    """

    records: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds",
               "samples_per_second")

    def __len__(self) -> int:
        return len(self.records)

    def __getattr__(self, name):
        # history.train_loss -> [epoch 1's, epoch 2's, ...]
        if name in History.COLUMNS:
            return [r[name] for r in self.records]
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
        if not isinstance(data, dict) or not isinstance(data.get("epochs"), list):
            raise ValueError(f"{path}: not an xpnet history file (no 'epochs' list)")
        for r in data["epochs"]:
            if not isinstance(r, dict) or set(r) != set(cls.COLUMNS):
                raise ValueError(f"{path}: an epoch record must have the keys {cls.COLUMNS}")
        return cls(records=data["epochs"], config=data.get("config", {}))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _all_finite(xp, a) -> bool:
    # max and min propagate NaN and inf: two reductions, and no boolean copy of the dataset
    # (isfinite(a) would allocate one as large as the data).
    return math.isfinite(float(xp.max(a))) and math.isfinite(float(xp.min(a)))


CHECKPOINT_FORMAT = "xpnet-train-1"


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
    second Ctrl-C interrupts at once."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
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
    net : MultiLayerNet, TwoLayerNet, or an object with ``params``, ``gradient(x, t)``,
        ``loss(x, t)``, ``accuracy(x, t)`` and a ``device`` / ``dtype``.  Each step
        calls its ``train_step(x, t, optimizer)`` where it has one (the nets' fuses
        plain SGD into backprop), else ``loss``, ``gradient`` and ``optimizer.update``.
    optimizer : an :mod:`xpnet.optim` optimizer
    batch_size : int, default 100
    epochs : int, default 10
    seed : int, default 0
        Seeds the per-epoch permutations: the same seed on the same backend
        gives the same history.
    progress : bool, default True
        A tqdm progress bar per epoch with the running loss (shown only on a terminal).
    eval_batch_size : int, default 1000
        Batch size of the accuracy evaluation.
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
    """

    def __init__(self, net, optimizer, *, batch_size: int = 100, epochs: int = 10, seed: int = 0,
                 progress: bool = True, eval_batch_size: int = 1000, log_every: int = 50,
                 checkpoint=None, checkpoint_every: int | None = None):
        self.net = net
        self.optimizer = optimizer
        self.batch_size = _positive_int("batch_size", batch_size)
        self.epochs = _positive_int("epochs", epochs)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = int(seed)
        self.progress = bool(progress)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.log_every = _positive_int("log_every", log_every)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        if checkpoint_every is not None:
            checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
            if self.checkpoint is None:
                raise ValueError("checkpoint_every needs a checkpoint path")
        self.checkpoint_every = checkpoint_every

    # -- data --------------------------------------------------------------------------------

    def _prepare(self, x, t, x_name: str, t_name: str):
        """Validate a dataset once, on the host side where it is, and move it to the net."""
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
        sizes = getattr(self.net, "sizes", None)
        if sizes and math.prod(x.shape[1:]) != sizes[0]:
            raise ValueError(
                f"{x_name} of shape {tuple(x.shape)} has {math.prod(x.shape[1:])} features per "
                f"sample, but the net's input size is {sizes[0]}"
            )
        if not _all_finite(xp, x):
            raise ValueError(f"{x_name} holds NaN or infinite values")
        if t.shape[0] != n:
            raise ValueError(f"{x_name} has {n} samples but {t_name} has {t.shape[0]}")
        classes = sizes[-1] if sizes else None
        if is_dtype(xp, t.dtype, "integral"):
            if t.ndim != 1:
                raise ValueError(f"{t_name} labels must have shape (N,), got {tuple(t.shape)}")
            if classes is not None:
                check_label_range(xp, t, classes, t_name)
            t_dev = to_device(t, self.net.device, dtype="int64")
        elif is_dtype(xp, t.dtype, "real floating"):
            if t.ndim != 2 or (classes is not None and t.shape[1] != classes):
                raise ValueError(
                    f"{t_name} rows must have shape (N, {classes or 'C'}), got {tuple(t.shape)}"
                )
            if not _all_finite(xp, t):
                raise ValueError(f"{t_name} holds NaN or infinite values")
            t_dev = to_device(t, self.net.device, dtype=self.net.dtype)
        else:
            raise TypeError(
                f"{t_name} must hold integer labels or float rows, got {dtype_name(t.dtype)}"
            )
        return to_device(x, self.net.device, dtype=self.net.dtype), t_dev

    # -- checkpoints -------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"batch_size": self.batch_size, "seed": self.seed}

    def save_checkpoint(self, path, position: _Position, history: History) -> None:
        """Write the training state atomically; refuses (DivergenceError) a non-finite one."""
        params = {name: to_numpy(value) for name, value in self.net.params.items()}
        for name, value in params.items():
            if not np.all(np.isfinite(value)):
                raise DivergenceError(
                    f"{name} became NaN or infinite by epoch {position.epoch}, step "
                    f"{position.step}: the learning rate is probably too high; the checkpoint "
                    "on disk is left as it was"
                )
        opt = self.optimizer.state_dict()
        arrays = {f"param/{k}": v for k, v in params.items()}
        arrays.update({f"opt/{n}/{k}": v for n, s in opt["state"].items() for k, v in s.items()})
        header = {
            "format": CHECKPOINT_FORMAT,
            "net": self.net.config() if hasattr(self.net, "config") else repr(self.net),
            "trainer": self._settings(),
            "optimizer": {"type": opt["type"], "hyper": opt["hyper"], "steps": opt["steps"]},
            "position": {"epoch": position.epoch, "step": position.step,
                         "loss_sum": position.loss_sum, "rng_state": position.rng_state,
                         "global_step": position.global_step},
            "history": history.to_dict(),
        }
        write_npz(path, header, arrays)

    def _restore(self, path, history: History) -> _Position:
        header, arrays = read_npz(path)
        if header.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a training checkpoint (format {header.get('format')!r}; "
                             "a model saved with net.save loads with TwoLayerNet.load)")
        try:
            mine = self.net.config() if hasattr(self.net, "config") else repr(self.net)
            if header["net"] != mine:
                raise ValueError(f"{path}: the checkpoint is for the net {header['net']}, "
                                 f"this trainer's net is {mine}")
            if header["trainer"] != self._settings():
                raise ValueError(f"{path}: the checkpoint was made with {header['trainer']}, this "
                                 f"trainer has {self._settings()}; resume with the same settings")
            pos = header["position"]
            position = _Position(int(pos["epoch"]), int(pos["step"]), float(pos["loss_sum"]),
                                 pos["rng_state"], int(pos["global_step"]))
            opt = header["optimizer"]
            state = {}
            for key, value in arrays.items():
                kind, _, rest = key.partition("/")
                if kind == "opt":
                    name, _, slot = rest.rpartition("/")
                    state.setdefault(name, {})[slot] = value
                elif kind != "param":
                    raise ValueError(f"{path}: unexpected array {key!r}")
            params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
            if set(params) != set(self.net.params):
                raise ValueError(f"{path}: parameters {sorted(params)} are not the net's "
                                 f"{sorted(self.net.params)}")
            records = History(header["history"]["epochs"], header["history"]["config"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: incomplete training checkpoint: {exc!r}") from None
        if position.epoch > self.epochs + 1:
            raise ValueError(f"{path}: the checkpoint is at epoch {position.epoch}, past this "
                             f"trainer's {self.epochs} epochs")
        for name, value in params.items():
            self.net.params[name] = to_device(value, self.net.device, dtype=self.net.dtype,
                                              copy=True)
        self.optimizer.load_state_dict(
            {"type": opt["type"], "hyper": opt["hyper"], "steps": opt["steps"], "state": state},
            self.net.device)
        history.records = records.records
        return position

    # -- the loop ----------------------------------------------------------------------------

    def _train_step(self, xb, tb):
        net, opt = self.net, self.optimizer
        if hasattr(net, "train_step"):
            return net.train_step(xb, tb, opt)
        loss, grads = net.loss(xb, tb), net.gradient(xb, tb)
        opt.update(net.params, grads)
        return loss

    @staticmethod
    def _drain(xp, pending: list, epoch: int, first_step: int) -> float:
        """Sum the weighted losses of ``pending`` (one device read); raise on NaN/inf."""
        if not pending:
            return 0.0
        chunk = xp.stack(pending)
        total = float(xp.sum(chunk))
        if not math.isfinite(total):
            values = to_numpy(chunk)
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DivergenceError(
                f"the training loss became {values[bad]} at epoch {epoch}, step "
                f"{first_step + bad + 1}: the learning rate is probably too high"
            )
        pending.clear()
        return total

    def fit(self, x_train, t_train, x_test=None, t_test=None, *, on_epoch=None,
            resume=None) -> History:
        """Train for ``epochs`` epochs; returns the :class:`History`.

        Parameters
        ----------
        x_train : array (N, D) or (N, d1, ..., dk), floating; NumPy or any backend
        t_train : integer labels (N,) or float rows (N, C)
        x_test, t_test : optional, the same for the test accuracy
        on_epoch : callable, optional
            Called with each epoch's record (a dict) after it is complete.
        resume : path, optional
            A checkpoint written by this trainer's settings: the run continues from
            it (the net's weights and the optimizer state are replaced by its).

        Raises
        ------
        DivergenceError
            The loss or the weights became NaN or infinite.
        KeyboardInterrupt
            Ctrl-C; with a ``checkpoint`` path, after the checkpoint was saved.
        """
        if (x_test is None) != (t_test is None):
            raise ValueError("pass both x_test and t_test, or neither")
        x, t = self._prepare(x_train, t_train, "x_train", "t_train")
        test = None if x_test is None else self._prepare(x_test, t_test, "x_test", "t_test")
        from tqdm.auto import tqdm

        net, opt, b = self.net, self.optimizer, self.batch_size
        xp = namespace(x=x)
        n = x.shape[0]
        steps = math.ceil(n / b)
        rng = np.random.default_rng(self.seed)
        history = History(config={
            "net": repr(net), "optimizer": repr(opt), "batch_size": b, "epochs": self.epochs,
            "seed": self.seed, "device": net.device, "dtype": net.dtype, "train_samples": n,
        })
        position = _Position()
        if resume is not None:
            position = self._restore(resume, history)
            history.config["resumed_from"] = str(resume)
            rng.bit_generator.state = position.rng_state
        if self.checkpoint is not None:
            remove_stale_temps(self.checkpoint)
        last = getattr(net, "last_layer", None)
        checked = getattr(last, "check_labels", None)
        if checked is not None:
            last.check_labels = False  # the labels were checked once, above
        bar = None
        try:
            with _DeferredInterrupt(self.checkpoint is not None) as interrupt:
                for epoch in range(position.epoch, self.epochs + 1):
                    if epoch > position.epoch or position.rng_state is None:
                        position = _Position(epoch, 0, 0.0, rng.bit_generator.state,
                                             position.global_step)
                    order = to_device(rng.permutation(n), net.device, dtype="int64")
                    bar = tqdm(total=steps, initial=position.step, desc=f"epoch {epoch}/{self.epochs}",
                               unit="batch", disable=None if self.progress else True, leave=True,
                               dynamic_ncols=True)
                    shown = bar.disable is False
                    start = time.perf_counter()
                    pending = []
                    for step in range(position.step, steps):
                        ids = order[step * b:min((step + 1) * b, n)]  # in-bounds stop: standard
                        xb, tb = xp.take(x, ids, axis=0), xp.take(t, ids, axis=0)
                        loss = self._train_step(xb, tb)
                        pending.append(loss * ids.shape[0])
                        position.global_step += 1
                        due = self.checkpoint_every and position.global_step % self.checkpoint_every == 0
                        if due or interrupt.requested or (shown and (step + 1) % self.log_every == 0):
                            position.loss_sum += self._drain(xp, pending, epoch, position.step)
                            position.step = step + 1
                            if due or interrupt.requested:
                                self.save_checkpoint(self.checkpoint, position, history)
                                if interrupt.requested:
                                    raise KeyboardInterrupt
                            bar.set_postfix(loss=f"{position.loss_sum / min(n, position.step * b):.4f}",
                                            refresh=False)
                        bar.update(1)
                    position.loss_sum += self._drain(xp, pending, epoch, position.step)  # syncs
                    position.step = steps
                    seconds = time.perf_counter() - start
                    record = {
                        "epoch": epoch,
                        "train_loss": position.loss_sum / n,
                        "train_accuracy": net.accuracy(x, t, batch_size=self.eval_batch_size),
                        "test_accuracy": None if test is None else net.accuracy(
                            *test, batch_size=self.eval_batch_size),
                        "seconds": seconds,
                        "samples_per_second": n / seconds if seconds > 0 else math.inf,
                    }
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                    train_acc=f"{record['train_accuracy']:.4f}",
                                    **({} if test is None else
                                       {"test_acc": f"{record['test_accuracy']:.4f}"}))
                    bar.close()
                    history.records.append(record)
                    if self.checkpoint is not None:
                        position = _Position(epoch + 1, 0, 0.0, rng.bit_generator.state,
                                             position.global_step)
                        self.save_checkpoint(self.checkpoint, position, history)
                    if on_epoch is not None:
                        on_epoch(record)
        finally:
            if bar is not None:
                bar.close()  # also on Ctrl-C or divergence (closing twice is harmless)
            if checked is not None:
                last.check_labels = checked
        return history
