"""JAX as a backend: its device strings, its 64-bit mode, traced values.

(Every backend-neutral test also runs on JAX through the ``case`` fixture; these are the
JAX-only parts.)
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import xpnet
from xpnet.backend import (
    BackendUnavailableError,
    describe,
    device_of,
    namespace,
    resolve_device,
    to_device,
    to_numpy,
)

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
