"""Python calls into xpnet per eager training step (the layers' path, numba off).

Counts every Python function call whose code lives in the xpnet package (``sys.setprofile``
'call' events: functions, methods, properties, lambdas, comprehensions and generator
resumptions all count) during ``Trainer.fit``.  Two fits that differ only in their number of
steps per epoch (the same evaluation batches, the same epochs) are counted and subtracted,
so what is left is what each step costs, whatever the per-run work (checks, history,
evaluation) costs.

    python benchmarks/bench_calls.py                       # TwoLayerNet 784-50-10, Momentum
    python benchmarks/bench_calls.py --optimizer sgd --top 15

Deterministic: the count depends on the code alone, not on the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ["XPNET_NO_NUMBA"] = "1"  # the layers' own steps: what a CuPy or torch run takes

import numpy as np  # noqa: E402

import xpnet  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(xpnet.__file__))


def count_fit(steps: int, batch: int, optimizer: str, sizes) -> collections.Counter:
    """Calls into xpnet, by function, of one epoch of ``steps`` steps."""
    rng = np.random.default_rng(0)
    n = steps * batch
    x = rng.random((n, sizes[0]), dtype=np.float32)
    t = rng.integers(0, sizes[-1], size=n)
    net = xpnet.MultiLayerNet(sizes, weight_init=0.01, seed=0)
    opt = xpnet.optim.make_optimizer(optimizer)
    trainer = xpnet.Trainer(net, opt, batch_size=batch, epochs=1, progress=False,
                            eval_batch_size=10 * n)
    counts: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(ROOT):
                counts[f"{os.path.basename(code.co_filename)}:{code.co_qualname}"] += 1

    sys.setprofile(profile)
    try:
        trainer.fit(x, t)
    finally:
        sys.setprofile(None)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="momentum",
                        choices=sorted(xpnet.optim.OPTIMIZERS))
    parser.add_argument("--sizes", default="784,50,10")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--top", type=int, default=0, help="list the N most called functions")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    few, many = 10, 30
    small, large = (count_fit(s, args.batch, args.optimizer, sizes) for s in (few, many))
    per_step = collections.Counter({k: (large[k] - small[k]) / (many - few)
                                    for k in large if large[k] != small[k]})
    total = sum(per_step.values())
    print(f"MultiLayerNet{tuple(sizes)}, {args.optimizer}, batch {args.batch}, NumPy float32, "
          f"numba off: {total:g} Python calls into xpnet per training step")
    for name, calls in per_step.most_common(args.top):
        print(f"  {calls:6g}  {name}")


if __name__ == "__main__":
    main()
