"""Time of the gradient checker's three modes against the seeds' full numerical gradient.

The book's check: TwoLayerNet(784, 50, 10) on 3 samples.  Each figure is the median of
several runs.  Run:  python benchmarks/bench_gradcheck.py [--repeats N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark's own helpers
import seeds_numpy  # noqa: E402
from machine import describe  # noqa: E402

import xpnet  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the slow full checks")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((3, 784)).astype(np.float32)
    t = np.array([3, 1, 4])
    net = xpnet.TwoLayerNet(784, 50, 10)
    seeds = seeds_numpy.TwoLayerNet(784, 50, 10)
    x64 = x.astype(np.float64)

    rows = []
    for mode, reps in (("directional", 15), ("sampled", 15), ("full", args.repeats)):
        report = xpnet.check_gradients(net, x, t, mode=mode)
        assert report.ok, report
        evals = sum(r.checked for r in report.rows) * 2
        rows.append((f"xpnet check_gradients, mode={mode}",
                     median_time(lambda m=mode: xpnet.check_gradients(net, x, t, mode=m), reps),
                     evals, max(r.max_rel_error for r in report.rows)))
    seeds_full = median_time(lambda: seeds.numerical_gradient(x64, t), args.repeats)
    rows.append(("seeds-style numerical_gradient (nditer, no comparison)", seeds_full, 39760 * 2,
                 None))

    print("TwoLayerNet(784, 50, 10), 3 samples; median of runs\n")
    print("| check | median time | loss evaluations | vs seeds' full | max rel err |")
    print("|---|---:|---:|---:|---:|")
    for name, secs, evals, err in rows:
        err_s = "-" if err is None else f"{err:.1e}"
        print(f"| {name} | {secs * 1e3:.1f} ms | {evals} | {secs / seeds_full:.4f}x | {err_s} |")
    print()
    print(describe())


if __name__ == "__main__":
    main()
