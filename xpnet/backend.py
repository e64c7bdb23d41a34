"""Backends: the only module in xpnet that knows array libraries by name.

Rules (the rest of xpnet relies on them):

* Layer and functional code never imports NumPy, CuPy or torch.  It gets its
  namespace from :func:`namespace`, which also checks that every array it is
  given lives in the same library and on the same device.
* Host <-> device moves happen here only: :func:`to_numpy` (a host NumPy copy
  of any supported array) and :func:`to_device` (any array or NumPy array onto
  a device named by a device string).
* CuPy and torch are imported lazily, the first time a device string or an
  array asks for them.  A missing library raises
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
``"array_api_strict"``         the standard's strict reference implementation
                               on its ``CPU_DEVICE``
``"array_api_strict:NAME"``    one of its simulated devices (``device1``,
                               ``device2``, ...)
=============================  ===========================================
"""

from __future__ import annotations

import importlib
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from . import _blas

__all__ = [
    "BackendUnavailableError",
    "Device",
    "DeviceMismatchError",
    "available_backends",
    "device_of",
    "dtype_name",
    "is_array",
    "is_dtype",
    "is_scalar",
    "is_writable",
    "matmul_accumulate",
    "matmul_add",
    "namespace",
    "resolve_device",
    "resolve_dtype",
    "to_device",
    "to_numpy",
]

CUDA_EXTRA_HINT = (
    "install the GPU extra that matches your CUDA toolkit: "
    "pip install 'xpnet[cuda12]' (CUDA 12.x) or pip install 'xpnet[cuda13]' (CUDA 13.x)"
)

_INSTALL_HINTS = {
    "cupy": "CuPy is not installed; " + CUDA_EXTRA_HINT,
    "torch": "PyTorch is not installed; install it with: pip install torch",
    "array_api_strict": (
        "array_api_strict is not installed; install it with: pip install array-api-strict "
        "(it comes with pip install 'xpnet[test]')"
    ),
}

DEVICE_STRING_FORMS = (
    "'cpu', 'cuda', 'cuda:N', 'torch:cpu', 'torch:cuda', 'torch:cuda:N', "
    "'array_api_strict', 'array_api_strict:NAME' (e.g. 'array_api_strict:device1')"
)

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
        ``"numpy"``, ``"cupy"``, ``"torch"`` or ``"array_api_strict"``.
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


def _import(library: str):
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise BackendUnavailableError(_INSTALL_HINTS[library]) from exc


def _compat_namespace(library: str):
    """array-api-compat's namespace for ``library`` (imports the library)."""
    if library == "array_api_strict":
        return _import("array_api_strict")
    _import(library)
    return importlib.import_module(f"array_api_compat.{library}")


def _cuda_device_count(library: str) -> int:
    """Number of CUDA devices visible to CuPy or torch; 0 on a machine without a GPU."""
    if library == "torch":
        torch = _import("torch")
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    cupy = _import("cupy")
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError / missing driver: no usable GPU
        return 0


def _check_cuda_index(library: str, index: int, spec: str) -> None:
    count = _cuda_device_count(library)
    who = "CuPy" if library == "cupy" else "PyTorch"
    if count == 0:
        raise BackendUnavailableError(
            f"device {spec!r}: {who} sees no CUDA GPU on this machine "
            "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it); use device='cpu'"
        )
    if not 0 <= index < count:
        raise ValueError(
            f"device {spec!r}: GPU index {index} is out of range; {who} sees {count} GPU(s) "
            f"(cuda:0 .. cuda:{count - 1})"
        )


def _parse_index(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(
            f"device {spec!r}: expected a GPU index such as 'cuda:0', got {text!r}; "
            f"device strings are {DEVICE_STRING_FORMS}"
        )
    return int(text)


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
            f"device must be a device string ({DEVICE_STRING_FORMS}), "
            f"got {type(device).__name__} {device!r}"
        )
    spec = device.strip()
    head, _, rest = spec.partition(":")
    if spec in ("cpu", "numpy"):
        return Device("numpy", "cpu", _compat_namespace("numpy"), "cpu")
    if head == "cuda":
        xp = _compat_namespace("cupy")
        cupy = _import("cupy")
        if rest:
            index = _parse_index(rest, spec)
        else:
            _check_cuda_index("cupy", 0, spec)
            index = cupy.cuda.Device().id  # the current device
        _check_cuda_index("cupy", index, spec)
        return Device("cupy", f"cuda:{index}", xp, cupy.cuda.Device(index))
    if head == "torch":
        xp = _compat_namespace("torch")
        torch = _import("torch")
        if rest in ("", "cpu"):
            return Device("torch", "torch:cpu", xp, torch.device("cpu"))
        kind, _, index_text = rest.partition(":")
        if kind == "cuda":
            index = _parse_index(index_text, spec) if index_text else None
            _check_cuda_index("torch", index or 0, spec)
            if index is None:
                index = torch.cuda.current_device()
            return Device("torch", f"torch:cuda:{index}", xp, torch.device("cuda", index))
    if head == "array_api_strict":
        xp = _compat_namespace("array_api_strict")
        name = rest or "CPU_DEVICE"
        known = {str(d._device): d for d in xp.__array_namespace_info__().devices()}
        if name not in known:
            raise ValueError(
                f"device {spec!r}: array_api_strict has no device {name!r}; "
                f"its devices are {sorted(known)}"
            )
        return Device("array_api_strict", f"array_api_strict:{name}", xp, known[name])
    raise ValueError(f"unknown device {device!r}; device strings are {DEVICE_STRING_FORMS}")


def _library_of(x) -> str | None:
    """The library name of an array, or None for something that is not a supported array."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if type(x).__module__.startswith("array_api_strict") and hasattr(x, "__array_namespace__"):
        return "array_api_strict"  # its Array class (not its dtypes or devices)
    return None


def is_array(x) -> bool:
    """True for a NumPy, CuPy, torch or array_api_strict array (not for Python or NumPy scalars)."""
    return _library_of(x) is not None


def is_writable(x) -> bool:
    """Whether ``x`` can be updated in place (False for read-only NumPy arrays, JAX, ...)."""
    return bool(array_api_compat.is_writeable_array(x))


def _fits_blas(x) -> bool:
    # The layout xpnet._blas passes on (the dtypes were checked by the caller).
    return x.flags.c_contiguous and x.flags.aligned


# Outputs (elements) from which the BLAS call pays: calling it through ctypes costs ~6 us
# more than NumPy's matmul, which the passes it saves over the output repay only from about
# 16K elements on (benchmarks/bench_gemm.py measures the crossover).
BLAS_MIN_OUTPUT = 1 << 14


def matmul_accumulate(c, a, b, alpha: float, *, trans_a: bool = False, trans_b: bool = False):
    """``c + alpha * op(a) @ op(b)``, written into ``c`` where ``c`` is writable.

    ``op(a)`` is ``a.T`` when ``trans_a`` (likewise for b).  This is the plain SGD
    step ``W -= lr * x^T dout`` without a gradient array: on NumPy built with
    scipy-openblas it is one BLAS gemm with ``beta = 1`` (see :mod:`xpnet._blas`)
    where c has at least ``BLAS_MIN_OUTPUT`` elements (below that, NumPy's matmul
    and an in-place add are faster), on torch ``addmm_``, elsewhere the product is
    added in place, or, for arrays that cannot be written, a new array is returned.

    Parameters
    ----------
    c : array (m, n), real floating
    a : array (m, k), or (k, m) with ``trans_a``; c's dtype, library and device
    b : array (k, n), or (n, k) with ``trans_b``; likewise
    alpha : float

    Returns
    -------
    The updated ``c`` itself, or a new array where ``c`` is read-only.
    """
    xp = namespace(c=c, a=a, b=b)
    for name, x in (("c", c), ("a", a), ("b", b)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if x.dtype != c.dtype or not is_dtype(xp, x.dtype, "real floating"):
            raise TypeError(f"c, a and b must share one real floating dtype, got "
                            f"{dtype_name(c.dtype)}, {dtype_name(a.dtype)}, {dtype_name(b.dtype)}")
    (m, k), (k2, n) = (a.shape[::-1] if trans_a else a.shape), (b.shape[::-1] if trans_b else b.shape)
    if k != k2 or tuple(c.shape) != (m, n):
        raise ValueError(f"op(a) @ op(b) is ({m}, {k}) @ ({k2}, {n}), which does not give c of "
                         f"shape {tuple(c.shape)} (a {tuple(a.shape)}, trans_a={trans_a}; "
                         f"b {tuple(b.shape)}, trans_b={trans_b})")
    alpha = float(alpha)
    if isinstance(c, np.ndarray):
        gemm = _blas.gemm(c.dtype)
        if (gemm is not None and m * n >= BLAS_MIN_OUTPUT and k and c.flags.writeable
                and _fits_blas(c) and _fits_blas(a) and _fits_blas(b)
                and not np.may_share_memory(c, a) and not np.may_share_memory(c, b)):
            gemm(c, a, trans_a, b, trans_b, alpha)
            return c
    op_a, op_b = (a.T if trans_a else a), (b.T if trans_b else b)
    if _library_of(c) == "torch" and is_writable(c):
        return c.addmm_(op_a, op_b, alpha=alpha)
    product = op_a @ op_b
    if not is_writable(c):
        return c + alpha * product
    if is_writable(product):
        product *= alpha  # a new array of ours: scale it in place, no temporary
        c += product
    else:
        c += alpha * product
    return c


def matmul_add(a, b, bias):
    """``a @ b + bias``, with ``bias`` of shape (n,) added to every row: an affine layer.

    Fused where the backend can: on NumPy with the BLAS fast path (see
    :func:`matmul_accumulate`; outputs of ``BLAS_MIN_OUTPUT`` elements and more)
    the bias is broadcast into the output and the product accumulated onto it by
    one gemm (no second pass over the output); on torch ``addmm``; elsewhere the
    bias is added in place to the new product.

    Parameters
    ----------
    a : array (m, k), real floating
    b : array (k, n), a's dtype, library and device
    bias : array (n,), likewise

    Returns
    -------
    A new array (m, n).
    """
    namespace(a=a, b=b, bias=bias)
    if a.ndim != 2 or b.ndim != 2 or bias.ndim != 1 or a.shape[1] != b.shape[0] \
            or bias.shape[0] != b.shape[1]:
        raise ValueError(f"a @ b + bias needs a (m, k), b (k, n) and bias (n,), got shapes "
                         f"{tuple(a.shape)}, {tuple(b.shape)} and {tuple(bias.shape)}")
    if not (a.dtype == b.dtype == bias.dtype):
        raise TypeError(f"a, b and bias must share a dtype, got {dtype_name(a.dtype)}, "
                        f"{dtype_name(b.dtype)} and {dtype_name(bias.dtype)}")
    if isinstance(a, np.ndarray):
        gemm = _blas.gemm(a.dtype)
        if (gemm is not None and a.shape[0] * b.shape[1] >= BLAS_MIN_OUTPUT and a.shape[1]
                and _fits_blas(a) and _fits_blas(b)):
            out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
            out[...] = bias
            gemm(out, a, False, b, False, 1.0)
            return out
    elif _library_of(a) == "torch":
        return bias.addmm(a, b)
    out = a @ b
    if is_writable(out):  # a fresh array of ours: add in place, one pass and no temporary
        out += bias
        return out
    return out + bias


def _device_name(library: str, x) -> str:
    if library == "numpy":
        return "cpu"
    if library == "cupy":
        return f"cuda:{x.device.id}"
    if library == "torch":
        return f"torch:{x.device}"
    return f"array_api_strict:{x.device._device}"


def device_of(x) -> Device:
    """The :class:`Device` an array lives on.

    Raises
    ------
    TypeError
        If ``x`` is not a NumPy, CuPy, torch or array_api_strict array.
    """
    library = _library_of(x)
    if library is None:
        raise TypeError(
            "expected a NumPy, CuPy, torch or array_api_strict array, "
            f"got {type(x).__module__}.{type(x).__qualname__}"
        )
    name = _device_name(library, x)
    return Device(library, name, array_api_compat.array_namespace(x), array_api_compat.device(x))


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
    if values and all(type(a) is np.ndarray for a in values):
        if _NUMPY_NAMESPACE is None:
            _NUMPY_NAMESPACE = array_api_compat.array_namespace(np.empty(0))
        return _NUMPY_NAMESPACE
    return _checked_namespace(arrays, named_arrays)


def _checked_namespace(arrays, named_arrays):
    items = [(f"argument {i}", a) for i, a in enumerate(arrays)] + list(named_arrays.items())
    first_name = first_lib = first_dev = None
    first = None
    for name, a in items:
        if a is None or is_scalar(a):
            continue
        library = _library_of(a)
        if library is None:
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, torch or array_api_strict) or a "
                f"Python number, got {type(a).__module__}.{type(a).__qualname__}"
            )
        if first is None:
            first, first_name, first_lib = a, name, library
            continue
        if library != first_lib:
            raise DeviceMismatchError(
                f"cannot combine arrays from two array libraries: {first_name} is a "
                f"{first_lib} array on {_device_name(first_lib, first)!r}, {name} is a "
                f"{library} array on {_device_name(library, a)!r}; move one with "
                "xpnet.to_device(array, device)"
            )
        if library != "numpy":
            if first_dev is None:
                first_dev = _device_name(first_lib, first)
            dev = _device_name(library, a)
            if dev != first_dev:
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
    return str(dtype).rpartition(".")[2]  # torch.float32, array_api_strict.float32


def _is_numpy_dtype(dtype) -> bool:
    return isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic))


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of ``x`` (an array of any supported library and device).

    Python numbers and sequences are accepted too.  The result never shares
    memory with ``x``.
    """
    library = _library_of(x)
    if library == "numpy":
        return np.array(x, copy=True)
    if library == "cupy":
        return x.get()
    if library == "torch":
        return x.detach().to("cpu", copy=True).numpy()
    if library == "array_api_strict":
        strict = _import("array_api_strict")
        host = x.to_device(strict.Device("CPU_DEVICE"))
        return np.array(np.asarray(host), copy=True)
    if isinstance(x, np.generic) or is_scalar(x) or isinstance(x, (list, tuple)):
        return np.array(x)
    raise TypeError(
        "to_numpy() expects a NumPy, CuPy, torch or array_api_strict array, "
        f"got {type(x).__module__}.{type(x).__qualname__}"
    )


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
    xp = target.xp
    library = _library_of(x)
    if library == target.library:
        if library != "numpy" and _device_name(library, x) != target.name:
            out = array_api_compat.to_device(x, target.native)
            copy = False  # the move made a new array
        else:
            out = x
    else:
        host = x if library == "numpy" else to_numpy(x)
        if library is None:
            host = np.asarray(host)
        out = xp.asarray(host, device=target.native, copy=True)
        copy = False
    if dtype is not None:
        wanted = resolve_dtype(xp, dtype)
        if out.dtype != wanted:
            out = xp.astype(out, wanted)
            copy = False
    if copy:
        out = xp.asarray(out, copy=True)
    return out


def available_backends() -> list[dict]:
    """What each known library offers on this machine, for ``xpnet info``.

    Returns a list of dicts with keys ``library``, ``version`` (None when not
    installed), ``devices`` (device strings usable here) and ``note`` (why a
    library or its GPU is unavailable; for NumPy, whether the BLAS fast path of
    :func:`matmul_accumulate` is there).  Never raises.
    """
    report = []
    for library in ("numpy", "array_api_strict", "torch", "cupy"):
        entry = {"library": library, "version": None, "devices": [], "note": ""}
        try:
            module = importlib.import_module(library)
        except Exception as exc:  # ImportError, or a broken install
            entry["note"] = _INSTALL_HINTS.get(library, str(exc)) if isinstance(
                exc, ImportError
            ) else f"import failed: {exc}"
            report.append(entry)
            continue
        entry["version"] = getattr(module, "__version__", "unknown")
        if library == "numpy":
            entry["devices"] = ["cpu"]
            blas = _blas.library()
            entry["note"] = (f"BLAS fast path for the fused SGD step and bias: "
                             f"{os.path.basename(blas)}" if blas
                             else "no BLAS fast path: the fused SGD step and bias use NumPy's matmul")
        elif library == "array_api_strict":
            entry["devices"] = [
                f"array_api_strict:{d._device}"
                for d in module.__array_namespace_info__().devices()
            ]
        else:
            count = _cuda_device_count(library)
            prefix = "torch:cuda" if library == "torch" else "cuda"
            entry["devices"] = (["torch:cpu"] if library == "torch" else []) + [
                f"{prefix}:{i}" for i in range(count)
            ]
            if count == 0:
                entry["note"] = "no CUDA GPU visible"
        report.append(entry)
    return report
