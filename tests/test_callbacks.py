"""Callbacks: EarlyStopping (stops, restores the best epoch's weights), ModelCheckpoint (the
best model, atomically), your own; their state survives a resume."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet.callbacks import Callback, EarlyStopping, ModelCheckpoint


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)


def _trainer(callbacks, epochs=12, lr=2.0, **options):
    net = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5)
    # Every run takes the net's own step (a crashing run wraps it), so they all round alike.
    step = net.train_step
    net.train_step = lambda *a, **k: step(*a, **k)
    return xpnet.Trainer(net, xpnet.SGD(lr), batch_size=30, epochs=epochs, progress=False,
                         blas_threads=1, callbacks=callbacks, **options)


class _Recorder(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.seen.append((epoch, logs["val_loss"],
                          {k: xpnet.to_numpy(v).copy() for k, v in trainer.net.params.items()}))


def test_early_stopping_stops_and_ends_with_the_best_epochs_weights():
    x, t = _data()
    recorder, stop = _Recorder(), EarlyStopping(patience=2)
    history = _trainer([recorder, stop]).fit(x, t, validation_split=0.2)
    losses = history.val_loss
    best = int(np.argmin(losses))
    assert len(history) == best + 1 + 2 < 12  # stopped two epochs after the best
    assert history.config["stopped_early_at"] == len(history)
    assert stop.best_epoch == best + 1 and stop.best == pytest.approx(losses[best])


def test_restore_best_puts_the_best_weights_into_the_net():
    x, t = _data()
    recorder, stop = _Recorder(), EarlyStopping(patience=2)
    trainer = _trainer([recorder, stop])
    history = trainer.fit(x, t, validation_split=0.2)
    best = int(np.argmin(history.val_loss))
    for k, v in recorder.seen[best][2].items():
        np.testing.assert_array_equal(np.asarray(trainer.net.params[k]), v)
    keep = _trainer([EarlyStopping(patience=2, restore_best=False)])
    keep.fit(x, t, validation_split=0.2)
    assert any(not np.array_equal(np.asarray(keep.net.params[k]), v)
               for k, v in recorder.seen[best][2].items())


def test_model_checkpoint_keeps_the_best_model(tmp_path):
    x, t = _data()
    path = tmp_path / "best.npz"
    recorder = _Recorder()
    trainer = _trainer([recorder, ModelCheckpoint(path)], epochs=6)
    history = trainer.fit(x, t, validation_split=0.2)
    best = int(np.argmax(history.val_accuracy))  # (the first of equals)
    saved = xpnet.TwoLayerNet.load(path)
    for k, v in recorder.seen[best][2].items():
        np.testing.assert_array_equal(np.asarray(saved.params[k]), v)


def test_a_monitor_the_fit_does_not_record_is_refused_before_training(tmp_path):
    x, t = _data()
    trainer = _trainer([EarlyStopping()])
    before = {k: np.array(v) for k, v in trainer.net.params.items()}
    with pytest.raises(ValueError, match="monitors 'val_loss', which this fit does not record"):
        trainer.fit(x, t)
    for k, v in before.items():
        np.testing.assert_array_equal(trainer.net.params[k], v)
    with pytest.raises(TypeError, match="callbacks must have on_epoch_end"):
        _trainer([object()])
    with pytest.raises(ValueError, match="patience must be an int >= 0"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="does not exist"):
        ModelCheckpoint(tmp_path / "missing" / "m.npz")


@pytest.mark.parametrize("crash_at", [5, 23])  # mid-epoch 1; in epoch 3, after an improvement
def test_a_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path, crash_at):
    x, t = _data()
    whole = _trainer([EarlyStopping(patience=2)])
    reference = whole.fit(x, t, validation_split=0.2)
    path = tmp_path / "ck.npz"
    crashing = _trainer([EarlyStopping(patience=2)], checkpoint=path, checkpoint_every=3)
    step, calls = crashing.net.train_step, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("crash")
        return step(*a, **k)

    crashing.net.train_step = crash
    with pytest.raises(RuntimeError):
        crashing.fit(x, t, validation_split=0.2)
    resumed = _trainer([EarlyStopping(patience=2)], checkpoint=path)
    history = resumed.fit(x, t, validation_split=0.2, resume=path)
    assert len(history) == len(reference)
    assert history.config.get("stopped_early_at") == reference.config["stopped_early_at"]
    for k in whole.net.params:
        np.testing.assert_array_equal(np.asarray(resumed.net.params[k]),
                                      np.asarray(whole.net.params[k]))


def test_a_checkpoint_with_other_callbacks_is_refused(tmp_path):
    x, t = _data()
    path = tmp_path / "ck.npz"
    _trainer([EarlyStopping(patience=50)], epochs=2, checkpoint=path).fit(
        x, t, validation_split=0.2)
    with pytest.raises(ValueError, match="resume with the same callbacks"):
        _trainer([ModelCheckpoint(tmp_path / "m.npz")], epochs=3, checkpoint=path).fit(
            x, t, validation_split=0.2, resume=path)


def test_a_run_resumed_after_it_stopped_early_stays_stopped(tmp_path):
    x, t = _data()
    path = tmp_path / "ck.npz"
    first = _trainer([EarlyStopping(patience=2)], checkpoint=path)
    reference = first.fit(x, t, validation_split=0.2)
    assert len(reference) < 12
    again = _trainer([EarlyStopping(patience=2)], checkpoint=path)
    history = again.fit(x, t, validation_split=0.2, resume=path)
    assert history.records == reference.records  # no epoch more
    assert history.config["stopped_early_at"] == reference.config["stopped_early_at"]
    for k in first.net.params:  # the best epoch's weights, as the first run ended
        np.testing.assert_array_equal(np.asarray(again.net.params[k]),
                                      np.asarray(first.net.params[k]))


def test_early_stopping_on_every_backend(case):
    x, t = _data()
    net = xpnet.TwoLayerNet(6, 8, 3, weight_init_std=0.5, dtype=case.dtype_name)
    net.to(case.device)
    recorder, stop = _Recorder(), EarlyStopping(patience=2)
    trainer = xpnet.Trainer(net, xpnet.SGD(2.0), batch_size=30, epochs=12, progress=False,
                            callbacks=[recorder, stop])
    history = trainer.fit(case.asarray(x), case.asarray(t), validation_split=0.2)
    assert history.config["train_samples"] == 240
    assert len(history) < 12 and history.config["stopped_early_at"] == len(history)
    best = int(np.argmin(history.val_loss))
    assert stop.best_epoch == best + 1
    for k, v in recorder.seen[best][2].items():  # the net ends with the best epoch's weights
        np.testing.assert_array_equal(xpnet.to_numpy(trainer.net.params[k]), v)
