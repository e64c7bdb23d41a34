"""The ways to run a fit's training steps, behind one interface, chosen in one place.

A :class:`Runner` advances an epoch from step ``start`` towards step ``stop`` and gives back
how many steps it took and their losses (weighted by batch size, left on the device); it
evaluates accuracy for the Trainer's records.  The Trainer knows nothing else of it:

* :class:`EagerSteps` (here): one step per call, each layer's math without its checks for a
  plain :class:`xpnet.Sequential` (the run's data were checked once, at its start), the
  net's own ``train_step`` for nets that change it;
* the compiled steps (:class:`xpnet.compiled.CompiledSteps`, JAX);
* the fused loop (``xpnet._fast.FusedSteps``, numba; registered by ``xpnet._fast``);
* the data-parallel steps (``xpnet.distributed.DistributedSteps``, MPI).

:func:`choose` asks the factories in :data:`FACTORIES` in order and takes the first runner
one offers; :func:`register` adds a factory (a CUDA-graph runner registers itself the same
way, ahead of the eager steps, without touching the Trainer).
"""

from __future__ import annotations

from .nets import runs_plain_steps
from .optim import Optimizer

__all__ = ["FACTORIES", "EagerSteps", "Runner", "choose", "register"]


class Runner:
    """One way to run a fit's steps (see the module docstring).

    Attributes
    ----------
    name : str
        What ``History.config["step"]`` says of it.
    version : int
        The net's layer list (``net.layers.version``) the runner was built for: when the
        layers are replaced during a fit, the Trainer chooses again.
    """

    name = "layers"

    def __init__(self, net, optimizer, batch_size: int):
        self.net, self.optimizer, self.batch_size = net, optimizer, batch_size
        self.version = layers_version(net)

    def advance(self, run, order, start: int, stop: int) -> tuple:  # pragma: no cover
        """Steps ``start, start + 1, ...`` (at least one, none at or after ``stop``) of the
        epoch whose samples come in ``order`` (an index array on the net's device), on the
        run's data ``run.x``, ``run.t``: ``(steps taken, their losses weighted by batch
        size)``, a 0-d or 1-d array left where it was computed."""
        raise NotImplementedError

    def accuracy(self, x, t, *, batch_size: int) -> float:
        """The net's accuracy on ``(x, t)`` (checked data on its device), in batches."""
        return self.net.accuracy(x, t, batch_size=batch_size)

    def loss(self, x, t, *, batch_size: int) -> float:
        """The net's mean loss on ``(x, t)`` (checked data on its device) in inference mode,
        in batches; one read back at the end."""
        return float(self.loss_sum(x, t, batch_size=batch_size)) / x.shape[0]

    def loss_sum(self, x, t, *, batch_size: int):
        """The sum over the samples of the net's loss on ``(x, t)``: each batch's mean loss
        times its size, left on the device (a 0-d array, or 0.0 for no samples)."""
        total, n = 0.0, x.shape[0]
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            total = total + self.net.loss(x[start:stop, ...], t[start:stop, ...],
                                          **_unchecked_labels(self.net)) * (stop - start)
        return total


def _unchecked_labels(net) -> dict:
    """``check_labels=False`` where ``net.loss`` takes it (the run's labels were checked)."""
    return {"check_labels": False} if getattr(net, "_loss_checks_labels", False) else {}


def layers_version(net) -> int:
    """How often ``net``'s layers were replaced (0 for a net without a :class:`Layers`)."""
    return getattr(getattr(net, "layers", None), "version", 0)


class EagerSteps(Runner):
    """One step per call: a plain :class:`xpnet.Sequential` with an optimizer that keeps
    :meth:`Optimizer.update` takes its unchecked step (the layers' math, the optimizer's
    arithmetic, nothing re-validated); any other net or optimizer its own ``train_step`` (or
    ``loss``, ``gradient`` and the optimizer's ``update``), with every check those make."""

    def __init__(self, net, optimizer, batch_size: int):
        super().__init__(net, optimizer, batch_size)
        # The unchecked step stands in for Sequential's train_step and Optimizer's update:
        # a net or an optimizer that changes either keeps its own.
        if runs_plain_steps(net) and getattr(type(optimizer), "update", None) is Optimizer.update:
            optimizer.check_state_fits(net.params)
            self.step = net.unchecked_step
        elif callable(getattr(net, "train_step", None)):
            self.step = net.train_step
        else:
            self.step = self._loss_gradient_update

    def _loss_gradient_update(self, x, t, optimizer):
        loss, grads = self.net.loss(x, t), self.net.gradient(x, t)
        optimizer.update(self.net.params, grads)
        return loss

    def advance(self, run, order, start: int, stop: int) -> tuple:
        b, take = self.batch_size, run.xp.take
        ids = order[start * b:min((start + 1) * b, run.x.shape[0])]  # in bounds: the standard's
        loss = self.step(take(run.x, ids, axis=0), take(run.t, ids, axis=0), self.optimizer)
        return 1, loss * ids.shape[0]


def _eager(trainer, run):
    return EagerSteps(trainer.net, trainer.optimizer, trainer.batch_size)


def _compiled(trainer, run):
    steps = trainer.compiled_steps  # made (and checked) with the Trainer, kept across fits
    if steps is not None:
        steps.version = layers_version(trainer.net)  # (its programs read the layers afresh)
    return steps


def _distributed(trainer, run):
    team = trainer.team
    return team.steps(trainer.net, trainer.optimizer, trainer.batch_size) \
        if team.distributed else None


# The factories, tried in this order: (trainer, run) -> Runner or None.  The data-parallel
# and compiled runners are asked for (Trainer(distributed=True), compile=...) and come
# first; xpnet._fast registers the fused loop before the eager steps, which take the rest.
FACTORIES: list = [_distributed, _compiled, _eager]


def register(factory, *, before=_eager) -> None:
    """Add a runner factory ``(trainer, run) -> Runner | None``, asked before ``before``
    (by default before the eager steps, which take every run)."""
    if factory not in FACTORIES:
        FACTORIES.insert(FACTORIES.index(before), factory)


def choose(trainer, run) -> Runner:
    """The runner for ``trainer``'s fit of ``run`` (its data checked and on the net's
    device): the first that a factory of :data:`FACTORIES` offers."""
    for factory in FACTORIES:
        runner = factory(trainer, run)
        if runner is not None:
            return runner
    raise AssertionError("the eager steps take every run")  # pragma: no cover
