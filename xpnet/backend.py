"""Backends: the only module in xpnet that knows array libraries by name.

Each array library is one small class here (:class:`NumPyBackend`,
:class:`CuPyBackend`, :class:`TorchBackend`, :class:`StrictBackend`), registered
in :data:`BACKENDS` with :func:`register`.  A backend knows its device strings,
how to recognise its arrays, how to name the device of one, how to copy one to
the host, which devices this machine has, and what to install when its library
is missing.  The public functions below (:func:`resolve_device`,
:func:`device_of`, :func:`namespace`, :func:`to_numpy`, :func:`to_device`,
:func:`available_backends`) are loops over the registry: adding a library is
adding one class.

Rules (the rest of xpnet relies on them):

* Layer and functional code never imports NumPy, CuPy or torch.  It gets its
  namespace from :func:`namespace`, which also checks that every array it is
  given lives in the same library and on the same device.
* Host <-> device moves happen here only: :func:`to_numpy` (a host NumPy copy
  of any supported array) and :func:`to_device` (any array or NumPy array onto
  a device named by a device string).
* Libraries other than NumPy are imported lazily, the first time a device
  string or an array asks for them.  A missing library raises
  :class:`BackendUnavailableError`, which names what to install; a machine
  without a GPU says so.

Device strings
--------------
=============================  ===========================================
``"cpu"`` (or ``"numpy"``)     NumPy on the host
``"cuda"``, ``"cuda:N"``       CuPy on the current / N-th CUDA GPU
``"torch:cpu"``                torch tensors on the CPU (``"torch"`` too)
``"torch:cuda"``,              torch tensors on a CUDA GPU
``"torch:cuda:N"``
``"jax"``, ``"jax:cpu"``       JAX arrays on the CPU
``"jax:cuda"``,                JAX arrays on a CUDA GPU (also ``"jax:cpu:N"``,
``"jax:cuda:N"``               ``"jax:tpu:N"``: whatever ``jax.devices()`` lists)
``"array_api_strict"``         the standard's strict reference implementation
                               on its ``CPU_DEVICE``
``"array_api_strict:NAME"``    one of its simulated devices (``device1``,
                               ``device2``, ...)
=============================  ===========================================
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "BACKENDS",
    "HOST_ARRAY",
    "NO_CONTEXT",
    "Backend",
    "BackendUnavailableError",
    "Device",
    "DeviceMismatchError",
    "available_backends",
    "backend_of",
    "cast_hint",
    "compiling_backend",
    "computes_on_inputs",
    "describe",
    "device_context",
    "device_of",
    "dtype_name",
    "is_array",
    "is_dtype",
    "is_gpu_device",
    "is_scalar",
    "is_writable",
    "namespace",
    "native_device",
    "recorded_device_context",
    "register",
    "resolve_device",
    "resolve_dtype",
    "self_test",
    "to_device",
    "to_numpy",
    "untracked",
]

CUDA_EXTRA_HINT = (
    "install the GPU extra that your NVIDIA driver supports (it brings CuPy and the CUDA "
    "libraries): pip install 'xpnet[cuda12]' (driver >= 525) or 'xpnet[cuda13]' (driver >= 580)"
)

NO_CONTEXT = contextlib.nullcontext()  # what device_context gives where there is nothing to do
HOST_ARRAY = np.ndarray  # for the NumPy fast paths of layer wrappers, which import no library

_DTYPE_NAMES = (
    "float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool",
)


class BackendUnavailableError(ImportError, ValueError):
    """An array library or device named by a device string is not available.

    It is both an :class:`ImportError` (a library is missing) and a
    :class:`ValueError` (the device argument cannot be honoured here), so
    either ``except`` clause catches it.  The message says what to install.
    """


class DeviceMismatchError(ValueError):
    """Arrays from two array libraries or two devices were combined."""


@dataclass(frozen=True)
class Device:
    """A resolved device string.

    Attributes
    ----------
    library : str
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"`` or ``"array_api_strict"``.
    name : str
        The canonical device string, e.g. ``"cpu"``, ``"cuda:0"``,
        ``"torch:cpu"``, ``"array_api_strict:device1"``.
    xp : module
        The Array API namespace for this library (array-api-compat's wrapper
        where the library needs one).
    native : object
        The library's own device object, as its ``asarray(..., device=)`` takes it.
    """

    library: str
    name: str
    xp: Any = field(compare=False, repr=False)
    native: Any = field(compare=False, repr=False)

    def __str__(self) -> str:
        return self.name

    @property
    def backend(self) -> Backend:
        return BACKENDS[self.library]


# -- the backends --------------------------------------------------------------------------------


class Backend:
    """What xpnet needs to know of one array library; subclass it and :func:`register` it.

    Class attributes: ``library`` (the name used everywhere, also the module to
    import), ``prefixes`` (the heads of its device strings: ``"torch"`` for
    ``"torch:cpu"``), ``forms`` (its device strings, for error messages) and
    ``install_hint`` (what to do when the library is missing).
    """

    library: str = ""
    prefixes: tuple = ()
    forms: str = ""
    install_hint: str = ""

    def module(self):
        """The library itself, imported on first use; BackendUnavailableError if it is missing
        or its import fails (a broken install is reported with what failed, not as missing)."""
        try:
            return importlib.import_module(self.library)
        except ImportError as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name == self.library:
                raise BackendUnavailableError(self.install_hint) from exc
            raise BackendUnavailableError(
                f"{self.library} is installed but 'import {self.library}' failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def namespace(self):
        """The Array API namespace of the library (array-api-compat's wrapper)."""
        self.module()
        return importlib.import_module(f"array_api_compat.{self.library}")

    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this library (never imports the library)."""
        raise NotImplementedError

    def device_name(self, x) -> str:
        """The canonical device string of one of its arrays."""
        raise NotImplementedError

    def resolve(self, spec: str, rest: str) -> Device:
        """The Device for device string ``spec``, whose part after the prefix is ``rest``."""
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        """A host NumPy copy of one of its arrays."""
        raise NotImplementedError

    def devices(self) -> tuple[list, str]:
        """``(device strings usable on this machine, a note)`` for ``xpnet info``."""
        raise NotImplementedError

    cast = "{name}.astype({lib}.{dtype})"  # how a user of this library converts an array
    alias = ""  # the usual import name in that hint: np, torch, cupy, ...

    def untracked(self, x):
        """``x`` without anything that would follow it through computations (torch's
        autograd); the array itself for most libraries."""
        return x

    def from_host(self, host: np.ndarray, native):
        """A new array of this library on device ``native`` holding a copy of NumPy ``host``."""
        return self.namespace().asarray(host, device=native, copy=True)

    def context(self, name: str):
        """A context manager under which this library computes on, and creates new arrays
        on, the device called ``name`` (a canonical device string of this backend).

        Nothing to do (the default) for a library that honours ``device=`` and runs each
        operation where its inputs are; CuPy makes the device current.
        """
        return NO_CONTEXT

    def self_test(self, name: str) -> None:
        """Run a tiny real computation on device ``name`` and wait for its result: make an
        array there, an elementwise kernel, a matrix product.  Raises RuntimeError with one
        line naming the step that failed and the library's own message."""
        dev = resolve_device(name)
        xp = dev.xp

        def step(what, compute):
            try:
                return compute()
            except Exception as exc:  # noqa: BLE001 - any failure: one line naming the step
                hint = self.diagnose(exc)
                raise RuntimeError(f"{dev.name}: could not {what}: {_first_line(exc)}"
                                   f"{f' ({hint})' if hint else ''}") from exc

        with self.context(dev.name):
            a = step("create an array", lambda: xp.reshape(
                xp.arange(64, dtype=xp.float32, device=dev.native), (8, 8)) / 64.0)
            b = step("run an elementwise kernel", lambda: a * 2.0 + 1.0)
            c = step("multiply two matrices", lambda: a @ b)
            total = step("copy a result to the host", lambda: float(to_numpy(xp.sum(c))))
        host = np.arange(64, dtype=np.float64).reshape(8, 8) / 64.0
        expected = float(np.sum(host @ (host * 2.0 + 1.0)))
        if not math.isclose(total, expected, rel_tol=1e-4):
            raise RuntimeError(f"{dev.name}: a small matrix product gave {total}, "
                               f"expected {expected}")

    def diagnose(self, exc: BaseException) -> str:
        """What a failure of :meth:`self_test` most likely means, for its one-line message."""
        return ""

    compiles = False  # whether jit() and scan() exist: Trainer(compile=True) needs them

    def jit(self, function):
        """``function`` compiled as one program for this library (JAX: ``jax.jit``); it must be
        pure: arrays in, arrays out, nothing kept."""
        raise NotImplementedError(f"{self.library} does not compile")

    def scan(self, body, carry, xs):
        """Inside a compiled function: ``body(carry, x) -> (carry, y)`` over the leading axis
        of ``xs`` as one loop of the compiled program; ``(final carry, stacked ys)``."""
        raise NotImplementedError(f"{self.library} does not compile")

    def shapes(self, function, *args):
        """``function(*args)`` traced abstractly (shapes and dtypes only, nothing computed:
        ``jax.eval_shape``)."""
        raise NotImplementedError(f"{self.library} does not compile")

    def storable(self, dtype: str) -> str:
        """The dtype (a name) in which this library holds an array asked for in ``dtype``:
        ``dtype`` itself, or a ValueError saying why it cannot be held (JAX without 64-bit)."""
        return dtype

    def device(self, name: str, native) -> Device:
        return Device(self.library, name, self.namespace(), native)


BACKENDS: dict[str, Backend] = {}  # library name -> its backend, in the order `xpnet info` lists


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a :class:`Backend` to the registry."""
    BACKENDS[cls.library] = cls()
    _BACKEND_BY_TYPE.clear()
    return cls


_BACKEND_BY_TYPE: dict = {}  # array type -> its backend (None: not an array)


def _parse_index(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(
            f"device {spec!r}: expected a GPU index such as 'cuda:0', got {text!r}; "
            f"device strings are {device_string_forms()}"
        )
    return int(text)


def _check_cuda_index(count: int, who: str, index: int, spec: str, problem: str = "") -> None:
    if count == 0:
        raise BackendUnavailableError(
            f"device {spec!r}: {who} sees no CUDA GPU on this machine ("
            + (problem or "no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it")
            + "); use device='cpu'"
        )
    if not 0 <= index < count:
        raise ValueError(
            f"device {spec!r}: GPU index {index} is out of range; {who} sees {count} GPU(s) "
            f"(cuda:0 .. cuda:{count - 1})"
        )


_CUDA_PIECES = (  # (text in an error, the piece of CUDA it names)
    ("cublas", "cuBLAS (matrix products)"),
    ("nvrtc", "NVRTC (CuPy's kernel compiler)"),
    ("nvjitlink", "nvJitLink"),
    ("curand", "cuRAND"),
    ("cudart", "the CUDA runtime"),
)


def _has_nvidia_driver() -> bool:
    """Whether the NVIDIA driver's library can be loaded (Linux; elsewhere assumed present)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (the type alone for an empty message)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _cuda_diagnosis(exc: BaseException, who: str) -> str:
    """The likely cause of a failed GPU self-test, from the library's error text."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if "insufficient" in text or ("driver" in text and ("too old" in text or "version" in text)):
        if not _has_nvidia_driver():  # the CUDA runtime says "insufficient" for no driver too
            return ("no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded): "
                    "no GPU here, or its driver is not installed")
        return (f"the NVIDIA driver is older than this {who} build needs: update the driver, "
                "or install the build for an older CUDA (xpnet[cuda12] needs driver >= 525)")
    if "no cuda-capable device" in text or "nodevice" in text:
        return "no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES"
    for key, piece in _CUDA_PIECES:
        if key in text:
            return (f"{piece} could not be loaded: pip install 'xpnet[cuda12]' or "
                    "'xpnet[cuda13]' brings the CUDA libraries as wheels; with a CUDA Toolkit "
                    "of your own, set CUDA_PATH to it")
    return ""


@register
class NumPyBackend(Backend):
    library = "numpy"
    alias = "np"
    prefixes = ("cpu", "numpy")
    forms = "'cpu'"
    install_hint = "NumPy is not installed; install it with: pip install numpy"

    def owns(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def device_name(self, x) -> str:
        return "cpu"

    def resolve(self, spec, rest):
        if rest:
            raise ValueError(f"unknown device {spec!r}; device strings are {device_string_forms()}")
        return self.device("cpu", "cpu")

    def to_numpy(self, x):
        return np.array(x, copy=True)

    def devices(self):
        return ["cpu"], ""


@register
class CuPyBackend(Backend):
    library = "cupy"
    alias = "cupy"
    prefixes = ("cuda",)
    forms = "'cuda', 'cuda:N'"
    install_hint = "CuPy is not installed; " + CUDA_EXTRA_HINT

    def owns(self, x) -> bool:
        return array_api_compat.is_cupy_array(x)

    def device_name(self, x) -> str:
        return f"cuda:{x.device.id}"

    def gpu_count(self) -> int:
        return self._gpus()[0]

    def _gpus(self) -> tuple[int, str]:
        """``(number of GPUs CuPy can use, why none where it is 0)``."""
        cupy = self.module()
        try:
            return int(cupy.cuda.runtime.getDeviceCount()), ""
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, a driver missing or too old
            hint = self.diagnose(exc)
            return 0, _first_line(exc) + (f"; {hint}" if hint else "")

    def resolve(self, spec, rest):
        cupy = self.module()
        count, problem = self._gpus()
        if rest:
            index = _parse_index(rest, spec)
        else:
            _check_cuda_index(count, "CuPy", 0, spec, problem)
            index = cupy.cuda.Device().id  # the current device
        _check_cuda_index(count, "CuPy", index, spec, problem)
        return self.device(f"cuda:{index}", cupy.cuda.Device(index))

    def to_numpy(self, x):
        with self.context(self.device_name(x)):
            return x.get()

    def context(self, name):
        # CuPy runs every kernel on the *current* GPU, and array-api-compat ignores device=
        # in CuPy's creation functions (zeros, arange, astype, ...): so the arrays' GPU is
        # made current for the call, and the previous one restored after it.
        return self.module().cuda.Device(int(name.rpartition(":")[2]))

    def diagnose(self, exc):
        return _cuda_diagnosis(exc, "CuPy")

    def devices(self):
        count, problem = self._gpus()
        return [f"cuda:{i}" for i in range(count)], "" if count else (
            problem or "no CUDA GPU visible")


@register
class TorchBackend(Backend):
    library = "torch"
    alias = "torch"
    cast = "{name}.to({lib}.{dtype})"
    prefixes = ("torch",)
    forms = "'torch:cpu', 'torch:cuda', 'torch:cuda:N'"
    install_hint = "PyTorch is not installed; install it with: pip install torch"

    def owns(self, x) -> bool:
        return array_api_compat.is_torch_array(x)

    def device_name(self, x) -> str:
        return f"torch:{x.device}"

    def gpu_count(self) -> int:
        torch = self.module()
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def resolve(self, spec, rest):
        torch = self.module()
        if rest in ("", "cpu"):
            return self.device("torch:cpu", torch.device("cpu"))
        kind, _, index_text = rest.partition(":")
        if kind != "cuda":
            raise ValueError(f"unknown device {spec!r}; device strings are {device_string_forms()}")
        index = _parse_index(index_text, spec) if index_text else None
        _check_cuda_index(self.gpu_count(), "PyTorch", index or 0, spec)
        if index is None:
            index = torch.cuda.current_device()
        return self.device(f"torch:cuda:{index}", torch.device("cuda", index))

    def to_numpy(self, x):
        return x.detach().to("cpu", copy=True).numpy()

    def diagnose(self, exc):
        return _cuda_diagnosis(exc, "PyTorch")

    def from_host(self, host, native):
        if host.ndim == 0:  # torch.asarray(0-d NumPy array, device="cuda", copy=True) raises
            # "can't alias tensor from device 'cpu' to 'cuda:0'": go through a 1-element array
            return self.module().reshape(super().from_host(host.reshape(1), native), ())
        return super().from_host(host, native)

    def untracked(self, x):
        # xpnet computes its own gradients: a tensor that requires grad would make every
        # result (the weights too) a node of an autograd graph that grows at each step.
        return x.detach() if x.requires_grad else x

    def devices(self):
        count = self.gpu_count()
        return ["torch:cpu"] + [f"torch:cuda:{i}" for i in range(count)], (
            "" if count else "no CUDA GPU visible")


@register
class JaxBackend(Backend):
    library = "jax"
    alias = "jnp"
    prefixes = ("jax",)
    forms = "'jax', 'jax:cpu', 'jax:cuda', 'jax:cuda:N'"
    install_hint = ("JAX is not installed; install it with: pip install 'xpnet[jax]' (CPU), or "
                    "'xpnet[jax-cuda12]' / 'xpnet[jax-cuda13]' for NVIDIA GPUs")
    _PLATFORMS = {"cuda": "gpu"}  # device-string kind -> jax.devices() platform

    def __init__(self):
        self._names: dict = {}  # jax Device -> its canonical device string
        self._plugin_errors: list = []  # what JAX's plugins logged when they failed to start

    def context(self, name):
        # JAX computes float32 products in TF32 on recent NVIDIA GPUs by default (bfloat16
        # passes on TPUs): about 3 digits.  xpnet's layers compute in float32 on every backend,
        # as NumPy, CuPy and torch do, so its calls run with full float32 products (traced
        # programs too: the setting holds while they are traced).
        return self.module().default_matmul_precision("highest")

    def namespace(self):
        return importlib.import_module("jax.numpy")  # an Array API namespace of its own

    def owns(self, x) -> bool:
        return array_api_compat.is_jax_array(x)  # a traced value (under jax.jit) is one too

    def device_name(self, x):
        # None for a traced value: it has no device until the compiled program runs.
        dev = array_api_compat.device(x)
        if dev is None:
            return None
        try:
            return self._names[dev]
        except KeyError:
            name = self._names[dev] = self.name_of(dev)
            return name

    @staticmethod
    def name_of(dev) -> str:
        """``"jax:cpu"`` for the first CPU, ``"jax:cuda:N"`` for GPU N, ``"jax:PLATFORM:N"``."""
        platform = "cuda" if dev.platform in ("gpu", "cuda") else dev.platform
        if platform == "cpu" and dev.id == 0:
            return "jax:cpu"
        return f"jax:{platform}:{dev.id}"

    def _devices(self, kind: str, spec: str) -> list:
        jax = self.module()
        try:
            with _kept_as_lines(logging.getLogger("jax._src.xla_bridge"), self._plugin_errors):
                return list(jax.devices(self._PLATFORMS.get(kind, kind)))
        except RuntimeError as exc:  # "Unknown backend gpu", "no platforms that are instances"
            gpu = " (a GPU needs pip install 'xpnet[jax-cuda12]' or 'xpnet[jax-cuda13]')" \
                if kind == "cuda" else ""
            if kind == "cuda" and self._plugin_errors:  # installed, but it did not start
                gpu = f" (JAX's CUDA plugin did not start: {self._plugin_errors[-1]})"
            raise BackendUnavailableError(
                f"device {spec!r}: JAX has no {kind!r} devices here{gpu}: {_first_line(exc)}; "
                "use device='jax:cpu'") from None

    def resolve(self, spec, rest):
        kind, _, index_text = (rest or "cpu").partition(":")
        found = self._devices(kind, spec)
        index = _parse_index(index_text, spec) if index_text else 0
        ids = {d.id: d for d in found}
        if index not in ids:
            raise ValueError(f"device {spec!r}: JAX has no {kind} device {index}; its {kind} "
                             f"devices are {[self.name_of(d) for d in found]}")
        return self.device(self.name_of(ids[index]), ids[index])

    def to_numpy(self, x):
        if array_api_compat.device(x) is None:
            raise TypeError("a traced JAX value (inside jax.jit) has no data to copy to the "
                            "host; return it from the compiled function first")
        return np.array(x, copy=True)

    def storable(self, dtype):
        # Without JAX's 64-bit mode, asking for a 64-bit type gives the 32-bit one with a
        # warning; integers (labels) are narrowed, floats are refused (the net's dtype would
        # silently change).
        wanted = np.dtype(self.module().dtypes.canonicalize_dtype(dtype)).name
        if wanted != dtype and np.dtype(dtype).kind not in "iub":
            raise ValueError(
                f"JAX holds no {dtype} arrays while its 64-bit mode is off: use "
                "dtype='float32', or turn the mode on first with "
                "jax.config.update('jax_enable_x64', True) (or JAX_ENABLE_X64=1)")
        return wanted

    def from_host(self, host, native):
        wanted = self.storable(host.dtype.name)
        if wanted != host.dtype.name:  # int64 labels while JAX's 64-bit mode is off
            info = np.iinfo(wanted)
            if host.size and not (info.min <= host.min() and host.max() <= info.max):
                raise ValueError(f"JAX holds no {host.dtype.name} arrays while its 64-bit mode "
                                 f"is off, and these integers do not fit in {wanted}")
            host = host.astype(wanted)
        return super().from_host(host, native)

    def diagnose(self, exc):
        return _cuda_diagnosis(exc, "JAX")

    compiles = True

    def jit(self, function):
        return self.module().jit(function)

    def scan(self, body, carry, xs):
        return importlib.import_module("jax.lax").scan(body, carry, xs)

    def shapes(self, function, *args):
        return self.module().eval_shape(function, *args)

    def devices(self):
        names = [self.name_of(d) for d in self._devices("cpu", "jax:cpu")]
        try:
            names += [self.name_of(d) for d in self._devices("cuda", "jax:cuda")]
        except BackendUnavailableError:
            if self._plugin_errors:
                return names, f"JAX's CUDA plugin did not start: {self._plugin_errors[-1]}"
            return names, ("no CUDA GPU visible to JAX (its GPU build comes with "
                           "pip install 'xpnet[jax-cuda12]' or 'xpnet[jax-cuda13]')")
        return names, ""


@contextlib.contextmanager
def _kept_as_lines(logger, lines: list):
    """Under this context, what ``logger`` reports at WARNING or above is appended to ``lines``
    as one line each (the exception's first line where it logged one) instead of printed:
    JAX logs a whole traceback when its CUDA plugin cannot start (no driver, no GPU), which
    ``xpnet info`` reports as one line."""
    class Keep(logging.Handler):
        def emit(self, record):
            exc = record.exc_info[1] if record.exc_info else None
            lines.append(_first_line(exc) if exc is not None
                         else record.getMessage().splitlines()[0])

    handler, propagate = Keep(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@register
class StrictBackend(Backend):
    library = "array_api_strict"
    alias = "xp"
    cast = "xp.astype({name}, xp.{dtype})"
    prefixes = ("array_api_strict",)
    forms = "'array_api_strict', 'array_api_strict:NAME' (e.g. 'array_api_strict:device1')"
    install_hint = ("array_api_strict is not installed; install it with: pip install "
                    "array-api-strict (it comes with pip install 'xpnet[test]')")

    def namespace(self):
        return self.module()  # the library is its own (strict) namespace

    def owns(self, x) -> bool:
        # Its Array class (not its dtypes or devices, which live in the same package).
        return type(x).__module__.startswith("array_api_strict") and hasattr(x, "__array_namespace__")

    def device_name(self, x) -> str:
        return f"array_api_strict:{x.device._device}"

    def _known(self) -> dict:
        return {str(d._device): d for d in self.module().__array_namespace_info__().devices()}

    def resolve(self, spec, rest):
        name = rest or "CPU_DEVICE"
        known = self._known()
        if name not in known:
            raise ValueError(f"device {spec!r}: array_api_strict has no device {name!r}; "
                             f"its devices are {sorted(known)}")
        return self.device(f"array_api_strict:{name}", known[name])

    def to_numpy(self, x):
        host = x.to_device(self.module().Device("CPU_DEVICE"))
        return np.array(np.asarray(host), copy=True)

    def devices(self):
        return [f"array_api_strict:{name}" for name in self._known()], ""


# -- device strings and arrays -------------------------------------------------------------------


def device_string_forms() -> str:
    """The device strings of every registered backend, for error messages."""
    return ", ".join(b.forms for b in BACKENDS.values())


def resolve_device(device: str | Device) -> Device:
    """Resolve a device string (see the module docstring) to a :class:`Device`.

    Raises
    ------
    TypeError
        If ``device`` is not a string.
    ValueError
        If the string is not a device string, or names a device that does not exist.
    BackendUnavailableError
        If the library is not installed or the machine has no GPU.
    """
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a device string ({device_string_forms()}), "
            f"got {type(device).__name__} {device!r}"
        )
    spec = device.strip()
    head, _, rest = spec.partition(":")
    for backend in BACKENDS.values():
        if head in backend.prefixes:
            return backend.resolve(spec, rest)
    raise ValueError(f"unknown device {device!r}; device strings are {device_string_forms()}")


def backend_of(x) -> Backend | None:
    """The backend whose array ``x`` is, or None for anything else (numbers, lists, ...)."""
    kind = type(x)
    try:
        return _BACKEND_BY_TYPE[kind]
    except KeyError:
        found = next((b for b in BACKENDS.values() if b.owns(x)), None)
        _BACKEND_BY_TYPE[kind] = found
        return found


def is_array(x) -> bool:
    """True for an array of a registered library (not for Python or NumPy scalars)."""
    return backend_of(x) is not None


def is_writable(x) -> bool:
    """Whether ``x`` can be updated in place (False for read-only NumPy arrays, JAX, ...)."""
    return bool(array_api_compat.is_writeable_array(x))


def _library_names() -> str:
    names = {"numpy": "NumPy", "cupy": "CuPy", "torch": "torch", "jax": "JAX"}
    return ", ".join(names.get(lib, lib) for lib in BACKENDS)


def device_of(x) -> Device:
    """The :class:`Device` an array lives on.

    Raises
    ------
    TypeError
        If ``x`` is not an array of a registered library.
    """
    backend = backend_of(x)
    if backend is None:
        raise TypeError(f"expected a {_library_names()} array, "
                        f"got {type(x).__module__}.{type(x).__qualname__}")
    return Device(backend.library, backend.device_name(x), array_api_compat.array_namespace(x),
                  array_api_compat.device(x))


def native_device(x):
    """The library's own device object of array ``x``, as ``xp.zeros(..., device=)`` takes it;
    None for a value traced by ``jax.jit`` (it has none: new arrays then go where the
    compiled program runs)."""
    if type(x) is np.ndarray:  # taken at every Relu call on the CPU
        return "cpu"
    return array_api_compat.device(x)


def describe(x) -> tuple | None:
    """``(library, shape, dtype, device name)`` of an array, or None for anything else.

    What a layer remembers of its output to check ``dout`` against; plain values, so
    cheap to compare and to deep-copy.  Called at every layer call: NumPy goes first.
    """
    if type(x) is np.ndarray:
        return ("numpy", x.shape, x.dtype, "cpu")
    backend = backend_of(x)
    if backend is None:
        return None
    return (backend.library, tuple(x.shape), x.dtype, backend.device_name(x))


def cast_hint(x, name: str, dtype: str) -> str:
    """What a user of ``x``'s library types to convert it: ``x.astype(np.float32)``,
    ``x.to(torch.float32)``, ..."""
    backend = backend_of(x)
    if backend is None:
        return f"xpnet.to_device({name}, device, dtype={dtype!r})"
    return backend.cast.format(name=name, lib=backend.alias, dtype=dtype)


def untracked(x):
    """``x`` detached from anything its library tracks through computations (torch's
    autograd): xpnet computes its own gradients.  Other values come back as they are."""
    backend = backend_of(x)
    return x if backend is None else backend.untracked(x)


def device_context(*values):
    """A context manager under which code computes on the device of the first array among
    ``values`` (a :class:`Device` counts as one; numbers, None and other values are skipped).

    Every entry point that computes on its arguments' arrays runs inside one: CuPy computes
    on, and array-api-compat creates arrays on, the *current* GPU whatever the arrays'
    device, so a net on ``cuda:1`` must make GPU 1 current (:meth:`Backend.context`).  For
    NumPy, and any library that honours ``device=``, it is :data:`NO_CONTEXT`, which does
    nothing.
    """
    context = _context_for(values)
    return NO_CONTEXT if context is None else context


def recorded_device_context(library: str, device_name: str):
    """:func:`device_context` for the device that :func:`describe` recorded (its library and
    device name), for code that holds the description of an array rather than the array."""
    return BACKENDS[library].context(device_name)


def _context_for(values):
    """:func:`device_context` of the first array among ``values``, or None where none is one."""
    for value in values:
        if type(value) is np.ndarray:  # first: taken at every layer call on the CPU
            return NO_CONTEXT
        if isinstance(value, Device):
            return value.backend.context(value.name)
        backend = backend_of(value)
        if backend is not None:
            return backend.context(backend.device_name(value))
    return None


def computes_on_inputs(func):
    """Decorator: run ``func`` inside :func:`device_context` of its first array argument
    (positional first, then keyword arguments).  Costs a type check or two on NumPy."""
    ndarray = np.ndarray

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        # NumPy first, without a call: method(self, x, ...) and f(x, ...) on the CPU.
        if (len(args) > 1 and type(args[1]) is ndarray) or (args and type(args[0]) is ndarray):
            return func(*args, **kwargs)
        context = _context_for(args)
        if context is None and kwargs:
            context = _context_for(kwargs.values())
        if context is None or context is NO_CONTEXT:
            return func(*args, **kwargs)
        with context:
            return func(*args, **kwargs)

    return wrapper


def compiling_backend(device: str | Device, what: str = "compile=True",
                      subject: str = "this net's device") -> Backend:
    """The backend of ``device`` if it compiles (:attr:`Backend.compiles`: JAX), else a
    ValueError naming the devices whose backends do."""
    dev = resolve_device(device)
    if dev.backend.compiles:
        return dev.backend
    able = "; ".join(f"{b.library} (devices {b.forms})" for b in BACKENDS.values() if b.compiles)
    raise ValueError(f"{what} needs a backend that compiles: {able}; {subject} "
                     f"{dev.name!r} is {dev.library}'s, which runs eagerly")


def self_test(device: str | Device) -> None:
    """Run a tiny real computation (an array, an elementwise kernel, a matrix product) on
    ``device`` and wait for it.  Raises RuntimeError with one line that names the step that
    failed and, where it can tell, the missing piece (cuBLAS, NVRTC, a driver too old)."""
    dev = resolve_device(device)
    dev.backend.self_test(dev.name)


def is_gpu_device(name: str) -> bool:
    """Whether a device string names a GPU (``"cuda:0"``, ``"torch:cuda:1"``, ...)."""
    return "cuda" in str(name).split(":")


def is_scalar(x) -> bool:
    """True for a Python number (bool, int, float, complex), False for arrays and NumPy scalars."""
    return isinstance(x, (bool, numbers.Number)) and not isinstance(x, np.generic)


_NUMPY_NAMESPACE = None  # array_api_compat.numpy, looked up on first use
_NAMESPACE_BY_TYPE: dict = {}  # array type -> its namespace (it depends on the type alone)


def namespace(*arrays, **named_arrays):
    """The Array API namespace shared by ``arrays``, checking they can be combined.

    Python numbers and ``None`` are skipped.  Pass arrays by keyword to have
    them named in error messages: ``namespace(x=x, W=W)``.

    Returns
    -------
    xp : module
        The namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``,
        ``array_api_compat.torch`` or ``array_api_strict``).

    Raises
    ------
    TypeError
        If an argument is neither an array nor a Python number, or no array is given.
    DeviceMismatchError
        If the arrays come from two libraries or live on two devices; the
        message names both.
    """
    global _NUMPY_NAMESPACE
    # Fast path, taken at every layer call on the CPU: NumPy arrays only, one device.
    values = named_arrays.values() if not arrays else (*arrays, *named_arrays.values())
    for a in values:  # a plain loop: no generator to resume per array
        if type(a) is not np.ndarray:
            return _checked_namespace(arrays, named_arrays)
    if not values:
        return _checked_namespace(arrays, named_arrays)
    if _NUMPY_NAMESPACE is None:
        _NUMPY_NAMESPACE = array_api_compat.array_namespace(np.empty(0))
    return _NUMPY_NAMESPACE


def _checked_namespace(arrays, named_arrays):
    items = [(f"argument {i}", a) for i, a in enumerate(arrays)] + list(named_arrays.items())
    first = first_name = first_backend = first_dev = None
    for name, a in items:
        if a is None or is_scalar(a):
            continue
        backend = backend_of(a)
        if backend is None:
            raise TypeError(
                f"{name} must be an array ({_library_names()}) or a "
                f"Python number, got {type(a).__module__}.{type(a).__qualname__}"
            )
        if isinstance(a, np.matrix):  # its * is a matrix product: Mul would silently differ
            raise TypeError(f"{name} is a numpy.matrix, whose * and ** are matrix operations; "
                            f"pass np.asarray({name}) instead")
        dev = backend.device_name(a)
        if first is None:
            first, first_name, first_backend, first_dev = a, name, backend, dev
        elif backend is not first_backend:
            raise DeviceMismatchError(
                f"cannot combine arrays from two array libraries: {first_name} is a "
                f"{first_backend.library} array on {first_dev!r}, {name} is a "
                f"{backend.library} array on {dev!r}; move one with xpnet.to_device(array, device)"
            )
        elif dev != first_dev and dev is not None and first_dev is not None:  # None: traced
            raise DeviceMismatchError(
                f"cannot combine arrays on two devices: {first_name} is on {first_dev!r}, "
                f"{name} is on {dev!r}; move one with xpnet.to_device(array, device)"
            )
    if first is None:
        raise TypeError("namespace() needs at least one array")
    xp = _NAMESPACE_BY_TYPE.get(type(first))
    if xp is None:
        xp = _NAMESPACE_BY_TYPE[type(first)] = array_api_compat.array_namespace(first)
    return xp


# -- dtypes --------------------------------------------------------------------------------------

_DTYPE_KIND_CACHE: dict = {}


def is_dtype(xp, dtype, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, cached: NumPy's isdtype costs microseconds per call."""
    # The type first: a tuple comparison stops there, so dtypes of two libraries are never
    # compared with each other (array_api_strict warns when they are).
    key = (type(dtype), dtype, kind)
    try:
        return _DTYPE_KIND_CACHE[key]
    except KeyError:
        result = _DTYPE_KIND_CACHE[key] = bool(xp.isdtype(dtype, kind))
        return result
    except TypeError:  # an unhashable dtype object
        return bool(xp.isdtype(dtype, kind))


def resolve_dtype(xp, dtype):
    """The dtype of namespace ``xp`` named by a string (``"float32"``), a NumPy dtype or itself."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES or not hasattr(xp, dtype):
            raise ValueError(f"dtype must be one of {_DTYPE_NAMES}, got {dtype!r}")
        return getattr(xp, dtype)
    if _is_numpy_dtype(dtype):
        return resolve_dtype(xp, np.dtype(dtype).name)
    return dtype


def dtype_name(dtype) -> str:
    """A dtype's plain name, the same on every backend: ``"float32"``, ``"int64"``, ``"bool"``."""
    if _is_numpy_dtype(dtype):
        return np.dtype(dtype).name
    if isinstance(getattr(dtype, "dtype", None), np.dtype):  # jax.numpy.float32 (a scalar type)
        return dtype.dtype.name
    return str(dtype).rpartition(".")[2]  # torch.float32, array_api_strict.float32


def _is_numpy_dtype(dtype) -> bool:
    return isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic))


# -- moving arrays -------------------------------------------------------------------------------


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of ``x`` (an array of any supported library and device).

    Python numbers and sequences are accepted too.  The result never shares
    memory with ``x``.
    """
    backend = backend_of(x)
    if backend is not None:
        return backend.to_numpy(x)
    if isinstance(x, np.generic) or is_scalar(x) or isinstance(x, (list, tuple)):
        return np.array(x)
    raise TypeError(f"to_numpy() expects a {_library_names()} array, "
                    f"got {type(x).__module__}.{type(x).__qualname__}")


def to_device(x, device: str | Device, *, dtype=None, copy: bool = False):
    """``x`` as an array of the library and on the device that ``device`` names.

    Parameters
    ----------
    x : array of any supported library, or array-like (NumPy array, list, number)
    device : str or Device
        A device string (see the module docstring).
    dtype : str or dtype, optional
        ``"float32"``, ``"float64"`` or a dtype of the target namespace; by
        default the dtype is kept.
    copy : bool, default False
        When ``x`` is already on ``device`` (and of ``dtype``), it is returned
        as it is unless ``copy=True``.  A move to another library or device
        always copies: the result never shares memory with a host NumPy input.
    """
    target = resolve_device(device)
    x = untracked(x)
    backend = backend_of(x)
    if backend is None or backend.library != target.library:
        # From the host (or through it, from another library): cast there, then upload the
        # narrower array once (half the transfer for float64 -> float32, and a device without
        # float64 never sees one).
        if backend is None:
            host = _host_numbers(x)
        else:
            host = x if backend.library == "numpy" else backend.to_numpy(x)
        if dtype is not None:
            host = _cast_on_host(host, dtype_name(resolve_dtype(target.xp, dtype)))
        if not host.dtype.isnative or any(step < 0 for step in host.strides):
            # Big-endian data, reversed views: native and in order for every library (torch
            # refuses both in its own words).
            host = np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("="))
        with target.backend.context(target.name):
            return target.backend.from_host(host, target.native)
    xp = target.xp
    out, source = x, backend.device_name(x)
    if backend.library == "numpy" and out.dtype.kind not in "biufc":
        raise TypeError(f"x must hold numbers, got a NumPy array of dtype {out.dtype}")
    if dtype is not None:
        wanted = resolve_dtype(xp, target.backend.storable(dtype_name(resolve_dtype(xp, dtype))))
        if out.dtype != wanted:  # cast where the array is: the move below copies less
            with backend.context(source):
                if (is_dtype(xp, wanted, "integral") and is_dtype(xp, out.dtype, "real floating")
                        and not bool(xp.all(xp.isfinite(out)))):
                    raise ValueError(f"cannot cast NaN or infinite values of x "
                                     f"({dtype_name(out.dtype)}) to {dtype_name(wanted)}")
                out = xp.astype(out, wanted)
            copy = False
    if source != target.name:
        out = array_api_compat.to_device(out, target.native)  # (CuPy's: under the target GPU)
        copy = False  # the move made a new array
    if copy:
        with target.backend.context(target.name):
            out = xp.asarray(out, copy=True)
    return out


def _host_numbers(x) -> np.ndarray:
    """An array-like (a list, a number, a NumPy array) as a NumPy array of numbers; TypeError
    naming what it is for None, strings and arrays of objects, strings or dates."""
    if x is None or isinstance(x, (str, bytes)):
        raise TypeError(f"x must be an array or numbers, got {type(x).__name__} {x!r}")
    try:
        host = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged lists
        raise TypeError(f"x is not an array of numbers: {exc}") from None
    if host.dtype.kind not in "biufc":
        raise TypeError(f"x must hold numbers, got a NumPy array of dtype {host.dtype}")
    return host


def _cast_on_host(host: np.ndarray, dtype: str) -> np.ndarray:
    """``host`` as ``dtype``; ValueError where a cast to integers would turn NaN or infinite
    values into arbitrary ones (NumPy casts them silently)."""
    target = np.dtype(dtype)
    if target.kind in "iu" and host.dtype.kind in "fc" and not np.all(np.isfinite(host)):
        raise ValueError(f"cannot cast NaN or infinite values of x ({host.dtype}) to {dtype}")
    return host.astype(target, copy=False)


def dropout_mask(like, ratio: float, seed: int, draw: int):
    """Inverted dropout's mask for an array ``like``: ``1 / (1 - ratio)`` where an element is
    kept, 0 where it is dropped, of like's shape, dtype, library and device.

    Drawn on the host from NumPy's generator seeded with ``(seed, draw)`` (float32 uniforms,
    kept where >= ``ratio``) and copied to the device: the same seed and draw give the same
    mask on every backend and in either dtype, and a resumed run (which restores ``draw``)
    draws what an uninterrupted one would.
    """
    rng = np.random.default_rng((int(seed), int(draw)))
    keep = rng.random(tuple(like.shape), dtype=np.float32) >= ratio
    host = keep.astype(dtype_name(like.dtype))
    host *= 1.0 / (1.0 - ratio)
    return host if type(like) is np.ndarray else to_device(host, device_of(like))


def dropout_masks(shape: tuple, dtype: str, ratio: float, seed: int, first: int, count: int):
    """:func:`dropout_mask`'s masks of draws ``first .. first + count - 1`` for arrays of
    ``shape`` and ``dtype``, stacked on the host as one NumPy array (count, *shape): what a
    compiled or captured loop of ``count`` steps takes, the eager steps' draws."""
    like = np.empty(shape, dtype=dtype)
    return np.stack([dropout_mask(like, ratio, seed, first + k) for k in range(count)])


def available_backends() -> list[dict]:
    """What each registered library offers on this machine, for ``xpnet info``.

    Returns a list of dicts with keys ``library``, ``version`` (None when not
    installed), ``devices`` (device strings usable here) and ``note`` (why a
    library or its GPU is unavailable).  Never raises.
    """
    report = []
    for backend in BACKENDS.values():
        entry = {"library": backend.library, "version": None, "devices": [], "note": ""}
        try:
            module = backend.module()
            entry["version"] = getattr(module, "__version__", "unknown")
            entry["devices"], entry["note"] = backend.devices()
        except ImportError as exc:  # BackendUnavailableError: missing, or a broken install
            entry["note"] = str(exc) if isinstance(exc, BackendUnavailableError) \
                else backend.install_hint
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, never raised
            entry["note"] = f"import failed: {exc}"
        report.append(entry)
    return report
