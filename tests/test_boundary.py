"""The run boundary: ``Trainer.fit`` checks the whole run once, from the net's own layers,
before the first step, on every way of running steps (layers, fused loop, compiled, MPI);
nothing trains and nothing changes when it refuses.  And ``net.layers``: a replaced layer
is the one ``params``, ``save`` and training see."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xpnet

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def _mlp(features=6, hidden=5, classes=3):
    rng = np.random.default_rng(1)
    return xpnet.Sequential([
        xpnet.Affine(rng.standard_normal((features, hidden)).astype(np.float32),
                     np.zeros(hidden, np.float32)),
        xpnet.Relu(),
        xpnet.Affine(rng.standard_normal((hidden, classes)).astype(np.float32),
                     np.zeros(classes, np.float32))])


def _tiny_convnet(device="cpu"):
    return xpnet.SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3,
                                                                "pad": 0, "stride": 1},
                               hidden_size=4, output_size=3, device=device)


@pytest.fixture(params=["layers", "fused"])
def step_path(request, monkeypatch):
    if request.param == "fused" and not HAS_NUMBA:
        pytest.skip("numba is not installed (pip install 'xpnet[fast]')")
    monkeypatch.setenv("XPNET_NO_NUMBA", "1" if request.param == "layers" else "")
    return request.param


BAD_RUNS = [
    # (x's shape, labels, message)
    ((40, 6), 10**9, r"t_train holds class labels outside \[0, 3\)"),
    ((40, 6), -1, r"t_train holds class labels outside \[0, 3\)"),
    ((40, 6), 7, r"t_train holds class labels outside \[0, 3\)"),
    ((40, 6), 3, r"t_train holds class labels outside \[0, 3\)"),
    ((40, 60), 0, r"x_train of shape \(40, 60\).*60 features per sample, but W of shape \(6, 5\)"),
    ((40, 4), 0, r"x_train of shape \(40, 4\).*4 features per sample, but W of shape \(6, 5\)"),
    ((40, 2, 3), 0, r"x_train of shape \(40, 2, 3\).*6"),  # flattened: 6 features, fits
]


@pytest.mark.parametrize("optimizer", [xpnet.SGD, xpnet.Momentum])
@pytest.mark.parametrize("shape, label, match", BAD_RUNS)
def test_a_plain_sequential_refuses_bad_data_before_any_step(step_path, optimizer, shape, label,
                                                             match):
    rng = np.random.default_rng(0)
    net, opt = _mlp(), optimizer(0.1)
    before = {k: v.copy() for k, v in net.params.items()}
    x, t = rng.random(shape, dtype=np.float32), np.full(shape[0], label)
    trainer = xpnet.Trainer(net, opt, batch_size=10, epochs=1, progress=False)
    if shape == (40, 2, 3):  # (N, 2, 3) flattens to 6 features: this one trains
        trainer.fit(x, t)
        return
    with pytest.raises(ValueError, match=match):
        trainer.fit(x, t)
    assert opt.steps == 0 and opt.state == {}
    for k, v in net.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_test_data_are_checked_against_the_layers_too():
    net = _mlp()
    x, t = np.ones((10, 6), np.float32), np.zeros(10, np.int64)
    with pytest.raises(ValueError, match=r"x_test of shape \(5, 7\)"):
        xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False).fit(
            x, t, np.ones((5, 7), np.float32), np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"t_test rows must have shape \(N, 3\)"):
        xpnet.Trainer(net, xpnet.SGD(0.1), epochs=1, progress=False).fit(
            x, t, np.ones((5, 6), np.float32), np.ones((5, 4), np.float32) / 4)


def test_conv_net_labels_are_checked_before_the_first_step(step_path):
    net = _tiny_convnet()
    before = net.params["W1"].copy()
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"t_train holds class labels outside \[0, 3\)"):
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False).fit(
            x, np.full(20, 7))
    np.testing.assert_array_equal(net.params["W1"], before)
    with pytest.raises(ValueError, match=r"x_train of shape \(20, 2, 8, 8\).*2 channels"):
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False).fit(
            np.ones((20, 2, 8, 8), np.float32), np.zeros(20, np.int64))


@pytest.mark.parametrize("compile", [False, True])
def test_jax_conv_net_labels_are_checked_before_compiling(compile):
    pytest.importorskip("jax")
    net = _tiny_convnet("jax:cpu")
    before = xpnet.to_numpy(net.params["W1"]).copy()
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"t_train holds class labels outside \[0, 3\)"):
        xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=2, progress=False,
                      compile=compile).fit(x, np.full(20, 7))
    np.testing.assert_array_equal(xpnet.to_numpy(net.params["W1"]), before)


def test_a_net_with_a_layer_of_its_own_is_checked_from_its_layers():
    class Double(xpnet.Layer):
        def forward(self, x):
            return x * 2

        def backward(self, dout):
            return dout * 2

    rng = np.random.default_rng(0)
    net = xpnet.Sequential([xpnet.Affine(rng.random((4, 3), dtype=np.float32),
                                         np.zeros(3, np.float32)), Double()])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, epochs=1).fit(
            np.ones((8, 4), np.float32), np.full(8, 3))


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_the_fused_loop_refuses_what_would_send_it_outside_its_buffers(monkeypatch):
    monkeypatch.delenv("XPNET_NO_NUMBA", raising=False)
    from xpnet import _fast

    net, opt = _mlp(), xpnet.Momentum(0.1)
    x, t = np.ones((20, 6), np.float32), np.zeros(20, np.int64)
    steps = _fast.fused_steps(net, opt, x, t, 10)
    if steps is None:
        pytest.skip("no fused loop on this NumPy build")
    order = np.arange(20, dtype=np.int64)
    for args, match in [
        ((np.ones((20, 60), np.float32), t, order, 0, 2), "x must be"),
        ((np.ones((20, 4), np.float32), t, order, 0, 2), "x must be"),
        ((x, np.full(20, 10**9), order, 0, 2), "labels in"),
        ((x, np.full(20, -1), order, 0, 2), "labels in"),
        ((x, t, order + 5, 0, 2), "permutation"),
        ((x, t, order, 0, 3), "steps 0..3"),
        ((x, t[:10], order, 0, 2), "labels"),
    ]:
        with pytest.raises(ValueError, match=match):
            steps.run(*args, 10)
    assert opt.steps == 0


def test_replacing_a_layer_rederives_the_parameters(tmp_path, step_path):
    net = _mlp()
    new = xpnet.Affine(np.full((5, 3), 0.5, np.float32), np.zeros(3, np.float32))
    net.layers["Affine2"] = new
    assert net.params["W2"] is new.W and net.layers["Affine2"] is new
    net.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(xpnet.Sequential.load(tmp_path / "m.npz").params["W2"], new.W)
    x = np.random.default_rng(0).random((40, 6), dtype=np.float32)
    history = xpnet.Trainer(net, xpnet.Momentum(0.1), batch_size=10, epochs=1,
                            progress=False).fit(x, np.zeros(40, np.int64))
    assert net.params["W2"] is net.layers["Affine2"].W
    assert not np.array_equal(net.params["W2"], np.full((5, 3), 0.5, np.float32))
    assert len(history) == 1


def test_a_replacement_that_breaks_the_net_is_refused_and_changes_nothing():
    net = _mlp()
    W2 = net.params["W2"]
    with pytest.raises(TypeError, match="not an xpnet.Layer"):
        net.layers["Affine2"] = object()
    shared = xpnet.Affine(net.params["W1"], np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="already W1"):
        net.layers["Affine2"] = shared
    with pytest.raises(KeyError, match="no layer 'Affine9'"):
        net.layers["Affine9"] = xpnet.Relu()
    with pytest.raises(TypeError, match="cannot be removed"):
        del net.layers["Relu1"]
    assert net.params["W2"] is W2 and list(net.params) == ["W1", "b1", "W2", "b2"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="MPI is not installed")
def test_distributed_runs_check_labels_from_the_layers_before_any_step(tmp_path):
    from xpnet.distributed import find_mpiexec

    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec")
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, xpnet
        net = xpnet.SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2,
            "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=4, output_size=3)
        x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
        try:
            xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False,
                          distributed=True).fit(x, np.full(20, 7))
        except ValueError as exc:
            print("ERROR", exc, flush=True)
        """))
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    run = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True,
                         text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(r"ERROR t_train holds class labels outside [0, 3)") == 2, run.stdout
def test_a_layer_replaced_between_epochs_is_the_one_trained(step_path):
    net, rng = _mlp(), np.random.default_rng(0)
    x, t = rng.random((40, 6), dtype=np.float32), rng.integers(0, 3, 40)
    replacement = xpnet.Affine(np.full((5, 3), 0.1, np.float32), np.zeros(3, np.float32))

    def swap(record):
        if record["epoch"] == 1:
            net.layers["Affine2"] = replacement

    xpnet.Trainer(net, xpnet.Momentum(0.1), batch_size=10, epochs=2, progress=False).fit(
        x, t, on_epoch=swap)
    assert net.params["W2"] is replacement.W
    assert not np.allclose(replacement.W, 0.1)  # trained in epoch 2


