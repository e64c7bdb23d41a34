"""xpnet's two file formats, in one place: a model (``net.save`` / ``Cls.load``) and a
training checkpoint (``Trainer(checkpoint=...)`` / ``fit(resume=...)``).

Both are ``.npz`` archives with a JSON header (:func:`xpnet._io.write_npz`), written
atomically and read without trusting anything in them (bounded reads, no pickle).

=================  =================================================================
format             contents
=================  =================================================================
``xpnet-net-1``    header: the net's config (``class``, sizes, ...); arrays: one per
                   parameter, named like ``net.params`` (``W1``, ``b1``, ...), and
                   ``state/<key>`` for the layers' other state (``net.state``: running
                   statistics, dropout counts as 0-d int64)
``xpnet-train-1``  header: the net's config, the trainer's settings, the optimizer's
                   type, hyperparameters and step count, the position in the run
                   (epoch, step, loss so far, RNG state) and the history; arrays:
                   ``param/<name>`` for the parameters, ``state/<key>`` for the net's
                   other state and ``opt/<name>/<slot>`` for the optimizer's state
=================  =================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._io import read_npz, write_npz

__all__ = [
    "MODEL_FORMAT",
    "STATE_PREFIX",
    "TRAINING_FORMAT",
    "TrainingState",
    "check_param_arrays",
    "read_model",
    "read_training",
    "save_model",
    "save_training",
    "split_state",
]

MODEL_FORMAT = "xpnet-net-1"
TRAINING_FORMAT = "xpnet-train-1"
PARAM_PREFIX = "param/"
OPTIMIZER_PREFIX = "opt/"
STATE_PREFIX = "state/"
CALLBACK_PREFIX = "callback/"


# -- models ------------------------------------------------------------------------------------


def save_model(path, config: dict, params: dict) -> None:
    """Write a model: ``config`` (JSON-able) and ``params`` ({name: host NumPy array})."""
    write_npz(path, {"format": MODEL_FORMAT, **config}, params)


def read_model(path) -> tuple[dict, dict]:
    """``(config, {name: array})`` of a model file; ValueError if it is not one."""
    header, arrays = read_npz(path)
    if header.get("format") != MODEL_FORMAT:
        hint = ("; it is a training checkpoint: resume it with Trainer.fit(..., resume=path)"
                if header.get("format") == TRAINING_FORMAT else "")
        raise ValueError(f"{path}: unknown checkpoint format {header.get('format')!r}{hint}")
    config = {k: v for k, v in header.items() if k != "format"}
    return config, arrays


def split_state(arrays: dict) -> dict:
    """Remove the ``state/<key>`` arrays from ``arrays`` (in place); return them by key."""
    keys = [k for k in arrays if k.startswith(STATE_PREFIX)]
    return {k[len(STATE_PREFIX):]: arrays.pop(k) for k in keys}


def check_param_arrays(path, arrays: dict, expected: dict, dtype: str | None = None) -> None:
    """Raise ValueError unless ``arrays`` holds exactly the names of ``expected``
    ({name: shape}), each of that shape, of a floating dtype and finite (also as it will be
    held, in ``dtype``: a float64 1e300 is inf in float32)."""
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        a = arrays[name]
        if a.shape != tuple(shape):
            raise ValueError(f"{path}: {name} has shape {a.shape}, expected {tuple(shape)}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path}: {name} has dtype {a.dtype}, expected a float dtype")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
        if dtype is not None and a.dtype != np.dtype(dtype):
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.all(np.isfinite(a.astype(dtype))):
                    raise ValueError(f"{path}: {name} holds values beyond {dtype}'s range "
                                     f"(largest magnitude {float(np.max(np.abs(a))):.3g})")


# -- training checkpoints ----------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything a training checkpoint holds (host values only).

    ``optimizer`` is an optimizer's ``state_dict()``: ``type``, ``hyper``, ``steps`` and
    ``state`` ({param: {slot: array}}); ``position`` and ``history`` are the Trainer's.
    """

    net: object  # the net's config dict (or its repr, for a net without config())
    trainer: dict
    optimizer: dict
    position: dict
    history: dict
    params: dict = field(default_factory=dict)
    net_state: dict = field(default_factory=dict)
    path: str | None = None  # the file it was read from (read_training), for messages
    # The Trainer's callbacks' states, in order: {"type": class name, "state": JSON values,
    # "arrays": {name: array}} (xpnet.callbacks)
    callbacks: list = field(default_factory=list)


def save_training(path, state: TrainingState) -> None:
    """Write a training checkpoint atomically."""
    arrays = {PARAM_PREFIX + k: v for k, v in state.params.items()}
    arrays.update({STATE_PREFIX + k: v for k, v in state.net_state.items()})
    arrays.update({f"{OPTIMIZER_PREFIX}{n}/{k}": v
                   for n, slots in state.optimizer["state"].items() for k, v in slots.items()})
    arrays.update({f"{CALLBACK_PREFIX}{i}/{k}": v for i, entry in enumerate(state.callbacks)
                   for k, v in entry.get("arrays", {}).items()})
    header = {
        "format": TRAINING_FORMAT,
        "net": state.net,
        "trainer": state.trainer,
        "optimizer": {k: state.optimizer[k] for k in ("type", "hyper", "steps")},
        "position": state.position,
        "history": state.history,
        "callbacks": [{"type": e["type"], "state": e["state"]} for e in state.callbacks],
    }
    write_npz(path, header, arrays)


def read_training(path) -> TrainingState:
    """Read a training checkpoint; ValueError naming the file if it is not a complete one."""
    header, arrays = read_npz(path)
    if header.get("format") != TRAINING_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint (format {header.get('format')!r}; "
                         "a model saved with net.save loads with TwoLayerNet.load)")
    params, slots, callback_arrays = {}, {}, {}
    net_state = split_state(arrays)
    for key, value in arrays.items():
        if key.startswith(PARAM_PREFIX):
            params[key[len(PARAM_PREFIX):]] = value
        elif key.startswith(OPTIMIZER_PREFIX):
            name, _, slot = key[len(OPTIMIZER_PREFIX):].rpartition("/")
            slots.setdefault(name, {})[slot] = value
        elif key.startswith(CALLBACK_PREFIX):
            index, _, name = key[len(CALLBACK_PREFIX):].partition("/")
            callback_arrays.setdefault(index, {})[name] = value
        else:
            raise ValueError(f"{path}: unexpected array {key!r}")
    try:
        optimizer = {**{k: header["optimizer"][k] for k in ("type", "hyper", "steps")},
                     "state": slots}
        callbacks = header.get("callbacks", [])
        if not isinstance(callbacks, list) or not all(
                isinstance(e, dict) and isinstance(e.get("state"), dict) for e in callbacks):
            raise ValueError(f"{path}: the checkpoint's callbacks {callbacks!r} are not a list "
                             "of states")
        unknown = sorted(set(callback_arrays) - {str(i) for i in range(len(callbacks))})
        if unknown:
            raise ValueError(f"{path}: arrays for callbacks {unknown} the header does not list")
        callbacks = [{"type": e.get("type"), "state": e["state"],
                      "arrays": callback_arrays.get(str(i), {})}
                     for i, e in enumerate(callbacks)]
        return TrainingState(header["net"], header["trainer"], optimizer, header["position"],
                             header["history"], params, net_state, str(path), callbacks)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: incomplete training checkpoint: {exc!r}") from None
