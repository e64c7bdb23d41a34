"""``xpnet evaluate`` and ``xpnet predict``: a saved model (``net.save``, ``xpnet train
--save``) on a dataset's test set, or on images of the user's own.

The images get the preprocessing training gave them: pixels 0-255 (uint8 or other
integers) are divided by 255, floats must already lie in [0, 1]; each image is reshaped to
the net's input (a flat 784 or 1 x 28 x 28). Everything is checked before a file is written.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from ._io import atomic_write, check_writable
from .backend import to_device, to_numpy
from .evaluation import (
    DEFAULT_BATCH,  # (per forward pass when --batch-size is not given)
)


def load_model(path, device: str):
    """The net saved at ``path`` (any xpnet net class), on ``device``."""
    from .nets import Sequential

    if not Path(path).is_file():
        raise ValueError(f"MODEL {path}: no such file")
    try:
        return Sequential.load(path, device=device)
    except ValueError as exc:
        if str(exc).startswith(str(path)):  # (a file's fault, not the device's)
            raise ValueError(f"MODEL {exc}") from None
        raise


def sample_shapes(net) -> list:
    """The shapes one image may have for ``net``: its input shape, that shape flattened,
    and (for one channel, or a flat square input) the image as rows x columns."""
    shape = net._input_shape()
    if shape is None:  # a Sequential whose first layer does not say (a convolution)
        first = next(iter(net.layers.values()), None)
        channels = int(first.W.shape[1]) if hasattr(first, "W") and len(first.W.shape) == 4 \
            else None
        if channels is None:
            raise ValueError(f"cannot tell the input shape of {type(net).__name__}")
        return [("channels", channels)]
    shape = tuple(int(d) for d in shape)
    found = [shape, (math.prod(shape),)]
    if len(shape) == 3 and shape[0] == 1:
        found.append(shape[1:])
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    if side and side * side == shape[0]:
        found += [(side, side), (1, side, side)]
    return list(dict.fromkeys(found))


def as_images(x: np.ndarray, net, what: str) -> np.ndarray:
    """``x`` (one image or N of them, in any shape of :func:`sample_shapes`) as a batch of
    the net's input shape (a view where it can be); ValueError naming ``what`` otherwise."""
    shapes = sample_shapes(net)
    if shapes[0][0] == "channels":  # (N, C, H, W) or one (C, H, W) for a conv Sequential
        channels = shapes[0][1]
        if x.ndim == 3 and x.shape[0] == channels:
            return x[None]
        if x.ndim == 4 and x.shape[1] == channels:
            return x
        raise ValueError(f"{what} has shape {x.shape}: the net takes images of {channels} "
                         "channel(s), (N, C, H, W)")
    target = shapes[0]
    if tuple(x.shape) in shapes:
        return x.reshape((1, *target))
    if x.ndim >= 1 and tuple(x.shape[1:]) in shapes:
        if x.shape[0] == 0:
            raise ValueError(f"{what} holds no images (shape {x.shape})")
        return x.reshape((x.shape[0], *target))
    told = " or ".join(str(s) for s in shapes)
    raise ValueError(f"{what} has shape {x.shape}: the net takes images of shape {told} "
                     "(one image, or N of them along a first axis)")


def preprocessed(x: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Pixels as training saw them: integers 0-255 divided by 255, floats in [0, 1] as they
    are; a ValueError naming ``what`` for anything else."""
    kind = x.dtype.kind
    if kind in "iu":
        low, high = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(f"{what} holds integer pixels from {low} to {high}: expected "
                             "0-255, as the datasets store them")
        # (as load_mnist(normalize=True) scales them, in float32, whatever the net's dtype)
        return (x.astype(np.float32) / np.float32(255.0)).astype(dtype)
    if kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            raise ValueError(f"{what} holds NaN or infinite values")
        low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ValueError(f"{what} holds float pixels from {low:g} to {high:g}: training "
                             "used pixels divided by 255, in [0, 1] (give uint8 0-255 pixels, "
                             "or floats in [0, 1])")
        return x.astype(dtype)
    raise ValueError(f"{what} has dtype {x.dtype}: expected images as uint8 (0-255) or "
                     "floats in [0, 1]")


def _read_input(path) -> np.ndarray:
    """The .npy at ``path``, memory-mapped (a header promising more than the file holds is
    refused, never allocated); ValueError for anything else."""
    if not Path(path).is_file():
        raise ValueError(f"INPUT {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"PK":
        raise ValueError(f"INPUT {path}: an .npz archive; give one .npy array of images")
    if magic != b"\x93NUMPY":
        raise ValueError(f"INPUT {path}: not an .npy file (save the images with numpy.save)")
    try:
        x = np.lib.format.open_memmap(path, mode="r")  # (header read, never unpickles)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"INPUT {path}: not a readable .npy array ({exc})") from None
    return x


def scores_of(net, x: np.ndarray, batch_size: int, probabilities: bool, what: str):
    """The predicted labels (int64, N) or softmax rows (N, C) of ``x``, in batches."""
    batch = as_images(x, net, what)
    out = []
    for start in range(0, batch.shape[0], batch_size):
        part = preprocessed(np.asarray(batch[start:start + batch_size]), net.dtype, what)
        scores = to_numpy(net.predict(to_device(part, net.device, dtype=net.dtype)))
        if scores.ndim != 2:
            raise ValueError(f"the net turns images into an output of shape {scores.shape}, "
                             "not class scores (N, C)")
        if probabilities:
            shifted = np.exp(scores.astype(np.float64) - scores.max(axis=1, keepdims=True))
            out.append((shifted / shifted.sum(axis=1, keepdims=True)).astype(net.dtype))
        else:
            out.append(scores.argmax(axis=1).astype(np.int64))
    return np.concatenate(out)


def _batch_size(value) -> int:
    if value is None:
        return DEFAULT_BATCH
    if value < 1:
        raise ValueError(f"--batch-size must be >= 1, got {value}")
    return value


def file_key(path) -> str:
    """What tells two paths to one file apart from two files (./X, links, case)."""
    return os.path.normcase(os.path.realpath(path))


def _same_file(a, b) -> bool:
    return file_key(a) == file_key(b)


def predict_command(args: argparse.Namespace) -> int:
    batch_size = _batch_size(args.batch_size)
    if args.output is not None:
        check_writable(args.output, "--output")
        for name, path in (("MODEL", args.model), ("INPUT", args.input)):
            if _same_file(args.output, path):
                raise ValueError(f"--output {args.output} is {name}: writing there would "
                                 "destroy it; name another file")
    net = load_model(args.model, args.device)
    x = _read_input(args.input)
    result = scores_of(net, x, batch_size, args.probabilities, f"INPUT {args.input}")
    if args.output is not None:
        with atomic_write(args.output) as f:
            np.save(f, result, allow_pickle=False)
        kind = "probability rows" if args.probabilities else "labels"
        print(f"wrote {result.shape[0]} {kind} ({result.dtype}, shape {result.shape}) to "
              f"{args.output}")
    elif args.probabilities:
        for row in result:
            print(" ".join(f"{p:.4f}" for p in row))
    else:
        print("\n".join(str(int(k)) for k in result))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from .datasets import DATASETS, load_mnist
    from .evaluation import evaluate

    batch_size = _batch_size(args.batch_size)
    if args.confusion is not None:
        check_matplotlib("--confusion")
        check_writable(args.confusion, "--confusion")
        if _same_file(args.confusion, args.model):
            raise ValueError(f"--confusion {args.confusion} is MODEL: name another file")
    net = load_model(args.model, args.device)
    shapes = sample_shapes(net)
    flat = len(shapes[0]) == 1
    _, (x, t) = load_mnist(args.dataset, data_dir=args.data_dir, download=args.download,
                           flatten=flat)  # (scaled to [0, 1] as training scaled them)
    x = as_images(x, net, f"the {args.dataset} test images")
    classes = DATASETS[args.dataset].classes
    result = evaluate(net, x, t, batch_size=batch_size)
    print(f"{args.model}: {net!r}")
    print(f"on the {x.shape[0]} {args.dataset} test images")
    print(result.describe(classes if result.classes == len(classes) else None))
    if args.confusion is not None:
        _plot_confusion(result, classes, f"{Path(args.model).name} on {args.dataset}",
                        args.confusion)
        print(f"saved the confusion matrix to {args.confusion}")
    return 0


def check_matplotlib(flag: str) -> None:
    """ValueError naming ``flag`` unless matplotlib can be imported (the plot extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} needs matplotlib: pip install 'xpnet[plot]'") from None


def save_figure(fig, path) -> None:
    """Lay ``fig`` out, write it to ``path`` as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _plot_confusion(result, classes, title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, c = result.confusion_matrix, result.classes
    names = list(classes) if len(classes) == c else [str(k) for k in range(c)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * c, 0.8 + 0.55 * c))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true class",
           title=f"{title}: accuracy {result.accuracy:.4f}")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    threshold = matrix.max(initial=0) / 2
    if c <= 20:  # the counts, where they can be read
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    save_figure(fig, path)


def add_parsers(sub, add_data_arguments) -> None:
    """The ``evaluate`` and ``predict`` subcommands."""
    ev = sub.add_parser(
        "evaluate", help="a saved model's loss, accuracy, per-class accuracy and confusion "
        "matrix on a dataset's test set",
        description="Evaluate a model saved by xpnet train --save (or net.save) on the test "
        "set of --dataset: its loss, accuracy, each class's accuracy and the confusion matrix "
        "(rows: true class, columns: predicted).")
    ev.add_argument("model", metavar="MODEL.npz", help="a model file")
    add_data_arguments(ev)
    ev.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help=f"images per forward pass (default {DEFAULT_BATCH})")
    ev.add_argument("--confusion", metavar="PATH.png",
                    help="also draw the confusion matrix (needs the plot extra)")
    ev.set_defaults(func=evaluate_command)

    pr = sub.add_parser(
        "predict", help="the labels (or class probabilities) a saved model gives images",
        description="Predict the classes of the images in INPUT.npy with a model saved by "
        "xpnet train --save: uint8 pixels 0-255 as the datasets store them (or floats in "
        "[0, 1]), shaped (N, 28, 28), (N, 784) or (N, 1, 28, 28), or one image. Prints one "
        "label per line, or writes them to --output as an int64 .npy.")
    pr.add_argument("model", metavar="MODEL.npz", help="a model file")
    pr.add_argument("input", metavar="INPUT.npy", help="the images, one .npy array")
    pr.add_argument("--output", metavar="OUT.npy",
                    help="write the labels (or the probability rows) here instead of printing "
                    "them")
    pr.add_argument("--probabilities", action="store_true",
                    help="the softmax probability of every class instead of the label")
    pr.add_argument("--device", default="cpu", help="device string (default: cpu)")
    pr.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help=f"images per forward pass (default {DEFAULT_BATCH})")
    pr.set_defaults(func=predict_command)
