"""Stateless math on any Array API namespace: affine, sigmoid, softmax, log_softmax, one_hot,
cross_entropy, and the window helpers of convolution and pooling (im2col, col2im).

Every function takes arrays of one library on one device and returns arrays of
the same library, device and floating dtype.  The namespace comes from
:func:`xpnet.backend.namespace`; nothing here imports an array library.
"""

from __future__ import annotations

import operator

import array_api_extra as xpx

from . import speedups
from ._checks import check_array, check_label_range, check_logits, check_targets, require_array
from .backend import dtype_name, is_dtype, namespace, native_device

__all__ = [
    "affine",
    "col2im",
    "conv_output_size",
    "im2col",
    "cross_entropy",
    "log_softmax",
    "one_hot",
    "sigmoid",
    "softmax",
    "softmax_and_log_softmax",
]


def matmul(a, b):
    """``a @ b`` for two 2-d arrays: every matrix product of the layers goes through here, so
    that a runner can put a product of its own in (:data:`xpnet.speedups.matmul`: the
    CUDA-graph runner's cuBLAS calls on the capture stream, :mod:`xpnet._graphs`)."""
    fast = speedups.matmul
    if fast is not None:
        out = fast(a, b)
        if out is not NotImplemented:
            return out
    return a @ b


def affine(x, W, b):
    """``x @ W + b`` for x (N, D), W (D, M) and b (M,): an affine layer's output (N, M).

    The arrays are not checked here (:class:`xpnet.Affine` does that); the result is new.
    Where :mod:`xpnet._fast` is there, its kernel (:data:`xpnet.speedups.affine`) runs.
    """
    fast = speedups.affine
    if fast is not None:
        out = fast(x, W, b)
        if out is not NotImplemented:
            return out
    return matmul(x, W) + b


def sigmoid(x):
    """Logistic sigmoid ``1 / (1 + exp(-x))``, elementwise, without overflow.

    Parameters
    ----------
    x : array of real floating dtype, any shape

    Returns
    -------
    array of the same shape, dtype and device; exactly 1.0 at x = 1000 and 0.0 at x = -1000.
    """
    xp = namespace(x=require_array(x, "x"))
    check_array(xp, x, "x")
    return stable_sigmoid(xp, x)


def stable_sigmoid(xp, x):
    """:func:`sigmoid` of a floating array ``x`` of namespace ``xp``, unchecked."""
    # exp(-|x|) is in (0, 1]: it never overflows, and each branch below is exact in its half.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _shifted_exp(xp, x, axis: int):
    """``(z, e, s)``: ``z = x - max(x)``, ``e = exp(z)``, ``s = sum(e)`` along ``axis`` (kept).

    Shifting by the max means exp() cannot overflow (logits of 1000 stay finite),
    and s >= 1, so log-sum-exp needs no epsilon inside the log.
    """
    z = x - xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(z)
    return z, e, xp.sum(e, axis=axis, keepdims=True)


def softmax_and_log_softmax(x, axis: int = -1):
    """``(softmax(x), log_softmax(x))`` along ``axis`` from a single ``exp``.

    Parameters
    ----------
    x : array of real floating dtype
    axis : int, default -1

    Returns
    -------
    two arrays of x's shape, dtype and device; softmax rows sum to 1.
    """
    xp = namespace(x=x)
    check_array(xp, x, "x")
    z, e, s = _shifted_exp(xp, x, axis)
    return e / s, z - xp.log(s)


def softmax_cross_entropy(xp, x, rows, row_sums=None):
    """``(softmax(x), -sum(rows * log_softmax(x)) / N)`` for scores x (N, C) and target rows (N, C).

    ``row_sums`` is ``sum(rows, axis=1)`` kept as (N, 1), or None for one-hot rows (each
    sums to 1).  The loss is a 0-d array.  It is computed as
    ``(sum(row_sums * log s) - sum(rows * z)) / N`` (see :func:`_shifted_exp`), which
    needs no (N, C) log-softmax array; for one-hot or probability rows the two terms
    are >= 0 and <= 0 (log s >= 0, z <= 0), so the subtraction cannot cancel digits.
    """
    z, e, s = _shifted_exp(xp, x, 1)
    log_s = xp.log(s)
    nll = xp.sum(log_s if row_sums is None else row_sums * log_s) - xp.sum(rows * z)
    return e / s, xp.asarray(nll / x.shape[0])  # NumPy's sums are scalars; asarray undoes it


def log_softmax(x, axis: int = -1):
    """``log(softmax(x))`` along ``axis``, computed stably (see :func:`softmax_and_log_softmax`)."""
    return softmax_and_log_softmax(x, axis)[1]


def softmax(x, axis: int = -1):
    """Softmax along ``axis``, max-shifted (see :func:`softmax_and_log_softmax`)."""
    return softmax_and_log_softmax(x, axis)[0]


def one_hot(t, num_classes: int, *, dtype=None, check_labels: bool = True):
    """One-hot encode integer labels.

    Parameters
    ----------
    t : integer array of shape (N,) (any shape works; a trailing axis is added)
    num_classes : int
        C, the number of classes; every label must lie in [0, C).
    dtype : dtype, optional
        Dtype of the result (default: the namespace's default floating dtype).
    check_labels : bool, default True
        Check the label range (one device-to-host read).

    Returns
    -------
    array of shape ``(*t.shape, C)`` on t's device.
    """
    xp = namespace(t=t)
    if not is_dtype(xp, t.dtype, "integral"):
        raise TypeError(f"t must hold integer class labels, got dtype {dtype_name(t.dtype)}")
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if check_labels:
        check_label_range(xp, t, num_classes, "t")
    if dtype is None:
        dtype = xp.__array_namespace_info__().default_dtypes(device=native_device(t))["real floating"]
    return one_hot_rows(xp, t, num_classes, dtype)


def one_hot_rows(xp, t, num_classes: int, dtype):
    """:func:`one_hot` of labels ``t`` (N,) of namespace ``xp`` already checked: one comparison
    with ``arange(C)`` (no scatter, so it is the same few operations on every library)."""
    classes = xp.arange(num_classes, device=native_device(t))  # the default integer dtype
    if t.dtype != classes.dtype:  # labels in [0, C) fit it; C may not fit t's own (uint8)
        t = xp.astype(t, classes.dtype)
    return xp.astype(xp.expand_dims(t, axis=-1) == classes, dtype)


def targets_as_rows(xp, x, t, *, check_labels: bool = True):
    """Validate targets ``t`` against logits ``x`` of shape (N, C) (:func:`check_targets`);
    return them as rows.

    Returns ``(rows, from_labels)``: ``rows`` has shape (N, C) and x's dtype;
    ``from_labels`` is True when ``t`` held integer labels (each row then sums to exactly 1).
    """
    if check_targets(xp, x, t, check_labels=check_labels):
        return one_hot(t, x.shape[1], dtype=x.dtype, check_labels=False), True
    return (t if t.dtype == x.dtype else xp.astype(t, x.dtype)), False


def cross_entropy(logits, t, *, check_labels: bool = True):
    """Mean softmax cross-entropy over the batch.

    ``-mean_n sum_c t[n, c] * log_softmax(logits)[n, c]``, computed from the
    max-shifted logits (see :func:`softmax_cross_entropy`), with no epsilon inside a log.

    Parameters
    ----------
    logits : array of shape (N, C), real floating
    t : integer array of shape (N,) with labels in [0, C), or floating array of
        shape (N, C) with one-hot or probability rows
    check_labels : bool, default True
        Check integer labels lie in [0, C) (one device-to-host read).

    Returns
    -------
    0-d array of logits' dtype on logits' device.
    """
    xp = namespace(logits=logits, t=t)
    check_logits(xp, logits, "logits")
    rows, from_labels = targets_as_rows(xp, logits, t, check_labels=check_labels)
    row_sums = None if from_labels else xp.sum(rows, axis=1, keepdims=True)
    return softmax_cross_entropy(xp, logits, rows, row_sums)[1]


# -- windows: im2col and col2im (convolution and pooling) ---------------------------------------


def conv_output_size(size: int, window: int, stride: int, pad: int) -> int:
    """How many windows of ``window`` fit along an axis of ``size`` padded by ``pad`` on both
    sides, ``stride`` apart: ``(size + 2 pad - window) // stride + 1`` (0 if none fits)."""
    return max(0, (size + 2 * pad - window) // stride + 1)


def window_slices(fh: int, fw: int, stride: int, oh: int, ow: int) -> list:
    """``[(rows, cols), ...]`` per window offset (i, j) in row-major order: the strided slices
    that pick, for every output position, the input element at that offset of its window."""
    return [(slice(i, i + stride * (oh - 1) + 1, stride), slice(j, j + stride * (ow - 1) + 1, stride))
            for i in range(fh) for j in range(fw)]


def live_windows(fh: int, fw: int, stride: int, pad: int, h: int, w: int, oh: int,
                 ow: int) -> list:
    """``[(k, rows, cols, real), ...]`` for the window offsets k = i * fw + j (row-major) whose
    strided slices of the padded input (H + 2 pad, W + 2 pad) pick at least one input
    element; ``real``: None where every element they pick is one, else host boolean lists
    ``(rows (OH,), cols (OW,))`` of the windows where it is.  A window larger than its input
    (padding all round) hence costs its input's size, not its own."""
    def inside(f: int, o: int, size: int) -> list:  # per offset along one axis
        found = []
        for i in range(f):
            cells = [pad <= r * stride + i < pad + size for r in range(o)]
            if any(cells):
                found.append((i, cells, all(cells)))
        return found

    live = []
    for i, in_rows, rows_all in inside(fh, oh, h):
        for j, in_cols, cols_all in inside(fw, ow, w):
            live.append((i * fw + j, slice(i, i + stride * (oh - 1) + 1, stride),
                         slice(j, j + stride * (ow - 1) + 1, stride),
                         None if rows_all and cols_all else (in_rows, in_cols)))
    return live


def pad_spatial(xp, x, pad: int, value: float = 0.0):
    """x (N, C, H, W) padded by ``pad`` on both sides of H and W with ``value`` (array-api-extra's
    ``pad``); x itself when ``pad`` is 0."""
    if not pad:
        return x
    return xpx.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=value, xp=xp)


def im2col(xp, x, fh: int, fw: int, stride: int = 1, pad: int = 0):
    """The (fh, fw) windows of x (N, C, H, W) as the columns of a matrix (C * fh * fw,
    N * OH * OW): one column per output position (n, oh, ow), its rows ordered (c, i, j) like
    ``W.reshape(FN, -1)``, so that ``W.reshape(FN, -1) @ im2col(x)`` is the convolution (the
    book's im2col matrix, transposed).  Padding with zeros by array-api-extra's ``pad``; the
    windows by strided slicing of the (C, N, H, W) view, stacked once (no integer-array
    indexing; each slice copies whole rows, which is why this layout is the fast one)."""
    if speedups.im2col is not None:  # NumPy: one strided copy
        col = speedups.im2col(x, fh, fw, stride, pad)
        if col is not NotImplemented:
            return col
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    xt = xp.permute_dims(pad_spatial(xp, x, pad), (1, 0, 2, 3))  # (C, N, Hp, Wp)
    col = xp.stack([xt[:, :, rows, cols] for rows, cols in window_slices(fh, fw, stride, oh, ow)],
                   axis=1)  # (C, fh * fw, N, OH, OW)
    return xp.reshape(col, (c * fh * fw, n * oh * ow))


def col2im(xp, col, shape: tuple, fh: int, fw: int, stride: int = 1, pad: int = 0):
    """The adjoint of :func:`im2col`: columns (C * fh * fw, N * OH * OW) summed back onto an
    x of ``shape`` (N, C, H, W); where windows overlap their contributions add up.  Each
    window offset is added at its strided positions with array-api-extra's
    ``at(...).add(...)`` (in place on a fresh array where the library allows it, functional
    on JAX)."""
    if speedups.col2im is not None:  # NumPy: one compiled pass
        dx = speedups.col2im(col, shape, fh, fw, stride, pad)
        if dx is not NotImplemented:
            return dx
    n, c, h, w = shape
    oh, ow = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    pieces = xp.reshape(col, (c, fh * fw, n, oh, ow))
    # Summed in the (C, N, H, W) layout of the columns, then viewed as (N, C, H, W).
    dx = add_at_windows(xp, [pieces[:, k, ...] for k in range(fh * fw)], (c, n, h, w), fh, fw,
                        stride, pad)
    return xp.permute_dims(dx, (1, 0, 2, 3))


def add_at_windows(xp, pieces: list, shape: tuple, fh: int, fw: int, stride: int, pad: int,
                   offsets=None):
    """The adjoint of taking windows (pooling's, and :func:`col2im`'s): ``pieces[k]``
    (A, B, OH, OW), the gradient at window offset k (or at ``offsets[k]``: those of
    :func:`live_windows`), summed onto an array of ``shape`` (A, B, H, W) at that offset's
    strided positions (array-api-extra's ``at(...).add(...)``: in place on a fresh array
    where the library allows it, functional on JAX); overlapping windows add up, the padding
    is cut off."""
    n, c, h, w = shape
    oh, ow = pieces[0].shape[2], pieces[0].shape[3]
    dx = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=pieces[0].dtype,
                  device=native_device(pieces[0]))
    slices = window_slices(fh, fw, stride, oh, ow)
    if offsets is not None:
        slices = [slices[k] for k in offsets]
    for piece, (rows, cols) in zip(pieces, slices):
        dx = xpx.at(dx)[:, :, rows, cols].add(piece, xp=xp)
    return dx[:, :, pad:pad + h, pad:pad + w] if pad else dx
