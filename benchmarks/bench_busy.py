"""A conv net's epoch on a quiet machine and beside one busy process, with the thread policy's
choice and with fixed thread counts: what the load check at a run's start buys.

    python benchmarks/bench_busy.py [--samples 5000] [--rounds 3] [--model convnet]

Each round times, quiet and then beside a competitor that the benchmark starts and stops
itself (one Python process spinning on a core, as another user's job would), one epoch of
SimpleConvNet (or DeepConvNet) with the Trainer's own choice of BLAS threads, with 2 threads
and with 1; the table gives medians and the threads the policy chose in each round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import xpnet  # noqa: E402

CHOICES = (("the policy's choice", None), ("2 threads", 2), ("1 thread", 1))


def epoch(model: str, x, t, threads):
    net = xpnet.DeepConvNet() if model == "deepconvnet" else xpnet.SimpleConvNet()
    trainer = xpnet.Trainer(net, xpnet.SGD(0.01), batch_size=100, epochs=1, progress=False,
                            eval_train=0, blas_threads=threads)
    history = trainer.fit(x, t)
    return history.seconds[0], history.config["blas_threads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", choices=["convnet", "deepconvnet"], default="convnet")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 1, 28, 28), dtype=np.float32)
    t = rng.integers(0, 10, args.samples)
    epoch(args.model, x, t, None)  # warm-up (numba's kernels, the allocator)
    times, chosen = {}, {}
    for _ in range(args.rounds):
        for busy in (False, True):
            competitor = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                          if busy else None)
            try:
                if busy:
                    time.sleep(0.5)  # let it take its core
                for name, threads in CHOICES:
                    seconds, used = epoch(args.model, x, t, threads)
                    times.setdefault((busy, name), []).append(seconds)
                    chosen.setdefault((busy, name), []).append(used)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print(describe())
    print(f"- {args.model}, {args.samples} random images, batch 100, SGD; median of "
          f"{args.rounds} rounds\n")
    print("| threads | quiet | beside a busy process | busy / quiet | threads used (quiet; busy) |")
    print("|---|---:|---:|---:|---|")
    for name, _ in CHOICES:
        quiet, busy = (statistics.median(times[(b, name)]) for b in (False, True))
        print(f"| {name} | {quiet:.2f} s | {busy:.2f} s | {busy / quiet:.2f}x | "
              f"{chosen[(False, name)]}; {chosen[(True, name)]} |")


if __name__ == "__main__":
    main()
