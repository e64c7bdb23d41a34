"""Degenerate layers and inputs: refused with a clear error, or computed as PyTorch does,
never garbage returned quietly (batch normalization of one value, an eps that rounds to 0,
"no" as a flag, empty filters, float16 nets, max pooling's NaN windows, padding, 1 x 1 and
oversized windows)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import xpnet
from xpnet import speedups
from xpnet.backend import to_numpy

# -- batch normalization -------------------------------------------------------------------


def _bn(dtype="float32", **options):
    return xpnet.BatchNormalization(np.ones(3, dtype), np.zeros(3, dtype), **options)


def test_batch_norm_refuses_one_value_per_feature_in_training():
    bn = _bn()
    before = (bn.running_mean.copy(), bn.running_var.copy())
    for x in (np.ones((1, 3), np.float32), np.ones((1, 3, 1, 1), np.float32)):
        with pytest.raises(ValueError, match=r"one value per feature.*\(1, 3"):
            bn.forward(x, train=True)
    np.testing.assert_array_equal(bn.running_mean, before[0])  # nothing changed
    np.testing.assert_array_equal(bn.running_var, before[1])
    assert bn.forward(np.ones((1, 3), np.float32), train=False).shape == (1, 3)  # inference
    assert bn.forward(np.ones((1, 3, 2, 2), np.float32), train=True).shape == (1, 3, 2, 2)


def test_the_trainer_refuses_a_last_batch_of_one_for_batch_norm_before_any_step():
    net = xpnet.MultiLayerNet([6, 5, 3], use_batchnorm=True)
    before = {k: np.array(v) for k, v in net.params.items()}
    rng = np.random.default_rng(0)
    x, t = rng.random((21, 6)).astype(np.float32), rng.integers(0, 3, 21)
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=10 on 21 .*last batch of 1"):
        trainer.fit(x, t)
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)
    with pytest.raises(ValueError, match="batch_size=1 on"):
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=1, epochs=1, progress=False).fit(x, t)
    trainer.fit(x[:20], t[:20])  # batches of 10: fine
    # A conv net normalizes over the pixels too: one image per batch is enough there.
    conv = xpnet.DeepConvNet((1, 28, 28))
    assert all(type(layer).__name__ != "BatchNormalization" for layer in conv.layers.values())


@pytest.mark.parametrize("eps", [1e-50, 5e-324])
def test_an_eps_that_rounds_to_zero_in_the_layers_dtype_is_refused(eps):
    with pytest.raises(ValueError, match=r"eps=.* rounds to 0 in float32"):
        _bn("float32", eps=eps)
    net = xpnet.Sequential([_bn("float64", eps=eps)])  # representable there
    net.to("cpu", dtype="float32")
    with pytest.raises(ValueError, match="rounds to 0 in float32"):
        net.predict(np.ones((4, 3), np.float32), train=True)


@pytest.mark.parametrize("flag", ["no", 0, 1, None, "False"])
def test_train_must_be_a_bool(flag):
    x = np.ones((4, 3), np.float32)
    for call in (lambda: _bn().forward(x, train=flag),
                 lambda: xpnet.Dropout(0.5).forward(x, train=flag),
                 lambda: xpnet.MultiLayerNet([3, 4, 2], use_dropout=True).predict(x,
                                                                               train=flag)):
        with pytest.raises(TypeError, match="train must be True or False"):
            call()
    assert _bn().forward(x, train=np.bool_(False)).shape == (4, 3)


# -- weights and nets ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 1, 3, 3), (2, 0, 3, 3), (2, 1, 0, 3), (2, 1, 3, 0)])
def test_a_filter_bank_with_an_empty_axis_is_refused(shape):
    with pytest.raises(ValueError, match=r"W must have every axis .* got shape " + re.escape(
            str(shape))):
        xpnet.Convolution(np.ones(shape, np.float32), np.ones(shape[0], np.float32))


def test_an_affine_layer_with_no_inputs_or_outputs_is_refused():
    for shape in [(0, 3), (3, 0)]:
        with pytest.raises(ValueError, match="W must have every axis"):
            xpnet.Affine(np.ones(shape), np.ones(shape[1]))
    with pytest.raises(TypeError, match="input_grad must be True or False"):
        xpnet.Affine(np.ones((3, 2)), np.ones(2), input_grad="no")


@pytest.mark.parametrize("make", [
    lambda d: xpnet.TwoLayerNet(4, 3, 2, dtype=d),
    lambda d: xpnet.MultiLayerNet([4, 3, 2], dtype=d),
    lambda d: xpnet.SimpleConvNet(dtype=d),
    lambda d: xpnet.DeepConvNet(dtype=d),
], ids=["TwoLayerNet", "MultiLayerNet", "SimpleConvNet", "DeepConvNet"])
@pytest.mark.parametrize("dtype", ["float16", "int32", "bfloat16"])
def test_the_constructors_build_float32_and_float64_nets_only(make, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be 'float32' or 'float64', got '{dtype}'"):
        make(dtype)


# -- max pooling ---------------------------------------------------------------------------

_KERNELS = pytest.mark.parametrize("path", ["kernels", "portable", "strict"])


def _pool(path, monkeypatch, layer, x, dout):
    """Forward and backward of ``layer`` on x by the compiled kernels (where numba is there),
    the portable NumPy code, or array_api_strict; host results."""
    if path == "portable":
        monkeypatch.setattr(speedups, "max_pool", None)
        monkeypatch.setattr(speedups, "max_pool_backward", None)
    if path == "strict":
        strict = pytest.importorskip("array_api_strict")
        x, dout = strict.asarray(x), strict.asarray(dout)
    out = layer.forward(x)
    return np.asarray(to_numpy(out)), np.asarray(to_numpy(layer.backward(dout)))


@_KERNELS
def test_a_nan_window_sends_its_gradient_to_the_nan(path, monkeypatch):
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan  # the window's last element, after its maximum
    x[0, 0, 2, 3] = np.nan
    out, dx = _pool(path, monkeypatch, xpnet.Pooling(2, 2), x, np.ones((1, 1, 2, 2), np.float32))
    assert np.isnan(out[0, 0, 0, 0]) and np.isnan(out[0, 0, 1, 1])
    assert dx[0, 0, 1, 1] == 1 and dx[0, 0, 2, 3] == 1
    assert dx.sum() == 4  # one position per window
    torch = _torch()
    if torch is not None:
        t = torch.tensor(x, requires_grad=True)
        torch.nn.functional.max_pool2d(t, 2).sum().backward()
        np.testing.assert_array_equal(dx, t.grad.numpy())


@_KERNELS
def test_a_padding_cell_never_wins_a_window_of_minus_infinity(path, monkeypatch):
    x = np.full((1, 1, 3, 3), -np.inf, np.float32)
    layer = xpnet.Pooling(3, 3, stride=2, pad=1)
    out, dx = _pool(path, monkeypatch, layer, x, np.ones((1, 1, 2, 2), np.float32))
    assert np.all(out == -np.inf)
    assert dx.sum() == 4  # every window's gradient reached an input element
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])  # first cells
    torch = _torch()
    if torch is not None:
        t = torch.tensor(x, requires_grad=True)
        torch.nn.functional.max_pool2d(t, 3, stride=2, padding=1).sum().backward()
        np.testing.assert_array_equal(dx, t.grad.numpy())


@_KERNELS
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_a_one_by_one_window_returns_a_new_array(path, monkeypatch, mode):
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    keep = x.copy()
    layer = xpnet.Pooling(1, 1, mode=mode)
    if path == "strict":
        strict = pytest.importorskip("array_api_strict")
        xs = strict.asarray(x)
        out = layer.forward(xs)
        out[0, 0, 0, 0] = 99.0
        np.testing.assert_array_equal(np.asarray(to_numpy(xs)), keep)
        return
    if path == "portable":
        monkeypatch.setattr(speedups, "max_pool", None)
    out = layer.forward(x)
    assert not np.shares_memory(out, x)
    out[...] = 99.0
    np.testing.assert_array_equal(x, keep)


@_KERNELS
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_a_window_far_larger_than_its_input_costs_the_input(path, monkeypatch, mode):
    """A 1000 x 1000 window (pad 499) over a 2 x 2 input: 4 elements to look at, not 10**6."""
    x = np.array([[[[1.0, 4.0], [3.0, 2.0]]]], np.float32)
    layer = xpnet.Pooling(1000, 1000, stride=1, pad=499, mode=mode)
    out, dx = _pool(path, monkeypatch, layer, x, np.ones((1, 1, 1, 1), np.float32))
    if mode == "max":
        np.testing.assert_array_equal(out, [[[[4.0]]]])
        np.testing.assert_array_equal(dx, [[[[0, 1], [0, 0]]]])
    else:  # the padding counts in the divisor (PyTorch's count_include_pad)
        np.testing.assert_allclose(out, [[[[10.0 / 1e6]]]], rtol=1e-6)
        np.testing.assert_allclose(dx, np.full((1, 1, 2, 2), 1e-6), rtol=1e-6)
    if path != "kernels" or mode == "avg":
        assert len(layer.offsets) == 4  # the offsets that reach the input


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch
