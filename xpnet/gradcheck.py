"""Gradient checking on the host, in float64.

Numerical gradients are computed with centered differences on host NumPy
arrays; whatever device a model lives on, its values are copied to the host
first (see :mod:`xpnet.backend`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["numerical_gradient"]


def numerical_gradient(f, x, h: float = 1e-5) -> np.ndarray:
    """Centered-difference gradient of a scalar function at ``x``, in float64.

    ``grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h)`` for every element i.

    Parameters
    ----------
    f : callable
        ``f(x) -> scalar`` (a Python number or a 0-d array of any backend).
    x : NumPy array (host), any shape
        A float64 array is perturbed **in place**, one element at a time, and
        restored bit for bit afterwards, so ``f`` may ignore its argument and
        read ``x`` through a closure (the book's ``lambda W: net.loss(x, t)``
        pattern).  Any other dtype (integers included) is first copied to
        float64, and ``f`` then receives and must use that copy.
    h : float, default 1e-5
        Step.  With float64 arithmetic the truncation error is O(h**2) and the
        rounding error O(eps / h); 1e-5 balances them to about 1e-10 relative.

    Returns
    -------
    float64 NumPy array of x's shape.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(
            "numerical_gradient works on host NumPy arrays; got "
            f"{type(x).__module__}.{type(x).__qualname__}: pass xpnet.to_numpy(x) "
            "(and a function of that host copy)"
        )
    if not (isinstance(h, (int, float)) and np.isfinite(h) and h > 0):
        raise ValueError(f"h must be a positive finite number, got {h!r}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
    h = float(h)
    target = x if x.dtype == np.float64 else x.astype(np.float64)
    grad = np.zeros(target.shape, dtype=np.float64)
    for idx in np.ndindex(target.shape):
        old = target[idx]
        try:
            target[idx] = old + h
            f_plus = float(f(target))
            target[idx] = old - h
            f_minus = float(f(target))
        finally:
            target[idx] = old  # restore exactly, even if f raised
        grad[idx] = (f_plus - f_minus) / (2.0 * h)
    return grad
