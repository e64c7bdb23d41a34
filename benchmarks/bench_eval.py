"""How much of a conv net's epoch its evaluation takes, and the peak memory of its training.

    python benchmarks/bench_eval.py [--model deepconvnet] [--samples 3000]

Trains two epochs on the first ``--samples`` Fashion-MNIST training images (random images
where the dataset is missing) as ``xpnet train`` does for conv nets: the training accuracy on
a sixth of the training set and a test set of the same size (the CLI's 10,000 and 10,000 of
60,000), evaluation batches of the Trainer's default.  Reports the second epoch's training
and evaluation seconds and the peak memory NumPy allocated during the fit (tracemalloc), next
to the data's size.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import xpnet  # noqa: E402
from xpnet import train  # noqa: E402
from xpnet.datasets import DatasetNotFoundError, load_mnist  # noqa: E402


def data(n: int):
    try:
        (x, t), (xt, tt) = load_mnist("fashion-mnist", flatten=False)
        return x[:n], t[:n], xt[:n // 6], tt[:n // 6], "Fashion-MNIST"
    except DatasetNotFoundError:
        rng = np.random.default_rng(0)
        x = rng.random((n + n // 6, 1, 28, 28), dtype=np.float32)
        t = rng.integers(0, 10, n + n // 6)
        return x[:n], t[:n], x[n:], t[n:], "random images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["convnet", "deepconvnet"], default="deepconvnet")
    ap.add_argument("--samples", type=int, default=3000)
    args = ap.parse_args()
    x, t, xt, tt, what = data(args.samples)
    spent = []
    record = train.Trainer._record

    def timed(self, *a):
        start = time.perf_counter()
        result = record(self, *a)
        spent.append(time.perf_counter() - start)
        return result

    train.Trainer._record = timed
    net = xpnet.DeepConvNet() if args.model == "deepconvnet" else xpnet.SimpleConvNet()
    trainer = xpnet.Trainer(net, xpnet.Adam(1e-3), batch_size=100, epochs=2, progress=False,
                            eval_train=args.samples // 6)
    tracemalloc.start()
    history = trainer.fit(x, t, xt, tt)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    training, evaluation = history.seconds[1], spent[1]
    print(describe())
    print(f"- {args.model}, {args.samples} {what}, training accuracy on {args.samples // 6}, "
          f"test {xt.shape[0]}, evaluation batch {history.config['eval_batch_size']}")
    print(f"- second epoch: training {training:.2f} s, evaluation {evaluation:.2f} s "
          f"({evaluation / (training + evaluation):.1%} of the epoch)")
    print(f"- peak memory allocated by NumPy during the fit: {peak / 2**20:.0f} MiB "
          f"(the data: {(x.nbytes + xt.nbytes) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
