"""Callbacks: code of yours run by :class:`xpnet.Trainer` as a fit goes
(``Trainer(..., callbacks=[...])``), and the two every training library has:
:class:`EarlyStopping` and :class:`ModelCheckpoint`.

A callback's state (the best value so far, the epochs without improvement, the best weights)
is saved in the Trainer's checkpoints, so a resumed run stops where the uninterrupted one
would.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import check_flag, int_option, real_option
from .backend import to_device, to_numpy

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint"]


class Callback:
    """The base class of callbacks; override the hooks you need.

    * ``on_train_begin(trainer)``: once, before the first step of a fit;
    * ``on_epoch_end(trainer, epoch, logs)``: after each epoch, with ``logs`` that epoch's
      record (``train_loss``, ``val_loss``, ``val_accuracy``, ``test_accuracy``, ...: the
      History's values, None where not evaluated); set ``trainer.stop_training = True`` to
      end the fit after this epoch;
    * ``on_train_end(trainer)``: once, after the last epoch (also after an early stop).

    ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint keeps of the callback (a
    dict of JSON values; NumPy arrays under the key ``"arrays"``, a dict of them).
    """

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Monitor(Callback):
    """A callback that follows one of the epoch's values, better when lower (``*loss``) or
    higher (``*accuracy``), or as ``mode`` says."""

    def __init__(self, monitor: str, min_delta: float = 0.0, mode: str = "auto"):
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be the name of a History value, got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        self.monitor, self.mode = monitor, mode
        self.min_delta = real_option("min_delta", min_delta, 0.0, math.inf)
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_train_begin(self, trainer) -> None:
        recorded = getattr(trainer, "recorded", None)
        if recorded is not None and self.monitor not in recorded:
            need = ("validation data (validation_split= or validation_data=)"
                    if self.monitor.startswith("val_") else
                    "test data" if self.monitor.startswith("test_") else "it")
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, which this fit "
                             f"does not record: it needs {need}")

    def _value(self, logs: dict):
        if self.monitor not in logs:
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, which an epoch "
                             f"does not record; the records have {sorted(logs)}")
        return logs[self.monitor]

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        if best is not None and not (isinstance(best, (int, float)) and math.isfinite(best)):
            raise ValueError(f"{type(self).__name__}'s saved best {best!r} is not a number")
        self.best = None if best is None else float(best)
        self.best_epoch = state.get("best_epoch")


class EarlyStopping(_Monitor):
    """Stop a fit when ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs in a row (epochs that ``eval_every`` skips do not count).

    Parameters
    ----------
    monitor : str, default "val_loss"
        A History value: ``val_loss``, ``val_accuracy``, ``test_accuracy``, ``train_loss``, ...
        (lower is better for losses, higher for accuracies; or ``mode="min"|"max"``).
    patience : int >= 0, default 5
    min_delta : float >= 0, default 0.0
    restore_best : bool, default True
        The net ends the fit with the weights (and layer state) of its best epoch.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True, mode: str = "auto"):
        super().__init__(monitor, min_delta, mode)
        self.patience = int_option("patience", patience, 0)
        self.restore_best = check_flag("restore_best", restore_best)
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._weights: dict | None = None  # host copies of the best epoch's params and state

    def on_train_begin(self, trainer) -> None:
        super().on_train_begin(trainer)
        if self.stopped_epoch is not None:  # a resumed run that had stopped: it stays stopped
            trainer.stop_training = True

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        value = self._value(logs)
        if value is None:  # not evaluated this epoch
            return
        if self._improves(float(value)):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            if self.restore_best:
                self._weights = {"params": {k: np.array(to_numpy(v)) for k, v in
                                            trainer.net.params.items()},
                                 "state": _host_state(trainer.net)}
            return
        self.wait += 1
        if self.wait >= max(1, self.patience):
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_train_end(self, trainer) -> None:
        if self.restore_best and self._weights is not None:
            net = trainer.net
            for k, v in self._weights["params"].items():
                current = net.params[k]
                net.params[k] = to_device(v, net.device, dtype=net.dtype)
                del current
            if self._weights["state"] and hasattr(net, "load_state"):
                net.load_state(self._weights["state"])

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "wait": self.wait, "stopped_epoch": self.stopped_epoch}
        if self._weights is not None:
            state["arrays"] = {**{f"params/{k}": v for k, v in self._weights["params"].items()},
                               **{f"state/{k}": np.asarray(v) for k, v in
                                  self._weights["state"].items()}}
        return state

    def load_state_dict(self, state: dict) -> None:
        wait = state.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int) or wait < 0:
            raise ValueError(f"EarlyStopping's saved wait {wait!r} is not an int >= 0")
        super().load_state_dict(state)
        self.wait, self.stopped_epoch = wait, state.get("stopped_epoch")
        arrays = state.get("arrays") or {}
        self._weights = None if not arrays else {
            "params": {k[len("params/"):]: v for k, v in arrays.items()
                       if k.startswith("params/")},
            "state": {k[len("state/"):]: (int(v) if np.ndim(v) == 0 and
                                          np.issubdtype(np.asarray(v).dtype, np.integer)
                                          else v)
                      for k, v in arrays.items() if k.startswith("state/")}}


class ModelCheckpoint(_Monitor):
    """Save the net (``net.save``: atomically) after an epoch: when ``monitor`` improved on
    every earlier epoch (``save_best_only``), or after every evaluated epoch.

    Parameters
    ----------
    path : str or Path
        The model file (``.npz``), loaded with ``TwoLayerNet.load`` and the like.
    monitor : str, default "val_accuracy"
    save_best_only : bool, default True
    """

    def __init__(self, path, monitor: str = "val_accuracy", save_best_only: bool = True,
                 mode: str = "auto"):
        super().__init__(monitor, 0.0, mode)
        from pathlib import Path

        from ._io import check_writable

        check_writable(path, "path")
        self.path = Path(path)
        self.save_best_only = check_flag("save_best_only", save_best_only)

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        value = self._value(logs)
        if value is None:
            return
        if self._improves(float(value)):
            self.best, self.best_epoch = float(value), epoch
        elif self.save_best_only:
            return
        team = getattr(trainer, "team", None)
        if team is None or team.root:  # (one process writes, in a distributed run)
            trainer.net.save(self.path)


def _host_state(net) -> dict:
    state = getattr(net, "state", None) or {}
    return {k: v if isinstance(v, int) else np.array(to_numpy(v)) for k, v in state.items()}
