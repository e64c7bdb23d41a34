"""The fused training loop of :mod:`xpnet._fast`, compiled by numba (the extra ``xpnet[fast]``).

Only :mod:`xpnet._fast` imports this module, and only when numba is installed: without it (or
without this file) the Trainer runs the portable layer code, to the same results up to
rounding.

:func:`mlp_steps` runs a range of SGD (or Momentum) steps of a multilayer perceptron
(``Affine``, ``Relu`` or ``Sigmoid``, ..., ``Affine``, ``SoftmaxWithLoss`` with integer
labels) on NumPy arrays, in one call: for each step it gathers the batch into a buffer,
runs the forward pass (bias broadcast into the output, then the product accumulated onto
it by one gemm), the softmax cross-entropy and its gradient in one pass per row, and the
backward pass with each layer's update fused in (``W -= lr x^T dout`` as one gemm with
``beta = 1``; Momentum's gradient into a buffer, then one pass for the velocity and the
weight).  Every array it writes is preallocated by the caller and reused from step to
step; nothing is allocated per step, and no Python runs between the steps.

The matrix products call NumPy's own BLAS (the library :func:`xpnet._fast.gemm` found), by
an address passed as an argument: numba's own ``np.dot`` would need SciPy, and a ctypes
function baked into the code could not be cached (``cache=True`` keeps the compiled code
on disk, so only the first run on a machine compiles, for a few seconds).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _gemm_intrinsic(float_type):
    """An intrinsic calling a CBLAS ``?gemm`` (64-bit integers) at the address it is given."""

    @intrinsic
    def call(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        ints = (address, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)
        if not all(isinstance(x, types.Integer) for x in ints) or not all(
                isinstance(x, types.Float) for x in (alpha, beta)):
            return None
        sig = types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

        def codegen(context, builder, signature, args):
            i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
            real = ir.FloatType() if float_type == types.float32 else ir.DoubleType()
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, ptr, i64,
                                                   ptr, i64, real, ptr, i64])
            kinds = [i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
            values = [context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer)
                      else context.cast(builder, v, t, float_type)
                      for v, t in zip(args[1:], signature.args[1:])]
            values = [builder.inttoptr(v, kind) if kind == ptr else
                      builder.trunc(v, kind) if kind == i32 else v
                      for v, kind in zip(values, kinds)]
            function = builder.inttoptr(args[0], fnty.as_pointer())
            builder.call(function, [ir.Constant(i32, _ROW_MAJOR), *values])
            return context.get_dummy_value()

        return sig, codegen

    return call


_sgemm = _gemm_intrinsic(types.float32)
_dgemm = _gemm_intrinsic(types.float64)


@njit(cache=True)
def _gemm(address, c, m, a, trans_a, b, trans_b, k, alpha, beta):
    """``c[:m] = alpha op(a) @ op(b) + beta c[:m]`` (op(a) is (m, k), op(b) is (k, n) where n
    is c's width), all three C-contiguous; only the rows the shapes name are read."""
    ta = _TRANS if trans_a else _NO_TRANS
    tb = _TRANS if trans_b else _NO_TRANS
    if c.itemsize == 4:  # float32
        _sgemm(address, ta, tb, m, c.shape[1], k, alpha, a.ctypes.data, a.shape[1],
               b.ctypes.data, b.shape[1], beta, c.ctypes.data, c.shape[1])
    else:
        _dgemm(address, ta, tb, m, c.shape[1], k, alpha, a.ctypes.data, a.shape[1],
               b.ctypes.data, b.shape[1], beta, c.ctypes.data, c.shape[1])


@njit(cache=True)
def _forward_layer(address, x, out, W, b, m, sigmoid, activate):
    """``out[:m] = act(x[:m] @ W + b)``: the product by gemm, then one pass adds the bias and
    applies the activation."""
    _gemm(address, out, m, x, False, W, False, W.shape[0], 1.0, 0.0)
    for r in range(m):
        row = out[r]
        if not activate:
            for j in range(row.shape[0]):
                row[j] += b[j]
        elif sigmoid:
            for j in range(row.shape[0]):
                v = row[j] + b[j]
                if v >= 0:  # exp of a negative argument only: no overflow at either end
                    row[j] = 1.0 / (1.0 + math.exp(-v))
                else:
                    e = math.exp(v)
                    row[j] = e / (1.0 + e)
        else:
            for j in range(row.shape[0]):
                v = row[j] + b[j]
                row[j] = v if not v < 0 else 0.0  # NaN stays NaN, as in Relu


@njit(cache=True)
def _softmax_cross_entropy(z, dz, t, order, lo, m, db):
    """The summed cross-entropy of the rows ``z[:m]`` against the labels ``t[order[lo + r]]``,
    its mean's gradient ``(softmax(z) - onehot) / m`` into ``dz`` and that gradient's column
    sums (the last bias's gradient) into ``db``, in one pass per row."""
    total = 0.0
    db[:] = 0.0
    for r in range(m):
        row, grad = z[r], dz[r]
        label = t[order[lo + r]]
        top = -np.inf
        for j in range(row.shape[0]):
            top = max(top, row[j])
        s = 0.0
        for j in range(row.shape[0]):  # shifted by the row's maximum: exp never overflows
            e = math.exp(row[j] - top)
            grad[j] = e
            s += e
        total += top + math.log(s) - row[label]
        for j in range(row.shape[0]):
            grad[j] = grad[j] / s / m
        grad[label] -= 1.0 / m
        for j in range(row.shape[0]):
            db[j] += grad[j]
    return total


@njit(cache=True)
def _activation_backward(d, y, m, sigmoid, db):
    """``d[:m] *= act'(...)`` from the activation's output y (``y (1 - y)``, or ``y > 0``), and
    the result's column sums (the bias gradient of the layer below) into ``db``, in one pass."""
    db[:] = 0.0
    for r in range(m):
        row, out = d[r], y[r]
        if sigmoid:
            for j in range(row.shape[0]):
                row[j] = row[j] * (1.0 - out[j]) * out[j]
                db[j] += row[j]
        else:
            for j in range(row.shape[0]):
                row[j] = row[j] if out[j] > 0 else 0.0
                db[j] += row[j]


@njit(cache=True)
def _update_layer(address, x, g, W, b, m, lr, decay, momentum, vW, vb, gW, gb):
    """SGD (``momentum < 0``) or Momentum update of one affine layer whose input was x[:m],
    whose output gradient is g[:m] and whose bias gradient is gb; weight decay ``decay * W``
    added to W's gradient."""
    if momentum < 0:  # SGD: W (1 - lr decay), then W -= lr x^T g by one gemm
        if decay:
            W *= 1.0 - lr * decay
        _gemm(address, W, W.shape[0], x, True, g, False, m, -lr, 1.0)
        for j in range(b.shape[0]):
            b[j] -= lr * gb[j]
        return
    # Momentum: v = momentum v - lr (x^T g + decay W); W += v
    _gemm(address, gW, W.shape[0], x, True, g, False, m, 1.0, 0.0)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            v = vW[i, j] * momentum - lr * (gW[i, j] + decay * W[i, j])
            vW[i, j] = v
            W[i, j] += v
    for j in range(b.shape[0]):
        v = vb[j] * momentum - lr * gb[j]
        vb[j] = v
        b[j] += v


@njit(cache=True)
def _sum_of_squares(W):
    total = 0.0
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            total += W[i, j] * W[i, j]
    return total


@njit(cache=True)
def _gather(x, order, lo, m, out):
    """``out[r] = x[order[lo + r]]`` for r < m (an element loop: twice as fast as numba's row
    slice assignment, and than NumPy's ``take``)."""
    for r in range(m):
        i = order[lo + r]
        for j in range(x.shape[1]):
            out[r, j] = x[i, j]


@njit(cache=True)
def mlp_steps(address, x, t, order, start, stop, batch, Ws, bs, acts, ds, sigmoid, lr, decay,
              momentum, vWs, vbs, gWs, gbs, losses):
    """Steps ``start .. stop - 1`` of an epoch whose samples come in ``order``: each step's
    summed loss (before its update) goes to ``losses[step - start]``.

    ``Ws``, ``bs``: the L layers' weights and biases, updated in place.  ``acts``: L + 1
    buffers (batch, width): the gathered inputs, the hidden activations, the scores.
    ``ds``: their gradients (``ds[0]`` unused).  ``momentum < 0`` selects SGD; Momentum
    keeps its velocities in ``vWs``, ``vbs`` and its weight gradients in ``gWs``; ``gbs``
    takes the bias gradients.
    """
    layers, n = len(Ws), x.shape[0]
    for s in range(start, stop):
        lo = s * batch
        m = min(lo + batch, n) - lo
        _gather(x, order, lo, m, acts[0])
        for i in range(layers):
            _forward_layer(address, acts[i], acts[i + 1], Ws[i], bs[i], m, sigmoid,
                           i < layers - 1)
        loss = _softmax_cross_entropy(acts[layers], ds[layers], t, order, lo, m, gbs[layers - 1])
        if decay:  # the loss's 0.5 decay sum(W ** 2), as Sequential.loss adds it
            squares = 0.0
            for i in range(layers):
                squares += _sum_of_squares(Ws[i])
            loss += 0.5 * decay * squares * m
        losses[s - start] = loss
        for i in range(layers - 1, -1, -1):
            if i > 0:  # the input gradient first, with the weights before their update
                _gemm(address, ds[i], m, ds[i + 1], False, Ws[i], True, Ws[i].shape[1],
                      1.0, 0.0)
                _activation_backward(ds[i], acts[i], m, sigmoid, gbs[i - 1])
            _update_layer(address, acts[i], ds[i + 1], Ws[i], bs[i], m, lr, decay, momentum,
                          vWs[i], vbs[i], gWs[i], gbs[i])


# -- max pooling: each window's maximum and its offset in one pass, the gradient back in one --


@njit(cache=True, inline="always")
def _read(v, relu, zero):
    """An element as the pooling sees it: itself, or ``maximum(v, 0)`` (NumPy's: NaN stays
    NaN, -0.0 becomes 0.0) when a Relu before the pooling is fused in."""
    if relu:
        return v if (v > zero) | (v != v) else zero
    return v


# With ``relu``, :func:`max_pool` adds the window's size to ``arg`` where the maximum's
# input was > 0 (the Relu's keep, for the backward: no second read of x).
# The pooling kernels take x (and write dx) as (N, C, H, W), or, with ``swap``, as the
# (C, N, H, W) array whose transposed view the layers hold (a convolution's output is one):
# then the plane of sample a, channel b is x[b, a].  Either way every array is C-contiguous
# for numba, whose code for arrays of any strides is half as fast.

@njit(cache=True)
def max_pool(x, ph, pw, stride, pad, out, arg, relu, swap):
    """Max pooling of x (N, C, H, W) into out (N, C, OH, OW), with ``arg`` the offset
    ``i * pw + j`` of each window's maximum.  The same arithmetic as the portable
    :class:`xpnet.Pooling`: each window's input elements only (a padding cell never wins),
    the first NaN, else the first maximum.  Without branches on the data (a comparison of
    random values mispredicts half the time).  ``relu``: pools ``maximum(x, 0)`` instead (a
    Relu fused in: :func:`_read`), and adds ``ph * pw`` to ``arg`` where the maximum is > 0
    (the Relu's keep)."""
    n, c, oh, ow = out.shape
    h, w = x.shape[2], x.shape[3]
    zero = x.dtype.type(0)
    for a in range(n):
        for b in range(c):
            p, o, g = (x[b, a] if swap else x[a, b]), out[a, b], arg[a, b]
            for r in range(oh):
                r0 = r * stride - pad
                i0, i1 = max(0, -r0), min(ph, h - r0)
                for q in range(ow):
                    q0 = q * stride - pad
                    j0, j1 = max(0, -q0), min(pw, w - q0)
                    best, where = _read(p[r0 + i0, q0 + j0], relu, zero), i0 * pw + j0
                    for i in range(i0, i1):  # (the first again: neither larger nor a new NaN)
                        for j in range(j0, j1):
                            best, where = _max_step(best, where,
                                                    _read(p[r0 + i, q0 + j], relu, zero),
                                                    i * pw + j)
                    if best != best:  # (rare) a NaN window: its gradient goes to its NaN
                        where = _first_nan(p, r0, q0, i0, i1, j0, j1, pw)
                    o[r, q] = best
                    g[r, q] = where + (ph * pw if relu and best > zero else 0)


@njit(cache=True)
def max_pool_backward(dout, arg, ph, pw, stride, pad, dx, relu, swap):
    """The gradient of :func:`max_pool`: each window's ``dout`` added onto its maximum's
    position in dx (N, C, H, W), which the caller zeroed (a padding cell's is dropped).
    ``relu`` (non-overlapping windows only; ``arg`` from :func:`max_pool` with ``relu``): the
    fused Relu's backward too, the sum times 1 where x was > 0 and 0 elsewhere:
    ``(0 + dout) * keep``, the unfused layers' arithmetic.  ``swap``: dx is (C, N, H, W)."""
    size = ph * pw
    n, c, oh, ow = dout.shape
    h, w = dx.shape[2], dx.shape[3]
    one, zero = dx.dtype.type(1), dx.dtype.type(0)
    for a in range(n):
        for b in range(c):
            d, g, p = dout[a, b], arg[a, b], dx[b, a] if swap else dx[a, b]
            # Windows last to first: where they overlap, a position's contributions add up in
            # the portable code's order (by offset in the window: the later window first).
            for r in range(oh - 1, -1, -1):
                for q in range(ow - 1, -1, -1):
                    k = g[r, q] % size
                    row = r * stride + k // pw - pad
                    col = q * stride + k % pw - pad
                    if 0 <= row < h and 0 <= col < w:
                        if relu:
                            keep = one if g[r, q] >= size else zero
                            p[row, col] = (p[row, col] + d[r, q]) * keep
                        else:
                            p[row, col] += d[r, q]


@njit(cache=True, inline="always")
def _max_step(best, where, v, k):
    """One element of a window after another, without branches: the first maximum's value
    and offset; a NaN makes the value NaN (and leaves the offset, which :func:`_first_nan`
    then moves to the NaN: kept out of this loop, which it would make twice as slow)."""
    larger = v > best
    nan = (v != v) & (best == best)
    # The value: NumPy's maximum(best, v), which keeps the later of two equal values (-0.0
    # after 0.0); the offset: the first maximum's.
    return (v if (v >= best) | nan else best), (k if larger else where)


@njit(cache=True, inline="always")
def _first_nan(p, r0, q0, i0, i1, j0, j1, pw):
    """The offset ``i * pw + j`` of the first NaN of a window (rows i0..i1, columns j0..j1 of
    the window at (r0, q0) in plane p): where a NaN window's gradient goes."""
    for i in range(i0, i1):
        for j in range(j0, j1):
            v = p[r0 + i, q0 + j]
            if v != v:
                return i * pw + j
    return i0 * pw + j0


@njit(cache=True)
def max_pool_2x2(x, out, arg, relu, swap):
    """:func:`max_pool` for the book's windows (2 x 2, stride 2, no padding), unrolled: about
    three times faster than the general loops."""
    n, c, oh, ow = out.shape
    zero = x.dtype.type(0)
    for a in range(n):
        for b in range(c):
            p, o, g = (x[b, a] if swap else x[a, b]), out[a, b], arg[a, b]
            for r in range(oh):
                for q in range(ow):
                    best, where = p[2 * r, 2 * q], 0
                    best, where = _max_step(best, where, p[2 * r, 2 * q + 1], 1)
                    best, where = _max_step(best, where, p[2 * r + 1, 2 * q], 2)
                    best, where = _max_step(best, where, p[2 * r + 1, 2 * q + 1], 3)
                    if best != best:  # (rare) a NaN window: its gradient goes to its NaN
                        where = _first_nan(p, 2 * r, 2 * q, 0, 2, 0, 2, 2)
                    if relu:
                        # The pool of maximum(x, 0), from x's: a NaN window keeps its first
                        # NaN (the Relu drops its gradient); a maximum > 0, its offset (the
                        # Relu keeps it); else every element became 0 and the first wins.
                        keep = best > zero
                        where = where + 4 if keep else (where if best != best else 0)
                        best = best if keep | (best != best) else zero
                    o[r, q] = best
                    g[r, q] = where


@njit(cache=True)
def max_pool_2x2_backward(dout, arg, dx, relu, swap):
    """:func:`max_pool_backward` for 2 x 2 windows, stride 2, no padding: every element of dx
    is written (each window's gradient or 0; the rows and columns no window covers, 0), so
    dx needs no zeroing first.  ``relu``: each window's gradient times its keep (1 where x
    at the window's maximum was > 0, else 0), as the unfused Relu's backward multiplies."""
    n, c, oh, ow = dout.shape
    h, w = dx.shape[2], dx.shape[3]
    one, zero = dx.dtype.type(1), dx.dtype.type(0)
    for a in range(n):
        for b in range(c):
            d, g, p = dout[a, b], arg[a, b], dx[b, a] if swap else dx[a, b]
            for r in range(oh):
                for q in range(ow):
                    k, v = g[r, q], d[r, q]
                    if relu:
                        v = v * (one if k >= 4 else zero)
                        k = k & 3
                    p[2 * r, 2 * q] = v if k == 0 else zero
                    p[2 * r, 2 * q + 1] = v if k == 1 else zero
                    p[2 * r + 1, 2 * q] = v if k == 2 else zero
                    p[2 * r + 1, 2 * q + 1] = v if k == 3 else zero
            for row in range(2 * oh, h):
                for col in range(w):
                    p[row, col] = zero
            for row in range(2 * oh):
                for col in range(2 * ow, w):
                    p[row, col] = zero



@njit(cache=True)
def col2im(col, fh, fw, stride, pad, dx):
    """The adjoint of im2col: columns (C fh fw, N OH OW) summed onto dx (C, N, H, W), a
    channel-major array (the layers see its transposed view), each element's contributions
    added in window-offset order onto 0, as the portable :func:`xpnet.functional.col2im`
    adds them: the same bits.  Every element of dx is written.  Each row of the columns
    is read once, in order, into one channel of dx (which stays in the cache)."""
    c, n, h, w = dx.shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    zero = dx.dtype.type(0)
    for ch in range(c):
        slab = dx[ch]
        for a in range(n):
            for y in range(h):
                for x in range(w):
                    slab[a, y, x] = zero
        for i in range(fh):
            # the output rows r whose row r * stride + i - pad is inside: r in [r0, r1)
            r0 = max(0, (pad - i + stride - 1) // stride)
            r1 = min(oh, (h - 1 + pad - i) // stride + 1)
            for j in range(fw):
                q0 = max(0, (pad - j + stride - 1) // stride)
                q1 = min(ow, (w - 1 + pad - j) // stride + 1)
                src = col[(ch * fh + i) * fw + j]
                for a in range(n):
                    base = a * oh * ow
                    for r in range(r0, r1):
                        row, at = slab[a, r * stride + i - pad], base + r * ow
                        if stride == 1:  # contiguous on both sides: vectorized (indices
                            # from 0 up, which LLVM sees are never negative)
                            out, part = row[q0 + j - pad:], src[at + q0:]
                            for q in range(q1 - q0):
                                out[q] += part[q]
                        else:
                            out, part = row[q0 * stride + j - pad:], src[at + q0:]
                            for q in range(q1 - q0):
                                out[q * stride] += part[q]
