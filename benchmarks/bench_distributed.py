"""Data-parallel scaling: epoch time of ``Trainer(distributed=True)`` on 1 and N processes.

For each process count (``--processes 1 2``) the benchmark starts ``mpiexec -n P`` on this
script in worker mode; the workers train one configuration (default 784-1024-10, batch 256:
the products dominate) with SGD on seeded random data for ``--epochs`` epochs, and rank 0
reports: the median epoch time, the bytes all-reduced per step (one flat buffer: every
gradient and three control values), and the time of that allreduce alone (median of 50, the
same buffer, after the training) against the step time.  The table gives the speedup over one
process and the scaling efficiency (speedup / processes); a first row, for reference, trains
in one process without MPI (the fused loop and the thread policy's BLAS threads; under
mpiexec each process is bound to its own cores, so one MPI process gets one core here).  On GPUs (``--device cuda``, one GPU
per rank from its local rank) the exchange is NCCL's.

Run:  python benchmarks/bench_distributed.py [--processes 1 2] [--epochs 3] [--device cpu]
Needs: pip install 'xpnet[mpi]' (mpi4py and Open MPI).  As root, Open MPI also needs
OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (set here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

CONFIGS = {"small": ([784, 50, 10], 100), "wide": ([784, 1024, 10], 256),
           "deep": ([784, 4096, 4096, 10], 1024)}


def _training(args, device: str, **trainer_options):
    """The configuration's net on ``device``, trained (one warm-up epoch, then ``--epochs``):
    ``(net, history, median timed epoch, steps per epoch)``."""
    import xpnet

    sizes, batch = CONFIGS[args.config]
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, sizes[0]), dtype=np.float32)
    t = rng.integers(0, sizes[-1], args.samples)
    net = xpnet.MultiLayerNet(sizes, weight_init="he", device=device, dtype="float32")
    history = xpnet.Trainer(net, xpnet.SGD(0.01), batch_size=batch, epochs=args.epochs + 1,
                            progress=False, **trainer_options).fit(x, t)
    return net, history, statistics.median(history.seconds[1:]), -(-args.samples // batch)


def plain(args) -> None:
    """The reference: one process, the Trainer without ``distributed`` (the fused loop where
    it applies, the BLAS threads of the thread policy)."""
    _, history, epoch, steps = _training(args, args.device)
    print("RESULT " + json.dumps({
        "processes": 1, "epoch": epoch, "step": epoch / steps, "allreduce": 0.0, "bytes": 0,
        "kind": history.config["step"], "threads": history.config["blas_threads"]}), flush=True)


def worker(args) -> None:
    from xpnet.distributed import Context, local_device, reducer

    context = Context.world()
    net, history, epoch, steps = _training(args, local_device(args.device, context),
                                           distributed=True)
    exchange = reducer(context, net.params)
    grads = dict(net.params)
    times = []
    for _ in range(50):
        context.comm.Barrier()
        start = time.perf_counter()
        exchange.reduce(grads, 1.0, 0.5, False, False)
        times.append(time.perf_counter() - start)
    if context.root:
        print("RESULT " + json.dumps({
            "processes": context.size, "epoch": epoch, "step": epoch / steps,
            "allreduce": statistics.median(times), "bytes": exchange.nbytes,
            "kind": exchange.kind, "threads": history.config["blas_threads"]}), flush=True)


def run(processes: int, args) -> dict:
    from xpnet.distributed import find_mpiexec

    mpiexec = find_mpiexec()
    if mpiexec is None:
        sys.exit("bench_distributed: mpiexec not found: pip install 'xpnet[mpi]'")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    options = ["--config", args.config, "--epochs", str(args.epochs), "--samples",
               str(args.samples), "--device", args.device]
    if processes == 0:  # the reference: no MPI at all
        cmd = [sys.executable, __file__, "--plain", *options]
    else:
        cmd = [mpiexec, "-n", str(processes), sys.executable, __file__, "--worker", *options]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"bench_distributed: {processes} process(es) failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--config", choices=list(CONFIGS), default="wide")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    p.add_argument("--samples", type=int, default=60_000)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per rank")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs per process count, interleaved; the median is reported")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker or args.plain:
        (worker if args.worker else plain)(args)
        return
    sizes, batch = CONFIGS[args.config]
    counts = [0, *args.processes]  # 0: one process without MPI, for reference
    results = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            results[n].append(run(n, args))
    print(f"{'-'.join(map(str, sizes))}, batch {batch}, {args.samples} samples, SGD, float32, "
          f"{args.device}; median epoch of {args.epochs} after a warm-up, {args.rounds} "
          "round(s)\n")
    print("| processes | BLAS threads each | epoch | speedup | scaling efficiency | bytes "
          "all-reduced per step | allreduce | step | allreduce / step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for n in counts:
        r = {k: statistics.median(x[k] for x in results[n]) if isinstance(results[n][0][k], float)
             else results[n][0][k] for k in results[n][0]}
        if n == 0:
            print(f"| 1, no MPI ({r['kind']}) | {r['threads']} | {r['epoch'] * 1e3:.0f} ms | - "
                  f"| - | - | - | {r['step'] * 1e3:.2f} ms | - |")
            continue
        if n == 1:
            base = r["epoch"]
        speedup = base / r["epoch"] if base else float("nan")
        print(f"| {n} | {r['threads']} | {r['epoch'] * 1e3:.0f} ms | {speedup:.2f}x | "
              f"{speedup / n:.0%} | {r['bytes']:,} | {r['allreduce'] * 1e3:.2f} ms | "
              f"{r['step'] * 1e3:.2f} ms | {r['allreduce'] / r['step']:.1%} |")
    print(f"\nExchange: {results[args.processes[-1]][0]['kind']}\n")
    print(describe())


if __name__ == "__main__":
    main()
