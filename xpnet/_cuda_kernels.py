"""CUDA kernels for the captured training steps on CuPy (:mod:`xpnet._graphs`), written with
numba-cuda: im2col, col2im and max pooling, forward and backward, one launch each.

Why they exist: a CUDA graph records kernel launches, and CuPy's portable im2col stacks one
array per window offset (25 for a 5x5 filter), which uploads a table of pointers from the
host and so cannot be captured; pooling's portable forward uploads its offsets as 0-d
arrays.  Each kernel here is one launch on the current stream, reads and writes device
memory only, and gives the portable code's bits:

* :meth:`CudaKernels.im2col`: ``functional.im2col``'s columns (C fh fw, N OH OW);
* :meth:`CudaKernels.col2im`: ``functional.col2im``'s sums, each input cell's window offsets
  added in the same order (offset k = i * fw + j rising) onto the same +0.0, so the same bits;
* :meth:`CudaKernels.max_pool`: the portable :class:`xpnet.Pooling`'s values and offsets: a
  padding cell never wins, the first NaN of a window wins, else the first maximum
  (row-major), and of two equal values the later's bits (-0.0 or 0.0), as ``maximum`` keeps;
* :meth:`CudaKernels.max_pool_backward`: each input cell gathers the gradients of the windows
  whose maximum it is, in offset order: no atomics, the same sums as the portable scatter.

numba-cuda runs these kernels on the CPU under its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
on NumPy arrays, which is how ``tests/test_graphs.py`` checks them against the portable code
on a machine without a GPU.  On a GPU they take CuPy arrays (through the CUDA Array Interface,
without numba's synchronisation, which a capture forbids) and launch on CuPy's current stream.
"""

from __future__ import annotations

__all__ = ["CudaKernels"]

_BLOCK = 256  # threads per block on a GPU (the simulator runs each thread as a Python thread)
_SIM_BLOCK = 32


cuda = None  # numba.cuda, imported by CudaKernels (the simulator swaps this global)
_KERNELS: dict = {}  # the kernels, made once per process (numba compiles each on first launch)


def _compile() -> dict:
    """The kernels, compiled by numba.cuda on their first launch.  They name ``cuda`` as this
    module's global: numba's simulator replaces it while a kernel runs."""
    if not _KERNELS:
        unravel, window_of = _device_functions()
        _KERNELS.update(_column_kernels(unravel, window_of),
                        **_pool_kernels(unravel, window_of))
    return _KERNELS


def _device_functions() -> tuple:
    """What the kernels share: a flat index as 4-d coordinates, and which window puts a given
    offset on an input row (the gather form of the adjoints: no atomics)."""

    @cuda.jit(device=True)
    def unravel(idx, b, c, d):
        """``idx`` as the coordinates (i, j, k, l) of an array of shape (_, b, c, d)."""
        i = idx // (b * c * d)
        rest = idx - i * b * c * d
        j = rest // (c * d)
        rest = rest - j * c * d
        k = rest // d
        return i, j, k, rest - k * d

    @cuda.jit(device=True)
    def window_of(h, pad, i, stride, size):
        """The output row (of ``size``) whose window has offset ``i`` on input row ``h``,
        or -1 where none has."""
        d = h + pad - i
        if d < 0 or d % stride != 0 or d // stride >= size:
            return -1
        return d // stride

    return unravel, window_of


def _column_kernels(unravel, window_of) -> dict:

    @cuda.jit
    def im2col(x, col, fh, fw, stride, pad, oh, ow):
        idx = cuda.grid(1)
        rows, cols = col.shape
        if idx >= rows * cols:
            return
        r = idx // cols
        q = idx - r * cols
        c = r // (fh * fw)
        k = r - c * fh * fw
        i = k // fw
        j = k - i * fw
        n = q // (oh * ow)
        p = q - n * oh * ow
        y = p // ow
        z = p - y * ow
        h = y * stride + i - pad
        w = z * stride + j - pad
        if h >= 0 and h < x.shape[2] and w >= 0 and w < x.shape[3]:
            col[r, q] = x[n, c, h, w]
        else:
            col[r, q] = 0

    @cuda.jit
    def col2im(col, dx, fh, fw, stride, pad, oh, ow):
        # dx (C, N, H, W): one thread per cell, its offsets added in the portable order.
        idx = cuda.grid(1)
        if idx >= dx.size:
            return
        c, n, h, w = unravel(idx, dx.shape[1], dx.shape[2], dx.shape[3])
        dx[c, n, h, w] = 0
        for i in range(fh):
            y = window_of(h, pad, i, stride, oh)
            if y < 0:
                continue
            for j in range(fw):
                z = window_of(w, pad, j, stride, ow)
                if z >= 0:
                    dx[c, n, h, w] += col[(c * fh + i) * fw + j, (n * oh + y) * ow + z]

    return {"im2col": im2col, "col2im": col2im}


def _pool_kernels(unravel, window_of) -> dict:

    @cuda.jit
    def max_pool(x, out, arg, ph, pw, stride, pad):
        idx = cuda.grid(1)
        if idx >= out.size:
            return
        n, c, y, z = unravel(idx, out.shape[1], out.shape[2], out.shape[3])
        found = False
        best = x[n, c, 0, 0]
        best_k = 0
        for i in range(ph):
            h = y * stride + i - pad
            if h < 0 or h >= x.shape[2]:
                continue
            for j in range(pw):
                w = z * stride + j - pad
                if w < 0 or w >= x.shape[3]:
                    continue
                v = x[n, c, h, w]
                if not found:
                    best, best_k, found = v, i * pw + j, True
                elif best == best:  # (once a NaN, the window's value and offset stay)
                    if not (v <= best):  # larger, or the window's first NaN
                        best_k = i * pw + j
                    if v != v or v >= best:  # maximum's bits: the later of two equal values
                        best = v
        out[n, c, y, z] = best
        arg[n, c, y, z] = best_k

    @cuda.jit
    def max_pool_backward(dout, arg, dx, ph, pw, stride, pad):
        idx = cuda.grid(1)
        if idx >= dx.size:
            return
        n, c, h, w = unravel(idx, dx.shape[1], dx.shape[2], dx.shape[3])
        dx[n, c, h, w] = 0
        for i in range(ph):
            y = window_of(h, pad, i, stride, dout.shape[2])
            if y < 0:
                continue
            for j in range(pw):
                z = window_of(w, pad, j, stride, dout.shape[3])
                if z >= 0 and arg[n, c, y, z] == i * pw + j:
                    dx[n, c, h, w] += dout[n, c, y, z]

    return {"max_pool": max_pool, "max_pool_backward": max_pool_backward}


class CudaKernels:
    """The kernels, for one array library.

    Parameters
    ----------
    cupy : module, optional
        CuPy: the kernels take CuPy arrays and launch on CuPy's current stream.  None: NumPy
        arrays, for numba's CUDA simulator (the CPU tests).
    """

    def __init__(self, cupy=None):
        global cuda
        from numba import cuda

        self.cuda, self.cupy = cuda, cupy
        self.kernels = _compile()
        self.block = _SIM_BLOCK if cupy is None else _BLOCK

    def _xp(self):
        if self.cupy is not None:
            return self.cupy
        import numpy

        return numpy

    def _launch(self, name: str, size: int, *args) -> None:
        if size == 0:
            return
        kernel = self.kernels[name]
        grid = (size + self.block - 1) // self.block
        if self.cupy is None:  # (the simulator copies only contiguous NumPy arrays; outputs are)
            kernel[grid, self.block](*(
                a if not hasattr(a, "flags") or a.flags.c_contiguous
                else self._xp().ascontiguousarray(a) for a in args))
            return
        stream = self.cuda.external_stream(self.cupy.cuda.get_current_stream().ptr)
        # (sync=False: numba would otherwise wait on the arrays' stream, which a capture forbids)
        kernel[grid, self.block, stream](*(
            self.cuda.as_cuda_array(a, sync=False) if hasattr(a, "__cuda_array_interface__")
            else a for a in args))

    def im2col(self, x, fh: int, fw: int, stride: int, pad: int):
        n, c, h, w = x.shape
        oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
        col = self._xp().empty((c * fh * fw, n * oh * ow), dtype=x.dtype)
        self._launch("im2col", col.size, x, col, fh, fw, stride, pad, oh, ow)
        return col

    def col2im(self, col, shape: tuple, fh: int, fw: int, stride: int, pad: int):
        n, c, h, w = shape
        oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
        xp = self._xp()
        dx = xp.empty((c, n, h, w), dtype=col.dtype)  # channel-major, as the portable sums
        self._launch("col2im", dx.size, col, dx, fh, fw, stride, pad, oh, ow)
        return xp.transpose(dx, (1, 0, 2, 3))

    def max_pool(self, x, ph: int, pw: int, stride: int, pad: int, oh: int, ow: int):
        xp = self._xp()
        n, c = x.shape[:2]
        out = xp.empty((n, c, oh, ow), dtype=x.dtype)
        arg = xp.empty((n, c, oh, ow), dtype=xp.int32)
        self._launch("max_pool", out.size, x, out, arg, ph, pw, stride, pad)
        return out, arg

    def max_pool_backward(self, dout, arg, x_shape: tuple, ph: int, pw: int, stride: int,
                          pad: int):
        dx = self._xp().empty(tuple(x_shape), dtype=dout.dtype)
        self._launch("max_pool_backward", dx.size, dout, arg, dx, ph, pw, stride, pad)
        return dx
