"""The fused training loop (numba, ``xpnet._fused``) gives the layers' results, applies only
where it should, and the BLAS thread policy decides, applies and records the threads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import xpnet
from xpnet import _fast
from xpnet.optim import make_optimizer

fused = pytest.mark.skipif(_fast.fused_module() is None,
                           reason="numba not installed (pip install 'xpnet[fast]') or no BLAS "
                           "fast path: the fused loop is off")


def _data(n=530, d=784, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d), dtype=np.float32), rng.integers(0, classes, n)


def _train(monkeypatch, numba: bool, sizes, optimizer, *, dtype="float32", epochs=2, batch=100,
           x=None, t=None, **net_options):
    monkeypatch.setenv("XPNET_NO_NUMBA", "0" if numba else "1")
    if x is None:
        x, t = _data(d=sizes[0], classes=sizes[-1])
    net = xpnet.MultiLayerNet(sizes, dtype=dtype, **net_options)
    opt = make_optimizer(optimizer, 0.05)
    history = xpnet.Trainer(net, opt, batch_size=batch, epochs=epochs, progress=False).fit(x, t)
    return net, opt, history


def _assert_same_training(a, b, dtype):
    (net_a, opt_a, hist_a), (net_b, opt_b, hist_b) = a, b
    rtol = 1e-11 if dtype == "float64" else 2e-4
    for key in net_a.params:
        np.testing.assert_allclose(net_a.params[key], net_b.params[key], rtol=rtol,
                                   atol=rtol * float(np.max(np.abs(net_b.params[key]))),
                                   err_msg=key)
    np.testing.assert_allclose(hist_a.train_loss, hist_b.train_loss, rtol=rtol)
    assert hist_a.train_accuracy == pytest.approx(hist_b.train_accuracy, abs=0.01)
    assert opt_a.steps == opt_b.steps
    for key, slots in opt_b.state.items():
        for slot, value in slots.items():
            np.testing.assert_allclose(opt_a.state[key][slot], value, rtol=rtol,
                                       atol=rtol * float(np.max(np.abs(value))))


@fused
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_loop_gives_the_layers_results(monkeypatch, optimizer, activation, dtype,
                                            weight_decay):
    # 530 samples in batches of 100: the last batch of every epoch has 30.
    sizes = [784, 40, 30, 10]
    options = {"activation": activation, "weight_decay": weight_decay, "dtype": dtype}
    fast = _train(monkeypatch, True, sizes, optimizer, **options)
    layers = _train(monkeypatch, False, sizes, optimizer, **options)
    assert fast[2].config["step"] == "fused loop (numba)"
    assert layers[2].config["step"] == "layers"
    _assert_same_training(fast, layers, dtype)


@fused
@pytest.mark.parametrize("sizes, batch", [([784, 50, 10], 100), ([20, 3], 7), ([5, 9, 8, 7, 6, 4], 64)])
def test_fused_loop_on_other_depths_and_batches(monkeypatch, sizes, batch):
    # One affine layer alone, and five; a batch size that divides nothing; more than one
    # batch per class width.
    x, t = _data(n=300, d=sizes[0], classes=sizes[-1], seed=1)
    runs = [_train(monkeypatch, numba, sizes, "sgd", dtype="float64", batch=batch, x=x, t=t)
            for numba in (True, False)]
    assert runs[0][2].config["step"] == "fused loop (numba)"
    _assert_same_training(*runs, "float64")


@fused
def test_fused_loop_takes_image_shaped_inputs_and_a_twolayernet(monkeypatch):
    x, t = _data(n=200, d=784)
    images = x.reshape(200, 1, 28, 28)
    runs = []
    for numba in ("0", "1"):
        monkeypatch.setenv("XPNET_NO_NUMBA", numba)
        net = xpnet.TwoLayerNet(784, 20, 10, dtype="float64")
        hist = xpnet.Trainer(net, xpnet.Momentum(0.1), epochs=2, progress=False).fit(
            images.astype(np.float64), t)
        runs.append((net, hist))
    assert runs[0][1].config["step"] == "fused loop (numba)"
    for key in runs[0][0].params:
        np.testing.assert_allclose(runs[0][0].params[key], runs[1][0].params[key], rtol=1e-11)


@fused
def test_fused_loop_takes_weights_replaced_between_epochs(monkeypatch):
    # A transposed (F-ordered) or read-only W assigned between epochs is trained as its value.
    x, t = _data(n=300)
    nets = []
    for numba in (True, False):
        monkeypatch.setenv("XPNET_NO_NUMBA", "0" if numba else "1")
        net = xpnet.MultiLayerNet([784, 20, 10], dtype="float64")
        trainer = xpnet.Trainer(net, xpnet.Momentum(0.05), epochs=2, progress=False)

        def replace(record, net=net):
            net.params["W2"] = np.asfortranarray(np.array(net.params["W2"]))
            frozen = np.array(net.params["b1"])
            frozen.flags.writeable = False
            net.params["b1"] = frozen

        trainer.fit(x.astype(np.float64), t, on_epoch=replace)
        nets.append(net)
    for key in nets[0].params:
        np.testing.assert_allclose(nets[0].params[key], nets[1].params[key], rtol=1e-11)


@fused
def test_fused_loop_leaves_the_data_as_it_was(monkeypatch):
    x, t = _data()
    x0, t0 = x.copy(), t.copy()
    _train(monkeypatch, True, [784, 20, 10], "momentum", x=x, t=t)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


@fused
def test_fused_loop_is_only_taken_where_it_computes_the_same(monkeypatch):
    monkeypatch.setenv("XPNET_NO_NUMBA", "0")
    x, t = _data(n=200)
    onehot = np.eye(10, dtype=np.float32)[t]

    def step(net, opt, targets=t, inputs=x):
        return xpnet.Trainer(net, opt, epochs=1, progress=False).fit(inputs, targets).config["step"]

    assert step(xpnet.MultiLayerNet([784, 20, 10]), xpnet.SGD(0.1)) == "fused loop (numba)"
    assert step(xpnet.MultiLayerNet([784, 20, 10]), xpnet.Adam()) == "layers"
    assert step(xpnet.MultiLayerNet([784, 20, 10]), xpnet.AdaGrad()) == "layers"
    assert step(xpnet.MultiLayerNet([784, 20, 10], use_batchnorm=True), xpnet.SGD(0.1)) == "layers"
    assert step(xpnet.MultiLayerNet([784, 20, 10], use_dropout=True), xpnet.SGD(0.1)) == "layers"
    assert step(xpnet.MultiLayerNet([784, 20, 10]), xpnet.SGD(0.1), onehot) == "layers"

    class MySGD(xpnet.SGD):  # a subclass may change the step: the layers' path
        pass

    assert step(xpnet.MultiLayerNet([784, 20, 10]), MySGD(0.1)) == "layers"
    net = xpnet.Sequential([xpnet.Affine(np.zeros((784, 10), np.float32), np.zeros(10, np.float32)),
                            xpnet.Relu()])
    assert step(net, xpnet.SGD(0.1)) == "layers"  # ends in an activation
    logged = xpnet.MultiLayerNet([784, 20, 10])
    calls = []
    plain_step = logged.train_step
    logged.train_step = lambda *a, **k: calls.append(1) or plain_step(*a, **k)
    assert step(logged, xpnet.SGD(0.1)) == "layers" and len(calls) == 2  # its own step

    class Clipped(xpnet.MultiLayerNet):
        def loss(self, x, t, **kw):
            return super().loss(x, t, **kw)

    assert step(Clipped([784, 20, 10]), xpnet.SGD(0.1)) == "layers"
    strict = xpnet.MultiLayerNet([784, 20, 10], device="array_api_strict")
    assert step(strict, xpnet.SGD(0.1)) == "layers"


@fused
def test_fused_loop_resumes_to_the_uninterrupted_result(monkeypatch, tmp_path):
    monkeypatch.setenv("XPNET_NO_NUMBA", "0")
    x, t = _data(n=530)

    def trainer(net, opt, **kw):
        return xpnet.Trainer(net, opt, batch_size=100, epochs=3, progress=False, **kw)

    whole = xpnet.MultiLayerNet([784, 30, 10])
    trainer(whole, xpnet.Momentum(0.05)).fit(x, t)

    class Stop(Exception):
        pass

    def stop_after_first(record):
        raise Stop

    ck = tmp_path / "ck.npz"
    net = xpnet.MultiLayerNet([784, 30, 10])
    with pytest.raises(Stop):
        trainer(net, xpnet.Momentum(0.05), checkpoint=ck, checkpoint_every=4).fit(
            x, t, on_epoch=stop_after_first)
    resumed = xpnet.MultiLayerNet([784, 30, 10])
    history = trainer(resumed, xpnet.Momentum(0.05), checkpoint=ck).fit(x, t, resume=ck)
    assert history.config["step"] == "fused loop (numba)"
    for key in whole.params:
        np.testing.assert_array_equal(resumed.params[key], whole.params[key])


@fused
def test_fused_loop_reports_divergence_at_the_layers_step(monkeypatch):
    x, t = _data(n=300)
    messages = []
    for numba in ("0", "1"):
        monkeypatch.setenv("XPNET_NO_NUMBA", numba)
        net = xpnet.MultiLayerNet([784, 30, 10], weight_init=50.0)
        with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                      match=r"epoch 1, step \d") as err:
            xpnet.Trainer(net, xpnet.SGD(1e30), epochs=2, progress=False).fit(x, t)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_without_numba_the_layers_train(monkeypatch):
    # numba not importable: the fused loop is off and the Trainer runs the layers.
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.setitem(sys.modules, "xpnet._fused", None)
    monkeypatch.delitem(_fast._state, "fused", raising=False)
    monkeypatch.setenv("XPNET_NO_NUMBA", "0")
    assert _fast.fused_module() is None
    x, t = _data(n=200)
    net = xpnet.MultiLayerNet([784, 20, 10])
    history = xpnet.Trainer(net, xpnet.SGD(0.1), epochs=2, progress=False).fit(x, t)
    assert history.config["step"] == "layers"
    assert history.train_loss[1] < history.train_loss[0]
    monkeypatch.delitem(_fast._state, "fused")  # found again after the test


# -- the thread policy ---------------------------------------------------------------------


def _blas_threads():
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.mark.parametrize("sizes, batch, threads", [
    ([784, 50, 10], 100, 1),  # 3.9M multiply-adds: one thread
    ([784, 100, 10], 100, 1),
    ([784, 1024, 10], 256, "all"),  # 205M: every core
    ([784, 400, 10], 110, "all"),  # 34.5M, just above the threshold
])
def test_thread_policy_by_the_largest_product(sizes, batch, threads, monkeypatch):
    monkeypatch.delenv("XPNET_BLAS_THREADS", raising=False)
    monkeypatch.setattr(_fast, "idle_cores", lambda: None)  # whatever else runs meanwhile
    net = xpnet.MultiLayerNet(sizes)
    chosen, reason = _fast.thread_policy(net, (784,), batch)
    assert chosen == (_fast.usable_cores() if threads == "all" else threads)
    assert reason.startswith("auto: largest product")
    assert _fast.largest_product(net, (784,), batch) == batch * max(
        a * b for a, b in zip(sizes[:-1], sizes[1:]))


def test_largest_product_of_conv_nets(monkeypatch):
    monkeypatch.setattr(_fast, "idle_cores", lambda: float(os.cpu_count()))  # an idle machine
    net = xpnet.SimpleConvNet()  # conv 30 x 1 x 5 x 5 over 24 x 24 outputs; affine 4320 x 100
    assert _fast.largest_product(net, (1, 28, 28), 100) == 100 * max(24 * 24 * 30 * 25, 4320 * 100)
    deep = xpnet.DeepConvNet()
    assert _fast.largest_product(deep, (1, 28, 28), 100) >= 100 * 28 * 28 * 16 * 16 * 9
    assert _fast.thread_policy(deep, (1, 28, 28), 100)[0] == _fast.usable_cores()


@pytest.mark.parametrize(("idle", "chosen"), [(2.0, 2), (1.6, 2), (1.4, 1), (0.9, 1), (0.0, 1),
                                              (None, 2)])
def test_large_products_take_the_cores_that_are_idle(monkeypatch, idle, chosen):
    """Beside a busy process, a thread that must wait for a core stalls every product: a run
    takes the cores found idle when it starts (a short look at /proc/stat)."""
    monkeypatch.delenv("XPNET_BLAS_THREADS", raising=False)
    monkeypatch.setattr(_fast, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(_fast, "idle_cores", lambda: idle)
    threads, reason = _fast.thread_policy(xpnet.SimpleConvNet(), (1, 28, 28), 100)
    assert threads == chosen
    assert ("busy" in reason) == (chosen < 2), reason


def test_the_load_check_reads_the_machine():
    idle = _fast.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= os.cpu_count() + 1e-9


def test_thread_policy_overrides(monkeypatch):
    net = xpnet.MultiLayerNet([784, 50, 10])
    monkeypatch.setenv("XPNET_BLAS_THREADS", "3")
    assert _fast.thread_policy(net, (784,), 100) == (3, "set by XPNET_BLAS_THREADS")
    assert _fast.thread_policy(net, (784,), 100, 2) == (2, "set by the caller")
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("XPNET_BLAS_THREADS", bad)
        with pytest.raises(ValueError, match="XPNET_BLAS_THREADS must be a whole number"):
            _fast.thread_policy(net, (784,), 100)


def test_trainer_applies_records_and_restores_the_threads(monkeypatch):
    monkeypatch.delenv("XPNET_BLAS_THREADS", raising=False)
    before = _blas_threads()
    x, t = _data(n=200)
    seen = []
    net = xpnet.MultiLayerNet([784, 20, 10])
    history = xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False).fit(
        x, t, on_epoch=lambda record: seen.append(_blas_threads()))
    assert seen == [{1}]
    assert history.config["blas_threads"] == 1
    assert "auto" in history.config["thread_policy"]
    assert _blas_threads() == before
    history = xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False, blas_threads=2).fit(
        x, t, on_epoch=lambda record: seen.append(_blas_threads()))
    assert seen[-1] == {2} and history.config["blas_threads"] == 2


def test_thread_count_does_not_change_a_float64_run_much(monkeypatch):
    x, t = _data(n=300)
    nets = []
    for threads in (1, 2):
        net = xpnet.MultiLayerNet([784, 40, 10], dtype="float64")
        xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False, blas_threads=threads).fit(
            x.astype(np.float64), t)
        nets.append(net)
    for key in nets[0].params:
        np.testing.assert_allclose(nets[0].params[key], nets[1].params[key], rtol=1e-10)


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                        (1.5, TypeError), ("2", TypeError)])
def test_trainer_refuses_bad_blas_threads(value, exc):
    with pytest.raises(exc, match="blas_threads"):
        xpnet.Trainer(xpnet.MultiLayerNet([4, 3]), xpnet.SGD(0.1), blas_threads=value)


def test_bad_environment_threads_fail_before_training(monkeypatch):
    monkeypatch.setenv("XPNET_BLAS_THREADS", "lots")
    x, t = _data(n=100)
    net = xpnet.MultiLayerNet([784, 20, 10])
    before = {k: np.array(v) for k, v in net.params.items()}
    with pytest.raises(ValueError, match="XPNET_BLAS_THREADS"):
        xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False).fit(x, t)
    for key, value in before.items():
        np.testing.assert_array_equal(net.params[key], value)


def test_info_reports_the_thread_policy_and_the_fused_loop():
    out = subprocess.run([sys.executable, "-m", "xpnet", "info"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "XPNET_NO_NUMBA": "1"})
    assert out.returncode == 0, out.stderr
    assert "BLAS threads in training: 1 where a step's largest product is under" in out.stdout
    assert "fused training loop: off (XPNET_NO_NUMBA is set)" in out.stdout
