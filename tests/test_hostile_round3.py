"""The third hostile round's library cases: a weight decay that overflows the loss, thread
counts past what a BLAS library takes, and what a divergence is blamed on."""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import xpnet


def _data(n=40, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(np.float32), rng.integers(0, classes, n)


def test_a_weight_decay_whose_term_is_infinite_is_refused_before_any_step():
    net = xpnet.MultiLayerNet([6, 5, 3], weight_decay=1e308)
    before = {k: np.array(v) for k, v in net.params.items()}
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"weight_decay=1e\+308 makes the loss's L2 term"):
        trainer.fit(*_data())
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)


def test_a_divergence_of_a_net_with_weight_decay_names_it_too():
    net = xpnet.MultiLayerNet([6, 5, 3], weight_decay=1e30)
    trainer = xpnet.Trainer(net, xpnet.SGD(1e10), batch_size=10, epochs=3, progress=False)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match="learning rate or the weight decay"):
        trainer.fit(*_data())


@pytest.mark.parametrize("threads", [10**20, 4097, 2**31])
def test_thread_counts_past_a_c_int_are_refused(threads):
    with pytest.raises(ValueError, match=f"blas_threads must be at most 4096, got {threads}"):
        xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), blas_threads=threads)


def test_the_history_records_the_threads_the_blas_library_runs():
    from xpnet import speedups
    if speedups.blas_threads is None:
        pytest.skip("no speed module")
    history = xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), batch_size=10, epochs=1,
                            progress=False, blas_threads=4096).fit(*_data())
    threads = history.config["blas_threads"]
    assert 1 <= threads <= 4096
    if threads < 4096:
        assert "4096 asked, the BLAS library runs at most" in history.config["thread_policy"]


# -- absurd values in files: checked as they will be held, before anything is assigned -----


def _bn_dropout_net(dtype="float64"):
    return xpnet.MultiLayerNet([6, 5, 3], use_batchnorm=True, use_dropout=True, dtype=dtype)


def _layer(net, kind):
    return next(layer for layer in net.layers.values() if type(layer).__name__ == kind)


@pytest.mark.parametrize(("change", "load_dtype", "match"), [
    (lambda n: setattr(_layer(n, "BatchNormalization"), "running_var", -np.ones(5)), None,
     r"running_var1'\] holds negative values"),
    (lambda n: setattr(_layer(n, "BatchNormalization"), "running_mean", np.full(5, 1e300)),
     "float32", r"running_mean1'\] holds NaN or infinite values in float32"),
    (lambda n: n.params.__setitem__("W1", np.full((6, 5), 1e300)), "float32",
     "W1 holds values beyond float32's range"),
    (lambda n: setattr(_layer(n, "Dropout"), "draws", 2**62 + 1), None,
     r"draws1'\] must be an int in \[0, 4611686018427387904\]"),
], ids=["negative variance", "mean past float32", "weights past float32", "draws past int64"])
def test_values_a_net_file_holds_are_checked_as_they_will_be_held(tmp_path, change, load_dtype,
                                                                  match):
    net = _bn_dropout_net()
    change(net)
    net.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match=match):
        xpnet.MultiLayerNet.load(tmp_path / "m.npz", dtype=load_dtype)


def test_a_header_dtype_other_than_float32_or_64_is_refused(tmp_path):
    from xpnet import checkpoint
    net = xpnet.TwoLayerNet(6, 5, 3)
    config = {**net.config(), "dtype": "float16"}
    checkpoint.save_model(tmp_path / "m.npz", config, {k: np.asarray(v) for k, v in
                                                       net.params.items()})
    with pytest.raises(ValueError, match="header's dtype 'float16' is not one of"):
        xpnet.TwoLayerNet.load(tmp_path / "m.npz")


def test_load_blames_an_unknown_device_not_the_file(tmp_path):
    xpnet.TwoLayerNet(6, 5, 3).save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="^unknown device 'gpu0'"):
        xpnet.TwoLayerNet.load(tmp_path / "m.npz", device="gpu0")


def test_a_checkpoint_in_a_missing_directory_is_refused_before_training(tmp_path):
    net = xpnet.TwoLayerNet(6, 5, 3)
    before = {k: np.array(v) for k, v in net.params.items()}
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False,
                            checkpoint=tmp_path / "missing" / "ck.npz")
    with pytest.raises(ValueError, match=r"checkpoint .*ck.npz: the directory .*missing' does "
                                         "not exist"):
        trainer.fit(*_data())
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)


def _slot(kind, value_of):
    def change(state):
        slots = state.optimizer["state"]
        key = next(iter(slots))
        slots[key][kind] = value_of(slots[key][kind])
    return change


@pytest.mark.parametrize(("change", "match"), [
    (_slot("v", lambda v: v.astype(np.complex128)), "has dtype complex128, expected real"),
    (_slot("v", lambda v: v.astype(np.int64)), "has dtype int64, expected real"),
    (_slot("v", lambda v: -np.abs(v) - 1.0), "holds negative values; it is a sum of squares"),
    (_slot("m", lambda v: np.full_like(v, 1e300, dtype=np.float64)),
     "holds NaN or infinite values in float32"),
    (lambda s: s.net_state.__setitem__("running_mean1", np.full(5, 1e300)),
     "holds NaN or infinite values in float32"),
    (lambda s: s.optimizer.__setitem__("steps", 2**63), "step count must be an int in"),
], ids=["complex", "int64", "negative v", "m past float32", "mean past float32", "steps"])
def test_a_refused_checkpoint_changes_neither_net_nor_optimizer(tmp_path, change, match):
    from xpnet import checkpoint
    x, t = _data()
    path = tmp_path / "ck.npz"
    net = xpnet.MultiLayerNet([6, 5, 3], use_batchnorm=True)
    xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=10, epochs=1, progress=False,
                  checkpoint=path).fit(x, t)
    state = checkpoint.read_training(path)
    change(state)
    bad = tmp_path / "bad.npz"
    checkpoint.save_training(bad, state)
    fresh = xpnet.MultiLayerNet([6, 5, 3], use_batchnorm=True)
    optimizer = xpnet.Adam(0.01)
    params = {k: np.array(v) for k, v in fresh.params.items()}
    layer_state = {k: np.array(v) for k, v in fresh.state.items()}
    trainer = xpnet.Trainer(fresh, optimizer, batch_size=10, epochs=2, progress=False)
    with pytest.raises(ValueError, match=match):
        trainer.fit(x, t, resume=bad)
    for k, v in params.items():
        np.testing.assert_array_equal(fresh.params[k], v)
    for k, v in layer_state.items():
        np.testing.assert_array_equal(fresh.state[k], v)
    assert optimizer.steps == 0 and not optimizer.state


# -- conversions after validation, so that the messages name the argument -------------------


@pytest.mark.parametrize("make", [
    lambda: xpnet.MultiLayerNet([4, 3, 2], weight_decay="abc"),
    lambda: xpnet.SimpleConvNet(weight_decay="abc"),
    lambda: xpnet.DeepConvNet(weight_decay="abc"),
])
def test_a_weight_decay_that_is_not_a_number_is_named(make):
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got 'abc'"):
        make()


def test_net_options_are_checked_before_they_are_converted():
    with pytest.raises(TypeError, match="weight_init must be 'he', 'xavier' or a positive"):
        xpnet.MultiLayerNet([4, 3, 2], weight_init=None)
    with pytest.raises(TypeError, match="use_dropout must be True or False"):
        xpnet.MultiLayerNet([4, 3, 2], use_dropout="no")
    with pytest.raises(TypeError, match="weight_init_std must be"):
        xpnet.SimpleConvNet(weight_init_std=[0.01])


def _square_sum(v):
    return float((np.asarray(v, dtype=np.float64) ** 2).sum())


def test_numerical_gradient_names_its_arguments():
    x = np.array([1.0, 2.0])
    with pytest.raises(TypeError, match="f must be a function f\\(x\\) -> scalar, got int 3"):
        xpnet.numerical_gradient(3, x)
    with pytest.raises(TypeError, match="h must be a number, got str"):
        xpnet.numerical_gradient(_square_sum, x, h="small")
    np.testing.assert_allclose(xpnet.numerical_gradient(_square_sum, x, h=np.float64(1e-5)),
                               [2.0, 4.0], rtol=1e-8)
    np.testing.assert_allclose(xpnet.numerical_gradient(_square_sum, x, h=np.float32(1e-3)),
                               [2.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize(("dtype", "h"), [("float16", 1e-5), ("float32", 1e-12),
                                          ("float64", 1e-20)])
def test_a_step_below_the_resolution_of_x_is_an_error_not_a_zero_or_a_crash(dtype, h):
    x = np.array([1.0, 2.0], dtype=dtype)
    before = x.copy()
    with pytest.raises(ValueError, match=rf"h={h!r} is too small for x\[0\] = 1.0 in {dtype}"):
        xpnet.numerical_gradient(_square_sum, x, h=h)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("view", ["read-only", "broadcast"])
def test_numerical_gradient_refuses_arrays_it_cannot_perturb(view):
    x = np.array([1.0, 2.0])
    if view == "read-only":
        x.flags.writeable = False
    else:
        x = np.broadcast_to(x, (3, 2))
    with pytest.raises(ValueError, match="read-only or a broadcast view"):
        xpnet.numerical_gradient(_square_sum, x)


@pytest.mark.parametrize("value", [None, "abc", b"raw", np.array([object()]),
                                   np.array(["a", "b"]), [[1, 2], [3]]],
                         ids=["None", "str", "bytes", "objects", "strings", "ragged"])
def test_to_device_refuses_what_is_not_numbers(value):
    with pytest.raises(TypeError, match="x must|x is not an array of numbers"):
        xpnet.to_device(value, "cpu")


@pytest.mark.parametrize("device", ["cpu", "array_api_strict", "torch:cpu"])
def test_nan_is_never_cast_to_an_integer_silently(device):
    try:
        xpnet.resolve_device(device)
    except xpnet.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    x = np.array([1.0, np.nan, 3.0])
    with pytest.raises(ValueError, match="cannot cast NaN or infinite values"):
        xpnet.to_device(x, device, dtype="int32")
    on_device = xpnet.to_device(x, device)
    with pytest.raises(ValueError, match="cannot cast NaN or infinite values"):
        xpnet.to_device(on_device, device, dtype="int32")


def test_big_endian_and_reversed_arrays_reach_torch_as_their_values():
    torch = pytest.importorskip("torch")
    for host in (np.arange(6, dtype=">f4"), np.arange(6, dtype=np.float32)[::-1],
                 np.arange(12, dtype=">f8").reshape(3, 4)[::-1, ::-2]):
        out = xpnet.to_device(host, "torch:cpu")
        assert isinstance(out, torch.Tensor)
        np.testing.assert_array_equal(out.numpy(), host.astype(host.dtype.newbyteorder("=")))


# -- what a new user tripped on -------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_shows_the_running_loss_mid_epoch_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    x, t = _data(n=400)
    net = xpnet.TwoLayerNet(6, 5, 3)
    step = net.train_step

    def slow_step(*a, **k):  # (an epoch long enough for tqdm to redraw the bar on the way)
        time.sleep(0.01)
        return step(*a, **k)

    net.train_step = slow_step
    xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, log_every=5).fit(x, t)
    frames = terminal.getvalue().split("\r")
    mid = [f for f in frames if "loss=" in f and "40/40" not in f]
    assert mid, frames[-3:]  # the running loss, before the epoch's end
    assert all(len(f.strip("\n")) <= 80 for f in frames)


def test_a_resumed_epoch_reports_the_speed_of_the_steps_it_ran(tmp_path):
    x, t = _data(n=400)
    net = xpnet.TwoLayerNet(6, 5, 3)
    calls = []
    step = net.train_step

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 31:
            raise RuntimeError("crash")
        return step(*a, **k)

    net.train_step = crashing
    path = tmp_path / "ck.npz"
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False,
                            checkpoint=path, checkpoint_every=30)
    with pytest.raises(RuntimeError):
        trainer.fit(x, t)
    net.train_step = step
    fresh = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False,
                          checkpoint=path)
    history = fresh.fit(x, t, resume=path)
    record = history.records[-1]
    # 10 of the epoch's 40 steps ran: 100 samples in its seconds, not 400.
    assert record["samples_per_second"] == pytest.approx(100 / record["seconds"])


def test_the_info_a_caller_gives_is_recorded_and_checked():
    x, t = _data()
    history = xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), batch_size=10,
                            epochs=1, progress=False, info={"dataset": "mine"}).fit(x, t)
    assert history.config["dataset"] == "mine"
    with pytest.raises(TypeError, match="info must hold JSON values"):
        xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), info={"x": object()})
    with pytest.raises(TypeError, match="info must be a dict with str keys"):
        xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), info=["dataset"])


@pytest.mark.slow
def test_resume_alone_continues_the_run_with_its_recorded_flags(tmp_path):
    """``xpnet train --resume ck.npz`` needs no other flag: the net, optimizer, rate,
    schedule, batch size, seed, epochs and dataset come from the checkpoint; a flag given
    that disagrees is refused in one line."""
    from test_datasets import make_dataset
    make_dataset(tmp_path / "data", np.random.default_rng(0), n_train=600, n_test=100)
    common = ["--data-dir", str(tmp_path / "data"), "--quiet"]
    first = ["train", "--dataset", "mnist", "--epochs", "3", "--hidden", "8", "--optimizer",
             "adam", "--lr", "0.003", "--batch-size", "50", "--seed", "4", "--lr-schedule",
             "cosine", "--save", str(tmp_path / "full.npz"), *common]
    env = {**os.environ, "HOME": str(tmp_path), "XPNET_BLAS_THREADS": "1"}  # (bit for bit)
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert run([sys.executable, "-m", "xpnet", *first]).returncode == 0
    # The same run, stopped after its first epoch (--epochs 1 changes the schedule: so it is
    # stopped by a checkpoint of the 3-epoch run instead, interrupted after epoch 1).
    ck = tmp_path / "ck.npz"
    code = ("import sys, xpnet\n"
            "from xpnet import cli\n"
            "real = xpnet.Trainer.fit\n"
            "def fit(self, *a, on_epoch=None, **k):\n"
            "    def stop(r):\n"
            "        raise KeyboardInterrupt\n"
            "    return real(self, *a, on_epoch=stop, **k)\n"
            "xpnet.Trainer.fit = fit\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    stopped = run([sys.executable, "-c", code, *[a for a in first if a != "--save"
                                                  and not a.endswith("full.npz")],
                   "--checkpoint", str(ck)])
    assert stopped.returncode == 130 and ck.exists(), stopped.stderr
    resumed = run([sys.executable, "-m", "xpnet", "train", "--resume", str(ck), "--save",
                   str(tmp_path / "resumed.npz"), *common])
    assert resumed.returncode == 0, resumed.stderr
    a = xpnet.TwoLayerNet.load(tmp_path / "full.npz")
    b = xpnet.TwoLayerNet.load(tmp_path / "resumed.npz")
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    refused = run([sys.executable, "-m", "xpnet", "train", "--resume", str(ck), "--hidden",
                   "9", *common])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "the checkpoint is for the net" in refused.stderr


@pytest.mark.slow
def test_train_fits_80_columns(tmp_path):
    from test_datasets import make_dataset
    make_dataset(tmp_path / "data", np.random.default_rng(0), n_train=600, n_test=100)
    env = {**os.environ, "HOME": str(tmp_path), "COLUMNS": "80"}
    res = subprocess.run([sys.executable, "-m", "xpnet", "train", "--dataset", "mnist",
                          "--data-dir", str(tmp_path / "data"), "--epochs", "2",
                          "--lr-schedule", "cosine", "--hidden", "8"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(len(line) <= 80 for line in res.stdout.splitlines()), res.stdout


class _Frozen(xpnet.Layer):
    """A layer that forgot param_names: its W gets a gradient, which no net would apply."""

    def __init__(self, W):
        self.W = W

    def forward(self, x):
        self.x = x
        return x @ self.W

    def backward(self, dout):
        self.dW = self.x.T @ dout
        return dout @ self.W.T


def test_the_checker_catches_a_weight_its_layer_does_not_declare():
    rng = np.random.default_rng(0)
    layer = _Frozen(rng.standard_normal((3, 2)))
    report = xpnet.check_layer(layer, rng.standard_normal((4, 3)))
    assert not report.ok
    assert any("dW for W, which the layer does not declare" in f for f in report.findings)
    declared = type("Declared", (_Frozen,), {"param_names": ("W",)})
    assert xpnet.check_layer(declared(rng.standard_normal((3, 2))),
                             rng.standard_normal((4, 3))).ok


def test_the_first_backward_of_such_a_layer_warns():
    rng = np.random.default_rng(1)
    cls = type("Forgetful", (_Frozen,), {})
    layer = cls(rng.standard_normal((3, 2)))
    layer.forward(rng.standard_normal((4, 3)))
    with pytest.warns(UserWarning, match=r"Forgetful.backward set gradients \['dW'\] for "
                                         r"\['W'\], which its param_names \(\) does not list"):
        layer.backward(np.ones((4, 2)))


def test_check_layer_with_its_arguments_swapped_says_so():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match=r"first argument must be a layer .* got ndarray of "
                                        r"shape \(2, 3\); the layer comes first"):
        xpnet.check_layer(x, xpnet.Relu())
