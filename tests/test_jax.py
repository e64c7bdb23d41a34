"""JAX as a backend: its device strings, its 64-bit mode, traced values.

(Every backend-neutral test also runs on JAX through the ``case`` fixture; these are the
JAX-only parts.)
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_train import spiral

import xpnet
from xpnet.compiled import CompiledSteps
from xpnet.backend import (
    BackendUnavailableError,
    describe,
    device_of,
    namespace,
    resolve_device,
    to_device,
    to_numpy,
)

# Subprocesses, long runs or many examples: run by `python -m pytest -m slow` (and by CI).
pytestmark = pytest.mark.slow

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'xpnet[jax]')")
jnp = jax.numpy


def test_jax_device_strings():
    for spec in ("jax", "jax:cpu", "jax:cpu:0", " jax:cpu "):
        dev = resolve_device(spec)
        assert (dev.library, dev.name) == ("jax", "jax:cpu")
        assert dev.native == jax.devices("cpu")[0] and dev.xp is jnp
    x = to_device(np.ones(3, dtype=np.float32), "jax:cpu")
    assert device_of(x) == resolve_device("jax") and describe(x)[3] == "jax:cpu"


@pytest.mark.parametrize(("spec", "exc", "match"), [
    ("jax:cpu:7", ValueError, r"JAX has no cpu device 7; its cpu devices are \['jax:cpu'\]"),
    ("jax:cpu:x", ValueError, "expected a GPU index"),
    ("jax:warp", BackendUnavailableError, "JAX has no 'warp' devices here"),
])
def test_bad_jax_device_strings(spec, exc, match):
    with pytest.raises(exc, match=match):
        resolve_device(spec)


def test_jax_cuda_without_a_gpu_names_the_extra():
    try:
        jax.devices("gpu")
        pytest.skip("JAX sees a GPU here")
    except RuntimeError:
        pass
    with pytest.raises(BackendUnavailableError, match=r"no 'cuda' devices here \(a GPU needs "
                                                      r"pip install 'xpnet\[jax-cuda12\]'"):
        resolve_device("jax:cuda:0")
    entry = next(e for e in xpnet.available_backends() if e["library"] == "jax")
    assert entry["devices"] == ["jax:cpu"] and "jax-cuda12" in entry["note"]


def test_missing_jax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'xpnet\[jax\]'"):
        resolve_device("jax:cpu")


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="JAX's 64-bit mode is on in this process")
def test_float64_without_jax_64bit_mode_is_a_clear_error():
    host = np.linspace(0, 1, 6)
    with pytest.raises(ValueError, match=r"JAX holds no float64 arrays while its 64-bit mode is "
                                         r"off: use dtype='float32', or .*jax_enable_x64"):
        to_device(host, "jax:cpu")
    with pytest.raises(ValueError, match="64-bit mode is off"):
        xpnet.TwoLayerNet(4, 3, 2, device="jax:cpu", dtype="float64")
    assert to_device(host, "jax:cpu", dtype="float32").dtype == jnp.float32


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="JAX's 64-bit mode is on in this process")
def test_int64_labels_become_int32_without_jax_64bit_mode():
    labels = to_device(np.array([0, 3, 9]), "jax:cpu", dtype="int64")
    assert labels.dtype == jnp.int32 and to_numpy(labels).tolist() == [0, 3, 9]
    assert to_device(labels, "jax:cpu", dtype="int64") is labels  # no warning, no copy
    with pytest.raises(ValueError, match="do not fit in int32"):
        to_device(np.array([2**40]), "jax:cpu")


def test_a_traced_value_is_a_jax_array_of_no_device_yet():
    seen = {}

    def f(a, b):
        seen["xp"] = namespace(a=a, b=b)  # a traced and a concrete array combine
        seen["description"] = describe(a)
        with pytest.raises(TypeError, match="traced JAX value"):
            to_numpy(a)
        return a * b

    b = to_device(np.ones(3, dtype=np.float32), "jax:cpu")
    jax.jit(f)(b, b)
    assert seen["xp"] is jnp and seen["description"][0] == "jax"
    assert seen["description"][3] is None  # a traced value has no device until it runs


def test_xpnet_computes_float32_products_at_full_precision_on_jax():
    """JAX's default on recent GPUs is TF32 for float32 products (about 3 digits): every xpnet
    call on JAX arrays runs with full float32 products instead, and leaves JAX's own setting
    as it was."""
    seen = []

    class Probe(xpnet.Relu):
        def forward(self, x):
            seen.append(jax.config.jax_default_matmul_precision)
            return super().forward(x)

    x = to_device(np.ones((2, 3)), "jax:cpu", dtype="float32")
    Probe().forward(x)
    net = xpnet.Sequential([xpnet.Affine(to_device(np.ones((3, 2)), "jax:cpu", dtype="float32"),
                                         to_device(np.zeros(2), "jax:cpu", dtype="float32")),
                            Probe()])
    net.predict(x)
    xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=2, epochs=1, progress=False,
                  compile=True).fit(np.ones((4, 3), np.float32), np.array([0, 1, 0, 1]))
    assert seen and set(seen) == {"highest"}, seen
    assert jax.config.jax_default_matmul_precision is None


def test_relu_and_optimizers_trace_under_jit():
    # What the compiled Trainer builds on: a layer and an optimizer's pure step under jax.jit.
    relu, opt = xpnet.Relu(), xpnet.Adam(0.1)
    w = to_device(np.array([1.0, -2.0, 3.0], dtype=np.float32), "jax:cpu")

    @jax.jit
    def step(w, state, steps):
        out = relu.forward(w)
        g = relu.backward(out)
        return opt.pure_update({"w": w}, {"w": g}, state, steps)

    new, state = step(w, opt.initial_state({"w": w}), jnp.asarray(1))
    np.testing.assert_allclose(to_numpy(new["w"]), [0.9, -2.0, 2.9], rtol=1e-6)
    assert set(state["w"]) == {"m", "v"} and opt.steps == 0 and opt.state == {}


# --- compiled training --------------------------------------------------------------------------

MODES = ["epoch", "step"]
OPTIMIZERS = [xpnet.SGD, xpnet.Momentum, xpnet.AdaGrad, xpnet.Adam]


def _fit(compile=False, *, optimizer=xpnet.Adam, epochs=3, device="jax:cpu", x=None, t=None,
         **trainer_options):
    """A 2-32-3 net on the spiral, 300 samples in batches of 32: 10 steps per epoch, the last
    of 12 samples."""
    if x is None:
        x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], device=device)
    opt = optimizer(0.05)
    trainer = xpnet.Trainer(net, opt, batch_size=32, epochs=epochs, seed=5, progress=False,
                            compile=compile, **trainer_options)
    return net, opt, trainer, trainer.fit(x, t, x[:50], t[:50])


def _host(net):
    return {k: to_numpy(v) for k, v in net.params.items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_equals_eager_training(mode, optimizer):
    net, opt, _, history = _fit(mode, optimizer=optimizer)
    ref_net, ref_opt, _, ref = _fit(False, optimizer=optimizer)
    assert opt.steps == ref_opt.steps == 30  # the step count went up in the compiled loop
    for k, v in _host(ref_net).items():
        np.testing.assert_allclose(_host(net)[k], v, rtol=2e-4, atol=2e-5, err_msg=k)
    assert opt.state.keys() == ref_opt.state.keys()
    for name, slots in ref_opt.state.items():
        for key, value in slots.items():
            np.testing.assert_allclose(to_numpy(opt.state[name][key]), to_numpy(value),
                                       rtol=2e-3, atol=1e-5, err_msg=f"{name}/{key}")
    np.testing.assert_allclose(history.train_loss, ref.train_loss, rtol=1e-4)
    np.testing.assert_allclose(history.train_accuracy, ref.train_accuracy, atol=0.01)
    assert history.config["compile"] == mode and ref.config["compile"] is False


def test_compiled_training_in_float64_equals_eager_to_rounding():
    from conftest import jax_64bit

    with jax_64bit(True):
        x, t = spiral()
        x = x.astype(np.float64)
        nets = []
        for mode in (False, "epoch"):
            net = xpnet.MultiLayerNet([2, 32, 3], device="jax:cpu", dtype="float64")
            xpnet.Trainer(net, xpnet.Adam(0.05), batch_size=32, epochs=2, progress=False,
                          compile=mode).fit(x, t)
            nets.append(_host(net))
    for k, v in nets[0].items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(nets[1][k], v, rtol=1e-11, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["dropout", "batchnorm", "both"])
def test_compiled_dropout_and_batch_norm_train_as_the_eager_steps(mode, kind, tmp_path):
    """The masks are the eager steps' draws (uploaded for each compiled loop), the running
    statistics are carried through the loop; chunks and a resume change no bit."""
    from conftest import jax_64bit

    options = {"use_dropout": kind != "batchnorm", "use_batchnorm": kind != "dropout"}
    x, t = spiral()
    with jax_64bit(True):
        runs = []
        for compile_, every in ((False, None), (mode, None), (mode, 3)):
            net = xpnet.MultiLayerNet([2, 16, 16, 3], device="jax:cpu", dtype="float64",
                                      **options)
            history = xpnet.Trainer(
                net, xpnet.Momentum(0.05), batch_size=32, epochs=2, seed=5, progress=False,
                compile=compile_, checkpoint=None if every is None else tmp_path / f"{mode}.npz",
                checkpoint_every=every).fit(x.astype(np.float64), t, x[:50], t[:50])
            state = {k: to_numpy(getattr(*v)) for k, v in net._state.items()
                     if not isinstance(getattr(*v), int)}
            runs.append((_host(net), state, history))
    (eager, eager_state, ref), (whole, whole_state, hist), (cut, cut_state, _) = runs
    for k, v in eager.items():
        np.testing.assert_allclose(whole[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
        assert np.array_equal(cut[k], whole[k]), k
    for k, v in eager_state.items():
        np.testing.assert_allclose(whole_state[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
        assert np.array_equal(cut_state[k], whole_state[k]), k
    np.testing.assert_allclose(hist.train_loss, ref.train_loss, rtol=1e-9)
    assert hist.test_accuracy == ref.test_accuracy  # evaluated with the carried statistics


def test_no_layer_keeps_a_traced_value():
    net, _, _, _ = _fit("epoch", epochs=1)
    for layer in (*net.layers.values(), net.last_layer):
        for name, value in vars(layer).items():
            assert not isinstance(value, jax.core.Tracer), (layer, name)
    for value in net.params.values():
        assert describe(value)[3] == "jax:cpu"  # concrete arrays on the device
    x, _ = spiral()
    assert net.predict(to_device(x[:4], "jax:cpu")).shape == (4, 3)


def test_chunks_do_not_change_the_compiled_result(tmp_path):
    # Checkpoints every 3 steps cut the compiled loops into pieces: the weights are the same
    # bits, so a resumed run (whose first piece is shorter) can end where an uninterrupted one does.
    whole = _host(_fit("epoch")[0])
    cut = _host(_fit("epoch", checkpoint=tmp_path / "c.npz", checkpoint_every=3)[0])
    stepwise = _host(_fit("step")[0])
    for k, v in whole.items():
        assert np.array_equal(cut[k], v) and np.array_equal(stepwise[k], v), k


@pytest.mark.parametrize("optimizer", [xpnet.Momentum, xpnet.Adam])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("crash_after", [2, 5, 9])  # compiled calls (x 3 for steps): mid-epoch
def test_compiled_resume_is_bit_identical(tmp_path, monkeypatch, mode, optimizer, crash_after):
    # (Epoch mode: 4 loops an epoch, ending at steps 4, 8, 9 and 10: the last batch is smaller.)
    crash_after *= 1 if mode == "epoch" else 3
    ref_net, _, _, ref = _fit(mode, optimizer=optimizer, checkpoint=tmp_path / "ref.npz",
                              checkpoint_every=4)
    ckpt, calls = tmp_path / "run.npz", []
    run = CompiledSteps.run

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == crash_after:
            raise RuntimeError("simulated crash")
        return run(self, *args)

    monkeypatch.setattr(CompiledSteps, "run", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(mode, optimizer=optimizer, checkpoint=ckpt, checkpoint_every=4)
    monkeypatch.setattr(CompiledSteps, "run", run)
    net, resumed = _resume(mode, optimizer, ckpt)
    for k, v in _host(ref_net).items():
        assert np.array_equal(_host(net)[k], v), k
    drop = ("seconds", "samples_per_second")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.records] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref.records]


def _resume(mode, optimizer, ckpt):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], device="jax:cpu", seed=99)  # all state from the file
    trainer = xpnet.Trainer(net, optimizer(0.05), batch_size=32, epochs=3, seed=5,
                            progress=False, compile=mode, checkpoint=ckpt, checkpoint_every=4)
    return net, trainer.fit(x, t, x[:50], t[:50], resume=ckpt)


def test_ctrl_c_stops_a_compiled_run_between_loops_with_a_checkpoint(tmp_path, monkeypatch):
    import signal

    ckpt, calls = tmp_path / "c.npz", []
    run = CompiledSteps.run

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while a compiled loop runs
        return run(self, *args)

    monkeypatch.setattr(CompiledSteps, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit("epoch", checkpoint=ckpt, checkpoint_every=4)
    monkeypatch.setattr(CompiledSteps, "run", run)
    from xpnet._io import read_npz

    assert read_npz(ckpt)[0]["position"]["global_step"] == 9  # after the third loop (4, 8, 9)
    ref_net = _fit("epoch", checkpoint=tmp_path / "ref.npz", checkpoint_every=4)[0]
    net = _resume("epoch", xpnet.Adam, ckpt)[0]
    for k, v in _host(ref_net).items():
        assert np.array_equal(_host(net)[k], v), k


def test_compiled_divergence_names_the_epoch_and_step_like_eager():
    messages = []
    for mode in (False, "epoch", "step"):
        net = xpnet.MultiLayerNet([2, 32, 3], device="jax:cpu", weight_init=10.0)
        trainer = xpnet.Trainer(net, xpnet.SGD(1e30), batch_size=32, epochs=2, progress=False,
                                compile=mode)
        x, t = spiral()
        with pytest.raises(xpnet.DivergenceError, match=r"epoch 1, step \d+") as info:
            trainer.fit(x, t)
        messages.append(str(info.value))
    assert messages[1] == messages[2] == messages[0]


def test_hyperparameters_are_arguments_of_the_compiled_program():
    net, opt, trainer, _ = _fit("epoch", epochs=1)
    compiled = trainer.compiled_steps._loop
    traces = compiled._cache_size()
    opt.lr = 0.0  # a schedule, e.g. in on_epoch: no recompiling, and it takes effect
    before = _host(net)
    x, t = spiral()
    trainer.fit(x, t)
    assert compiled._cache_size() == traces
    for k, v in before.items():
        np.testing.assert_array_equal(_host(net)[k], v)


def test_host_checks_happen_once_before_compiling():
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], device="jax:cpu")
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=32, progress=False, compile=True)
    bad = t.copy()
    bad[7] = 3
    with pytest.raises(ValueError, match=r"t_train holds class labels outside \[0, 3\)"):
        trainer.fit(x, bad)
    nan = x.copy()
    nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="x_train holds NaN"):
        trainer.fit(nan, t)
    assert trainer.compiled_steps._loop._cache_size() == 0  # nothing was traced


@pytest.mark.parametrize("device", ["cpu", "array_api_strict", "torch:cpu"])
def test_compile_on_an_eager_backend_names_the_backends_that_compile(device):
    if device.startswith("torch"):
        pytest.importorskip("torch")
    net = xpnet.MultiLayerNet([2, 4, 3], device=device)
    with pytest.raises(ValueError, match=r"compile=True needs a backend that compiles: jax "
                                         r"\(devices 'jax', 'jax:cpu'.*" + device):
        xpnet.Trainer(net, xpnet.SGD(0.1), compile=True)
    with pytest.raises(ValueError, match="compile must be True, False or one of"):
        xpnet.Trainer(xpnet.MultiLayerNet([2, 4, 3], device="jax"), xpnet.SGD(0.1),
                      compile="fast")


def test_a_net_moved_off_jax_after_the_trainer_was_made_is_refused_at_fit():
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], device="jax:cpu")
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, compile=True)
    net.to("cpu")
    before = _host(net)
    with pytest.raises(ValueError, match="'cpu' is numpy's, which runs eagerly"):
        trainer.fit(x, t)
    for k, v in before.items():
        np.testing.assert_array_equal(_host(net)[k], v)


def test_a_compiled_model_saves_and_loads_anywhere(tmp_path):
    net = _fit("epoch", epochs=1)[0]
    net.save(tmp_path / "m.npz")
    x, _ = spiral()
    expected = to_numpy(net.predict(to_device(x, "jax:cpu")))
    for device in ("cpu", "jax:cpu"):
        back = xpnet.MultiLayerNet.load(tmp_path / "m.npz", device=device)
        np.testing.assert_allclose(to_numpy(back.predict(to_device(x, device))), expected,
                                   rtol=1e-5, atol=1e-6)
