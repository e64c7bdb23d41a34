"""Where :mod:`xpnet._fast` (everything that exists only for speed) plugs in.

``xpnet/__init__.py`` imports ``_fast`` (and ``_graphs``, the CUDA graphs) where they can be
imported, once; they fill these slots and ``_fast`` registers its runner with
:mod:`xpnet.runners`.  Every other module reads the slots and falls back to the portable code
where a slot is None, so deleting ``_fast.py`` and ``_graphs.py`` leaves a correct, slower
library.
"""

from __future__ import annotations

import contextlib
import sys

# (x, W, b) -> x @ W + b for x (N, D), W (D, M), b (M,) of one library, unchecked; or
# NotImplemented for arrays it does not take.
affine = None

# (a, b) -> a @ b for two 2-d arrays of one library, or NotImplemented: every product of the
# layers (xpnet.functional.matmul).  None outside a CUDA-graph capture on CuPy, where
# xpnet._graphs puts its cuBLAS calls on the capture stream here.
matmul = None

# (layer, x) -> the mask of a Dropout layer's next draw for x, or NotImplemented: None outside
# a CUDA-graph capture (xpnet._graphs reads the masks it uploaded for the replays from here)
dropout_mask = None

# (w, col, b) -> w @ col + b[:, None] for a convolution's filters w (FN, K), columns col (K, M)
# and bias b (FN,), unchecked; or NotImplemented
filters = None

# (x, fh, fw, stride, pad) -> functional.im2col's columns (C fh fw, N OH OW), or NotImplemented
im2col = None

# (col, x_shape, fh, fw, stride, pad) -> functional.col2im's dx (the same bits, a transposed
# view of a channel-major array), or NotImplemented
col2im = None

# (x, pool_h, pool_w, stride, pad, oh, ow) -> (out, arg) of max pooling (arg: each window's
# maximum's offset i * pool_w + j, int32), the portable Pooling's arithmetic; or NotImplemented
max_pool = None

# (dout, arg, x_shape, pool_h, pool_w, stride, pad) -> dx of max pooling; or NotImplemented
max_pool_backward = None

# ([layer, ...]) -> [step, ...]: a net's layers as its unchecked steps run them, where some
# neighbours run as one (objects with forward, backward, param_names and has_train_mode)
fuse_layers = None

# (net, x, t, optimizer, checked) -> loss: a plain-SGD step of a Sequential net with the
# update fused into its backward pass (checked: through the layers' checked methods).
sgd_step = None

# (net, sample_shape, batch_size, threads, *, processes_per_node) -> (threads, reason)
thread_policy = None

# (threads) -> a context manager under which the BLAS libraries use ``threads`` threads
blas_threads = None

# () -> int | None: XPNET_BLAS_THREADS (ValueError naming it when it is not a whole number >= 1)
threads_from_environment = None

# () -> [lines]: what the speed module has found on this machine (``xpnet info``)
describe = None

# () -> a context manager for a fit's steps: the allocator keeps freed memory for the next step
# (glibc's mallopt); it yields what it did in words, or None
training_memory = None

# (net, optimizer, mode, batch_size) -> a Runner whose steps replay one captured CUDA graph
# (xpnet._graphs: CuPy's and torch's CUDA devices), or NotImplemented for other devices
graph_steps = None


@contextlib.contextmanager
def using(**values):
    """These slots set to ``values`` for the context, then given back (a runner's own pieces
    while it records or replays a step)."""
    module = sys.modules[__name__]
    old = {k: getattr(module, k) for k in values}
    try:
        for k, v in values.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)
