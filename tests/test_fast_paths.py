"""The fused SGD step and the BLAS fast path behind it give the portable path's results."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import Case, assert_close

import xpnet
from xpnet import _fast
from xpnet._fast import BLAS_MIN_OUTPUT, matmul_accumulate, matmul_add
from xpnet.backend import DeviceMismatchError, is_writable, resolve_device, to_numpy
from xpnet.optim import make_optimizer

TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]


def _operands(rng, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    c = rng.standard_normal((m, n))
    return a, b, c


def _reference(a, b, c, alpha, trans_a, trans_b):
    return c + alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))


@pytest.fixture
def portable(monkeypatch):
    """Turn the BLAS fast path off for the test (NumPy then adds the product in place)."""
    _fast.library()
    monkeypatch.setitem(_fast._state, "calls", {})


@pytest.mark.parametrize(("trans_a", "trans_b"), TRANSPOSES)
def test_matmul_accumulate_matches_float64(case, rng, trans_a, trans_b):
    a, b, c = _operands(rng, 7, 5, 9, trans_a, trans_b)
    ca = case.asarray(c)
    out = matmul_accumulate(ca, case.asarray(a), case.asarray(b), -0.3, trans_a=trans_a,
                            trans_b=trans_b)
    assert out is ca or not is_writable(ca)  # in place wherever the array allows it
    assert_close(out, _reference(a, b, c, -0.3, trans_a, trans_b), case.dtype_name)


def _count_blas_calls(monkeypatch, dtype):
    """Record the fast path's gemm calls for ``dtype`` (they still run): returns the list."""
    calls = []
    real = _fast._state["calls"][np.dtype(dtype)]
    monkeypatch.setitem(_fast._state["calls"], np.dtype(dtype),
                        lambda *args: (calls.append(1), real(*args)))
    return calls


def _needs_blas():
    if _fast.library() is None:
        pytest.skip("this NumPy is not built with an ILP64 scipy-openblas: no BLAS fast path")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("trans_a", "trans_b"), TRANSPOSES)
def test_blas_fast_path_gives_the_portable_result(rng, dtype, trans_a, trans_b, monkeypatch):
    _needs_blas()
    calls = _count_blas_calls(monkeypatch, dtype)
    a, b, c = (v.astype(dtype) for v in _operands(rng, 300, 70, 129, trans_a, trans_b))
    fast = matmul_accumulate(c.copy(), a, b, -0.1, trans_a=trans_a, trans_b=trans_b)
    assert calls == [1]
    monkeypatch.setitem(_fast._state, "calls", {})
    slow = matmul_accumulate(c.copy(), a, b, -0.1, trans_a=trans_a, trans_b=trans_b)
    # The same sums in BLAS's order; only the rounding of alpha * product + c may differ.
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(fast, slow, rtol=0, atol=8 * eps * np.max(np.abs(slow)))


def test_blas_library_is_the_one_numpy_loaded():
    _needs_blas()
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps here to list the loaded libraries")
    with open("/proc/self/maps") as f:
        assert os.path.realpath(_fast.library()) in f.read()


def test_fast_path_can_be_turned_off_by_environment():
    code = "from xpnet import _fast; print(_fast.library())"
    env = {**os.environ, "XPNET_NO_BLAS_FAST_PATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "None"


@pytest.mark.parametrize("layout", ["fits", "strided a", "fortran c", "c is a", "b views c"])
def test_operands_blas_cannot_take_fall_back_to_numpy(rng, layout, monkeypatch):
    calls = _count_blas_calls(monkeypatch, "float32") if _fast.library() else None
    n = math.isqrt(BLAS_MIN_OUTPUT - 1) + 1  # c is big enough: only the layout can rule BLAS out
    c = rng.standard_normal((n, n)).astype(np.float32)
    a = rng.standard_normal((n, 2 * n)).astype(np.float32)[:, ::2]  # not contiguous
    b = rng.standard_normal((n, n)).astype(np.float32)
    if layout in ("fits", "fortran c"):
        a = np.ascontiguousarray(a)
    if layout == "fortran c":
        c = np.asfortranarray(c)
    elif layout == "c is a":
        a = c
    elif layout == "b views c":
        b = c[::-1]
    expected = c.astype(np.float64) + 0.5 * (a.astype(np.float64) @ b.astype(np.float64))
    out = matmul_accumulate(c, a, b, 0.5)
    assert out is c
    if calls is not None:
        assert calls == ([1] if layout == "fits" else [])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", [BLAS_MIN_OUTPUT // 64 - 1, BLAS_MIN_OUTPUT // 64])
def test_blas_fast_path_only_from_its_minimum_output_size(rng, m, monkeypatch):
    # Below BLAS_MIN_OUTPUT elements of output NumPy's matmul is faster than the ctypes call.
    _needs_blas()
    calls = _count_blas_calls(monkeypatch, "float64")
    a, b = rng.standard_normal((m, 30)), rng.standard_normal((30, 64))
    c, bias = rng.standard_normal((m, 64)), rng.standard_normal(64)
    expected_acc, expected_add = c - 2.0 * (a @ b), a @ b + bias
    assert_close(matmul_accumulate(c, a, b, -2.0), expected_acc, "float64")
    assert_close(matmul_add(a, b, bias), expected_add, "float64")
    assert calls == ([] if m * 64 < BLAS_MIN_OUTPUT else [1, 1])


def test_read_only_c_gives_a_new_array_and_stays_as_it_was(rng):
    c = rng.standard_normal((3, 4))
    c.flags.writeable = False
    before = c.copy()
    a, b = rng.standard_normal((3, 2)), rng.standard_normal((2, 4))
    out = matmul_accumulate(c, a, b, 2.0)
    assert out is not c
    np.testing.assert_array_equal(c, before)
    np.testing.assert_allclose(out, before + 2.0 * (a @ b))


def test_empty_inner_dimension_leaves_c_unchanged(rng, portable):
    c = rng.standard_normal((3, 4)).astype(np.float32)
    before = c.copy()
    matmul_accumulate(c, np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), 1.0)
    np.testing.assert_array_equal(c, before)


@pytest.mark.parametrize(
    ("shapes", "dtypes", "kwargs", "exc", "match"),
    [
        (((3, 4), (3, 2), (5, 4)), ("float32",) * 3, {}, ValueError,
         r"\(3, 2\) @ \(5, 4\).*c of shape \(3, 4\)"),
        (((3, 4), (2, 3), (2, 4)), ("float32",) * 3, {}, ValueError, r"trans_a=False"),
        (((3,), (3, 2), (2,)), ("float32",) * 3, {}, ValueError, r"c must be 2-D, got shape \(3,\)"),
        (((3, 4), (3, 2), (2, 4)), ("float32", "float64", "float32"), {}, TypeError,
         "float32, float64, float32"),
        (((3, 4), (3, 2), (2, 4)), ("int64",) * 3, {}, TypeError, "real floating dtype"),
    ],
)
def test_matmul_accumulate_errors(shapes, dtypes, kwargs, exc, match):
    c, a, b = (np.ones(s, dtype=d) for s, d in zip(shapes, dtypes))
    before = c.copy()
    with pytest.raises(exc, match=match):
        matmul_accumulate(c, a, b, 1.0, **kwargs)
    np.testing.assert_array_equal(c, before)


def test_matmul_accumulate_refuses_mixed_devices():
    d1, d2 = resolve_device("array_api_strict:device1"), resolve_device("array_api_strict:device2")
    c = d1.xp.ones((2, 2), device=d1.native)
    a = d2.xp.ones((2, 2), device=d2.native)
    with pytest.raises(DeviceMismatchError, match="device1.*device2|device2.*device1"):
        matmul_accumulate(c, a, c, 1.0)


def test_matmul_add_matches_float64(case, rng):
    a, b, bias = rng.standard_normal((7, 9)), rng.standard_normal((9, 5)), rng.standard_normal(5)
    args = [case.asarray(v) for v in (a, b, bias)]
    before = [to_numpy(v) for v in args]
    out = matmul_add(*args)
    assert_close(out, a @ b + bias, case.dtype_name)
    for arg, host in zip(args, before):
        np.testing.assert_array_equal(to_numpy(arg), host)  # nothing written into an argument


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_add_fast_path_gives_the_portable_result(rng, dtype, monkeypatch):
    _needs_blas()
    calls = _count_blas_calls(monkeypatch, dtype)
    a, b = rng.standard_normal((256, 300)).astype(dtype), rng.standard_normal((300, 70)).astype(dtype)
    bias = rng.standard_normal(70).astype(dtype)
    fast = matmul_add(a, b, bias)
    assert calls == [1]
    monkeypatch.setitem(_fast._state, "calls", {})
    slow = matmul_add(a, b, bias)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(fast, slow, rtol=0, atol=8 * eps * np.max(np.abs(slow)))
    assert fast.dtype == slow.dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    ("shapes", "dtypes", "exc", "match"),
    [
        (((3, 4), (5, 2), (2,)), ("float32",) * 3, ValueError, r"\(3, 4\), \(5, 2\) and \(2,\)"),
        (((3, 4), (4, 2), (3,)), ("float32",) * 3, ValueError, r"bias \(n,\)"),
        (((3, 4), (4, 2), (2,)), ("float32", "float32", "float64"), TypeError,
         "float32, float32 and float64"),
    ],
)
def test_matmul_add_errors(shapes, dtypes, exc, match):
    with pytest.raises(exc, match=match):
        matmul_add(*(np.ones(s, dtype=d) for s, d in zip(shapes, dtypes)))


# -- the fused SGD step -------------------------------------------------------------------------


def _affine_case(case, rng, input_grad=True):
    W, b = rng.standard_normal((6, 4)), rng.standard_normal(4)
    x, dout = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 4))
    layer = xpnet.Affine(case.asarray(W), case.asarray(b), input_grad=input_grad)
    return layer, W, b, x, dout


def test_affine_backward_sgd_is_backward_then_sgd(case, rng):
    layer, W, b, x, dout = _affine_case(case, rng)
    ref = xpnet.Affine(case.asarray(W), case.asarray(b))
    ref.forward(case.asarray(x))
    dx_ref = to_numpy(ref.backward(case.asarray(dout)))
    layer.forward(case.asarray(x))
    W_array, b_array = layer.W, layer.b
    d = case.asarray(dout)
    dx = _fast._affine_backward_sgd(layer, d, 0.25)
    np.testing.assert_array_equal(to_numpy(dx), dx_ref)  # computed with the weights before the step
    if is_writable(W_array):
        assert layer.W is W_array and layer.b is b_array  # in place
    assert layer.dW is None and layer.db is None
    x2 = x.reshape(5, 6)
    assert_close(layer.W, W - 0.25 * x2.T @ dout, case.dtype_name, what="W")
    assert_close(layer.b, b - 0.25 * dout.sum(0), case.dtype_name, what="b")
    np.testing.assert_array_equal(to_numpy(d), dout.astype(case.dtype_name))  # dout untouched


def test_affine_backward_sgd_without_input_grad_and_with_read_only_weights(rng):
    W, b = rng.standard_normal((3, 2)), rng.standard_normal(2)
    W.flags.writeable = b.flags.writeable = False
    layer = xpnet.Affine(W, b, input_grad=False)
    x, dout = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    layer.forward(x)
    assert _fast._affine_backward_sgd(layer, dout, 0.5) is None
    assert layer.W is not W and layer.b is not b  # rebound, the caller's arrays untouched
    np.testing.assert_allclose(layer.W, W - 0.5 * x.T @ dout)
    np.testing.assert_allclose(layer.b, b - 0.5 * dout.sum(0))


def test_affine_backward_sgd_needs_a_forward():
    layer = xpnet.Affine(np.ones((2, 2)), np.zeros(2))
    with pytest.raises(xpnet.ForwardNotCalledError):
        _fast._affine_backward_sgd(layer, np.ones((1, 2)), 0.1)


def _nets(case, rng):
    x = case.asarray(rng.standard_normal((16, 5)))
    t = case.asarray(rng.integers(0, 3, 16), dtype="int64")
    make = lambda: xpnet.MultiLayerNet([5, 8, 7, 3], seed=3, device=case.device.name,  # noqa: E731
                                       dtype=case.dtype_name)
    return make(), make(), x, t


def test_train_step_with_sgd_matches_gradient_then_update(case, rng):
    fused, plain, x, t = _nets(case, rng)
    opt_fused, opt_plain = xpnet.SGD(0.2), xpnet.SGD(0.2)
    for step in range(3):
        loss = fused.train_step(x, t, opt_fused)
        ref_loss, grads = plain.loss_and_gradient(x, t)
        opt_plain.update(plain.params, grads)
        if step == 0:  # the same forward pass on the same weights
            np.testing.assert_array_equal(to_numpy(loss), to_numpy(ref_loss))
        assert_close(loss, to_numpy(ref_loss), case.dtype_name, what=f"loss at step {step}")
    assert opt_fused.steps == opt_plain.steps == 3
    for name, value in plain.params.items():
        assert_close(fused.params[name], to_numpy(value), case.dtype_name, what=name)


@pytest.mark.parametrize("name", ["momentum", "adagrad", "adam"])
def test_train_step_with_other_optimizers_is_gradient_then_update(name, rng):
    net, plain, x, t = _nets(Case(resolve_device("cpu"), "float64"), rng)
    opt, opt_plain = make_optimizer(name), make_optimizer(name)
    for _ in range(3):
        net.train_step(x, t, opt)
        opt_plain.update(plain.params, plain.gradient(x, t))
    for k, v in plain.params.items():
        np.testing.assert_array_equal(net.params[k], v)  # the very same operations


def test_only_plain_sgd_is_fused():
    class Clipped(xpnet.SGD):
        def _step(self, xp, slots, g, steps):
            return -self.lr * xp.clip(g, -1.0, 1.0)

    class Logged(xpnet.SGD):
        def update(self, params, grads):
            super().update(params, grads)

    rng = np.random.default_rng(0)
    x, t = rng.random((8, 4)), rng.integers(0, 3, 8)
    net = xpnet.TwoLayerNet(4, 5, 3, dtype="float64")
    net.train_step(x, t, xpnet.SGD(0.3))
    assert net.layers["Affine2"].dW is None  # fused into backprop: no gradient array made
    for optimizer in (Clipped(0.3), Logged(0.3), xpnet.Momentum(0.3)):
        net.train_step(x, t, optimizer)
        assert net.layers["Affine2"].dW is not None, optimizer
