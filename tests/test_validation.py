"""Trainer.fit(validation_split=, validation_data=): a held-out set never trained on, the
same on every backend, with val_loss, val_accuracy and test_loss in the history."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)


def _trainer(**options):
    return xpnet.Trainer(xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5), xpnet.SGD(0.3),
                         batch_size=20, epochs=2, progress=False, **options)


def test_a_validation_split_is_held_out_and_reported():
    x, t = _data()
    history = _trainer().fit(x, t, x[:50], t[:50], validation_split=0.25)
    assert history.config["train_samples"] == 150
    assert history.config["validation"] == {"split": 0.25}
    for r in history.records:
        assert 0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 and r["test_loss"] > 0
    assert len(history.val_loss) == 2


def test_the_held_out_samples_are_never_trained_on():
    """Training on the split's remainder alone gives the same weights: the held-out samples
    took no part in any step."""
    x, t = _data()
    net = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5)
    xpnet.Trainer(net, xpnet.SGD(0.3), batch_size=20, epochs=2, progress=False,
                  blas_threads=1).fit(x, t, validation_split=0.25)
    order = np.random.default_rng([0, 2]).permutation(200)
    keep = np.sort(order[50:])
    alone = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5)
    xpnet.Trainer(alone, xpnet.SGD(0.3), batch_size=20, epochs=2, progress=False,
                  blas_threads=1).fit(x[keep], t[keep])
    for k in net.params:
        np.testing.assert_array_equal(np.asarray(net.params[k]), np.asarray(alone.params[k]))


def test_the_split_is_the_same_on_another_backend():
    pytest.importorskip("array_api_strict")
    x, t = _data()
    a = _trainer().fit(x, t, validation_split=0.2)
    net = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5, dtype="float64")
    net.to("array_api_strict")
    b = xpnet.Trainer(net, xpnet.SGD(0.3), batch_size=20, epochs=2, progress=False).fit(
        xpnet.to_device(x.astype(np.float64), "array_api_strict"),
        xpnet.to_device(t, "array_api_strict"), validation_split=0.2)
    np.testing.assert_allclose(a.val_accuracy, b.val_accuracy, atol=1 / 40 + 1e-9)
    assert a.config["train_samples"] == b.config["train_samples"] == 160


def test_validation_data_of_its_own():
    x, t = _data()
    xv, tv = _data(60, seed=1)
    history = _trainer().fit(x, t, validation_data=(xv, tv))
    assert history.config["validation"] == {"data": 60}
    assert history.test_loss == [None, None] and None not in history.val_loss


@pytest.mark.parametrize(("options", "kind", "match"), [
    ({"validation_split": 0.2, "validation_data": (np.ones((2, 6)), np.zeros(2, int))},
     ValueError, "not both"),
    ({"validation_split": 1.0}, ValueError, r"validation_split must be in \(0, 1\)"),
    ({"validation_split": 0}, ValueError, r"validation_split must be in \(0, 1\)"),
    ({"validation_split": "0.1"}, TypeError, "validation_split must be a number"),
    ({"validation_data": np.ones((2, 6))}, TypeError, "validation_data must be a pair"),
    ({"validation_data": (np.ones((2, 5), np.float32), np.zeros(2, np.int64))}, ValueError,
     "x_val"),
])
def test_validation_options_that_do_not_fit_are_refused_before_training(options, kind, match):
    x, t = _data()
    trainer = _trainer()
    before = {k: np.array(v) for k, v in trainer.net.params.items()}
    with pytest.raises(kind, match=match):
        trainer.fit(x, t, **options)
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.net.params[k], v)


def test_a_checkpoint_resumes_only_with_the_same_validation(tmp_path):
    x, t = _data()
    path = tmp_path / "ck.npz"
    _trainer(checkpoint=path).fit(x, t, validation_split=0.25)
    with pytest.raises(ValueError, match="resume with the same settings"):
        _trainer(checkpoint=path).fit(x, t, validation_split=0.5, resume=path)
