"""Per-epoch training time: xpnet against the seeds' NumPy style, PyTorch eager and the floor.

One SGD epoch on 60,000 samples of 784 features, 10 classes (seeded random data; the
values do not change the work), for each configuration:

* xpnet through its Trainer, on every backend asked for (``--backends``); on NumPy that is
  the fused loop (numba, ``xpnet._fused``) with the thread policy's BLAS threads, and once
  more each: the layers' own steps (as without numba), the fused loop on every core (what
  the policy gives up on an idle machine), and the layers with the BLAS fast path off;
* the seeds' NumPy implementation (``seeds_numpy.py``: layer classes as in the notes);
* the leanest NumPy step by hand (``lean_numpy_epoch``: in place, no checks, no layers), on
  one thread: the bound any NumPy layers path can reach (the elementwise passes and the
  batch gather stay; each small NumPy call also runs slower right after a large product
  has left the caches cold);
* PyTorch eager with autograd (``nn.Linear`` layers, ``F.cross_entropy``, ``torch.optim.SGD``),
  and with ``--torch-compile`` the same model through ``torch.compile``;
* on CuPy's and torch's CUDA devices (``cuda``, ``torch:cuda``): xpnet's Trainer eager, and
  compiled (``compile=True``: the step captured once as a CUDA graph, replayed per batch);
* on JAX devices (``jax:cpu``, ``jax:cuda``): xpnet's Trainer eager, and compiled
  (``compile="step"``: one XLA program per step; ``compile="epoch"``: one ``lax.scan`` per
  epoch), and the same model written by hand in JAX (``jax.value_and_grad``, SGD, the same
  batches) as a ``jit`` step and as a ``lax.scan`` epoch;
* the floor: only the five matrix products a step cannot avoid (x W1, h W2, dW2 = h^T dout,
  dh = dout W2^T, dW1 = x^T dh, and one more pair per extra layer), on NumPy for the CPU
  contenders (JAX's CPU ones too), on one BLAS thread and on every core, and on CuPy for the
  GPU ones;
* for scale, the batch gather alone: taking each shuffled batch of x and t out of the dataset
  (what every contender but the floor does each step, as the Trainer does it), no math.

The contenders run interleaved, one epoch each per round, after a warm-up round; each
figure is the median over the rounds (compiling happens in the warm-up).  Columns: the
threads each contender's products run on, the ratio to the floor on those threads, to
xpnet's NumPy (CPU) or CuPy (GPU) Trainer, and to the hand-written JAX scan on the same kind
of device.  With ``--busy`` each round runs every contender twice, on the quiet machine and
beside one competing CPU-bound process that the benchmark starts and stops itself (another
user's job), and two more columns give the busy epoch and its ratio to the quiet one.  Also
reported: the peak memory an xpnet NumPy training run allocates beyond the dataset and the
parameters (tracemalloc), and the machine, with every BLAS library's thread count.

Run:  python benchmarks/bench_train.py [--rounds 5] [--configs small ...] [--backends cpu jax:cpu ...] [--busy]
Nothing else should run on the machine meanwhile (besides --busy's own competitor).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seeds_numpy  # noqa: E402
from machine import describe  # noqa: E402

import xpnet  # noqa: E402
from xpnet import _fast  # noqa: E402
from xpnet.backend import BackendUnavailableError, resolve_device, to_device  # noqa: E402

N, D, C = 60_000, 784, 10
LR = 0.1
CONFIGS = {
    "small": ([D, 50, C], 100),
    "medium": ([D, 100, C], 100),
    "wide": ([D, 1024, C], 256),
    "deep": ([D, 4096, 4096, C], 1024),  # GPU only
}


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((N, D), dtype=np.float32), rng.integers(0, C, N)


# -- contenders: each returns a function that runs one epoch and returns its seconds ----------


def xpnet_epoch(sizes, batch, device, x, t, *, blas_fast_path=True, compile=False,
                numba=True, blas_threads=None):
    """xpnet's Trainer; ``blas_fast_path=False`` runs it with the gemm of
    ``_fast.matmul_accumulate`` turned off (NumPy's ctypes BLAS, CuPy's cublas.gemm: then the
    library's matmul and an in-place add); ``numba=False`` without the fused loop (the layers'
    own steps, as without numba installed); ``compile`` and ``blas_threads`` are the
    Trainer's.  Returns (run one epoch -> seconds, the BLAS threads it uses)."""
    net = xpnet.MultiLayerNet(sizes, weight_init="he", device=device, dtype="float32")
    trainer = xpnet.Trainer(net, xpnet.SGD(LR), batch_size=batch, epochs=1, progress=False,
                            compile=compile, blas_threads=blas_threads)
    x_dev, t_dev = to_device(x, device), to_device(t, device, dtype="int64")

    def run():
        _fast.library()
        _fast._cupy_gemm()
        saved = {key: _fast._state[key] for key in ("calls", "cupy")}
        if not blas_fast_path:  # NumPy's gemm through ctypes, and CuPy's cublas.gemm
            _fast._state.update(calls={}, cupy=None)
        os.environ["XPNET_NO_NUMBA"] = "0" if numba else "1"
        try:
            return trainer.fit(x_dev, t_dev).seconds[0]
        finally:
            _fast._state.update(saved)
            os.environ.pop("XPNET_NO_NUMBA")

    threads = _fast.thread_policy(net, (D,), batch, blas_threads)[0]
    return run, "-" if threads is None else threads


def seeds_epoch(sizes, batch, x, t):
    if len(sizes) != 3:
        return None
    net = seeds_numpy.TwoLayerNet(*sizes, weight_init_std=0.01, dtype=np.float32)
    rng = np.random.default_rng(0)

    def run():
        start = time.perf_counter()
        order = rng.permutation(N)
        for s in range(0, N, batch):
            idx = order[s:s + batch]
            grads = net.gradient(x[idx], t[idx])
            for key in ("W1", "b1", "W2", "b2"):
                net.params[key] -= LR * grads[key]
        return time.perf_counter() - start

    return run


def lean_numpy_epoch(sizes, batch, x, t):
    """The least NumPy a ReLU MLP's SGD step can be written in, by hand: in-place ReLU and
    softmax, no checks, no layer objects, no one-hot array (the label's column is taken
    directly), updates as ``W -= lr * (h^T dout)``.  Not xpnet's arithmetic (its rounding
    differs); it is here as the bound on what any NumPy layers path, xpnet's included, can
    reach against the floor on this machine."""
    rng = np.random.default_rng(0)
    Ws = [(rng.standard_normal((a, b)) * math.sqrt(2 / a)).astype(np.float32)
          for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    lr = np.float32(LR)

    def run():
        start = time.perf_counter()
        order = rng.permutation(N)
        for s in range(0, N, batch):
            ids = order[s:s + batch]
            xb, tb = x.take(ids, axis=0), t.take(ids)
            acts = [xb]
            for W, b in zip(Ws, bs):
                out = acts[-1] @ W
                out += b
                if len(acts) < len(Ws):
                    np.maximum(out, 0, out=out)
                acts.append(out)
            out = acts.pop()
            out -= np.maximum.reduce(out, axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= np.add.reduce(out, axis=1, keepdims=True)
            out[np.arange(len(tb)), tb] -= 1
            out *= np.float32(1 / len(tb))
            for i in range(len(Ws) - 1, -1, -1):
                h = acts[i]
                dh = out @ Ws[i].T if i else None
                Ws[i] -= lr * (h.T @ out)
                bs[i] -= lr * np.add.reduce(out, axis=0)
                if i:
                    dh *= h > 0
                    out = dh
        return time.perf_counter() - start

    return run


def torch_epoch(sizes, batch, device, x, t, *, compiled=False):
    """PyTorch with autograd; ``compiled``: the model through ``torch.compile`` (inductor)."""
    import torch

    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xd = torch.as_tensor(x, device=device)
    td = torch.as_tensor(t, device=device)
    gen = torch.Generator().manual_seed(0)

    def run():
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        order = torch.randperm(N, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for s in range(0, N, batch):
            idx = order[s:s + batch]
            loss = torch.nn.functional.cross_entropy(model(xd[idx]), td[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.shape[0]
        float(total)  # read the epoch's loss once, as the Trainer does
        sync()
        return time.perf_counter() - start

    return run


def jax_epoch(sizes, batch, device, x, t, *, scan):
    """The same model and SGD written by hand in JAX, as its documentation teaches:
    ``jax.value_and_grad`` of a pure loss, ``jax.jit``; one compiled call per step, or with
    ``scan`` the epoch's full batches as one ``lax.scan`` (the last, smaller batch as a step).
    The same He-initialised weights, the same batches (a seeded permutation per epoch)."""
    import jax
    import jax.numpy as jnp

    dev = resolve_device(device).native
    rng = np.random.default_rng(0)
    params = [(jax.device_put(np.sqrt(2.0 / a) * rng.standard_normal((a, b), dtype=np.float32),
                              dev), jax.device_put(np.zeros(b, dtype=np.float32), dev))
              for a, b in zip(sizes[:-1], sizes[1:])]
    x_dev, t_dev = jax.device_put(x, dev), jax.device_put(t.astype(np.int32), dev)

    def loss_fn(params, xb, tb):
        h = xb
        for i, (W, b) in enumerate(params):
            h = h @ W + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, tb[:, None], axis=1))

    def sgd(params, x, t, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, jnp.take(x, ids, axis=0),
                                                  jnp.take(t, ids, axis=0))
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

    step = jax.jit(sgd)

    @jax.jit
    def loop(params, x, t, ids):
        return jax.lax.scan(lambda p, row: sgd(p, x, t, row), params, ids)

    perm = np.random.default_rng(0)

    def run():
        nonlocal params
        start = time.perf_counter()
        order = jax.device_put(perm.permutation(N).astype(np.int32), dev)
        full, total = N // batch, 0.0
        if scan:
            params, losses = loop(params, x_dev, t_dev, order[:full * batch].reshape(full, batch))
            total = jnp.sum(losses) * batch
        else:
            for s in range(full):
                params, loss = step(params, x_dev, t_dev, order[s * batch:(s + 1) * batch])
                total = total + loss * batch
        if N % batch:
            params, loss = step(params, x_dev, t_dev, order[full * batch:])
            total = total + loss * (N - full * batch)
        float(total)  # one read of the epoch's loss, as the Trainer does
        return time.perf_counter() - start

    return run


def floor_epoch(sizes, batch, device):
    """Only the matrix products of every step, on preallocated arrays of the backend."""
    dev = resolve_device(device)
    xp = dev.xp
    rng = np.random.default_rng(0)

    def arr(shape):
        return to_device(rng.random(shape, dtype=np.float32), dev)

    Ws = [arr((a, b)) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [arr((batch, a)) for a in sizes[:-1]]
    dout = arr((batch, sizes[-1]))
    grads_in = [arr((batch, b)) for b in sizes[1:]]
    steps = math.ceil(N / batch)

    def run():
        start = time.perf_counter()
        for _ in range(steps):
            for a, W in zip(acts, Ws):
                a @ W  # forward
            for i in range(len(Ws) - 1, -1, -1):
                g = dout if i == len(Ws) - 1 else grads_in[i]
                acts[i].T @ g  # dW
                if i > 0:
                    g @ Ws[i].T  # dx (not for the first layer)
        if dev.library in ("cupy", "torch"):
            float(xp.sum(Ws[0][0, 0:1]))  # wait for the device
        return time.perf_counter() - start

    return run


def gather_epoch(batch, device, x, t):
    """Only the batch gather of an epoch: ``xp.take`` of each shuffled batch of x and t."""
    dev = resolve_device(device)
    xp = dev.xp
    x_dev, t_dev = to_device(x, dev), to_device(t, dev)
    rng = np.random.default_rng(0)

    def run():
        start = time.perf_counter()
        order = to_device(rng.permutation(N), dev)
        for s in range(0, N, batch):
            ids = order[s:min(s + batch, N)]
            xb = xp.take(x_dev, ids, axis=0)
            xp.take(t_dev, ids, axis=0)
        if dev.library in ("cupy", "torch"):
            float(xp.sum(xb[0, 0:1]))  # wait for the device
        return time.perf_counter() - start

    return run


# -- memory ---------------------------------------------------------------------------------


def memory_beyond_data(sizes, batch, x, t, epochs=2):
    """Peak bytes allocated by an xpnet NumPy run beyond the dataset and the parameters."""
    net = xpnet.MultiLayerNet(sizes, weight_init="he")
    params = sum(p.nbytes for p in net.params.values())
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    xpnet.Trainer(net, xpnet.SGD(LR), batch_size=batch, epochs=epochs, progress=False).fit(x, t)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak, params


def _host_of(device: str) -> str:
    """Where a device computes, for the floor and the reference it is compared with:
    ``"cpu"`` for NumPy, torch's and JAX's CPU, ``"cuda"`` for the GPUs."""
    return "cuda" if "cuda" in device.split(":") else "cpu"


def _limited(run, threads):
    """``run`` with NumPy's BLAS on ``threads`` threads (threadpoolctl) while it runs."""
    def limited():
        with _fast.blas_threads(threads):
            return run()
    return limited


CORES = _fast.usable_cores()


def _contenders(sizes, batch, backends, x, t, *, has_torch: bool, gpu: bool,
                torch_compile: bool = False) -> dict:
    """``{name: (run one epoch -> seconds, device, threads)}`` for one configuration; threads:
    the BLAS threads it uses (an int), or a description of another library's own pool."""
    contenders = {}
    for dev in backends:
        if resolve_device(dev).library == "jax":
            xla = f"XLA's own ({CORES} cores)"
            run, _ = xpnet_epoch(sizes, batch, dev, x, t)
            contenders[f"xpnet {dev} eager"] = (run, dev, xla)
            for mode in ("step", "epoch"):
                run, _ = xpnet_epoch(sizes, batch, dev, x, t, compile=mode)
                contenders[f"xpnet {dev} compiled {mode}"] = (run, dev, xla)
            contenders[f"JAX by hand {dev}, jit step"] = (
                jax_epoch(sizes, batch, dev, x, t, scan=False), dev, xla)
            contenders[f"JAX by hand {dev}, lax.scan epoch"] = (
                jax_epoch(sizes, batch, dev, x, t, scan=True), dev, xla)
            continue
        run, threads = xpnet_epoch(sizes, batch, dev, x, t)
        contenders[f"xpnet {dev}"] = (run, dev, threads)
        if _host_of(dev) == "cuda":  # CuPy's and torch's CUDA devices: one captured graph
            run, threads = xpnet_epoch(sizes, batch, dev, x, t, compile=True)
            contenders[f"xpnet {dev} compiled (CUDA graph)"] = (run, dev, threads)
        if dev == "cpu":
            if _fast.fused_module() is not None:
                run, threads = xpnet_epoch(sizes, batch, dev, x, t, numba=False)
                contenders[f"xpnet {dev}, layers (no numba)"] = (run, dev, threads)
            run, threads = xpnet_epoch(sizes, batch, dev, x, t, blas_threads=CORES)
            contenders[f"xpnet {dev}, all {CORES} cores"] = (run, dev, threads)
        if (dev == "cpu" and _fast.library() is not None) or (
                dev.startswith("cuda") and _fast._cupy_gemm() is not None):
            run, threads = xpnet_epoch(sizes, batch, dev, x, t, blas_fast_path=False,
                                       numba=False)
            contenders[f"xpnet {dev}, layers, no BLAS fast path"] = (run, dev, threads)
    if "cpu" in backends:
        contenders["lean NumPy by hand (bound)"] = (
            _limited(lean_numpy_epoch(sizes, batch, x, t), 1), "cpu", 1)
    seeds = seeds_epoch(sizes, batch, x, t) if "cpu" in backends else None
    if seeds is not None:
        contenders["seeds-style NumPy"] = (seeds, "cpu", CORES)
    if has_torch:
        import torch

        if "cpu" in backends:
            pool = f"torch's own ({torch.get_num_threads()})"
            contenders["PyTorch eager cpu"] = (torch_epoch(sizes, batch, "cpu", x, t), "cpu",
                                               pool)
            if torch_compile:
                contenders["PyTorch torch.compile cpu"] = (
                    torch_epoch(sizes, batch, "cpu", x, t, compiled=True), "cpu", pool)
        if gpu and "cuda" in backends:
            contenders["PyTorch eager cuda"] = (torch_epoch(sizes, batch, "cuda", x, t), "cuda",
                                                "-")
    return contenders


def _floors(sizes, batch, x, t, hosts) -> dict:
    """The floor (on one thread and on every core, on the CPU) and the batch gather alone."""
    rows = {}
    for host in sorted(hosts):
        try:  # on NumPy or CuPy (a JAX-only GPU machine has no "cuda" floor)
            if host == "cpu":
                for threads in sorted({1, CORES}):
                    rows[f"floor cpu (matmuls only), {threads} thread(s)"] = (
                        _limited(floor_epoch(sizes, batch, host), threads), host, threads)
            else:
                rows[f"floor {host} (matmuls only)"] = (floor_epoch(sizes, batch, host), host,
                                                        "-")
            rows[f"batch gather only, {host} (no math)"] = (gather_epoch(batch, host, x, t),
                                                           host, "-")
        except (BackendUnavailableError, ValueError):
            pass
    return rows


class Competitor:
    """One CPU-bound process (a Python busy loop) competing for the cores, as another user's
    job would; started and stopped by the benchmark (a context manager)."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)  # running before the timing starts
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        return False


def _time_rounds(runs: dict, rounds: int, busy: bool = False) -> dict:
    """``{(name, mode): median seconds}`` over ``rounds`` interleaved rounds after a warm-up
    round; mode "quiet", and with ``busy`` also "busy": each round runs every contender once
    on the quiet machine, then once more beside a :class:`Competitor`."""
    modes = ("quiet", "busy") if busy else ("quiet",)
    times = {(k, mode): [] for k in runs for mode in modes}
    for r in range(rounds + 1):  # round 0 is the warm-up (and the compiling)
        for mode in modes:
            with Competitor() if mode == "busy" else contextlib.nullcontext():
                for k, f in runs.items():
                    secs = f()
                    if r:
                        times[k, mode].append(secs)
    return {key: statistics.median(v) for key, v in times.items()}


def _floor_of(med: dict, host: str, threads, mode: str):
    """The floor a contender is measured against: on the CPU, the floor with its BLAS thread
    count (every core for a library with its own pool)."""
    if host != "cpu":
        return med.get((f"floor {host} (matmuls only)", mode))
    k = threads if isinstance(threads, int) else CORES
    return med.get((f"floor cpu (matmuls only), {k} thread(s)", mode))


def _print_rows(sizes, batch, rows: dict, med: dict, busy: bool) -> None:
    for k, (_, dev, threads) in rows.items():
        host = _host_of(dev)
        quiet = med[k, "quiet"]
        floor = _floor_of(med, host, threads, "quiet")
        ref = med.get((f"xpnet {host}", "quiet"))
        jax_ref = next((v for (name, mode), v in med.items()
                        if mode == "quiet" and name.startswith("JAX by hand")
                        and name.endswith("lax.scan epoch")
                        and _host_of(name.split()[3].rstrip(",")) == host), None)
        cells = [f"{quiet / r:.2f}x" if r else "-" for r in (floor, ref, jax_ref)]
        if busy:
            cells += [f"{med[k, 'busy'] * 1e3:.0f} ms", f"{med[k, 'busy'] / quiet:.2f}x"]
        print(f"| {'-'.join(map(str, sizes))} | {batch} | {k} | {threads} | {quiet * 1e3:.0f} ms "
              f"| {N / quiet:,.0f} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _defaults(args):
    try:
        resolve_device("cuda")
        gpu = True
    except (BackendUnavailableError, ValueError):
        gpu = False
    backends = args.backends
    if backends is None:
        backends = ["cpu", "cuda"] if gpu else ["cpu"]
        try:
            resolve_device("jax:cpu")
            backends.append("jax:cuda" if _jax_gpu() else "jax:cpu")
        except (BackendUnavailableError, ValueError):
            pass
    configs = args.configs or (["small", "medium", "wide"] + (["deep"] if gpu else []))
    return gpu, backends, configs


def _jax_gpu() -> bool:
    try:
        resolve_device("jax:cuda")
        return True
    except (BackendUnavailableError, ValueError):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per contender (median)")
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="default: small medium wide, plus deep on a GPU")
    p.add_argument("--backends", nargs="+", default=None,
                   help="xpnet devices (default: cpu, cuda when present, and jax:cpu or "
                   "jax:cuda when JAX is installed); the CPU peers (seeds-style NumPy, PyTorch "
                   "on the CPU) run only with cpu among them")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-compile", action="store_true",
                   help="also PyTorch through torch.compile on the CPU (needs a C++ compiler)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--busy", action="store_true",
                   help="also time every contender beside one competing CPU-bound process "
                   "(started and stopped by the benchmark), interleaved with the quiet runs")
    args = p.parse_args()
    gpu, backends, configs = _defaults(args)
    try:
        import torch  # noqa: F401

        has_torch = not args.no_torch
    except ImportError:
        has_torch = False
    x, t = make_data()

    print(f"SGD epoch on {N} x {D} float32, {C} classes; median of {args.rounds} interleaved "
          "epochs after a warm-up" + ("; busy: beside one competing CPU-bound process" if
                                      args.busy else "") + "\n")
    print("The floor a row is compared with is the one on its BLAS thread count (every core "
          "for the libraries with their own thread pools).\n")
    print("| config | batch | contender | threads | epoch | samples/s | vs floor | vs xpnet "
          "NumPy/CuPy | vs JAX by hand (scan) |" + (" busy epoch | busy / quiet |"
                                                     if args.busy else ""))
    print("|---|---:|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.busy else ""))
    for name in configs:
        sizes, batch = CONFIGS[name]
        rows = _contenders(sizes, batch, backends, x, t, has_torch=has_torch, gpu=gpu,
                           torch_compile=args.torch_compile)
        rows.update(_floors(sizes, batch, x, t, {_host_of(d) for _, d, _ in rows.values()}))
        med = _time_rounds({k: f for k, (f, _, _) in rows.items()}, args.rounds, args.busy)
        _print_rows(sizes, batch, rows, med, args.busy)

    if not args.no_memory:
        print("\nPeak memory of an xpnet NumPy training run (2 epochs), beyond the dataset "
              f"({(x.nbytes + t.nbytes) / 2**20:.0f} MiB) and the parameters:\n")
        for name in [c for c in configs if c != "deep"]:
            sizes, batch = CONFIGS[name]
            peak, params = memory_beyond_data(sizes, batch, x, t)
            print(f"- {'-'.join(map(str, sizes))}, batch {batch}: {(peak - params) / 2**20:.2f} MiB "
                  f"(parameters {params / 2**20:.2f} MiB)")
    print()
    print(describe())


if __name__ == "__main__":
    main()
