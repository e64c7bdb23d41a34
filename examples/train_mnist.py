"""The book's train_neuralnet.py (chapter 5), on any device.

TwoLayerNet(784, 50, 10), SGD with lr 0.1, batches of 100 drawn at random each
iteration, 10000 iterations; train and test accuracy once per epoch.  The book
reports 0.978 train / 0.969 test on MNIST; on Fashion-MNIST (the default: Debian's
dataset-fashion-mnist package, or --download) expect about 0.87 test.

    python examples/train_mnist.py                             # Fashion-MNIST, NumPy on the CPU
    python examples/train_mnist.py --dataset mnist --download --device cuda
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
    p.add_argument("--device", default="cpu", help="cpu, cuda, torch:cpu, ... (default cpu)")
    p.add_argument("--iters", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    try:
        (x_train, t_train), (x_test, t_test) = load_mnist(
            args.dataset, data_dir=args.data_dir, download=args.download)
    except DatasetNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    net = xpnet.TwoLayerNet(784, args.hidden, 10, seed=args.seed, device=args.device)
    # The data goes to the device once; batches are gathered there.
    x_train, t_train = xpnet.to_device(x_train, args.device), xpnet.to_device(t_train, args.device)
    x_test, t_test = xpnet.to_device(x_test, args.device), xpnet.to_device(t_test, args.device)
    xp = xpnet.namespace(x_train)
    optimizer = xpnet.SGD(lr=args.lr)
    rng = np.random.default_rng(args.seed)

    train_size = x_train.shape[0]
    iter_per_epoch = max(train_size // args.batch_size, 1)
    for i in range(args.iters):
        batch = xpnet.to_device(rng.choice(train_size, args.batch_size), args.device)
        x_batch = xp.take(x_train, batch, axis=0)
        t_batch = xp.take(t_train, batch, axis=0)
        grads = net.gradient(x_batch, t_batch)
        optimizer.update(net.params, grads)
        if i % iter_per_epoch == 0 or i == args.iters - 1:
            loss = float(net.last_layer.loss)  # one read back per epoch, not per step
            train_acc = net.accuracy(x_train, t_train, batch_size=10000)
            test_acc = net.accuracy(x_test, t_test, batch_size=10000)
            print(f"iter {i:>5}  loss {loss:.4f}  train acc {train_acc:.4f}  test acc {test_acc:.4f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, OSError) as exc:  # a bad flag or file: one line, as xpnet's CLI
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{sys.argv[0]}: interrupted", file=sys.stderr)
        sys.exit(130)
