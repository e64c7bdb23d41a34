"""One table of the mistakes users make, over every public entry point.

Each case must raise ValueError or TypeError (or a documented subclass), with a
message naming the argument and the offending shapes/dtypes/devices, and must
leave every array it was given exactly as it was.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import xpnet
from xpnet import functional as F
from xpnet.backend import resolve_device, to_device, to_numpy
from xpnet.cli import main
from xpnet.datasets import load_idx, load_mnist
from xpnet.optim import make_optimizer

ERRORS_CHECKED = {"count": 0}  # reported in the terminal summary


@dataclass
class Case:
    id: str
    call: Callable  # receives the case's arrays (fresh each run)
    exc: type
    match: str
    arrays: Callable = field(default=lambda: {})  # name -> array given to call (checked unchanged)
    needs: str | None = None  # a module that must be importable


R = np.random.default_rng(0)
X = R.random((4, 6)).astype(np.float32)
W = R.random((6, 3)).astype(np.float32)
B = np.zeros(3, np.float32)
LOGITS = R.random((4, 3)).astype(np.float32)
LABELS = np.array([0, 2, 1, 2])


def std():
    return {"x": X.copy(), "W": W.copy(), "b": B.copy(), "s": LOGITS.copy(), "t": LABELS.copy()}


def relu_fwd(a):
    layer = xpnet.Relu()
    layer.forward(a["x"])
    return layer


def net(**kw):
    return xpnet.TwoLayerNet(6, 5, 3, **kw)


def strict(a, dev):
    return to_device(a, f"array_api_strict:{dev}")


def no_cupy(call):
    def wrapped(a):
        saved = sys.modules.get("cupy", "absent")
        sys.modules["cupy"] = None
        try:
            return call(a)
        finally:
            if saved == "absent":
                del sys.modules["cupy"]
            else:
                sys.modules["cupy"] = saved
    return wrapped


def bad_checkpoint(tmp):
    """A model file whose header says TwoLayerNet(6, 5, 3) but whose W1 is (6, 4)."""
    from xpnet.checkpoint import save_model

    good = net()
    arrays = {k: to_numpy(v) for k, v in good.params.items()}
    arrays["W1"] = arrays["W1"][:, :4]
    path = tmp / "bad.npz"
    save_model(path, good.config(), arrays)
    return path


CASES = [
    # --- layers: ranks, shapes, dtypes ---------------------------------------------------------
    Case("affine x without batch axis", lambda a: xpnet.Affine(a["W"], a["b"]).forward(a["x"][0]),
         ValueError, r"batch axis.*got shape \(6,\)", std),
    Case("affine W and x disagree", lambda a: xpnet.Affine(a["W"], a["b"]).forward(a["x"][:, :5]),
         ValueError, r"x of shape \(4, 5\) has 5 features.*W of shape \(6, 3\) expects 6", std),
    Case("affine b of the wrong shape", lambda a: xpnet.Affine(a["W"], a["b"][:2]),
         ValueError, r"b must have shape \(M,\) = \(3,\).*\(2,\)", std),
    Case("affine integer x", lambda a: xpnet.Affine(a["W"], a["b"]).forward(
        a["x"].astype(np.int64)), TypeError, "x must have a real floating dtype.*int64", std),
    Case("relu of a number", lambda a: xpnet.Relu().forward(1.5), TypeError,
         "x must be an array, got float 1.5"),
    Case("sigmoid of a number", lambda a: xpnet.Sigmoid().forward(1.5), TypeError,
         "x must be an array, got float"),
    Case("affine of a list", lambda a: xpnet.Affine(a["W"], a["b"]).forward([[1.0] * 6]),
         TypeError, "x must be an array, got list", std),
    Case("accuracy of lists", lambda a: net().accuracy([[1.0] * 6], [0]), TypeError,
         "x must be an array"),
    Case("trainer without a net", lambda a: xpnet.Trainer(None, xpnet.SGD(0.1)), TypeError,
         r"net must be an xpnet net .* got NoneType"),
    Case("trainer without an optimizer", lambda a: xpnet.Trainer(net(), "sgd"), TypeError,
         "optimizer must be an xpnet optimizer"),
    Case("trainer seed -1", lambda a: xpnet.Trainer(net(), xpnet.SGD(0.1), seed=-1), ValueError,
         "seed must be >= 0, got -1"),
    Case("net seed -1", lambda a: net(seed=-1), ValueError, "seed must be >= 0, got -1"),
    Case("net sizes not a list", lambda a: xpnet.MultiLayerNet(6), TypeError,
         "sizes must be a sequence of ints"),
    Case("load_idx of a directory", lambda a: load_idx(a["tmp"]), ValueError, "is a directory",
         lambda: {"tmp": None}),
    Case("load_idx of a symlink loop", lambda a: load_idx(_symlink_loop(a["tmp"])), ValueError,
         "cannot read it: Too many levels of symbolic links", lambda: {"tmp": None}),
    Case("affine empty batch", lambda a: xpnet.Affine(a["W"], a["b"]).forward(a["x"][:0]),
         ValueError, r"empty batch, shape \(0, 6\)", std),
    Case("affine dout of the wrong shape", lambda a: _fwd_affine(a).backward(a["s"][:, :2]),
         ValueError, r"dout has shape \(4, 2\).*\(4, 3\)", std),
    Case("relu boolean input", lambda a: xpnet.Relu().forward(a["x"] > 0),
         TypeError, "x must have a real floating dtype.*bool", std),
    Case("sigmoid integer input", lambda a: xpnet.Sigmoid().forward(a["t"]),
         TypeError, "x must have a real floating dtype.*int64", std),
    Case("relu dout of another dtype", lambda a: relu_fwd(a).backward(a["x"].astype(np.float64)),
         TypeError, "dout has dtype float64.*float32", std),
    Case("backward before forward", lambda a: xpnet.Relu().backward(a["x"]),
         xpnet.ForwardNotCalledError, r"Relu.backward\(\) was called before Relu.forward\(\)", std),
    Case("mul with a list", lambda a: xpnet.Mul().forward(a["x"], [1.0, 2.0]),
         TypeError, "y must be an array .* or a Python number, got builtins.list", std),
    # --- labels ----------------------------------------------------------------------------------
    Case("labels of shape (N, 1)", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"], a["t"][:, None]),
         ValueError, r"labels t must have shape \(N,\) = \(4,\).*\(4, 1\).*reshape", std),
    Case("negative label", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"], a["t"] - 1),
         ValueError, r"outside \[0, 3\).*-1", std),
    Case("label >= C", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"], a["t"] + 1),
         ValueError, r"outside \[0, 3\).*3", std),
    Case("one-hot rows of the wrong width", lambda a: xpnet.SoftmaxWithLoss().forward(
        a["s"], np.eye(4, dtype=np.float32)[a["t"]]), ValueError, r"x's shape \(4, 3\).*\(4, 4\)", std),
    Case("label count differs from the batch", lambda a: xpnet.SoftmaxWithLoss().forward(
        a["s"], a["t"][:3]), ValueError, r"\(N,\) = \(4,\).*\(3,\)", std),
    Case("empty batch of scores", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"][:0], a["t"][:0]),
         ValueError, r"must not be empty, got shape \(0, 3\)", std),
    Case("scores without batch axis", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"][0], a["t"]),
         ValueError, r"scores of shape \(N, C\).*\(3,\)", std),
    Case("boolean targets", lambda a: xpnet.SoftmaxWithLoss().forward(a["s"], a["s"] > 0.5),
         TypeError, "integer class labels or floating .* got dtype bool", std),
    Case("loss dout not a scalar", lambda a: _fwd_loss(a).backward(a["s"]),
         ValueError, r"number or a 0-d array, got shape \(4, 3\)", std),
    Case("cross_entropy of integer scores", lambda a: F.cross_entropy(a["t"][None, :], a["t"][:1]),
         TypeError, "logits must have a real floating dtype", std),
    Case("one_hot of floats", lambda a: F.one_hot(a["x"], 3), TypeError,
         "integer class labels, got dtype float32", std),
    # --- devices and backends --------------------------------------------------------------------
    Case("arrays on two devices", lambda a: xpnet.Affine(strict(a["W"], "device2"),
         strict(a["b"], "device2")).forward(strict(a["x"], "device1")),
         xpnet.DeviceMismatchError, "x is on 'array_api_strict:device1', W is on "
         "'array_api_strict:device2'", std, needs="array_api_strict"),
    Case("arrays from two libraries", lambda a: xpnet.SoftmaxWithLoss().forward(
        a["s"], __import__("torch").asarray(a["t"])), xpnet.DeviceMismatchError,
         "x is a numpy array on 'cpu', t is a torch array on 'torch:cpu'", std, needs="torch"),
    Case("unknown device string", lambda a: net(device="gpu0"), ValueError,
         "unknown device 'gpu0'; device strings are 'cpu', 'cuda'"),
    Case("device not a string", lambda a: resolve_device(0), TypeError, "device must be a device string"),
    Case("backend not installed", no_cupy(lambda a: net(device="cuda")),
         xpnet.BackendUnavailableError, r"pip install 'xpnet\[cuda12\]'"),
    Case("to_device to an unknown device", lambda a: to_device(a["x"], "tpu"), ValueError,
         "unknown device 'tpu'", std),
    # --- nets --------------------------------------------------------------------------------------
    Case("float layer size", lambda a: xpnet.MultiLayerNet([6, 4.5, 3]), TypeError,
         r"layer sizes must be ints, got \[6, 4.5, 3\]"),
    Case("net dtype integer", lambda a: net(dtype="int32"), ValueError, "dtype must be 'float32'"),
    Case("predict with the wrong features", lambda a: net().predict(a["x"][:, :5]), ValueError,
         r"\(4, 5\) has 5 features.*\(6, 5\) expects 6", std),
    Case("net moved to an integer dtype", lambda a: net().to("cpu", dtype="int32"), ValueError,
         r"dtype must be one of \('float32', 'float64'\) or None, got 'int32'"),
    Case("net moved to float16", lambda a: net().to("cpu", dtype="float16"), ValueError,
         "got 'float16'"),
    Case("accuracy batch_size 0", lambda a: net().accuracy(a["x"], a["t"], batch_size=0),
         ValueError, "batch_size must be a positive int or None, got 0", std),
    Case("accuracy batch_size -1", lambda a: net().accuracy(a["x"], a["t"], batch_size=-1),
         ValueError, "got -1", std),
    Case("accuracy labels above the classes", lambda a: net().accuracy(a["x"], a["t"] + 5),
         ValueError, r"labels outside \[0, 3\).*\[5, 7, 6, 7\]", std),
    Case("accuracy label -1", lambda a: net().accuracy(a["x"], a["t"] - 1), ValueError,
         r"outside \[0, 3\).*\[-1\]", std),
    Case("accuracy one-hot rows of the wrong width", lambda a: net().accuracy(
        a["x"], np.eye(4, dtype=np.float32)[a["t"]]), ValueError, r"x's shape \(4, 3\)", std),
    Case("accuracy float labels", lambda a: net().accuracy(a["x"], a["t"].astype(np.float32)),
         ValueError, r"float labels of shape \(4,\) must be integers", std),
    Case("negative target rows", lambda a: xpnet.SoftmaxWithLoss().forward(
        a["s"], -5 * np.eye(3, dtype=np.float32)[a["t"]]), ValueError,
         "negative, NaN or infinite values", std),
    Case("negative target rows in training", lambda a: _fit(
        a["x"], -5 * np.eye(3, dtype=np.float32)[a["t"]]), ValueError,
         "t_train holds target rows with negative", std),
    Case("numpy.matrix in Mul", lambda a: xpnet.Mul().forward(a["W"].view(np.matrix),
         a["W"].view(np.matrix)), TypeError, r"x is a numpy.matrix.*np.asarray\(x\)", std),
    Case("accuracy label count", lambda a: net().accuracy(a["x"], a["t"][:2]), ValueError,
         "x has 4 samples but t has 2", std),
    Case("params assigned another shape", lambda a: net().params.__setitem__("W1", a["W"]),
         ValueError, r"params\['W1'\] must keep its shape \(6, 5\), got \(6, 3\)", std),
    # --- optimizers --------------------------------------------------------------------------------
    Case("negative learning rate", lambda a: xpnet.SGD(-0.1), ValueError, "lr must be a finite number"),
    Case("NaN learning rate", lambda a: xpnet.Adam(float("nan")), ValueError, "lr must be a finite"),
    Case("infinite learning rate", lambda a: xpnet.Momentum(float("inf")), ValueError, "lr must be"),
    Case("learning rate as text", lambda a: xpnet.SGD("0.1"), TypeError, "lr must be a real number"),
    Case("unknown optimizer", lambda a: make_optimizer("rmsprop"), ValueError,
         "unknown optimizer 'rmsprop'; choose one of"),
    Case("grads keys differ", lambda a: xpnet.SGD(0.1).update({"W": a["W"]}, {"V": a["W"]}),
         ValueError, r"missing \['W'\], unexpected \['V'\]", std),
    Case("grads shape differs", lambda a: xpnet.SGD(0.1).update({"W": a["W"]}, {"W": a["x"]}),
         ValueError, r"grads\['W'\] has shape \(4, 6\), params\['W'\] has \(6, 3\)", std),
    # --- Trainer ---------------------------------------------------------------------------------
    Case("batch_size 0", lambda a: xpnet.Trainer(net(), xpnet.SGD(0.1), batch_size=0), ValueError,
         "batch_size must be >= 1, got 0"),
    Case("batch_size not an int", lambda a: xpnet.Trainer(net(), xpnet.SGD(0.1), batch_size=2.5),
         TypeError, "batch_size must be an int, got float"),
    Case("epochs 0", lambda a: xpnet.Trainer(net(), xpnet.SGD(0.1), epochs=0), ValueError,
         "epochs must be >= 1"),
    Case("raw uint8 pixels", lambda a: _fit(a["x"].astype(np.uint8), a["t"]), TypeError,
         "x_train has dtype uint8.*x / 255", std),
    Case("NaN in the data", lambda a: _fit(np.where(a["x"] > 0.5, np.nan, a["x"]), a["t"]),
         ValueError, "x_train holds NaN or infinite values", std),
    Case("inf in the data", lambda a: _fit(a["x"] / (a["x"] > 0.1), a["t"]), ValueError,
         "x_train holds NaN or infinite values", std),
    Case("samples without batch axis", lambda a: _fit(a["x"][0], a["t"]), ValueError,
         r"non-empty batch \(N, D\), got shape \(6,\)", std),
    Case("label count differs from the samples", lambda a: _fit(a["x"], a["t"][:3]), ValueError,
         "x_train has 4 samples but t_train has 3", std),
    Case("training labels out of range", lambda a: _fit(a["x"], a["t"] * 2), ValueError,
         r"t_train holds class labels outside \[0, 3\): 2 bad value\(s\), e.g. \[4, 4\]", std),
    Case("checkpoint_every without a path", lambda a: xpnet.Trainer(net(), xpnet.SGD(0.1),
         checkpoint_every=5), ValueError, "checkpoint_every needs a checkpoint path"),
    # --- gradient checker ---------------------------------------------------------------------
    Case("unknown gradcheck mode", lambda a: xpnet.check_gradients(net(), a["x"], a["t"], mode="all"),
         ValueError, "mode must be one of", std),
    Case("NaN input to the checker", lambda a: xpnet.check_layer(xpnet.Sigmoid(), a["x"] / 0 * 0),
         ValueError, "x holds NaN or infinite values", std),
    Case("numerical_gradient of a device array", lambda a: xpnet.numerical_gradient(
        np.sum, strict(a["x"], "device1")), TypeError, "host NumPy arrays.*to_numpy", std,
         needs="array_api_strict"),
    Case("numerical_gradient step 0", lambda a: xpnet.numerical_gradient(np.sum, a["x"], h=0),
         ValueError, "h must be a positive finite number, got 0", std),
    Case("check a non-network", lambda a: xpnet.check_gradients(object(), a["x"], a["t"]),
         TypeError, "object has no params mapping", std),
    Case("check_layer wrt an unknown input", lambda a: xpnet.check_layer(
        xpnet.Sigmoid(), a["x"], wrt=["z"]), ValueError, r"wrt names \['z'\] are not inputs", std),
    # --- datasets and files --------------------------------------------------------------------
    Case("unknown dataset", lambda a: load_mnist("cifar10"), ValueError,
         "unknown dataset 'cifar10'; known datasets are"),
    Case("corrupt IDX file", lambda a: load_idx(_write(a["tmp"], "x.idx", b"\x00\x00\x08\x02\x00")),
         ValueError, "x.idx: truncated", lambda: {"tmp": None}),
    Case("checkpoint with a wrong shape", lambda a: xpnet.TwoLayerNet.load(bad_checkpoint(a["tmp"])),
         ValueError, r"bad.npz: W1 has shape \(6, 4\), expected \(6, 5\)",
         lambda: {"tmp": None}),
    Case("training checkpoint for another net", lambda a: _fit(a["x"], a["t"], resume=
         bad_checkpoint(a["tmp"])), ValueError, "not a training checkpoint",
         lambda: {**std(), "tmp": None}),
]


def _write(tmp, name, data):
    path = tmp / name
    path.write_bytes(data)
    return path


def _fwd_affine(a):
    layer = xpnet.Affine(a["W"], a["b"])
    layer.forward(a["x"])
    return layer


def _fwd_loss(a):
    layer = xpnet.SoftmaxWithLoss()
    layer.forward(a["s"], a["t"])
    return layer


def _symlink_loop(tmp):
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return tmp / "a"


def _fit(x, t, **kw):
    return xpnet.Trainer(net(), xpnet.SGD(0.1), progress=False).fit(x, t, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_table(case, tmp_path):
    if case.needs:
        pytest.importorskip(case.needs)
    arrays = case.arrays()
    if "tmp" in arrays:
        arrays["tmp"] = tmp_path
    before = {k: to_numpy(v) for k, v in arrays.items() if k != "tmp"}
    with np.errstate(divide="ignore", invalid="ignore"):
        with pytest.raises(case.exc, match=case.match) as info:
            case.call(arrays)
    assert isinstance(info.value, (ValueError, TypeError)), type(info.value).__mro__
    for k, v in before.items():
        np.testing.assert_array_equal(to_numpy(arrays[k]), v, err_msg=f"{case.id} mutated {k}")
    ERRORS_CHECKED["count"] += 1


CLI_CASES = [
    (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["train", "--batch-size", "ten"], "invalid int value: 'ten'"),
    (["train", "--lr", "-0.5"], "lr must be a finite number"),
    (["train", "--lr", "nan"], "lr must be a finite number"),
    (["train", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "--device", "gpu"], "unknown device 'gpu'"),
    (["train", "--checkpoint-every", "-3", "--checkpoint", "c.npz"], "--checkpoint-every must be >= 1"),
    (["gradcheck", "--mode", "every"], "invalid choice: 'every'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, match", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_error_table(argv, match, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    assert rc == 2
    assert match in capsys.readouterr().err
    ERRORS_CHECKED["count"] += 1
