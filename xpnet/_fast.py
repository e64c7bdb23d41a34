"""Everything in xpnet that exists only for speed; deleting this file leaves a correct, slower
library (``tests/test_fast_paths.py`` checks that).

What is here, and what it buys (``benchmarks/bench_train.py`` and ``benchmarks/bench_gemm.py``
measure it):

* **NumPy's own BLAS through ctypes** (:func:`gemm`), for the one product NumPy cannot ask of
  it: ``C += alpha * op(A) @ op(B)`` in place, a single gemm with ``beta = 1``; on CuPy the
  same product is ``cupy.cublas.gemm(..., beta=1)`` (one pass over C instead of three).
* **The fused SGD step** (:func:`sgd_train_step`): with plain :class:`xpnet.SGD`, a
  :class:`xpnet.Sequential` net updates every parameter inside its backward pass;
  ``W -= lr x^T dout`` is one accumulating product (:func:`matmul_accumulate`) and the
  gradient dW is never made.  About 15% of a small net's training step on a CPU.
* **The fused bias** (:func:`matmul_add`, plugged into :func:`xpnet.functional.affine`):
  the bias broadcast into the output, then ``x W`` accumulated onto it by the same gemm;
  ``torch.addmm`` on torch.
* **Thresholds**: :data:`BLAS_MIN_OUTPUT`.
* **The BLAS thread policy** (:func:`thread_policy`, applied by the Trainer with
  :func:`blas_threads`): one thread for small products, every core for large ones
  (:data:`PARALLEL_MIN_WORK`).
* **The fused training loop** (:func:`fused_steps`, running :mod:`xpnet._fused` with numba):
  SGD and Momentum training of multilayer perceptrons on NumPy, one compiled call per range
  of steps.

Which BLAS
----------
Only the BLAS that NumPy itself has already loaded: ``dlopen`` with
``RTLD_NOLOAD`` refuses any other.  A second copy of OpenBLAS would bring a
second thread pool, and two pools spinning on the same cores slow each other
down tens of times.  Supported: NumPy wheels built with scipy-openblas in its
64-bit-integer build (the NumPy 2 wheels for Linux, Windows and x86-64 macOS),
whose symbols are ``scipy_cblas_sgemm64_`` / ``scipy_cblas_dgemm64_``.  NumPy
built against anything else (MKL, Accelerate, a distribution's BLAS) gets the
NumPy fallback.  ``XPNET_NO_BLAS_FAST_PATH=1`` turns the ctypes path off.

The library knowledge here (NumPy's BLAS, CuPy's cuBLAS, torch's ``addmm``) is for speed only; which
library an array belongs to is still asked of :mod:`xpnet.backend`.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from . import functional, runners, speedups
from ._checks import thread_count
from .backend import backend_of, dtype_name, is_dtype, is_gpu_device, is_writable, namespace
from .layers import Affine, Convolution, Pooling, Relu, Sigmoid, SoftmaxWithLoss, unchecked
from .layers import _windows as _pool_windows
from .nets import runs_plain_steps
from .optim import SGD, Momentum

__all__ = [
    "BLAS_MIN_OUTPUT",
    "PARALLEL_MIN_WORK",
    "FusedSteps",
    "blas_info",
    "blas_threads",
    "env_flag",
    "fused_module",
    "fused_steps",
    "gemm",
    "largest_product",
    "library",
    "matmul_accumulate",
    "matmul_add",
    "sgd_train_step",
    "thread_policy",
    "threads_from_environment",
    "usable_cores",
]

# -- NumPy's BLAS through ctypes ---------------------------------------------------------------

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values
_SYMBOLS = {np.dtype(np.float32): ("scipy_cblas_sgemm64_", ctypes.c_float),
            np.dtype(np.float64): ("scipy_cblas_dgemm64_", ctypes.c_double)}

# Filled on first use: "library" (path or None) and "calls" {dtype: call} by library(),
# "cupy" (cupy.cublas.gemm or None) by _cupy_gemm().
_state: dict = {}


def _numpy_blas_is_ilp64_scipy_openblas() -> bool:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001 - an unknown NumPy build: no fast path
        return False
    return (blas.get("name") == "scipy-openblas"
            and "USE64BITINT" in str(blas.get("openblas configuration", "")))


def _load():
    """The loaded scipy-openblas of NumPy and its gemm functions, or (None, {})."""
    if env_flag("XPNET_NO_BLAS_FAST_PATH"):
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


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` (``XPNET_NO_BLAS_FAST_PATH``,
    ``XPNET_NO_NUMBA``) is set to anything but empty or ``0``."""
    return os.environ.get(name, "") not in ("", "0")


def library() -> str | None:
    """Path of the BLAS library the fast path calls, or None where there is no fast path."""
    if "library" not in _state:
        path, functions = _load()
        _state["library"] = path
        _state["calls"] = {dtype: _make_call(f) for dtype, f in functions.items()}
        _state["addresses"] = {dtype: ctypes.cast(f, ctypes.c_void_p).value
                               for dtype, f in functions.items()}
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


# -- products that BLAS does in one call -------------------------------------------------------


def _fits_blas(x) -> bool:
    # The layout the gemm call passes on (the dtypes were checked by the caller).
    return x.flags.c_contiguous and x.flags.aligned


# Outputs (elements) from which the BLAS call pays: calling it through ctypes costs ~6 us
# more than NumPy's matmul, which the passes it saves over the output repay only from about
# 16K elements on (benchmarks/bench_gemm.py measures the crossover).
BLAS_MIN_OUTPUT = 1 << 14


def _is_library(x, library: str) -> bool:
    backend = backend_of(x)
    return backend is not None and backend.library == library


def _cupy_gemm():
    """``cupy.cublas.gemm``, or None where it cannot be loaded.  CuPy does not import its
    ``cupy.cublas`` module by itself: it is imported here, on the first CuPy update."""
    if "cupy" not in _state:
        try:
            _state["cupy"] = importlib.import_module("cupy.cublas").gemm
        except (ImportError, AttributeError):  # an old CuPy, or cuBLAS cannot be loaded
            _state["cupy"] = None
    return _state["cupy"]


def _cupy_shares_memory(c, a, b) -> bool:
    may_share = importlib.import_module("cupy").may_share_memory
    return bool(may_share(c, a) or may_share(c, b))


def _cupy_accumulate(cublas_gemm, c, a, b, trans_a: bool, trans_b: bool, alpha: float):
    """``c += alpha * op(a) @ op(b)`` as one cuBLAS gemm with ``beta = 1``: one pass over c
    (the product, its scaling and the add would be three)."""
    cublas_gemm("T" if trans_a else "N", "T" if trans_b else "N", a, b, out=c,
                alpha=alpha, beta=1.0)
    return c


def _check_accumulate(xp, c, a, b, trans_a, trans_b):
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
    return m, n, k


def matmul_accumulate(c, a, b, alpha: float, *, trans_a: bool = False, trans_b: bool = False):
    """``c + alpha * op(a) @ op(b)``, written into ``c`` where ``c`` is writable.

    ``op(a)`` is ``a.T`` when ``trans_a`` (likewise for b).  This is the plain SGD
    step ``W -= lr * x^T dout`` without a gradient array: on NumPy built with
    scipy-openblas it is one BLAS gemm with ``beta = 1`` (:func:`gemm`) where c has
    at least ``BLAS_MIN_OUTPUT`` elements (below that, NumPy's matmul and an
    in-place add are faster), on CuPy one cuBLAS gemm with ``beta = 1``
    (``cupy.cublas.gemm``), on torch ``addmm_``, elsewhere the product is added
    in place, or, for arrays that cannot be written, a new array is returned.

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
    _check_accumulate(xp, c, a, b, trans_a, trans_b)
    return _accumulate(xp, c, a, b, float(alpha), trans_a, trans_b)


def _accumulate(xp, c, a, b, alpha: float, trans_a: bool, trans_b: bool):
    """:func:`matmul_accumulate` of arrays that fit (checked by the caller or by the run's
    boundary: the trusted SGD step)."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    on_torch = False
    if isinstance(c, np.ndarray):
        blas = gemm(c.dtype)
        if (blas is not None and m * n >= BLAS_MIN_OUTPUT and k and c.flags.writeable
                and _fits_blas(c) and _fits_blas(a) and _fits_blas(b)
                and not np.may_share_memory(c, a) and not np.may_share_memory(c, b)):
            blas(c, a, trans_a, b, trans_b, alpha)
            return c
    elif _is_library(c, "cupy") and m * n and k and not _cupy_shares_memory(c, a, b):
        cublas_gemm = _cupy_gemm()
        if cublas_gemm is not None:
            return _cupy_accumulate(cublas_gemm, c, a, b, trans_a, trans_b, alpha)
    else:
        on_torch = _is_library(c, "torch")
    op_a = xp.matrix_transpose(a) if trans_a else a
    op_b = xp.matrix_transpose(b) if trans_b else b
    if on_torch and is_writable(c):
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

    Fused where the backend can: on NumPy with the BLAS fast path (outputs of
    ``BLAS_MIN_OUTPUT`` elements and more) the bias is broadcast into the output
    and the product accumulated onto it by one gemm (no second pass over the
    output); on torch ``addmm``; elsewhere the bias is added in place to the new
    product.  This is :func:`xpnet.functional.affine`'s kernel.

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
    return _affine_kernel(a, b, bias)


def _affine_kernel(a, b, bias):
    """:func:`matmul_add` of arrays the caller checked (:data:`xpnet.speedups.affine`)."""
    if type(a) is np.ndarray:
        blas = _state["calls"].get(a.dtype) if "calls" in _state else gemm(a.dtype)
        if (blas is not None and a.shape[0] * b.shape[1] >= BLAS_MIN_OUTPUT and a.shape[1]
                and _fits_blas(a) and _fits_blas(b)):
            out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
            out[...] = bias
            blas(out, a, False, b, False, 1.0)
            return out
    elif _is_library(a, "torch"):
        return bias.addmm(a, b)
    out = a @ b
    if type(out) is np.ndarray or is_writable(out):  # ours: add in place, one pass, no temporary
        out += bias
        return out
    return out + bias


def _filters_kernel(w, col, b):
    """``w @ col + b[:, None]`` for a convolution's filters w (FN, K), its columns col
    (K, M) and bias b (FN,), NumPy arrays the caller checked: the bias broadcast into the
    output, then the product accumulated onto it by one gemm (no second pass over the (FN, M)
    output; the same bits as the product and an add); NotImplemented elsewhere
    (:data:`xpnet.speedups.filters`)."""
    if type(col) is not np.ndarray or type(w) is not np.ndarray:
        return NotImplemented
    blas = _state["calls"].get(col.dtype) if "calls" in _state else gemm(col.dtype)
    if (blas is None or w.shape[0] * col.shape[1] < BLAS_MIN_OUTPUT or not w.shape[1]
            or not (_fits_blas(w) and _fits_blas(col)) or b.dtype != col.dtype
            or w.dtype != col.dtype):
        return NotImplemented
    out = np.empty((w.shape[0], col.shape[1]), dtype=col.dtype)
    out[...] = b[:, None]
    blas(out, w, False, col, False, 1.0)
    return out


# -- the fused SGD step ------------------------------------------------------------------------


def sgd_train_step(net, x, t, optimizer, check_labels=True):
    """One plain-SGD step of a :class:`xpnet.Sequential` net, fused into its backward pass.

    The same as ``loss, grads = net.loss_and_gradient(x, t)`` and
    ``optimizer.update(net.params, grads)`` (for plain :class:`xpnet.SGD` itself), except
    that each layer's parameters are updated as soon as its backward has run: every dx
    is computed with the weights before the step, and an Affine layer's
    ``W -= lr x^T dout`` is one accumulating product (:func:`matmul_accumulate`), with no
    dW array (its ``dW`` and ``db`` are left None).  The weights then differ from the
    unfused update by rounding only (a few units in the last place per step).
    Returns the loss (before the step).
    """
    lr, decay = optimizer.lr, getattr(net, "weight_decay", 0.0)
    if check_labels is None:  # the Trainer's step: data checked once, the layers' math alone
        loss = net.unchecked_loss(x, t)
        dout = net._loss_backward(net.last_layer)
        backwards = net._backwards
    else:  # a direct call: every layer's own checks (backward None: the checked method)
        loss = net.loss(x, t, train=True, check_labels=check_labels)
        dout = net.last_layer.backward()
        backwards = [(None, layer) for layer in reversed(net.layers.values())]
    for backward, layer in backwards:
        dout = _affine_backward_sgd(layer, dout, lr, decay, backward is None) \
            if type(layer) is Affine else _backward_sgd(layer, dout, lr, decay, backward)
    optimizer.record_steps(1)
    return loss


def _backward_sgd(layer, dout, lr: float, decay: float = 0.0, backward=None):
    """Any layer: its backward (``backward(layer, dout)`` where given: unchecked), then
    ``p += -lr * g`` for each of its parameters (SGD's update), with ``g + decay * p`` for
    its ``decay_names`` (weight decay)."""
    dx = layer.backward(dout) if backward is None else backward(layer, dout)
    if not layer.param_names:
        return dx
    for name, g in layer.grads.items():
        p = getattr(layer, name)
        if decay and name in layer.decay_names:
            g = g + decay * p
        if is_writable(p):
            p += -lr * g
        else:
            setattr(layer, name, p + -lr * g)
    return dx


def _affine_backward_sgd(layer: Affine, dout, lr: float, decay: float = 0.0, check=True):
    """Affine's backward fused with ``W -= lr (x^T dout + decay W)``, ``b -= lr sum_n dout``."""
    if check:
        layer.check_dout(dout)
    xp = namespace(dout)
    dx = layer.input_gradient(xp, dout)  # before W changes
    if decay:  # W - lr decay W, then the product accumulated onto it
        if is_writable(layer.W):
            layer.W *= 1.0 - lr * decay
        else:
            layer.W = layer.W * (1.0 - lr * decay)
    layer.W = (matmul_accumulate(layer.W, layer.x, dout, -lr, trans_a=True) if check
               else _accumulate(xp, layer.W, layer.x, dout, -lr, True, False))
    step = lr * xp.sum(dout, axis=0)
    if is_writable(layer.b):
        layer.b -= step
    else:
        layer.b = layer.b - step
    layer.dW = layer.db = None
    return dx


# -- the BLAS thread policy --------------------------------------------------------------------

# A step whose largest product has fewer multiply-adds than this runs its BLAS on one thread.
# On an idle machine a second thread speeds such products up 1.5-1.6x (100 x 784 x 50), but
# as soon as another process holds a core, OpenBLAS's threads wait for each other in every
# product and an epoch takes 3-30x longer (benchmarks/bench_train.py --busy measures both).
# From here on (the 784-1024-10 net with batch 256: 205M; SimpleConvNet's convolution at
# batch 100: 43M) the products gain 1.7-2x on an idle machine and every usable core is taken.
PARALLEL_MIN_WORK = 1 << 25

_THREADS_ENV = "XPNET_BLAS_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def largest_product(net, sample_shape: tuple, batch_size: int) -> int:
    """Multiply-adds of the largest matrix product in a training step of ``net`` on batches
    of ``batch_size`` samples of ``sample_shape``: an Affine layer's ``x W``, a
    Convolution's ``W col`` (the backward products have the same size).  Layers it does not
    know keep the shape and count for nothing."""
    shape, largest = tuple(sample_shape), 0
    for layer in getattr(net, "layers", {}).values():
        if type(layer) is Affine:
            largest = max(largest, batch_size * math.prod(layer.W.shape))
            shape = (layer.W.shape[1],)
        elif type(layer) in (Convolution, Pooling) and len(shape) == 3:
            window = (tuple(layer.W.shape[2:]) if type(layer) is Convolution
                      else (layer.pool_h, layer.pool_w))
            oh, ow = (functional.conv_output_size(size, w, layer.stride, layer.pad)
                      for size, w in zip(shape[1:], window))
            if type(layer) is Convolution:
                largest = max(largest, batch_size * oh * ow * math.prod(layer.W.shape))
                shape = (layer.W.shape[0], oh, ow)
            else:
                shape = (shape[0], oh, ow)
    return largest


def thread_policy(net, sample_shape: tuple, batch_size: int, threads=None, *,
                  processes_per_node: int = 1) -> tuple:
    """``(threads, reason)``: how many threads the BLAS products of a training run use.

    ``threads`` (an int >= 1) or the environment variable ``XPNET_BLAS_THREADS`` decide if
    given; otherwise one thread where the step's largest product (:func:`largest_product`)
    is under :data:`PARALLEL_MIN_WORK` multiply-adds, every usable core from there on (the
    cores of this process's affinity, and at most its share of the machine's when
    ``processes_per_node`` processes of one distributed run share it), fewer where other
    processes kept cores busy in a short look at the machine (:func:`idle_cores`).
    ``threads`` is None
    for a net that is not on the CPU (its GPU does the products).
    """
    if is_gpu_device(net.device):
        return None, f"{net.device}: not the CPU's BLAS"
    if threads is not None:
        return threads, "set by the caller"
    env = threads_from_environment()
    if env is not None:
        return env, f"set by {_THREADS_ENV}"
    work = largest_product(net, sample_shape, batch_size)
    if work < PARALLEL_MIN_WORK:
        return 1, (f"auto: largest product {work / 1e6:.1f}M multiply-adds < "
                   f"{PARALLEL_MIN_WORK / 1e6:.1f}M")
    cores = max(1, min(usable_cores(), (os.cpu_count() or 1) // max(1, processes_per_node)))
    share = f" (this process's share of {processes_per_node})" if processes_per_node > 1 else ""
    idle = idle_cores()
    if idle is not None and idle < cores - 0.5:  # other processes hold cores: not theirs too
        free = max(1, round(idle))
        return free, (f"auto: largest product {work / 1e6:.1f}M multiply-adds, {free} of "
                      f"{cores} cores{share} (the others were busy when the run started)")
    return cores, (f"auto: largest product {work / 1e6:.1f}M multiply-adds, all {cores} "
                   f"cores{share}")


# How long the load check at the start of a run watches the machine (/proc/stat).
LOAD_SAMPLE_SECONDS = 0.1


def idle_cores(seconds: float = LOAD_SAMPLE_SECONDS) -> float | None:
    """How many of the machine's cores sat idle over ``seconds`` (Linux's /proc/stat, while
    this process waits), or None where that cannot be read.  OpenBLAS's threads wait for each
    other in every product: beside one busy process, a SimpleConvNet epoch on two threads took
    2.4x its time on one (51.8 s against 21.7 s), so a run takes the cores that are free."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        cpu0, wall0 = time.process_time(), time.monotonic()
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
        cpu1, wall1 = time.process_time(), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0 or wall1 <= wall0:
        return None
    cores = os.cpu_count() or 1
    # This process's own threads count as idle: OpenBLAS's workers spin for a while after the
    # last product (the previous fit's), and they are the ones this run would use.
    own = (cpu1 - cpu0) / (wall1 - wall0)
    return min(cores, (idle1 - idle0) / (total1 - total0) * cores + own)


def threads_from_environment() -> int | None:
    """``XPNET_BLAS_THREADS`` as an int, None where it is unset or empty; ValueError naming it
    where it is not a whole number >= 1."""
    env = os.environ.get(_THREADS_ENV, "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"{_THREADS_ENV} must be a whole number >= 1, got {env!r}")
    return thread_count(_THREADS_ENV, int(env))


@contextlib.contextmanager
def blas_threads(threads: int | None):
    """Within the block, the BLAS libraries of the process (NumPy's OpenBLAS, ...) use
    ``threads`` threads (threadpoolctl); None leaves them as they are.  Yields the threads
    they run (fewer than asked where a library caps them: OpenBLAS at its build's maximum),
    or None."""
    if threads is None:
        yield None
        return
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        counts = [info.get("num_threads") for info in threadpool_info()
                  if info.get("user_api") == "blas"]
        yield min((c for c in counts if isinstance(c, int) and c > 0), default=None)


# -- the allocator while training ---------------------------------------------------------------

# glibc's mallopt parameters, and what a fit sets them to.  A conv net's step allocates and
# frees arrays of a few MB (im2col's columns, activations, gradients); with glibc's defaults
# each one is a fresh mmap whose pages fault in when first written (costly in a virtual
# machine: SimpleConvNet's epoch took 1.37 s instead of 1.01 s on 5000 images), or the heap's
# top is trimmed and grown again.  From the first fit on, arrays up to MMAP_FROM come from the
# heap and up to KEEP_FREED of freed memory stays with the process for the next step: where
# glibc's own adaptive thresholds end up in a process that frees arrays of 32 MB (setting
# them fixes them; setting the defaults back would leave the process slower than before, as
# glibc would no longer adapt them).  After each fit the free memory is returned (malloc_trim).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_FROM = 32 << 20  # glibc's maximum on 64-bit systems
KEEP_FREED = 64 << 20


def _glibc():
    """The process's glibc (ctypes), or None elsewhere (musl, macOS, Windows)."""
    if "glibc" not in _state:
        lib = None
        if os.name == "posix" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(None)
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                lib = None
        _state["glibc"] = lib
    return _state["glibc"]


@contextlib.contextmanager
def training_memory():
    """Within the block (a fit), freed memory is kept for the next step (see
    :data:`KEEP_FREED`), and what is free is returned to the system at its end; yields what
    it did, in words, or None where it did nothing (not glibc, or
    ``XPNET_NO_MALLOC_TUNING=1``)."""
    libc = None if env_flag("XPNET_NO_MALLOC_TUNING") else _glibc()
    if libc is None:
        yield None
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)
    libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED)
    try:
        yield (f"glibc: arrays up to {MMAP_FROM >> 20} MiB from the heap, {KEEP_FREED >> 20} "
               "MiB of freed memory kept between steps")
    finally:
        libc.malloc_trim(0)


def blas_info() -> list:
    """``[(library, version, threads), ...]`` of the BLAS libraries loaded (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    return [(p.get("internal_api"), p.get("version"), p.get("num_threads"))
            for p in threadpool_info() if p.get("user_api") == "blas"]


# -- the fused training loop (numba, xpnet._fused) -----------------------------------------------


def fused_module():
    """:mod:`xpnet._fused`, or None: numba is not installed (``pip install 'xpnet[fast]'``),
    ``XPNET_NO_NUMBA=1`` is set, or NumPy's BLAS is not one :func:`gemm` can call."""
    if env_flag("XPNET_NO_NUMBA") or library() is None:
        return None
    if "fused" not in _state:
        try:
            _state["fused"] = importlib.import_module("._fused", __package__)
        except ImportError:  # numba (or its llvmlite) missing or not loadable
            _state["fused"] = None
    return _state["fused"]


def _mlp_affines(net):
    """The Affine layers of a :class:`xpnet.Sequential` that is exactly Affine, act, Affine,
    ..., Affine with one activation class (Relu or Sigmoid) and SoftmaxWithLoss, and whether
    it is Sigmoid; else None."""
    # What the loop stands in for must be Sequential's own: a net whose class or instance
    # changes its step, loss or forward pass (to log, clip, crash...) keeps its own.
    if not runs_plain_steps(net):
        return None
    layers = list(net.layers.values())
    if type(getattr(net, "last_layer", None)) is not SoftmaxWithLoss or len(layers) % 2 != 1:
        return None
    affines, acts = layers[::2], {type(layer) for layer in layers[1::2]}
    if any(type(layer) is not Affine for layer in affines) or len(acts) > 1 \
            or not acts <= {Relu, Sigmoid}:
        return None
    return affines, acts == {Sigmoid}


def fused_steps(net, optimizer, x, t, batch_size: int):
    """A :class:`FusedSteps` for training ``net`` with ``optimizer`` on ``(x, t)``, or None
    where the fused loop does not apply: it takes plain :class:`xpnet.SGD` and
    :class:`xpnet.Momentum` (their exact classes), a net of Affine layers with Relu or
    Sigmoid between them and SoftmaxWithLoss (the book's TwoLayerNet and MultiLayerNet
    without batch norm or dropout), integer labels, float32 or float64 NumPy arrays."""
    fused = fused_module()
    structure = _mlp_affines(net)
    if fused is None or structure is None or type(optimizer) not in (SGD, Momentum):
        return None
    arrays = [x, *(getattr(layer, name) for layer in structure[0] for name in ("W", "b"))]
    if not all(type(a) is np.ndarray for a in (*arrays, t)):  # NumPy's own arrays only
        return None
    if x.dtype not in _SYMBOLS or not all(a.dtype == x.dtype and _fits_blas(a) for a in arrays) \
            or not all(a.flags.writeable for a in arrays[1:]):
        return None
    if t.ndim != 1 or t.dtype != np.int64:
        return None
    return FusedSteps(fused, net, optimizer, structure, batch_size)


def _c_array(owner, name: str):
    """``owner``'s array ``name`` (an attribute, or a key of a dict), replaced by a C-contiguous,
    writable copy of itself where it is not one (the compiled loop reads its rows by stride:
    a transposed or read-only array assigned between epochs would be read wrongly)."""
    get = owner.get if isinstance(owner, dict) else lambda key: getattr(owner, key)
    a = get(name)
    if not (type(a) is np.ndarray and _fits_blas(a) and a.flags.writeable):
        a = np.array(a, order="C")
        if isinstance(owner, dict):
            owner[name] = a
        else:
            setattr(owner, name, a)
    return a


def _fused_runner(trainer, run):
    """The runner factory registered with :mod:`xpnet.runners`: :func:`fused_steps`."""
    return fused_steps(trainer.net, trainer.optimizer, run.x, run.t, trainer.batch_size)


class FusedSteps(runners.Runner):
    """Runs a range of the Trainer's steps in one call of :func:`xpnet._fused.mlp_steps`.

    The same steps as the layers' ``train_step`` (up to rounding): weight decay, SGD's or
    Momentum's update, ``optimizer.steps``.  The batch buffers are allocated once; each call
    reads the parameters (and Momentum's velocities) afresh from the net and the optimizer,
    so parameters replaced between calls are the ones trained.
    """

    def __init__(self, fused, net, optimizer, structure, batch_size: int):
        affines, self.sigmoid = structure
        super().__init__(net, optimizer, batch_size)
        self.fused, self.affines = fused, affines
        self.name = "fused loop (numba)"
        dtype = affines[0].W.dtype
        widths = [affines[0].W.shape[0]] + [layer.W.shape[1] for layer in affines]
        self.acts = tuple(np.empty((batch_size, w), dtype=dtype) for w in widths)
        # The gradients of the scores and the hidden layers (the inputs' is never made: a
        # placeholder of the tuple's type keeps its index).
        self.grads = tuple(np.empty((batch_size, w) if i else (1, 1), dtype=dtype)
                           for i, w in enumerate(widths))
        self.bias_grads = tuple(np.empty_like(layer.b) for layer in affines)
        self.momentum = type(optimizer) is not SGD
        self.weight_grads = (tuple(np.empty_like(layer.W) for layer in affines) if self.momentum
                             else None)
        library()
        self.address = _state["addresses"][np.dtype(dtype)]  # NumPy's CBLAS gemm (see gemm)
        self.losses = np.empty(0)

    def _velocities(self):
        """Momentum's ``v`` of every W and b (zeros on the first step), in the optimizer."""
        names = {id(value): name for name, value in self.net.params.items()}
        v = {}
        for layer in self.affines:
            for attr in ("W", "b"):
                p = getattr(layer, attr)
                if id(p) not in names:
                    raise ValueError("the fused training loop refuses to run: a layer it trains "
                                     "is no longer one of the net's (its layers were replaced)")
                slots = self.optimizer.slots(names[id(p)], p)
                v[attr, id(layer)] = _c_array(slots, "v")
                if v[attr, id(layer)].shape != p.shape:
                    raise ValueError(f"the optimizer's velocity of {names[id(p)]} has shape "
                                     f"{v[attr, id(layer)].shape}, the parameter {p.shape}")
        return (tuple(v["W", id(layer)] for layer in self.affines),
                tuple(v["b", id(layer)] for layer in self.affines))

    def _refuse_unless_fits(self, x, t, order, start, stop, batch_size, Ws, bs) -> None:
        """Raise ValueError unless every array the compiled loop reads or writes is where its
        indices will look: the loop itself checks no bound, so nothing it is handed may
        send it outside a buffer (O(N) integer reductions, once per call)."""
        widths = tuple(a.shape[1] for a in self.acts)
        shapes = tuple((a, b) for a, b in zip(widths[:-1], widths[1:]))
        n, steps = x.shape[0], -(-x.shape[0] // max(batch_size, 1))
        problems = []
        if tuple(W.shape for W in Ws) != shapes or tuple(b.shape for b in bs) != tuple(
                (w,) for w in widths[1:]):
            problems.append(f"the weights are {[tuple(W.shape) for W in Ws]}, the loop was set "
                            f"up for {list(shapes)}")
        if type(x) is not np.ndarray or x.ndim != 2 or x.shape[1] != widths[0] \
                or x.dtype != self.acts[0].dtype or not _fits_blas(x):
            problems.append(f"x must be a C-contiguous {self.acts[0].dtype} array (N, "
                            f"{widths[0]}), got {getattr(x, 'dtype', type(x))} "
                            f"{tuple(getattr(x, 'shape', ()))}")
        elif type(t) is not np.ndarray or t.dtype != np.int64 or t.shape != (n,) or (
                n and not (0 <= int(t.min()) and int(t.max()) < widths[-1])):
            problems.append(f"t must hold {n} int64 labels in [0, {widths[-1]})")
        elif type(order) is not np.ndarray or order.dtype != np.int64 or order.shape != (n,) \
                or not (0 <= int(order.min()) and int(order.max()) < n):
            problems.append(f"order must be a permutation of range({n}) as int64")
        if batch_size != self.acts[0].shape[0] or not 0 <= start < stop <= steps:
            problems.append(f"steps {start}..{stop} of batch {batch_size} (the loop's buffers "
                            f"hold batches of {self.acts[0].shape[0]}, an epoch has {steps})")
        if problems:
            raise ValueError("the fused training loop refuses to run: " + "; ".join(problems))

    def advance(self, run, order, start: int, stop: int) -> tuple:
        return self.run(run.x, run.t, order, start, stop, self.batch_size)

    def run(self, x, t, order, start: int, stop: int, batch_size: int):
        """Steps ``start .. stop - 1`` of the epoch whose samples come in ``order``:
        ``(steps taken, their batch-size weighted losses as a float64 array)``."""
        if self.losses.shape[0] < stop - start:
            self.losses = np.empty(stop - start)
        Ws = tuple(_c_array(layer, "W") for layer in self.affines)
        bs = tuple(_c_array(layer, "b") for layer in self.affines)
        x = np.reshape(x, (x.shape[0], -1)) if x.ndim > 2 else x
        self._refuse_unless_fits(x, t, order, start, stop, batch_size, Ws, bs)
        opt, decay = self.optimizer, float(getattr(self.net, "weight_decay", 0.0))
        if self.momentum:
            (vWs, vbs), gWs, momentum = self._velocities(), self.weight_grads, opt.momentum
        else:  # unused by SGD: any arrays of the right types
            vWs, vbs, gWs, momentum = Ws, bs, Ws, -1.0
        self.fused.mlp_steps(self.address, x, t, order, start,
                             stop, batch_size, Ws, bs, self.acts, self.grads, self.sigmoid,
                             float(opt.lr), decay, float(momentum), vWs, vbs, gWs,
                             self.bias_grads, self.losses)
        opt.record_steps(stop - start)
        for layer in self.affines:
            layer.dW = layer.db = None
        return stop - start, self.losses[:stop - start].copy()


# -- where this module plugs in (xpnet/__init__.py imports it, once) -------------------------------


def describe() -> list:
    """Lines for ``xpnet info``: the BLAS fast path, the fused loop, the conv nets' kernels and
    the allocator, the BLAS thread policy."""
    blas = library()
    lines = [("fused SGD step; BLAS for the fused SGD step and bias: " + os.path.basename(blas)
              if blas else "fused SGD step; no BLAS fast path: the fused SGD step and bias use "
              "NumPy's matmul")]
    if fused_module() is not None:
        lines.append(f"fused training loop: numba {importlib.import_module('numba').__version__}"
                     " (SGD and Momentum on multilayer perceptrons, NumPy)")
    else:
        lines.append("fused training loop: off (" + (
            "XPNET_NO_NUMBA is set" if env_flag("XPNET_NO_NUMBA")
            else "no BLAS fast path" if blas is None
            else "numba is not installed: pip install 'xpnet[fast]'") + ")")
    lines.append("conv nets on NumPy: im2col in one copy; max pooling "
                 + ("compiled (numba)" if fused_module() is not None else "portable (no numba)")
                 + "; allocator during fit: "
                 + ("untouched (XPNET_NO_MALLOC_TUNING)" if env_flag("XPNET_NO_MALLOC_TUNING")
                    else f"freed memory kept between steps (glibc, up to {KEEP_FREED >> 20} MiB)"
                    if _glibc() is not None else "the system's (not glibc)"))
    env = os.environ.get(_THREADS_ENV)
    loaded = ", ".join(f"{api} {version}: {threads} thread(s)"
                       for api, version, threads in blas_info()) or "none found"
    lines.append("BLAS threads in training: " + (
        f"{env} ({_THREADS_ENV})" if env else
        f"1 where a step's largest product is under {PARALLEL_MIN_WORK / 1e6:.1f}M "
        f"multiply-adds, else all {usable_cores()} usable cores (override: "
        f"--threads, Trainer(blas_threads=), {_THREADS_ENV})") + f"; loaded BLAS: {loaded}")
    return lines


def im2col(x, fh: int, fw: int, stride: int, pad: int):
    """:func:`xpnet.functional.im2col` of a NumPy array as one strided copy: the windows are a
    view (``sliding_window_view``), copied once into the columns' row-major layout
    (:data:`xpnet.speedups.im2col`; the portable code stacks one slice per window offset,
    whose result NumPy lays out like its inputs, and reshaping that copies it a second time).
    NotImplemented for other arrays."""
    if type(x) is not np.ndarray:
        return NotImplemented
    n, c = x.shape[0], x.shape[1]
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (fh, fw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (N, C, OH, OW, fh, fw)
    oh, ow = windows.shape[2], windows.shape[3]
    col = np.empty((c, fh, fw, n, oh, ow), dtype=x.dtype)
    col[...] = windows.transpose(1, 4, 5, 0, 2, 3)
    return col.reshape(c * fh * fw, n * oh * ow)


def col2im(col, shape: tuple, fh: int, fw: int, stride: int, pad: int):
    """:func:`xpnet.functional.col2im` of float NumPy columns in one compiled pass
    (:data:`xpnet.speedups.col2im`): the same sums in the same order, so the same bits, as
    the transposed view of a (C, N, H, W) array, like the portable result; about twice as
    fast (no pass per window offset).  NotImplemented for other arrays or without numba."""
    fused = _pool_kernels(col)
    if fused is None or len(col.shape) != 2:
        return NotImplemented
    n, c, h, w = shape
    dx = np.empty((c, n, h, w), dtype=col.dtype)  # every element written
    fused.col2im(np.ascontiguousarray(col), fh, fw, stride, pad, dx)
    return dx.transpose(1, 0, 2, 3)


def _pool_kernels(x):
    """The compiled pooling (and col2im) kernels for x (a float32 or float64 NumPy array, any
    strides: a convolution's output is a transposed view), or None where they do not apply
    or numba is not there."""
    if type(x) is not np.ndarray or x.dtype not in (np.float32, np.float64):
        return None
    return fused_module()


def _planes(x):
    """``(array, swap)`` for the pooling kernels: x itself, or, where x is the transposed view
    of a C-contiguous (C, N, H, W) array (a convolution's output, its gradient), that array
    and True (the kernels then read sample a's channel b at [b, a])."""
    if not x.flags.c_contiguous:
        t = x.transpose(1, 0, 2, 3)
        if t.flags.c_contiguous:
            return t, True
    return x, False


def max_pool(x, pool_h: int, pool_w: int, stride: int, pad: int, oh: int, ow: int, *,
             relu: bool = False):
    """``(out, arg)`` of :class:`xpnet.Pooling`'s max mode in one pass over x (of
    ``maximum(x, 0)`` with ``relu``: a Relu before it fused in), or NotImplemented
    (:data:`xpnet.speedups.max_pool`)."""
    fused = _pool_kernels(x)
    if fused is None:
        return NotImplemented
    out = np.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
    arg = np.empty(out.shape, dtype=np.int32)
    planes, swap = _planes(x)
    if (pool_h, pool_w, stride, pad) == (2, 2, 2, 0):  # the book's: unrolled
        fused.max_pool_2x2(planes, out, arg, relu, swap)
    else:
        fused.max_pool(planes, pool_h, pool_w, stride, pad, out, arg, relu, swap)
    return out, arg


def max_pool_backward(dout, arg, x_shape: tuple, pool_h: int, pool_w: int, stride: int,
                      pad: int, *, relu: bool = False, channel_major: bool = False):
    """dx of :class:`xpnet.Pooling`'s max mode, or NotImplemented
    (:data:`xpnet.speedups.max_pool_backward`).  ``relu``: the fused Relu's too (``arg``
    from :func:`max_pool` with ``relu``, non-overlapping windows); ``channel_major``: dx as
    the transposed view of a (C, N, H, W) array, the layout of a convolution's output,
    which the convolution's backward takes without a transposing copy."""
    fused = _pool_kernels(dout)
    if fused is None or type(arg) is not np.ndarray:
        return NotImplemented
    dout = np.ascontiguousarray(dout)  # (the kernels' fast code is for C-contiguous arrays)
    arg = np.ascontiguousarray(arg)
    n, c, h, w = x_shape
    dx = np.empty((c, n, h, w) if channel_major else (n, c, h, w), dtype=dout.dtype)
    if (pool_h, pool_w, stride, pad) == (2, 2, 2, 0):  # every element of dx written
        fused.max_pool_2x2_backward(dout, arg, dx, relu, channel_major)
    else:
        dx[...] = 0
        fused.max_pool_backward(dout, arg, pool_h, pool_w, stride, pad, dx, relu, channel_major)
    return dx.transpose(1, 0, 2, 3) if channel_major else dx


class ReluMaxPool:
    """A :class:`xpnet.Relu` and the max :class:`xpnet.Pooling` right after it, as one step
    of a net's unchecked steps (:data:`xpnet.speedups.fuse_layers`): on float NumPy arrays
    one pass pools ``maximum(x, 0)`` and one writes the gradient, so the Relu's full-size
    output and mask are never made.  The pool of the Relu equals the Relu of the pool, to the
    bit, with the same offsets and gradients (tie, NaN and signed-zero rules included) for
    windows that do not overlap; other windows, arrays and a pooling changed since, take the
    two layers' own math.  The layers' own state (``mask``, ``arg``) is left as it was."""

    param_names = ()
    has_train_mode = False

    def __init__(self, relu, pool):
        self.relu, self.pool = relu, pool
        # The fused pass's offsets (with the Relu's keep), input shape and layout; arg None:
        # the layers' own math ran.
        self.arg = self.x_shape = None
        self.channel_major = False

    def __repr__(self):
        return f"ReluMaxPool({self.pool!r})"

    @staticmethod
    def fits(pool) -> bool:
        """Whether the fused pass gives ``pool``'s bits: max mode, windows apart."""
        return pool.mode == "max" and pool.stride >= max(pool.pool_h, pool.pool_w)

    def forward(self, x):
        pool, self.arg = self.pool, None
        if self.fits(pool) and len(x.shape) == 4:
            window = (pool.pool_h, pool.pool_w)
            oh, ow = _pool_windows(pool, x.shape, *window)
            fast = max_pool(x, *window, pool.stride, pool.pad, oh, ow, relu=True)
            if fast is not NotImplemented:
                (out, self.arg), self.x_shape = fast, tuple(x.shape)
                self.channel_major = _planes(x)[1]
                return out
        x = unchecked(self.relu, "forward")(self.relu, x)
        return unchecked(pool, "forward")(pool, x)

    def backward(self, dout):
        pool = self.pool
        if self.arg is None:
            dout = unchecked(pool, "backward")(pool, dout)
            return unchecked(self.relu, "backward")(self.relu, dout)
        return max_pool_backward(dout, self.arg, self.x_shape, pool.pool_h, pool.pool_w,
                                 pool.stride, pool.pad, relu=True,
                                 channel_major=self.channel_major)


def fuse_layers(layers: list) -> list:
    """``layers`` (a net's, in order) with each :class:`xpnet.Relu` followed by a max
    :class:`xpnet.Pooling` (these classes themselves, not subclasses) replaced by one
    :class:`ReluMaxPool` (:data:`xpnet.speedups.fuse_layers`)."""
    steps, i = [], 0
    while i < len(layers):
        layer = layers[i]
        after = layers[i + 1] if i + 1 < len(layers) else None
        if type(layer) is Relu and type(after) is Pooling and after.mode == "max":
            steps.append(ReluMaxPool(layer, after))
            i += 2
        else:
            steps.append(layer)
            i += 1
    return steps


speedups.training_memory = training_memory
speedups.affine = _affine_kernel
speedups.im2col = im2col
speedups.col2im = col2im
speedups.filters = _filters_kernel
speedups.max_pool = max_pool
speedups.max_pool_backward = max_pool_backward
speedups.fuse_layers = fuse_layers
speedups.sgd_step = sgd_train_step
speedups.thread_policy = thread_policy
speedups.blas_threads = blas_threads
speedups.threads_from_environment = threads_from_environment
speedups.describe = describe
runners.register(_fused_runner)
