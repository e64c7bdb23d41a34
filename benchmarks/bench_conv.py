"""One epoch of the book's SimpleConvNet or DeepConvNet (batch 100): xpnet against the book's
im2col NumPy code (written below in its style, not part of the library; SimpleConvNet only)
and PyTorch eager, interleaved, with the floor: the convolutions' and the affine layers'
matrix products alone.

    python benchmarks/bench_conv.py                       # CPU, 60000 samples, 3 rounds
    python benchmarks/bench_conv.py --samples 10000 --rounds 5
    python benchmarks/bench_conv.py --model deepconvnet --samples 2000
    python benchmarks/bench_conv.py --backends cpu cuda   # with a GPU: CuPy and torch CUDA

SimpleConvNet: conv 30 5x5, ReLU, 2x2 max pool, Affine 100, ReLU, Affine 10.  DeepConvNet
(chapter 8): six 3x3 convolutions (16, 16, 32, 32, 64, 64 filters, pad 1 but 2 for the
fourth) with ReLU and a 2x2 max pool after each pair, Affine 50, ReLU, Dropout 0.5, Affine 10,
Dropout 0.5.  Every contender trains with plain SGD on the same random 28x28 images, float32;
each round runs every contender once, in turn, after a warm-up round; the table gives medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from seeds_numpy import Relu as BookRelu  # noqa: E402 - the book's Relu, as the seeds have it

import xpnet  # noqa: E402
from xpnet.backend import BackendUnavailableError, resolve_device, to_device  # noqa: E402

LR = 0.01
FN, FS, HIDDEN, CLASSES = 30, 5, 100, 10


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, CLASSES, n)


# -- the book's code, in its style (ch. 7: common/util.py, common/layers.py, simple_convnet.py) --


def im2col(input_data, filter_h, filter_w, stride=1, pad=0):
    N, C, H, W = input_data.shape
    out_h = (H + 2 * pad - filter_h) // stride + 1
    out_w = (W + 2 * pad - filter_w) // stride + 1
    img = np.pad(input_data, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    col = np.zeros((N, C, filter_h, filter_w, out_h, out_w), dtype=input_data.dtype)
    for y in range(filter_h):
        y_max = y + stride * out_h
        for x in range(filter_w):
            x_max = x + stride * out_w
            col[:, :, y, x, :, :] = img[:, :, y:y_max:stride, x:x_max:stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * out_h * out_w, -1)


def col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    N, C, H, W = input_shape
    out_h = (H + 2 * pad - filter_h) // stride + 1
    out_w = (W + 2 * pad - filter_w) // stride + 1
    col = col.reshape(N, out_h, out_w, C, filter_h, filter_w).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((N, C, H + 2 * pad + stride - 1, W + 2 * pad + stride - 1), dtype=col.dtype)
    for y in range(filter_h):
        y_max = y + stride * out_h
        for x in range(filter_w):
            x_max = x + stride * out_w
            img[:, :, y:y_max:stride, x:x_max:stride] += col[:, :, y, x, :, :]
    return img[:, :, pad:H + pad, pad:W + pad]


class BookConvolution:
    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad

    def forward(self, x):
        FN, C, FH, FW = self.W.shape
        N, C, H, W = x.shape
        out_h = 1 + (H + 2 * self.pad - FH) // self.stride
        out_w = 1 + (W + 2 * self.pad - FW) // self.stride
        col = im2col(x, FH, FW, self.stride, self.pad)
        col_W = self.W.reshape(FN, -1).T
        out = np.dot(col, col_W) + self.b
        out = out.reshape(N, out_h, out_w, -1).transpose(0, 3, 1, 2)
        self.x, self.col, self.col_W = x, col, col_W
        return out

    def backward(self, dout):
        FN, C, FH, FW = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, FN)
        self.db = np.sum(dout, axis=0)
        self.dW = np.dot(self.col.T, dout).transpose(1, 0).reshape(FN, C, FH, FW)
        dcol = np.dot(dout, self.col_W.T)
        return col2im(dcol, self.x.shape, FH, FW, self.stride, self.pad)


class BookPooling:
    def __init__(self, pool_h, pool_w, stride=1, pad=0):
        self.pool_h, self.pool_w, self.stride, self.pad = pool_h, pool_w, stride, pad

    def forward(self, x):
        N, C, H, W = x.shape
        out_h = int(1 + (H - self.pool_h) / self.stride)
        out_w = int(1 + (W - self.pool_w) / self.stride)
        col = im2col(x, self.pool_h, self.pool_w, self.stride, self.pad)
        col = col.reshape(-1, self.pool_h * self.pool_w)
        self.arg_max = np.argmax(col, axis=1)
        self.x = x
        return np.max(col, axis=1).reshape(N, out_h, out_w, C).transpose(0, 3, 1, 2)

    def backward(self, dout):
        dout = dout.transpose(0, 2, 3, 1)
        pool_size = self.pool_h * self.pool_w
        dmax = np.zeros((dout.size, pool_size), dtype=dout.dtype)
        dmax[np.arange(self.arg_max.size), self.arg_max.flatten()] = dout.flatten()
        dmax = dmax.reshape(dout.shape + (pool_size,))
        dcol = dmax.reshape(dmax.shape[0] * dmax.shape[1] * dmax.shape[2], -1)
        return col2im(dcol, self.x.shape, self.pool_h, self.pool_w, self.stride, self.pad)


class BookAffine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.original_x_shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return np.dot(self.x, self.W) + self.b

    def backward(self, dout):
        dx = np.dot(dout, self.W.T)
        self.dW = np.dot(self.x.T, dout)
        self.db = np.sum(dout, axis=0)
        return dx.reshape(*self.original_x_shape)


class BookSoftmaxWithLoss:
    def forward(self, x, t):
        self.t = t
        x = x - x.max(axis=1, keepdims=True)
        self.y = np.exp(x) / np.sum(np.exp(x), axis=1, keepdims=True)
        n = x.shape[0]
        return -np.sum(np.log(self.y[np.arange(n), t] + 1e-7)) / n

    def backward(self, dout=1):
        n = self.t.shape[0]
        dx = self.y.copy()
        dx[np.arange(n), self.t] -= 1
        return dx / n


class BookSimpleConvNet:
    def __init__(self, weight_init_std=0.01, seed=0):
        rng = np.random.default_rng(seed)
        pool_output_size = FN * 12 * 12
        f32 = np.float32
        self.params = {
            "W1": (weight_init_std * rng.standard_normal((FN, 1, FS, FS))).astype(f32),
            "b1": np.zeros(FN, f32),
            "W2": (weight_init_std * rng.standard_normal((pool_output_size, HIDDEN))).astype(f32),
            "b2": np.zeros(HIDDEN, f32),
            "W3": (weight_init_std * rng.standard_normal((HIDDEN, CLASSES))).astype(f32),
            "b3": np.zeros(CLASSES, f32),
        }
        p = self.params
        self.layers = [BookConvolution(p["W1"], p["b1"]), BookRelu(),
                       BookPooling(2, 2, stride=2), BookAffine(p["W2"], p["b2"]), BookRelu(),
                       BookAffine(p["W3"], p["b3"])]
        self.last_layer = BookSoftmaxWithLoss()

    def gradient(self, x, t):
        for layer in self.layers:
            x = layer.forward(x)
        loss = self.last_layer.forward(x, t)
        dout = self.last_layer.backward(1)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        c, a1, a2 = self.layers[0], self.layers[3], self.layers[5]
        return loss, {"W1": c.dW, "b1": c.db, "W2": a1.dW, "b2": a1.db, "W3": a2.dW, "b3": a2.db}


# -- contenders: each returns a function that runs one epoch and returns its seconds ----------


# DeepConvNet's convolutions: (channels in, filters, pad)
DEEP = [(1, 16, 1), (16, 16, 1), (16, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 1)]
DEEP_HIDDEN = 50


def _deep_shapes():
    """(channels in, filters, output side) of DeepConvNet's convolutions on 28 x 28 images."""
    side, shapes = 28, []
    for i, (c, f, pad) in enumerate(DEEP):
        side = side + 2 * pad - 2
        shapes.append((c, f, side))
        if i % 2 == 1:
            side //= 2
    return shapes, side


def xpnet_epoch(device, x, t, batch, model="convnet", compile=False):
    """xpnet's Trainer; ``compile``: its compiled steps (JAX: XLA; cuda and torch:cuda: one
    captured CUDA graph replayed per batch).  ValueError where the net cannot be compiled."""
    net = (xpnet.DeepConvNet(device=device) if model == "deepconvnet"
           else xpnet.SimpleConvNet(device=device))
    trainer = xpnet.Trainer(net, xpnet.SGD(LR), batch_size=batch, epochs=1, progress=False,
                            compile=compile)
    xd, td = to_device(x, device), to_device(t, device)
    return lambda: trainer.fit(xd, td).seconds[0]


def book_epoch(x, t, batch):
    net = BookSimpleConvNet()
    rng = np.random.default_rng(0)

    def run():
        start = time.perf_counter()
        order = rng.permutation(x.shape[0])
        for s in range(0, x.shape[0], batch):
            idx = order[s:s + batch]
            _, grads = net.gradient(x[idx], t[idx])
            for key, g in grads.items():
                net.params[key] -= LR * g
        return time.perf_counter() - start

    return run


def torch_epoch(device, x, t, batch, which="convnet"):
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    if which == "deepconvnet":
        layers = []
        for i, (c, f, pad) in enumerate(DEEP):
            layers += [nn.Conv2d(c, f, 3, padding=pad), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        side = _deep_shapes()[1]
        layers += [nn.Flatten(), nn.Linear(64 * side * side, DEEP_HIDDEN), nn.ReLU(),
                   nn.Dropout(0.5), nn.Linear(DEEP_HIDDEN, CLASSES), nn.Dropout(0.5)]
        model = nn.Sequential(*layers).to(device)
    else:
        model = nn.Sequential(nn.Conv2d(1, FN, FS), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(FN * 12 * 12, HIDDEN), nn.ReLU(),
                              nn.Linear(HIDDEN, CLASSES)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xd, td = torch.as_tensor(x, device=device), torch.as_tensor(t, device=device)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        sync()
        start = time.perf_counter()
        n = xd.shape[0]
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            loss = nn.functional.cross_entropy(model(xd[idx]), td[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.shape[0]
        float(total)
        sync()
        return time.perf_counter() - start

    return run


def floor_epoch(device, n, batch, model="convnet"):
    """The products of every step alone, on preallocated arrays: the convolution (the im2col
    rows times the filters, and dW), the two affine layers (forward, dW, dx of the second);
    the first layer's dx (the data's) is not computed by anyone."""
    dev = resolve_device(device)
    rng = np.random.default_rng(0)

    def arr(*shape):
        return to_device(rng.random(shape, dtype=np.float32), dev)

    if model == "deepconvnet":
        return _deep_floor(dev, arr, n, batch)

    col, w1 = arr(batch * 24 * 24, FS * FS), arr(FS * FS, FN)
    dconv = arr(batch * 24 * 24, FN)
    h0, w2, h1, w3 = arr(batch, FN * 144), arr(FN * 144, HIDDEN), arr(batch, HIDDEN), arr(HIDDEN, CLASSES)
    d3, d2 = arr(batch, CLASSES), arr(batch, HIDDEN)
    xp = dev.xp
    T = xp.matrix_transpose
    steps = -(-n // batch)

    def run():
        start = time.perf_counter()
        for _ in range(steps):
            col @ w1, h0 @ w2, h1 @ w3  # forward
            T(h1) @ d3, d3 @ T(w3), T(h0) @ d2, d2 @ T(w2), T(col) @ dconv  # backward
        if dev.library in ("cupy", "torch"):
            float(xp.sum(w1[0, 0:1]))  # wait for the device
        return time.perf_counter() - start

    return run


def _deep_floor(dev, arr, n, batch):
    """DeepConvNet's products: per convolution the im2col rows times the filters, dW, and dx
    (not the first's); the two affine layers' forward, dW and dx."""
    shapes, side = _deep_shapes()
    products = []  # (a, b): a @ b each step
    for i, (c, f, out) in enumerate(shapes):
        m, k = batch * out * out, c * 9
        col, w, d = arr(m, k), arr(k, f), arr(m, f)
        products += [(col, w), (col.T, d)] + ([(d, w.T)] if i else [])
    h0, w1 = arr(batch, 64 * side * side), arr(64 * side * side, DEEP_HIDDEN)
    h1, w2 = arr(batch, DEEP_HIDDEN), arr(DEEP_HIDDEN, CLASSES)
    d2, d1 = arr(batch, CLASSES), arr(batch, DEEP_HIDDEN)
    products += [(h0, w1), (h1, w2), (h1.T, d2), (d2, w2.T), (h0.T, d1), (d1, w1.T)]
    xp = dev.xp
    steps = -(-n // batch)

    def run():
        start = time.perf_counter()
        for _ in range(steps):
            for a, b in products:
                a @ b
        if dev.library in ("cupy", "torch"):
            float(xp.sum(w1[0, 0:1]))  # wait for the device
        return time.perf_counter() - start

    return run


def _contenders(backends, x, t, batch, has_torch, model="convnet"):
    runs = {}
    for dev in backends:
        host = "cuda" if "cuda" in dev.split(":") else "cpu"
        runs[f"xpnet {dev}"] = (xpnet_epoch(dev, x, t, batch, model), host)
        if host == "cuda" or resolve_device(dev).library == "jax":
            try:
                runs[f"xpnet {dev} compiled"] = (xpnet_epoch(dev, x, t, batch, model, True),
                                                 host)
            except ValueError as exc:  # (DeepConvNet's dropout: not compiled yet)
                print(f"bench_conv: xpnet {dev} compiled left out: {exc}", file=sys.stderr)
        if dev == "cpu" and model == "convnet":
            runs["book's NumPy (im2col)"] = (book_epoch(x, t, batch), host)
        if has_torch and dev in ("cpu", "cuda"):
            runs[f"PyTorch eager {dev}"] = (torch_epoch(dev, x, t, batch, model), host)
        if dev in ("cpu", "cuda"):
            runs[f"floor {dev} (products only)"] = (
                floor_epoch(dev, x.shape[0], batch, model), host)
    return runs


def _time_rounds(runs: dict, rounds: int) -> dict:
    times = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0: the warm-up
        for k, (f, _) in runs.items():
            secs = f()
            if r:
                times[k].append(secs)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["cpu"],
                    help="xpnet devices (default cpu; cuda adds CuPy and torch CUDA)")
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", choices=["convnet", "deepconvnet"], default="convnet")
    args = ap.parse_args()
    for dev in args.backends:
        try:
            resolve_device(dev)
        except (BackendUnavailableError, ValueError) as exc:
            sys.exit(f"bench_conv: {dev}: {exc}")
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    x, t = make_data(args.samples)
    runs = _contenders(args.backends, x, t, args.batch_size, has_torch, args.model)
    med = _time_rounds(runs, args.rounds)
    print(describe())
    name = {"convnet": "SimpleConvNet", "deepconvnet": "DeepConvNet"}[args.model]
    print(f"- {name}, {args.samples} samples, batch {args.batch_size}, SGD, float32; "
          f"median of {args.rounds} interleaved rounds after a warm-up\n")
    print("| contender | epoch | samples/s | vs floor | vs xpnet | vs PyTorch eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, host) in runs.items():
        refs = [med.get(f"floor {host} (products only)"), med.get(f"xpnet {host}"),
                med.get(f"PyTorch eager {host}")]
        cells = [f"{med[name] / r:.2f}x" if r else "-" for r in refs]
        print(f"| {name} | {med[name]:.2f} s | {args.samples / med[name]:,.0f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
