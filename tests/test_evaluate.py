"""xpnet.evaluate: the loss, accuracy, per-class accuracy and confusion matrix of a net on a
labelled set, in bounded batches, on any backend; and the book's load_mnist names."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet


def _trained(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    t = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)  # 3 classes
    net = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5)
    xpnet.Trainer(net, xpnet.SGD(0.5), batch_size=30, epochs=5, progress=False).fit(x, t)
    return net, x, t


def test_evaluate_agrees_with_the_net_and_a_count_by_hand():
    net, x, t = _trained()
    result = xpnet.evaluate(net, x, t, batch_size=64)
    predicted = np.asarray(net.predict(x)).argmax(axis=1)
    expected = np.zeros((3, 3), dtype=np.int64)
    for true, guess in zip(t, predicted):
        expected[true, guess] += 1
    np.testing.assert_array_equal(result.confusion_matrix, expected)
    assert result.confusion_matrix.dtype == np.int64 and result.samples == 300
    assert result.accuracy == pytest.approx(net.accuracy(x, t))
    np.testing.assert_allclose(result.per_class_accuracy,
                               np.diag(expected) / expected.sum(axis=1))
    assert result.loss == pytest.approx(float(net.loss(x, t)), rel=1e-5)
    text = str(result)
    assert "accuracy" in text and "confusion matrix" in text and "per class accuracy" in text


def test_one_hot_rows_and_other_batch_sizes_give_the_same_evaluation():
    net, x, t = _trained(1)
    rows = np.eye(3, dtype=np.float32)[t]
    a = xpnet.evaluate(net, x, t)
    b = xpnet.evaluate(net, x, rows, batch_size=7)
    np.testing.assert_array_equal(a.confusion_matrix, b.confusion_matrix)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_a_class_without_samples_has_nan_accuracy():
    net, x, t = _trained(2)
    keep = t != 2
    result = xpnet.evaluate(net, x[keep], t[keep])
    assert np.isnan(result.per_class_accuracy[2])
    assert result.confusion_matrix[2].sum() == 0


@pytest.mark.parametrize(("args", "kind", "match"), [
    (lambda x, t: (x, t[:-1]), ValueError, "x has 300 samples but t has 299"),
    (lambda x, t: (x, t + 5), ValueError, r"labels outside \[0, 3\)"),
    (lambda x, t: (x[:0], t[:0]), ValueError, "no samples"),
    (lambda x, t: (x, t.astype(np.float32)), ValueError, "integer labels"),
])
def test_evaluate_refuses_what_does_not_fit(args, kind, match):
    net, x, t = _trained()
    with pytest.raises(kind, match=match):
        xpnet.evaluate(net, *args(x, t))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        xpnet.evaluate(net, x, t, batch_size=0)
    with pytest.raises(TypeError, match="net"):
        xpnet.evaluate("net", x, t)


def test_evaluate_on_another_backend():
    pytest.importorskip("array_api_strict")
    net, x, t = _trained()
    host = xpnet.evaluate(net, x, t)
    net.to("array_api_strict")
    moved = xpnet.evaluate(net, x, t, batch_size=50)
    np.testing.assert_array_equal(host.confusion_matrix, moved.confusion_matrix)


def test_load_mnist_takes_the_books_one_hot_label(tmp_path):
    from test_datasets import make_dataset

    from xpnet.datasets import load_mnist
    make_dataset(tmp_path, np.random.default_rng(0), n_train=20, n_test=10)
    (_, t), _ = load_mnist("mnist", data_dir=tmp_path, one_hot_label=True)
    assert t.shape == (20, 10) and t.dtype == np.float32
    (_, t), _ = load_mnist("mnist", data_dir=tmp_path, one_hot_label=False)
    assert t.shape == (20,)
    with pytest.raises(ValueError, match="one_hot=True and one_hot_label=False disagree"):
        load_mnist("mnist", data_dir=tmp_path, one_hot=True, one_hot_label=False)
    with pytest.raises(TypeError, match="normalize must be True or False"):
        load_mnist("mnist", data_dir=tmp_path, normalize="yes")


@pytest.mark.parametrize("make", [
    lambda: xpnet.SimpleConvNet(), lambda: xpnet.DeepConvNet(),
    lambda: xpnet.MultiLayerNet([784, 100, 10], use_batchnorm=True, use_dropout=True),
    lambda: xpnet.TwoLayerNet(784, 50, 10),
], ids=["SimpleConvNet", "DeepConvNet", "MultiLayerNet", "TwoLayerNet"])
def test_the_summary_lists_every_layer_with_its_shape_and_parameters(make):
    net = make()
    state = {k: np.array(v) for k, v in net.state.items()}
    before = {name: dict(vars(layer)) for name, layer in net.layers.items()}
    text = net.summary()
    rows = text.splitlines()
    for name, layer in net.layers.items():
        (row,) = [r for r in rows if r.startswith(name + " ")]
        count = sum(int(np.prod(p.shape)) for p in layer.params.values())
        assert row.rstrip().endswith(f"{count:,}") and "?" not in row, row
    total = sum(int(np.prod(p.shape)) for p in net.params.values())
    assert f"total: {total:,} parameters" in text
    assert "(N, 10)" in text  # the scores
    for k, v in state.items():  # inference mode: no statistic or draw changed
        np.testing.assert_array_equal(np.asarray(net.state[k]), v)
    for name, layer in net.layers.items():
        assert vars(layer).keys() == before[name].keys()
        assert all(vars(layer)[k] is before[name][k] for k in before[name])


def test_a_summary_without_a_known_input_shape_asks_for_one():
    net = xpnet.Sequential([xpnet.Convolution(np.ones((4, 1, 3, 3), np.float32),
                                              np.zeros(4, np.float32)), xpnet.Relu()])
    assert "?" in net.summary()
    assert "(N, 4, 6, 6)" in net.summary((1, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be one sample's shape"):
        net.summary((0, 8))
    assert "?" in net.summary((3, 8, 8))  # does not fit the filters: shapes unknown
