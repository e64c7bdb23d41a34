"""Every validator in xpnet, written once: scalars and options, arrays, targets, images.

A check runs where data enter, once: a user's direct call of a layer (``Layer.forward``'s
wrapper calls the layer's ``check_forward``), a constructor, ``Trainer.fit``'s run boundary.
The math in :mod:`xpnet.layers` and :mod:`xpnet.functional` trusts what it is given.  Each
error is a ``ValueError`` or ``TypeError`` whose message names the argument and the shapes,
dtypes or devices involved.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import (
    DeviceMismatchError,
    device_of,
    dtype_name,
    is_array,
    is_dtype,
    to_device,
    to_numpy,
)

# -- scalars and options -------------------------------------------------------------------------


def is_int(value) -> bool:
    """An int (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_option(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; TypeError (not an int) or ValueError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (TypeError / ValueError naming ``name``)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def real_option(name: str, value, low: float, high: float, *, high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or [low, high)), or an error naming ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (low <= value <= high) or (high_open and value == high) or not math.isfinite(value):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
    return value


# The largest count a file may hold (optimizer steps, dropout draws): saved as int64, with room
# to go on counting (2**63 would overflow the next save).
MAX_COUNT = 2**62

# The most threads a thread count may ask for (a C int holds it; no machine has more cores).
MAX_THREADS = 4096


def thread_count(name: str, value) -> int:
    """``value`` as a thread count: an int in [1, MAX_THREADS] (TypeError / ValueError naming
    ``name``; 10**20 would overflow the C int the BLAS libraries take)."""
    value = positive_int(name, value)
    if value > MAX_THREADS:
        raise ValueError(f"{name} must be at most {MAX_THREADS}, got {value}")
    return value


def check_flag(name: str, value) -> bool:
    """``value`` as a bool: True, False (or a NumPy bool); TypeError naming ``name`` for
    anything else (a string such as "no" is not False)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_nonzero_in(name: str, value: float, dtype) -> None:
    """ValueError naming ``name`` where the positive ``value`` rounds to 0 in ``dtype`` (1e-50
    in float32), where a division by it or by ``sqrt(0 + value)`` would give NaN or inf."""
    name_of = dtype_name(dtype)
    if value > 0 and float(np.asarray(value, dtype=name_of)) == 0.0:
        raise ValueError(f"{name}={value!r} rounds to 0 in {name_of}: give at least "
                         f"{float(np.finfo(name_of).smallest_subnormal)!r}")


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int >= 0 (what numpy.random.default_rng takes), or an error naming it."""
    if not is_int(seed):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be >= 0, got {seed}")
    return int(seed)


def check_protocol(name: str, value, attributes: tuple, what: str) -> None:
    """TypeError naming ``name`` unless ``value`` has every one of ``attributes``."""
    missing = [a for a in attributes if not hasattr(value, a)]
    if missing:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} (it has no "
                        f"{', '.join(missing)})")


# -- arrays --------------------------------------------------------------------------------------


def describe_array(x) -> str:
    return f"{tuple(x.shape)} {dtype_name(x.dtype)}"


def check_floating(xp, x, name: str) -> None:
    """Raise TypeError unless ``x`` has a real floating dtype."""
    if not is_dtype(xp, x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float32 or float64), got {dtype_name(x.dtype)}; "
            f"convert it first, e.g. xp.astype({name}, xp.float32)"
        )


def require_array(x, name: str):
    """``x`` itself if it is an array; else a TypeError naming ``name`` (before a namespace is
    looked up, whose own error for a lone number would not name the argument)."""
    if not is_array(x):
        raise TypeError(f"{name} must be an array, got {type(x).__name__} {x!r:.40}; for a "
                        "number use xpnet.to_device(number, device, dtype=...)")
    return x


def check_array(xp, x, name: str, ndim: int | None = None) -> None:
    """Raise TypeError unless ``x`` is a floating array (of ``ndim`` dimensions, when given)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    check_floating(xp, x, name)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)} and dtype "
                         f"{dtype_name(x.dtype)}")


def all_finite(xp, a) -> bool:
    """Whether every element of ``a`` is finite (two reductions, one host read each)."""
    # max and min propagate NaN and inf: no boolean copy of the data (isfinite(a) would
    # allocate one as large as the data).
    return math.isfinite(float(xp.max(a))) and math.isfinite(float(xp.min(a)))


def check_bias(xp, W, b, expected: str, axis: int) -> None:
    """Raise unless b is a 1-D array of W's dtype with W.shape[axis] elements."""
    check_array(xp, b, "b", ndim=1)
    if b.shape[0] != W.shape[axis]:
        raise ValueError(f"b must have shape {expected} = ({W.shape[axis]},) to match W of shape "
                         f"{tuple(W.shape)}, got b of shape {tuple(b.shape)}")
    if b.dtype != W.dtype:
        raise TypeError(f"W and b must share a dtype, got W {dtype_name(W.dtype)} and "
                        f"b {dtype_name(b.dtype)}")


def check_affine_input(xp, x, W) -> None:
    """Raise unless x is a floating batch (N, D) or (N, d1, ..., dk) with D features for W (D, M)
    (of any real floating dtype: the layer computes in W's, see :func:`in_dtype_of`)."""
    check_array(xp, x, "x")
    if x.ndim < 2:
        raise ValueError(
            f"x must have a batch axis, shape (N, D) or (N, d1, ..., dk), got shape "
            f"{tuple(x.shape)}; for a single sample use xp.reshape(x, (1, -1))"
        )
    n, d = x.shape[0], math.prod(x.shape[1:])
    if n == 0:
        raise ValueError(f"x is an empty batch, shape {tuple(x.shape)}")
    if d != W.shape[0]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} has {d} features per sample, but W of shape "
            f"{tuple(W.shape)} expects {W.shape[0]}"
        )


def check_image_batch(xp, x, name: str, channels: int | None = None) -> None:
    """Raise unless x is a floating (N, C, H, W) batch (with ``channels`` channels, where
    given)."""
    check_array(xp, x, name)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}; load images with load_mnist(..., flatten=False)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} of shape {tuple(x.shape)} has {x.shape[1]} channels, but the "
                         f"layer expects {channels} (axis 1 of (N, C, H, W))")


def check_windows_fit(x_shape, window: tuple, pad: int, out: tuple, who: str) -> None:
    """ValueError naming the shapes unless ``out`` (OH, OW), the windows that fit, is non-empty."""
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"{who}: a {window[0]}x{window[1]} window with pad {pad} does not fit in "
                         f"an input of shape {tuple(x_shape)} (H, W = {tuple(x_shape[2:])})")


def dout_error(where: str, dout, got, library: str, shape: tuple, dtype, device) -> None:
    """Raise the error that says how ``dout`` (described by ``got``) differs from the output."""
    if got is None:
        raise TypeError(f"{where}: dout must be an array like forward's output (shape "
                        f"{tuple(shape)}), got {type(dout).__name__}")
    dout_library, dout_shape, dout_dtype, dout_device = got
    if dout_library != library or dout_device != device:
        raise DeviceMismatchError(
            f"{where}: dout is a {dout_library} array on {dout_device!r}, but forward's output "
            f"was a {library} array on {device!r}; move dout with xpnet.to_device(dout, device)"
        )
    if tuple(dout_shape) != tuple(shape):
        raise ValueError(f"{where}: dout has shape {tuple(dout_shape)}, but forward's output "
                         f"had shape {tuple(shape)}")
    raise TypeError(f"{where}: dout has dtype {dtype_name(dout_dtype)}, but forward's "
                    f"output had {dtype_name(dtype)}")


# -- scores and targets --------------------------------------------------------------------------


def check_logits(xp, x, name: str = "x") -> None:
    """Raise unless ``x`` is a floating array of shape (N, C) with N >= 1 and C >= 1."""
    check_array(xp, x, name)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be scores of shape (N, C) (a batch axis first), got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_label_range(xp, t, num_classes: int, name: str) -> None:
    """Raise ValueError, naming ``name`` and some bad values, unless every label is in [0, C)."""
    # One reduction and one read back to the host; callers on a hot path check once, up front.
    if bool(xp.any((t < 0) | (t >= num_classes))):
        host = to_numpy(t)
        bad = host[(host < 0) | (host >= num_classes)]
        raise ValueError(
            f"{name} holds class labels outside [0, {num_classes}): "
            f"{bad.size} bad value(s), e.g. {bad[:5].tolist()} (min {host.min()}, max {host.max()})"
        )


def check_target_rows(xp, t, name: str) -> None:
    """Raise ValueError, naming ``name``, unless every target weight is finite and >= 0
    (one-hot or probability rows; a negative weight makes the loss negative)."""
    # One reduction and one read back to the host; a trainer checks its rows once, up front.
    low = float(xp.min(t))
    if not low >= 0 or not math.isfinite(float(xp.max(t))):
        raise ValueError(f"{name} holds target rows with negative, NaN or infinite values "
                         f"(min {low}); rows must be one-hot or probabilities, each >= 0")


def check_targets(xp, x, t, *, check_labels: bool = True) -> bool:
    """Validate targets ``t`` against logits ``x`` of shape (N, C): integer labels (N,) in
    [0, C), or one-hot / probability rows (N, C), each >= 0 (the value checks, one host read
    each, only with ``check_labels``).  Returns True for labels, False for rows."""
    n, c = x.shape
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise TypeError(f"t must be an array of labels (N,) or rows (N, C), got {type(t).__name__}")
    if is_dtype(xp, t.dtype, "integral"):
        if t.ndim != 1 or t.shape[0] != n:
            hint = "; flatten it with xp.reshape(t, (-1,))" if t.ndim == 2 and t.shape[1] == 1 else ""
            raise ValueError(
                f"integer labels t must have shape (N,) = ({n},) to match x of shape {(n, c)}, "
                f"got t of shape {tuple(t.shape)}{hint}"
            )
        if check_labels:
            check_label_range(xp, t, c, "t")
        return True
    if is_dtype(xp, t.dtype, "real floating"):
        if tuple(t.shape) != (n, c):
            hint = (f"; float labels of shape ({n},) must be integers: xp.astype(t, xp.int64)"
                    if t.ndim == 1 else "")
            raise ValueError(
                f"one-hot / probability targets t must have x's shape {(n, c)}, "
                f"got t of shape {tuple(t.shape)}{hint}"
            )
        if check_labels:
            check_target_rows(xp, t, "t")
        return False
    raise TypeError(
        "t must hold integer class labels or floating one-hot/probability rows, "
        f"got dtype {dtype_name(t.dtype)}"
    )


def checked_state_value(where: str, value, current, layer=None, name: str = ""):
    """``value`` for a state entry now holding ``current``: an int in [0, MAX_COUNT] for an
    int, else an array of current's shape, finite as it will be held (in current's dtype: 1e300
    is inf in float32), converted to its device and dtype; and what ``layer`` requires of its
    state ``name`` (``Layer.check_state_value``: a variance >= 0)."""
    if isinstance(current, int):
        host = np.asarray(to_numpy(value) if not isinstance(value, (int, np.integer)) else value)
        if (host.shape != () or not np.issubdtype(host.dtype, np.integer) or int(host) < 0
                or int(host) > MAX_COUNT):
            raise ValueError(f"{where} must be an int in [0, {MAX_COUNT}], got "
                             f"{host.dtype} {host.tolist()!r}")
        return int(host)
    host = to_numpy(value) if not isinstance(value, np.ndarray) else value
    if tuple(host.shape) != tuple(current.shape) or not np.issubdtype(host.dtype, np.floating):
        raise ValueError(f"{where} must be a float array of shape {tuple(current.shape)}, got "
                         f"{host.dtype} of shape {tuple(host.shape)}")
    held = as_held(host, dtype_name(current.dtype))
    if not np.all(np.isfinite(held)):
        raise ValueError(f"{where} holds NaN or infinite values in {dtype_name(current.dtype)}")
    check = getattr(layer, "check_state_value", None)
    if callable(check):
        check(name, held, where)
    return to_device(held, device_of(current), dtype=dtype_name(current.dtype), copy=True)


def as_held(host, dtype: str):
    """A host array in the dtype it will be held in (values past its range become inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return host.astype(dtype)
