"""Nets, optimizers, the Trainer, History and checkpoints, on every backend of the fixture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import xpnet
from conftest import assert_close
from xpnet._io import TEMP_SUFFIX
from xpnet.backend import device_of, is_writable, to_device, to_numpy
from xpnet.optim import make_optimizer


def spiral(n_per_class: int = 100, classes: int = 3, seed: int = 0):
    """cs231n's spiral: 3 interleaved arms, not linearly separable."""
    rng = np.random.default_rng(seed)
    xs, ts = [], []
    for k in range(classes):
        r = np.linspace(0.0, 1.0, n_per_class)
        theta = np.linspace(4 * k, 4 * (k + 1), n_per_class) + 0.2 * rng.standard_normal(n_per_class)
        xs.append(np.c_[r * np.sin(theta), r * np.cos(theta)])
        ts += [k] * n_per_class
    return np.concatenate(xs).astype(np.float32), np.array(ts)


def train_spiral(device: str, dtype: str, seed: int = 0, epochs: int = 60):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 64, 3], weight_init="he", seed=seed, device=device, dtype=dtype)
    opt = xpnet.Adam(0.02)
    # 300 samples in batches of 32: the last batch of each epoch has 12
    history = xpnet.Trainer(net, opt, batch_size=32, epochs=epochs, seed=seed,
                            progress=False).fit(x, t)
    return net, opt, history


def _without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
            for r in history.records]


# --- training ---------------------------------------------------------------------------------


def test_spiral_trains_to_high_accuracy(case):
    net, _, history = train_spiral(case.device.name, case.dtype_name)
    assert history.train_accuracy[-1] >= 0.97, history.records[-1]
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert net.device == case.device.name and net.dtype == case.dtype_name


def test_strict_device1_training_keeps_every_array_on_device1():
    pytest.importorskip("array_api_strict")
    dev = "array_api_strict:device1"
    net, opt, _ = train_spiral(dev, "float32", epochs=3)
    arrays = list(net.params.values())
    arrays += [a for s in opt.state.values() for a in s.values()]
    for layer in net.layers.values():
        arrays += [v for v in vars(layer).values() if xpnet.backend.is_array(v)]
    arrays += [net.last_layer.y, net.last_layer.t, net.last_layer.loss]
    assert len(arrays) > 10
    for a in arrays:
        assert device_of(a).name == dev


def test_same_seed_same_history_and_another_seed_differs():
    a = train_spiral("cpu", "float32", seed=3, epochs=5)[2]
    b = train_spiral("cpu", "float32", seed=3, epochs=5)[2]
    c = train_spiral("cpu", "float32", seed=4, epochs=5)[2]
    assert _without_timing(a) == _without_timing(b)
    assert _without_timing(a) != _without_timing(c)


@pytest.mark.parametrize("other", ["array_api_strict", "torch:cpu"])
def test_backends_agree_on_the_history(other):
    pytest.importorskip(other.split(":")[0])
    ref = train_spiral("cpu", "float64", epochs=5)[2]
    got = train_spiral(other, "float64", epochs=5)[2]
    for r, g in zip(ref.records, got.records):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-9)
        assert g["train_accuracy"] == r["train_accuracy"]


def test_same_seed_same_initial_weights_on_every_backend(case):
    net = xpnet.TwoLayerNet(5, 4, 3, seed=11, device=case.device.name, dtype=case.dtype_name)
    rng = np.random.default_rng(11)
    expected = (0.01 * rng.standard_normal((5, 4))).astype(case.dtype_name)
    np.testing.assert_array_equal(to_numpy(net.params["W1"]), expected)
    assert not np.any(to_numpy(net.params["b1"]))


def test_trainer_accepts_data_already_on_the_device_and_test_data(case):
    x, t = spiral(30)
    net = xpnet.TwoLayerNet(2, 16, 3, weight_init_std=0.5, device=case.device.name,
                            dtype=case.dtype_name)
    history = xpnet.Trainer(net, xpnet.SGD(0.5), batch_size=10, epochs=2, progress=False).fit(
        case.asarray(x), case.asarray(t), x[:20], np.eye(3, dtype=np.float32)[t[:20]])
    assert len(history) == 2 and all(0 <= a <= 1 for a in history.test_accuracy)


def test_divergence_names_epoch_and_step():
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 64, 3], weight_init=50.0)
    trainer = xpnet.Trainer(net, xpnet.SGD(1e30), batch_size=32, epochs=3, progress=False)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match=r"at epoch 1, step \d+"):
        trainer.fit(x, t)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_trainer_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        xpnet.Trainer(xpnet.TwoLayerNet(2, 3, 3), xpnet.SGD(0.1), **kwargs)


@pytest.mark.parametrize(
    "x, t, exc, match",
    [
        (np.ones((4, 2), np.uint8), np.zeros(4, np.int64), TypeError, "dtype uint8.*x / 255"),
        (np.ones((4, 3), np.float32), np.zeros(4, np.int64), ValueError,
         r"x_train of shape \(4, 3\) .*3 features per sample, but W of shape \(2, 3\) expects 2"),
        (np.ones((4, 2), np.float32), np.zeros(5, np.int64), ValueError, "4 samples but t_train has 5"),
        (np.ones((4, 2), np.float32), np.array([0, 1, 2, 3]), ValueError, r"t_train holds class labels outside \[0, 3\)"),
        (np.ones((4, 2), np.float32), np.zeros((4, 1), np.int64), ValueError, r"shape \(N,\)"),
        (np.ones((0, 2), np.float32), np.zeros(0, np.int64), ValueError, "non-empty"),
    ],
)
def test_fit_rejects_bad_data_without_touching_it(x, t, exc, match):
    net = xpnet.TwoLayerNet(2, 3, 3)
    before = net.params["W1"].copy()
    x_before, t_before = x.copy(), t.copy()
    with pytest.raises(exc, match=match):
        xpnet.Trainer(net, xpnet.SGD(0.1), progress=False).fit(x, t)
    np.testing.assert_array_equal(net.params["W1"], before)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(t, t_before)


def test_fit_needs_both_test_arrays():
    x, t = spiral(5)
    with pytest.raises(ValueError, match="both x_test and t_test"):
        xpnet.Trainer(xpnet.TwoLayerNet(2, 3, 3), xpnet.SGD(0.1)).fit(x, t, x_test=x)


def test_progress_bar_shows_the_running_loss(capsys, monkeypatch):
    import tqdm.std

    # Pretend stderr is a terminal, as tqdm decides by isatty().
    monkeypatch.setattr(tqdm.std.tqdm, "__init__", _force_enabled(tqdm.std.tqdm.__init__))
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 16, 3])
    xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=10, epochs=1, log_every=5).fit(x, t)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "train_acc=" in err


def _force_enabled(init):
    def wrapped(self, *args, **kwargs):
        if kwargs.get("disable") is None:
            kwargs["disable"] = False
        return init(self, *args, **kwargs)

    return wrapped


# --- History ----------------------------------------------------------------------------------


def test_history_json_round_trip(tmp_path):
    history = train_spiral("cpu", "float32", epochs=2)[2]
    path = tmp_path / "history.json"
    history.save(path)
    data = json.loads(path.read_text())
    assert [r["epoch"] for r in data["epochs"]] == [1, 2]
    assert data["config"]["batch_size"] == 32 and data["config"]["device"] == "cpu"
    back = xpnet.History.load(path)
    assert back.records == history.records and back.config == history.config
    assert back.train_loss == history.train_loss
    assert not any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())


def test_history_load_rejects_other_json(tmp_path):
    path = tmp_path / "h.json"
    path.write_text('{"epochs": [{"epoch": 1}]}')
    with pytest.raises(ValueError, match="must have the keys"):
        xpnet.History.load(path)


# --- optimizers -------------------------------------------------------------------------------


def test_optimizer_math_against_reference_formulas():
    p0, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    p = {"w": p0.copy()}
    xpnet.SGD(0.1).update(p, {"w": g})
    np.testing.assert_allclose(p["w"], p0 - 0.1 * g)

    p, opt = {"w": p0.copy()}, xpnet.Momentum(0.1, momentum=0.9)
    opt.update(p, {"w": g})
    opt.update(p, {"w": g})
    np.testing.assert_allclose(p["w"], p0 - 0.1 * g - (0.9 * 0.1 * g + 0.1 * g))

    p, opt = {"w": p0.copy()}, xpnet.AdaGrad(0.1)
    opt.update(p, {"w": g})
    np.testing.assert_allclose(p["w"], p0 - 0.1 * g / (np.abs(g) + 1e-7))

    p, opt = {"w": p0.copy()}, xpnet.Adam(0.1)
    opt.update(p, {"w": g})
    # the first bias-corrected Adam step moves every coordinate by lr * sign(g)
    np.testing.assert_allclose(p["w"], p0 - 0.1 * np.sign(g), rtol=1e-6)


def _book_optimizer_steps(name, p, grads):
    """The book's optimizers (common/optimizer.py), in float64 on the host: p after each g."""
    v, h, m, lr = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p), {
        "sgd": 0.1, "momentum": 0.05, "adagrad": 0.01, "adam": 0.001}[name]
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = 0.9 * v - lr * g
            p = p + v
        elif name == "adagrad":
            h = h + g * g
            p = p - lr * g / (np.sqrt(h) + 1e-7)
        else:
            m, v = m + 0.1 * (g - m), v + 0.001 * (g * g - v)
            p = p - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-8)
    return p


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_optimizer_state_carries_over_steps_on_every_backend(name, case, rng):
    # Several steps, so a state that is not kept (an immutable array updated "in place")
    # shows; pure_update (the compiled step's) gives the same from the same state.
    p0, grads = rng.standard_normal((3, 4)), [rng.standard_normal((3, 4)) for _ in range(4)]
    params, opt = {"w": case.asarray(p0)}, make_optimizer(name)
    for g in grads[:3]:
        opt.update(params, {"w": case.asarray(g)})
    assert opt.steps == 3
    assert_close(params["w"], _book_optimizer_steps(name, p0, grads[:3]), case.dtype_name)
    state_before = {k: {s: to_numpy(a) for s, a in v.items()} for k, v in opt.state.items()}
    new, state = opt.pure_update(dict(params), {"w": case.asarray(grads[3])},
                                 opt.initial_state(params), 4)
    assert opt.steps == 3 and opt.state.keys() == state_before.keys()
    for k, slots in state_before.items():  # pure: the optimizer's own state is untouched
        for s, a in slots.items():
            np.testing.assert_array_equal(to_numpy(opt.state[k][s]), a)
    assert_close(new["w"], _book_optimizer_steps(name, p0, grads), case.dtype_name)
    assert set(state) == ({"w"} if opt.STATE_SLOTS else set())


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_optimizer_updates_reach_the_layers(name, case, rng):
    net = xpnet.TwoLayerNet(4, 5, 3, weight_init_std=0.5, device=case.device.name,
                            dtype=case.dtype_name)
    x, t = case.asarray(rng.random((6, 4))), case.asarray(rng.integers(0, 3, 6))
    W1 = net.params["W1"]
    before = to_numpy(net.predict(x))
    opt = make_optimizer(name)
    opt.update(net.params, net.gradient(x, t))
    assert net.params["W1"] is net.layers["Affine1"].W  # one owner
    assert net.params["W1"] is W1 or not is_writable(W1)  # in place where it can be
    assert not np.array_equal(to_numpy(net.predict(x)), before)
    for state in opt.state.values():
        for a in state.values():
            assert device_of(a) == case.device and a.dtype == case.dtype


def test_read_only_parameters_are_rebound_and_reach_the_layers(rng):
    net = xpnet.TwoLayerNet(4, 5, 3, weight_init_std=0.5, dtype="float64")
    for name in net.params:
        net.params[name].flags.writeable = False
    x, t = rng.random((6, 4)), rng.integers(0, 3, 6)
    old = net.params["W1"]
    expected = old - 0.1 * net.gradient(x, t)["W1"]
    xpnet.SGD(0.1).update(net.params, net.gradient(x, t))
    assert net.params["W1"] is not old and net.layers["Affine1"].W is net.params["W1"]
    np.testing.assert_allclose(net.layers["Affine1"].W, expected)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: xpnet.SGD(-0.1), ValueError, "lr must be a finite number"),
        (lambda: xpnet.SGD(float("nan")), ValueError, "lr must be a finite number"),
        (lambda: xpnet.SGD(float("inf")), ValueError, "lr must be a finite number"),
        (lambda: xpnet.SGD("0.1"), TypeError, "lr must be a real number"),
        (lambda: xpnet.SGD(True), TypeError, "lr must be a real number"),
        (lambda: xpnet.Momentum(0.1, momentum=1.0), ValueError, "momentum"),
        (lambda: xpnet.Adam(beta2=1.5), ValueError, "beta2"),
        (lambda: make_optimizer("rmsprop"), ValueError, "unknown optimizer 'rmsprop'"),
    ],
)
def test_bad_hyperparameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_update_checks_keys_and_shapes():
    p = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        xpnet.SGD(0.1).update(p, {"v": np.zeros(3)})
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(4,\)"):
        xpnet.SGD(0.1).update(p, {"w": np.zeros(4)})
    np.testing.assert_array_equal(p["w"], np.zeros(3))


def test_parameters_view_guards_assignment():
    net = xpnet.TwoLayerNet(3, 2, 2)
    with pytest.raises(ValueError, match=r"keep its shape \(3, 2\)"):
        net.params["W1"] = np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="keep its dtype float32"):
        net.params["W1"] = np.zeros((3, 2))
    with pytest.raises(KeyError, match="unknown parameter"):
        net.params["W9"] = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="cannot be removed"):
        del net.params["W1"]


def test_first_layer_skips_the_input_gradient(rng):
    net = xpnet.MultiLayerNet([4, 3, 3, 2])
    assert [l.input_grad for l in net.layers.values() if isinstance(l, xpnet.Affine)] == [
        False, True, True]
    x = rng.random((2, 4)).astype(np.float32)
    net.loss(x, np.array([0, 1]))
    dout = net.last_layer.backward()
    for layer in reversed(net.layers.values()):
        dout = layer.backward(dout)
    assert dout is None and net.layers["Affine1"].dW is not None


def test_net_to_moves_and_predicts_the_same(rng):
    pytest.importorskip("array_api_strict")
    net = xpnet.TwoLayerNet(4, 5, 3, weight_init_std=0.5)
    x = rng.random((3, 4)).astype(np.float32)
    ref = net.predict(x)
    assert net.to("array_api_strict:device1") is net
    assert net.device == "array_api_strict:device1"
    got = net.predict(to_device(x, "array_api_strict:device1"))
    np.testing.assert_array_equal(to_numpy(got), ref)


def test_bad_net_configs():
    with pytest.raises(TypeError, match="must be ints"):
        xpnet.MultiLayerNet([784, 50.5, 10])
    with pytest.raises(ValueError, match="each >= 1"):
        xpnet.MultiLayerNet([784, 0, 10])
    with pytest.raises(ValueError, match="activation must be one of"):
        xpnet.MultiLayerNet([4, 2], activation="tanh")
    with pytest.raises(ValueError, match="weight_init must be"):
        xpnet.MultiLayerNet([4, 2], weight_init=-1.0)
    with pytest.raises(ValueError, match="dtype must be"):
        xpnet.TwoLayerNet(4, 3, 2, dtype="int32")


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_across_devices(case, tmp_path, rng):
    net = xpnet.MultiLayerNet([4, 6, 5, 3], activation="sigmoid", seed=5,
                              device=case.device.name, dtype=case.dtype_name)
    x = rng.random((7, 4))
    ref = to_numpy(net.predict(case.asarray(x)))
    path = tmp_path / "net.npz"
    net.save(path)
    back = xpnet.MultiLayerNet.load(path, device="cpu")
    assert type(back) is xpnet.MultiLayerNet and back.activation == "sigmoid"
    assert back.device == "cpu" and back.dtype == case.dtype_name
    got = back.predict(x.astype(case.dtype_name))
    if case.device.library == "numpy":
        np.testing.assert_array_equal(got, ref)
    else:  # the same weights, another library's float rounding
        assert_close(got, ref, case.dtype_name)
    for k in net.params:
        np.testing.assert_array_equal(to_numpy(back.params[k]), to_numpy(net.params[k]))


def test_strict_device1_model_loads_on_cpu_and_predicts_the_same(tmp_path, rng):
    pytest.importorskip("array_api_strict")
    net, _, _ = train_spiral("array_api_strict:device1", "float32", epochs=3)
    x, _ = spiral()
    ref = to_numpy(net.predict(to_device(x, "array_api_strict:device1")))
    net.save(tmp_path / "m.npz")
    back = xpnet.MultiLayerNet.load(tmp_path / "m.npz", device="cpu")
    np.testing.assert_array_equal(back.predict(x), ref)


def test_two_layer_net_loads_as_itself(tmp_path):
    xpnet.TwoLayerNet(4, 3, 2, weight_init_std=0.1).save(tmp_path / "two.npz")
    back = xpnet.TwoLayerNet.load(tmp_path / "two.npz", dtype="float64")
    assert isinstance(back, xpnet.TwoLayerNet) and back.dtype == "float64"
    assert isinstance(xpnet.MultiLayerNet.load(tmp_path / "two.npz"), xpnet.TwoLayerNet)
    xpnet.MultiLayerNet([4, 3, 3, 2]).save(tmp_path / "deep.npz")
    with pytest.raises(ValueError, match="holds a 'MultiLayerNet'"):
        xpnet.TwoLayerNet.load(tmp_path / "deep.npz")


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _header(**over):
    meta = {"format": "xpnet-net-1", "class": "TwoLayerNet", "sizes": [4, 3, 2],
            "activation": "relu", "weight_init": 0.01, "dtype": "float32"}
    meta.update(over)
    return np.array(json.dumps(meta))


def _good_arrays():
    return {"W1": np.zeros((4, 3), np.float32), "b1": np.zeros(3, np.float32),
            "W2": np.zeros((3, 2), np.float32), "b2": np.zeros(2, np.float32)}


@pytest.mark.parametrize(
    "content, match",
    [
        (lambda p: p.write_bytes(b"not a zip"), "not a readable xpnet file"),
        (lambda p: p.write_bytes(_npz_bytes(_good_arrays())[:100]), "not a readable"),
        (lambda p: _write_npz(p, **_good_arrays()), "no __xpnet__ header"),
        (lambda p: _write_npz(p, __xpnet__=_header(format="other"), **_good_arrays()),
         "unknown checkpoint format"),
        (lambda p: _write_npz(p, __xpnet__=np.array("{oops"), **_good_arrays()), "corrupt"),
        (lambda p: _write_npz(p, __xpnet__=_header(), **{**_good_arrays(), "W3": np.zeros(2)}),
         r"unexpected \['W3'\]"),
        (lambda p: _write_npz(p, __xpnet__=_header(),
                              **{k: v for k, v in _good_arrays().items() if k != "b2"}),
         r"missing \['b2'\]"),
        (lambda p: _write_npz(p, __xpnet__=_header(), **{**_good_arrays(), "W1": np.zeros((3, 4))}),
         r"W1 has shape \(3, 4\), expected \(4, 3\)"),
        (lambda p: _write_npz(p, __xpnet__=_header(), **{**_good_arrays(),
                                                         "b1": np.zeros(3, np.int64)}),
         "b1 has dtype int64"),
        (lambda p: _write_npz(p, __xpnet__=_header(), **{**_good_arrays(),
                                                         "b1": np.full(3, np.nan, np.float32)}),
         "NaN or infinite"),
        (lambda p: _write_npz(p, __xpnet__=_header(sizes=[4, -3, 2]), **_good_arrays()),
         "does not build a net"),
        (lambda p: _write_npz(p, __xpnet__=_header(), **{**_good_arrays(),
                                                         "W1": np.array([object()] * 12)}),
         "not a readable"),
    ],
)
def test_bad_checkpoints_raise_value_error(tmp_path, content, match):
    path = tmp_path / "bad.npz"
    content(path)
    with pytest.raises(ValueError, match=match):
        xpnet.TwoLayerNet.load(path)


def _npz_bytes(arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, __xpnet__=_header(), **arrays)
    return buf.getvalue()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "net.npz"
    xpnet.TwoLayerNet(4, 3, 2, seed=1).save(path)
    good = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        xpnet.TwoLayerNet(4, 3, 2, seed=2).save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["net.npz"]


def test_loss_is_a_0d_array_and_accuracy_a_float(case, rng):
    net = xpnet.TwoLayerNet(4, 3, 2, device=case.device.name, dtype=case.dtype_name)
    x, t = case.asarray(rng.random((5, 4))), case.asarray(rng.integers(0, 2, 5))
    loss = net.loss(x, t)
    assert loss.ndim == 0 and device_of(loss) == case.device
    acc = net.accuracy(x, t, batch_size=2)
    assert isinstance(acc, float) and acc == net.accuracy(x, t)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-3)  # tiny weights: ~uniform


@pytest.mark.parametrize(("bad", "exc", "match"), [
    (lambda g: g.astype(np.complex128), TypeError, r"grads\['b2'\] has dtype complex128"),
    (lambda g: g[:2], ValueError, r"grads\['b2'\] has shape \(2,\), params\['b2'\] has \(3,\)"),
    (lambda g: g.astype(np.float32), TypeError, r"grads\['b2'\] has dtype float32.* float64"),
    (lambda g: None, TypeError, r"grads\['b2'\] is None"),
    (lambda g: g.tolist(), TypeError, r"grads\['b2'\] must be an array"),
])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_a_refused_update_changes_nothing(name, bad, exc, match):
    rng = np.random.default_rng(0)
    net = xpnet.MultiLayerNet([4, 5, 3], seed=1, dtype="float64")
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    opt = make_optimizer(name)
    opt.update(net.params, net.gradient(x, t))
    before = {k: np.array(v) for k, v in net.params.items()}
    state = {n: {k: np.array(v) for k, v in s.items()} for n, s in opt.state.items()}
    grads = dict(net.gradient(x, t))
    grads["b2"] = bad(grads["b2"])  # the last parameter: every other one comes first
    with pytest.raises(exc, match=match):
        opt.update(net.params, grads)
    assert opt.steps == 1
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)
    for n, slots in state.items():
        for k, v in slots.items():
            np.testing.assert_array_equal(opt.state[n][k], v)


def test_an_integer_parameter_is_refused_before_any_update():
    params = {"a": np.ones(3), "n": np.arange(3)}
    opt = xpnet.SGD(0.1)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int64"):
        opt.update(params, {"a": np.ones(3), "n": np.ones(3, dtype=np.int64)})
    np.testing.assert_array_equal(params["a"], np.ones(3))
    assert opt.steps == 0
    for bad in (None, [1.0]):
        with pytest.raises(TypeError, match="grads must be a mapping"):
            opt.update(params, bad)


def test_a_killed_save_leaves_nothing_behind_for_long_and_the_umask_is_honoured(tmp_path):
    import os

    path = tmp_path / "model.npz"
    stale = tmp_path / ".model.npz.abc123.xpnet-tmp"  # what a save killed midway leaves
    stale.write_bytes(b"x" * 1000)
    unrelated = [tmp_path / ".model.npz.notes.tmp", tmp_path / ".model.npz.backup"]
    for f in unrelated:
        f.write_text("mine")
    old = os.umask(0o022)
    try:
        xpnet.TwoLayerNet(4, 3, 2).save(path)
    finally:
        os.umask(old)
    assert not stale.exists()  # the next write to the same path removes it
    assert all(f.read_text() == "mine" for f in unrelated)  # nothing that is not ours
    assert path.stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.npz"] + [f.name for f in unrelated])


def test_a_numpy_scalar_weight_init_is_kept_as_a_float_and_saves(tmp_path):
    net = xpnet.MultiLayerNet([4, 3, 2], weight_init=np.float32(0.1))
    assert type(net.weight_init) is float
    net.save(tmp_path / "m.npz")
    back = xpnet.MultiLayerNet.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.params["W1"], net.params["W1"])


def test_divergence_blames_the_data_when_the_data_explain_it():
    x, t = spiral()
    huge = (x * 1e30).astype(np.float32)  # finite, but every product overflows float32
    trainer = xpnet.Trainer(xpnet.MultiLayerNet([2, 16, 3]), xpnet.SGD(0.1), batch_size=32,
                            epochs=1, progress=False)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match="training data reach .*scale them"):
        trainer.fit(huge, t)
    # data that turn NaN during the run (here: the caller's own array, changed in a callback)
    x = x.copy()
    trainer = xpnet.Trainer(xpnet.MultiLayerNet([2, 16, 3]), xpnet.SGD(0.1), batch_size=32,
                            epochs=2, progress=False)

    def poison(record):
        x[5, 0] = np.nan

    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match="now hold NaN .*changed during"):
        trainer.fit(x, t, on_epoch=poison)
