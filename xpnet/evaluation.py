"""Evaluating a trained net on a labelled set: :func:`evaluate` -> :class:`Evaluation` (the
mean loss, the accuracy, the accuracy of each class and the confusion matrix).

The data may be host NumPy arrays or arrays of the net's library: they are taken in batches
(each moved to the net's device and dtype, so memory is bounded by a batch), the net runs in
inference mode (no dropout, batch normalization's running statistics), and the counts are
kept on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._checks import check_protocol, is_int
from .backend import dtype_name, is_dtype, namespace, to_device, to_numpy

__all__ = ["Evaluation", "evaluate"]

# The batch of an evaluation when none is given: large enough for few calls, small enough
# that a conv net's forward stays in tens of MB.
DEFAULT_BATCH = 500


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes
    ----------
    loss : float
        The mean loss over the samples (the net's ``loss``: with its weight decay term).
    accuracy : float
        The fraction of samples whose highest score is their label.
    per_class_accuracy : float64 NumPy array (C,)
        For each class, the fraction of its samples classified as it (NaN for a class with
        no samples).
    confusion_matrix : int64 NumPy array (C, C)
        Row = true class, column = predicted class: how many samples of each.
    samples : int
    """

    loss: float
    accuracy: float
    per_class_accuracy: np.ndarray
    confusion_matrix: np.ndarray
    samples: int

    @property
    def classes(self) -> int:
        return int(self.confusion_matrix.shape[0])

    def __str__(self) -> str:
        return self.describe()

    def describe(self, class_names=None) -> str:
        """The figures as text: the loss and accuracy, then the confusion matrix with each
        class's accuracy at the end of its row (and its name, from ``class_names``)."""
        c, matrix = self.classes, self.confusion_matrix
        if class_names is not None and len(class_names) != c:
            raise ValueError(f"class_names has {len(class_names)} names for {c} classes")
        correct = int(np.trace(matrix))
        label = len(str(c - 1))
        width = max(len(str(int(matrix.max(initial=0)))), label) + 1
        lines = [(f"{self.samples} samples: loss {self.loss:.4f}, accuracy "
                  f"{self.accuracy:.4f} ({correct}/{self.samples})"), "",
                 "confusion matrix (rows: true class, columns: predicted) and per class accuracy:",
                 " " * (label + 2) + "".join(f"{k:>{width}}" for k in range(c)) + "  accuracy"]
        for k in range(c):
            a = self.per_class_accuracy[k]
            name = "" if class_names is None else f"  {class_names[k]}"
            lines.append(f"{k:>{label}} |" + "".join(f"{v:>{width}}" for v in matrix[k])
                         + f"  {'-' if math.isnan(a) else f'{a:.3f}':>8}{name}")
        return "\n".join(lines)


def evaluate(net, x, t, *, batch_size: int | None = None) -> Evaluation:
    """The loss, accuracy, per-class accuracy and confusion matrix of ``net`` on ``(x, t)``.

    Parameters
    ----------
    net : an xpnet net (anything with ``predict``, ``loss``, ``device`` and ``dtype``)
    x : array (N, ...) of the net's input shape, floating (host or the net's library)
    t : integer labels (N,) in [0, C), or one-hot / probability rows (N, C)
    batch_size : int, optional
        Samples per forward pass (default 500): memory is bounded by a batch.
    """
    check_protocol("net", net, ("predict", "loss", "device", "dtype"),
                   "an xpnet net (Sequential, TwoLayerNet, ...)")
    if batch_size is None:
        batch_size = DEFAULT_BATCH
    elif not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    for name, a in (("x", x), ("t", t)):
        if not hasattr(a, "shape") or len(a.shape) < 1:
            raise TypeError(f"{name} must be an array with a sample axis, got "
                            f"{type(a).__name__}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("x holds no samples: an evaluation needs at least one")
    if int(t.shape[0]) != n:
        raise ValueError(f"x has {n} samples but t has {int(t.shape[0])}")
    xp_t = namespace(t=t)
    one_hot = len(t.shape) == 2
    if not one_hot and (len(t.shape) != 1 or not is_dtype(xp_t, t.dtype, "integral")):
        raise ValueError(f"t must be integer labels (N,) or rows (N, C), got shape "
                         f"{tuple(t.shape)} of {dtype_name(t.dtype)}")
    labels_all = to_numpy(t)
    labels_all = labels_all.argmax(axis=1) if one_hot else labels_all.astype(np.int64)
    confusion, loss_sum, classes = None, 0.0, None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        xb = to_device(x[start:stop, ...], net.device, dtype=net.dtype)
        tb = to_device(t[start:stop, ...], net.device,
                       dtype=net.dtype if one_hot else "int64")
        scores = net.predict(xb)
        if classes is None:
            if len(scores.shape) != 2:
                raise ValueError(f"the net turns x into an output of shape "
                                 f"{tuple(scores.shape)}, not scores (N, C)")
            classes = int(scores.shape[1])
            if one_hot and int(t.shape[1]) != classes:
                raise ValueError(f"t rows have {int(t.shape[1])} columns, the net scores "
                                 f"{classes} classes")
            bad = labels_all[(labels_all < 0) | (labels_all >= classes)]
            if bad.size:
                raise ValueError(f"t holds labels outside [0, {classes}): {int(bad[0])}")
            confusion = np.zeros((classes, classes), dtype=np.int64)
        loss_sum += float(net.loss(xb, tb)) * (stop - start)
        predicted = to_numpy(namespace(scores=scores).argmax(scores, axis=1)).astype(np.int64)
        np.add.at(confusion, (labels_all[start:stop], predicted), 1)
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(per_class_total > 0,
                             np.diag(confusion) / np.maximum(per_class_total, 1), np.nan)
    return Evaluation(loss=loss_sum / n, accuracy=float(np.trace(confusion)) / n,
                      per_class_accuracy=per_class.astype(np.float64),
                      confusion_matrix=confusion, samples=n)
