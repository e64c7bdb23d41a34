"""Gradient checking on the host, in float64, whatever device the model lives on.

How a check runs
----------------
1. The model (a layer or a network) is cloned with every array in it copied to
   the host as float64 NumPy (arrays shared inside the model stay shared in the
   clone).  The same layer/net code then runs on the clone: its analytic
   gradients are compared with centered differences of its loss.  Nothing on
   the caller's model or inputs changes.
2. A second clone stays on the model's own device and dtype (e.g. CuPy
   float32); its analytic gradients are compared with the host float64 ones at
   a tolerance for that dtype, so a bug that only shows on one backend is
   caught too.
3. Probes for the two classic bugs: a ``backward`` that ignores ``dout``, and a
   ``forward``/``backward``/``gradient`` that writes into its arguments.

A net's objective is its loss in training mode (``loss(x, t, train=True)``, with weight
decay), which is what ``gradient`` differentiates.  The layers' state (``state_names``:
dropout's count of masks drawn, batch norm's running statistics) is put back before every
evaluation, so every evaluation draws the same dropout masks as the analytic gradient.

Modes
-----
``"full"``
    every element of every array (2 loss evaluations per element).
``"sampled"``
    ``samples`` random elements of each array (biases too), seeded.
``"directional"``
    ``directions`` random unit directions d per array:
    ``(f(p + h d) - f(p - h d)) / 2h`` against ``<grad, d>``; 2 loss
    evaluations per direction, whatever the size of the array.

Tolerances
----------
A check of one element or direction passes when
``|analytic - numerical| <= atol + rtol * (|analytic| + |numerical|)``.
In float64 a centered difference with step h has truncation error
O(h**2 f''') and rounding error about ``eps |f| / h``.  The defaults, h = 1e-5,
rtol = 1e-6 and ``atol = 100 * eps * max(|f|, 1) / h`` (a hundred times that
rounding floor, about 5e-9 for a loss near 2), pass every correct gradient of a
smooth loss by orders of magnitude and fail any real bug; the relative error
printed for a correct gradient is typically 1e-10 or less.  The one limit is a
kink (ReLU at 0) closer than h to the evaluation point, as in every
finite-difference checker.
"""

from __future__ import annotations

import copy
import inspect
import math
import types
import warnings
from collections.abc import Mapping

import numpy as np

from ._checks import is_real
from .backend import device_context, device_of, dtype_name, is_array, to_device, to_numpy
from .layers import find_params, undeclared_params
from .reports import GradientCheckError, GradientCheckReport, GradientRow

__all__ = [
    "GradientCheckError",
    "GradientCheckReport",
    "GradientRow",
    "check_gradients",
    "check_layer",
    "numerical_gradient",
    "numerical_gradients",
]

EPS64 = float(np.finfo(np.float64).eps)
MODES = ("full", "sampled", "directional")


# -- numerical differentiation ---------------------------------------------------------------


def _central_difference(f, p: np.ndarray, idx, h: float) -> float:
    """(f(p + h e_idx) - f(p - h e_idx)) / 2h, perturbing p in place and restoring it exactly.

    Below float64 (float32, float16) ``old + h`` rounds to the dtype, so the step taken is
    what was actually stored, not 2h."""
    old = p[idx]
    try:
        p[idx] = old + h
        up = p[idx]
        p[idx] = old - h
        down = p[idx]
        if up == old or down == old:  # h below the element's resolution: no step at all
            where = f"[{', '.join(map(str, idx))}]" if idx else ""
            raise ValueError(f"h={h!r} is too small for x{where} = {float(old)!r} in "
                             f"{p.dtype}: x + h rounds to x; use a larger h (or float64)")
        p[idx] = up
        f_plus = f()
        p[idx] = down
        f_minus = f()
    finally:
        p[idx] = old
    step = 2.0 * h if p.dtype == np.float64 else float(up) - float(down)
    return (f_plus - f_minus) / step


def _directional_difference(f, p: np.ndarray, d: np.ndarray, h: float) -> float:
    """(f(p + h d) - f(p - h d)) / 2h, restoring p exactly."""
    old = p.copy()
    try:
        p[...] = old + h * d
        f_plus = f()
        p[...] = old - h * d
        f_minus = f()
    finally:
        p[...] = old
    return (f_plus - f_minus) / (2.0 * h)


def _check_step(h) -> float:
    """``h`` as a float > 0 (a Python or NumPy real number); TypeError or ValueError naming h."""
    if not is_real(h):
        raise TypeError(f"h must be a number, got {type(h).__name__} {h!r}")
    if not (math.isfinite(float(h)) and float(h) > 0):
        raise ValueError(f"h must be a positive finite number, got {h!r}")
    return float(h)


def numerical_gradient(f, x, h: float = 1e-5) -> np.ndarray:
    """Centered-difference gradient of a scalar function at ``x``, in float64.

    ``grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h)`` for every element i.

    Parameters
    ----------
    f : callable
        ``f(x) -> scalar`` (a Python number or a 0-d array of any backend).
    x : NumPy array (host), any shape
        A floating array is perturbed **in place**, one element at a time, and
        restored bit for bit afterwards, so ``f`` may ignore its argument and
        read ``x`` through a closure (the book's
        ``numerical_gradient(lambda W: net.loss(x, t), net.params["W1"])``).
        An integer array is first copied to float64, and ``f`` then receives and
        must use that copy.
    h : float, default 1e-5
        Step.  With float64 arithmetic the truncation error is O(h**2) and the
        rounding error O(eps / h); 1e-5 balances them to about 1e-10 relative.
        A float32 ``x`` (a default net's parameter) is perturbed in float32 and the
        function is evaluated in float32: expect agreement with backprop to about
        1e-2 relative, not 1e-10; for a real check use a float64 net or
        :func:`check_gradients`, which works on a float64 copy.

    Returns
    -------
    float64 NumPy array of x's shape.
    """
    if not callable(f):
        raise TypeError(f"f must be a function f(x) -> scalar, got {type(f).__name__} {f!r} "
                        "(the arguments are numerical_gradient(f, x))")
    if not isinstance(x, np.ndarray):
        raise TypeError(
            "numerical_gradient works on host NumPy arrays; got "
            f"{type(x).__module__}.{type(x).__qualname__}: pass xpnet.to_numpy(x) "
            "(and a function of that host copy)"
        )
    h = _check_step(h)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
    floating = np.issubdtype(x.dtype, np.floating)
    if floating and (not x.flags.writeable or any(
            step == 0 and size > 1 for step, size in zip(x.strides, x.shape))):
        raise ValueError(f"x {x.shape} is read-only or a broadcast view, and numerical_gradient "
                         "perturbs it in place (f may read it through a closure): pass a "
                         "writable array (x.copy(), and a function of that copy)")
    target = x if floating else x.astype(np.float64)
    grad = np.zeros(target.shape, dtype=np.float64)
    for idx in np.ndindex(target.shape):
        grad[idx] = _central_difference(lambda: float(f(target)), target, idx, h)
    return grad


# -- cloning a model -------------------------------------------------------------------------


def _clone(obj, convert):
    """A deep copy of ``obj`` with every array replaced by ``convert(array)``.

    An array reachable twice (a params dict and a layer attribute) is converted
    once, so the clone shares it the same way; ``obj`` itself is not touched.
    """
    memo: dict = {}
    keep = []  # the originals, alive until the copy is done (memo is keyed by id)

    def visit(o):
        if id(o) in memo:
            return
        if is_array(o):
            memo[id(o)] = convert(o)
            keep.append(o)
            return
        if isinstance(o, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)):
            memo[id(o)] = o  # namespaces and classes are shared, never copied
            return
        if isinstance(o, (str, bytes, int, float, complex, bool, type(None))):
            return
        memo[id(o)] = None  # placeholder: visited (removed below)
        keep.append(o)
        if isinstance(o, dict):
            children = list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = list(o)
        else:
            children = list(getattr(o, "__dict__", {}).values())
            for klass in type(o).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    if hasattr(o, slot):
                        children.append(getattr(o, slot))
        for child in children:
            visit(child)

    visit(obj)
    memo = {k: v for k, v in memo.items() if v is not None}
    return copy.deepcopy(obj, memo)


def _host64(a) -> np.ndarray:
    h = to_numpy(a)
    return h.astype(np.float64) if np.issubdtype(h.dtype, np.floating) else h


def _same_place_copy(a):
    return to_device(a, device_of(a), copy=True)


# -- comparing one array's gradient ----------------------------------------------------------


def _check_options(mode, h, rtol, atol, samples, directions):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    h = _check_step(h)
    for name, v in (("rtol", rtol), ("samples", samples), ("directions", directions)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"atol must be a non-negative number or None, got {atol!r}")
    return h


def _numeric_row(row: GradientRow, f, p: np.ndarray, analytic: np.ndarray, *, mode, rng, h,
                 rtol, atol, samples, directions) -> None:
    """Fill ``row`` by comparing ``analytic`` with differences of ``f`` around ``p`` (in place)."""
    if mode == "directional":
        checks = []
        for k in range(directions):
            d = rng.standard_normal(p.shape)
            norm = float(np.linalg.norm(d))
            d = d / norm if norm > 0 else d
            checks.append((f"direction {k}", float(np.sum(analytic * d)),
                           _directional_difference(f, p, d, h)))
    else:
        if mode == "full":
            indices = list(np.ndindex(p.shape))
        else:
            flat = rng.choice(p.size, size=min(samples, p.size), replace=False)
            indices = [tuple(int(i) for i in np.unravel_index(k, p.shape)) for k in np.sort(flat)]
        checks = [(idx, float(analytic[idx]), _central_difference(f, p, idx, h)) for idx in indices]
    worst_score, total = -1.0, 0.0
    for where, a, n in checks:
        err = abs(a - n)
        total += err
        rel = err / max(abs(a) + abs(n), np.finfo(np.float64).tiny)
        passed = err <= atol + rtol * (abs(a) + abs(n))
        row.ok &= passed
        row.max_abs_error = max(row.max_abs_error, err)
        row.max_rel_error = max(row.max_rel_error, rel)
        score = err / (atol + rtol * (abs(a) + abs(n)))  # how far past its own tolerance
        if score > worst_score:
            worst_score, row.worst, row.analytic, row.numerical = score, where, a, n
    row.checked = len(checks)
    row.mean_abs_error = total / len(checks) if checks else 0.0


def _shape_problem(grad, like_shape, what: str) -> str:
    if grad is None:
        return f"no gradient was returned for {what}"
    if not is_array(grad) and not isinstance(grad, (int, float)):
        return f"the gradient for {what} is a {type(grad).__name__}, not an array"
    shape = tuple(getattr(grad, "shape", ()))
    if shape != tuple(like_shape):
        return f"the gradient has shape {shape}, but {what} has shape {tuple(like_shape)}"
    return ""


def _device_compare(row: GradientRow, device_grad, host_grad: np.ndarray, dtype: str,
                    device_rtol: float | None, overall: float = 0.0) -> None:
    """Compare the gradient computed on the model's device with the host float64 one,
    relative to its largest element, or to 1% of the largest gradient element of the whole
    model (``overall``) where that is larger: a gradient that is zero in exact arithmetic
    (a bias before batch normalization) is rounding noise of its neighbours' size."""
    if device_grad is None or row.problem:
        return
    problem = _shape_problem(device_grad, host_grad.shape, row.name + " on the device")
    if problem:
        row.problem, row.ok = problem, False
        return
    eps = float(np.finfo(dtype).eps) if dtype in ("float16", "float32", "float64") else EPS64
    tol = 1e3 * eps if device_rtol is None else float(device_rtol)
    scale = max(float(np.max(np.abs(host_grad))) if host_grad.size else 0.0, 0.01 * overall)
    diff = float(np.max(np.abs(_host64(device_grad) - host_grad))) if host_grad.size else 0.0
    row.device_error = diff / scale if scale > 0 else diff
    row.device_tol = tol
    if not row.device_error <= tol:
        row.ok = False
        row.problem = (f"the {dtype} gradient on the device differs from the float64 host one by "
                       f"{row.device_error:.2e} (relative to its largest element), over {tol:.1e}")


def _state_keeper(obj):
    """A function that puts the state (``state_names``) of ``obj``'s layers (or of ``obj``, a
    layer) back to what it is now.  Layers rebind, never write into, their state arrays."""
    layers = obj.layers.values() if isinstance(getattr(obj, "layers", None), Mapping) else [obj]
    saved = [(layer, name, getattr(layer, name)) for layer in layers
             for name in getattr(layer, "state_names", ())]

    def restore():
        for layer, name, value in saved:
            setattr(layer, name, value)

    return restore


def _training_loss(net):
    """``f(x, t)``: the net's loss in training mode where its ``loss`` takes ``train``."""
    try:
        takes_train = "train" in inspect.signature(net.loss).parameters
    except (TypeError, ValueError):
        takes_train = False
    return (lambda x, t: net.loss(x, t, train=True)) if takes_train else net.loss


def _snapshot(values) -> list:
    return [to_numpy(v) if is_array(v) else v for v in values]


def _mutated(before, values, names) -> list:
    found = []
    for name, b, v in zip(names, before, values):
        if is_array(v) and not np.array_equal(to_numpy(v), b, equal_nan=True):
            found.append(name)
    return found


def _require_finite(named: dict) -> None:
    """Centered differences of NaN or inf are meaningless: say which input holds them."""
    for name, a in named.items():
        if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) \
                and not np.all(np.isfinite(a)):
            raise ValueError(f"{name} holds NaN or infinite values; a gradient check needs finite ones")


def _resolve_atol(atol, f0: float, h: float) -> float:
    # A hundred times the rounding floor of a float64 centered difference, eps * |f| / h.
    return float(atol) if atol is not None else 100.0 * EPS64 * max(abs(f0), 1.0) / h


# -- the pipeline: what a layer check and a net check share ----------------------------------


class _Subject:
    """A layer or a net under check, reduced to what :func:`_run_check` needs.

    ``prepare(rng)`` makes the float64 host clone and returns the objective there (drawing
    what it needs, a layer's dout, from ``rng`` first);
    ``gradients(on_host, report)`` runs backprop on the host clone or on a clone on
    the model's own device (noting any argument it writes into) and returns
    ``{row name: gradient}``; ``targets()`` gives ``{row name: (kind, host array)}``,
    the arrays to perturb; ``probe(report, grads)`` adds the subject's own probes.
    """

    target = ""
    where = None  # the model's Device, or None for Python numbers only
    dtype = "float64"
    constants: list = []

    def prepare(self, rng: np.random.Generator):  # pragma: no cover - interface
        raise NotImplementedError

    def gradients(self, on_host: bool, report: GradientCheckReport) -> dict:  # pragma: no cover
        raise NotImplementedError

    def targets(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def probe(self, report: GradientCheckReport, grads: dict) -> None:
        pass


def _run_check(subject: _Subject, mode: str, seed: int, *, h, rtol, atol, samples, directions,
               device_rtol, raise_on_failure) -> GradientCheckReport:
    """The steps of every check: host analytic vs numerical, device vs host, probes."""
    rng = np.random.default_rng(seed)  # one stream: the subject's draws, then the rows'
    objective = subject.prepare(rng)
    report = GradientCheckReport(subject.target, mode, subject.where.name if subject.where
                                 else "python", subject.dtype, h, rtol,
                                 _resolve_atol(atol, objective(), h))
    grads = subject.gradients(True, report)
    subject.probe(report, grads)
    report.constants = list(subject.constants)
    for name, (kind, p) in subject.targets().items():
        row = GradientRow(name, kind)
        g = grads.get(name)
        row.problem = _shape_problem(g, np.shape(p), name)
        row.ok = not row.problem
        if row.ok:
            _numeric_row(row, objective, p, _host64(g), mode=mode, rng=rng, h=h, rtol=rtol,
                         atol=report.atol, samples=samples, directions=directions)
        report.rows.append(row)
    if subject.where is not None:
        with device_context(subject.where):  # the model's GPU current (CuPy)
            on_device = subject.gradients(False, report)
        overall = max((float(np.max(np.abs(_host64(grads[row.name])), initial=0.0))
                       for row in report.rows if not row.problem), default=0.0)
        for row in report.rows:
            if not row.problem:
                _device_compare(row, on_device.get(row.name), _host64(grads[row.name]),
                                subject.dtype, device_rtol, overall)
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _watched(report: GradientCheckReport, call, values: list, names: list, what):
    """``call()``, noting ``what(name)`` in ``report`` for each of ``values`` (named
    ``names``) that it wrote into."""
    before = _snapshot(values)
    result = call()
    for name in _mutated(before, values, names):
        report.note(what(name))
    return result


# -- layers ----------------------------------------------------------------------------------


def _param_arrays(layer) -> dict:
    """``{name: array}`` of a layer's parameters: attributes (an xpnet.Layer, a book-style
    class), or the values of its ``params`` dict."""
    found = find_params(layer)
    if any(attr is None for attr in found.values()):
        return dict(layer.params)
    return {name: getattr(layer, name) for name in found}


def _param_gradient(layer, name, attr):
    return getattr(layer, attr) if attr is not None else layer.grads.get(name)


def _input_names(layer, n: int) -> list:
    try:
        params = [p.name for p in inspect.signature(layer.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input{i}" for i in range(n)]


def _as_list(grads) -> list:
    return list(grads) if isinstance(grads, (tuple, list)) else [grads]


def _is_float_input(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return is_array(v) and np.issubdtype(np.dtype(dtype_name(v.dtype)), np.floating)


class _LayerSubject(_Subject):
    """A layer: the objective is ``sum(forward(*inputs) * dout)`` for a random dout."""

    def __init__(self, layer, inputs, dout, wrt):
        self.layer, self.inputs, self.dout = layer, list(inputs), dout
        self.target = type(layer).__name__
        arrays = [v for v in [*inputs, *_param_arrays(layer).values()] if is_array(v)]
        self.where = device_of(arrays[0]) if arrays else None
        self.dtype = next((dtype_name(a.dtype) for a in arrays if _is_float_input(a)), "float64")
        self.names = _input_names(layer, len(inputs))
        self.floating = [i for i, v in enumerate(inputs) if _is_float_input(v)]
        if wrt is not None:
            unknown = sorted(set(wrt) - set(self.names))
            if unknown:
                raise ValueError(f"wrt names {unknown} are not inputs of forward{tuple(self.names)}")
        self.wrt = wrt

    def prepare(self, rng):
        self.host = _clone(self.layer, _host64)
        self.restore = _state_keeper(self.host)
        self.host_inputs = [_host64(v) if _is_float_input(v) or is_array(v) else v
                            for v in self.inputs]
        _require_finite({**dict(zip(self.names, self.host_inputs)),
                       **_param_arrays(self.host)})
        out_shape = np.shape(_host64(self.host.forward(*self.host_inputs)))
        self.scalar_out = out_shape == ()
        dout = self.dout
        if dout is None:
            dout = rng.uniform(0.5, 2.0) if self.scalar_out else rng.standard_normal(out_shape)
        # On the host in float64, from any library's array (a CuPy dout too) or a number.
        self.dout = float(to_numpy(dout)) if self.scalar_out else np.asarray(to_numpy(dout),
                                                                              dtype=np.float64)
        def objective():
            self.restore()
            return float(np.sum(_host64(self.host.forward(*self.host_inputs)) * self.dout))

        return objective

    def _backprop(self, layer, inputs, dout, report, restore) -> list:
        """forward then backward(dout), watched for writes into the inputs and dout; the
        layer's state put back (``restore``) first."""
        def run():
            restore()
            layer.forward(*inputs)
            return layer.backward(dout)

        with warnings.catch_warnings():  # (said in the report instead: undeclared_params)
            warnings.simplefilter("ignore", UserWarning)
            returned = _watched(report, run, [*inputs, dout], [*self.names, "dout"],
                                lambda n: f"{'backward' if n == 'dout' else 'forward/backward'} "
                                          f"wrote into its argument {n}")
        for name in undeclared_params(layer):
            report.note(f"backward set d{name} for {name}, which the layer does not declare as "
                        "a parameter (param_names): a net would never update or save it")
        self.returned_tuple = isinstance(returned, (tuple, list))
        return _as_list(returned)

    def gradients(self, on_host, report):
        if on_host:
            layer, inputs, restore = self.host, self.host_inputs, self.restore
            dout = self.dout if self.scalar_out else self.dout.copy()
        else:
            layer = _clone(self.layer, _same_place_copy)
            restore = _state_keeper(layer)
            inputs = [_same_place_copy(v) if is_array(v) else v for v in self.inputs]
            y = layer.forward(*inputs)
            dout = self.dout if self.scalar_out else to_device(self.dout, self.where,
                                                                   dtype=y.dtype)
        returned = self._backprop(layer, inputs, dout, report, restore)
        if on_host:
            self._choose_differentiable(returned, report)
        grads = {self.names[i]: returned[k] for k, i in enumerate(self.diff) if k < len(returned)}
        grads.update({k: _param_gradient(layer, k, attr) for k, attr in find_params(layer).items()})
        return grads

    def _choose_differentiable(self, returned: list, report) -> None:
        # Those asked for; else every floating input when backward returns a tuple, and the
        # first one when it returns a single gradient.
        if self.wrt is not None:
            self.diff = [i for i in self.floating if self.names[i] in self.wrt]
        else:
            self.diff = self.floating if self.returned_tuple else self.floating[:1]
        if len(returned) != len(self.diff):
            report.note(f"backward returned {len(returned)} gradient(s) for the {len(self.diff)} "
                        f"differentiable input(s) {[self.names[i] for i in self.diff]}")
        self.constants = [self.names[i] for i in range(len(self.inputs)) if i not in self.diff]

    def targets(self):
        rows = {self.names[i]: ("input", self.host_inputs[i]) for i in self.diff}
        rows.update({k: ("param", p) for k, p in _param_arrays(self.host).items()})
        return rows

    def probe(self, report, grads):
        """Doubling dout must double every input gradient."""
        doubled = self._backprop(self.host, self.host_inputs, 2.0 * self.dout, report,
                                 self.restore)
        for k, i in enumerate(self.diff[:len(doubled)]):
            a, b = grads.get(self.names[i]), doubled[k]
            if a is None or b is None:
                continue
            a, b = _host64(a), _host64(b)
            if a.shape == b.shape and np.any(a != 0) and not np.allclose(b, 2.0 * a, rtol=1e-10,
                                                                         atol=0):
                report.note(f"backward ignores dout: doubling dout scaled the gradient of "
                            f"{self.names[i]} by {float(np.sum(a * b) / np.sum(a * a)):.4g}, not 2")


def check_layer(layer, *inputs, mode: str = "full", seed: int = 0, dout=None, wrt=None,
                h: float = 1e-5, rtol: float = 1e-6, atol: float | None = None, samples: int = 10,
                directions: int = 3, device_rtol: float | None = None,
                raise_on_failure: bool = False) -> GradientCheckReport:
    """Check a layer's ``backward`` against numerical gradients of its ``forward``.

    Like Chainer's ``check_backward``: a random upstream gradient ``dout`` is
    drawn, and the gradient of ``sum(forward(*inputs) * dout)`` is compared
    with what ``backward(dout)`` returns for every floating input, and with the
    layer's parameter gradients (an :class:`xpnet.Layer`'s ``params``/``grads``, or
    the book's ``W``/``dW`` attribute convention).  A ``backward`` that returns a tuple
    gives one gradient per floating input; one that returns a single array
    gives the first input's, and the inputs after it (labels, one-hot targets)
    are passed through and not differentiated.

    Works on any object with ``forward``/``backward`` written against the
    Array API, on any backend; see the module docstring for what runs where and
    for the tolerances.

    Parameters
    ----------
    layer : object with ``forward(*inputs)`` and ``backward(dout)``
    *inputs : arrays (any backend) or Python numbers
    mode : {"full", "sampled", "directional"}
    seed : int
        Seeds dout, the sampled elements and the directions.
    dout : array-like, optional
        The upstream gradient (host values); random normal by default (a random
        scalar for a layer with a scalar output).
    wrt : sequence of str, optional
        Names of the inputs (as in ``forward``'s signature) that must get a
        gradient; by default the floating inputs ``backward`` returns one for.
    h, rtol, atol : float
        Step and tolerances (module docstring).
    samples, directions : int
        Elements per array in "sampled" mode, directions per array in "directional".
    device_rtol : float, optional
        Tolerance of the device-vs-host comparison (default 1000 ulps of the dtype).
    raise_on_failure : bool, default False
        Raise :class:`GradientCheckError` instead of returning a failed report.

    Returns
    -------
    GradientCheckReport
    """
    if not (callable(getattr(layer, "forward", None)) and callable(getattr(layer, "backward",
                                                                            None))):
        swapped = any(callable(getattr(v, "backward", None)) for v in inputs)
        raise TypeError(f"check_layer's first argument must be a layer with forward() and "
                        f"backward(), got {type(layer).__name__}"
                        + (f" of shape {tuple(layer.shape)}" if hasattr(layer, "shape") else "")
                        + ("; the layer comes first: check_layer(layer, x, ...)" if swapped
                           else ""))
    h = _check_options(mode, h, rtol, atol, samples, directions)
    subject = _LayerSubject(layer, inputs, dout, wrt)
    return _run_check(subject, mode, seed, h=h, rtol=rtol, atol=atol, samples=samples,
                      directions=directions, device_rtol=device_rtol,
                      raise_on_failure=raise_on_failure)


# -- networks --------------------------------------------------------------------------------


def _net_params(net) -> dict:
    params = getattr(net, "params", None)
    if params is None or not hasattr(params, "items"):
        raise TypeError(
            f"{type(net).__name__} has no params mapping; a network checked by check_gradients "
            "needs .params ({name: array}), .loss(x, t) and .gradient(x, t)"
        )
    for attr in ("loss", "gradient"):
        if not callable(getattr(net, attr, None)):
            raise TypeError(f"{type(net).__name__} has no {attr}(x, t) method")
    return params


class _NetSubject(_Subject):
    """A network: the objective is ``loss(x, t)``, the rows are its parameters."""

    def __init__(self, net, x, t):
        params = _net_params(net)
        self.net, self.x, self.t = net, x, t
        self.names = list(params.keys())
        first = params[self.names[0]]
        self.target, self.where, self.dtype = (type(net).__name__, device_of(first),
                                               dtype_name(first.dtype))

    def prepare(self, rng):
        self.host = _clone(self.net, _host64)
        self.restore, loss = _state_keeper(self.host), _training_loss(self.host)
        self.x64, self.t64 = _host64(self.x), _host64(self.t)
        _require_finite({"x": self.x64, "t": self.t64,
                       **{f"params[{k!r}]": v for k, v in self.host.params.items()}})

        def objective():
            self.restore()
            return float(loss(self.x64, self.t64))

        return objective

    def gradients(self, on_host, report):
        if on_host:
            net, x, t = self.host, self.x64, self.t64
            self.restore()
        else:
            net = _clone(self.net, _same_place_copy)
            x, t = (_same_place_copy(v) if is_array(v) else v for v in (self.x, self.t))
        grads = _watched(report, lambda: dict(net.gradient(x, t)), [x, t], ["x", "t"],
                         lambda n: f"gradient() wrote into its argument {n}")
        if on_host:
            extra = sorted(set(grads) - set(self.names))
            if extra:
                report.note(f"gradient() returned keys {extra} that are not parameters")
        return {k: v for k, v in grads.items() if k in self.names}

    def targets(self):
        return {name: ("param", self.host.params[name]) for name in self.names}


def numerical_gradients(net, x, t, h: float = 1e-5) -> dict:
    """Centered-difference gradients of ``net.loss(x, t, train=True)`` for every element of every
    parameter, computed on a float64 host clone of ``net``; ``{name: float64 NumPy array}``.
    ``net``, ``x`` and ``t`` are not changed."""
    h = _check_step(h)
    _net_params(net)
    host = _clone(net, _host64)
    restore, loss = _state_keeper(host), _training_loss(host)
    x64, t64 = _host64(x), _host64(t)

    def objective(_):
        restore()  # the same dropout masks at every evaluation
        return loss(x64, t64)

    # Each host parameter is float64 NumPy: numerical_gradient perturbs it in place.
    return {name: numerical_gradient(objective, p, h) for name, p in host.params.items()}


def check_gradients(net, x, t, mode: str = "full", seed: int = 0, *, h: float = 1e-5,
                    rtol: float = 1e-6, atol: float | None = None, samples: int = 10,
                    directions: int = 3, device_rtol: float | None = None,
                    raise_on_failure: bool = False) -> GradientCheckReport:
    """Check a network's backprop ``gradient(x, t)`` against numerical gradients of ``loss(x, t)``.

    ``net`` follows the protocol of :class:`xpnet.TwoLayerNet`: ``params`` (a
    mapping name -> array), ``loss(x, t)`` (a scalar) and ``gradient(x, t)``
    (a dict keyed like ``params``).  A user's own class works too.  See the
    module docstring for what runs where, the modes and the tolerances; the
    parameters are those of :func:`check_layer`.

    Returns
    -------
    GradientCheckReport
        One row per parameter, e.g. ``report["b1"].max_rel_error``.
    """
    h = _check_options(mode, h, rtol, atol, samples, directions)
    return _run_check(_NetSubject(net, x, t), mode, seed, h=h, rtol=rtol, atol=atol,
                      samples=samples, directions=directions, device_rtol=device_rtol,
                      raise_on_failure=raise_on_failure)
