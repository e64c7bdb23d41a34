"""Learning-rate schedules: their factors, the Trainer applying them at every step or epoch on
every path, checkpoints that continue them bit-identically, and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_train import spiral

import xpnet
from xpnet.schedules import CosineDecay, Schedule, StepDecay, make_schedule

STEPS = 10  # steps per epoch of the runs below (300 samples, batch 32)


def test_step_decay_multiplies_by_gamma_every_few_epochs():
    s = StepDecay(every=2, gamma=0.5)
    factors = [s.factor(step, STEPS, 6 * STEPS) for step in range(0, 6 * STEPS, STEPS)]
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert {s.factor(step, STEPS, 60) for step in range(20, 30)} == {0.5}  # within an epoch
    warm = StepDecay(every=1, gamma=0.5, warmup_epochs=2)
    assert [warm.factor(e * STEPS, STEPS, 50) for e in range(5)] == [0.5, 1.0, 1.0, 0.5, 0.25]


def test_cosine_decay_warms_up_linearly_then_falls_to_its_floor():
    total = 5 * STEPS
    s = CosineDecay(min_factor=0.1, warmup_epochs=1)
    f = [s.factor(step, STEPS, total) for step in range(total)]
    assert f[:STEPS] == pytest.approx([(i + 1) / STEPS for i in range(STEPS)])
    assert f[STEPS] == 1.0
    assert all(a > b for a, b in zip(f[STEPS:], f[STEPS + 1:]))  # strictly falling
    assert 0.1 < f[-1] < 0.1 + 1e-2
    half = CosineDecay().factor(total // 2, STEPS, total)
    assert half == pytest.approx(0.5)
    assert CosineDecay().factor(total - 1, STEPS, total) > 0  # never a zero rate


@pytest.mark.parametrize(("make", "match"), [
    (lambda: StepDecay(every=0), "every must be an int >= 1"),
    (lambda: StepDecay(every=2.5), "every must be an int >= 1"),
    (lambda: StepDecay(gamma=0.0), r"gamma must be in \(0, 1\]"),
    (lambda: StepDecay(gamma=float("nan")), "gamma must be a finite number"),
    (lambda: StepDecay(warmup_epochs=0.5), "warmup_epochs must be a whole number"),
    (lambda: CosineDecay(min_factor=-0.1), r"min_factor must be in \[0, 1\]"),
    (lambda: CosineDecay(warmup_epochs=-1), "warmup_epochs must be in"),
    (lambda: CosineDecay(min_factor="0"), "min_factor must be a finite number"),
    (lambda: make_schedule("linear"), "unknown learning-rate schedule 'linear'"),
])
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_trainer_refuses_what_is_not_a_schedule():
    net = xpnet.MultiLayerNet([2, 8, 3])
    with pytest.raises(TypeError, match="lr_schedule must be an xpnet.schedules.Schedule"):
        xpnet.Trainer(net, xpnet.SGD(0.1), lr_schedule=lambda step: 0.1)

    class NoRate:
        def update(self, params, grads):
            pass

        def state_dict(self):
            return {}

    with pytest.raises(TypeError, match="needs an optimizer with a number lr"):
        xpnet.Trainer(net, NoRate(), lr_schedule=CosineDecay())


class _Recording(xpnet.Adam):
    """Adam that records the learning rate of every update (the eager steps)."""

    def __init__(self, lr):
        super().__init__(lr)
        self.seen = []

    def update(self, params, grads):
        self.seen.append(self.lr)
        super().update(params, grads)


@pytest.mark.parametrize("schedule", [CosineDecay(0.05, warmup_epochs=0.5),
                                      StepDecay(every=1, gamma=0.5)], ids=["cosine", "step"])
def test_every_step_takes_the_schedules_rate(schedule):
    x, t = spiral()
    opt = _Recording(0.01)
    trainer = xpnet.Trainer(xpnet.MultiLayerNet([2, 16, 3]), opt, batch_size=32, epochs=3,
                            progress=False, lr_schedule=schedule, log_every=3)
    history = trainer.fit(x, t)
    total = 3 * STEPS
    assert opt.seen == [0.01 * schedule.factor(s, STEPS, total) for s in range(total)]
    assert history.lr == [opt.seen[STEPS - 1], opt.seen[2 * STEPS - 1], opt.seen[-1]]
    assert history.config["lr_schedule"] == schedule.config()
    assert opt.lr == 0.01  # the base rate again


def test_the_base_rate_comes_back_after_an_error():
    x, t = spiral()
    opt = xpnet.SGD(0.1)

    def stop(record):
        raise RuntimeError("stop")

    trainer = xpnet.Trainer(xpnet.MultiLayerNet([2, 16, 3]), opt, batch_size=32, epochs=3,
                            progress=False, lr_schedule=CosineDecay())
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit(x, t, on_epoch=stop)
    assert opt.lr == 0.1


def _params(net):
    return {k: np.array(xpnet.to_numpy(v)) for k, v in net.params.items()}


def _scheduled_run(ckpt, optimizer, *, stop_after=None, resume=None, seed=0, device="cpu",
                   compile=False, epochs=4):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 16, 3], seed=seed, device=device)
    trainer = xpnet.Trainer(net, optimizer(0.05), batch_size=32, epochs=epochs, seed=3,
                            progress=False, checkpoint=ckpt,
                            checkpoint_every=None if ckpt is None else 7,
                            compile=compile, lr_schedule=CosineDecay(0.1, warmup_epochs=1))

    def crash(record):
        if record["epoch"] == stop_after:
            raise RuntimeError("simulated crash")

    return net, trainer.fit(x, t, on_epoch=crash, resume=resume)


@pytest.mark.parametrize("optimizer", [xpnet.SGD, xpnet.Momentum, xpnet.Adam])
def test_a_resumed_run_continues_the_schedule_bit_identically(tmp_path, optimizer):
    ref_net, ref = _scheduled_run(tmp_path / "ref.npz", optimizer)
    ckpt = tmp_path / "run.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _scheduled_run(ckpt, optimizer, stop_after=2)
    net, resumed = _scheduled_run(ckpt, optimizer, resume=ckpt, seed=9)
    for k, v in _params(ref_net).items():
        assert np.array_equal(_params(net)[k], v), k
    assert resumed.train_loss == ref.train_loss and resumed.lr == ref.lr


@pytest.mark.slow
def test_a_compiled_run_takes_the_schedule_without_recompiling(tmp_path):
    pytest.importorskip("jax")
    ref_net, ref = _scheduled_run(tmp_path / "ref.npz", xpnet.SGD, device="jax:cpu",
                                  compile="epoch", epochs=2)
    eager_net, eager = _scheduled_run(tmp_path / "eager.npz", xpnet.SGD, device="jax:cpu",
                                      epochs=2)
    assert ref.lr == eager.lr
    for k, v in _params(eager_net).items():
        np.testing.assert_allclose(_params(ref_net)[k], v, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_schedule_is_refused_unchanged(tmp_path):
    ckpt = tmp_path / "c.npz"
    with pytest.raises(RuntimeError):
        _scheduled_run(ckpt, xpnet.SGD, stop_after=1)
    before = ckpt.read_bytes()
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 16, 3], seed=5)
    weights = _params(net)
    trainer = xpnet.Trainer(net, xpnet.SGD(0.05), batch_size=32, epochs=4, seed=3,
                            progress=False, checkpoint=ckpt, lr_schedule=StepDecay(1))
    with pytest.raises(ValueError, match="lr_schedule"):
        trainer.fit(x, t, resume=ckpt)
    assert ckpt.read_bytes() == before
    for k, v in weights.items():
        assert np.array_equal(_params(net)[k], v), k


def test_histories_without_a_rate_still_load(tmp_path):
    old = {"config": {}, "epochs": [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5,
                                     "test_accuracy": None, "seconds": 1.0,
                                     "samples_per_second": 10.0}]}
    path = tmp_path / "h.json"
    path.write_text(json.dumps(old))
    history = xpnet.History.load(path)
    assert history.lr == [None] and history.train_loss == [1.0]
    old["epochs"][0]["learning_rate"] = 0.1
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="an epoch record must have the keys"):
        xpnet.History.load(path)


@pytest.mark.slow
def test_the_command_line_trains_with_a_schedule(tmp_path):
    from test_datasets import make_dataset

    from xpnet import cli

    make_dataset(tmp_path, np.random.default_rng(0), n_train=600, n_test=100)
    out = tmp_path / "h.json"
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "3",
            "--hidden", "8", "--batch-size", "100", "--quiet", "--optimizer", "sgd",
            "--lr", "0.2", "--lr-schedule", "step", "--lr-step", "1", "--lr-gamma", "0.5",
            "--history", str(out)]
    assert cli.main(argv) == 0
    history = xpnet.History.load(out)
    assert history.config["lr_schedule"] == StepDecay(1, 0.5).config()
    assert history.lr == [0.2, 0.1, 0.05]


@pytest.mark.parametrize(("extra", "match"), [
    (["--lr-step", "2"], "--lr-step applies to --lr-schedule step, not constant"),
    (["--lr-schedule", "cosine", "--lr-gamma", "0.5"], "--lr-gamma applies to --lr-schedule step"),
    (["--lr-schedule", "step", "--lr-gamma", "3"], r"--lr-gamma must be in \(0, 1\]"),
    (["--lr-schedule", "cosine", "--warmup-epochs", "-1"], "--warmup-epochs must be in"),
])
def test_schedule_flags_that_do_not_fit_are_one_line(tmp_path, capsys, extra, match):
    from xpnet import cli

    (tmp_path / "empty").mkdir()
    code = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                     *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("xpnet train: error: ")
    assert __import__("re").search(match, err), err


def test_schedules_are_values():
    assert CosineDecay(0.1) == CosineDecay(0.1) != CosineDecay(0.2)
    assert isinstance(make_schedule("cosine"), Schedule) and make_schedule("constant") is None
    assert repr(StepDecay(3)) == "StepDecay(every=3, gamma=0.1, warmup_epochs=0.0)"
    assert not math.isnan(CosineDecay().factor(0, 1, 1))


@pytest.mark.parametrize("optimizer", [xpnet.SGD, xpnet.Momentum])
def test_the_fused_loop_takes_the_rate_of_every_step(monkeypatch, tmp_path, optimizer):
    """With numba, SGD and Momentum run in the fused loop: one call per step under a per-step
    schedule, with the same rates as the layers' steps (equal up to rounding)."""
    fused, history = _scheduled_run(None, optimizer, epochs=3)
    monkeypatch.setenv("XPNET_NO_NUMBA", "1")
    layers, reference = _scheduled_run(None, optimizer, epochs=3)
    assert reference.config["step"] != "fused loop (numba)"
    assert history.lr == reference.lr
    for k, v in _params(layers).items():
        np.testing.assert_allclose(_params(fused)[k], v, rtol=1e-4, atol=1e-6)
