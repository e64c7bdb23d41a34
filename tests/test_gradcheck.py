"""The host float64 gradient checker: numerical_gradient, check_layer, check_gradients."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet import gradcheck
from xpnet.backend import device_of, to_device, to_numpy
from xpnet.layers import Affine, Relu, Sigmoid, SoftmaxWithLoss

MODES = ["full", "sampled", "directional"]


# --- numerical_gradient ---------------------------------------------------------------------


def test_numerical_gradient_of_a_quadratic():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    g = xpnet.numerical_gradient(lambda v: np.sum(v**3), x)
    np.testing.assert_allclose(g, 3 * x**2, rtol=1e-9)


def test_numerical_gradient_closure_pattern_and_exact_restore():
    W = np.array([0.1, 0.2, 0.3]) / 3  # values whose +h/-h round trip is inexact
    original = W.copy()
    g = xpnet.numerical_gradient(lambda _: np.sum(np.exp(W)), W)  # reads W through the closure
    np.testing.assert_allclose(g, np.exp(original), rtol=1e-9)
    assert np.array_equal(W.view(np.int64), original.view(np.int64))  # bit for bit


def test_numerical_gradient_restores_even_if_f_raises():
    x = np.array([1.0, 2.0])
    calls = []

    def f(v):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return float(np.sum(v))

    with pytest.raises(RuntimeError):
        xpnet.numerical_gradient(f, x)
    np.testing.assert_array_equal(x, [1.0, 2.0])


def test_numerical_gradient_casts_integers_to_float64():
    x = np.array([1, 2, 3])
    g = xpnet.numerical_gradient(lambda v: np.sum(v**2), x)
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, [2.0, 4.0, 6.0], rtol=1e-9)  # the seeds' version gave garbage
    np.testing.assert_array_equal(x, [1, 2, 3])


def test_numerical_gradient_rejects_device_arrays_and_bad_steps():
    pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="to_numpy"):
        xpnet.numerical_gradient(np.sum, to_device(np.ones(2), "array_api_strict"))
    with pytest.raises(ValueError, match="h must be a positive"):
        xpnet.numerical_gradient(np.sum, np.ones(2), h=0)


# --- nets, every mode, every backend (the layers: tests/test_layers.py) ----------------------


@pytest.mark.parametrize("mode", MODES)
def test_two_layer_net_passes(mode, case, rng):
    net = xpnet.TwoLayerNet(20, 10, 5, weight_init_std=0.3, seed=1, device=case.device.name,
                            dtype=case.dtype_name)
    x = case.asarray(rng.random((4, 20)))
    t = case.asarray(np.array([0, 4, 2, 1]))
    report = xpnet.check_gradients(net, x, t, mode=mode)
    assert report.ok, report
    assert [r.name for r in report.rows] == ["W1", "b1", "W2", "b2"]
    if mode == "full":
        assert [r.checked for r in report.rows] == [200, 10, 50, 5]


@pytest.mark.parametrize("mode", MODES)
def test_deeper_sigmoid_net_passes(mode, case, rng):
    net = xpnet.MultiLayerNet([6, 5, 4, 3], activation="sigmoid", weight_init="xavier", seed=2,
                              device=case.device.name, dtype=case.dtype_name)
    x = case.asarray(rng.standard_normal((5, 6)))
    t = case.asarray(np.eye(3)[[0, 1, 2, 1, 0]])
    report = xpnet.check_gradients(net, x, t, mode=mode, seed=1)
    assert report.ok, report
    assert len(report.rows) == 6


def test_book_sized_check_directional(rng):
    # The book's check: TwoLayerNet(784, 50, 10) on 3 samples, here in O(1) loss evaluations.
    net = xpnet.TwoLayerNet(784, 50, 10)
    x = rng.random((3, 784)).astype(np.float32)
    report = xpnet.check_gradients(net, x, np.array([3, 1, 4]), mode="directional")
    assert report.ok, report
    assert max(r.max_abs_error for r in report.rows) < 1e-9


# --- the model and inputs are left alone -----------------------------------------------------


def test_strict_device1_model_is_checked_and_left_untouched(rng):
    pytest.importorskip("array_api_strict")
    dev = "array_api_strict:device1"
    net = xpnet.TwoLayerNet(8, 6, 3, weight_init_std=0.5, device=dev, dtype="float32")
    x = to_device(rng.random((4, 8)), dev, dtype="float32")
    t = to_device(np.array([0, 2, 1, 2]), dev)
    before = {k: to_numpy(v) for k, v in net.params.items()}
    arrays_before = dict(net.params)
    for mode in MODES:
        report = xpnet.check_gradients(net, x, t, mode=mode)
        assert report.ok, report
        assert report.device == dev and report.dtype == "float32"
    for k, v in net.params.items():
        assert v is arrays_before[k]
        assert device_of(v).name == dev and v.dtype == net.params[k].dtype
        np.testing.assert_array_equal(to_numpy(v), before[k])
    assert device_of(x).name == dev and device_of(t).name == dev
    # not even a forward ran on the caller's net: its layers hold no cached input
    assert net.layers["Affine1"].x is None and net.last_layer.y is None


def test_check_layer_leaves_layer_and_inputs_untouched(case, rng):
    W, b = case.asarray(rng.standard_normal((3, 2))), case.asarray(rng.standard_normal(2))
    x = case.asarray(rng.standard_normal((4, 3)))
    layer = Affine(W, b)
    snapshot = [to_numpy(a) for a in (W, b, x)]
    assert xpnet.check_layer(layer, x).ok
    assert layer.W is W and layer.b is b and layer.x is None and layer.dW is None
    for a, s in zip((W, b, x), snapshot):
        np.testing.assert_array_equal(to_numpy(a), s)


# --- planted bugs are caught and named -------------------------------------------------------


class SeedsTwoLayerNet(xpnet.TwoLayerNet):
    """004's bug: b1 gets dW1; and b2 scaled by 2 for good measure."""

    def gradient(self, x, t):
        g = super().gradient(x, t)
        g["b1"] = g["W1"]
        g["b2"] = 2 * g["b2"]
        return g


@pytest.mark.parametrize("mode", MODES)
def test_seeds_bias_bugs_are_named(mode, rng):
    net = SeedsTwoLayerNet(12, 6, 4, weight_init_std=0.3)
    x = rng.random((3, 12)).astype(np.float32)
    report = xpnet.check_gradients(net, x, np.array([0, 1, 3]), mode=mode)
    assert not report.ok
    assert report.failed == ["b1", "b2"]
    assert "shape (12, 6), but b1 has shape (6,)" in report["b1"].problem
    assert report["b2"].max_rel_error == pytest.approx(1 / 3, rel=1e-6)
    text = str(report)
    assert "FAILED (b1, b2)" in text and "b2" in text
    with pytest.raises(xpnet.GradientCheckError, match="b1") as info:
        report.raise_if_failed()
    assert isinstance(info.value, AssertionError)


class SquaredSigmoid(Sigmoid):
    def backward(self, dout):
        return dout * self.out**2  # wrong: should be y * (1 - y)


class DoutBlindSoftmax(SoftmaxWithLoss):
    def backward(self, dout=1):
        return (self.y - self.t) / self.y.shape[0]  # the seeds: dout ignored


class MutatingRelu(Relu):
    def backward(self, dout):
        dout[self.mask] = 0  # the seeds: writes into the caller's gradient
        return dout


class FlatAffine(Affine):
    def backward(self, dout):
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T  # forgets to reshape dx to the input's shape


@pytest.mark.parametrize("mode", MODES)
def test_planted_layer_bugs_are_named(mode, rng):
    x = rng.standard_normal((4, 5))
    r = xpnet.check_layer(SquaredSigmoid(), x, mode=mode)
    assert r.failed == ["x"] and not r.findings, r

    r = xpnet.check_layer(DoutBlindSoftmax(), x, np.array([0, 1, 4, 2]), mode=mode)
    assert not r.ok and any("ignores dout" in f and "x" in f for f in r.findings), r

    r = xpnet.check_layer(MutatingRelu(), x, mode=mode)
    assert not r.ok and any("wrote into its argument dout" in f for f in r.findings), r
    assert r.failed == []  # its dx is right: only the probe can see this bug

    x4 = rng.standard_normal((3, 2, 3, 2))
    r = xpnet.check_layer(FlatAffine(rng.standard_normal((12, 4)), np.zeros(4)), x4, mode=mode)
    assert r.failed == ["x"], r
    assert "shape (3, 12), but x has shape (3, 2, 3, 2)" in r["x"].problem


def test_failing_report_raises_when_asked(rng):
    with pytest.raises(xpnet.GradientCheckError, match=r"x .*FAIL"):
        xpnet.check_layer(SquaredSigmoid(), rng.standard_normal((2, 3)), raise_on_failure=True)


def test_a_backend_only_bug_is_caught_by_the_device_comparison(case, rng):
    class Float32OnlyBug(Sigmoid):
        def backward(self, dout):
            dx = super().backward(dout)
            return dx * 1.01 if "float64" not in str(dx.dtype) else dx

    if case.dtype_name == "float64":
        pytest.skip("the planted bug shows only in float32")
    r = xpnet.check_layer(Float32OnlyBug(), case.asarray(rng.standard_normal((3, 4))))
    assert r.failed == ["x"] and "differs from the float64 host one" in r["x"].problem, r


# --- users' own classes ----------------------------------------------------------------------


class BookStyleNet:
    """A user's net in the seeds' style: a params dict whose arrays the layers share."""

    def __init__(self, rng):
        self.params = {"W1": 0.5 * rng.standard_normal((4, 3)), "b1": np.zeros(3)}
        self.affine = Affine(self.params["W1"], self.params["b1"])
        self.last = SoftmaxWithLoss()

    def loss(self, x, t):
        return self.last.forward(self.affine.forward(x), t)

    def gradient(self, x, t):
        self.loss(x, t)
        self.affine.backward(self.last.backward(1))
        return {"W1": self.affine.dW, "b1": self.affine.db}


def test_users_own_net_and_layer(rng):
    net = BookStyleNet(rng)
    report = xpnet.check_gradients(net, rng.standard_normal((5, 4)), np.array([0, 1, 2, 0, 1]))
    assert report.ok, report

    class Scale:  # a user's own layer, book conventions: parameter `a`, gradient `da`
        def __init__(self, a):
            self.a, self.da, self.x = a, None, None

        def forward(self, x):
            self.x = x
            return x * self.a

        def backward(self, dout):
            self.da = (dout * self.x).sum(axis=0)
            return dout * self.a

    r = xpnet.check_layer(Scale(rng.standard_normal(3)), rng.standard_normal((2, 3)))
    assert r.ok and [row.name for row in r.rows] == ["x", "a"], r


def test_a_dropped_input_gradient_is_reported(rng):
    class HalfMul(xpnet.Mul):
        def backward(self, dout):
            return (dout * self.y,)  # forgets dy

    r = xpnet.check_layer(HalfMul(), rng.standard_normal(3), rng.standard_normal(3))
    assert not r.ok and "returned 1 gradient(s) for the 2 differentiable input(s)" in str(r)
    # loss layers return one gradient; their targets are listed as constants
    r = xpnet.check_layer(SoftmaxWithLoss(), rng.standard_normal((2, 3)), np.eye(3)[[0, 2]])
    assert r.ok and r.constants == ["t"], r


# --- modes and options -----------------------------------------------------------------------


def test_sampled_mode_is_seeded_and_covers_biases(rng):
    net = xpnet.TwoLayerNet(30, 20, 5, weight_init_std=0.3, dtype="float64")
    x, t = rng.random((3, 30)), np.array([0, 1, 2])
    a = xpnet.check_gradients(net, x, t, mode="sampled", seed=7, samples=4)
    b = xpnet.check_gradients(net, x, t, mode="sampled", seed=7, samples=4)
    c = xpnet.check_gradients(net, x, t, mode="sampled", seed=8, samples=4)
    assert [r.checked for r in a.rows] == [4, 4, 4, 4]
    assert [r.worst for r in a.rows] == [r.worst for r in b.rows]
    assert [r.worst for r in a.rows] != [r.worst for r in c.rows]


def test_numerical_gradient_method_matches_backprop(case, rng):
    net = xpnet.TwoLayerNet(6, 5, 3, weight_init_std=0.5, device=case.device.name,
                            dtype=case.dtype_name)
    x, t = case.asarray(rng.random((2, 6))), case.asarray(np.array([2, 0]))
    numeric = net.numerical_gradient(x, t)
    backprop = net.gradient(x, t)
    for k in net.params:
        assert device_of(numeric[k]) == case.device and numeric[k].dtype == case.dtype
        got = to_numpy(numeric[k]).astype(np.float64)
        ref = to_numpy(backprop[k]).astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * np.abs(ref).max())


def test_bad_options_are_rejected(rng):
    net = xpnet.TwoLayerNet(4, 3, 2)
    x, t = rng.random((2, 4)).astype(np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match="mode must be one of"):
        xpnet.check_gradients(net, x, t, mode="exhaustive")
    with pytest.raises(ValueError, match="samples must be positive"):
        xpnet.check_gradients(net, x, t, mode="sampled", samples=0)
    with pytest.raises(TypeError, match="params"):
        xpnet.check_gradients(object(), x, t)


def test_default_tolerance_is_documented_and_derived_from_h():
    assert "100 * eps * max(|f|, 1) / h" in gradcheck.__doc__
    assert gradcheck._resolve_atol(None, 2.0, 1e-5) == pytest.approx(100 * 2.220446e-16 * 2 / 1e-5)


class DictScale:
    """A layer that keeps its parameter only in a params dict (no attribute of that name)."""

    def __init__(self, w):
        self.params = {"w": w}
        self.grads = {"w": None}

    def forward(self, x):
        self.x = x
        return x * self.params["w"]

    def backward(self, dout):
        self.grads["w"] = (dout * self.x).sum(axis=0)
        return dout * self.params["w"]


def test_a_layer_with_only_a_params_dict_is_checked(rng):
    report = xpnet.check_layer(DictScale(rng.standard_normal(3)), rng.standard_normal((4, 3)))
    assert report.ok, report
    assert [r.name for r in report.rows] == ["x", "w"]


def test_the_books_idiom_on_a_float32_net(rng):
    # numerical_gradient(lambda W: net.loss(x, t), net.params["W1"]): f ignores its argument
    # and reads the parameter through the net, which must therefore be perturbed in place.
    net = xpnet.TwoLayerNet(20, 10, 3, weight_init_std=0.5)
    x, t = rng.random((5, 20)).astype(np.float32), rng.integers(0, 3, 5)
    W1 = net.params["W1"]
    before = W1.copy()
    numerical = xpnet.numerical_gradient(lambda W: net.loss(x, t), W1)
    backprop = net.gradient(x, t)["W1"]
    np.testing.assert_array_equal(W1, before)  # restored bit for bit
    assert numerical.dtype == np.float64
    # float32 arithmetic: about 1e-2 of the largest element, not zeros
    assert np.max(np.abs(numerical - backprop)) < 0.1 * np.max(np.abs(backprop))
