"""``xpnet evaluate`` and ``xpnet predict``: a saved model on a dataset's test set or on images
of one's own, with training's preprocessing, checked shapes and values, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_datasets import make_dataset

import xpnet
from xpnet.cli import main
from xpnet.datasets import load_mnist


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A random MNIST-format dataset (60 training, 30 test images) and no other."""
    _, arrays = make_dataset(tmp_path / "data", np.random.default_rng(0), n_train=60,
                             n_test=30)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XPNET_DATA", raising=False)
    return tmp_path / "data", arrays["t10k-images-idx3-ubyte"]


def _mlp(tmp_path, dtype="float32"):
    net = xpnet.TwoLayerNet(784, 12, 10, weight_init_std=0.1, dtype=dtype)
    path = tmp_path / f"mlp-{dtype}.npz"
    net.save(path)
    return net, path


def _convnet(tmp_path):
    net = xpnet.SimpleConvNet(input_dim=(1, 28, 28), conv_param={"filter_num": 3, "filter_size": 5, "pad": 0,
                                                          "stride": 1},
                              hidden_size=8, output_size=10, weight_init_std=0.1)
    path = tmp_path / "conv.npz"
    net.save(path)
    return net, path


def test_evaluate_prints_what_xpnet_evaluate_finds(data, tmp_path, capsys):
    directory, _ = data
    net, path = _mlp(tmp_path)
    assert main(["evaluate", str(path), "--dataset", "mnist", "--data-dir", str(directory),
                 "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    _, (x, t) = load_mnist("mnist", data_dir=directory)
    expected = xpnet.evaluate(net, x, t)
    assert f"loss {expected.loss:.4f}, accuracy {expected.accuracy:.4f}" in out
    assert "confusion matrix (rows: true class, columns: predicted)" in out
    for k in range(10):  # each row of the confusion matrix, its counts as computed
        row = next(line for line in out.splitlines() if line.startswith(f"{k} |"))
        assert [int(v) for v in row.split("|")[1].split()[:10]] == \
            expected.confusion_matrix[k].tolist()


def test_evaluate_a_conv_net_and_draw_its_confusion_matrix(data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    directory, _ = data
    net, path = _convnet(tmp_path)
    png = tmp_path / "confusion.png"
    assert main(["evaluate", str(path), "--dataset", "mnist", "--data-dir", str(directory),
                 "--confusion", str(png)]) == 0
    _, (x, t) = load_mnist("mnist", data_dir=directory, flatten=False)
    assert f"accuracy {xpnet.evaluate(net, x, t).accuracy:.4f}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("layout", ["N,28,28", "N,784", "N,1,28,28", "one image"])
@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_predict_takes_raw_pixels_in_any_image_layout(data, tmp_path, capsys, layout, model):
    _, images = data
    net, path = (_mlp if model == "mlp" else _convnet)(tmp_path)
    x = {"N,28,28": images, "N,784": images.reshape(-1, 784),
         "N,1,28,28": images[:, None], "one image": images[0]}[layout]
    np.save(tmp_path / "in.npy", x)
    assert main(["predict", str(path), str(tmp_path / "in.npy")]) == 0
    printed = [int(v) for v in capsys.readouterr().out.split()]
    scaled = images.astype(np.float32) / np.float32(255)  # as load_mnist(normalize=True)
    scaled = scaled.reshape(-1, 784) if model == "mlp" else scaled[:, None]
    expected = np.argmax(net.predict(scaled), axis=1)
    assert printed == (expected.tolist() if layout != "one image" else [int(expected[0])])


def test_predict_writes_labels_or_probabilities_to_a_file(data, tmp_path, capsys):
    _, images = data
    net, path = _mlp(tmp_path, "float64")
    np.save(tmp_path / "in.npy", images)
    out = tmp_path / "p.npy"
    assert main(["predict", str(path), str(tmp_path / "in.npy"), "--output", str(out),
                 "--probabilities", "--batch-size", "4"]) == 0
    rows = np.load(out)
    assert rows.shape == (30, 10) and rows.dtype == np.float64
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-12)
    scaled = (images.astype(np.float32) / np.float32(255)).reshape(-1, 784).astype(np.float64)
    np.testing.assert_array_equal(rows.argmax(axis=1), net.predict(scaled).argmax(axis=1))
    assert main(["predict", str(path), str(tmp_path / "in.npy"), "--output", str(out)]) == 0
    labels = np.load(out)
    assert labels.dtype == np.int64 and labels.tolist() == rows.argmax(axis=1).tolist()
    assert "wrote 30 labels" in capsys.readouterr().out


def _bad_inputs(tmp_path, images):
    np.save(tmp_path / "floats255.npy", images.astype(np.float32))
    np.save(tmp_path / "shape.npy", images[:, :20, :20])
    np.save(tmp_path / "neg.npy", images.astype(np.int16) - 300)
    np.save(tmp_path / "nan.npy", np.full((2, 784), np.nan, np.float32))
    np.save(tmp_path / "complex.npy", images.astype(np.complex64))
    np.save(tmp_path / "empty.npy", images[:0])
    (tmp_path / "junk.npy").write_bytes(b"xx")
    return [
        (["floats255.npy"], "float pixels from 0 to 255"),
        (["shape.npy"], "has shape (30, 20, 20): the net takes images of shape (784,)"),
        (["neg.npy"], "integer pixels from -300"),
        (["nan.npy"], "NaN or infinite"),
        (["complex.npy"], "dtype complex64"),
        (["empty.npy"], "holds no images"),
        (["junk.npy"], "not an .npy file"),
        (["missing.npy"], "INPUT missing.npy: no such file"),
        (["ok.npy", "--output", "ok.npy"], "--output ok.npy is INPUT"),
        (["ok.npy", "--output", "mlp-float32.npz"], "--output mlp-float32.npz is MODEL"),
        (["ok.npy", "--output", "nodir/x.npy"], "does not exist"),
        (["ok.npy", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["ok.npy", "--device", "gpu0"], "unknown device 'gpu0'"),
    ]


def test_predict_refuses_bad_input_in_one_line_with_status_2(data, tmp_path):
    _, images = data
    _, path = _mlp(tmp_path)
    np.save(tmp_path / "ok.npy", images)
    before = (tmp_path / "ok.npy").read_bytes(), path.read_bytes()
    for args, message in _bad_inputs(tmp_path, images):
        res = subprocess.run([sys.executable, "-m", "xpnet", "predict", path.name, *args],
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("xpnet predict: error: ") and message in res.stderr, (
            args, res.stderr)
    assert ((tmp_path / "ok.npy").read_bytes(), path.read_bytes()) == before  # nothing lost


def test_evaluate_refuses_what_it_cannot_evaluate_with_status_2(data, tmp_path):
    directory, _ = data
    small = xpnet.TwoLayerNet(6, 4, 3)
    small.save(tmp_path / "small.npz")
    ckpt = tmp_path / "ck.npz"
    x = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    xpnet.Trainer(xpnet.TwoLayerNet(6, 4, 3), xpnet.SGD(0.1), batch_size=10, epochs=1,
                  progress=False, checkpoint=ckpt).fit(x, np.arange(20) % 3)
    _, path = _mlp(tmp_path)
    data_dir = ["--dataset", "mnist", "--data-dir", str(directory)]
    for args, message in [
        (["small.npz", *data_dir], "has shape (30, 784): the net takes images of shape (6,)"),
        (["ck.npz", *data_dir], "MODEL ck.npz"),
        (["missing.npz", *data_dir], "MODEL missing.npz: no such file"),
        ([path.name, *data_dir, "--confusion", path.name], "--confusion"),
        ([path.name, "--dataset", "mnist", "--data-dir", str(tmp_path / "none")], "mnist"),
    ]:
        res = subprocess.run([sys.executable, "-m", "xpnet", "evaluate", *args],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "HOME": str(tmp_path)})
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and message in res.stderr, (args, res.stderr)
