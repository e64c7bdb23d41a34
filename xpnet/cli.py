"""Command line: ``xpnet train | evaluate | predict | gradcheck | info`` (and ``python -m
xpnet``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import platform
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from . import __version__, _cli_models, distributed, speedups
from ._io import check_writable
from .backend import available_backends, is_gpu_device, self_test, to_device
from .checkpoint import TrainingState, read_training
from .optim import DEFAULT_LR, OPTIMIZERS


def _info(args: argparse.Namespace) -> int:
    print(f"xpnet {__version__} (Python {platform.python_version()}, {platform.platform()})")
    print("backends:")
    backends = available_backends()
    for entry in backends:
        version = entry["version"] or "not installed"
        devices = ", ".join(entry["devices"]) or "-"
        line = f"  {entry['library']:<17} {version:<14} devices: {devices}"
        if entry["note"]:
            line += f"  ({entry['note']})"
        print(line)
    print("fast paths: " + ("\n  ".join(speedups.describe()) if speedups.describe else
                            "none (xpnet/_fast.py is not installed): the portable Array API "
                            "code runs"))
    print(f"distributed: {distributed.describe()}")
    if not (args.check or args.require_gpu):
        return 0
    return _self_tests([d for entry in backends for d in entry["devices"]], args.require_gpu)


def _self_tests(devices: list, require_gpu: bool) -> int:
    """``xpnet info --check``: a tiny kernel and a matrix product on every device listed, one
    line each; exit status 1 if one fails (or, with --require-gpu, if no GPU passed)."""
    print("self-test (an array, an elementwise kernel, a matrix product on each device):")
    failed, gpus_ok = 0, 0
    for name in devices:
        start = time.perf_counter()
        try:
            self_test(name)
        except Exception as exc:  # noqa: BLE001 - every failure is one line, then the next device
            failed += 1
            print(f"  {name:<28} FAILED: {_one_line(exc)}")
            continue
        gpus_ok += is_gpu_device(name)
        print(f"  {name:<28} ok ({time.perf_counter() - start:.2f} s)")
    if require_gpu and not gpus_ok:
        print("xpnet info: error: no GPU passed the self-test (--require-gpu); see the "
              "backends above for why", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _book_batch(dataset: str, n: int, seed: int, data_dir, images: bool = False):
    """The first n training samples of the dataset (flat, or (1, 28, 28) ``images``), or
    seeded random data when it is absent."""
    from .datasets import DatasetNotFoundError, load_mnist

    if dataset != "random":
        try:
            (x, t), _ = load_mnist(dataset, data_dir=data_dir, flatten=not images)
            return x[:n], t[:n], f"the first {n} {dataset} training images"
        except DatasetNotFoundError:
            print(f"note: {dataset} not found (see xpnet train --help for how to get it); "
                  "using seeded random data instead", file=sys.stderr)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *_IMAGE_SHAPE) if images else (n, 784), dtype=np.float64)
    return x.astype(np.float32), rng.integers(0, 10, size=n), f"{n} seeded random samples"


# gradcheck's nets: small enough that every element is checked in seconds (the book's check
# uses TwoLayerNet(784, 50, 10) on 3 samples); the deep net by default in sampled mode.
_GRADCHECK_DEFAULTS = {"mlp": {"hidden": 50, "filters": None, "mode": "full"},
                       "convnet": {"hidden": 10, "filters": 5, "mode": "full"},
                       "deepconvnet": {"hidden": 50, "filters": None, "mode": "sampled"}}


def _random_biases(net, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in net.params:
        if name.startswith("b"):
            shape = tuple(net.params[name].shape)
            net.params[name] = to_device(0.1 * rng.standard_normal(shape), net.device,
                                         dtype=net.dtype)


def _gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import check_gradients

    defaults = _GRADCHECK_DEFAULTS[args.model]
    for flag, value in (("--samples", args.samples), ("--hidden", args.hidden),
                        ("--filters", args.filters)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    choice = NetChoice.of(args.model, [defaults["hidden"] if args.hidden is None else args.hidden],
                          filters=args.filters, seed=args.seed, device=args.device,
                          dtype=args.dtype)
    if choice.filters is None and defaults["filters"] is not None:
        choice = dataclasses.replace(choice, filters=defaults["filters"])
    mode = args.mode or defaults["mode"]
    net = _make_net(choice, conv_init="he")
    x, t, what = _book_batch(args.dataset, args.samples, args.seed, args.data_dir,
                             images=args.model != "mlp")
    hidden = choice.hidden[0]
    shape = {"mlp": f"TwoLayerNet(784, {hidden}, 10)",
             "convnet": f"SimpleConvNet({choice.filters} 5x5 filters, {hidden} hidden)",
             "deepconvnet": f"DeepConvNet({hidden} hidden)"}[args.model]
    print(f"{shape} on {net.device} {net.dtype}, {what}")
    if args.model != "mlp":
        _random_biases(net, args.seed)
        print("(He-initialised weights and biases drawn at random, std 0.1: with zero biases "
              "the images' blank background puts convolution outputs exactly on ReLU's kink, "
              "and with the book's 0.01 weights neighbouring outputs are so close that a "
              "step of h swaps a pooling window's maximum; at either no finite difference "
              "matches a derivative)")
    report = check_gradients(net, to_device(x, net.device, dtype=net.dtype),
                             to_device(t, net.device), mode=mode, seed=args.seed)
    print(report)
    return 0 if report.ok else 1


def _plot(history, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history.epoch
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))

    def curve(ax, values, marker, label):  # (epochs that eval_every skipped left out)
        points = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)

    curve(ax_loss, history.train_loss, "o", "train")
    curve(ax_loss, history.val_loss, "^", "validation")
    curve(ax_loss, history.test_loss, "s", "test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    curve(ax_acc, history.train_accuracy, "o", "train")
    curve(ax_acc, history.val_accuracy, "^", "validation")
    curve(ax_acc, history.test_accuracy, "s", "test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    config = history.config
    fig.suptitle(f"{config.get('net', 'net')}, {config.get('optimizer', '')}"
                 + (f", {config['dataset']}" if config.get("dataset") else ""), fontsize=9)
    _cli_models.save_figure(fig, path)


def _check_output(flag: str, path) -> None:
    """Raise ValueError unless ``path`` can be written: before any data is loaded or any
    epoch runs, so that a finished training is never lost to a typo in a path."""
    check_writable(path, flag)


def _check_distinct_outputs(outputs: dict) -> None:
    """Every file a command writes is its own: two flags naming one file (also as ./X or by
    a link) would leave only the last write.  ValueError naming both flags."""
    seen = {}
    for flag, path in outputs.items():
        if not path:
            continue
        key = _cli_models.file_key(path)
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} name the same file {path!r}: each "
                             "output needs a file of its own")
        seen[key] = flag


def _check_train_paths(args: argparse.Namespace):
    """Check every path ``xpnet train`` was given; returns the checkpoint path (or None) and
    the checkpoint to resume (or None)."""
    for flag in ("save", "history", "plot", "checkpoint", "save_best"):
        if getattr(args, flag):
            _check_output("--" + flag.replace("_", "-"), getattr(args, flag))
    _check_distinct_outputs({"--save": args.save, "--history": args.history,
                             "--plot": args.plot, "--save-best": args.save_best,
                             "--checkpoint" if args.checkpoint else "--resume":
                             args.checkpoint or args.resume})
    resumed = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise ValueError(f"--resume {args.resume}: no such checkpoint file")
        resumed = read_training(args.resume)  # a training checkpoint? (whether it fits: in fit)
    checkpoint = args.checkpoint or args.resume
    if (args.checkpoint and Path(args.checkpoint).exists()
            and (not args.resume or Path(args.resume).resolve() != Path(args.checkpoint).resolve())):
        raise ValueError(f"--checkpoint {args.checkpoint}: the file exists; continue its run with "
                         f"--resume {args.checkpoint}, or move it away")
    if args.plot:
        _cli_models.check_matplotlib("--plot")
    return checkpoint, resumed


_IMAGE_SHAPE = (1, 28, 28)  # MNIST and Fashion-MNIST; load_mnist flattens them to 784
_IMAGE_PIXELS = 28 * 28
_HIDDEN_DEFAULT = {"mlp": [100], "convnet": [100], "deepconvnet": [50]}


@dataclasses.dataclass(frozen=True)
class NetChoice:
    """The net a command's flags ask for (built by :func:`_make_net`)."""

    model: str
    hidden: tuple
    activation: str = "relu"
    filters: int | None = None
    weight_decay: float = 0.0
    dropout: float | None = None
    batchnorm: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def of(cls, model: str, hidden, **flags) -> NetChoice:
        """The choice for ``--model`` with the model's defaults filled in; a flag that does
        not apply to ``model`` is a ValueError naming both."""
        choice = cls(model, tuple(_HIDDEN_DEFAULT[model] if hidden is None else hidden),
                     **flags)
        if choice.filters is not None and model != "convnet":
            raise ValueError(f"--filters applies to --model convnet, not {model}")
        if choice.dropout is not None and model == "convnet":
            raise ValueError("--dropout applies to --model mlp and deepconvnet, not convnet "
                             "(the book's SimpleConvNet has no dropout)")
        if choice.batchnorm and model != "mlp":
            raise ValueError(f"--batchnorm applies to --model mlp, not {model}")
        if model != "mlp" and len(choice.hidden) != 1:
            raise ValueError(f"--model {model} has one hidden layer: give --hidden one size, "
                             f"got {len(choice.hidden)}")
        if model != "mlp" and choice.activation != "relu":
            raise ValueError(f"--activation applies to --model mlp; {model} uses ReLU")
        choice._check_fits_memory()
        return choice

    def weight_count(self) -> int:
        """About how many weights the net has (the hidden layers dominate)."""
        hidden = self.hidden
        if self.model == "convnet":
            filters = 30 if self.filters is None else self.filters
            return filters * 26 + (filters * 144 + 1) * hidden[0] + (hidden[0] + 1) * 10
        if self.model == "deepconvnet":
            return 60000 + (1024 + 1) * hidden[0] + (hidden[0] + 1) * 10
        sizes = [_IMAGE_PIXELS, *hidden, 10]
        return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))

    def _check_fits_memory(self) -> None:
        """A net whose weights alone would not fit in this machine's memory is refused before
        anything is allocated, naming the flags that size it (an allocation the system grants
        lazily could otherwise end the process when the weights are first written)."""
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return
        # Drawn in float64 on the host, then held in the net's dtype (and its gradients).
        need = self.weight_count() * (8 + 2 * (4 if self.dtype == "float32" else 8))
        if need > memory:
            flags = [f"--hidden {' '.join(map(str, self.hidden))}"]
            if self.model == "convnet":
                flags.insert(0, f"--filters {30 if self.filters is None else self.filters}")
            raise ValueError(f"{' and '.join(flags)} ask for a net of "
                             f"{self.weight_count():.3g} weights, about {need / 2**30:.3g} GiB "
                             f"to build and train, more than this machine's "
                             f"{memory / 2**30:.3g} GiB of memory")


def _make_net(choice: NetChoice, conv_init=0.01):
    """The net ``choice`` asks for; ``conv_init`` is SimpleConvNet's weight_init_std (the
    book's 0.01 for training)."""
    from .nets import DeepConvNet, MultiLayerNet, SimpleConvNet, TwoLayerNet

    where = {"seed": choice.seed, "device": choice.device, "dtype": choice.dtype}
    decay = {"weight_decay": choice.weight_decay}
    hidden = choice.hidden
    if choice.model == "convnet":
        filters = 30 if choice.filters is None else choice.filters
        conv = {"filter_num": filters, "filter_size": 5, "pad": 0, "stride": 1}
        return SimpleConvNet(_IMAGE_SHAPE, conv, hidden[0], 10, conv_init, **decay, **where)
    if choice.model == "deepconvnet":
        ratio = {} if choice.dropout is None else {"dropout_ratio": choice.dropout}
        return DeepConvNet(_IMAGE_SHAPE, hidden_size=hidden[0], **ratio, **decay, **where)
    sizes = [_IMAGE_PIXELS, *hidden, 10]
    if (len(hidden) == 1 and choice.activation == "relu" and not choice.weight_decay
            and choice.dropout is None and not choice.batchnorm):
        return TwoLayerNet(*sizes, **where)
    extras = {"use_batchnorm": choice.batchnorm, "use_dropout": choice.dropout is not None,
              "dropout_ratio": 0.5 if choice.dropout is None else choice.dropout}
    return MultiLayerNet(sizes, activation=choice.activation, **extras, **decay, **where)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``xpnet train`` was asked for, read once from its flags (nothing else reads
    the flags afterwards; the library checks the values when it is given them)."""

    net: NetChoice
    dataset: str
    data_dir: str | None
    download: bool
    epochs: int
    batch_size: int
    optimizer: str
    lr: float | None
    lr_schedule: str  # constant, step or cosine
    schedule_options: tuple  # ((name, value), ...) of the schedule's flags given
    threads: int | None
    eval_every: int
    eval_train: int | None  # samples of the training accuracy (None: all, 0: none)
    validation_split: float | None
    early_stopping: int | None  # patience
    save_best: str | None
    compile: str | bool
    checkpoint: str | None  # where the run's checkpoint is kept (--checkpoint or --resume)
    checkpoint_every: int | None
    resume: TrainingState | None  # the checkpoint --resume names, read (once) here
    save: str | None
    history: str | None
    plot: str | None
    quiet: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str) -> TrainConfig:
        """The configuration of ``args`` on ``device`` (a distributed rank's own); the paths
        are checked here (before any data is read), the rest by the library."""
        checkpoint, resume = _check_train_paths(args)
        if resume is not None:  # --resume alone: the rest from the checkpoint (a new namespace)
            args = _with_checkpoint_flags(args, resume)
        net = NetChoice.of(args.model, args.hidden, activation=args.activation,
                           filters=args.filters, weight_decay=args.weight_decay,
                           dropout=args.dropout, batchnorm=args.batchnorm, seed=args.seed,
                           device=device, dtype=args.dtype)
        return cls(net, args.dataset, args.data_dir, args.download, args.epochs,
                   args.batch_size, args.optimizer, args.lr, args.lr_schedule,
                   _schedule_options(args), args.threads, args.eval_every,
                   _EVAL_TRAIN_DEFAULT[args.model] if args.eval_train is None else args.eval_train,
                   args.validation_split, args.early_stopping, args.save_best,
                   args.compile or False, checkpoint, args.checkpoint_every, resume,
                   args.save, args.history, args.plot, args.quiet)

    def callbacks(self) -> list:
        """The callbacks --early-stopping and --save-best ask for."""
        from .callbacks import EarlyStopping, ModelCheckpoint

        if (self.early_stopping is not None or self.save_best) and self.validation_split is None:
            flag = "--early-stopping" if self.early_stopping is not None else "--save-best"
            raise ValueError(f"{flag} watches the validation set: give --validation-split too")
        found = []
        if self.early_stopping is not None:
            if self.early_stopping < 1:
                raise ValueError(f"--early-stopping must be >= 1, got {self.early_stopping}")
            found.append(EarlyStopping("val_loss", patience=self.early_stopping))
        if self.save_best:
            found.append(ModelCheckpoint(self.save_best, "val_accuracy"))
        return found

    def schedule(self):
        """The :mod:`xpnet.schedules` schedule asked for (None: constant)."""
        from .schedules import make_schedule

        options = dict(self.schedule_options)
        if self.lr_schedule == "step" and "every" not in options:
            options["every"] = max(1, round(self.epochs / 3))
        return make_schedule(self.lr_schedule, **options)

    @property
    def interrupted_note(self) -> str:
        """What a Ctrl-C leaves the user, said after "interrupted"."""
        return (f"; the checkpoint is saved: continue with --resume {self.checkpoint}"
                if self.checkpoint else "")


# The training accuracy of a conv net on all 60,000 images would take longer than a third of
# its epoch; on 10,000 (as many as the test set) it stays a small part.
_EVAL_TRAIN_DEFAULT = {"mlp": None, "convnet": 10000, "deepconvnet": 10000}

_SCHEDULE_FLAGS = {"lr_step": ("every", ("step",)), "lr_gamma": ("gamma", ("step",)),
                   "lr_min_factor": ("min_factor", ("cosine",)),
                   "warmup_epochs": ("warmup_epochs", ("step", "cosine"))}


def _schedule_options(args: argparse.Namespace) -> tuple:
    """The schedule flags given, as the schedule's options; a flag for another schedule (or
    for none) is a ValueError naming both."""
    options = []
    for attr, (option, schedules) in _SCHEDULE_FLAGS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        flag = "--" + attr.replace("_", "-")
        if args.lr_schedule not in schedules:
            raise ValueError(f"{flag} applies to --lr-schedule {' or '.join(schedules)}, not "
                             f"{args.lr_schedule}")
        options.append((option, value))
    return tuple(options)


# Library parameters as xpnet train's flags, for the errors of building its objects.
_FLAGS = {"compile=True": "--compile", "blas_threads": "--threads", "batch_size": "--batch-size",
          "epochs": "--epochs", "checkpoint_every": "--checkpoint-every",
          "weight_decay": "--weight-decay", "dropout_ratio": "--dropout", "seed": "--seed",
          "every": "--lr-step", "gamma": "--lr-gamma", "min_factor": "--lr-min-factor",
          "warmup_epochs": "--warmup-epochs", "eval_every": "--eval-every",
          "eval_train": "--eval-train", "validation_split": "--validation-split"}
_FLAG_WORDS = re.compile(r"(?<![\w.'\[-])(" + "|".join(map(re.escape, _FLAGS)) + r")(?![\w'\]])")


@contextlib.contextmanager
def _as_flags():
    """A ValueError or TypeError of the library, with its parameter names said as the flags
    that set them (``blas_threads must be >= 1`` is ``--threads must be >= 1``)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        message = _FLAG_WORDS.sub(lambda m: _FLAGS[m.group(1)], str(exc))
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def _train(args: argparse.Namespace) -> int:
    dist, device = None, args.device
    if args.distributed:  # under mpiexec: one process per rank, rank 0 prints and writes
        from .distributed import Context, local_device

        dist = Context.world()
        device = local_device(device, dist)
    say = (lambda *a: None) if args.quiet or (dist and not dist.root) else _say
    with dist.together() if dist else contextlib.nullcontext():
        config = TrainConfig.from_args(args, device)
        trainer, data = _train_setup(config, say, dist)
    try:
        with np.errstate(all="ignore"), _as_flags():  # (the Trainer reports divergence itself)
            history = trainer.fit(*data, on_epoch=_epoch_reporter(config, say),
                                  resume=config.resume,
                                  validation_split=config.validation_split)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(config.interrupted_note) from None
    run = history.config
    say(f"steps: {run['step']}; BLAS threads: {run['blas_threads'] or 'the library default'}"
        f" ({run['thread_policy']})")
    with dist.together() if dist else contextlib.nullcontext():
        if dist is None or dist.root:
            _write_outputs(config, trainer.net, history, say)
    if dist is None or dist.root:
        print(f"final test accuracy: {_final_accuracy(trainer, history, say):.4f}")
    return 0


def _final_accuracy(trainer, history, say) -> float:
    """The test accuracy of the net as the run leaves it: after an early stop that restored
    the best epoch's weights, that epoch's (said so), else the last epoch's."""
    from .callbacks import EarlyStopping

    stopped = history.config.get("stopped_early_at")
    for callback in trainer.callbacks:
        if not isinstance(callback, EarlyStopping):
            continue
        if stopped is not None:
            say(f"stopped early after epoch {stopped}: no better validation loss in "
                f"{max(1, callback.patience)} epoch(s)")
        if callback.restore_best and callback.best_epoch is not None:
            record = next(r for r in history.records if r["epoch"] == callback.best_epoch)
            say(f"the model has the weights of epoch {callback.best_epoch}, the best "
                f"validation loss ({callback.best:.4f})")
            return record["test_accuracy"]
    return history.test_accuracy[-1]


def _say(text: str) -> None:
    """Print ``text`` wrapped to the terminal's width (80 columns where there is none), the
    lines after the first indented: a long line never wraps mid-word on an 80-column
    terminal."""
    width = max(40, shutil.get_terminal_size((80, 24)).columns - 1)
    print(textwrap.fill(text, width=width, subsequent_indent="  ", break_long_words=False,
                        break_on_hyphens=False))


def _train_setup(config: TrainConfig, say, dist):
    """The trainer and the data ``config`` asks for.  The net, the optimizer and the trainer
    are built (and so every option checked) before the data is looked for: a bad flag is
    reported as such, also where the dataset is missing."""
    from .datasets import load_mnist
    from .optim import make_optimizer
    from .train import Trainer

    with _as_flags():
        optimizer = make_optimizer(config.optimizer, config.lr)
        net = _make_net(config.net)
        trainer = Trainer(net, optimizer, batch_size=config.batch_size, epochs=config.epochs,
                          seed=config.net.seed, progress=not config.quiet,
                          checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every,
                          compile=config.compile, blas_threads=config.threads,
                          distributed=dist is not None, lr_schedule=config.schedule(),
                          eval_every=config.eval_every, eval_train=config.eval_train,
                          info={"dataset": config.dataset}, callbacks=config.callbacks())
    images = config.net.model != "mlp"
    (x, t), (xt, tt) = load_mnist(config.dataset, data_dir=config.data_dir,
                                  download=config.download, flatten=not images)
    if x.shape[1:] != (_IMAGE_SHAPE if images else (_IMAGE_PIXELS,)):
        raise ValueError(f"the {config.dataset} training images have shape {x.shape[1:]}, "
                         f"expected 28 x 28")
    if config.batch_size > x.shape[0]:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {x.shape[0]} "
                         f"{config.dataset} training images")
    processes = f", {dist.size} processes" if dist else ""
    if config.validation_split is not None:  # (Trainer.fit holds them out)
        processes = f" ({config.validation_split:g} of them held out for validation)" + processes
    schedule = "" if trainer.lr_schedule is None else f", {trainer.lr_schedule!r}"
    say(f"{net!r}, {optimizer!r}{schedule}, batch {config.batch_size}, {config.epochs} "
        f"epoch(s), {x.shape[0]} {config.dataset} training images{processes}")
    for line in net.summary().splitlines():  # (its layers, shapes and parameter counts)
        say(line)
    if config.resume is not None:
        where = config.resume.position
        say(f"resuming {config.resume.path}: epoch {where.get('epoch')}, step "
            f"{where.get('step')} of {math.ceil(x.shape[0] / config.batch_size)}")
    return trainer, (x, t, xt, tt)


# A softmax loss far above a uniform guess's (log 10 for 10 classes) is a run gone wrong.
_EXPLODED_LOSS = 100 * math.log(10)


def _epoch_reporter(config: TrainConfig, say):
    from .train import DivergenceError

    schedule = config.lr_schedule != "constant"

    def figure(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    def report(r):
        # Within 80 columns: "acc" is train / test ("-" where not evaluated that epoch), "val"
        # the validation loss / accuracy; the speed and time go first where it is too long.
        figures = [f"epoch {r['epoch']:>3}/{config.epochs}", f"loss {r['train_loss']:.4f}",
                   f"acc {figure(r['train_accuracy'])} / {figure(r['test_accuracy'])}"]
        if config.validation_split is not None:
            figures.append(f"val {figure(r.get('val_loss'))} / {figure(r.get('val_accuracy'))}")
        timing = [f"{r['seconds']:.2f} s", f"{r['samples_per_second']:,.0f}/s"]
        rate = [f"lr {r['lr']:.3g}"] if schedule else []
        while timing and len("  ".join(figures + timing + rate)) > 79:
            timing.pop()
        say("  ".join(figures + timing + rate))
        if r["train_loss"] > _EXPLODED_LOSS:
            raise DivergenceError(
                f"the training loss reached {r['train_loss']:.3g} in epoch {r['epoch']} (a "
                f"uniform guess scores {math.log(10):.2f}): the learning rate is probably "
                "too high")

    return report


def _write_outputs(config: TrainConfig, net, history, say) -> None:
    if config.save:
        net.save(config.save)
        say(f"saved the model to {config.save}")
    if config.history:
        history.save(config.history)
        say(f"saved the history to {config.history}")
    if config.plot:
        _plot(history, config.plot)
        say(f"saved the curves to {config.plot}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake told in one line (its usage block left to --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _eval_train(value: str):
    """--eval-train: a whole number of samples, ``all`` (None) or ``none`` (0)."""
    if value in ("all", "none"):
        return None if value == "all" else 0
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, all or none, got {value!r}") from None


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset and device options ``train`` and ``evaluate`` share."""
    parser.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="where to look for the dataset first")
    parser.add_argument("--download", action="store_true",
                        help="download the dataset (SHA-256 verified) when it is not found")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N, torch:cpu, jax:cpu, jax:cuda:N, "
                        "array_api_strict:device1, ... (default cpu)")


def _add_schedule_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--lr-schedule", choices=["constant", "step", "cosine"], default="constant",
                    help="how the learning rate changes: constant (default); step: times "
                    "--lr-gamma every --lr-step epochs; cosine: down to --lr-min-factor times "
                    "it by the last step (both after --warmup-epochs of linear warm-up)")
    tr.add_argument("--lr-step", type=int, default=None, metavar="EPOCHS",
                    help="step schedule: epochs between decays (default: a third of --epochs)")
    tr.add_argument("--lr-gamma", type=float, default=None, metavar="G",
                    help="step schedule: the factor of each decay (default 0.1)")
    tr.add_argument("--lr-min-factor", type=float, default=None, metavar="F",
                    help="cosine schedule: the last rate as a fraction of --lr (default 0)")
    tr.add_argument("--warmup-epochs", type=float, default=None, metavar="E",
                    help="a schedule's linear warm-up, in epochs (fractions allowed for cosine)")


def _add_train_arguments(tr: argparse.ArgumentParser) -> None:
    _add_data_arguments(tr)
    tr.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--model", choices=list(_HIDDEN_DEFAULT), default="mlp",
                    help="mlp: TwoLayerNet / MultiLayerNet (default); convnet: the book's "
                    "SimpleConvNet; deepconvnet: the book's DeepConvNet (both on 28x28 images)")
    tr.add_argument("--hidden", type=int, nargs="+", default=None, metavar="N",
                    help="hidden layer sizes (mlp, default 100: TwoLayerNet(784, 100, 10)); "
                    "the affine hidden size of convnet (default 100) and deepconvnet (50)")
    tr.add_argument("--activation", choices=["relu", "sigmoid"], default="relu",
                    help="activation of a deeper mlp (TwoLayerNet uses ReLU)")
    tr.add_argument("--filters", type=int, default=None, metavar="N",
                    help="convnet: the number of 5x5 filters (default 30)")
    tr.add_argument("--weight-decay", type=float, default=0.0, metavar="LAMBDA",
                    help="L2 weight decay on the weights (default 0)")
    tr.add_argument("--dropout", type=float, default=None, metavar="RATIO",
                    help="mlp: dropout of RATIO after each hidden layer; deepconvnet: its "
                    "dropout ratio (default 0.5)")
    tr.add_argument("--batchnorm", action="store_true",
                    help="mlp: batch normalization after each hidden affine layer")
    tr.add_argument("--batch-size", type=int, default=100)
    tr.add_argument("--optimizer", choices=list(OPTIMIZERS), default="momentum")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default: " + ", ".join(
        f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    _add_schedule_arguments(tr)
    tr.add_argument("--eval-every", type=int, default=1, metavar="N",
                    help="evaluate the accuracies every N epochs (and after the last)")
    tr.add_argument("--eval-train", type=_eval_train, default=None, metavar="N|all|none",
                    help="the training accuracy on a fixed sample of N training images, all of "
                    "them, or none (default: all for mlp, 10000 for the conv nets)")
    tr.add_argument("--validation-split", type=float, default=None, metavar="F",
                    help="hold out this fraction of the training set (a seeded draw) and "
                    "report the validation loss and accuracy each epoch")
    tr.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                    help="stop when the validation loss has not improved for PATIENCE epochs, "
                    "and keep the best epoch's weights (needs --validation-split)")
    tr.add_argument("--save-best", metavar="PATH",
                    help="save the model of the epoch with the best validation accuracy "
                    "(needs --validation-split)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save", metavar="PATH", help="save the trained model (.npz)")
    tr.add_argument("--history", metavar="PATH.json", help="save the per-epoch history as JSON")
    tr.add_argument("--plot", metavar="PATH.png",
                    help="save loss and accuracy curves (needs the plot extra)")
    tr.add_argument("--checkpoint", metavar="PATH",
                    help="keep a training checkpoint here (weights, optimizer state, position, "
                    "RNG state), rewritten atomically after every epoch and on Ctrl-C")
    tr.add_argument("--checkpoint-every", type=int, metavar="N",
                    help="also write the checkpoint every N optimizer steps")
    tr.add_argument("--resume", metavar="PATH",
                    help="continue from a checkpoint (with the same flags); the run then "
                    "keeps checkpointing there unless --checkpoint names another file")
    tr.add_argument("--compile", nargs="?", const="epoch", choices=["epoch", "step"],
                    default=None,
                    help="run the training as compiled programs: on JAX devices (jax:cpu, "
                    "jax:cuda:N) each epoch as one loop (the default) or each step; on cuda "
                    "and torch:cuda each step replays one captured CUDA graph")
    tr.add_argument("--distributed", action="store_true",
                    help="data-parallel training over MPI: start it with mpiexec -n N xpnet "
                    "train --distributed (needs pip install 'xpnet[mpi]'); each process takes "
                    "an even share of every batch, rank 0 prints and writes the files")
    tr.add_argument("--threads", type=int, default=None, metavar="N",
                    help="BLAS threads for the CPU's matrix products (default: xpnet decides by "
                    "their size: 1 for small nets, so a busy machine does not stall them, every "
                    "core for large ones; also XPNET_BLAS_THREADS)")
    tr.add_argument("--quiet", action="store_true",
                    help="print only the final test accuracy")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xpnet",
        description="Backprop layers on any Array API backend (NumPy, CuPy, torch, JAX, "
        "array_api_strict).",
    )
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train a network on MNIST or Fashion-MNIST and print the test accuracy",
        description="Train TwoLayerNet (one --hidden size) or a deeper MultiLayerNet (several) "
        "on Fashion-MNIST or MNIST, on any device. The dataset is looked for in --data-dir, "
        "$XPNET_DATA, ~/.cache/xpnet/<name> and /usr/share/datasets/<name> (Debian: apt-get "
        "install dataset-fashion-mnist); --download fetches it from the official mirrors.",
    )
    _add_train_arguments(tr)
    tr.set_defaults(func=_train)
    info = sub.add_parser("info", help="print the version, the backends found and their devices")
    info.add_argument("--check", action="store_true",
                      help="also run a tiny kernel and a matrix product on every device listed "
                      "(exit status 1 if one fails: a missing cuBLAS or NVRTC, a driver too old)")
    info.add_argument("--require-gpu", action="store_true",
                      help="like --check, and exit status 1 unless a GPU passed it")
    info.set_defaults(func=_info)

    _cli_models.add_parsers(sub, _add_data_arguments)

    gc = sub.add_parser(
        "gradcheck",
        help="check a net's backprop against float64 numerical gradients (the book's check)",
        description="Reproduces the book's gradient check: TwoLayerNet(784, 50, 10) on 3 samples "
        "(--model convnet: SimpleConvNet with 5 filters and 10 hidden units on 28x28 images; "
        "deepconvnet: DeepConvNet, sampled), backprop against centered differences on a float64 "
        "host copy, plus the gradients on --device against the host's. Exit status 1 when a "
        "gradient disagrees.",
    )
    gc.add_argument("--model", choices=list(_GRADCHECK_DEFAULTS), default="mlp")
    gc.add_argument("--mode", choices=["full", "sampled", "directional"], default=None,
                    help="every element (default; sampled for deepconvnet), 10 random elements "
                    "per array, or 3 random directions per array")
    gc.add_argument("--device", default="cpu", help="device string (default: cpu)")
    gc.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    gc.add_argument("--dataset", choices=["fashion-mnist", "mnist", "random"],
                    default="fashion-mnist", help="real data when found (default: fashion-mnist)")
    gc.add_argument("--data-dir", default=None, help="where to look for the dataset first")
    gc.add_argument("--samples", type=int, default=3, help="batch size (default: 3)")
    gc.add_argument("--hidden", type=int, default=None,
                    help="hidden units (default: 50; convnet 10)")
    gc.add_argument("--filters", type=int, default=None,
                    help="convnet: the number of filters (default: 5)")
    gc.add_argument("--seed", type=int, default=0)
    gc.set_defaults(func=_gradcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "train":
        args.given = _given_flags(argv)
    return _run(args)


def _given_flags(argv: list) -> set:
    """The ``xpnet train`` options ``argv`` gives (their argparse names), told apart from the
    defaults: parsed again with every default suppressed."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


# A checkpoint's net class as xpnet train's --model.
_MODELS = {"TwoLayerNet": "mlp", "MultiLayerNet": "mlp", "SimpleConvNet": "convnet",
           "DeepConvNet": "deepconvnet"}


def _flags_of_checkpoint(state: TrainingState) -> dict:
    """What a training checkpoint says of the run that wrote it, as ``xpnet train``'s options
    (argparse names): the net, the optimizer and its rate, the schedule, the batch size, the
    seed, the epochs and the dataset (where xpnet train recorded it).  ``{}`` for a net the
    command line does not build."""
    net, trainer = state.net, state.trainer
    model = _MODELS.get(net.get("class")) if isinstance(net, dict) else None
    if model is None or not isinstance(trainer, dict):
        return {}
    flags = {"model": model, "dtype": net.get("dtype"),
             "weight_decay": net.get("weight_decay", 0.0)}
    if model == "mlp":
        flags.update(hidden=list(net["sizes"][1:-1]), activation=net.get("activation", "relu"),
                     batchnorm=bool(net.get("use_batchnorm")),
                     dropout=net.get("dropout_ratio") if net.get("use_dropout") else None)
    elif model == "convnet":
        flags.update(hidden=[net["hidden_size"]], filters=net["conv_param"]["filter_num"])
    else:
        flags.update(hidden=[net["hidden_size"]], dropout=net.get("dropout_ratio"))
    flags.update(seed=trainer.get("seed"), batch_size=trainer.get("batch_size"))
    optimizer = state.optimizer if isinstance(state.optimizer, dict) else {}
    name = str(optimizer.get("type", "")).lower()
    if name in OPTIMIZERS:
        flags.update(optimizer=name, lr=optimizer.get("hyper", {}).get("lr"))
    schedule = trainer.get("lr_schedule") or {}
    kind = {"CosineDecay": "cosine", "StepDecay": "step"}.get(schedule.get("type"), "constant")
    flags["lr_schedule"] = kind
    if kind == "cosine":
        flags.update(lr_min_factor=schedule.get("min_factor"),
                     warmup_epochs=schedule.get("warmup_epochs"))
    elif kind == "step":
        flags.update(lr_step=schedule.get("every"), lr_gamma=schedule.get("gamma"),
                     warmup_epochs=schedule.get("warmup_epochs"))
    config = state.history.get("config", {}) if isinstance(state.history, dict) else {}
    for key in ("epochs", "dataset"):
        if key in config:
            flags[key] = config[key]
    return {k: v for k, v in flags.items() if v is not None or k == "dropout"}


def _with_checkpoint_flags(args: argparse.Namespace,
                           state: TrainingState) -> argparse.Namespace:
    """``--resume`` alone continues the run: ``args`` (a copy) with every option the command
    line did not give taken from the checkpoint.  The options given must agree with it: the
    library refuses a checkpoint of another net, optimizer or batch size."""
    given = getattr(args, "given", None)
    if given is None:  # (built by hand, not by main: every option counts as given)
        return args
    taken = {k: v for k, v in _flags_of_checkpoint(state).items() if k not in given}
    return argparse.Namespace(**{**vars(args), **taken})


def _run(args: argparse.Namespace) -> int:
    """Run a command; the one place that turns an expected failure into one line on stderr
    and an exit status: 2 for a usage, input or file error (and a diverged training),
    130 for Ctrl-C.  (1, "a gradient disagrees", is gradcheck's own answer.)  In a
    distributed run every rank raises the same error, and only rank 0 prints it."""
    from .datasets import DatasetNotFoundError
    from .train import DivergenceError

    name = f"xpnet {args.command}"
    tell = functools.partial(print, file=sys.stderr)
    if getattr(args, "distributed", False):
        from .distributed import rank_from_environment

        if rank_from_environment() not in (None, 0):
            tell = _silent
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        note = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
        tell(f"{name}: interrupted{note}")
        return 130
    except BrokenPipeError:  # xpnet train | head -1: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        tell(f"{name}: error: the output was closed before the command finished")
        return 2
    except DatasetNotFoundError as exc:  # its message says where it looked and what to do
        tell(f"{name}: {exc}")
        return 2
    except (DivergenceError, ValueError, TypeError, OSError) as exc:
        tell(f"{name}: error: {_one_line(exc)}")
        return 2
    except MemoryError as exc:  # a net or batch larger than the machine (--hidden 10**11)
        detail = f" ({_one_line(exc)})" if str(exc) else ""
        tell(f"{name}: error: not enough memory for what was asked{detail}: a smaller net "
             "(--hidden, --filters) or batch (--batch-size)")
        return 2
    except Exception as exc:
        if not getattr(exc, "xpnet_agreed", False):
            raise
        # Another process's error in a distributed run, raised here too (as its class where
        # it can be rebuilt): the same line and status as on the process that had it.
        tell(f"{name}: error: {_one_line(exc)}")
        return 2


def _silent(*args, **kwargs) -> None:
    pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
