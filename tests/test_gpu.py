"""CuPy on real GPUs: what the CPU suite can only check by emulation (``test_device_context``)
or with fakes.  Run by ``bash ci/gpu``; here every test skips without a CUDA GPU (and fails
under XPNET_REQUIRE_GPU=1, which ci/gpu sets).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import xpnet
from conftest import required_gpu_devices
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
