"""Learning-rate schedules: how the Trainer changes the optimizer's learning rate as it trains.

A schedule is a pure function of where the run is: the learning rate of a step is
``base_lr * schedule.factor(step, steps_per_epoch, total_steps)``, where ``base_lr`` is the
optimizer's ``lr`` when ``fit`` starts, ``step`` counts the run's optimizer steps from 0 and
``total_steps = epochs * steps_per_epoch``.  Nothing else is kept, so a run resumed from a
checkpoint (which records the step) continues its schedule bit-identically, on any backend
and any number of processes, and a compiled JAX step takes the new rate as an argument (no
recompile).

>>> trainer = xpnet.Trainer(net, xpnet.SGD(0.1), epochs=20,
...                         lr_schedule=xpnet.schedules.CosineDecay(warmup_epochs=1))

Schedules whose rate changes only between epochs (``per = "epoch"``, :class:`StepDecay`) are
applied at each epoch's first step; the others at every step.
"""

from __future__ import annotations

import math

from ._checks import is_int, is_real

__all__ = ["Schedule", "StepDecay", "CosineDecay", "SCHEDULES", "make_schedule"]


def _number(name: str, value, low: float, high: float = math.inf, *,
            low_open: bool = False) -> float:
    if not is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low) or value > high:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return value


class Schedule:
    """A learning-rate schedule: ``factor(step, steps_per_epoch, total_steps)`` times the
    base rate, with an optional linear warm-up over the first ``warmup_epochs`` epochs (a
    fraction is allowed: 0.5 is half an epoch's steps) from ``1/W`` of the rate to all of it.

    Subclasses give :meth:`decay` (the factor after the warm-up, from the fraction of the
    decaying part that has passed) and their settings in :meth:`settings`.
    """

    per = "step"  # when the rate can change: "step" or "epoch"

    def __init__(self, *, warmup_epochs: float = 0.0):
        self.warmup_epochs = _number("warmup_epochs", warmup_epochs, 0.0)

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The factor of the base learning rate at optimizer step ``step`` (from 0) of a run
        of ``total_steps`` steps, ``steps_per_epoch`` an epoch; always > 0."""
        warmup = self.warmup_steps(steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        return self.decay(step - warmup, steps_per_epoch, max(1, total_steps - warmup))

    def decay(self, step: int, steps_per_epoch: int, steps: int) -> float:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def config(self) -> dict:
        """What defines the schedule (recorded in ``History.config`` and checkpoints)."""
        return {"type": type(self).__name__, **self.settings(),
                "warmup_epochs": self.warmup_epochs}

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.config() == other.config()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class StepDecay(Schedule):
    """The rate times ``gamma`` every ``every`` epochs (PyTorch's ``StepLR``): epochs 1 to
    ``every`` at the base rate, the next ``every`` at ``gamma`` times it, and so on.  Changes
    between epochs only (after the warm-up, counted from its end)."""

    per = "epoch"

    def __init__(self, every: int = 10, gamma: float = 0.1, *, warmup_epochs: float = 0.0):
        if not is_int(every) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1 (epochs), got {every!r}")
        super().__init__(warmup_epochs=warmup_epochs)
        self.every = int(every)
        self.gamma = _number("gamma", gamma, 0.0, 1.0, low_open=True)
        if self.warmup_epochs != int(self.warmup_epochs):
            raise ValueError(f"StepDecay changes the rate between epochs: warmup_epochs must "
                             f"be a whole number, got {warmup_epochs!r}")

    def factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        epoch = step // steps_per_epoch  # from 0
        warmup = int(self.warmup_epochs)
        if epoch < warmup:
            return (epoch + 1) / warmup
        return self.gamma ** ((epoch - warmup) // self.every)

    def settings(self) -> dict:
        return {"every": self.every, "gamma": self.gamma}


class CosineDecay(Schedule):
    """Cosine decay (Loshchilov and Hutter's SGDR without restarts; PyTorch's
    ``CosineAnnealingLR`` over the whole run) from the base rate to ``min_factor`` times it,
    step by step, after an optional linear warm-up."""

    def __init__(self, min_factor: float = 0.0, *, warmup_epochs: float = 0.0):
        super().__init__(warmup_epochs=warmup_epochs)
        self.min_factor = _number("min_factor", min_factor, 0.0, 1.0)

    def decay(self, step: int, steps_per_epoch: int, steps: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / steps))  # step < steps: cosine > 0
        return self.min_factor + (1.0 - self.min_factor) * cosine

    def settings(self) -> dict:
        return {"min_factor": self.min_factor}


SCHEDULES = {"step": StepDecay, "cosine": CosineDecay}


def make_schedule(name: str, **options) -> Schedule | None:
    """The schedule ``name`` (``"step"``, ``"cosine"`` or ``"constant"``: None, no schedule)
    with ``options``; ValueError naming the choices for another name."""
    if name in (None, "constant", "none"):
        return None
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of "
                         f"{['constant', *SCHEDULES]}")
    return SCHEDULES[name](**options)

