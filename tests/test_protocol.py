"""The structure users build on: the Layer protocol, Sequential nets of any layers (a user's
own too), the backend registry, the optional fast-path module, and the file formats."""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Case, assert_close
from layer_specs import make_specs
from test_train import spiral

import xpnet
from xpnet import backend, checkpoint
from xpnet.backend import device_of, namespace, to_device, to_numpy
from xpnet.layers import find_params

DATA = Path(__file__).parent / "data"
PACKAGE = Path(xpnet.__file__).parent


class Scale(xpnet.Layer):
    """A user's layer: out = x * w, one weight per feature.  Nothing but the math."""

    param_names = ("w",)

    def __init__(self, w):
        self.w = w

    def forward(self, x):
        self.x = x
        return x * self.w

    def backward(self, dout):
        xp = namespace(dout=dout, x=self.x)
        self.dw = xp.sum(dout * self.x, axis=0)
        return dout * self.w


class Tanh(xpnet.Layer):
    """A user's layer without parameters."""

    def forward(self, x):
        self.out = namespace(x=x).tanh(x)
        return self.out

    def backward(self, dout):
        return dout * (1.0 - self.out * self.out)


def _user_net(case, seed=0, hidden=16):
    rng = np.random.default_rng(seed)
    W1, W2 = 0.5 * rng.standard_normal((2, hidden)), 0.3 * rng.standard_normal((hidden, 3))
    return xpnet.Sequential([
        xpnet.Affine(case.asarray(W1), case.asarray(np.zeros(hidden))),
        Scale(case.asarray(np.ones(hidden))),
        Tanh(),
        xpnet.Affine(case.asarray(W2), case.asarray(np.zeros(3))),
    ])


# -- the Layer protocol ------------------------------------------------------------------------


def _public_layer_classes():
    return [obj for name in xpnet.__all__ if inspect.isclass(obj := getattr(xpnet, name))
            and callable(getattr(obj, "forward", None)) and callable(getattr(obj, "backward", None))]


def test_every_public_layer_subclasses_layer():
    classes = _public_layer_classes()
    assert {"Mul", "Add", "Relu", "Sigmoid", "Affine", "SoftmaxWithLoss"} <= {
        c.__name__ for c in classes}
    for cls in classes:
        assert issubclass(cls, xpnet.Layer), cls


@pytest.mark.parametrize("spec", make_specs(np.random.default_rng(0)), ids=str)
def test_params_and_grads_agree_with_what_the_checker_finds(spec, case):
    params = {k: case.asarray(v) for k, v in spec.params.items()}
    layer = spec.build(params)
    assert isinstance(layer, xpnet.Layer)
    assert set(layer.params) == set(find_params(layer)) == set(spec.param_grads)
    assert all(layer.params[k] is v for k, v in params.items())
    assert set(layer.grads) == set(layer.params) and all(g is None for g in layer.grads.values())
    out = layer.forward(*[case.asarray(a) for a in spec.inputs])
    layer.backward(1.0 if spec.scalar_output else case.asarray(np.ones(np.shape(to_numpy(out)))))
    for name, attr in spec.param_grads.items():
        assert layer.grads[name] is getattr(layer, attr)
        assert tuple(layer.grads[name].shape) == tuple(layer.params[name].shape)


def test_user_layer_gets_the_protocol_from_its_parameter_names(case):
    layer = Scale(case.asarray(np.array([1.0, 2.0, 3.0])))
    assert list(layer.params) == ["w"] and layer.grads == {"w": None}
    with pytest.raises(xpnet.ForwardNotCalledError, match=r"Scale.backward\(\) was called before"):
        layer.backward(case.asarray(np.ones((2, 3))))
    layer.forward(case.asarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"Scale.backward: dout has shape \(2, 2\).*\(2, 3\)"):
        layer.backward(case.asarray(np.ones((2, 2))))
    other = "float32" if case.dtype_name == "float64" else (
        "float16" if case.device.library == "jax" else "float64")  # JAX: no float64 here
    with pytest.raises(TypeError, match=f"dout has dtype {other}, but forward's output had "
                                        f"{case.dtype_name}"):
        layer.backward(case.asarray(np.ones((2, 3)), dtype=other))
    with pytest.raises(TypeError, match="dout must be an array"):
        layer.backward([[1.0, 1.0, 1.0]] * 2)
    layer.backward(case.asarray(np.ones((2, 3))))
    assert_close(layer.grads["w"], [2.0, 2.0, 2.0], case.dtype_name)
    layer.reset()
    assert layer.grads == {"w": None} and layer.x is None
    assert layer.params["w"] is not None  # parameters survive a reset
    with pytest.raises(xpnet.ForwardNotCalledError):
        layer.backward(case.asarray(np.ones((2, 3))))


def test_dout_from_another_library_or_device_is_named():
    pytest.importorskip("array_api_strict")
    layer = Tanh()
    layer.forward(to_device(np.ones((2, 3)), "array_api_strict:device1"))
    with pytest.raises(xpnet.DeviceMismatchError, match="device2.*device1"):
        layer.backward(to_device(np.ones((2, 3)), "array_api_strict:device2"))
    with pytest.raises(xpnet.DeviceMismatchError, match="numpy array.*array_api_strict array"):
        layer.backward(np.ones((2, 3)))


@pytest.mark.parametrize("layer", [Scale, Tanh])
def test_user_layers_pass_check_layer_on_every_backend(layer, case, rng):
    x = case.asarray(rng.standard_normal((4, 3)))
    made = layer(case.asarray(rng.standard_normal(3))) if layer is Scale else layer()
    report = xpnet.check_layer(made, x)
    assert report.ok, report
    assert [r.name for r in report.rows] == ["x"] + (["w"] if layer is Scale else [])


def test_a_user_layer_bug_is_caught_by_the_checker(rng):
    class WrongScale(Scale):
        def backward(self, dout):
            dx = super().backward(dout)
            self.dw = 2 * self.dw
            return dx

    report = xpnet.check_layer(WrongScale(rng.standard_normal(3)), rng.standard_normal((4, 3)))
    assert report.failed == ["w"]


# -- Sequential --------------------------------------------------------------------------------


def test_user_layers_train_inside_sequential_on_every_backend(case):
    x, t = spiral()
    net = _user_net(case)
    assert list(net.params) == ["W1", "b1", "w1", "W2", "b2"]
    assert list(net.layers) == ["Affine1", "Scale1", "Tanh1", "Affine2"]
    history = xpnet.Trainer(net, xpnet.Adam(0.03), batch_size=32, epochs=40,
                            progress=False).fit(x, t)
    assert history.train_accuracy[-1] >= 0.9, history.records[-1]
    assert net.device == case.device.name and net.dtype == case.dtype_name
    assert all(device_of(v) == case.device for v in net.params.values())


def test_sequential_passes_the_gradient_check_on_every_backend(case, rng):
    net = _user_net(case, hidden=5)
    x = case.asarray(rng.standard_normal((6, 2)))
    t = case.asarray(rng.integers(0, 3, 6), dtype="int64")
    report = xpnet.check_gradients(net, x, t)
    assert report.ok, report
    assert [r.name for r in report.rows] == list(net.params)


def test_fused_sgd_applies_to_any_layer_with_parameters(case, rng):
    # plain SGD is fused into backprop, the user's layer included; the result is the update's
    fused, plain = _user_net(case, hidden=5), _user_net(case, hidden=5)
    x = case.asarray(rng.standard_normal((8, 2)))
    t = case.asarray(rng.integers(0, 3, 8), dtype="int64")
    opt_fused, opt_plain = xpnet.SGD(0.3), xpnet.SGD(0.3)
    for _ in range(3):
        fused.train_step(x, t, opt_fused)
        opt_plain.update(plain.params, plain.gradient(x, t))
    assert opt_fused.steps == opt_plain.steps == 3
    for name, value in plain.params.items():
        assert_close(fused.params[name], to_numpy(value), case.dtype_name, what=name)


def test_book_numbering_counts_each_parameter_name():
    rng = np.random.default_rng(0)
    net = xpnet.Sequential([
        xpnet.Affine(rng.standard_normal((4, 3)), np.zeros(3)), Scale(np.ones(3)), xpnet.Relu(),
        xpnet.Affine(rng.standard_normal((3, 3)), np.zeros(3)), Scale(np.ones(3)),
        xpnet.Affine(rng.standard_normal((3, 2)), np.zeros(2)),
    ])
    assert list(net.params) == ["W1", "b1", "w1", "W2", "b2", "w2", "W3", "b3"]
    assert list(net.layers) == ["Affine1", "Scale1", "Relu1", "Affine2", "Scale2", "Affine3"]
    assert net.params["w2"] is net.layers["Scale2"].w


def test_sequential_refuses_a_parameter_array_with_two_owners():
    W, b = np.ones((3, 3)), np.zeros(3)
    affine = xpnet.Affine(W, b)
    with pytest.raises(ValueError, match=r"Affine2's parameter W is the array that is already W1"):
        xpnet.Sequential([affine, xpnet.Relu(), affine])
    with pytest.raises(ValueError, match=r"Affine2's parameter b is the array that is already b1"):
        xpnet.Sequential([affine, xpnet.Affine(np.ones((3, 3)), b)])


def test_sequential_rejects_what_is_not_a_layer():
    with pytest.raises(ValueError, match="at least one layer"):
        xpnet.Sequential([])
    with pytest.raises(TypeError, match=r"layer 'list1' is a list, not an xpnet.Layer"):
        xpnet.Sequential([[1, 2]])
    with pytest.raises(TypeError, match="loss must be a layer"):
        xpnet.Sequential([xpnet.Relu()], loss=3)


def test_sequential_with_user_layers_saves_and_loads(tmp_path, rng):
    net = _user_net(Case(backend.resolve_device("cpu"), "float64"), seed=3)
    net.params["w1"] = rng.standard_normal(16)  # not the initial values
    path = tmp_path / "user.npz"
    net.save(path)
    back = xpnet.Sequential.load(path)
    x = rng.standard_normal((5, 2))
    np.testing.assert_array_equal(back.predict(x), net.predict(x))
    assert list(back.layers) == list(net.layers) and back.dtype == "float64"
    with pytest.raises(ValueError, match="holds a 'Sequential'"):
        xpnet.TwoLayerNet.load(path)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["layers"][1].update(type="nowhere.Scale"), "no xpnet.Layer subclass is called"),
    (lambda c: c.update(layers="Affine"), "does not build a net"),
    (lambda c: c["layers"][0].update(W=3), "does not build a net"),
    (lambda c: c["loss"].update(type="os.system"), "no xpnet.Layer subclass is called 'os.system'"),
])
def test_a_sequential_file_with_a_foreign_config_is_refused(tmp_path, edit, match):
    net = _user_net(Case(backend.resolve_device("cpu"), "float64"))
    config = net.config()
    assert config["layers"][1]["type"] == f"{__name__}.Scale"
    edit(config)
    checkpoint.save_model(tmp_path / "bad.npz", config,
                          {k: to_numpy(v) for k, v in net.params.items()})
    with pytest.raises(ValueError, match=match):
        xpnet.Sequential.load(tmp_path / "bad.npz")


def test_a_trainer_passes_checked_labels_on_explicitly():
    seen = []

    class Recording(xpnet.SoftmaxWithLoss):
        def forward(self, x, t, *, check_labels=True):
            seen.append(check_labels)
            return super().forward(x, t, check_labels=check_labels)

    x, t = spiral(n_per_class=10)
    rng = np.random.default_rng(0)
    net = xpnet.Sequential([xpnet.Affine(rng.standard_normal((2, 3)), np.zeros(3))], Recording())
    xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False).fit(
        x.astype(np.float64), t)
    assert seen == [False] * 3  # checked once by the Trainer, never again per step
    net.loss(x.astype(np.float64), t)
    assert seen[-1] is True


def test_a_loss_layer_without_check_labels_still_trains():
    class PlainLoss(xpnet.SoftmaxWithLoss):
        def forward(self, x, t):
            return super().forward(x, t)

    x, t = spiral(n_per_class=10)
    rng = np.random.default_rng(0)
    net = xpnet.Sequential([xpnet.Affine(rng.standard_normal((2, 3)), np.zeros(3))], PlainLoss())
    history = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=2, progress=False).fit(
        x.astype(np.float64), t)
    assert len(history) == 2


# -- files -------------------------------------------------------------------------------------


def test_models_saved_by_version_0_1_still_load():
    ref = np.load(DATA / "v0.1-predictions.npz")
    two = xpnet.TwoLayerNet.load(DATA / "twolayernet-v0.1.npz")
    multi = xpnet.MultiLayerNet.load(DATA / "multilayernet-v0.1.npz")
    assert repr(two) == "TwoLayerNet(6, 5, 3, device='cpu', dtype='float32')"
    assert multi.activation == "sigmoid" and multi.dtype == "float64"
    # The same weights, so the same predictions up to the last bit or two: the reference was
    # computed with this machine's BLAS kernels, another CPU may sum in another order.
    np.testing.assert_allclose(two.predict(ref["x"]), ref["twolayernet"],
                               rtol=4 * np.finfo(np.float32).eps, atol=0)
    np.testing.assert_allclose(multi.predict(ref["x"].astype(np.float64)), ref["multilayernet"],
                               rtol=4 * np.finfo(np.float64).eps, atol=0)


def test_both_file_formats_are_named_in_one_module(tmp_path):
    net = xpnet.TwoLayerNet(4, 3, 2)
    net.save(tmp_path / "m.npz")
    config, arrays = checkpoint.read_model(tmp_path / "m.npz")
    assert config["class"] == "TwoLayerNet" and set(arrays) == set(net.params)
    x, t = spiral(n_per_class=4)
    net = xpnet.TwoLayerNet(2, 3, 3)
    xpnet.Trainer(net, xpnet.Momentum(0.1), batch_size=4, epochs=1, progress=False,
                  checkpoint=tmp_path / "ck.npz").fit(x, t)
    state = checkpoint.read_training(tmp_path / "ck.npz")
    assert set(state.params) == set(net.params) and state.optimizer["type"] == "Momentum"
    assert set(state.optimizer["state"]) == set(net.params)
    with pytest.raises(ValueError, match="training checkpoint: resume it"):
        checkpoint.read_model(tmp_path / "ck.npz")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        checkpoint.read_training(tmp_path / "m.npz")
    assert (checkpoint.MODEL_FORMAT, checkpoint.TRAINING_FORMAT) == ("xpnet-net-1",
                                                                      "xpnet-train-1")


# -- backends ----------------------------------------------------------------------------------


class FakeArray:
    """Arrays of a pretend library: NumPy data behind a type of its own, on devices 'fake:N'."""

    def __init__(self, data, device="fake:0"):
        self.data, self.device = np.asarray(data), device

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)

    def __array_namespace__(self, api_version=None):
        import array_api_compat.numpy

        return array_api_compat.numpy


class FakeBackend(backend.Backend):
    library = "fake"
    prefixes = ("fake",)
    forms = "'fake:N'"
    install_hint = "fake is never installed"

    def module(self):
        return sys.modules[__name__]

    def namespace(self):
        import array_api_compat.numpy

        return array_api_compat.numpy

    def owns(self, x):
        return isinstance(x, FakeArray)

    def device_name(self, x):
        return x.device

    def resolve(self, spec, rest):
        return self.device(f"fake:{rest or 0}", f"fake:{rest or 0}")

    def to_numpy(self, x):
        return x.data.copy()

    def devices(self):
        return ["fake:0", "fake:1"], "pretend"


def test_adding_a_backend_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(backend, "BACKENDS", dict(backend.BACKENDS))
    monkeypatch.setattr(backend, "_BACKEND_BY_TYPE", {})
    backend.register(FakeBackend)
    assert backend.resolve_device("fake:1").name == "fake:1"
    a, b = FakeArray([1.0, 2.0], "fake:0"), FakeArray([3.0], "fake:1")
    assert device_of(a).name == "fake:0" and backend.is_array(a)
    np.testing.assert_array_equal(to_numpy(a), [1.0, 2.0])
    with pytest.raises(xpnet.DeviceMismatchError, match="x is on 'fake:0', y is on 'fake:1'"):
        namespace(x=a, y=b)
    with pytest.raises(ValueError, match="'fake:N'"):
        backend.resolve_device("nowhere")
    entry = next(e for e in xpnet.available_backends() if e["library"] == "fake")
    assert entry["devices"] == ["fake:0", "fake:1"] and entry["note"] == "pretend"


def test_every_backend_is_a_registered_class_that_knows_its_arrays(case):
    b = case.device.backend
    assert isinstance(b, backend.Backend) and backend.BACKENDS[b.library] is b
    x = case.asarray(np.arange(3.0))
    assert backend.backend_of(x) is b and b.owns(x)
    assert b.device_name(x) == case.device.name
    assert backend.resolve_device(case.device.name) == case.device
    assert case.device.name in b.devices()[0]


# -- structure ---------------------------------------------------------------------------------


def test_no_function_in_the_library_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


# An editable install (pip install -e) finds xpnet's modules in the source tree whatever
# sys.path says: drop its finder, so that the copy without _fast.py is what gets imported.
_ONLY_THE_COPY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in getattr(f, "__module__", "") + type(f).__module__]
"""

_WITHOUT_FAST = _ONLY_THE_COPY + """
import json
import numpy as np
import xpnet
assert "xpnet._fast" not in sys.modules and "xpnet._graphs" not in sys.modules
try:
    xpnet.Trainer(xpnet.TwoLayerNet(4, 3, 2), xpnet.SGD(), compile=True)
except ValueError as exc:
    assert "runs eagerly" in str(exc) and "CUDA graph" not in str(exc), exc
rng = np.random.default_rng(0)
x, t = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)
net = xpnet.MultiLayerNet([6, 5, 3], seed=1, dtype="float64")
opt = xpnet.SGD(0.1)
losses = [float(net.train_step(x, t, opt)) for _ in range(5)]
report = xpnet.check_gradients(net, x, t)
history = xpnet.Trainer(xpnet.MultiLayerNet([6, 5, 3]), xpnet.Momentum(0.1), batch_size=8,
                        epochs=2, progress=False).fit(x, t)
assert history.config["step"] == "layers", history.config
assert history.config["blas_threads"] is None, history.config
assert history.train_loss[1] < history.train_loss[0], history.train_loss
print(json.dumps({"losses": losses, "ok": report.ok, "steps": opt.steps,
                  "W1": net.params["W1"].tolist()}))
"""


def test_the_library_is_correct_without_its_fast_path_module(tmp_path):
    # Deleting the speed module (xpnet/_fast.py, and the CUDA graphs' _graphs.py and
    # _cuda_kernels.py) must leave a correct, slower library.
    shutil.copytree(PACKAGE, tmp_path / "xpnet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("_fast.py", "_graphs.py", "_cuda_kernels.py"):
        (tmp_path / "xpnet" / name).unlink()
    run = subprocess.run([sys.executable, "-c", _WITHOUT_FAST], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    portable = json.loads(run.stdout)
    info = subprocess.run([sys.executable, "-c", _ONLY_THE_COPY + "import runpy\n"
                           "runpy.run_module('xpnet', run_name='__main__')", "info"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path)})
    assert "fast paths: none" in info.stdout, info.stdout + info.stderr
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)
    net = xpnet.MultiLayerNet([6, 5, 3], seed=1, dtype="float64")
    opt = xpnet.SGD(0.1)
    losses = [float(net.train_step(x, t, opt)) for _ in range(5)]
    assert portable["ok"] and portable["steps"] == opt.steps == 5
    np.testing.assert_allclose(portable["losses"], losses, rtol=1e-12)
    np.testing.assert_allclose(portable["W1"], net.params["W1"], rtol=1e-12, atol=1e-14)
