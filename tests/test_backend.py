"""Device strings, host copies, moves between backends, and mixing errors."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

import xpnet
from xpnet import backend
from xpnet.backend import (
    BackendUnavailableError,
    DeviceMismatchError,
    device_of,
    namespace,
    resolve_device,
    to_device,
    to_numpy,
)


def test_resolve_cpu_and_strict_devices():
    assert resolve_device("cpu").name == "cpu"
    assert resolve_device("numpy").library == "numpy"
    assert resolve_device("array_api_strict").name == "array_api_strict:CPU_DEVICE"
    d1 = resolve_device("array_api_strict:device1")
    assert d1.name == "array_api_strict:device1"
    assert str(d1) == "array_api_strict:device1"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("gpu", "unknown device 'gpu'"),
        ("cuda:x", "expected a GPU index"),
        ("torch:tpu", "unknown device 'torch:tpu'"),
        ("array_api_strict:device9", "has no device 'device9'"),
        ("", "unknown device ''"),
    ],
)
def test_bad_device_strings_say_what_is_accepted(spec, match):
    pytest.importorskip("array_api_strict")
    if spec.startswith("cuda") and importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy not installed: the index is not parsed before the import error")
    if spec.startswith("torch"):
        pytest.importorskip("torch")
    with pytest.raises(ValueError, match=match):
        resolve_device(spec)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device must be a device string"):
        resolve_device(0)


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(BackendUnavailableError, match=r"pip install 'xpnet\[cuda12\]'") as info:
        resolve_device("cuda")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailableError, match="pip install torch"):
        resolve_device("torch:cpu")


def test_torch_cuda_without_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU"):
        resolve_device("torch:cuda:0")


def test_cupy_without_gpu_says_so():
    pytest.importorskip("cupy")
    if backend.BACKENDS["cupy"].gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU"):
        resolve_device("cuda")


def test_to_numpy_is_a_host_copy(case):
    host = np.arange(6.0).reshape(2, 3)
    x = case.asarray(host)
    out = to_numpy(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, host)
    out[0, 0] = 99.0
    assert to_numpy(x)[0, 0] == 0.0  # no shared memory, whatever the backend


def test_to_numpy_of_a_numpy_array_copies():
    a = np.ones(3)
    b = xpnet.to_numpy(a)
    b[0] = 5
    assert a[0] == 1


def test_to_device_round_trip_and_dtype(case):
    host = np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4)
    x = to_device(host, case.device, dtype=case.dtype_name)
    assert device_of(x) == case.device and x.dtype == case.dtype
    back = to_device(x, "cpu")
    assert isinstance(back, np.ndarray)
    np.testing.assert_allclose(back, host, rtol=float(np.finfo(case.dtype_name).eps))


def test_to_device_never_shares_memory_with_a_host_input(case):
    host = np.zeros(4, dtype=case.dtype_name)
    x = to_device(host, case.device)
    host[0] = 1.0
    assert to_numpy(x)[0] == 0.0 or case.device.library == "numpy"


def test_to_device_same_place_returns_input_unless_copy():
    a = np.ones(3)
    assert to_device(a, "cpu") is a
    assert to_device(a, "cpu", copy=True) is not a


def test_to_device_between_strict_devices():
    pytest.importorskip("array_api_strict")
    x = to_device(np.ones(3), "array_api_strict:device1")
    y = to_device(x, "array_api_strict:device2")
    assert device_of(y).name == "array_api_strict:device2"
    assert device_of(x).name == "array_api_strict:device1"


def test_namespace_of_each_backend(case):
    x = case.asarray(np.ones(2))
    xp = namespace(x, 1.0, None)
    assert xp is case.xp or xp.__name__ == case.xp.__name__


def test_device_mixing_names_both_devices():
    pytest.importorskip("array_api_strict")
    a = to_device(np.ones((2, 3)), "array_api_strict:device1")
    b = to_device(np.ones((3, 2)), "array_api_strict:device2")
    with pytest.raises(DeviceMismatchError, match=r"x is on 'array_api_strict:device1', "
                       r"W is on 'array_api_strict:device2'"):
        namespace(x=a, W=b)
    # and through a layer, with the layer's argument names
    layer = xpnet.Affine(b, to_device(np.zeros(2), "array_api_strict:device2"))
    with pytest.raises(DeviceMismatchError, match="device1.*device2"):
        layer.forward(a)
    with pytest.raises(DeviceMismatchError):
        xpnet.Mul().forward(a, to_device(np.ones((2, 3)), "array_api_strict:device2"))


def test_library_mixing_names_both_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(DeviceMismatchError, match=r"x is a numpy array on 'cpu', t is a torch "
                       r"array on 'torch:cpu'"):
        xpnet.SoftmaxWithLoss().forward(np.zeros((2, 3)), torch.tensor([0, 1]))


def test_namespace_rejects_non_arrays():
    with pytest.raises(TypeError, match="x must be an array"):
        namespace(x=[1.0, 2.0])
    with pytest.raises(TypeError, match="at least one array"):
        namespace(1.0)


def test_dtype_name_is_backend_neutral(case):
    assert backend.dtype_name(case.dtype) == case.dtype_name


def test_available_backends_lists_numpy():
    entries = {e["library"]: e for e in xpnet.available_backends()}
    assert entries["numpy"]["devices"] == ["cpu"]
    assert entries["numpy"]["version"] == np.__version__
    assert set(entries) == {"numpy", "array_api_strict", "torch", "cupy", "jax"}
    if importlib.util.find_spec("cupy") is None:
        assert "xpnet[cuda12]" in entries["cupy"]["note"]


def test_torch_tensors_that_require_grad_are_detached_when_moved():
    torch = pytest.importorskip("torch")
    x = torch.ones((4, 2), dtype=torch.float64, requires_grad=True)
    moved = to_device(x, "torch:cpu")
    assert not moved.requires_grad and x.requires_grad
    net = xpnet.MultiLayerNet([2, 3, 2], device="torch:cpu", dtype="float64")
    t = torch.tensor([0, 1, 0, 1])
    xpnet.Trainer(net, xpnet.Momentum(0.1), batch_size=2, epochs=2, progress=False).fit(x, t)
    for name, value in net.params.items():  # plain tensors, not nodes of an autograd graph
        assert value.grad_fn is None and not value.requires_grad, name
