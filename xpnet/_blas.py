"""NumPy's own BLAS through ctypes, for the one product NumPy cannot ask of it.

``C += alpha * op(A) @ op(B)`` in place is a single BLAS gemm call with
``beta = 1``; NumPy has no way to ask for it and computes ``op(A) @ op(B)``
into a new array, then needs two more passes over C.  For a plain SGD step
``W -= lr * x^T dout`` that is the whole difference between the matrix
product and the update: the gradient is never materialized, and W is read and
written once, while it is in cache (see ``benchmarks/bench_train.py``).

The same call fuses an affine layer's bias: broadcast b into the output, then
accumulate ``x W`` onto it, instead of a second pass ``out += b``.

Only :mod:`xpnet.backend` uses this module, through
:func:`xpnet.backend.matmul_accumulate` and :func:`xpnet.backend.matmul_add`,
which check everything the BLAS call relies on (dtypes, shapes, contiguity,
alignment, no overlap) and fall back to plain NumPy wherever :func:`gemm` is None.

Which library
-------------
Only the BLAS that NumPy itself has already loaded: ``dlopen`` with
``RTLD_NOLOAD`` refuses any other.  A second copy of OpenBLAS would bring a
second thread pool, and two pools spinning on the same cores slow each other
down tens of times.  Supported: NumPy wheels built with scipy-openblas in its
64-bit-integer build (the NumPy 2 wheels for Linux, Windows and x86-64 macOS),
whose symbols are ``scipy_cblas_sgemm64_`` / ``scipy_cblas_dgemm64_``.  NumPy
built against anything else (MKL, Accelerate, a distribution's BLAS) gets the
NumPy fallback.  ``XPNET_NO_BLAS_FAST_PATH=1`` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np

__all__ = ["gemm", "library"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values
_SYMBOLS = {np.dtype(np.float32): ("scipy_cblas_sgemm64_", ctypes.c_float),
            np.dtype(np.float64): ("scipy_cblas_dgemm64_", ctypes.c_double)}

_state: dict = {}  # filled on first use: "library" (path or None), "calls" {dtype: call}


def _numpy_blas_is_ilp64_scipy_openblas() -> bool:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001 - an unknown NumPy build: no fast path
        return False
    return (blas.get("name") == "scipy-openblas"
            and "USE64BITINT" in str(blas.get("openblas configuration", "")))


def _load():
    """The loaded scipy-openblas of NumPy and its gemm functions, or (None, {})."""
    if os.environ.get("XPNET_NO_BLAS_FAST_PATH", "") not in ("", "0"):
        return None, {}
    if not hasattr(os, "RTLD_NOLOAD") or not _numpy_blas_is_ilp64_scipy_openblas():
        return None, {}
    root = Path(np.__file__).resolve().parent
    candidates = sorted(glob.glob(str(root.parent / "numpy.libs" / "*scipy_openblas64*"))
                        + glob.glob(str(root / ".dylibs" / "*scipy_openblas64*")))
    for path in candidates:
        try:  # RTLD_NOLOAD: a handle to the copy NumPy loaded, or an error; never a new copy
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        functions = {}
        for dtype, (symbol, scalar) in _SYMBOLS.items():
            f = getattr(lib, symbol, None)
            if f is None:
                break
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, scalar,
                          ptr, i64, ptr, i64, scalar, ptr, i64]
            f.restype = None
            functions[dtype] = f
        else:
            return path, functions
    return None, {}


def library() -> str | None:
    """Path of the BLAS library the fast path calls, or None where there is no fast path."""
    if not _state:
        path, functions = _load()
        _state["library"] = path
        _state["calls"] = {dtype: _make_call(f) for dtype, f in functions.items()}
    return _state["library"]


def _make_call(f):
    def call(c, a, trans_a: bool, b, trans_b: bool, alpha: float) -> None:
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        f(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
          m, n, k, alpha, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 1.0,
          c.ctypes.data, n)

    return call


def gemm(dtype):
    """``f(c, a, trans_a, b, trans_b, alpha)``: ``c += alpha * op(a) @ op(b)`` for ``dtype``
    (float32 or float64), or None where there is no fast path for it.

    The caller guarantees what BLAS cannot check: a, b and c are 2-D, C-contiguous,
    aligned arrays of ``dtype``; c is writable and shares no memory with a or b;
    op(a) is (m, k), op(b) is (k, n), c is (m, n), all of m, n, k > 0.
    """
    library()
    return _state["calls"].get(dtype)
