"""Every layer, on every backend of the fixture: values, gradients, dtype/device, no mutation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, tolerance
from layer_specs import SPEC_IDS, TORCH_SPEC_IDS, as_tuple, dout_for, run_layer, spec_by_id

import xpnet
from xpnet.backend import device_of, to_numpy


@pytest.fixture(params=SPEC_IDS)
def spec(request):
    return spec_by_id(request.param)


def test_forward_matches_numpy_reference(spec, case):
    _, _, out, _ = run_layer(spec, case, dout_for(spec, np.random.default_rng(1)))
    expected = spec.reference(*spec.inputs, **spec.params)
    assert_close(out, expected, case.dtype_name, what=f"{spec} forward")


@pytest.mark.parametrize("mode", ["full", "sampled", "directional"])
def test_backward_passes_the_float64_gradient_check(spec, mode, case):
    # xpnet.check_layer: host float64 centered differences, plus the backend's own
    # float32/float64 gradients against the host's, plus the dout and mutation probes.
    layer = spec.build({k: case.asarray(v) for k, v in spec.params.items()})
    report = xpnet.check_layer(layer, *[case.asarray(a) for a in spec.inputs], mode=mode, seed=3)
    assert report.ok, report
    assert [r.name for r in report.rows if r.kind == "param"] == list(spec.param_grads)
    assert sum(r.kind == "input" for r in report.rows) == spec.diff_count
    assert all(r.device_error is not None for r in report.rows)
    assert report.dtype == case.dtype_name and report.device == case.device.name


@pytest.mark.parametrize("spec_id", TORCH_SPEC_IDS)
def test_backward_matches_torch_autograd(spec_id, case):
    spec = spec_by_id(spec_id)
    torch = pytest.importorskip("torch")
    dout = dout_for(spec, np.random.default_rng(1))
    layer, _, _, grads = run_layer(spec, case, dout)

    def leaf(a, grad):
        t = torch.tensor(a)
        return t.requires_grad_(True) if grad else t

    inputs = [leaf(a, i < spec.diff_count) for i, a in enumerate(spec.inputs)]
    params = {k: leaf(v, True) for k, v in spec.params.items()}
    out = spec.torch_fn(*inputs, **params)
    out.backward(torch.tensor(dout, dtype=out.dtype))
    for i in range(spec.diff_count):
        assert_close(grads[i], inputs[i].grad.numpy(), case.dtype_name, what=f"{spec} dx")
    for name, attr in spec.param_grads.items():
        assert_close(getattr(layer, attr), params[name].grad.numpy(), case.dtype_name,
                     what=f"{spec} {attr}")


def test_dout_is_honoured(spec, case):
    dout = dout_for(spec, np.random.default_rng(1))
    _, _, _, grads = run_layer(spec, case, dout)
    _, _, _, scaled = run_layer(spec, case, -2.5 * dout)
    for g, s in zip(grads[: spec.diff_count], scaled[: spec.diff_count]):
        assert_close(s, -2.5 * to_numpy(g).astype(np.float64), case.dtype_name,
                     what=f"{spec}: dx(-2.5 dout) != -2.5 dx(dout)")


def test_inputs_and_dout_are_not_mutated(spec, case):
    params = {k: case.asarray(v) for k, v in spec.params.items()}
    layer = spec.build(params)
    inputs = [case.asarray(a) for a in spec.inputs]
    dout_host = dout_for(spec, np.random.default_rng(1))
    dout = dout_host if spec.scalar_output else case.asarray(dout_host)
    before = [to_numpy(a) for a in [*inputs, *params.values()]]
    dout_before = to_numpy(dout)
    out = layer.forward(*inputs)
    grads = as_tuple(layer.backward(dout))
    after = [to_numpy(a) for a in [*inputs, *params.values()]]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(to_numpy(dout), dout_before)
    # The results are new arrays: writing into one cannot reach an input or dout.
    every = [*inputs, *params.values()] + ([] if spec.scalar_output else [dout])
    for g in [out, *grads]:
        assert all(g is not a for a in every)


def test_outputs_keep_dtype_and_device(spec, case):
    layer, inputs, out, grads = run_layer(spec, case, dout_for(spec, np.random.default_rng(1)))
    results = [out, *grads[: spec.diff_count]]
    results += [getattr(layer, a) for a in spec.param_grads.values()]
    for r in results:
        assert r.dtype == case.dtype, f"{spec}: {r.dtype} != {case.dtype}"
        assert device_of(r) == case.device, f"{spec}: {device_of(r)} != {case.device}"
    if spec.scalar_output:
        assert out.ndim == 0
    for g, x in zip(grads, inputs):
        assert tuple(g.shape) == tuple(x.shape)


def test_backward_before_forward_raises(spec):
    layer = spec.build({k: v.copy() for k, v in spec.params.items()})
    with pytest.raises(xpnet.ForwardNotCalledError, match="before .*forward"):
        layer.backward(np.ones((2, 2)))


# --- Mul and Add on Python numbers -----------------------------------------------------------


def test_mul_and_add_on_numbers():
    mul, add = xpnet.Mul(), xpnet.Add()
    assert mul.forward(3.0, 4.0) == 12.0
    assert mul.backward(2.0) == (8.0, 6.0)
    assert add.forward(3, 4) == 7
    assert add.backward(1.5) == (1.5, 1.5)


def test_mul_number_times_array_sums_the_number_gradient(case):
    x = case.asarray([[1.0, 2.0], [3.0, 4.0]])
    mul = xpnet.Mul()
    out = mul.forward(x, 2.0)
    dx, dy = mul.backward(case.asarray(np.ones((2, 2))))
    assert_close(out, [[2.0, 4.0], [6.0, 8.0]], case.dtype_name)
    assert_close(dx, np.full((2, 2), 2.0), case.dtype_name)
    assert dy.ndim == 0
    assert_close(dy, 10.0, case.dtype_name)


def test_add_gradients_do_not_alias_each_other(case):
    add = xpnet.Add()
    x = case.asarray(np.ones((2, 3)))
    add.forward(x, x)
    dout = case.asarray(np.ones((2, 3)))
    dx, dy = add.backward(dout)
    assert dx is not dy and dx is not dout and dy is not dout


# --- Relu / Sigmoid specifics -------------------------------------------------------------------


def test_relu_gradient_at_zero_is_zero_like_torch(case):
    relu = xpnet.Relu()
    x = case.asarray([[-1.0, 0.0, 2.0]])
    assert_close(relu.forward(x), [[0.0, 0.0, 2.0]], case.dtype_name)
    assert_close(relu.backward(case.asarray([[5.0, 5.0, 5.0]])), [[0.0, 0.0, 5.0]], case.dtype_name)


def test_sigmoid_is_exact_and_quiet_at_extremes(case):
    sig = xpnet.Sigmoid()
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = sig.forward(case.asarray([[-1000.0, -40.0, 0.0, 40.0, 1000.0]]))
        host = to_numpy(y)
    assert host[0, 0] == 0.0 and host[0, -1] == 1.0 and host[0, 2] == 0.5
    assert np.all(np.isfinite(host))
    dx = to_numpy(sig.backward(case.asarray(np.ones((1, 5)))))
    assert dx[0, 0] == 0.0 and dx[0, -1] == 0.0 and dx[0, 2] == 0.25


# --- Affine specifics -----------------------------------------------------------------------------


def test_affine_rejects_mismatched_shapes(case):
    W, b = case.asarray(np.ones((6, 3))), case.asarray(np.zeros(3))
    aff = xpnet.Affine(W, b)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(6, 3\)"):
        aff.forward(case.asarray(np.ones((4, 5))))
    with pytest.raises(ValueError, match="batch axis"):
        aff.forward(case.asarray(np.ones(6)))
    with pytest.raises(ValueError, match=r"b must have shape \(M,\) = \(3,\)"):
        xpnet.Affine(W, case.asarray(np.zeros(4)))
    aff.forward(case.asarray(np.ones((4, 6))))
    with pytest.raises(ValueError, match=r"dout has shape \(4, 2\).*\(4, 3\)"):
        aff.backward(case.asarray(np.ones((4, 2))))


def test_affine_rejects_integer_input(case):
    aff = xpnet.Affine(case.asarray(np.ones((2, 3))), case.asarray(np.zeros(3)))
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        aff.forward(case.asarray(np.ones((4, 2), dtype=np.int64), dtype="int64"))


def test_affine_sees_a_rebound_parameter(case):
    aff = xpnet.Affine(case.asarray(np.ones((2, 3))), case.asarray(np.zeros(3)))
    aff.W = case.asarray(2 * np.ones((2, 3)))
    assert_close(aff.forward(case.asarray(np.ones((1, 2)))), np.full((1, 3), 4.0), case.dtype_name)


# --- SoftmaxWithLoss specifics -----------------------------------------------------------------


def test_softmax_labels_and_onehot_agree(case, rng):
    x = case.asarray(3 * rng.standard_normal((6, 5)))
    labels = np.array([0, 4, 2, 2, 1, 3])
    a, b = xpnet.SoftmaxWithLoss(), xpnet.SoftmaxWithLoss()
    la = a.forward(x, case.asarray(labels))
    lb = b.forward(x, case.asarray(np.eye(5)[labels]))
    np.testing.assert_array_equal(to_numpy(la), to_numpy(lb))
    np.testing.assert_array_equal(to_numpy(a.backward()), to_numpy(b.backward()))


def test_softmax_loss_equals_independent_log_softmax_to_precision(rng):
    # float64, no epsilon: the loss matches an exact log-sum-exp to a few ulps.
    import math

    x = 5 * rng.standard_normal((8, 10))
    t = rng.integers(0, 10, size=8)
    loss = float(xpnet.SoftmaxWithLoss().forward(x, t))
    exact = 0.0
    for row, k in zip(x.tolist(), t.tolist()):
        m = max(row)
        exact += -(row[k] - m - math.log(math.fsum(math.exp(v - m) for v in row)))
    exact /= 8
    assert loss == pytest.approx(exact, rel=tolerance("float64"), abs=0)


def test_softmax_handles_logits_of_1000(case):
    layer = xpnet.SoftmaxWithLoss()
    x = case.asarray([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 1000.0]])
    loss = to_numpy(layer.forward(x, case.asarray(np.array([0, 1]))))
    assert np.isfinite(loss)
    # row 0: -log softmax = 0 exactly; row 1: log 2
    assert_close(loss, np.log(2.0) / 2, case.dtype_name)
    assert np.all(np.isfinite(to_numpy(layer.backward())))


def test_softmax_backward_accepts_a_0d_array_dout(case, rng):
    layer = xpnet.SoftmaxWithLoss()
    layer.forward(case.asarray(rng.standard_normal((3, 4))), case.asarray(np.array([1, 2, 3])))
    dx1 = to_numpy(layer.backward(3.0))
    dx2 = layer.backward(case.asarray(np.array(3.0)))
    assert dx2.dtype == case.dtype
    np.testing.assert_allclose(to_numpy(dx2), dx1, rtol=tolerance(case.dtype_name))
    with pytest.raises(ValueError, match="0-d"):
        layer.backward(case.asarray(np.ones(3)))


def test_softmax_rejects_bad_labels(case):
    layer = xpnet.SoftmaxWithLoss()
    x = case.asarray(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"outside \[0, 4\).*\[4, -1\]"):
        layer.forward(x, case.asarray(np.array([0, 4, -1])))
    with pytest.raises(ValueError, match=r"\(N,\) = \(3,\).*\(3, 1\)"):
        layer.forward(x, case.asarray(np.array([[0], [1], [2]])))
    with pytest.raises(ValueError, match=r"\(N,\) = \(3,\).*\(2,\)"):
        layer.forward(x, case.asarray(np.array([0, 1])))
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*\(3, 5\)"):
        layer.forward(x, case.asarray(np.zeros((3, 5))))
    with pytest.raises(TypeError, match="dtype bool"):
        layer.forward(x, case.asarray(np.ones((3, 4), dtype=bool), dtype="bool"))


def test_softmax_unchecked_labels_skip_the_host_read(case):
    # check_labels=False is the trainer's path: labels were validated once, up front.
    layer = xpnet.SoftmaxWithLoss()
    loss = layer.forward(case.asarray(np.zeros((2, 3))), case.asarray(np.array([0, 2])),
                         check_labels=False)
    assert_close(loss, np.log(3.0), case.dtype_name)


def test_layers_compute_in_their_parameters_dtype(case):
    """Real floating input of another precision is converted on entry (the book's float64
    weights with float32 data compute in float64, as NumPy's promotion does; float64 data
    into a float32 net computes in float32); the input's gradient comes back in its dtype."""
    other = "float64" if case.dtype_name == "float32" else "float32"
    if case.device.library == "jax" and other == "float64":
        pytest.skip("JAX makes float64 arrays only in its 64-bit mode")
    rng = np.random.default_rng(0)
    layers = [
        (xpnet.Affine(case.asarray(rng.standard_normal((12, 3))), case.asarray(np.zeros(3))),
         rng.standard_normal((4, 3, 2, 2))),
        (xpnet.Convolution(case.asarray(rng.standard_normal((2, 3, 3, 3))),
                           case.asarray(rng.standard_normal(2)), 1, 1),
         rng.standard_normal((2, 3, 5, 5))),
        (xpnet.BatchNormalization(case.asarray(rng.random(3) + 0.5),
                                  case.asarray(rng.standard_normal(3))),
         rng.standard_normal((4, 3, 2, 2))),
    ]
    for layer, host_x in layers:
        x = case.asarray(host_x, dtype=other)
        same = case.asarray(host_x.astype(other).astype(case.dtype_name))
        out = layer.forward(x)
        assert xpnet.backend.dtype_name(out.dtype) == case.dtype_name, layer
        np.testing.assert_array_equal(to_numpy(out), to_numpy(layer.forward(same)))
        dout = case.asarray(rng.standard_normal(tuple(out.shape)))
        layer.forward(x)
        dx = layer.backward(dout)
        assert xpnet.backend.dtype_name(dx.dtype) == other and tuple(dx.shape) == host_x.shape
        layer.forward(same)
        np.testing.assert_array_equal(to_numpy(dx), to_numpy(layer.backward(dout)).astype(other))
