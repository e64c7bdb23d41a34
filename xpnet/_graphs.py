"""Compiled training on CUDA devices: a whole training step captured once as a CUDA graph and
replayed for every batch (``Trainer(compile=True)`` on ``cuda`` and ``torch:cuda``).

Part of the speed module: removing this file leaves the eager steps, which give the same
results.  A step run eagerly on a GPU is some 30 kernel launches, each paid for in Python and
in the driver, while the GPU waits; a graph launches them all with one call.

What a graph asks of the step, and how :class:`GraphSteps` gives it:

* **Everything at fixed addresses.**  A graph bakes in the pointers and the scalars of its
  launches.  So the batch is gathered inside the step from the epoch's order, copied into a
  fixed buffer, at a position counter that lives on the device and that the step advances;
  the optimizer's step count and hyperparameters (a schedule's rate) are 0-d device arrays
  written before the replays, not Python numbers; parameters and optimizer slots are updated
  in place.  Before replaying, the runner checks that the net's parameters, the optimizer's
  slots and the data are still the arrays it captured, and captures again where any was
  replaced (a resumed checkpoint, EarlyStopping's restore, another fit's data).
* **Nothing read back.**  Each step's loss goes into its own element of a device array (by a
  mask: no scatter, nothing baked); the Trainer reads them where it stops anyway (a
  checkpoint, a progress update, the end of the epoch), so divergence detection,
  checkpoints, resume and Ctrl-C behave as they do without a graph.
* **Capture-safe operations.**  On torch, ``torch.cuda.graph`` captures every operation the
  layers use (cuBLAS included) into a private memory pool.  CuPy 14 refuses cuBLAS calls
  while capturing and uploads pointer tables for ``stack``; during its capture the runner
  puts its own pieces into the speed module's slots: products through cuBLAS called
  directly on a handle bound to the capture stream (:class:`CublasGemm`), and im2col, col2im
  and max pooling as single kernels (:mod:`xpnet._cuda_kernels`).  Allocations come from a
  memory pool of the graph's own, which nothing else draws on.
* **Warmed up, then restored.**  One step runs for real before the capture (libraries
  initialise, kernels compile, the pool fills); the parameters, slots and counters it
  changed are then put back, so the captured run starts where the eager one would.

The smaller last batch of an epoch (when the batch size does not divide the data) runs as
an eager step.  Where a capture fails (an operation the library cannot capture), the runner
says why in one warning and trains eagerly: the same results, without the speed.

Which nets: a plain :class:`xpnet.Sequential` with an xpnet optimizer.  Its Dropout layers
take masks drawn on the host exactly as the eager steps draw them (the same seeds and draw
counts), uploaded for up to :attr:`GraphSteps.MASK_STEPS` steps at a time and read by the
step at its row; batch normalization's running statistics are copied back into the arrays
the graph holds.  Other layers with a training mode or state are refused.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.metadata
import warnings

from . import speedups
from .backend import (
    _first_line,
    device_context,
    dropout_masks,
    dtype_name,
    namespace,
    native_device,
    resolve_device,
    to_device,
)
from .compiled import check_compilable, compile_mode, dropout_layers, state_arrays
from .layers import BatchNormalization, Dropout
from .runners import EagerSteps, Runner

__all__ = ["CAPTURERS", "CublasGemm", "GraphSteps", "graph_steps"]

# The layers with a training mode or state that the captured step takes: Dropout (its masks
# uploaded for the replays) and BatchNormalization (its statistics updated in place).
GRAPH_LAYERS = (Dropout, BatchNormalization)


class GraphSteps(Runner):
    """The Trainer's steps as one captured step replayed per batch (see the module docstring).

    Parameters
    ----------
    net : a plain :class:`xpnet.Sequential` (``xpnet.nets.runs_plain_steps``)
    optimizer : an xpnet optimizer (SGD, Momentum, AdaGrad, Adam)
    mode : ``True``, ``"epoch"`` or ``"step"`` (the same replays either way)
    batch_size : int
    capturer : the library's capture (:data:`CAPTURERS`): ``warm(fn)``, ``record(fn)`` ->
        graph, ``replay(graph)``, and ``poisoned(optimizer)``, a context under which the
        optimizer's Python attributes must not be read (a real graph cannot see them)
    """

    name = "CUDA graph"
    MASK_STEPS = 100  # steps of dropout masks uploaded at a time (a buffer per Dropout layer)

    def __init__(self, net, optimizer, mode, batch_size: int, capturer):
        super().__init__(net, optimizer, batch_size)
        self.mode = compile_mode(mode)
        check_compilable(net, optimizer, plain=True, allowed=GRAPH_LAYERS)
        self.capturer = capturer
        self.graph = None
        self._key = None  # what the graph was captured for (the arrays it writes and reads)
        self._eager = None
        self.failed = None  # why the step could not be captured (then it trains eagerly)
        self.drops, self.states = [], []  # (made with the buffers: _buffers)

    def check_device(self) -> None:
        """ValueError unless the net is (still) on a device whose graphs this runner captures."""
        device = resolve_device(self.net.device)
        if not self.capturer.takes(device):
            raise ValueError(f"compile=True: the net moved to {device.name!r} after its Trainer "
                             "was made for a CUDA device; make a new Trainer for it")

    # -- the captured step -------------------------------------------------------------------

    def _buffers(self, run) -> None:
        """The device arrays the step reads and writes besides the net's: made once per
        captured graph, at fixed addresses."""
        p = next(iter(self.net.params.values()))
        xp, device, b = namespace(p), native_device(p), self.batch_size
        full = run.x.shape[0] // b
        self.xp, self.device = xp, device
        self.order = xp.zeros((full * b,), dtype=xp.int64, device=device)
        self.position = xp.zeros((), dtype=xp.int64, device=device)
        self.offsets = xp.arange(b, dtype=xp.int64, device=device)
        self.step_count = xp.zeros((), dtype=xp.int64, device=device)
        self.losses = xp.zeros((full,), dtype=p.dtype, device=device)  # each step's, weighted
        self.step_ids = xp.arange(full, dtype=xp.int64, device=device)
        self.hyper = {k: xp.asarray(float(v), dtype=p.dtype, device=device)
                      for k, v in self.optimizer.hyperparameters().items()}
        self.proxy = copy.copy(self.optimizer)  # its _step reads the device hyperparameters
        for k, v in self.hyper.items():
            setattr(self.proxy, k, v)
        # Dropout: each layer's masks for up to MASK_STEPS steps, uploaded before the replays
        # (drawn on the host as the eager steps draw them), read at the step's row.
        self.drops = list(dropout_layers(self.net).values())
        self.mask_rows = min(full, self.MASK_STEPS) if self.drops else full
        self.segment = xp.zeros((), dtype=xp.int64, device=device)  # the first buffered step
        self.masks, self.mask_shapes = {}, {}
        # The layers' state arrays (batch norm's running statistics): a layer that rebinds
        # them has the new values copied back into the arrays the graph holds.
        self.states = list(state_arrays(self.net).values())

    def _mask(self, layer, x):
        """:data:`xpnet.speedups.dropout_mask` during the runner's steps: the layer's row of its
        buffer (NotImplemented, the host's draw, in the warm-up, which learns the shapes)."""
        buffer = self.masks.get(id(layer))
        if buffer is None:
            self.mask_shapes[id(layer)] = (tuple(x.shape), dtype_name(x.dtype))
            return NotImplemented
        row = self.xp.take(buffer, self.row, axis=0)
        return self.xp.reshape(row, tuple(x.shape))

    def _step(self, run) -> None:
        """One training step, reading and writing device arrays only (what is captured)."""
        xp, b, net = self.xp, self.batch_size, self.net
        ids = xp.take(self.order, self.position * b + self.offsets, axis=0)
        x, t = xp.take(run.x, ids, axis=0), xp.take(run.t, ids, axis=0)
        here = self.step_ids == self.position  # where this step's loss goes
        self.row = xp.reshape(self.position - self.segment, (1,))  # its dropout masks' row
        self.position += 1
        self.step_count += 1
        held = [(layer, attr, getattr(layer, attr)) for layer, attr in self.states]
        loss, grads = net.unchecked_loss_and_gradient(x, t)
        for layer, attr, array in held:
            if getattr(layer, attr) is not array:
                array[...] = getattr(layer, attr)
                setattr(layer, attr, array)
        state = self.optimizer.state
        for key, layer, attr, _ in net._table:
            p = getattr(layer, attr)
            p += self.proxy._step(xp, state.get(key, {}), grads[key], self.step_count)
        self.losses += xp.where(here, loss * b, xp.zeros_like(loss))

    def _held(self, run) -> tuple:
        """The arrays a graph bakes in, whose replacement means capturing again: the data,
        then what a step changes (weights, optimizer slots, layer state)."""
        params = tuple(getattr(layer, attr) for _, layer, attr, _ in self.net._table)
        slots = tuple(v for s in self.optimizer.state.values() for v in s.values())
        states = tuple(getattr(layer, attr) for layer, attr in self.states)
        return (run.x, run.t, *params, *slots, *states)

    def _capture(self, run) -> None:
        for key, layer, attr, _ in self.net._table:  # every slot made now, outside the pool
            self.optimizer.slots(key, getattr(layer, attr))
        self._buffers(run)
        held = self._held(run)
        saved = [self.xp.asarray(a, copy=True) for a in held[2:]]
        step = lambda: self._step(run)  # noqa: E731
        with self._undone(held, saved):  # the warm-up's step: the captured run starts where
            with speedups.using(dropout_mask=self._mask):  # the eager one is
                self.capturer.warm(step)
        for layer in self.drops:
            shape, dtype = self.mask_shapes[id(layer)]
            self.masks[id(layer)] = self.xp.zeros((self.mask_rows, *shape), dtype=dtype,
                                                  device=self.device)
        with self._undone(held):  # (recording ran the layers' Python once, computing nothing)
            with speedups.using(dropout_mask=self._mask):
                self.graph = self.capturer.record(step)
        self._key = held

    @contextlib.contextmanager
    def _undone(self, held: tuple, saved=None):
        """Afterwards (also after a failure), the draw counts as they were, each layer state
        attribute on the array the graph holds, and with ``saved`` the values of ``held[2:]``
        (weights, slots, state) put back."""
        draws = [layer.draws for layer in self.drops]
        try:
            yield
        finally:
            if saved is not None:
                for a, s in zip(held[2:], saved):
                    a[...] = s
            for layer, n in zip(self.drops, draws):
                layer.draws = n
            for (layer, attr), array in zip(self.states, held[len(held) - len(self.states):]):
                setattr(layer, attr, array)

    def _current(self, run) -> bool:
        """Whether the graph was captured for the arrays the net, optimizer and run hold now."""
        key = self._key
        return key is not None and len(key) == len(held := self._held(run)) and all(
            a is b for a, b in zip(key, held))

    def _upload_masks(self, start: int, count: int) -> None:
        """The dropout masks of steps ``start .. start + count - 1``, drawn as the eager steps
        draw them (each layer's next draws), into the buffers' first rows."""
        for layer in self.drops:
            host = dropout_masks(*self.mask_shapes[id(layer)], layer.ratio, layer.seed,
                                 layer.draws, count)
            self.masks[id(layer)][:count, ...] = to_device(host, self.net.device)
        self.segment[...] = start

    # -- the Runner ------------------------------------------------------------------------------

    def advance(self, run, order, start: int, stop: int) -> tuple:
        b, full = self.batch_size, run.x.shape[0] // self.batch_size
        if start >= full or self.failed is not None:
            return self._eager_step(run, order, start)
        with device_context(run.x):
            if not self._current(run):
                self._key = self.graph = None
                try:
                    self._capture(run)
                except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly
                    self.failed = _first_line(exc)
                    warnings.warn(f"compile=True on {self.net.device}: the training step could not "
                                  f"be captured as a CUDA graph ({self.failed}); training "
                                  "eagerly, with the same results", RuntimeWarning, stacklevel=2)
                    return self._eager_step(run, order, start)
            count = min(stop, full, start + self.mask_rows) - start
            self.order[...] = order[:full * b]
            self.position[...] = start
            self.step_count[...] = self.optimizer.steps
            self.losses[...] = 0
            for k, v in self.optimizer.hyperparameters().items():
                self.hyper[k][...] = float(v)
            draws = [layer.draws for layer in self.drops]
            if self.drops:
                self._upload_masks(start, count)
            done = 0
            try:
                with self.capturer.poisoned(self.optimizer), \
                        speedups.using(dropout_mask=self._mask):
                    for _ in range(count):
                        self.capturer.replay(self.graph)
                        done += 1
            finally:  # (also after a second Ctrl-C: the counts match the steps launched)
                self.optimizer.record_steps(done)
                for layer, n in zip(self.drops, draws):  # the draws the replays took
                    layer.draws = n + done
            return count, self.xp.asarray(self.losses[start:start + count], copy=True)

    def _eager_step(self, run, order, start: int) -> tuple:
        if self._eager is None or self._eager.version != self.version:
            self._eager = EagerSteps(self.net, self.optimizer, self.batch_size)
        return self._eager.advance(run, order, start, start + 1)


# -- the libraries' captures ------------------------------------------------------------------


class TorchCapture:
    """``torch.cuda.graph``: torch captures every operation the layers use (its cuBLAS calls
    included) on a side stream, into a private memory pool."""

    def __init__(self, device):
        import torch

        self.torch = torch

    @staticmethod
    def takes(device) -> bool:
        return device.library == "torch" and "cuda" in device.name.split(":")

    def warm(self, fn) -> None:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def record(self, fn):
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph):
            fn()
        return graph

    @staticmethod
    def replay(graph) -> None:
        graph.replay()

    @staticmethod
    def poisoned(optimizer):
        return contextlib.nullcontext()


class CupyCapture:
    """CuPy's stream capture, with the speed module's slots holding capture-safe pieces while
    it records (products through :class:`CublasGemm`, im2col, col2im and pooling as single
    kernels) and a memory pool of the graph's own."""

    WORKSPACE = 32 << 20  # bytes of cuBLAS workspace, allocated once (none during a capture)

    def __init__(self, device):
        import cupy

        self.cupy = cupy
        self.pool = cupy.cuda.MemoryPool()  # the graph's: nothing else allocates from it
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pieces = None  # made at the first warm-up: a failure there means training eagerly

    @staticmethod
    def takes(device) -> bool:
        return device.library == "cupy"

    @contextlib.contextmanager
    def _capturing(self):
        """On the side stream, after the work queued before, with the graph's pool and the
        capture-safe pieces in the slots."""
        cupy = self.cupy
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        if self.pieces is None:
            from ._cuda_kernels import CudaKernels

            workspace = cupy.empty(self.WORKSPACE, dtype=cupy.uint8)
            gemm = CublasGemm(load_cublas(), self.stream.ptr, cupy, workspace=workspace)
            self.pieces = capture_pieces(gemm, CudaKernels(cupy), cupy)
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream, \
                speedups.using(**self.pieces):
            yield

    def warm(self, fn) -> None:
        with self._capturing():
            fn()
        self.stream.synchronize()

    def record(self, fn):
        with self._capturing():
            self.stream.begin_capture()
            try:
                fn()
            finally:
                graph = self.stream.end_capture()  # (also after a failure: the stream is freed)
        return graph

    def replay(self, graph) -> None:
        graph.launch(stream=self.cupy.cuda.get_current_stream())

    @staticmethod
    def poisoned(optimizer):
        return contextlib.nullcontext()


# Array library -> its capture (a class with takes(device), warm, record, replay, poisoned).
CAPTURERS: dict = {"torch": TorchCapture, "cupy": CupyCapture}


def graph_steps(net, optimizer, mode, batch_size: int):
    """:class:`GraphSteps` for ``net`` where its device captures CUDA graphs, else
    NotImplemented (:data:`xpnet.speedups.graph_steps`)."""
    device = resolve_device(net.device)
    capture = CAPTURERS.get(device.library)
    if capture is None or not capture.takes(device):
        return NotImplemented
    check_compilable(net, optimizer, plain=True, allowed=GRAPH_LAYERS)  # (before the library)
    with device_context(device):
        return GraphSteps(net, optimizer, mode, batch_size, capture(device))


def capture_pieces(gemm, kernels, xp) -> dict:
    """The speed module's slots while CuPy captures: every product through ``gemm``
    (:class:`CublasGemm`), im2col, col2im and max pooling through ``kernels``
    (:class:`xpnet._cuda_kernels.CudaKernels`), and no fused SGD update (it calls CuPy's own
    cuBLAS wrapper)."""
    return {"matmul": gemm, "affine": lambda x, W, b: gemm(x, W) + b,
            "filters": lambda w, col, b: gemm(w, col) + xp.reshape(b, (-1, 1)),
            "im2col": kernels.im2col, "col2im": kernels.col2im, "max_pool": kernels.max_pool,
            "max_pool_backward": kernels.max_pool_backward, "sgd_step": None}


# -- cuBLAS on the capture stream -------------------------------------------------------------

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_CUBLAS_NAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")


def load_cublas():
    """The cuBLAS library CuPy loaded (by its soname, so the same copy), through ctypes."""
    errors = []
    for name in _CUBLAS_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError(f"cuBLAS could not be loaded through ctypes: {'; '.join(errors)}")


def _pointer(a) -> int:
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return interface["data"][0]


class CublasGemm:
    """Row-major products ``a @ b`` of 2-d float32 or float64 arrays through cuBLAS, on a
    handle of its own bound to one stream.

    CuPy's own cuBLAS wrappers re-bind their handle to the current stream on every call and
    refuse to while the stream captures; cuBLAS itself supports capture.  A row-major product
    C = A B is the column-major C^T = B^T A^T, so the operands go in swapped; an operand that
    is a transposed view (column-major) goes in as itself with the transpose flag, any other
    layout is copied first.  alpha and beta are host scalars (1, 0): baked into the graph.

    Parameters
    ----------
    lib : the cuBLAS library (ctypes), or an object with its functions (the tests' fake)
    stream : int
        The stream's handle (``cupy.cuda.Stream.ptr``).
    xp : the array module that makes the results (CuPy; NumPy for the tests' fake)
    workspace : a device array of bytes, optional
        cuBLAS's workspace, kept here: with it cuBLAS allocates nothing while capturing (as
        its documentation advises for CUDA graphs).
    """

    def __init__(self, lib, stream: int, xp, *, workspace=None):
        self.lib, self.xp, self.workspace = lib, xp, workspace
        self.handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(self.handle)))
        self._check("cublasSetStream_v2", lib.cublasSetStream_v2(self.handle,
                                                                 ctypes.c_void_p(stream)))
        if workspace is not None:
            self._check("cublasSetWorkspace_v2", lib.cublasSetWorkspace_v2(
                self.handle, ctypes.c_void_p(_pointer(workspace)),
                ctypes.c_size_t(workspace.nbytes)))

    @staticmethod
    def _check(what: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _operand(self, a):
        """``(op, leading dimension, array)``: how cuBLAS reads the row-major ``a``."""
        item = a.itemsize
        s0, s1 = a.strides[0] // item, a.strides[1] // item
        rows, cols = a.shape
        if (s1 == 1 or cols == 1) and s0 >= max(1, cols) and a.strides[0] % item == 0:
            return _OP_N, s0, a
        if (s0 == 1 or rows == 1) and s1 >= max(1, rows) and a.strides[1] % item == 0:
            return _OP_T, s1, a
        a = self.xp.ascontiguousarray(a)
        return _OP_N, max(1, cols), a

    def __call__(self, a, b):
        xp = self.xp
        if (a.ndim, b.ndim) != (2, 2) or a.dtype != b.dtype or a.dtype not in (
                xp.float32, xp.float64) or not isinstance(a, type(b)):
            return NotImplemented
        (m, k), n = a.shape, b.shape[1]
        out = xp.empty((m, n), dtype=a.dtype)
        if m == 0 or n == 0:
            return out
        if k == 0:
            out[...] = 0
            return out
        op_b, ldb, b = self._operand(b)
        op_a, lda, a = self._operand(a)
        single = a.dtype == xp.float32
        scalar = ctypes.c_float if single else ctypes.c_double
        alpha, beta = scalar(1.0), scalar(0.0)
        gemm = self.lib.cublasSgemm_v2 if single else self.lib.cublasDgemm_v2
        self._check("cublasSgemm_v2" if single else "cublasDgemm_v2", gemm(
            self.handle, ctypes.c_int(op_b), ctypes.c_int(op_a), ctypes.c_int(n), ctypes.c_int(m),
            ctypes.c_int(k), ctypes.byref(alpha), ctypes.c_void_p(_pointer(b)), ctypes.c_int(ldb),
            ctypes.c_void_p(_pointer(a)), ctypes.c_int(lda), ctypes.byref(beta),
            ctypes.c_void_p(_pointer(out)), ctypes.c_int(n)))
        return out


def describe_graphs() -> str:
    """A line for ``xpnet info``: what ``compile=True`` does on the CUDA devices here."""
    try:
        kernels = f"numba-cuda {importlib.metadata.version('numba-cuda')}"
    except importlib.metadata.PackageNotFoundError:
        kernels = ("numba-cuda is not installed (xpnet[cuda12] / xpnet[cuda13] bring it): "
                   "numba's own CUDA target where it finds a CUDA toolkit, else compile on "
                   "cuda trains eagerly, with a warning")
    return ("compile=True on cuda and torch:cuda: one captured CUDA graph per step; CuPy's "
            f"capture kernels: {kernels}")


def _describe_with_graphs(describe=speedups.describe):
    return lambda: [*(describe() if describe is not None else []), describe_graphs()]


speedups.graph_steps = graph_steps
speedups.describe = _describe_with_graphs()
