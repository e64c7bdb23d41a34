"""Where the BLAS fast path of the fused SGD step and bias pays: ctypes gemm against NumPy.

For each product shape, the time of ``_fast.matmul_accumulate(W, x, dout, -lr,
trans_a=True)`` (the fused ``W -= lr x^T dout``) and of ``_fast.matmul_add(x, W, b)``
(``x W + b``), with the BLAS fast path on and off (NumPy's matmul, then in-place
passes over the output), interleaved, median of several repeats.  The shapes are
those of the benchmark networks and a sweep around the crossover, which
``xpnet._fast.BLAS_MIN_OUTPUT`` (output elements; lowered to 1 here for the
BLAS column) is set from: calling BLAS
through ctypes costs a few microseconds more than NumPy's matmul, and only the
passes it saves over a large enough output repay that.

Run:  python benchmarks/bench_gemm.py [--repeats 7]
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from xpnet import _fast  # noqa: E402
from xpnet._fast import matmul_accumulate, matmul_add  # noqa: E402

THRESHOLD = _fast.BLAS_MIN_OUTPUT

# (batch m, fan-in k, fan-out n): the products x W (output m x n) and x^T dout (output k x n)
SHAPES = [
    (100, 50, 10), (100, 100, 10), (256, 1024, 10),  # the benchmark nets' second layers
    (100, 784, 50), (100, 784, 100), (256, 784, 1024),  # their first layers
    (100, 64, 64), (100, 128, 128), (100, 256, 256), (256, 128, 128), (256, 256, 256),
]


def _seconds(f, repeats: int) -> float:
    number = max(1, int(0.02 / max(min(timeit.repeat(f, number=1, repeat=3)), 1e-7)))
    return statistics.median(timeit.repeat(f, number=number, repeat=repeats)) / number


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if _fast.library() is None:
        sys.exit("this NumPy has no BLAS fast path (see xpnet info): nothing to compare")
    fast_calls = _fast._state["calls"]
    rng = np.random.default_rng(0)

    def timed(f, fast: bool) -> float:
        # BLAS for every size (the threshold lowered), or never (no gemm to call).
        _fast._state["calls"] = fast_calls if fast else {}
        _fast.BLAS_MIN_OUTPUT = 1
        try:
            return _seconds(f, args.repeats)
        finally:
            _fast._state["calls"] = fast_calls
            _fast.BLAS_MIN_OUTPUT = THRESHOLD

    print(f"float32, median of {args.repeats} repeats; xpnet calls BLAS from "
          f"BLAS_MIN_OUTPUT = {THRESHOLD:,} output elements on\n")
    print("| product | output elements | BLAS fast path | NumPy | NumPy / BLAS | xpnet uses |")
    print("|---|---:|---:|---:|---:|---|")
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        W = rng.standard_normal((k, n), dtype=np.float32)
        b = rng.standard_normal(n, dtype=np.float32)
        dout = rng.standard_normal((m, n), dtype=np.float32)
        cases = {
            f"W += a x^T dout, W {k}x{n}": (k * n, lambda: matmul_accumulate(
                W, x, dout, -1e-12, trans_a=True)),
            f"x W + b, x {m}x{k}, W {k}x{n}": (m * n, lambda: matmul_add(x, W, b)),
        }
        for name, (size, f) in cases.items():
            # Both ways each time, alternating which goes first, so drift hits both alike.
            t_fast, t_numpy = timed(f, True), timed(f, False)
            t_numpy, t_fast = (t_numpy + timed(f, False)) / 2, (t_fast + timed(f, True)) / 2
            print(f"| {name} | {size:,} | {t_fast * 1e6:.1f} us | {t_numpy * 1e6:.1f} us | "
                  f"{t_numpy / t_fast:.2f}x | {'BLAS' if size >= THRESHOLD else 'NumPy'} |")
        sys.stdout.flush()
    print()
    print(describe())


if __name__ == "__main__":
    main()
