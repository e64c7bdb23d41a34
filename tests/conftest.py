"""The backend fixture: every test that takes ``case`` runs once per (namespace, device, dtype).

Missing libraries and GPUs skip with the reason.  ``ci/gpu`` sets XPNET_REQUIRE_GPU=1,
which turns a missing CuPy GPU into a failure instead (torch's and JAX's GPUs still skip
where they are not installed); a comma-separated list of devices (``ci/gpu-run`` sets
``cuda,torch:cuda,jax:cuda``) makes each of those a failure when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

# numba-cuda's CUDA simulator runs the kernels of xpnet._cuda_kernels on the CPU
# (tests/test_graphs.py) on a machine without an NVIDIA driver; with one, or under
# XPNET_REQUIRE_GPU (ci/gpu, ci/gpu-run), they run on the GPU.  numba reads this when it is
# first imported, below.
if not (os.environ.get("XPNET_REQUIRE_GPU") or os.path.exists("/dev/nvidiactl")
        or shutil.which("nvidia-smi")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from xpnet.backend import (  # noqa: E402
    BackendUnavailableError,
    Device,
    is_gpu_device,
    resolve_device,
    to_device,
    to_numpy,
)

# (device string, dtype name): the combinations every backend-neutral test runs on.
CASES = [
    ("cpu", "float64"),
    ("cpu", "float32"),
    ("array_api_strict", "float64"),
    ("array_api_strict:device1", "float32"),
    ("torch:cpu", "float32"),
    ("torch:cpu", "float64"),
    ("jax:cpu", "float32"),
    ("jax:cpu", "float64"),  # with JAX's 64-bit mode on for the test only (see case())
    ("cuda", "float32"),
    ("cuda", "float64"),
    ("torch:cuda", "float32"),
    ("jax:cuda", "float32"),
]


def required_gpu_devices() -> set:
    """The GPU devices whose absence fails the tests instead of skipping them: XPNET_REQUIRE_GPU
    is ``1`` (CuPy's ``cuda``) or a comma-separated list (``cuda,torch:cuda,jax:cuda``)."""
    value = os.environ.get("XPNET_REQUIRE_GPU", "").strip()
    if value in ("", "0"):
        return set()
    return {"cuda"} if value == "1" else {v.strip() for v in value.split(",") if v.strip()}


@dataclass(frozen=True)
class Case:
    """One (namespace, device, dtype) combination, with helpers to make arrays there."""

    device: Device
    dtype_name: str

    @property
    def xp(self):
        return self.device.xp

    @property
    def dtype(self):
        return getattr(self.xp, self.dtype_name)

    @property
    def eps(self) -> float:
        return float(np.finfo(self.dtype_name).eps)

    def asarray(self, a, dtype: str | None = None):
        """A host value as an array of this case (floating values in the case's dtype)."""
        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype_name
        return to_device(a, self.device, dtype=dtype, copy=True)

    def __str__(self) -> str:
        return f"{self.device.name}-{self.dtype_name}"


def _marks(spec: str) -> list:
    """GPU cases need a GPU; JAX's eager cases (every operation dispatched on its own) are the
    slowest on the CPU: they run with ``-m slow`` (CI runs both halves)."""
    return ([pytest.mark.gpu] if is_gpu_device(spec) else []) + (
        [pytest.mark.slow] if spec.startswith("jax") else [])


@pytest.fixture(params=[pytest.param(c, id=f"{c[0]}-{c[1]}", marks=_marks(c[0])) for c in CASES])
def case(request):
    spec, dtype = request.param
    try:
        device = resolve_device(spec)
    except BackendUnavailableError as exc:
        if spec in required_gpu_devices():
            pytest.fail(f"XPNET_REQUIRE_GPU={os.environ['XPNET_REQUIRE_GPU']} but {spec} is "
                        f"unavailable: {exc}")
        pytest.skip(f"{spec}: {exc}")
    with jax_64bit(device.library == "jax" and dtype == "float64"):
        yield Case(device, dtype)


@contextlib.contextmanager
def jax_64bit(on: bool):
    """JAX's float64 needs its 64-bit mode, which is process-wide configuration: turned on for
    one test only (JAX's own context manager), never left on for the rest of the suite."""
    if not on:
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


def tolerance(dtype_name: str) -> float:
    """Relative tolerance for comparing a result in ``dtype_name`` with a float64 reference:
    100 ulps of the dtype, which covers rounding in short reductions and matmuls.  (Numerical
    gradients are compared by xpnet.check_layer / check_gradients, with their own tolerances.)"""
    return 100 * float(np.finfo(dtype_name).eps)


def assert_close(actual, expected, dtype_name: str, *, what: str = ""):
    """Compare an array of any backend with a host float64 reference, at a dtype tolerance.

    The absolute part of the tolerance scales with the reference's largest
    magnitude, so elements that cancel to near zero are judged on the scale of
    the whole result.
    """
    actual = to_numpy(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol = tolerance(dtype_name)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               err_msg=what)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def pytest_report_header(config):
    lines = []
    for spec, dtype in CASES:
        try:
            resolve_device(spec)
            status = "runs"
        except BackendUnavailableError as exc:
            status = f"skipped: {exc}"
        lines.append(f"  {spec}-{dtype}: {status}")
    return ["xpnet backend cases:", *lines]


def pytest_terminal_summary(terminalreporter):
    """The reliability figures: error cases checked, fuzz examples run, kill points survived."""
    import sys

    lines = []
    errors = sys.modules.get("test_errors")
    if errors and errors.ERRORS_CHECKED["count"]:
        lines.append(f"error table: {errors.ERRORS_CHECKED['count']} of "
                     f"{len(errors.CASES) + len(errors.CLI_CASES)} cases raised a clear "
                     "ValueError/TypeError (or exit status 2) and mutated nothing")
    hostile = sys.modules.get("test_hostile_files")
    if hostile and hostile.FUZZ_EXAMPLES["count"]:
        lines.append(f"hostile files: {hostile.FUZZ_EXAMPLES['count']} fuzzed IDX files and "
                     "checkpoints loaded or raised ValueError, within their memory bound")
    if hostile and hostile.HOSTILE_PEAKS:
        lines.append("hostile model files refused at a peak of " + ", ".join(
            f"{peak / 1024:.0f} KiB ({what})" for what, peak in hostile.HOSTILE_PEAKS.items()))
    cli = sys.modules.get("test_cli_errors")
    if cli and cli.CLI_CHECKED["count"]:
        lines.append(f"command line: {cli.CLI_CHECKED['count']} mistakes run as processes ended in "
                     "one line on stderr and exit 2 (130 for Ctrl-C), no traceback")
    resume = sys.modules.get("test_resume")
    if resume and resume.KILL_POINTS:
        points = ", ".join(f"epoch {e} step {s}" for _, e, s in resume.KILL_POINTS)
        lines.append(f"kill and resume: {len(resume.KILL_POINTS)} SIGKILLs survived (last "
                     f"checkpoint at {points}), final weights bit-identical")
    if lines:
        terminalreporter.section("xpnet reliability")
        for line in lines:
            terminalreporter.write_line(line)
