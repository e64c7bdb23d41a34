"""The quality bars on real Fashion-MNIST (apt-get install dataset-fashion-mnist, or --download).

* TwoLayerNet(784, 100, 10), 10 epochs, `xpnet train`'s defaults (Momentum, lr 0.05,
  batch 100): test accuracy >= 0.87 (scikit-learn's MLPClassifier baseline in the
  Fashion-MNIST paper: 0.871).
* A deeper net, MultiLayerNet([784, 256, 128, 10]) with Adam (lr 0.001), 20 epochs:
  >= 0.885 (a published 256-128-100 MLP: 0.8833).
* --runs extend: the same net with batch normalization and dropout (0.2) must beat it
  (the bar is the plain net's accuracy in the same run).
* --runs convnet: the book's SimpleConvNet (Adam 0.001, 15 epochs): >= 0.905.
* --runs deepconvnet: the book's DeepConvNet (Adam 0.001, 12 epochs): >= 0.925.
  (The book's nets reach 0.989 and 0.994 on MNIST.)

Run:  python benchmarks/bench_accuracy.py [--runs mlp extend convnet deepconvnet]
      [--device cpu] [--download]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import xpnet  # noqa: E402
from xpnet.datasets import load_mnist  # noqa: E402

# group -> [(name, bar (None: the previous run's accuracy), make_net, make_optimizer, epochs,
# images)]
RUNS = {
    "mlp": [
        ("TwoLayerNet(784, 100, 10), Momentum 0.05, 10 epochs", 0.87,
         lambda dev: xpnet.TwoLayerNet(784, 100, 10, device=dev), lambda: xpnet.Momentum(0.05),
         10, False),
        ("MultiLayerNet([784, 256, 128, 10]), Adam 0.001, 20 epochs", 0.885,
         lambda dev: xpnet.MultiLayerNet([784, 256, 128, 10], device=dev),
         lambda: xpnet.Adam(1e-3), 20, False),
    ],
    "extend": [
        ("MultiLayerNet([784, 256, 128, 10]), Adam 0.001, 20 epochs", 0.0,
         lambda dev: xpnet.MultiLayerNet([784, 256, 128, 10], device=dev),
         lambda: xpnet.Adam(1e-3), 20, False),
        ("the same, batch norm + dropout 0.2", None,
         lambda dev: xpnet.MultiLayerNet([784, 256, 128, 10], use_batchnorm=True,
                                         use_dropout=True, dropout_ratio=0.2, device=dev),
         lambda: xpnet.Adam(1e-3), 20, False),
    ],
    "convnet": [
        ("SimpleConvNet(), Adam 0.001, 15 epochs", 0.905,
         lambda dev: xpnet.SimpleConvNet(device=dev), lambda: xpnet.Adam(1e-3), 15, True),
    ],
    "deepconvnet": [
        ("DeepConvNet(), Adam 0.001, 12 epochs", 0.925,
         lambda dev: xpnet.DeepConvNet(device=dev), lambda: xpnet.Adam(1e-3), 12, True),
    ],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--download", action="store_true")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=["mlp"])
    args = p.parse_args()
    data = {images: load_mnist("fashion-mnist", download=args.download, flatten=not images)
            for images in (False, True)}
    print(f"Fashion-MNIST, batch 100, seed 0, on {args.device}\n")
    print("| model | bar | final test accuracy | best epoch's | train time | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    previous = 0.0
    for name, bar, make_net, make_opt, epochs, images in (r for g in args.runs for r in RUNS[g]):
        (x, t), (xt, tt) = data[images]
        bar = previous if bar is None else bar
        start = time.perf_counter()
        h = xpnet.Trainer(make_net(args.device), make_opt(), epochs=epochs, progress=False).fit(
            x, t, xt, tt)
        wall = time.perf_counter() - start
        final = previous = h.test_accuracy[-1]
        verdict = "reference" if not bar else "met" if final > bar else "NOT met"
        print(f"| {name} | {bar or '-':.4} | {final:.4f} | {max(h.test_accuracy):.4f} | "
              f"{wall:.0f} s | {verdict} |", flush=True)
    print()
    print(describe())


if __name__ == "__main__":
    main()
