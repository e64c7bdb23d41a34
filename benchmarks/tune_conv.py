"""Choose a conv net's learning-rate schedule and weight decay on a validation split, then
train with them and report the test accuracy (Fashion-MNIST; the test set is read only for
the final figure).

    python benchmarks/tune_conv.py --model convnet --epochs 15
    python benchmarks/tune_conv.py --model convnet --epochs 15 --weight-decays 0 3e-4 1e-3
    python benchmarks/tune_conv.py --model deepconvnet --epochs 20 --schedules cosine

For each schedule asked for (``constant``, ``cosine``: cosine decay with one epoch of
warm-up, ``step``: x0.1 at 2/3 of the epochs) and each weight decay (the nets' L2
``weight_decay``, default 0 alone), the net trains with Adam (lr 0.001, batch 100) on 50,000
training images and is scored on the other 10,000 (a seeded split); the best validation
accuracy wins and is trained again on all 60,000, whose test accuracy is the figure
reported, with the wall time of each run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import xpnet  # noqa: E402
from xpnet.datasets import load_mnist  # noqa: E402
from xpnet.schedules import CosineDecay, StepDecay  # noqa: E402

MODELS = {
    "convnet": lambda dev, wd: xpnet.SimpleConvNet((1, 28, 28), weight_decay=wd, device=dev),
    "deepconvnet": lambda dev, wd: xpnet.DeepConvNet((1, 28, 28), weight_decay=wd, device=dev),
}


def schedule(name: str, epochs: int):
    if name == "cosine":
        return CosineDecay(warmup_epochs=1)
    if name == "step":
        return StepDecay(every=max(1, round(2 * epochs / 3)), gamma=0.1)
    return None


def run(model, device, name, decay, epochs, x, t, x_eval, t_eval, eval_train):
    net = MODELS[model](device, decay)
    trainer = xpnet.Trainer(net, xpnet.Adam(1e-3), batch_size=100, epochs=epochs,
                            lr_schedule=schedule(name, epochs), eval_train=eval_train,
                            progress=False)
    start = time.perf_counter()

    def report(r):
        print(f"  {name} wd {decay:g} epoch {r['epoch']:>2}: loss {r['train_loss']:.4f}, eval "
              f"{r['test_accuracy']:.4f}, {r['seconds']:.1f} s", flush=True)

    history = trainer.fit(x, t, x_eval, t_eval, on_epoch=report)
    return history, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="convnet")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--schedules", nargs="+", default=["constant", "cosine"],
                   choices=["constant", "cosine", "step"])
    p.add_argument("--weight-decays", nargs="+", type=float, default=[0.0], metavar="LAMBDA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--validation", type=int, default=10000)
    args = p.parse_args()
    (x, t), (x_test, t_test) = load_mnist("fashion-mnist", flatten=False)
    order = np.random.default_rng(0).permutation(x.shape[0])
    val, train = order[:args.validation], order[args.validation:]
    print(describe())
    settings = [(name, decay) for name in args.schedules for decay in args.weight_decays]
    scores = {}
    for name, decay in settings:
        if len(settings) == 1:
            break  # nothing to choose
        history, seconds = run(args.model, args.device, name, decay, args.epochs, x[train],
                               t[train], x[val], t[val], eval_train=0)
        scores[name, decay] = history.test_accuracy[-1]
        print(f"{name}, weight decay {decay:g}: validation accuracy {scores[name, decay]:.4f} "
              f"({seconds:.0f} s)", flush=True)
    best = max(scores, key=scores.get) if scores else settings[0]
    history, seconds = run(args.model, args.device, *best, args.epochs, x, t, x_test, t_test,
                           eval_train=10000)
    chosen = ", ".join(f"{n} wd {d:g} {v:.4f}" for (n, d), v in scores.items()) or "-"
    print(f"| {args.model}, Adam 0.001, {args.epochs} epochs, schedule {best[0]}, weight decay "
          f"{best[1]:g} (chosen on validation: {chosen}) | test accuracy "
          f"{history.test_accuracy[-1]:.4f} (best epoch {max(history.test_accuracy):.4f}) | "
          f"{seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
