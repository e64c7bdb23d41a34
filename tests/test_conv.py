"""Chapters 6 to 8: what the layer table (layer_specs) does not cover: max pooling's ties,
batch normalization's two modes, dropout's masks, weight decay, the conv nets (gradient
checks, files, training, resume) and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from layer_specs import dropout_reference

import xpnet
from xpnet.backend import device_of, to_numpy


def _nudge_biases(net, rng, scale=0.1):
    """Nonzero biases: with zero biases, the outputs of all-padding windows sit exactly on
    ReLU's kink, where no finite difference agrees with any one-sided derivative."""
    for name in list(net.params):
        if name.startswith("b"):
            p = net.params[name]
            net.params[name] = xpnet.to_device(scale * rng.standard_normal(tuple(p.shape)),
                                               device_of(p), dtype=net.dtype)
    return net


# -- layers ------------------------------------------------------------------------------------


def test_max_pooling_routes_a_tie_to_the_first_maximum_in_row_major_order(case):
    # Every window holds the same value four times: the gradient goes to its top-left.
    x = case.asarray(np.ones((1, 1, 4, 4)))
    pool = xpnet.Pooling(2, 2)
    pool.forward(x)
    dx = to_numpy(pool.backward(case.asarray(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))))
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, 0], expected)
    # A tie between the second and fourth positions: the second (row-major) wins.
    x = case.asarray(np.array([[[[0.0, 5.0], [1.0, 5.0]]]]))
    pool.forward(x)
    dx = to_numpy(pool.backward(case.asarray(np.ones((1, 1, 1, 1)))))
    np.testing.assert_array_equal(dx[0, 0], [[0, 1], [0, 0]])


def test_overlapping_max_windows_add_their_gradients(case):
    x = case.asarray(np.array([[[[0.0, 1.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 0.0]]]]))
    pool = xpnet.Pooling(2, 2, stride=1)
    assert to_numpy(pool.forward(x)).tolist() == [[[[9.0, 9.0], [9.0, 9.0]]]]
    dx = to_numpy(pool.backward(case.asarray(np.ones((1, 1, 2, 2)))))
    assert dx[0, 0, 1, 1] == 4 and dx.sum() == 4  # the centre is every window's maximum


def test_batchnorm_inference_uses_the_running_statistics(case, rng):
    gamma, beta = 1 + rng.random(3), rng.standard_normal(3)
    bn = xpnet.BatchNormalization(case.asarray(gamma), case.asarray(beta), momentum=0.8)
    xs = [2 + 3 * rng.standard_normal((5, 3, 2, 2)) for _ in range(3)]
    mean, var = np.zeros(3), np.ones(3)
    for x in xs:
        bn.forward(case.asarray(x), train=True)
        mean = 0.8 * mean + 0.2 * x.mean(axis=(0, 2, 3))
        var = 0.8 * var + 0.2 * x.var(axis=(0, 2, 3))  # biased, as the book
    assert_close(bn.running_mean, mean, case.dtype_name)
    assert_close(bn.running_var, var, case.dtype_name)
    x = rng.standard_normal((4, 3, 2, 2))
    shape = (1, 3, 1, 1)
    out = bn.forward(case.asarray(x), train=False)
    scale = gamma.reshape(shape) / np.sqrt(var.reshape(shape) + 1e-5)
    assert_close(out, (x - mean.reshape(shape)) * scale + beta.reshape(shape), case.dtype_name)
    assert_close(bn.running_mean, mean, case.dtype_name)  # inference changes nothing
    dout = rng.standard_normal(x.shape)
    dx = bn.backward(case.asarray(dout))
    assert_close(dx, dout * scale, case.dtype_name)  # the statistics are constants there
    xn = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)
    assert_close(bn.dgamma, (dout * xn).sum(axis=(0, 2, 3)), case.dtype_name)


def test_batchnorm_matches_torch_per_feature_and_per_channel(case, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for shape in ((7, 4), (3, 4, 3, 2)):
        x = rng.standard_normal(shape)
        gamma, beta = rng.random(4) + 0.5, rng.standard_normal(4)
        bn = xpnet.BatchNormalization(case.asarray(gamma), case.asarray(beta))
        out = bn.forward(case.asarray(x))
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        expected = F.batch_norm(torch.tensor(x), rm, rv, torch.tensor(gamma), torch.tensor(beta),
                                training=True, momentum=0.1, eps=1e-5)
        assert_close(out, expected.numpy(), case.dtype_name)
        assert_close(bn.running_mean, rm.numpy(), case.dtype_name)  # momentum 0.9 = torch's 0.1
        inference = F.batch_norm(torch.tensor(x), rm, rv, torch.tensor(gamma), torch.tensor(beta),
                                 training=False, eps=1e-5)
        bn.running_var = case.asarray(rv.numpy())  # torch keeps the unbiased variance
        assert_close(bn.forward(case.asarray(x), train=False), inference.numpy(), case.dtype_name)


def test_dropout_masks_are_seeded_counted_and_the_same_on_every_backend(case, rng):
    x = rng.standard_normal((20, 30))
    drop = xpnet.Dropout(0.3, seed=5)
    first = drop.forward(case.asarray(x))
    second = drop.forward(case.asarray(x))
    assert drop.draws == 2
    assert_close(first, dropout_reference(x, 0.3, 5, 0), case.dtype_name)
    assert_close(second, dropout_reference(x, 0.3, 5, 1), case.dtype_name)
    assert not np.array_equal(to_numpy(first) == 0, to_numpy(second) == 0)
    dx = drop.backward(case.asarray(np.ones_like(x)))
    np.testing.assert_array_equal(to_numpy(dx) == 0, to_numpy(second) == 0)
    # Inference: the identity, no mask drawn.
    assert drop.forward(case.asarray(x), train=False) is not None and drop.draws == 2
    assert_close(drop.forward(case.asarray(x), train=False), x, case.dtype_name)


def test_dropout_mask_statistics():
    x = np.ones((400, 500), dtype=np.float32)
    for ratio in (0.1, 0.5, 0.8):
        out = xpnet.Dropout(ratio, seed=1).forward(x)
        kept = out != 0
        # 200000 Bernoulli draws: the kept fraction within 5 standard deviations.
        sd = np.sqrt(ratio * (1 - ratio) / x.size)
        assert abs(kept.mean() - (1 - ratio)) < 5 * sd
        np.testing.assert_allclose(out[kept], 1 / (1 - ratio), rtol=1e-6)
        assert abs(out.mean() - 1) < 5 * sd / (1 - ratio)  # inverted: the mean is kept
        # No correlation between rows and columns of the mask.
        assert abs(np.corrcoef(kept[:, :-1].ravel(), kept[:, 1:].ravel())[0, 1]) < 0.02
    a, b = xpnet.Dropout(0.5, seed=1), xpnet.Dropout(0.5, seed=2)
    assert not np.array_equal(a.forward(x), b.forward(x))


@pytest.mark.parametrize("make, error, match", [
    (lambda: xpnet.Convolution(np.ones((2, 1, 3)), np.ones(2)), ValueError, "W must be 4-D"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(3)), ValueError,
     r"b must have shape \(FN,\) = \(2,\)"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(2, np.float32)), TypeError,
     "share a dtype"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(2), stride=0), ValueError,
     "stride must be an int >= 1"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(2), pad=1.5), TypeError,
     "pad must be an int"),
    (lambda: xpnet.Pooling(2, 2, mode="median"), ValueError, "mode must be one of"),
    (lambda: xpnet.Pooling(0, 2), ValueError, "pool_h must be an int >= 1"),
    (lambda: xpnet.Pooling(2, 2, pad=2), ValueError, "pad must be at most half"),
    (lambda: xpnet.BatchNormalization(np.ones(3), np.ones(4)), ValueError,
     "gamma and beta must share"),
    (lambda: xpnet.BatchNormalization(np.ones(3), np.ones(3), momentum=1.5), ValueError,
     "momentum must be in"),
    (lambda: xpnet.BatchNormalization(np.ones(3), np.ones(3), eps=0), ValueError, "eps must be > 0"),
    (lambda: xpnet.Dropout(1.0), ValueError, r"ratio must be in \[0.0, 1.0\)"),
    (lambda: xpnet.Dropout(0.5, seed=-1), ValueError, "seed must be >= 0"),
])
def test_layer_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("layer, x, error, match", [
    (lambda: xpnet.Convolution(np.ones((2, 3, 3, 3)), np.ones(2)), np.ones((2, 1, 5, 5)),
     ValueError, r"has 1 channels, but the layer expects 3"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(2)), np.ones((2, 25)),
     ValueError, r"batch of images \(N, C, H, W\), got shape \(2, 25\)"),
    (lambda: xpnet.Convolution(np.ones((2, 1, 3, 3)), np.ones(2)), np.ones((2, 1, 2, 5)),
     ValueError, r"3x3 window with pad 0 does not fit"),
    (lambda: xpnet.Pooling(3, 3), np.ones((1, 1, 2, 2)), ValueError, "does not fit"),
    (lambda: xpnet.BatchNormalization(np.ones(3), np.ones(3)), np.ones((2, 4)), ValueError,
     r"\(N, 3\) or \(N, 3, H, W\)"),
    (lambda: xpnet.Dropout(), np.arange(4), TypeError, "real floating"),
])
def test_layer_input_errors(layer, x, error, match):
    with pytest.raises(error, match=match):
        layer().forward(x)


# -- nets --------------------------------------------------------------------------------------

_SMALL_DEEP = {f"conv_param_{i}": {"filter_num": 2, "filter_size": 3, "pad": 2 if i == 4 else 1,
                                   "stride": 1} for i in range(1, 7)}


def _small_simple(device="cpu", dtype="float32", **kw):
    return xpnet.SimpleConvNet((2, 7, 6), {"filter_num": 3, "filter_size": 3, "pad": 1,
                                           "stride": 2}, 5, 3, weight_init_std=0.5,
                               device=device, dtype=dtype, **kw)


@pytest.mark.parametrize("mode", ["full", "sampled", "directional"])
def test_simple_conv_net_passes_the_gradient_check(case, mode, rng):
    net = _nudge_biases(_small_simple(case.device.name, case.dtype_name, weight_decay=0.1), rng)
    x, t = rng.standard_normal((4, 2, 7, 6)), np.array([0, 1, 2, 1])
    report = xpnet.check_gradients(net, case.asarray(x), case.asarray(t), mode=mode)
    assert report.ok, report
    assert [r.name for r in report.rows] == ["W1", "b1", "W2", "b2", "W3", "b3"]


@pytest.mark.parametrize("mode", ["full", "sampled", "directional"])
def test_deep_conv_net_passes_the_gradient_check_with_dropout_and_decay(case, mode, rng):
    net = xpnet.DeepConvNet((1, 8, 8), **_SMALL_DEEP, hidden_size=5, output_size=3,
                            weight_decay=0.05, device=case.device.name, dtype=case.dtype_name)
    _nudge_biases(net, rng)
    x, t = rng.standard_normal((4, 1, 8, 8)), np.array([0, 1, 2, 1])
    report = xpnet.check_gradients(net, case.asarray(x), case.asarray(t), mode=mode)
    assert report.ok, report
    assert len(report.rows) == 16
    assert [net.state[k] for k in ("draws1", "draws2")] == [0, 0]  # left as it was


def test_multilayer_net_with_batchnorm_and_dropout_passes_the_gradient_check(case, rng):
    net = xpnet.MultiLayerNet([5, 6, 6, 3], use_batchnorm=True, use_dropout=True,
                              dropout_ratio=0.2, weight_decay=0.1, device=case.device.name,
                              dtype=case.dtype_name)
    _nudge_biases(net, rng)
    x, t = rng.standard_normal((6, 5)), np.array([0, 1, 2, 0, 1, 2])
    report = xpnet.check_gradients(net, case.asarray(x), case.asarray(t))
    assert report.ok, report
    assert [r.name for r in report.rows] == ["W1", "b1", "gamma1", "beta1", "W2", "b2",
                                             "gamma2", "beta2", "W3", "b3"]


def test_weight_decay_adds_half_lambda_w_squared_to_the_loss_and_lambda_w_to_the_gradient(rng):
    plain = xpnet.MultiLayerNet([4, 5, 3], dtype="float64")
    decayed = xpnet.MultiLayerNet([4, 5, 3], weight_decay=0.3, dtype="float64")
    x, t = rng.standard_normal((6, 4)), np.array([0, 1, 2, 0, 1, 2])
    w2 = sum(float(np.sum(plain.params[k] ** 2)) for k in ("W1", "W2"))
    assert float(decayed.loss(x, t)) == pytest.approx(float(plain.loss(x, t)) + 0.15 * w2, rel=1e-12)
    g0, g1 = plain.gradient(x, t), decayed.gradient(x, t)
    for k in ("W1", "W2"):
        np.testing.assert_allclose(g1[k], g0[k] + 0.3 * plain.params[k], rtol=1e-12)
    for k in ("b1", "b2"):  # biases are not decayed
        np.testing.assert_array_equal(g1[k], g0[k])


def test_fused_sgd_step_applies_weight_decay_like_the_plain_update(rng):
    x, t = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    fused = xpnet.MultiLayerNet([4, 6, 3], weight_decay=0.2, dtype="float64")
    plain = xpnet.MultiLayerNet([4, 6, 3], weight_decay=0.2, dtype="float64")
    fused.train_step(x, t, xpnet.SGD(0.1))
    xpnet.Momentum(0.1, momentum=0.0).update(plain.params, plain.gradient(x, t))
    for k in fused.params:
        np.testing.assert_allclose(fused.params[k], plain.params[k], rtol=1e-12, atol=1e-15)


def test_nets_keep_the_book_parameter_names_and_shapes():
    net = xpnet.SimpleConvNet()
    assert {k: tuple(v.shape) for k, v in net.params.items()} == {
        "W1": (30, 1, 5, 5), "b1": (30,), "W2": (4320, 100), "b2": (100,), "W3": (100, 10),
        "b3": (10,)}
    deep = xpnet.DeepConvNet()
    assert [tuple(deep.params[f"W{i}"].shape) for i in range(1, 9)] == [
        (16, 1, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3),
        (64, 64, 3, 3), (1024, 50), (50, 10)]
    # He initialisation: the std of each weight is sqrt(2 / fan_in).
    assert np.std(deep.params["W7"]) == pytest.approx(np.sqrt(2 / 1024), rel=0.02)
    assert list(deep.layers)[-3:] == ["Dropout1", "Affine2", "Dropout2"]
    assert deep.predict(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


def test_predict_in_inference_mode_is_deterministic_and_training_mode_is_not(rng):
    net = xpnet.MultiLayerNet([4, 8, 3], use_dropout=True, use_batchnorm=True, dtype="float64")
    x = rng.standard_normal((5, 4))
    np.testing.assert_array_equal(net.predict(x), net.predict(x))
    assert not np.array_equal(net.predict(x, train=True), net.predict(x, train=True))
    assert net.state["draws1"] == 2
    assert float(net.loss(x, np.zeros(5, np.int64))) == float(net.loss(x, np.zeros(5, np.int64)))


@pytest.mark.parametrize("device", ["cpu", "array_api_strict", "torch:cpu"])
def test_conv_nets_save_and_load_with_their_state_on_any_device(tmp_path, device, rng):
    if device.startswith("torch"):
        pytest.importorskip("torch")
    net = xpnet.MultiLayerNet([4, 6, 3], use_batchnorm=True, use_dropout=True, weight_decay=0.01)
    net.train_step(rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 3, 8),
                   xpnet.Adam())
    path = tmp_path / "m.npz"
    net.save(path)
    back = xpnet.MultiLayerNet.load(path, device=device)
    assert back.weight_decay == 0.01 and back.state["draws1"] == 1
    for k in net.state:
        if k.startswith("running"):
            np.testing.assert_array_equal(to_numpy(back.state[k]), net.state[k])
            assert device_of(back.state[k]).name == back.device
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(to_numpy(back.predict(xpnet.to_device(x, device))), net.predict(x),
                               rtol=1e-6)
    for cls, made in ((xpnet.SimpleConvNet, _small_simple()),
                      (xpnet.DeepConvNet, xpnet.DeepConvNet((1, 8, 8), **_SMALL_DEEP))):
        made.save(tmp_path / "c.npz")
        loaded = cls.load(tmp_path / "c.npz", device=device)
        assert loaded.config() == made.config() and repr(loaded).split("device")[0] == \
            repr(made).split("device")[0]
        x = rng.standard_normal((2, *made._args["input_dim"])).astype(np.float32)
        np.testing.assert_allclose(to_numpy(loaded.predict(xpnet.to_device(x, device))),
                                   made.predict(x), rtol=1e-5, atol=1e-6)


def test_a_model_file_with_bad_state_is_refused(tmp_path):
    from xpnet._io import read_npz, write_npz

    net = xpnet.MultiLayerNet([4, 6, 3], use_batchnorm=True)
    net.save(tmp_path / "m.npz")
    header, arrays = read_npz(tmp_path / "m.npz")
    bad = dict(arrays, **{"state/running_var1": np.full(6, np.nan, np.float32)})
    write_npz(tmp_path / "nan.npz", header, bad)
    with pytest.raises(ValueError, match=r"running_var1.*NaN"):
        xpnet.MultiLayerNet.load(tmp_path / "nan.npz")
    short = {k: v for k, v in arrays.items() if k != "state/running_mean1"}
    write_npz(tmp_path / "short.npz", header, short)
    with pytest.raises(ValueError, match=r"state missing \['running_mean1'\]"):
        xpnet.MultiLayerNet.load(tmp_path / "short.npz")


@pytest.mark.parametrize("make, match", [
    (lambda: xpnet.SimpleConvNet((1, 4, 4)), "after conv_param .* nothing is left"),
    (lambda: xpnet.SimpleConvNet(conv_param={"filter_num": 3}), "must be a dict with the keys"),
    (lambda: xpnet.SimpleConvNet((1, 28)), r"input_dim must be \(channels, height, width\)"),
    (lambda: xpnet.DeepConvNet((1, 2, 2)), "nothing is left"),
    (lambda: xpnet.DeepConvNet(dropout_ratio=1.0), r"dropout_ratio must be a number in \[0, 1\)"),
    (lambda: xpnet.MultiLayerNet([4, 3], weight_decay=-1.0), "weight_decay must be"),
    (lambda: xpnet.SimpleConvNet(hidden_size=0), "hidden_size must be an int >= 1"),
])
def test_net_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- training ----------------------------------------------------------------------------------


def _images(rng, n=120):
    """Two classes of 8x8 images: a bright left half or a bright right half, with noise."""
    t = rng.integers(0, 2, n)
    x = 0.3 * rng.standard_normal((n, 1, 8, 8))
    x[t == 0, :, :, :4] += 1.0
    x[t == 1, :, :, 4:] += 1.0
    return x.astype(np.float32), t


def test_simple_conv_net_learns_images_on_each_backend(case, rng):
    x, t = _images(rng)
    net = xpnet.SimpleConvNet((1, 8, 8), {"filter_num": 4, "filter_size": 3, "pad": 1,
                                          "stride": 1}, 8, 2, weight_init_std="he",
                              device=case.device.name, dtype=case.dtype_name)
    history = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=20, epochs=3,
                            progress=False).fit(case.asarray(x), case.asarray(t))
    assert history.train_accuracy[-1] > 0.9


def test_dropout_and_batchnorm_runs_resume_to_the_uninterrupted_result(tmp_path, rng):
    x, t = _images(rng, 90)

    def run(checkpoint=None, epochs=3, resume=None):
        net = xpnet.MultiLayerNet([64, 16, 16, 2], use_batchnorm=True, use_dropout=True,
                                  dropout_ratio=0.3)
        trainer = xpnet.Trainer(net, xpnet.Momentum(0.05), batch_size=20, epochs=epochs,
                                progress=False, checkpoint=checkpoint)
        trainer.fit(x.reshape(90, -1), t, resume=resume)
        return net

    whole = run()
    path = tmp_path / "ck.npz"
    run(checkpoint=path, epochs=1)
    resumed = run(checkpoint=path, resume=path)
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k])
    for k, v in whole.state.items():
        np.testing.assert_array_equal(resumed.state[k], v)
    assert whole.state["draws1"] == 15  # 5 batches a epoch, 3 epochs


def test_compile_takes_dropout_and_batchnorm_and_refuses_other_stateful_layers():
    pytest.importorskip("jax")
    net = xpnet.MultiLayerNet([4, 6, 3], use_dropout=True, use_batchnorm=True, device="jax:cpu")
    assert xpnet.Trainer(net, xpnet.SGD(0.1), compile=True).compiled_steps is not None

    class Noisy(xpnet.Relu):  # a training mode of its own, which a compiled step cannot know
        has_train_mode = True

        def forward(self, x, train=True):
            return super().forward(x)

    W = xpnet.to_device(np.ones((4, 3)), "jax:cpu", dtype="float32")
    b = xpnet.to_device(np.zeros(3), "jax:cpu", dtype="float32")
    net = xpnet.Sequential([xpnet.Affine(W, b), Noisy()])
    with pytest.raises(ValueError, match="compile does not support nets with Noisy"):
        xpnet.Trainer(net, xpnet.SGD(0.1), compile=True)


def test_to_moves_the_layers_state_with_the_parameters():
    net = xpnet.MultiLayerNet([4, 5, 3], use_batchnorm=True, use_dropout=True)
    net.to("array_api_strict:device1", "float64")
    assert device_of(net.state["running_mean1"]).name == "array_api_strict:device1"
    assert net.state["running_var1"].dtype == net.params["gamma1"].dtype
    assert net.state["draws1"] == 0
    x = xpnet.to_device(np.ones((3, 4)), "array_api_strict:device1", dtype="float64")
    assert net.predict(x).shape == (3, 3)


def test_compiled_training_of_a_simple_conv_net_matches_eager(rng):
    pytest.importorskip("jax")
    x, t = _images(rng, 60)
    weights = []
    for compile in (False, True):
        net = xpnet.SimpleConvNet((1, 8, 8), {"filter_num": 3, "filter_size": 3, "pad": 1,
                                              "stride": 1}, 6, 2, weight_init_std="he",
                                  device="jax:cpu")
        xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=20, epochs=2, progress=False,
                      compile=compile).fit(x, t)
        weights.append({k: to_numpy(v) for k, v in net.params.items()})
    for k in weights[0]:
        np.testing.assert_allclose(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5)
