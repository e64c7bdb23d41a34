"""The compiled max-pooling kernels of the speed module give exactly what the portable
Pooling computes: the same maxima, the same offsets (ties, NaN, -inf, padding), the same
gradients."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet import _fast, speedups

needs_numba = pytest.mark.skipif(_fast.fused_module() is None,
                                reason="numba is not installed (the extra fast)")

CASES = [  # (pool_h, pool_w, stride, pad, H, W)
    (2, 2, 2, 0, 24, 24), (2, 2, 2, 0, 7, 9), (3, 3, 2, 1, 14, 14), (3, 2, 1, 1, 5, 6),
    (1, 1, 1, 0, 4, 4), (4, 4, 3, 2, 9, 10), (2, 3, 3, 0, 8, 8),
]


def _portable(monkeypatch, layer, x, dout):
    with monkeypatch.context() as m:
        m.setattr(speedups, "max_pool", None)
        m.setattr(speedups, "max_pool_backward", None)
        out = layer.forward(x)
        return np.array(out), np.array(layer.arg), layer.backward(dout)


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("values", ["random", "ties", "special"])
def test_the_kernels_equal_the_portable_pooling(monkeypatch, case, dtype, values):
    ph, pw, stride, pad, h, w = case
    rng = np.random.default_rng(hash((case, values)) % 2**32)
    x = rng.standard_normal((3, 2, h, w)).astype(dtype)
    if values == "ties":
        x = np.round(x).astype(dtype)  # many equal maxima in a window
    elif values == "special":
        x.flat[rng.integers(0, x.size, 6)] = np.nan
        x.flat[rng.integers(0, x.size, 6)] = -np.inf
        x[0, 0] = -np.inf  # whole windows of -inf (padding cells among them)
    layer = xpnet.Pooling(ph, pw, stride=stride, pad=pad)
    oh = (h + 2 * pad - ph) // stride + 1
    ow = (w + 2 * pad - pw) // stride + 1
    dout = rng.standard_normal((3, 2, oh, ow)).astype(dtype)
    out, arg, dx = _portable(monkeypatch, layer, x, dout)
    fast_out = layer.forward(x)
    assert type(fast_out) is np.ndarray and not np.shares_memory(fast_out, x)
    np.testing.assert_array_equal(fast_out, out)  # NaN where NaN
    np.testing.assert_array_equal(layer.arg, arg)
    np.testing.assert_array_equal(layer.backward(dout), dx)


@needs_numba
def test_arrays_the_kernels_do_not_take_go_the_portable_way():
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert speedups.max_pool(x.astype(np.float16), 2, 2, 2, 0, 4, 4) is NotImplemented
    assert speedups.max_pool(x.tolist(), 2, 2, 2, 0, 4, 4) is NotImplemented


@needs_numba
def test_strided_views_take_the_kernels(monkeypatch):
    """A convolution's output is a transposed view: the kernels read any strides."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 8, 10)).astype(np.float32).transpose(1, 0, 2, 3)[:, :, :, ::2]
    dout = rng.standard_normal((3, 2, 4, 3)).astype(np.float32).transpose(1, 0, 2, 3)
    layer = xpnet.Pooling(3, 2, stride=2, pad=1)
    out, arg, dx = _portable(monkeypatch, layer, x, dout)
    assert speedups.max_pool(x, 3, 2, 2, 1, 4, 3) is not NotImplemented
    np.testing.assert_array_equal(layer.forward(x), out)
    np.testing.assert_array_equal(layer.arg, arg)
    np.testing.assert_array_equal(layer.backward(dout), dx)



@needs_numba
@pytest.mark.parametrize("hw", [(8, 10), (9, 7)])
def test_the_books_windows_on_a_convolutions_output(monkeypatch, hw):
    """2 x 2, stride 2 (the unrolled kernels) on a transposed view with odd sizes too: the
    uncovered last row or column gets a zero gradient."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, *hw)).astype(np.float32).transpose(1, 0, 2, 3)
    x[0, 0, 0, :4] = 1.0  # ties
    layer = xpnet.Pooling(2, 2)
    dout = rng.standard_normal((4, 3, hw[0] // 2, hw[1] // 2)).astype(np.float32)
    dout = dout.transpose(1, 0, 2, 3)
    out, arg, dx = _portable(monkeypatch, layer, x, dout)
    np.testing.assert_array_equal(layer.forward(x), out)
    np.testing.assert_array_equal(layer.arg, arg)
    np.testing.assert_array_equal(layer.backward(dout), dx)


@pytest.mark.parametrize(("shape", "fh", "fw", "stride", "pad"), [
    ((3, 2, 9, 8), 3, 3, 1, 1), ((2, 1, 28, 28), 5, 5, 1, 0), ((2, 3, 10, 11), 3, 2, 2, 2),
    ((1, 2, 4, 4), 4, 4, 1, 0), ((2, 2, 7, 7), 1, 1, 3, 0),
])
def test_im2col_in_one_copy_equals_the_portable_columns(monkeypatch, shape, fh, fw, stride, pad):
    import array_api_compat.numpy as xp

    from xpnet.functional import im2col
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    views = [x, x.transpose(1, 0, 2, 3).copy().transpose(1, 0, 2, 3)]  # also a transposed view
    fast = [im2col(xp, v, fh, fw, stride, pad) for v in views]
    monkeypatch.setattr(speedups, "im2col", None)
    for v, f in zip(views, fast):
        slow = im2col(xp, v, fh, fw, stride, pad)
        assert f.flags.c_contiguous and f.shape == slow.shape
        np.testing.assert_array_equal(f, slow)


@pytest.mark.skipif(_fast.library() is None, reason="no BLAS fast path for this NumPy")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_filters_product_with_its_bias_in_one_gemm_is_bit_identical(monkeypatch, dtype):
    """The convolution's product with the bias broadcast into its output first (one gemm with
    beta = 1) gives the bits of the product and an add, also through a whole training run."""
    rng = np.random.default_rng(4)
    x = rng.random((40, 1, 28, 28)).astype(dtype)
    t = rng.integers(0, 10, 40)
    b1 = 0.1 * rng.standard_normal(30).astype(dtype)

    def train():
        net = xpnet.SimpleConvNet(dtype=dtype, seed=1)
        net.params["b1"] = b1.copy()
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=20, epochs=2, progress=False).fit(x, t)
        return {k: np.array(v) for k, v in net.params.items()}

    layer = xpnet.Convolution(rng.standard_normal((30, 1, 5, 5)).astype(dtype),
                              rng.standard_normal(30).astype(dtype))
    fast, trained = layer.forward(x), train()
    assert speedups.filters(layer.W.reshape(30, -1), layer.col, layer.b) is not NotImplemented
    monkeypatch.setattr(speedups, "filters", None)
    np.testing.assert_array_equal(layer.forward(x), fast)
    for k, v in train().items():
        np.testing.assert_array_equal(trained[k], v, err_msg=k)
