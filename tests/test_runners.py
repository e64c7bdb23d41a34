"""The seam behind Trainer.fit: every way of running steps is a runners.Runner chosen by
runners.choose; a new one plugs in by registering a factory; the eager runner's unchecked
steps compute what the checked public methods compute."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet import runners


def _data(n=64, d=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d), dtype=np.float32), rng.integers(0, c, n)


def test_a_registered_runner_takes_the_steps_without_touching_the_trainer():
    calls = []

    class Counting(runners.EagerSteps):
        name = "counting"

        def advance(self, run, order, start, stop):
            calls.append((start, stop))
            return super().advance(run, order, start, stop)

    def factory(trainer, run):
        return Counting(trainer.net, trainer.optimizer, trainer.batch_size)

    runners.register(factory)
    try:
        x, t = _data()
        history = xpnet.Trainer(xpnet.TwoLayerNet(12, 8, 4), xpnet.Adam(), batch_size=16,
                                epochs=2, progress=False).fit(x, t)
    finally:
        runners.FACTORIES.remove(factory)
    assert history.config["step"] == "counting"
    assert [s for s, _ in calls] == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adam"])
def test_unchecked_steps_equal_the_checked_train_step(optimizer, monkeypatch):
    monkeypatch.setenv("XPNET_NO_NUMBA", "1")
    x, t = _data()
    a = xpnet.MultiLayerNet([12, 10, 4], use_batchnorm=True, use_dropout=True, weight_decay=0.01)
    b = xpnet.MultiLayerNet([12, 10, 4], use_batchnorm=True, use_dropout=True, weight_decay=0.01)
    opt_a, opt_b = (xpnet.optim.make_optimizer(optimizer) for _ in range(2))
    for i in range(0, 64, 16):
        la = a.train_step(x[i:i + 16], t[i:i + 16], opt_a)
        lb = b.unchecked_step(x[i:i + 16], t[i:i + 16], opt_b)
        assert float(la) == float(lb)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert opt_a.steps == opt_b.steps == 4


def test_optimizers_expose_steps_and_state_publicly():
    opt = xpnet.Momentum(0.1)
    p = np.ones(3, np.float32)
    slots = opt.slots("W1", p)
    assert set(slots) == {"v"} and slots["v"].shape == (3,) and opt.slots("W1", p) is slots
    opt.record_steps(5)
    assert opt.steps == 5
    opt.record_steps(2, {"W1": {"v": np.zeros(3, np.float32)}})
    assert opt.steps == 7 and set(opt.state) == {"W1"}
    assert xpnet.SGD(0.1).slots("W1", p) == {}
    with pytest.raises(ValueError, match="'W1' has shape \\(3,\\), the parameter \\(4,\\)"):
        opt.check_state_fits({"W1": np.ones(4, np.float32)})


def test_a_net_that_changes_its_step_keeps_it_and_its_checks():
    seen = []

    class Logged(xpnet.Sequential):
        def train_step(self, x, t, optimizer, **kw):
            seen.append(x.shape[0])
            return super().train_step(x, t, optimizer, **kw)

    rng = np.random.default_rng(0)
    net = Logged([xpnet.Affine(rng.random((12, 4), dtype=np.float32), np.zeros(4, np.float32))])
    x, t = _data()
    history = xpnet.Trainer(net, xpnet.Momentum(0.1), batch_size=16, epochs=1,
                            progress=False).fit(x, t)
    assert seen == [16] * 4 and history.config["step"] == "layers"
