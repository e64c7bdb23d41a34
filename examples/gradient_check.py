"""The book's gradient_check.py (chapter 5): backprop against numerical gradients.

TwoLayerNet(784, 50, 10) on the first 3 training images: the mean |backprop -
numerical| per parameter, as the book prints it, then xpnet's full report.

    python examples/gradient_check.py                          # Fashion-MNIST on the CPU
    python examples/gradient_check.py --dataset mnist --download --device cuda
"""

import argparse
import sys

import numpy as np

import xpnet
from xpnet.datasets import DatasetNotFoundError, load_mnist


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="fetch the dataset if it is missing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="the net's dtype; float64 as in the book (float32 backprop differs from "
                   "the float64 numerical gradient by its own rounding, about 1e-9)")
    args = p.parse_args()
    try:
        (x_train, t_train), _ = load_mnist(args.dataset, data_dir=args.data_dir,
                                           download=args.download)
    except DatasetNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2

    net = xpnet.TwoLayerNet(784, args.hidden, 10, device=args.device, dtype=args.dtype)
    x_batch = xpnet.to_device(x_train[:3], args.device, dtype=args.dtype)
    t_batch = xpnet.to_device(t_train[:3], args.device)

    grad_numerical = net.numerical_gradient(x_batch, t_batch)  # float64 on the host, returned here
    grad_backprop = net.gradient(x_batch, t_batch)
    for key in grad_numerical:
        diff = np.mean(np.abs(xpnet.to_numpy(grad_backprop[key]).astype(np.float64)
                              - xpnet.to_numpy(grad_numerical[key]).astype(np.float64)))
        print(f"{key}: {diff:.3e}")

    report = xpnet.check_gradients(net, x_batch, t_batch, mode="full")
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, OSError) as exc:  # a bad flag or file: one line, as xpnet's CLI
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{sys.argv[0]}: interrupted", file=sys.stderr)
        sys.exit(130)
