"""What a gradient check found: :class:`GradientCheckReport`, one :class:`GradientRow` per
gradient, and :class:`GradientCheckError`, raised by ``report.raise_if_failed()``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["GradientCheckError", "GradientCheckReport", "GradientRow"]


class GradientCheckError(AssertionError):
    """A gradient check failed; the message is the report's table."""


@dataclass
class GradientRow:
    """The check of one gradient: a parameter of the model or an input of a layer.

    Attributes
    ----------
    name : str
    kind : ``"param"`` or ``"input"``
    checked : int
        Elements (full, sampled) or directions (directional) compared.
    max_abs_error, max_rel_error : float
        Over the checked elements; relative error is ``|a - n| / max(|a| + |n|, tiny)``.
    mean_abs_error : float
        The mean of ``|a - n|`` (what the book's check prints).
    worst : tuple or str
        Where the worst element is (an index, or ``"direction k"``).
    analytic, numerical : float
        The two values there.
    device_error, device_tol : float or None
        ``max |device - host| / max |host|`` of the analytic gradient computed
        on the model's own device and dtype, and the tolerance it was held to.
    problem : str
        Why the row failed outright (a missing gradient, a wrong shape), if it did.
    ok : bool
    """

    name: str
    kind: str
    checked: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    worst: object = None
    analytic: float = math.nan
    numerical: float = math.nan
    device_error: float | None = None
    device_tol: float | None = None
    problem: str = ""
    ok: bool = True


@dataclass(repr=False)
class GradientCheckReport:
    """What a gradient check found; ``str(report)`` is a table of it.

    Attributes
    ----------
    ok : bool
        Every row passed and no probe found anything.
    rows : list of GradientRow
    findings : list of str
        Probe failures: an ignored ``dout``, an argument written into.
    """

    target: str
    mode: str
    device: str
    dtype: str
    h: float
    rtol: float
    atol: float
    rows: list = field(default_factory=list)
    findings: list = field(default_factory=list)
    constants: list = field(default_factory=list)  # inputs passed through, not differentiated

    @property
    def ok(self) -> bool:
        return not self.findings and all(r.ok for r in self.rows)

    @property
    def failed(self) -> list:
        """Names of the failed rows."""
        return [r.name for r in self.rows if not r.ok]

    def __getitem__(self, name: str) -> GradientRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no gradient named {name!r}; the report has {[r.name for r in self.rows]}")

    def note(self, finding: str) -> None:
        """Record a probe finding (once)."""
        if finding not in self.findings:
            self.findings.append(finding)

    def __repr__(self) -> str:
        return str(self)

    def raise_if_failed(self) -> GradientCheckReport:
        """Raise :class:`GradientCheckError` (an AssertionError) showing the table if not ok."""
        if not self.ok:
            raise GradientCheckError(str(self))
        return self

    def __str__(self) -> str:
        head = (
            f"gradient check of {self.target} on {self.device} {self.dtype} "
            f"(mode={self.mode}, h={self.h:g}, rtol={self.rtol:g}, atol={self.atol:.2g}): "
            + ("ok" if self.ok else f"FAILED ({', '.join(self.failed + (['probes'] if self.findings else []))})")
        )
        cols = ("name", "checked", "mean abs err", "max abs err", "max rel err", "worst at",
                "analytic", "numerical", "device err", "status")
        table = [cols]
        for r in self.rows:
            dev = "-" if r.device_error is None else f"{r.device_error:.1e}"
            if r.problem and not r.checked:
                table.append((r.name, "-", "-", "-", "-", "-", "-", "-", dev, "FAIL: " + r.problem))
                continue
            status = "ok" if r.ok else "FAIL" + (f": {r.problem}" if r.problem else "")
            table.append((r.name, str(r.checked), f"{r.mean_abs_error:.2e}",
                          f"{r.max_abs_error:.2e}", f"{r.max_rel_error:.2e}",
                          str(r.worst), f"{r.analytic:.6e}", f"{r.numerical:.6e}", dev, status))
        widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
        lines = [head]
        for row in table:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if self.constants:
            lines.append(f"not differentiated: {', '.join(self.constants)}")
        if self.findings:
            lines.append("probes:")
            lines.extend(f"  - {f}" for f in self.findings)
        return "\n".join(lines)
