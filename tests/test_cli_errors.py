"""The command line as a user meets it, in real processes: every mistake is one line on stderr
with exit status 2 (130 for Ctrl-C), never a traceback, and every output path is checked
before any data is loaded or any epoch runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_datasets import make_dataset

# Subprocesses, long runs or many examples: run by `python -m pytest -m slow` (and by CI).
pytestmark = pytest.mark.slow

CLI_CHECKED = {"count": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, np.random.default_rng(0), n_train=600, n_test=100)
    return root


def _xpnet(tmp_path, *argv, stdin=None):
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("XPNET_DATA", None)
    return subprocess.run([sys.executable, "-m", "xpnet", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _train(data, *extra):
    return ["train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1",
            "--hidden", "8", "--batch-size", "50", *extra]


def _setup_directory(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "old.npz").write_bytes(b"an existing checkpoint")


CASES = {
    "--save into a missing directory": (["--save", "nowhere/m.npz"], "does not exist"),
    "--save onto a directory": (["--save", "adir"], "that is a directory"),
    "--history into a missing directory": (["--history", "nowhere/h.json"], "does not exist"),
    "--plot onto a directory": (["--plot", "adir"], "that is a directory"),
    "--checkpoint onto a directory": (["--checkpoint", "adir"], "that is a directory"),
    "--checkpoint over an existing file": (["--checkpoint", "old.npz"], "--resume old.npz"),
    "--resume a missing file": (["--resume", "missing.npz"], "no such checkpoint file"),
    "--resume something else": (["--resume", "old.npz"], "not a readable xpnet file"),
    "--hidden 0": (["--hidden", "0"], "each >= 1"),
    "--device gpu": (["--device", "gpu"], "unknown device 'gpu'"),
    "--batch-size past the data": (["--batch-size", "100000"], "larger than the 600"),
    "--lr that explodes": (["--optimizer", "sgd", "--lr", "1000"], "the learning rate is"),
    "--compile on NumPy": (["--compile"], "--compile needs a backend that compiles: jax"),
    "--compile of another kind": (["--compile", "fast"], "invalid choice: 'fast'"),
    "--model of another kind": (["--model", "resnet"], "invalid choice: 'resnet'"),
    "--filters for an mlp": (["--filters", "4"], "--filters applies to --model convnet, not mlp"),
    "--dropout for convnet": (["--model", "convnet", "--dropout", "0.3"],
                              "--dropout applies to --model mlp and deepconvnet"),
    "--batchnorm for deepconvnet": (["--model", "deepconvnet", "--batchnorm"],
                                    "--batchnorm applies to --model mlp, not deepconvnet"),
    "two --hidden sizes for convnet": (["--model", "convnet", "--hidden", "8", "4"],
                                       "--model convnet has one hidden layer"),
    "--activation for convnet": (["--model", "convnet", "--activation", "sigmoid"],
                                 "--activation applies to --model mlp"),
    "--dropout 1": (["--dropout", "1"], "--dropout must be a number in [0, 1)"),
    "--weight-decay below 0": (["--weight-decay", "-0.1"], "--weight-decay must be a finite number"),
    "--filters 0": (["--model", "convnet", "--filters", "0"], "filter_num'] must be an int >= 1"),
    "--threads 0": (["--threads", "0"], "--threads must be >= 1, got 0"),
    "--threads past a C int": (["--threads", "99999999999999999999"],
                               "--threads must be at most 4096"),
    "--save onto --checkpoint": (["--save", "x.npz", "--checkpoint", "x.npz"],
                                 "--save and --checkpoint name the same file"),
    "--save onto --history by ./": (["--save", "m.npz", "--history", "./m.npz"],
                                     "--save and --history name the same file"),
    "--checkpoint onto --history": (["--checkpoint", "h.json", "--history", "h.json"],
                                    "--history and --checkpoint name the same file"),
    "--save onto --resume's checkpoint": (["--resume", "old.npz", "--save", "old.npz"],
                                          "--save and --resume name the same file"),
    "--hidden larger than memory": (["--hidden", "100000000000"],
                                    "--hidden 100000000000 ask for a net of"),
    "--filters larger than memory": (["--model", "convnet", "--filters", "1000000000"],
                                     "--filters 1000000000 and --hidden 8 ask for a net of"),
    "--early-stopping without validation": (["--early-stopping", "3"],
                                            "--early-stopping watches the validation set"),
    "--save-best onto --save": (["--validation-split", "0.1", "--save-best", "m.npz",
                                 "--save", "m.npz"], "--save and --save-best name the same"),
    "--validation-split 1": (["--validation-split", "1"],
                             "--validation-split must be in (0, 1)"),
    "--weight-decay 1e308": (["--weight-decay", "1e308"],
                             "--weight-decay=1e+308 makes the loss's L2 term"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_mistakes_are_one_line_with_exit_2(data, tmp_path, case):
    extra, match = CASES[case]
    _setup_directory(tmp_path)
    res = _xpnet(tmp_path, *_train(data, *extra))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpnet train: error: "), res.stderr
    assert match in lines[0] and "Traceback" not in res.stderr
    if not any(word in case for word in ("explodes", "batch-size", "hidden", "1e308",
                                         "--validation-split 1")):
        assert res.stdout == ""  # refused before the data was loaded
    assert (tmp_path / "old.npz").read_bytes() == b"an existing checkpoint"
    CLI_CHECKED["count"] += 1


def test_a_bad_thread_count_in_the_environment_is_one_line_before_the_data(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "XPNET_BLAS_THREADS": "many"}
    res = subprocess.run([sys.executable, "-m", "xpnet", "train", "--dataset", "mnist",
                          "--data-dir", "empty"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.strip() == ("xpnet train: error: XPNET_BLAS_THREADS must be a whole "
                                  "number >= 1, got 'many'")
    CLI_CHECKED["count"] += 1


def test_a_thread_count_past_the_blas_librarys_is_recorded_as_it_runs(data, tmp_path):
    """XPNET_BLAS_THREADS=999: the run goes on with what the BLAS library runs (OpenBLAS caps
    at its build's maximum) and says so; a count past a C int is refused in one line."""
    env = {**os.environ, "HOME": str(tmp_path), "XPNET_BLAS_THREADS": "999"}
    res = subprocess.run([sys.executable, "-m", "xpnet", *_train(data, "--history", "h.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import json
    config = json.loads((tmp_path / "h.json").read_text())["config"]
    assert 1 <= config["blas_threads"] <= 999
    if config["blas_threads"] < 999:
        assert "999 asked, the BLAS library runs at most" in config["thread_policy"]
    env["XPNET_BLAS_THREADS"] = "99999999999999999999"
    res = subprocess.run([sys.executable, "-m", "xpnet", *_train(data)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().endswith("XPNET_BLAS_THREADS must be at most 4096, got "
                                       "99999999999999999999")
    CLI_CHECKED["count"] += 1


@pytest.mark.parametrize(("extra", "match"), [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--hidden", "0"], "each >= 1"),
    (["--checkpoint-every", "-3", "--checkpoint", "c.npz"], "--checkpoint-every must be >= 1"),
])
def test_options_are_checked_before_the_data_is_looked_for(tmp_path, extra, match):
    """A bad flag is reported as such where the dataset is missing too (a new GPU machine)."""
    (tmp_path / "empty").mkdir()
    res = _xpnet(tmp_path, "train", "--dataset", "mnist", "--data-dir", "empty", *extra)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.stderr
    CLI_CHECKED["count"] += 1


@pytest.mark.parametrize(("argv", "match"), [
    (["gradcheck", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["gradcheck", "--hidden", "0"], "--hidden must be >= 1, got 0"),
    (["gradcheck", "--filters", "3"], "--filters applies to --model convnet, not mlp"),
    (["gradcheck", "--model", "convnet", "--filters", "0"], "--filters must be >= 1, got 0"),
    (["gradcheck", "--device", "gpu", "--dataset", "random"], "unknown device 'gpu'"),
])
def test_gradcheck_mistakes_are_one_line_with_exit_2(tmp_path, argv, match):
    res = _xpnet(tmp_path, *argv)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == f"xpnet gradcheck: error: {match}" or match in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    CLI_CHECKED["count"] += 1


def test_a_closed_pipe_is_one_line(data, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "xpnet", *_train(data, "--epochs", "30")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # the header line, then the reader goes away (| head -1)
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 2, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines() == ["xpnet train: error: the output was closed before the "
                                        "command finished"]
    CLI_CHECKED["count"] += 1


def test_ctrl_c_while_the_data_loads_is_one_line_and_130(data, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    # Ctrl-C as a terminal delivers it (a test run started in the background passes SIGINT on
    # ignored, and Python then installs no KeyboardInterrupt handler).
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import time, xpnet.datasets as d, xpnet.cli as c\n"
            "real = d.load_mnist\n"
            "def slow(*a, **k):\n"
            "    print('loading', flush=True); time.sleep(30); return real(*a, **k)\n"
            "d.load_mnist = slow\n"
            f"raise SystemExit(c.main({_train(data)!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"loading"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip() == "xpnet train: interrupted"
    CLI_CHECKED["count"] += 1


def test_sigmoid_with_one_hidden_layer_is_not_ignored(data, tmp_path):
    res = _xpnet(tmp_path, *_train(data, "--activation", "sigmoid"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("MultiLayerNet(sizes=[784, 8, 10], activation='sigmoid'")


@pytest.mark.parametrize("example", ["train_mnist.py", "gradient_check.py"])
def test_examples_default_to_fashion_mnist_and_fail_in_one_line(tmp_path, example):
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Fashion-MNIST in /usr/share/datasets (apt-get install "
                    "dataset-fashion-mnist); MNIST cannot be found here either way")
    script = Path(__file__).resolve().parent.parent / "examples" / example
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("XPNET_DATA", None)
    res = subprocess.run([sys.executable, str(script), "--device", "gpu"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    # The default dataset was found (MNIST would not be) and the bad device is one line.
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"{script}: error: unknown device 'gpu'; device strings are 'cpu', 'cuda', 'cuda:N', "
        "'torch:cpu', 'torch:cuda', 'torch:cuda:N', 'jax', 'jax:cpu', 'jax:cuda', 'jax:cuda:N', "
        "'array_api_strict', "
        "'array_api_strict:NAME' (e.g. 'array_api_strict:device1')"]


def test_a_resume_says_what_it_continues(data, tmp_path):
    first = _xpnet(tmp_path, *_train(data, "--checkpoint", "ck.npz"))
    assert first.returncode == 0, first.stderr
    res = _xpnet(tmp_path, *_train(data, "--epochs", "2", "--resume", "ck.npz"))
    assert res.returncode == 0, res.stderr
    assert "resuming ck.npz: epoch 2, step 0 of 12" in res.stdout.splitlines()


def test_a_full_disk_during_a_checkpoint_is_one_line(data, tmp_path):
    # The checkpoint's write fails as on a full disk: one line, exit 2, and nothing half-written.
    code = ("import errno, xpnet._io as io, xpnet.cli as c\n"
            "real = io.write_npz\n"
            "def full(path, header, arrays):\n"
            "    if header.get('format') == 'xpnet-train-1':\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
            "    return real(path, header, arrays)\n"
            "io.write_npz = full\n"
            "import xpnet.checkpoint as ck\n"
            "ck.write_npz = full\n"
            f"raise SystemExit(c.main({_train(data, '--checkpoint', 'ck.npz')!r}))\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "xpnet train: error: [Errno 28] No space left on device: 'ck.npz'"], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".cache") == []
    CLI_CHECKED["count"] += 1
