"""The CLI (`xpnet`, `python -m xpnet`) and the examples, run as a user runs them."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.cli import main

# Subprocesses, long runs or many examples: run by `python -m pytest -m slow` (and by CI).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_apple_tax_numbers():
    apple_tax = runpy.run_path(str(ROOT / "examples" / "apple_tax.py"))["apple_tax"]
    price, g = apple_tax()
    assert price == pytest.approx(715.0, rel=1e-15)
    assert g["apple_num"] == pytest.approx(110.0, rel=1e-15)
    assert g["apple"] == pytest.approx(2.2, rel=1e-15)
    assert g["orange"] == pytest.approx(3.3, rel=1e-15)
    assert g["orange_num"] == pytest.approx(165.0, rel=1e-15)
    assert g["tax"] == 650


def test_apple_tax_prints_clearly():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "apple_tax.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "price = 715" in out
    for line in ("apple      = 2.2", "apple_num  = 110", "orange     = 3.3",
                 "orange_num = 165", "tax        = 650"):
        assert line in out


def test_info_lists_version_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"xpnet {xpnet.__version__}" in out
    assert "numpy" in out and "devices: cpu" in out
    assert "cupy" in out


def test_python_dash_m_is_the_cli():
    res = subprocess.run([sys.executable, "-m", "xpnet", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "backends:" in res.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().err


def test_readme_own_layer_example_runs(capsys, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "guides" / "layers.md").read_text()
    code = next(block.split("```", 1)[0] for block in text.split("```python\n")[1:]
                if "class Scale(xpnet.Layer)" in block)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "layers.md", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines() == [
        "['W1', 'b1', 'w1', 'W2', 'b2']", "True", "True"]


def test_readme_usage_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    devices = ["cpu", "cuda", "torch:cpu", "jax:cpu"]
    assert f"for device in {devices!r}".replace("'", '"') in code
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == devices
    available = {d for e in xpnet.available_backends() for d in e["devices"]}
    ran = [line for line in lines if "skipped:" not in line]
    for line in lines:  # a device is skipped only where this machine lacks it, saying why
        name = line.split()[0]
        usable = any(d == name or d.startswith(f"{name}:") for d in available)
        assert ("skipped:" in line) != usable, line
    losses = {round(float(line.split()[1]), 4) for line in ran}
    assert ran[0].startswith("cpu ") and len(losses) == 1  # the same loss, to float32 rounding
    assert all(line.endswith("float32") for line in ran)


def test_gradcheck_command_passes_and_prints_each_parameter(capsys):
    assert main(["gradcheck", "--mode", "directional", "--dataset", "random"]) == 0
    out = capsys.readouterr().out
    assert "TwoLayerNet(784, 50, 10) on cpu float32, 3 seeded random samples" in out
    for name in ("W1", "b1", "W2", "b2"):
        assert f"\n  {name} " in out
    assert ": ok" in out


def test_gradcheck_command_fails_with_status_1_on_a_bug(capsys, monkeypatch):
    from xpnet import nets

    original = nets.MultiLayerNet.gradient

    def seeds_bug(self, x, t):
        g = original(self, x, t)
        g["b2"] = 2 * g["b2"]
        return g

    monkeypatch.setattr(nets.MultiLayerNet, "gradient", seeds_bug)
    assert main(["gradcheck", "--mode", "sampled", "--dataset", "random", "--hidden", "8"]) == 1
    assert "FAILED (b2)" in capsys.readouterr().out


def test_gradcheck_command_on_a_missing_backend(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["gradcheck", "--device", "cuda", "--dataset", "random"]) == 2
    assert "xpnet[cuda12]" in capsys.readouterr().err


# --- xpnet train -----------------------------------------------------------------------------


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    from test_datasets import make_dataset

    import numpy as np

    make_dataset(tmp_path / "data", np.random.default_rng(0), n_train=60, n_test=20)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XPNET_DATA", raising=False)
    return tmp_path / "data"


def test_train_command_saves_model_and_history(tiny_dataset, tmp_path, capsys):
    model, hist = tmp_path / "m.npz", tmp_path / "h.json"
    rc = main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--epochs", "2",
               "--hidden", "8", "--batch-size", "16", "--optimizer", "adam", "--save", str(model),
               "--history", str(hist)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch   1/2" in out and "epoch   2/2" in out
    assert out.strip().splitlines()[-1].startswith("final test accuracy: ")
    net = xpnet.TwoLayerNet.load(model)
    assert net.sizes == [784, 8, 10]
    assert len(xpnet.History.load(hist)) == 2


def test_train_command_early_stopping_ends_with_the_best_epoch(tiny_dataset, tmp_path, capsys):
    model, best, hist = tmp_path / "m.npz", tmp_path / "best.npz", tmp_path / "h.json"
    rc = main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--epochs", "8",
               "--hidden", "8", "--batch-size", "8", "--lr", "3", "--validation-split", "0.2",
               "--early-stopping", "1", "--save-best", str(best), "--save", str(model),
               "--history", str(hist)])
    assert rc == 0
    out = capsys.readouterr().out
    history = xpnet.History.load(hist)
    assert history.config["train_samples"] == 48
    chosen = int(np.argmin(history.val_loss))
    if len(history) < 8:
        assert f"stopped early after epoch {len(history)}" in out
    assert f"the weights of epoch {chosen + 1}" in out
    final = float(out.strip().splitlines()[-1].split(": ")[1])
    assert final == pytest.approx(history.test_accuracy[chosen], abs=5e-5)
    assert xpnet.TwoLayerNet.load(best).sizes == [784, 8, 10]


def test_train_command_deeper_net_and_quiet(tiny_dataset, capsys):
    rc = main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--epochs", "1",
               "--hidden", "16", "8", "--activation", "sigmoid", "--batch-size", "20", "--quiet"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("final test accuracy: ")


def test_train_command_reports_missing_data_and_bad_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XPNET_DATA", raising=False)
    assert main(["train", "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and "--download" in err
    assert main(["train", "--lr", "-1"]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'xpnet[plot]'" in capsys.readouterr().err


def test_train_command_on_real_fashion_mnist():
    """The README's main command, shortened to one epoch: well above chance (0.1)."""
    from xpnet.datasets import find_dataset

    if find_dataset("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    res = subprocess.run([sys.executable, "-m", "xpnet", "train", "--epochs", "1", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    accuracy = float(res.stdout.strip().rsplit(" ", 1)[-1])
    assert accuracy > 0.75, res.stdout


def test_train_command_conv_nets_save_and_load(tiny_dataset, tmp_path, capsys):
    model = tmp_path / "c.npz"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--model",
                 "convnet", "--filters", "4", "--hidden", "8", "--weight-decay", "0.01",
                 "--epochs", "1", "--batch-size", "20", "--save", str(model), "--quiet"]) == 0
    net = xpnet.SimpleConvNet.load(model)
    assert net.config()["conv_param"]["filter_num"] == 4 and net.weight_decay == 0.01
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--model",
                 "deepconvnet", "--hidden", "8", "--dropout", "0.2", "--epochs", "1",
                 "--batch-size", "30", "--save", str(model), "--quiet"]) == 0
    deep = xpnet.DeepConvNet.load(model)
    assert deep.config()["dropout_ratio"] == 0.2 and deep.state["draws1"] == 2
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tiny_dataset), "--hidden",
                 "8", "--batchnorm", "--dropout", "0.1", "--epochs", "1", "--batch-size", "20",
                 "--save", str(model), "--quiet"]) == 0
    assert list(xpnet.MultiLayerNet.load(model).params)[2:4] == ["gamma1", "beta1"]
    capsys.readouterr()


def test_gradcheck_command_on_a_conv_net(capsys):
    assert main(["gradcheck", "--model", "convnet", "--dataset", "random", "--filters", "2",
                 "--hidden", "4", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "SimpleConvNet(2 5x5 filters, 4 hidden) on cpu float32" in out
    assert "gradient check of SimpleConvNet" in out and ": ok" in out


def test_convnet_training_on_a_real_fashion_mnist_subset(tmp_path):
    """CI's short real training through the CLI: SimpleConvNet on the first 5000 real
    Fashion-MNIST training images, 3 epochs, tested on 1000 real test images: far above
    chance (0.1)."""
    from test_datasets import idx_bytes, write

    from xpnet.datasets import find_dataset, load_mnist

    if find_dataset("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    (x, t), (xt, tt) = load_mnist("fashion-mnist", normalize=False, flatten=False)
    data = tmp_path / "subset"
    data.mkdir()
    for name, a in (("train-images-idx3-ubyte", x[:5000, 0]), ("train-labels-idx1-ubyte", t[:5000]),
                    ("t10k-images-idx3-ubyte", xt[:1000, 0]), ("t10k-labels-idx1-ubyte", tt[:1000])):
        write(data / name, idx_bytes(a.astype("uint8")), False)
    res = subprocess.run([sys.executable, "-m", "xpnet", "train", "--model", "convnet",
                          "--dataset", "fashion-mnist", "--data-dir", str(data), "--epochs", "3",
                          "--optimizer", "adam", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    accuracy = float(res.stdout.strip().rsplit(" ", 1)[-1])
    assert accuracy > 0.7, res.stdout


def test_examples_run(tiny_dataset):
    for script, args in (("train_mnist.py", ["--dataset", "mnist", "--iters", "30",
                                             "--data-dir", str(tiny_dataset)]),
                         ("gradient_check.py", ["--dataset", "mnist",
                                                "--data-dir", str(tiny_dataset)])):
        res = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip()
