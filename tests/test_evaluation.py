"""The Trainer's evaluation: every few epochs, on a sample of the training set or none of it,
in batches sized by the net's memory, shown on the progress bar as it goes."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import spiral

import xpnet
from xpnet import train


def _fit(**options):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 16, 3])
    trainer = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=32, progress=False,
                            **{"epochs": 3, **options})
    return net, trainer, trainer.fit(x, t, x[:90], t[:90]), (x, t)


def test_accuracies_every_few_epochs_and_after_the_last():
    _, _, history, _ = _fit(epochs=5, eval_every=2)
    assert [a is None for a in history.train_accuracy] == [True, False, True, False, False]
    assert [a is None for a in history.test_accuracy] == [True, False, True, False, False]
    assert all(loss is not None for loss in history.train_loss)
    assert history.config["eval_every"] == 2


def test_the_training_accuracy_on_a_fixed_sample():
    net, _, history, (x, t) = _fit(eval_train=50, seed=4)
    ids = np.sort(np.random.default_rng([4, 1]).permutation(x.shape[0])[:50])
    assert history.train_accuracy[-1] == net.accuracy(x[ids], t[ids])
    assert history.config["eval_train"] == 50
    _, _, again, _ = _fit(eval_train=50, seed=4)
    assert again.train_accuracy == history.train_accuracy  # the same sample every time


def test_no_training_accuracy_and_the_whole_set():
    _, _, none, _ = _fit(eval_train=0)
    assert none.train_accuracy == [None] * 3 and None not in none.test_accuracy
    net, _, whole, (x, t) = _fit(eval_train=10**6)  # more than there are: all of them
    assert whole.train_accuracy[-1] == net.accuracy(x, t)


def test_the_evaluation_batch_changes_nothing_but_its_speed():
    _, _, default, _ = _fit()
    _, _, small, _ = _fit(eval_batch_size=7)
    assert default.train_accuracy == small.train_accuracy
    assert default.test_accuracy == small.test_accuracy
    assert default.config["eval_batch_size"] == 1000 and small.config["eval_batch_size"] == 7


def test_the_default_evaluation_batch_follows_the_nets_memory():
    rng = np.random.default_rng(0)
    x = rng.random((120, 1, 28, 28), dtype=np.float32)
    t = rng.integers(0, 10, 120)
    net = xpnet.DeepConvNet((1, 28, 28))
    history = xpnet.Trainer(net, xpnet.Adam(), batch_size=60, epochs=1, progress=False,
                            eval_train=0).fit(x, t)
    # about 1.3 MB per sample: the training batch, not 1000 samples (1.3 GB)
    assert history.config["eval_batch_size"] == 60


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"eval_every": 0}, ValueError, "eval_every must be >= 1"),
    ({"eval_train": -1}, ValueError, "eval_train must be an int >= 0"),
    ({"eval_train": "10"}, TypeError, "eval_train must be an int"),
    ({"eval_batch_size": 0}, ValueError, "eval_batch_size must be >= 1"),
])
def test_bad_evaluation_settings_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        xpnet.Trainer(xpnet.MultiLayerNet([2, 4, 3]), xpnet.SGD(0.1), **options)


def test_the_bar_shows_the_evaluation_as_it_goes(monkeypatch):
    seen = []
    monkeypatch.setattr(train._Progress, "evaluating",
                        lambda self, what, done, total: seen.append((what, done, total)))
    _fit(epochs=1, eval_batch_size=5)
    train_calls = [s for s in seen if s[0] == "train"]
    test_calls = [s for s in seen if s[0] == "test"]
    assert train_calls[0] == ("train", 0, 300) and len(train_calls) >= 10
    assert [d for _, d, _ in train_calls] == sorted(d for _, d, _ in train_calls)
    assert test_calls[0] == ("test", 0, 90)
    assert seen.index(test_calls[0]) > seen.index(train_calls[-1])
