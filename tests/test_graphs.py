"""Compiled training on CUDA devices (xpnet._graphs), checked on the CPU.

* The runner's logic against a fake capture on NumPy that behaves as a CUDA graph does where
  it matters: recording does not run the step, a replay runs exactly what was recorded, and
  during replays the optimizer's Python attributes are poisoned (a real graph cannot read
  them: the step count and the hyperparameters must come from device arrays).
* The products on the capture stream (CublasGemm) against a fake cuBLAS that reads and writes
  the arrays' memory through the pointers, as column-major cuBLAS does.
* The kernels (xpnet._cuda_kernels) under numba's CUDA simulator against the portable code,
  to the bit (on a GPU run, ci/gpu-run, the same tests run them on the GPU).

tests/test_gpu.py runs the real captures on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import warnings

import numpy as np
import pytest
from test_train import spiral

import xpnet
from xpnet import _graphs, functional
from xpnet.backend import resolve_device


class FakeCapture:
    """A CUDA graph's behaviour on NumPy (see the module docstring)."""

    instances: list = []

    def __init__(self, device):
        self.warmed = self.recorded = self.replays = 0
        self.fail = None  # an exception record() raises (an operation that cannot be captured)
        self.crash_after = None  # a replay count after which replay raises (a crash)
        FakeCapture.instances.append(self)

    @staticmethod
    def takes(device) -> bool:
        return device.library == "numpy"

    def warm(self, fn) -> None:
        self.warmed += 1
        fn()

    def record(self, fn):
        if self.fail is not None:
            raise self.fail
        self.recorded += 1
        return fn  # recording runs nothing

    def replay(self, graph) -> None:
        self.replays += 1
        if self.crash_after is not None and self.replays > self.crash_after:
            raise RuntimeError("simulated crash")
        graph()

    @staticmethod
    @contextlib.contextmanager
    def poisoned(optimizer):
        saved = {k: getattr(optimizer, k) for k in (*optimizer.hyperparameters(), "steps")}
        for k in optimizer.hyperparameters():
            setattr(optimizer, k, math.nan)
        optimizer.steps = -(10**6)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(optimizer, k, v)


@pytest.fixture
def fake(monkeypatch):
    FakeCapture.instances = []
    monkeypatch.setitem(_graphs.CAPTURERS, "numpy", FakeCapture)
    return FakeCapture


def _fit(compile_, optimizer=xpnet.Adam, *, batch_size=32, epochs=3, net=None, lr=0.01, **kw):
    x, t = spiral()
    net = net or xpnet.MultiLayerNet([2, 32, 3], seed=0, dtype="float64")
    trainer = xpnet.Trainer(net, optimizer(lr), batch_size=batch_size, epochs=epochs, seed=5,
                            progress=False, compile=compile_, blas_threads=1, **kw)
    return net, trainer.fit(x, t, x[:50], t[:50])


def _close(a, b, tol=1e-9):
    for k in a.params:
        np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(b.params[k]), rtol=tol,
                                   atol=tol, err_msg=k)


@pytest.mark.parametrize("device", ["torch:cpu", "array_api_strict"])
def test_the_runner_works_on_every_library_that_updates_in_place(monkeypatch, device):
    """torch's arrays (what torch:cuda captures) and array_api_strict's: the runner's
    buffers, in-place updates and masks use the standard's operations only."""
    if device.startswith("torch"):
        pytest.importorskip("torch")
    monkeypatch.setitem(_graphs.CAPTURERS, device.split(":")[0], type(
        "Any", (FakeCapture,), {"takes": staticmethod(lambda d: True)}))
    x, t = spiral()
    nets, steps = [], []
    for compile_ in (True, False):
        net = xpnet.MultiLayerNet([2, 16, 3], seed=0, dtype="float64", device=device)
        history = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=32, epochs=2, seed=5,
                                progress=False, compile=compile_).fit(x, t)
        nets.append(net)
        steps.append(history.config["step"])
    assert steps[0] == "CUDA graph" and steps[1] != "CUDA graph"
    for k in nets[0].params:
        np.testing.assert_allclose(xpnet.to_numpy(nets[0].params[k]),
                                   xpnet.to_numpy(nets[1].params[k]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", [xpnet.SGD, xpnet.Momentum, xpnet.AdaGrad, xpnet.Adam])
@pytest.mark.parametrize("batch_size", [30, 32])  # 300 samples: 10 full batches; 9 and a last 12
def test_replayed_steps_equal_the_eager_steps(fake, optimizer, batch_size):
    net, history = _fit(True, optimizer, batch_size=batch_size)
    eager, reference = _fit(False, optimizer, batch_size=batch_size)
    _close(net, eager)
    assert history.config["step"] == "CUDA graph"
    for r, e in zip(history.records, reference.records):
        assert r["train_loss"] == pytest.approx(e["train_loss"], rel=1e-9)
        assert r["test_accuracy"] == e["test_accuracy"]
    (capture,) = fake.instances
    full = 300 // batch_size
    assert (capture.warmed, capture.recorded) == (1, 1)  # one capture for the whole fit
    assert capture.replays == full * 3
    assert history.config["train_samples"] == 300


def test_the_parameters_stay_the_arrays_the_graph_writes(fake):
    net = xpnet.MultiLayerNet([2, 16, 3], seed=0, dtype="float64")
    before = dict(net.params)
    opt = xpnet.Momentum(0.05)
    _fit(True, lambda lr: opt, net=net)
    assert all(net.params[k] is before[k] for k in before)
    slots = {k: dict(s) for k, s in opt.state.items()}
    _fit(True, lambda lr: opt, net=net, epochs=1)
    assert all(opt.state[k][s] is slots[k][s] for k in slots for s in slots[k])


def test_a_schedule_changes_the_rate_between_replays(fake):
    schedule = xpnet.schedules.CosineDecay(min_factor=0.1)
    net, history = _fit(True, xpnet.SGD, lr=0.2, lr_schedule=schedule, epochs=3)
    eager, reference = _fit(False, xpnet.SGD, lr=0.2, lr_schedule=schedule, epochs=3)
    _close(net, eager)
    assert [r["lr"] for r in history.records] == [r["lr"] for r in reference.records]


def test_replaced_parameters_are_captured_again(fake):
    x, t = spiral()
    nets = []
    for compile_ in (True, False):
        net = xpnet.MultiLayerNet([2, 32, 3], seed=0, dtype="float64")
        trainer = xpnet.Trainer(net, xpnet.Momentum(0.05), batch_size=32, epochs=1, seed=5,
                                progress=False, compile=compile_, blas_threads=1)
        trainer.fit(x, t)
        # New arrays (as a loaded checkpoint or EarlyStopping's restore give): a graph
        # replayed now would still write the old ones.
        net.params["W1"] = np.array(net.params["W1"])
        trainer.optimizer.state["b1"]["v"] = np.array(trainer.optimizer.state["b1"]["v"])
        before = np.array(net.params["W1"])
        trainer.fit(x, t)
        assert not np.array_equal(before, net.params["W1"])
        nets.append(net)
    _close(*nets)
    (capture,) = fake.instances
    assert capture.recorded == 2


def test_a_crash_mid_replay_resumes_from_the_checkpoint_to_the_same_weights(fake, tmp_path):
    ref, _ = _fit(True, epochs=3, checkpoint=tmp_path / "ref.npz", checkpoint_every=4)
    ckpt = tmp_path / "run.npz"
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], seed=0, dtype="float64")
    trainer = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=32, epochs=3, seed=5,
                            progress=False, compile=True, checkpoint=ckpt, checkpoint_every=4,
                            blas_threads=1)
    trainer.compiled_steps.capturer.crash_after = 14
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(x, t, x[:50], t[:50])
    net = xpnet.MultiLayerNet([2, 32, 3], seed=99, dtype="float64")
    trainer = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=32, epochs=3, seed=5,
                            progress=False, compile=True, checkpoint=ckpt, checkpoint_every=4,
                            blas_threads=1)
    trainer.fit(x, t, x[:50], t[:50], resume=ckpt)
    _close(net, ref, tol=0)


def test_an_interrupted_advance_counts_the_steps_it_launched(fake):
    """A second Ctrl-C (or a crash) between two replays: the optimizer's step count and the
    dropout draws say how many steps the weights took, so the objects stay consistent."""
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 16, 3], seed=0, use_dropout=True)
    opt = xpnet.Adam(0.01)
    trainer = xpnet.Trainer(net, opt, batch_size=30, epochs=1, progress=False, compile=True)
    trainer.compiled_steps.capturer.crash_after = 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(x, t)
    drops = [layer for layer in net.layers.values() if isinstance(layer, xpnet.Dropout)]
    assert opt.steps == 4 and [layer.draws for layer in drops] == [4]


def test_a_divergence_is_caught_where_the_losses_are_read(fake):
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError) as graph:
        _fit(True, xpnet.SGD, lr=1e200)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError) as eager:
        _fit(False, xpnet.SGD, lr=1e200)
    assert str(graph.value) == str(eager.value)


def test_a_step_that_cannot_be_captured_trains_eagerly_with_one_warning(fake, monkeypatch):
    real = FakeCapture.__init__

    def failing(self, device):
        real(self, device)
        self.fail = NotImplementedError("calling cuBLAS API during stream capture is currently "
                                        "unsupported\nsecond line")

    monkeypatch.setattr(FakeCapture, "__init__", failing)
    with pytest.warns(RuntimeWarning, match=r"could not be captured as a CUDA graph "
                      r"\(NotImplementedError: calling cuBLAS API .*unsupported\); training "
                      "eagerly") as caught:
        net, _ = _fit(True, xpnet.Momentum)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    eager, _ = _fit(False, xpnet.Momentum)
    _close(net, eager)


@pytest.mark.parametrize("kind", ["dropout", "batchnorm", "both"])
@pytest.mark.parametrize("batch_size", [30, 32])
def test_dropout_and_batch_norm_replay_as_the_eager_steps_run_them(fake, monkeypatch, kind,
                                                                   batch_size):
    """The masks are the eager steps' (the same draws, uploaded a few steps at a time), and
    the running statistics end where the eager ones do."""
    monkeypatch.setattr(_graphs.GraphSteps, "MASK_STEPS", 4)  # several uploads per epoch
    options = {"use_dropout": kind != "batchnorm", "use_batchnorm": kind != "dropout"}
    x, t = spiral()
    nets, drawn = [], []
    for compile_ in (True, False):
        net = xpnet.MultiLayerNet([2, 16, 16, 3], seed=0, dtype="float64", **options)
        history = xpnet.Trainer(net, xpnet.Momentum(0.05), batch_size=batch_size, epochs=2,
                                seed=5, progress=False, compile=compile_,
                                blas_threads=1).fit(x, t, x[:50], t[:50])
        nets.append(net)
        drawn.append([(layer.seed, layer.draws) for layer in net.layers.values()
                      if isinstance(layer, xpnet.Dropout)])
        assert history.config["step"] == ("CUDA graph" if compile_ else "layers")
    _close(*nets)
    assert drawn[0] == drawn[1]
    for (layer, attr), (other, _) in zip(nets[0]._state.values(), nets[1]._state.values()):
        np.testing.assert_allclose(np.asarray(getattr(layer, attr)),
                                   np.asarray(getattr(other, attr)), rtol=1e-9, atol=1e-12)


def test_a_failed_warm_up_leaves_the_net_as_it_was(fake, monkeypatch):
    """A step that fails in the warm-up after its forward pass changed the running statistics
    (rebinding them) and drew a dropout mask: all of it is undone, and the eager steps that
    follow train as an eager run does."""
    x, t = spiral()
    nets = []
    for compile_ in (True, False):
        net = xpnet.MultiLayerNet([2, 16, 3], seed=0, dtype="float64", use_dropout=True,
                                  use_batchnorm=True)
        if compile_:
            real, calls = net.unchecked_loss_and_gradient, []

            def failing(x, t, real=real, calls=calls):
                calls.append(1)
                out = real(x, t)
                if len(calls) == 1:
                    raise NotImplementedError("not capturable")
                return out

            monkeypatch.setattr(net, "unchecked_loss_and_gradient", failing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=32, epochs=2, seed=5,
                          progress=False, compile=compile_, blas_threads=1).fit(x, t)
        assert len([w for w in caught if "not capturable" in str(w.message)]) == int(compile_)
        nets.append(net)
    _close(*nets)
    assert [layer.draws for layer in nets[0].layers.values()
            if isinstance(layer, xpnet.Dropout)] == [
        layer.draws for layer in nets[1].layers.values() if isinstance(layer, xpnet.Dropout)]
    for (layer, attr), (other, _) in zip(nets[0]._state.values(), nets[1]._state.values()):
        np.testing.assert_allclose(np.asarray(getattr(layer, attr)),
                                   np.asarray(getattr(other, attr)), rtol=1e-12, atol=1e-14)


def test_nets_a_graph_cannot_capture_are_refused_before_training(fake):
    class Noisy(xpnet.Relu):  # a training mode of its own: the graph cannot know what it does
        has_train_mode = True

        def forward(self, x, train=True):
            return super().forward(x)

    net = xpnet.Sequential([xpnet.Affine(np.ones((2, 3)), np.zeros(3)), Noisy()])
    with pytest.raises(ValueError, match="does not support nets with Noisy"):
        xpnet.Trainer(net, xpnet.SGD(), compile=True)

    class Logged(xpnet.MultiLayerNet):
        def train_step(self, x, t, optimizer, **kw):
            return super().train_step(x, t, optimizer, **kw)

    with pytest.raises(TypeError, match="needs an xpnet Sequential net .* got Logged"):
        xpnet.Trainer(Logged([2, 8, 3]), xpnet.SGD(), compile=True)


def test_without_a_capture_compile_names_jax_and_the_cuda_devices():
    with pytest.raises(ValueError, match=r"compile=True needs a backend that compiles: jax .*"
                       r"or a CUDA device of CuPy or torch \('cuda', 'torch:cuda'\)"):
        xpnet.Trainer(xpnet.TwoLayerNet(4, 3, 2), xpnet.SGD(), compile=True)


def test_info_says_what_compile_does_on_cuda_devices(capsys, monkeypatch):
    from xpnet.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compile=True on cuda and torch:cuda: one captured CUDA graph per step" in out
    assert "CuPy's capture kernels: numba-cuda " in out

    def missing(name):
        raise _graphs.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_graphs.importlib.metadata, "version", missing)
    assert "numba-cuda is not installed" in _graphs.describe_graphs()


def test_only_cuda_devices_of_cupy_and_torch_are_captured():
    takes = {name: capture.takes for name, capture in _graphs.CAPTURERS.items()}
    assert takes["torch"](resolve_device("torch:cpu")) is False
    assert _graphs.graph_steps(xpnet.TwoLayerNet(4, 3, 2), xpnet.SGD(), True, 10) \
        is NotImplemented


# -- products on the capture stream --------------------------------------------------------------


class FakeCublas:
    """cuBLAS's gemm on raw pointers, column-major, as the library computes it."""

    def __init__(self):
        self.calls = []

    def cublasCreate_v2(self, handle_ref):
        handle_ref._obj.value = 1234
        return 0

    def cublasSetStream_v2(self, handle, stream):
        self.stream = stream.value
        return 0

    def cublasSetWorkspace_v2(self, handle, pointer, size):
        self.workspace = (pointer.value, size.value)
        return 0

    def _gemm(self, ctype, handle, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        ta, tb, m, n, k = ta.value, tb.value, m.value, n.value, k.value
        lda, ldb, ldc = lda.value, ldb.value, ldc.value
        self.calls.append((ta, tb, m, n, k, lda, ldb, ldc))

        def matrix(ptr, rows, cols, ld):  # column-major rows x cols at ptr, leading dim ld
            buffer = (ctype * (ld * (cols - 1) + rows)).from_address(ptr.value)
            flat = np.ctypeslib.as_array(buffer)
            return np.lib.stride_tricks.as_strided(
                flat, (rows, cols), (flat.itemsize, flat.itemsize * ld))

        opa = matrix(a, *((k, m) if ta else (m, k)), lda)
        opb = matrix(b, *((n, k) if tb else (k, n)), ldb)
        out = matrix(c, m, n, ldc)
        out[...] = alpha._obj.value * ((opa.T if ta else opa) @ (opb.T if tb else opb)) + \
            (beta._obj.value * out if beta._obj.value else 0)
        return 0

    def cublasSgemm_v2(self, *args):
        return self._gemm(ctypes.c_float, *args)

    def cublasDgemm_v2(self, *args):
        return self._gemm(ctypes.c_double, *args)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cublas_gemm_maps_row_major_products_onto_cublas(dtype):
    lib = FakeCublas()
    workspace = np.empty(1 << 10, np.uint8)
    gemm = _graphs.CublasGemm(lib, 777, np, workspace=workspace)
    assert lib.stream == 777 and gemm.handle.value == 1234
    assert lib.workspace == (workspace.ctypes.data, 1 << 10) and gemm.workspace is workspace
    rng = np.random.default_rng(0)
    big = rng.standard_normal((9, 11)).astype(dtype)
    operands = {  # C-contiguous, a transposed view, a strided slice (copied), a column
        "c": rng.standard_normal((5, 7)).astype(dtype),
        "t": np.asarray(big[:7, :5].copy()).T,
        "slice": big[::2, 1:8],
        "column": rng.standard_normal((5, 1)).astype(dtype),
    }
    for a in operands.values():
        for b in (rng.standard_normal((a.shape[1], 4)).astype(dtype),
                  np.asarray(rng.standard_normal((3, a.shape[1])).astype(dtype)).T):
            keep = a.copy(), b.copy()
            out = gemm(a, b)
            tol = 1e-5 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(out, a.astype("float64") @ b, rtol=tol, atol=tol)
            assert out.dtype == dtype and out.flags.c_contiguous
            assert np.array_equal(a, keep[0]) and np.array_equal(b, keep[1])  # inputs untouched
    assert {call[:2] for call in lib.calls} >= {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert np.array_equal(gemm(np.ones((3, 0), dtype), np.ones((0, 2), dtype)), np.zeros((3, 2)))
    assert gemm(np.ones((0, 4), dtype), np.ones((4, 2), dtype)).shape == (0, 2)
    assert gemm(np.ones((2, 2), "float32"), np.ones((2, 2), "float64")) is NotImplemented
    assert gemm(np.ones(3, dtype), np.ones((3, 2), dtype)) is NotImplemented


def test_cublas_errors_name_the_call():
    lib = FakeCublas()
    lib.cublasSgemm_v2 = lambda *args: 13  # CUBLAS_STATUS_EXECUTION_FAILED
    gemm = _graphs.CublasGemm(lib, 0, np)
    with pytest.raises(RuntimeError, match="cublasSgemm_v2 failed with cuBLAS status 13"):
        gemm(np.ones((2, 2), "float32"), np.ones((2, 2), "float32"))


def test_the_layers_products_go_through_the_matmul_slot(monkeypatch):
    """During a CuPy capture every product must reach the slot: none may use @ directly."""
    calls = []
    monkeypatch.setattr(xpnet.speedups, "matmul", lambda a, b: calls.append(1) or a @ b)
    monkeypatch.setattr(xpnet.speedups, "affine", None)
    monkeypatch.setattr(xpnet.speedups, "filters", None)
    net = xpnet.SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3,
                                                               "pad": 0, "stride": 1},
                              hidden_size=4, output_size=3, dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    net.loss_and_gradient(x, np.array([0, 2]))
    assert len(calls) == 3 + 3 * 2 - 1  # conv: 3; two affines: 3 each, less the first dx
    assert functional.matmul(np.eye(2), np.ones((2, 2))).tolist() == [[1, 1], [1, 1]]


# -- the kernels, under numba's CUDA simulator (or on the GPU) -----------------------------------


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from xpnet._cuda_kernels import CudaKernels

    return CudaKernels()


WINDOWS = [(3, 3, 1, 1), (2, 2, 2, 0), (3, 2, 2, 1), (5, 5, 1, 0), (2, 3, 1, 0), (3, 3, 3, 1)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_im2col_and_col2im_kernels_give_the_portable_bits(kernels, dtype, monkeypatch):
    monkeypatch.setattr(xpnet.speedups, "im2col", None)
    monkeypatch.setattr(xpnet.speedups, "col2im", None)
    rng = np.random.default_rng(1)
    for fh, fw, stride, pad in WINDOWS:
        x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
        col = kernels.im2col(x, fh, fw, stride, pad)
        assert np.array_equal(col, functional.im2col(np, x, fh, fw, stride, pad))
        dcol = rng.standard_normal(col.shape).astype(dtype)
        dcol[0, :3] = [np.nan, -0.0, np.inf]
        got = kernels.col2im(dcol, x.shape, fh, fw, stride, pad)
        want = functional.col2im(np, dcol, x.shape, fh, fw, stride, pad)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_max_pool_kernels_give_the_portable_values_offsets_and_gradients(kernels, dtype,
                                                                         monkeypatch):
    monkeypatch.setattr(xpnet.speedups, "max_pool", None)
    monkeypatch.setattr(xpnet.speedups, "max_pool_backward", None)
    rng = np.random.default_rng(2)
    for ph, pw, stride, pad in [(2, 2, 2, 0), (3, 3, 1, 1), (3, 3, 2, 1), (2, 3, 1, 1),
                                (1, 1, 1, 0)]:
        x = rng.standard_normal((2, 2, 6, 7)).astype(dtype)
        x[0, 0, 1, 1] = x[0, 1, 2, 2] = np.nan  # the first NaN of a window wins
        x[1, 0, :2, :3] = 0.0
        x[1, 0, 0, 1] = -0.0  # ties keep the later's bits
        x[1, 1] = -np.inf  # a padding cell never wins, even over -inf
        x[0, 0, 4:, 4:] = 1.5  # ties of equal values: the first offset
        pool = xpnet.Pooling(ph, pw, stride=stride, pad=pad)
        out = pool.forward(x)
        got, arg = kernels.max_pool(x, ph, pw, stride, pad, *out.shape[2:])
        assert np.array_equal(got, out, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(out))
        assert arg.dtype == np.int32 and np.array_equal(arg, pool.arg)
        dout = rng.standard_normal(out.shape).astype(dtype)
        assert np.array_equal(kernels.max_pool_backward(dout, arg, x.shape, ph, pw, stride, pad),
                              pool.backward(dout))


class PiecesCapture(FakeCapture):
    """The fake capture with CuPy's capture-time pieces in the slots while it warms up and
    records (the products through CublasGemm on the fake cuBLAS, the kernels under the
    simulator), as CupyCapture puts them there."""

    def __init__(self, device):
        super().__init__(device)
        from xpnet._cuda_kernels import CudaKernels

        self.lib = FakeCublas()
        self.pieces = _graphs.capture_pieces(_graphs.CublasGemm(self.lib, 0, np), CudaKernels(),
                                             np)

    def warm(self, fn):
        with xpnet.speedups.using(**self.pieces):
            super().warm(fn)

    def record(self, fn):
        super().record(fn)
        return lambda: _replayed(fn, self.pieces)  # what was recorded: the step with the pieces


def _replayed(fn, pieces):
    with xpnet.speedups.using(**pieces):
        fn()


@pytest.mark.parametrize("model", ["convnet", "deepconvnet"])
def test_conv_nets_train_through_cupys_capture_pieces(kernels, monkeypatch, model):
    """SimpleConvNet and DeepConvNet (its dropout too) with every product through CublasGemm
    and im2col, col2im and pooling through the kernels (as during CuPy's capture) train as
    the eager steps do."""
    monkeypatch.setitem(_graphs.CAPTURERS, "numpy", PiecesCapture)
    FakeCapture.instances = []
    rng = np.random.default_rng(0)
    n, size = (12, 6) if model == "convnet" else (6, 8)
    x, t = rng.standard_normal((n, 1, size, size)), rng.integers(0, 3, n)
    nets = []
    for compile_ in (True, False):
        if model == "convnet":
            net = xpnet.SimpleConvNet(input_dim=(1, 6, 6), conv_param={
                "filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=5,
                output_size=3, dtype="float64", seed=0)
        else:
            conv = {"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1}
            net = xpnet.DeepConvNet(input_dim=(1, 8, 8), **{f"conv_param_{i}": conv
                                                            for i in range(1, 7)},
                                    hidden_size=4, output_size=3, dtype="float64", seed=0)
        xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=n // 3, epochs=1, seed=1,
                      progress=False, compile=compile_, blas_threads=1).fit(x, t)
        nets.append(net)
    _close(*nets)
    (capture,) = FakeCapture.instances
    assert capture.lib.calls and capture.replays == 3


class FakeCupy:
    """The parts of CuPy that CupyCapture calls, recording the order of the calls."""

    def __init__(self):
        self.log, self.current = [], []
        fake = self

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = 4242 if non_blocking else 0

            def __enter__(self):
                fake.current.append(self)
                fake.log.append(("enter", self.ptr))

            def __exit__(self, *exc):
                fake.current.pop()
                fake.log.append(("exit", self.ptr))

            def record(self):
                fake.log.append(("record", self.ptr))
                return "event"

            def wait_event(self, event):
                fake.log.append(("wait", self.ptr, event))

            def synchronize(self):
                fake.log.append(("synchronize", self.ptr))

            def begin_capture(self):
                fake.log.append(("begin", self.ptr))

            def end_capture(self):
                fake.log.append(("end", self.ptr))
                return Graph()

        class Graph:
            def launch(self, stream=None):
                fake.log.append(("launch", stream.ptr))

        class Pool:
            def malloc(self, size):  # pragma: no cover - nothing allocates through the fake
                raise AssertionError

        @contextlib.contextmanager
        def using_allocator(malloc):
            fake.log.append(("allocator", type(malloc.__self__).__name__))
            yield
            fake.log.append(("allocator", None))

        null = Stream()
        self.cuda = type("cuda", (), {
            "Stream": Stream, "MemoryPool": Pool, "using_allocator": staticmethod(using_allocator),
            "get_current_stream": staticmethod(lambda: fake.current[-1] if fake.current
                                               else null)})
        self.empty, self.uint8, self.reshape = np.empty, np.uint8, np.reshape


def test_cupys_capture_orders_its_calls_and_fills_the_slots(kernels, monkeypatch):
    cupy = FakeCupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", cupy)
    lib = FakeCublas()
    monkeypatch.setattr(_graphs, "load_cublas", lambda: lib)
    capture = _graphs.CupyCapture(resolve_device("cpu"))
    seen = {}

    def step():
        seen.update(matmul=xpnet.speedups.matmul, im2col=xpnet.speedups.im2col,
                    sgd=xpnet.speedups.sgd_step, stream=cupy.cuda.get_current_stream().ptr)
        cupy.log.append("step")

    before = xpnet.speedups.im2col
    capture.warm(step)
    assert isinstance(seen["matmul"], _graphs.CublasGemm) and seen["sgd"] is None
    assert seen["matmul"].lib is lib and lib.stream == 4242 and lib.workspace[1] == 32 << 20
    assert seen["im2col"] == capture.pieces["im2col"] and seen["stream"] == 4242
    assert xpnet.speedups.im2col is before  # the slots are given back
    assert cupy.log == [("record", 0), ("wait", 4242, "event"), ("allocator", "Pool"),
                        ("enter", 4242), "step", ("exit", 4242), ("allocator", None),
                        ("synchronize", 4242)]
    cupy.log.clear()
    graph = capture.record(step)
    assert cupy.log == [("record", 0), ("wait", 4242, "event"), ("allocator", "Pool"),
                        ("enter", 4242), ("begin", 4242), "step", ("end", 4242),
                        ("exit", 4242), ("allocator", None)]
    cupy.log.clear()
    capture.replay(graph)
    assert cupy.log == [("launch", 0)]  # on the current stream, after what came before

    def failing():
        raise NotImplementedError("not capturable")

    cupy.log.clear()
    with pytest.raises(NotImplementedError):
        capture.record(failing)
    assert ("end", 4242) in cupy.log  # the capture is ended: the stream stays usable
    assert xpnet.speedups.matmul is None


def test_torchs_capture_warms_up_on_a_side_stream_then_records(monkeypatch):
    log = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    main = Stream("main")

    @contextlib.contextmanager
    def on(stream):
        log.append(("on", stream.name))
        yield
        log.append(("off", stream.name))

    class CUDAGraph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def graph(g):
        log.append("capture")
        yield
        log.append("captured")

    cuda = type("cuda", (), {"Stream": Stream, "current_stream": staticmethod(lambda: main),
                             "stream": staticmethod(on), "CUDAGraph": CUDAGraph,
                             "graph": staticmethod(graph)})
    monkeypatch.setitem(__import__("sys").modules, "torch", type("torch", (), {"cuda": cuda}))
    capture = _graphs.TorchCapture(resolve_device("cpu"))
    capture.warm(lambda: log.append("step"))
    assert log == [("wait", "side", "main"), ("on", "side"), "step", ("off", "side"),
                   ("wait", "main", "side")]
    log.clear()
    g = capture.record(lambda: log.append("step"))
    capture.replay(g)
    assert log == ["capture", "step", "captured", "replay"]
