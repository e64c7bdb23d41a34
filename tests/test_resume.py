"""Training survives being killed: checkpoints, resume, Ctrl-C, divergence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_datasets import make_dataset
from test_train import spiral

import xpnet
from xpnet._io import TEMP_SUFFIX, read_npz

KILL_POINTS: list = []  # (delay, epoch, step) of every SIGKILL survived, for the summary


def _run(tmp_path, *, ckpt=None, every=None, resume=None, stop_at=None, seed_init=0,
         optimizer=xpnet.Adam, epochs=4):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3], seed=seed_init)
    opt = optimizer(0.01)
    # A crash right after optimizer step `stop_at`.  Every run wraps the net's train_step (a
    # net with its own step keeps it: the Trainer's fused loop, which does not call it, then
    # stays off in all of them; tests/test_fused_and_threads.py resumes the fused loop).
    train_step, calls = net.train_step, []

    def crashing(x, t, optimizer):
        loss = train_step(x, t, optimizer)
        calls.append(1)
        if len(calls) == stop_at:
            raise RuntimeError("simulated crash")
        return loss

    net.train_step = crashing
    trainer = xpnet.Trainer(net, opt, batch_size=32, epochs=epochs, seed=5, progress=False,
                            checkpoint=ckpt, checkpoint_every=every)
    return net, trainer.fit(x, t, x[:50], t[:50], resume=resume)


def _params(net):
    return {k: np.array(v) for k, v in net.params.items()}


@pytest.mark.parametrize("optimizer", [xpnet.SGD, xpnet.Momentum, xpnet.AdaGrad, xpnet.Adam])
@pytest.mark.parametrize("stop_at", [5, 10, 21, 33])  # 10 steps per epoch: mid-epoch, at an end
def test_resume_is_bit_identical(tmp_path, optimizer, stop_at):
    ref_net, ref = _run(tmp_path, ckpt=tmp_path / "ref.npz", every=4, optimizer=optimizer)
    ckpt = tmp_path / "run.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, ckpt=ckpt, every=4, stop_at=stop_at, optimizer=optimizer)
    # A fresh net with other initial weights and a fresh optimizer: all state comes from the file.
    net, resumed = _run(tmp_path, ckpt=ckpt, every=4, resume=ckpt, seed_init=99,
                        optimizer=optimizer)
    for k, v in _params(ref_net).items():
        assert np.array_equal(_params(net)[k], v), k
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
             for r in ref.records]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
            for r in resumed.records] == strip


def test_resume_checks_that_the_checkpoint_fits(tmp_path):
    ckpt = tmp_path / "c.npz"
    _run(tmp_path, ckpt=ckpt, epochs=1)
    x, t = spiral()
    other = xpnet.Trainer(xpnet.MultiLayerNet([2, 16, 3]), xpnet.Adam(0.01), batch_size=32,
                          seed=5, progress=False)
    with pytest.raises(ValueError, match="checkpoint is for the net"):
        other.fit(x, t, resume=ckpt)
    other = xpnet.Trainer(xpnet.MultiLayerNet([2, 32, 3]), xpnet.Adam(0.01), batch_size=16,
                          seed=5, progress=False)
    with pytest.raises(ValueError, match="resume with the same settings"):
        other.fit(x, t, resume=ckpt)
    other = xpnet.Trainer(xpnet.MultiLayerNet([2, 32, 3]), xpnet.SGD(0.01), batch_size=32,
                          seed=5, progress=False)
    with pytest.raises(ValueError, match="saved optimizer is 'Adam'"):
        other.fit(x, t, resume=ckpt)
    xpnet.MultiLayerNet([2, 32, 3]).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        other.fit(x, t, resume=tmp_path / "model.npz")


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    x, t = spiral()
    net = xpnet.MultiLayerNet([2, 32, 3])

    class Exploding(xpnet.SGD):
        armed = True

        def update(self, params, grads):
            if self.armed and self.steps == 12:
                self.lr = 1e35  # blows up after a few good checkpoints
            super().update(params, grads)

    ckpt = tmp_path / "c.npz"
    trainer = xpnet.Trainer(net, Exploding(0.1), batch_size=32, epochs=5, progress=False,
                            checkpoint=ckpt, checkpoint_every=3)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match=r"epoch 2, step \d+"):
        trainer.fit(x, t)
    header, arrays = read_npz(ckpt)
    assert header["position"]["global_step"] <= 12
    assert all(np.all(np.isfinite(a)) for a in arrays.values())
    # and it resumes (with a sane learning rate) to the end
    calm = Exploding(0.1)
    calm.armed = False
    fresh = xpnet.Trainer(xpnet.MultiLayerNet([2, 32, 3]), calm, batch_size=32, epochs=5,
                          progress=False)
    assert len(fresh.fit(x, t, resume=ckpt)) == 5


# --- the command line, killed for real --------------------------------------------------------


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, np.random.default_rng(0), n_train=10000, n_test=100)
    return root


def _train_cmd(data, out: Path, *extra):
    return [sys.executable, "-m", "xpnet", "train", "--dataset", "mnist", "--data-dir", str(data),
            "--epochs", "4", "--hidden", "32", "--batch-size", "10", "--optimizer", "adam",
            "--checkpoint-every", "7", "--quiet", "--save", str(out), *extra]


def _env(tmp_path):
    return {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(cli_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "final.npz"
    res = subprocess.run(_train_cmd(cli_data, out, "--checkpoint", str(tmp / "ck.npz")),
                         capture_output=True, text=True, env=_env(tmp), timeout=300)
    assert res.returncode == 0, res.stderr
    return read_npz(out)[1]


def _wait_for(path: Path, proc, timeout=120.0):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout
        time.sleep(0.005)


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8])  # a run takes about 2.5 s here
def test_sigkill_then_resume_gives_the_same_weights(cli_data, reference, tmp_path, delay):
    ckpt, out = tmp_path / "ck.npz", tmp_path / "final.npz"
    cmd = _train_cmd(cli_data, out, "--checkpoint", str(ckpt))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    _wait_for(ckpt, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    header, _ = read_npz(ckpt)  # the file on disk is a complete checkpoint
    KILL_POINTS.append((delay, header["position"]["epoch"], header["position"]["step"]))
    res = subprocess.run(cmd + ["--resume", str(ckpt)], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    final = read_npz(out)[1]
    assert set(final) == set(reference)
    for k in reference:
        assert np.array_equal(final[k], reference[k]), k
    # a killed write's leftovers are cleaned up
    assert not list(tmp_path.glob(".ck.npz.*" + TEMP_SUFFIX))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(cli_data, reference, tmp_path):
    ckpt, out = tmp_path / "ck.npz", tmp_path / "final.npz"
    cmd = _train_cmd(cli_data, out, "--checkpoint", str(ckpt))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path))
    _wait_for(ckpt, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"--resume {ckpt}" in err
    assert not out.exists()
    res = subprocess.run(cmd + ["--resume", str(ckpt)], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    final = read_npz(out)[1]
    for k in reference:
        assert np.array_equal(final[k], reference[k]), k


# --- a resume that does not fit changes nothing ---------------------------------------------


def _edited(tmp_path, ckpt, edit, name):
    """A copy of checkpoint ``ckpt`` with ``edit(header, arrays)`` applied."""
    from xpnet._io import write_npz

    header, arrays = read_npz(ckpt)
    edit(header, arrays)
    out = tmp_path / name
    write_npz(out, header, arrays)
    return out


def _set(*keys, value):
    def edit(header, arrays):
        node = header
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


BAD_RESUMES = {
    "other optimizer": (lambda: xpnet.SGD(0.01), None, "saved optimizer is 'Adam'"),
    "other lr": (lambda: xpnet.Adam(0.02), None, r"made with Adam\(.*lr.*0.01.*same hyperparameters"),
    "edited rng state": (None, _set("position", "rng_state", "state", "state", value="x"),
                         "position .* is not valid"),
    "rng state of another generator": (None, _set("position", "rng_state", "bit_generator",
                                                  value="MT19937"), "position .* is not valid"),
    "step 10**9": (None, _set("position", "step", value=10**9), "never reaches"),
    "epoch 0": (None, _set("position", "epoch", value=0), "at epoch 0, outside"),
    "epoch -3": (None, _set("position", "epoch", value=-3), "at epoch -3, outside"),
    "epoch past the run": (None, _set("position", "epoch", value=99), "at epoch 99, outside"),
    "global step off": (None, _set("position", "global_step", value=1), "never reaches"),
    "NaN loss so far": (None, _set("position", "loss_sum", value=float("nan")), "loss so far"),
    "fractional step": (None, _set("position", "step", value=2.5), "not valid"),
    "negative step count": (None, _set("optimizer", "steps", value=-1), "step count"),
    "missing optimizer state": (None, lambda h, a: a.pop("opt/W1/v"), r"arrays \('m', 'v'\)"),
    "wrong-shape optimizer state": (
        None, lambda h, a: a.__setitem__("opt/W1/m", np.zeros((2, 2))),
        r"saved state W1/m has shape \(2, 2\), the parameter W1 has \(2, 32\)"),
    "state of no parameter": (None, lambda h, a: (a.__setitem__("opt/W9/m", np.zeros(2)),
                                                   a.__setitem__("opt/W9/v", np.zeros(2))),
                              r"state for \['W9'\]"),
    "wrong-shape weights": (None, lambda h, a: a.__setitem__("param/b2", np.zeros(2)),
                            r"b2 has shape \(2,\), expected \(3,\)"),
    "other dataset size": ("half the data", None, "same settings and data"),
    "history not a list": (None, _set("history", "epochs", value=3), "no 'epochs' list"),
    "settings not a dict": (None, _set("trainer", value=[32, 5]), "settings .* not a dict"),
}


@pytest.mark.parametrize("case", list(BAD_RESUMES))
def test_a_refused_resume_changes_nothing(tmp_path, case):
    make_opt, edit, match = BAD_RESUMES[case]
    ckpt = tmp_path / "c.npz"
    _run(tmp_path, ckpt=ckpt, every=4, stop_at=None, epochs=1)
    path = ckpt if edit is None else _edited(tmp_path, ckpt, edit, "edited.npz")
    x, t = spiral()
    if make_opt == "half the data":
        x, t, make_opt = x[::2], t[::2], None
    net = xpnet.MultiLayerNet([2, 32, 3], seed=42)
    opt = make_opt() if make_opt else xpnet.Adam(0.01)
    opt.update(net.params, net.gradient(x[:8], t[:8]))  # some state of its own
    before = {k: np.array(v) for k, v in net.params.items()}
    state_before = {n: {k: np.array(v) for k, v in s.items()} for n, s in opt.state.items()}
    trainer = xpnet.Trainer(net, opt, batch_size=32, epochs=2, seed=5, progress=False)
    with pytest.raises(ValueError, match=match):
        trainer.fit(x, t, resume=path)
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v, err_msg=k)
    assert opt.steps == 1 and {n: {k: np.array(v) for k, v in s.items()}
                               for n, s in opt.state.items()}.keys() == state_before.keys()
    for n, slots in state_before.items():
        for k, v in slots.items():
            np.testing.assert_array_equal(opt.state[n][k], v)


def test_an_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    ckpt = tmp_path / "c.npz"
    _run(tmp_path, ckpt=ckpt, epochs=2)
    saved = ckpt.read_bytes()
    with pytest.raises(ValueError, match="already exists: continue its run with resume="):
        _run(tmp_path, ckpt=ckpt, epochs=2)
    assert ckpt.read_bytes() == saved
    other = tmp_path / "notes.txt"
    other.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="already exists"):
        _run(tmp_path, ckpt=other, epochs=1)
    assert other.read_text() == "not a checkpoint"


def test_a_killed_compiled_run_resumes_to_the_same_weights(cli_data, tmp_path):
    # xpnet train --device jax:cpu --compile: killed after its first checkpoints, then resumed.
    pytest.importorskip("jax", reason="JAX is not installed (pip install 'xpnet[jax]')")
    jax_flags = ("--device", "jax:cpu", "--compile", "--epochs", "2")
    ref_out = tmp_path / "ref.npz"
    res = subprocess.run(_train_cmd(cli_data, ref_out, "--checkpoint", str(tmp_path / "r.npz"),
                                    *jax_flags), capture_output=True, text=True,
                         env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    ckpt, out = tmp_path / "ck.npz", tmp_path / "final.npz"
    cmd = _train_cmd(cli_data, out, "--checkpoint", str(ckpt), *jax_flags)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    _wait_for(ckpt, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    res = subprocess.run(cmd + ["--resume", str(ckpt)], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    final, reference = read_npz(out)[1], read_npz(ref_out)[1]
    for k in reference:
        assert np.array_equal(final[k], reference[k]), k


def test_resume_takes_a_checkpoint_read_by_the_caller(tmp_path):
    """fit(resume=) takes what read_training read (xpnet train reads its file once) as well
    as a path, with the same result."""
    ckpt = tmp_path / "run.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, ckpt=ckpt, every=4, stop_at=13)
    copy = tmp_path / "copy.npz"
    copy.write_bytes(ckpt.read_bytes())
    from_path, history = _run(tmp_path, ckpt=ckpt, every=4, resume=ckpt, seed_init=9)
    state = xpnet.checkpoint.read_training(copy)
    assert state.path == str(copy)
    from_state, resumed = _run(tmp_path, ckpt=copy, every=4, resume=state, seed_init=7)
    for k, v in _params(from_path).items():
        assert np.array_equal(_params(from_state)[k], v), k
    assert resumed.train_loss == history.train_loss
    assert resumed.config["resumed_from"] == str(copy)


def test_the_command_line_reads_its_resume_file_once_and_leaves_its_arguments(
        cli_data, tmp_path, monkeypatch):
    from xpnet import checkpoint, cli

    ckpt = tmp_path / "c.npz"
    argv = ["train", "--dataset", "mnist", "--data-dir", str(cli_data), "--epochs", "2",
            "--hidden", "8", "--batch-size", "500", "--quiet", "--checkpoint", str(ckpt)]
    stop = {"epochs": 1}

    class Stop(Exception):
        pass

    real_fit = xpnet.Trainer.fit

    def fit_one_epoch(self, *a, on_epoch=None, **k):
        def report(record):
            if record["epoch"] >= stop["epochs"]:
                raise KeyboardInterrupt
        return real_fit(self, *a, on_epoch=report, **k)

    monkeypatch.setattr(xpnet.Trainer, "fit", fit_one_epoch)
    assert cli.main(argv) == 130 and ckpt.exists()  # interrupted after epoch 1, saved
    monkeypatch.setattr(xpnet.Trainer, "fit", real_fit)
    reads, real_read = [], checkpoint.read_npz
    monkeypatch.setattr(checkpoint, "read_npz", lambda p: reads.append(p) or real_read(p))
    args = cli.build_parser().parse_args([*argv[:-2], "--resume", str(ckpt)])
    before = dict(vars(args))
    assert args.func(args) == 0
    assert vars(args) == before
    assert reads == [str(ckpt)]
