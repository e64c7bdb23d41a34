"""Command line: ``xpnet info | gradcheck`` (and ``python -m xpnet``)."""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

from . import __version__
from .backend import BackendUnavailableError, available_backends, to_device


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
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpnet",
        description="Backprop layers on any Array API backend (NumPy, CuPy, torch, array_api_strict).",
    )
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
