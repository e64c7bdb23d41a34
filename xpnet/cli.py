"""Command line: ``xpnet train | gradcheck | info`` (and ``python -m xpnet``)."""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

from . import __version__
from .backend import BackendUnavailableError, available_backends, to_device
from .optim import DEFAULT_LR, OPTIMIZERS


def _info(args: argparse.Namespace) -> int:
    print(f"xpnet {__version__} (Python {platform.python_version()}, {platform.platform()})")
    print("backends:")
    for entry in available_backends():
        version = entry["version"] or "not installed"
        devices = ", ".join(entry["devices"]) or "-"
        line = f"  {entry['library']:<17} {version:<14} devices: {devices}"
        if entry["note"]:
            line += f"  ({entry['note']})"
        print(line)
    print(f"fast paths: {_fast_paths()}")
    return 0


def _fast_paths() -> str:
    """What xpnet._fast (everything that exists only for speed) offers on this machine."""
    import importlib.util
    import os

    if importlib.util.find_spec("xpnet._fast") is None:
        return "none (xpnet/_fast.py is not installed): the portable Array API code runs"
    from . import _fast

    blas = _fast.library()
    return ("fused SGD step; BLAS for the fused SGD step and bias: " + os.path.basename(blas)
            if blas else "fused SGD step; no BLAS fast path: the fused SGD step and bias use "
            "NumPy's matmul")


def _book_batch(dataset: str, n: int, seed: int, data_dir):
    """The first n training samples of the dataset, or seeded random data when it is absent."""
    from .datasets import DatasetNotFoundError, load_mnist

    if dataset != "random":
        try:
            (x, t), _ = load_mnist(dataset, data_dir=data_dir)
            return x[:n], t[:n], f"the first {n} {dataset} training images"
        except DatasetNotFoundError:
            print(f"note: {dataset} not found (see xpnet train --help for how to get it); "
                  "using seeded random data instead", file=sys.stderr)
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float64).astype(np.float32)
    return x, rng.integers(0, 10, size=n), f"{n} seeded random samples"


def _gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import check_gradients
    from .nets import TwoLayerNet

    try:
        net = TwoLayerNet(784, args.hidden, 10, seed=args.seed, device=args.device, dtype=args.dtype)
    except BackendUnavailableError as exc:
        print(f"xpnet gradcheck: {exc}", file=sys.stderr)
        return 2
    x, t, what = _book_batch(args.dataset, args.samples, args.seed, args.data_dir)
    print(f"TwoLayerNet(784, {args.hidden}, 10) on {net.device} {net.dtype}, {what}")
    report = check_gradients(net, to_device(x, net.device, dtype=net.dtype),
                             to_device(t, net.device), mode=args.mode, seed=args.seed)
    print(report)
    return 0 if report.ok else 1


def _check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'xpnet[plot]'") from None


def _plot(history, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._io import atomic_write

    epochs = history.epoch
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history.train_loss, marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, history.train_accuracy, marker="o", label="train")
    if history.test_accuracy[0] is not None:
        ax_acc.plot(epochs, history.test_accuracy, marker="s", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _train(args: argparse.Namespace) -> int:
    from .datasets import DatasetNotFoundError, load_mnist
    from .nets import MultiLayerNet, TwoLayerNet
    from .optim import make_optimizer
    from .train import DivergenceError, Trainer

    say = (lambda *a: None) if args.quiet else print
    try:
        if args.plot:
            _check_plot_available()
        optimizer = make_optimizer(args.optimizer, args.lr)
        (x, t), (xt, tt) = load_mnist(args.dataset, data_dir=args.data_dir, download=args.download)
        sizes = [x.shape[1], *args.hidden, 10]
        if len(args.hidden) == 1:
            net = TwoLayerNet(*sizes, seed=args.seed, device=args.device, dtype=args.dtype)
        else:
            net = MultiLayerNet(sizes, activation=args.activation, seed=args.seed,
                                device=args.device, dtype=args.dtype)
        checkpoint = args.checkpoint or args.resume
        trainer = Trainer(net, optimizer, batch_size=args.batch_size, epochs=args.epochs,
                          seed=args.seed, progress=not args.quiet, checkpoint=checkpoint,
                          checkpoint_every=args.checkpoint_every)
    except DatasetNotFoundError as exc:
        print(f"xpnet train: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"xpnet train: error: {exc}", file=sys.stderr)
        return 2
    say(f"{net!r}, {optimizer!r}, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"{x.shape[0]} {args.dataset} training images")

    def report(r):
        say(f"epoch {r['epoch']:>3}/{args.epochs}  loss {r['train_loss']:.4f}  "
            f"train acc {r['train_accuracy']:.4f}  test acc {r['test_accuracy']:.4f}  "
            f"{r['seconds']:.2f} s  {r['samples_per_second']:,.0f} samples/s")

    try:
        history = trainer.fit(x, t, xt, tt, on_epoch=report, resume=args.resume)
    except DivergenceError as exc:
        print(f"xpnet train: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:  # e.g. a checkpoint that does not fit these flags
        print(f"xpnet train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (f"; the checkpoint is saved: continue with --resume {checkpoint}"
                 if checkpoint else "")
        print(f"xpnet train: interrupted{saved}", file=sys.stderr)
        return 130
    if args.save:
        net.save(args.save)
        say(f"saved the model to {args.save}")
    if args.history:
        history.save(args.history)
        say(f"saved the history to {args.history}")
    if args.plot:
        _plot(history, args.plot)
        say(f"saved the curves to {args.plot}")
    print(f"final test accuracy: {history.test_accuracy[-1]:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpnet",
        description="Backprop layers on any Array API backend (NumPy, CuPy, torch, array_api_strict).",
    )
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train a network on MNIST or Fashion-MNIST and print the test accuracy",
        description="Train TwoLayerNet (one --hidden size) or a deeper MultiLayerNet (several) "
        "on Fashion-MNIST or MNIST, on any device. The dataset is looked for in --data-dir, "
        "$XPNET_DATA, ~/.cache/xpnet/<name> and /usr/share/datasets/<name> (Debian: apt-get "
        "install dataset-fashion-mnist); --download fetches it from the official mirrors.",
    )
    tr.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    tr.add_argument("--data-dir", default=None, help="where to look for the dataset first")
    tr.add_argument("--download", action="store_true",
                    help="download the dataset (SHA-256 verified) when it is not found")
    tr.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:N, torch:cpu, array_api_strict:device1, ... (default cpu)")
    tr.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--hidden", type=int, nargs="+", default=[100], metavar="N",
                    help="hidden layer sizes (default 100: TwoLayerNet(784, 100, 10))")
    tr.add_argument("--activation", choices=["relu", "sigmoid"], default="relu",
                    help="activation of a deeper net (TwoLayerNet uses ReLU)")
    tr.add_argument("--batch-size", type=int, default=100)
    tr.add_argument("--optimizer", choices=list(OPTIMIZERS), default="momentum")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default: " + ", ".join(
        f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save", metavar="PATH", help="save the trained model (.npz)")
    tr.add_argument("--history", metavar="PATH.json", help="save the per-epoch history as JSON")
    tr.add_argument("--plot", metavar="PATH.png",
                    help="save loss and accuracy curves (needs the plot extra)")
    tr.add_argument("--checkpoint", metavar="PATH",
                    help="keep a training checkpoint here (weights, optimizer state, position, "
                    "RNG state), rewritten atomically after every epoch and on Ctrl-C")
    tr.add_argument("--checkpoint-every", type=int, metavar="N",
                    help="also write the checkpoint every N optimizer steps")
    tr.add_argument("--resume", metavar="PATH",
                    help="continue from a checkpoint (with the same flags); the run then "
                    "keeps checkpointing there unless --checkpoint names another file")
    tr.add_argument("--quiet", action="store_true",
                    help="print only the final test accuracy")
    tr.set_defaults(func=_train)
    info = sub.add_parser("info", help="print the version, the backends found and their devices")
    info.set_defaults(func=_info)

    gc = sub.add_parser(
        "gradcheck",
        help="check TwoLayerNet's backprop against float64 numerical gradients (the book's check)",
        description="Reproduces the book's gradient check: TwoLayerNet(784, 50, 10) on 3 samples, "
        "backprop against centered differences on a float64 host copy, plus the gradients on "
        "--device against the host's. Exit status 1 when a gradient disagrees.",
    )
    gc.add_argument("--mode", choices=["full", "sampled", "directional"], default="full",
                    help="every element (default), 10 random elements per array, or 3 random "
                    "directions per array")
    gc.add_argument("--device", default="cpu", help="device string (default: cpu)")
    gc.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    gc.add_argument("--dataset", choices=["fashion-mnist", "mnist", "random"],
                    default="fashion-mnist", help="real data when found (default: fashion-mnist)")
    gc.add_argument("--data-dir", default=None, help="where to look for the dataset first")
    gc.add_argument("--samples", type=int, default=3, help="batch size (default: 3)")
    gc.add_argument("--hidden", type=int, default=50, help="hidden units (default: 50)")
    gc.add_argument("--seed", type=int, default=0)
    gc.set_defaults(func=_gradcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
