"""Per-epoch training time: xpnet against the seeds' NumPy style, PyTorch eager and the floor.

One SGD epoch on 60,000 samples of 784 features, 10 classes (seeded random data; the
values do not change the work), for each configuration:

* xpnet through its Trainer, on every backend asked for (``--backends``), and on NumPy
  once more with its BLAS fast path off (what the fused SGD step gains from it);
* the seeds' NumPy implementation (``seeds_numpy.py``: layer classes as in the notes);
* PyTorch eager with autograd (``nn.Linear`` layers, ``F.cross_entropy``, ``torch.optim.SGD``),
  and with ``--torch-compile`` the same model through ``torch.compile``;
* on JAX devices (``jax:cpu``, ``jax:cuda``): xpnet's Trainer eager, and compiled
  (``compile="step"``: one XLA program per step; ``compile="epoch"``: one ``lax.scan`` per
  epoch), and the same model written by hand in JAX (``jax.value_and_grad``, SGD, the same
  batches) as a ``jit`` step and as a ``lax.scan`` epoch;
* the floor: only the five matrix products a step cannot avoid (x W1, h W2, dW2 = h^T dout,
  dh = dout W2^T, dW1 = x^T dh, and one more pair per extra layer), on NumPy for the CPU
  contenders (JAX's CPU ones too) and on CuPy for the GPU ones;
* for scale, the batch gather alone: taking each shuffled batch of x and t out of the dataset
  (what every contender but the floor does each step, as the Trainer does it), no math.

The contenders run interleaved, one epoch each per round, after a warm-up round; each
figure is the median over the rounds (compiling happens in the warm-up).  Columns: the
ratio to the floor, to xpnet's NumPy (CPU) or CuPy (GPU) Trainer, and to the hand-written
JAX scan on the same kind of device.  Also reported: the peak memory an xpnet NumPy
training run allocates beyond the dataset and the parameters (tracemalloc).

Run:  python benchmarks/bench_train.py [--rounds 5] [--configs small ...] [--backends cpu jax:cpu ...]
Nothing else should run on the machine meanwhile: BLAS threads that compete for the cores
spin, and slow everything down by an order of magnitude.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
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


def xpnet_epoch(sizes, batch, device, x, t, *, blas_fast_path=True, compile=False):
    """xpnet's Trainer; ``blas_fast_path=False`` runs it with the gemm of
    ``_fast.matmul_accumulate`` turned off (NumPy's ctypes BLAS, CuPy's cublas.gemm: then the
    library's matmul and an in-place add); ``compile`` is the Trainer's (JAX devices)."""
    net = xpnet.MultiLayerNet(sizes, weight_init="he", device=device, dtype="float32")
    trainer = xpnet.Trainer(net, xpnet.SGD(LR), batch_size=batch, epochs=1, progress=False,
                            compile=compile)
    x_dev, t_dev = to_device(x, device), to_device(t, device, dtype="int64")

    def run():
        _fast.library()
        _fast._cupy_gemm()
        saved = {key: _fast._state[key] for key in ("calls", "cupy")}
        if not blas_fast_path:  # NumPy's gemm through ctypes, and CuPy's cublas.gemm
            _fast._state.update(calls={}, cupy=None)
        try:
            return trainer.fit(x_dev, t_dev).seconds[0]
        finally:
            _fast._state.update(saved)

    return run


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


def _contenders(sizes, batch, backends, x, t, *, has_torch: bool, gpu: bool,
                torch_compile: bool = False) -> dict:
    """``{name: (run one epoch -> seconds, device)}`` for one configuration."""
    contenders = {}
    for dev in backends:
        if resolve_device(dev).library == "jax":
            contenders[f"xpnet {dev} eager"] = (xpnet_epoch(sizes, batch, dev, x, t), dev)
            for mode in ("step", "epoch"):
                contenders[f"xpnet {dev} compiled {mode}"] = (
                    xpnet_epoch(sizes, batch, dev, x, t, compile=mode), dev)
            contenders[f"JAX by hand {dev}, jit step"] = (
                jax_epoch(sizes, batch, dev, x, t, scan=False), dev)
            contenders[f"JAX by hand {dev}, lax.scan epoch"] = (
                jax_epoch(sizes, batch, dev, x, t, scan=True), dev)
            continue
        contenders[f"xpnet {dev}"] = (xpnet_epoch(sizes, batch, dev, x, t), dev)
        if (dev == "cpu" and _fast.library() is not None) or (
                dev.startswith("cuda") and _fast._cupy_gemm() is not None):
            contenders[f"xpnet {dev}, no BLAS fast path"] = (
                xpnet_epoch(sizes, batch, dev, x, t, blas_fast_path=False), dev)
    seeds = seeds_epoch(sizes, batch, x, t) if "cpu" in backends else None
    if seeds is not None:
        contenders["seeds-style NumPy"] = (seeds, "cpu")
    if has_torch:
        if "cpu" in backends:
            contenders["PyTorch eager cpu"] = (torch_epoch(sizes, batch, "cpu", x, t), "cpu")
            if torch_compile:
                contenders["PyTorch torch.compile cpu"] = (
                    torch_epoch(sizes, batch, "cpu", x, t, compiled=True), "cpu")
        if gpu and "cuda" in backends:
            contenders["PyTorch eager cuda"] = (torch_epoch(sizes, batch, "cuda", x, t), "cuda")
    return contenders


def _time_rounds(runs: dict, rounds: int) -> dict:
    """Median seconds of each run over ``rounds`` interleaved rounds, after a warm-up round."""
    times = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0 is the warm-up (and the compiling)
        for k, f in runs.items():
            secs = f()
            if r:
                times[k].append(secs)
    return {k: statistics.median(v) for k, v in times.items()}


def _print_rows(sizes, batch, rows: dict, med: dict) -> None:
    for k, (_, dev) in rows.items():
        host = _host_of(dev)
        floor = med.get(f"floor {host} (matmuls only)")
        ref = med.get(f"xpnet {host}")
        jax_ref = next((v for name, v in med.items()
                        if name.startswith("JAX by hand") and name.endswith("lax.scan epoch")
                        and _host_of(name.split()[3].rstrip(",")) == host), None)
        cells = [f"{med[k] / r:.2f}x" if r else "-" for r in (floor, ref, jax_ref)]
        print(f"| {'-'.join(map(str, sizes))} | {batch} | {k} | {med[k] * 1e3:.0f} ms | "
              f"{N / med[k]:,.0f} | " + " | ".join(cells) + " |")
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
    args = p.parse_args()
    gpu, backends, configs = _defaults(args)
    try:
        import torch  # noqa: F401

        has_torch = not args.no_torch
    except ImportError:
        has_torch = False
    x, t = make_data()

    print(f"SGD epoch on {N} x {D} float32, {C} classes; median of {args.rounds} interleaved "
          "epochs after a warm-up\n")
    print("| config | batch | contender | epoch | samples/s | vs floor | vs xpnet NumPy/CuPy "
          "| vs JAX by hand (scan) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in configs:
        sizes, batch = CONFIGS[name]
        rows = _contenders(sizes, batch, backends, x, t, has_torch=has_torch, gpu=gpu,
                           torch_compile=args.torch_compile)
        for host in sorted({_host_of(d) for _, d in rows.values()}):
            try:  # on NumPy or CuPy (a JAX-only GPU machine has no "cuda" floor)
                rows[f"floor {host} (matmuls only)"] = (floor_epoch(sizes, batch, host), host)
                rows[f"batch gather only, {host} (no math)"] = (
                    gather_epoch(batch, host, x, t), host)
            except (BackendUnavailableError, ValueError):
                pass
        med = _time_rounds({k: f for k, (f, _) in rows.items()}, args.rounds)
        _print_rows(sizes, batch, rows, med)

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
