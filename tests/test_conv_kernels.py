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
    assert np.array_equal(np.signbit(fast_out), np.signbit(out))  # (ties of -0.0 and 0.0)
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
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=20, epochs=2, progress=False,
                      blas_threads=1).fit(x, t)
        return {k: np.array(v) for k, v in net.params.items()}

    layer = xpnet.Convolution(rng.standard_normal((30, 1, 5, 5)).astype(dtype),
                              rng.standard_normal(30).astype(dtype))
    fast, trained = layer.forward(x), train()
    assert speedups.filters(layer.W.reshape(30, -1), layer.col, layer.b) is not NotImplemented
    monkeypatch.setattr(speedups, "filters", None)
    np.testing.assert_array_equal(layer.forward(x), fast)
    for k, v in train().items():
        np.testing.assert_array_equal(trained[k], v, err_msg=k)


def _relu_then_pool(relu, pool, x, dout):
    """The two layers' own math, one after the other (what the fused step replaces)."""
    out = pool.forward(relu.forward(x))
    return out, relu.backward(pool.backward(dout))


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", [c for c in CASES if c[2] >= max(c[0], c[1])], ids=str)
@pytest.mark.parametrize("values", ["random", "ties", "special"])
def test_a_relu_and_the_max_pool_after_it_run_as_one_to_the_bit(case, dtype, values):
    """Pooling maximum(x, 0) in one pass gives the Relu-then-pool output and gradient bits:
    windows all <= 0 (their gradient's signed zero at the first offset), NaN, -0.0, padding."""
    ph, pw, stride, pad, h, w = case
    rng = np.random.default_rng(hash((case, values, "relu")) % 2**32)
    x = rng.standard_normal((3, 2, h, w)).astype(dtype)
    if values == "ties":
        x = np.round(x).astype(dtype)
        x[0, 1] = -np.abs(x[0, 1])  # whole channels <= 0
    elif values == "special":
        x.flat[rng.integers(0, x.size, 6)] = np.nan
        x.flat[rng.integers(0, x.size, 6)] = -0.0
        x[0, 0] = -np.inf
    oh = (h + 2 * pad - ph) // stride + 1
    ow = (w + 2 * pad - pw) // stride + 1
    dout = rng.standard_normal((3, 2, oh, ow)).astype(dtype)
    relu, pool = xpnet.Relu(), xpnet.Pooling(ph, pw, stride=stride, pad=pad)
    out, dx = _relu_then_pool(relu, pool, x, dout)
    (step,) = speedups.fuse_layers([relu, pool])
    assert type(step) is _fast.ReluMaxPool
    x_before = x.copy()
    fused_out = step.forward(x)
    assert step.arg is not None  # the fused pass ran
    np.testing.assert_array_equal(fused_out, out)
    assert np.array_equal(np.signbit(fused_out), np.signbit(out))
    fused_dx = step.backward(dout)
    np.testing.assert_array_equal(fused_dx, dx)
    assert np.array_equal(np.signbit(fused_dx), np.signbit(dx))
    np.testing.assert_array_equal(x, x_before)


@needs_numba
def test_what_the_fused_pass_cannot_match_takes_the_layers_own_math():
    """Overlapping windows, a pooling switched to average after the plan was made, float16
    and non-NumPy arrays: the Relu and the pooling run one after the other, as unfused."""
    import array_api_strict as strict
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    for pool, data in [(xpnet.Pooling(3, 3, stride=2), x),
                       (xpnet.Pooling(2, 2), x.astype(np.float16)),
                       (xpnet.Pooling(2, 2), strict.asarray(x))]:
        relu = xpnet.Relu()
        (step,) = speedups.fuse_layers([relu, pool])
        out = step.forward(data)
        assert step.arg is None
        expected = xpnet.Pooling(pool.pool_h, pool.pool_w, stride=pool.stride).forward(
            xpnet.Relu().forward(data))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
        dout = np.ones(out.shape, dtype=np.asarray(out).dtype)
        dout = strict.asarray(dout) if not isinstance(data, np.ndarray) else dout
        assert step.backward(dout).shape == data.shape
    relu, pool = xpnet.Relu(), xpnet.Pooling(2, 2)
    (step,) = speedups.fuse_layers([relu, pool])
    pool.mode = "avg"
    np.testing.assert_array_equal(step.forward(x), xpnet.Pooling(2, 2, mode="avg").forward(
        np.maximum(x, 0)))
    assert step.arg is None


def test_only_a_relu_right_before_a_max_pool_is_fused():
    if speedups.fuse_layers is None:
        pytest.skip("no speed module")

    class MyRelu(xpnet.Relu):
        pass

    relu, pool = xpnet.Relu(), xpnet.Pooling(2, 2)
    kinds = [type(s).__name__ for s in speedups.fuse_layers(
        [relu, xpnet.Pooling(2, 2, mode="avg"), MyRelu(), pool, pool, xpnet.Relu(), relu, pool])]
    assert kinds == ["Relu", "Pooling", "MyRelu", "Pooling", "Pooling", "Relu", "ReluMaxPool"]


@pytest.mark.parametrize("model", ["SimpleConvNet", "DeepConvNet"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_training_with_the_relu_and_pool_fused_is_bit_identical(monkeypatch, model, optimizer):
    """The Trainer's steps take the fused pair (where the speed module is there) and end with
    the weights and losses of the layers run one by one."""
    rng = np.random.default_rng(6)
    x = rng.random((60, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 10, 60)

    def train():
        net = getattr(xpnet, model)((1, 28, 28), seed=2)
        history = xpnet.Trainer(net, getattr(xpnet, optimizer)(0.01), batch_size=20, epochs=2,
                                progress=False, eval_train=0, blas_threads=1).fit(x, t)
        # (one thread in both: the thread policy looks at the machine's load, and another
        # thread count changes the products' last digits)
        return net, history

    fused, fused_history = train()
    monkeypatch.setattr(speedups, "fuse_layers", None)
    plain, plain_history = train()
    assert fused_history.train_loss == plain_history.train_loss
    for k in plain.params:
        np.testing.assert_array_equal(fused.params[k], plain.params[k], err_msg=k)


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "fh", "fw", "stride", "pad"), [
    ((3, 2, 9, 8), 3, 3, 1, 1), ((2, 1, 28, 28), 5, 5, 1, 0), ((2, 3, 10, 11), 3, 2, 2, 2),
    ((1, 2, 4, 4), 4, 4, 1, 0), ((2, 2, 7, 7), 1, 1, 3, 0), ((4, 3, 14, 14), 3, 3, 1, 2),
    ((2, 2, 9, 9), 2, 3, 3, 1),
])
def test_col2im_in_one_pass_gives_the_portable_sums_bits(monkeypatch, shape, fh, fw, stride,
                                                         pad, dtype):
    """The compiled col2im adds each element's contributions in the portable order: the same
    bits (signed zeros and NaN included), in the same channel-major layout."""
    import array_api_compat.numpy as xp

    from xpnet.functional import col2im, conv_output_size
    n, c, h, w = shape
    rows = c * fh * fw
    cols = n * conv_output_size(h, fh, stride, pad) * conv_output_size(w, fw, stride, pad)
    rng = np.random.default_rng(7)
    col = rng.standard_normal((rows, cols)).astype(dtype)
    col.flat[rng.integers(0, col.size, 5)] = -0.0
    col.flat[rng.integers(0, col.size, 2)] = np.nan
    col_before = col.copy()
    fast = col2im(xp, col, shape, fh, fw, stride, pad)
    assert speedups.col2im(col, shape, fh, fw, stride, pad) is not NotImplemented
    monkeypatch.setattr(speedups, "col2im", None)
    slow = col2im(xp, col, shape, fh, fw, stride, pad)
    assert fast.shape == slow.shape == shape and fast.dtype == slow.dtype
    np.testing.assert_array_equal(fast, slow)
    assert np.array_equal(np.signbit(fast), np.signbit(slow))
    assert fast.transpose(1, 0, 2, 3).flags.c_contiguous  # channel-major, as the portable's
    np.testing.assert_array_equal(col, col_before)
