"""CuPy (and torch) on real GPUs: what the CPU suite can only check by emulation
(``test_device_context``) or with fakes (``test_graphs``: the captured CUDA graphs).  Run by
``bash ci/gpu`` and ``bash ci/gpu-run``; here every test skips without a CUDA GPU (and fails
under XPNET_REQUIRE_GPU, which they set).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from conftest import required_gpu_devices

import xpnet
from xpnet import _fast
from xpnet.backend import (
    BACKENDS,
    BackendUnavailableError,
    device_of,
    is_gpu_device,
    self_test,
    to_device,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    try:
        count = BACKENDS["cupy"].gpu_count()
    except BackendUnavailableError as exc:
        count, reason = 0, str(exc)
    else:
        reason = "CuPy sees no CUDA GPU"
    if count == 0:
        if "cuda" in required_gpu_devices():
            pytest.fail(f"XPNET_REQUIRE_GPU={os.environ['XPNET_REQUIRE_GPU']} but {reason}")
        pytest.skip(reason)
    import cupy

    return cupy


def _data(n=64, d=20, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def test_self_test_passes_on_every_gpu(cupy):
    for entry in xpnet.backend.available_backends():
        for name in entry["devices"]:
            if is_gpu_device(name):
                self_test(name)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_cuda_n_computes_on_gpu_n(cupy, optimizer, tmp_path):
    """Each GPU in turn, with another one current (where there are two): every result on it,
    and no CuPy PerformanceWarning (arrays made on the wrong GPU) on the way."""
    count = cupy.cuda.runtime.getDeviceCount()
    x, t = _data()
    for index in range(count):
        name = f"cuda:{index}"
        with cupy.cuda.Device((index + 1) % count), warnings.catch_warnings():
            warnings.simplefilter("error")
            net = xpnet.MultiLayerNet([20, 16, 5], device=name)
            xd, td = to_device(x, name, dtype="float32"), to_device(t, name, dtype="int64")
            opt = getattr(xpnet, optimizer)(lr=0.05)
            first = float(net.loss(xd, td))
            for _ in range(5):
                net.train_step(xd, td, opt)
            assert float(net.loss(xd, td)) < first
            opt.update(net.params, net.gradient(xd, td))
            history = xpnet.Trainer(net, opt, batch_size=16, epochs=1, progress=False).fit(
                x, t, x, t)
            assert history.records[-1]["test_accuracy"] is not None
            assert xpnet.check_gradients(net.to(name, "float64"), to_device(x[:3], name),
                                         to_device(t[:3], name, dtype="int64"),
                                         mode="sampled").ok
            net.save(tmp_path / "net.npz")
            again = xpnet.MultiLayerNet.load(tmp_path / "net.npz", device=name)
            assert cupy.cuda.runtime.getDevice() == (index + 1) % count  # restored after calls
        for value in [*net.params.values(), *again.params.values(), xd, td]:
            assert device_of(value).name == name


def test_fused_sgd_is_one_cublas_gemm_and_equals_the_plain_update(cupy, monkeypatch):
    real = _fast._cupy_gemm()
    assert real is not None, "cupy.cublas.gemm could not be loaded"
    calls = []
    monkeypatch.setitem(_fast._state, "cupy",
                        lambda *args, **kwargs: calls.append(kwargs["beta"]) or real(*args, **kwargs))
    x, t = _data(n=128, d=64)
    fused, plain = (xpnet.MultiLayerNet([64, 256, 5], device="cuda") for _ in range(2))

    class PlainSGD(xpnet.SGD):  # a subclass takes the unfused path
        pass

    xd, td = to_device(x, "cuda", dtype="float32"), to_device(t, "cuda", dtype="int64")
    W1 = fused.params["W1"]
    for _ in range(3):
        fused.train_step(xd, td, xpnet.SGD(lr=0.1))
        plain.train_step(xd, td, PlainSGD(lr=0.1))
    assert calls and set(calls) == {1.0}  # W += -lr x^T dout with beta = 1
    assert fused.params["W1"] is W1  # updated in place
    for name in fused.params:
        np.testing.assert_allclose(xpnet.to_numpy(fused.params[name]),
                                   xpnet.to_numpy(plain.params[name]), rtol=1e-5, atol=1e-6)


def test_to_device_casts_on_the_host_before_uploading(cupy, monkeypatch):
    import array_api_compat.cupy as ccp

    uploaded = []
    real = ccp.asarray
    monkeypatch.setattr(ccp, "asarray", lambda obj, **kw: uploaded.append(obj.dtype) or real(obj, **kw))
    out = to_device(np.linspace(0, 1, 1000), "cuda", dtype="float32")
    assert uploaded == [np.dtype("float32")] and out.dtype == cupy.float32
    np.testing.assert_allclose(out.get(), np.linspace(0, 1, 1000).astype(np.float32))


def test_gradcheck_takes_a_cupy_dout(cupy):
    W = to_device(np.ones((4, 3)), "cuda", dtype="float64")
    b = to_device(np.zeros(3), "cuda", dtype="float64")
    x = to_device(np.random.default_rng(0).standard_normal((2, 4)), "cuda", dtype="float64")
    dout = cupy.asarray(np.arange(6.0).reshape(2, 3))
    assert xpnet.check_layer(xpnet.Affine(W, b), x, dout=dout).ok


def test_info_check_passes_here(cupy, capsys):
    from xpnet.cli import main

    assert main(["info", "--require-gpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0" in out and "FAILED" not in out


# -- compile=True on CUDA devices: captured CUDA graphs (xpnet._graphs) --------------------------


def _cuda_device(spec: str) -> str:
    """``spec`` when it resolves here, else a skip (a failure where XPNET_REQUIRE_GPU names it)."""
    try:
        xpnet.backend.resolve_device(spec)
    except BackendUnavailableError as exc:
        if spec in required_gpu_devices():
            pytest.fail(f"XPNET_REQUIRE_GPU={os.environ['XPNET_REQUIRE_GPU']} but {spec}: {exc}")
        pytest.skip(f"{spec}: {exc}")
    return spec


def _small_net(model: str, device: str):
    conv = {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}
    if model == "mlp":
        return xpnet.MultiLayerNet([64, 32, 5], seed=0, device=device, dtype="float64")
    if model == "mlp-dropout-batchnorm":
        return xpnet.MultiLayerNet([64, 32, 32, 5], seed=0, device=device, dtype="float64",
                                   use_dropout=True, use_batchnorm=True)
    if model == "convnet":
        return xpnet.SimpleConvNet(input_dim=(1, 8, 8), conv_param={**conv, "filter_size": 5,
                                                                    "pad": 0},
                                   hidden_size=16, output_size=5, seed=0, device=device,
                                   dtype="float64")
    return xpnet.DeepConvNet(input_dim=(1, 8, 8), **{f"conv_param_{i}": conv for i in range(1, 7)},
                             hidden_size=16, output_size=5, seed=0, device=device, dtype="float64")


@pytest.mark.parametrize("device", ["cuda", "torch:cuda"])
@pytest.mark.parametrize("model", ["mlp", "mlp-dropout-batchnorm", "convnet", "deepconvnet"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_compile_replays_one_captured_graph_with_the_eager_results(device, model, optimizer):
    """No capture failure (a warning is an error here), one graph per fit, and the eager
    steps' weights up to rounding (float64: cuBLAS's own order of additions)."""
    device = _cuda_device(device)
    rng = np.random.default_rng(0)
    shape = (64,) if model.startswith("mlp") else (1, 8, 8)
    x, t = rng.standard_normal((250, *shape)), rng.integers(0, 5, 250)  # 2 full batches + 50
    nets = []
    for compile_ in (True, False):
        net = _small_net(model, device)
        trainer = xpnet.Trainer(net, getattr(xpnet, optimizer)(0.01), batch_size=100, epochs=3,
                                seed=3, progress=False, compile=compile_)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            history = trainer.fit(x, t, x[:40], t[:40])
        assert history.config["step"] == ("CUDA graph" if compile_ else "layers")
        nets.append(net)
    for name in nets[0].params:
        np.testing.assert_allclose(xpnet.to_numpy(nets[0].params[name]),
                                   xpnet.to_numpy(nets[1].params[name]), rtol=1e-7, atol=1e-10,
                                   err_msg=name)


def test_cublas_gemm_on_the_capture_stream_equals_cupys_products(cupy):
    from xpnet import _graphs

    stream = cupy.cuda.Stream(non_blocking=True)
    gemm = _graphs.CublasGemm(_graphs.load_cublas(), stream.ptr, cupy,
                              workspace=cupy.empty(1 << 22, dtype=cupy.uint8))
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        a = cupy.asarray(rng.standard_normal((37, 19)).astype(dtype))
        b = cupy.asarray(rng.standard_normal((19, 23)).astype(dtype))
        for left, right in [(a, b), (a.T.copy().T, b), (a, b.T.copy().T), (a[::2], b[:, 1:])]:
            with stream:
                got = gemm(left, right)
            stream.synchronize()
            tol = 1e-5 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(got.get(), (left @ right).get(), rtol=tol, atol=tol)
    # Captured and replayed: the graph computes the product again from what the inputs hold.
    a = cupy.asarray(rng.standard_normal((8, 8)).astype("float32"))
    with stream:
        stream.begin_capture()
        out = gemm(a, a)
        graph = stream.end_capture()
    a[...] = cupy.asarray(rng.standard_normal((8, 8)).astype("float32"))
    graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(out.get(), (a @ a).get(), rtol=1e-5, atol=1e-5)


def test_the_capture_kernels_equal_the_portable_code_on_cupy(cupy, monkeypatch):
    from xpnet import functional
    from xpnet._cuda_kernels import CudaKernels

    kernels = CudaKernels(cupy)
    monkeypatch.setattr(xpnet.speedups, "im2col", None)
    monkeypatch.setattr(xpnet.speedups, "col2im", None)
    rng = np.random.default_rng(1)
    for fh, fw, stride, pad in [(3, 3, 1, 1), (5, 5, 1, 0), (2, 2, 2, 0), (3, 3, 2, 1)]:
        x = cupy.asarray(rng.standard_normal((3, 2, 9, 8)).astype("float32"))
        xp = xpnet.backend.namespace(x)
        col = kernels.im2col(x, fh, fw, stride, pad)
        assert bool((col == functional.im2col(xp, x, fh, fw, stride, pad)).all())
        dx = kernels.col2im(col, x.shape, fh, fw, stride, pad)
        assert bool((dx == functional.col2im(xp, col, x.shape, fh, fw, stride, pad)).all())
    pool = xpnet.Pooling(2, 2, stride=2)
    x = cupy.asarray(rng.standard_normal((3, 2, 8, 8)).astype("float32"))
    out = pool.forward(x)
    got, arg = kernels.max_pool(x, 2, 2, 2, 0, 4, 4)
    assert bool((got == out).all()) and bool((arg == pool.arg).all())
