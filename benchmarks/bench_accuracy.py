"""The quality bars on real Fashion-MNIST (apt-get install dataset-fashion-mnist, or --download).

* TwoLayerNet(784, 100, 10), 10 epochs, `xpnet train`'s defaults (Momentum, lr 0.05,
  batch 100): test accuracy >= 0.87 (scikit-learn's MLPClassifier baseline in the
  Fashion-MNIST paper: 0.871).
* A deeper net, MultiLayerNet([784, 256, 128, 10]) with Adam (lr 0.001), 20 epochs:
  >= 0.885 (a published 256-128-100 MLP: 0.8833).

Run:  python benchmarks/bench_accuracy.py [--device cpu] [--download]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import xpnet  # noqa: E402
from xpnet.datasets import load_mnist  # noqa: E402

RUNS = [
    ("TwoLayerNet(784, 100, 10), Momentum 0.05, 10 epochs", 0.87,
     lambda dev: xpnet.TwoLayerNet(784, 100, 10, device=dev), lambda: xpnet.Momentum(0.05), 10),
    ("MultiLayerNet([784, 256, 128, 10]), Adam 0.001, 20 epochs", 0.885,
     lambda dev: xpnet.MultiLayerNet([784, 256, 128, 10], device=dev), lambda: xpnet.Adam(1e-3),
     20),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--download", action="store_true")
    args = p.parse_args()
    (x, t), (xt, tt) = load_mnist("fashion-mnist", download=args.download)
    print(f"Fashion-MNIST, batch 100, seed 0, on {args.device}\n")
    print("| model | bar | final test accuracy | best epoch's | train time | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for name, bar, make_net, make_opt, epochs in RUNS:
        start = time.perf_counter()
        h = xpnet.Trainer(make_net(args.device), make_opt(), epochs=epochs, progress=False).fit(
            x, t, xt, tt)
        wall = time.perf_counter() - start
        final = h.test_accuracy[-1]
        print(f"| {name} | {bar} | {final:.4f} | {max(h.test_accuracy):.4f} | {wall:.0f} s | "
              f"{'met' if final >= bar else 'NOT met'} |", flush=True)
    print()
    print(describe())


if __name__ == "__main__":
    main()
