"""Data-parallel training over MPI: two processes under ``mpiexec -n 2`` train what one
process trains, fail together, checkpoint from rank 0 and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xpnet
from xpnet.distributed import find_mpiexec

MPIEXEC = find_mpiexec()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="MPI is not installed (pip install 'xpnet[mpi]' brings mpi4py and Open MPI)")]

# Open MPI refuses to run as root without these; oversubscribe: 2 ranks even on 1 core.
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy":
       ":oversubscribe", "XPNET_NO_NUMBA": "1"}

# The data and the run every script below shares: 530 samples, so the last batch of 100 has
# 30 (15 per rank), and batch 99 leaves 35 (18 and 17).
COMMON = """
import json, sys
import numpy as np
import xpnet

def data():
    rng = np.random.default_rng(0)
    x = rng.random((530, 20)).astype(np.float64)
    return x, rng.integers(0, 4, 530)

def params(net):
    return {k: np.asarray(v).tolist() for k, v in net.params.items()}

def emit(rank, **values):
    print("RESULT " + json.dumps({"rank": rank, **values}), flush=True)
"""


def _mpirun(script: str, tmp_path, n=2, *args, timeout=240):
    path = tmp_path / "script.py"
    path.write_text(COMMON + textwrap.dedent(script))
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(path), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=tmp_path)


def _results(run) -> dict:
    out = {}
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            value = json.loads(line[len("RESULT "):])
            out[value["rank"]] = value
    assert out, run.stdout + run.stderr
    return out


def _data():
    """The scripts' data (COMMON's data()), in this process."""
    rng = np.random.default_rng(0)
    return rng.random((530, 20)).astype(np.float64), rng.integers(0, 4, 530)


def _single(optimizer, batch, epochs=3, dtype="float64"):
    x, t = _data()
    net = xpnet.MultiLayerNet([20, 16, 4], dtype=dtype, weight_decay=0.01)
    opt = {"sgd": xpnet.SGD(0.1), "adam": xpnet.Adam(0.01)}[optimizer]
    history = xpnet.Trainer(net, opt, batch_size=batch, epochs=epochs, progress=False).fit(
        x, t, x[:100], t[:100])
    return net, history


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", [100, 99])
def test_two_ranks_train_what_one_process_trains(tmp_path, optimizer, batch):
    run = _mpirun(f"""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        # Each rank starts from other weights: rank 0's are broadcast at the start.
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64", weight_decay=0.01, seed=rank)
        if rank:
            net.params["W1"] = net.params["W1"] * 3.0
        opt = {{"sgd": xpnet.SGD(0.1), "adam": xpnet.Adam(0.01)}}["{optimizer}"]
        h = xpnet.Trainer(net, opt, batch_size={batch}, epochs=3, progress=False,
                          distributed=True).fit(x, t, x[:100], t[:100])
        emit(rank, params=params(net), loss=h.train_loss, train=h.train_accuracy,
             test=h.test_accuracy, config=h.config, steps=opt.steps)
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    results = _results(run)
    net, history = _single(optimizer, batch)
    for rank in (0, 1):
        r = results[rank]
        assert r["config"]["processes"] == 2
        assert r["config"]["step"].startswith("distributed (mpi4py")
        assert r["steps"] == 3 * 6
        for key, value in net.params.items():  # the sums run in another order: rounding
            np.testing.assert_allclose(r["params"][key], value, rtol=1e-10, atol=1e-13,
                                       err_msg=f"rank {rank} {key}")
        np.testing.assert_allclose(r["loss"], history.train_loss, rtol=1e-10)
        assert r["train"] == history.train_accuracy and r["test"] == history.test_accuracy
    assert results[0]["params"] == results[1]["params"]  # the same update everywhere


@pytest.mark.parametrize("device", ["array_api_strict", "torch:cpu"])
def test_other_backends_take_the_host_path(tmp_path, device):
    if device.startswith("torch") and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    run = _mpirun(f"""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64", weight_decay=0.01,
                                  device="{device}")
        h = xpnet.Trainer(net, xpnet.Adam(0.01), batch_size=100, epochs=2, progress=False,
                          distributed=True).fit(x, t, x[:100], t[:100])
        emit(rank, params={{k: xpnet.to_numpy(v).tolist() for k, v in net.params.items()}},
             loss=h.train_loss, config=h.config)
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    x, t = _data()
    net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64", weight_decay=0.01)
    history = xpnet.Trainer(net, xpnet.Adam(0.01), epochs=2, progress=False).fit(x, t)
    for r in _results(run).values():
        assert r["config"]["device"].startswith(device)
        for key, value in net.params.items():
            np.testing.assert_allclose(r["params"][key], value, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(r["loss"], history.train_loss, rtol=1e-10)


def test_bad_input_on_one_rank_stops_both_with_its_error(tmp_path):
    run = _mpirun("""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        if rank == 1:
            x[7, 3] = np.nan
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64")
        try:
            xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, distributed=True).fit(x, t)
        except Exception as exc:
            emit(rank, error=f"{type(exc).__name__}: {exc}")
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    errors = {r["error"] for r in _results(run).values()}
    assert errors == {"ValueError: x_train holds NaN or infinite values"}, errors


def test_an_error_in_one_ranks_step_stops_both(tmp_path):
    run = _mpirun("""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64")
        calls = []
        step = net.loss_and_gradient
        def failing(*args, **kwargs):
            calls.append(1)
            if rank == 1 and len(calls) == 4:
                raise TypeError("a layer broke on rank 1")
            return step(*args, **kwargs)
        net.loss_and_gradient = failing
        try:
            xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, distributed=True).fit(x, t)
        except Exception as exc:
            emit(rank, error=f"{type(exc).__name__}: {exc}", calls=len(calls))
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    results = _results(run)
    assert {r["error"] for r in results.values()} == {"TypeError: a layer broke on rank 1"}
    assert results[0]["calls"] == results[1]["calls"] == 4  # both stopped at that step


def test_divergence_is_reported_alike_on_both(tmp_path):
    """(Data that differ between the ranks are refused before the first step: see
    test_ranks_that_disagree_on_the_run_stop_before_the_first_step.)"""
    run = _mpirun("""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        x = x * 1e30  # finite, but every product overflows
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float32")
        try:
            with np.errstate(all="ignore"):
                xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, distributed=True).fit(
                    x.astype(np.float32), t)
        except Exception as exc:
            emit(rank, error=f"{type(exc).__name__}: {exc}")
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    errors = {r["error"] for r in _results(run).values()}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith("DivergenceError: the training loss became") and \
        "on rank 0, the training data reach" in error, error


def test_checkpoint_from_rank_0_resumes_to_the_uninterrupted_result(tmp_path):
    # A 2-rank run stopped after its first epoch (its checkpoint_every=4 checkpoint is written
    # by rank 0 alone), resumed by 2 ranks, and by 1 process: the uninterrupted result.
    script = """
        from mpi4py import MPI
        from xpnet import checkpoint as files
        comm = MPI.COMM_WORLD
        rank, mode = comm.Get_rank(), sys.argv[1]
        writes = []
        save = files.save_training
        files.save_training = lambda *a, **k: writes.append(1) or save(*a, **k)
        x, t = data()
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64")
        trainer = xpnet.Trainer(net, xpnet.Adam(0.01), epochs=3, progress=False,
                                checkpoint="ck.npz", checkpoint_every=4, distributed=True)
        class Stop(Exception):
            pass
        def stop(record):
            raise Stop("stopped after epoch 1")
        try:
            if mode == "first":
                trainer.fit(x, t, on_epoch=stop)
            else:
                trainer.fit(x, t, resume="ck.npz")
        except Stop:
            pass
        emit(rank, params=params(net), writes=len(writes))
        """
    first = _mpirun(script, tmp_path, 2, "first")
    assert first.returncode == 0, first.stderr
    written = _results(first)
    assert written[0]["writes"] > 0 and written[1]["writes"] == 0
    shutil.copy(tmp_path / "ck.npz", tmp_path / "first.npz")
    resumed = _mpirun(script, tmp_path, 2, "resume")
    assert resumed.returncode == 0, resumed.stderr
    (tmp_path / "ck.npz").unlink()
    shutil.copy(tmp_path / "first.npz", tmp_path / "ck.npz")
    alone = _mpirun(script, tmp_path, 1, "resume")
    assert alone.returncode == 0, alone.stderr
    x, t = _data()
    net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64")
    xpnet.Trainer(net, xpnet.Adam(0.01), epochs=3, progress=False).fit(x, t)
    for result in (*_results(resumed).values(), *_results(alone).values()):
        for key, value in net.params.items():
            np.testing.assert_allclose(result["params"][key], value, rtol=1e-10, atol=1e-13)


def test_cli_trains_with_rank_0_printing(tmp_path):
    from test_datasets import make_dataset

    make_dataset(tmp_path / "data", np.random.default_rng(0), n_train=300, n_test=50)
    history = tmp_path / "h.json"
    run = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "xpnet", "train", "--distributed",
         "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "2",
         "--hidden", "20", "--history", str(history)],
        capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("final test accuracy") == 1
    assert run.stdout.count("epoch   2/2") == 1 and "2 processes" in run.stdout
    config = json.loads(history.read_text())["config"]
    assert config["processes"] == 2 and config["step"].startswith("distributed")


def test_cli_error_is_one_line_from_rank_0(tmp_path):
    run = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "xpnet", "train", "--distributed",
         "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--lr", "-1"],
        capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("xpnet train")]
    assert len(lines) == 1 and "lr" in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_cli_refuses_distributed_with_compile_in_one_line(tmp_path):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (--compile needs a JAX device)")
    run = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "xpnet", "train", "--distributed",
         "--dataset", "mnist", "--data-dir", str(tmp_path), "--device", "jax:cpu", "--compile"],
        capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("xpnet train")]
    assert lines == ["xpnet train: error: distributed=True and compile= do not go together: a "
                     "distributed step exchanges gradients between the processes, which a "
                     "compiled loop cannot do"], run.stderr


def test_distributed_without_mpi_runs_as_one_process():
    # Started without mpiexec, a distributed Trainer is a world of one process.
    net, history = _single("sgd", 100, epochs=1)
    x, t = _data()
    alone = xpnet.MultiLayerNet([20, 16, 4], dtype="float64", weight_decay=0.01)
    h = xpnet.Trainer(alone, xpnet.SGD(0.1), epochs=1, progress=False, distributed=True).fit(
        x, t, x[:100], t[:100])
    assert h.config["processes"] == 1
    for key, value in net.params.items():
        np.testing.assert_allclose(alone.params[key], value, rtol=1e-12)


def test_distributed_refuses_compile_and_non_bools():
    net = xpnet.MultiLayerNet([4, 3])
    with pytest.raises(ValueError, match="distributed=True and compile"):
        xpnet.Trainer(net, xpnet.SGD(0.1), compile=True, distributed=True)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        xpnet.Trainer(net, xpnet.SGD(0.1), distributed="yes")


def _gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver: no GPUs
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs CuPy and 2 or more GPUs (the NCCL path)")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_nccl_two_gpus_train_what_one_gpu_trains(tmp_path, optimizer):
    run = _mpirun(f"""
        from mpi4py import MPI
        from xpnet.distributed import local_device
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        device = local_device("cuda")
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64", weight_decay=0.01,
                                  device=device)
        opt = {{"sgd": xpnet.SGD(0.1), "adam": xpnet.Adam(0.01)}}["{optimizer}"]
        h = xpnet.Trainer(net, opt, batch_size=100, epochs=3, progress=False,
                          distributed=True).fit(x, t, x[:100], t[:100])
        emit(rank, params={{k: xpnet.to_numpy(v).tolist() for k, v in net.params.items()}},
             loss=h.train_loss, config=h.config, device=device)
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    results = _results(run)
    net, history = _single(optimizer, 100)
    assert {r["device"] for r in results.values()} == {"cuda:0", "cuda:1"}
    for r in results.values():
        assert r["config"]["step"] == "distributed (NCCL allreduce of a device buffer (CuPy))"
        for key, value in net.params.items():
            np.testing.assert_allclose(r["params"][key], value, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(r["loss"], history.train_loss, rtol=1e-10)


# -- ranks that disagree, interrupts, a killed rank: one error or a stop, never a hang ------

def test_ranks_that_disagree_on_the_run_stop_before_the_first_step(tmp_path):
    """Each way two processes can start different runs (data size, batch size, epochs, seed,
    optimizer, other data of one size, nets of other shapes, a checkpoint on one only) is
    the same ValueError on both, naming what differs, before any step."""
    run = _mpirun("""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        cases = {"x_train": "size", "batch_size": "batch", "epochs": "epochs", "seed": "seed",
                 "optimizer": "optimizer", "x_train ": "data", "net": "net",
                 "checkpoint": "checkpoint"}
        for key, case in cases.items():
            x, t = data()
            other = rank == 1
            net = xpnet.MultiLayerNet([20, 17 if case == "net" and other else 16, 4],
                                      dtype="float64")
            before = params(net)
            opt = xpnet.Adam(0.01) if case == "optimizer" and other else xpnet.SGD(0.1)
            options = dict(batch_size=50 if case == "batch" and other else 100,
                           epochs=3 if case == "epochs" and other else 2,
                           seed=5 if case == "seed" and other else 0,
                           checkpoint=f"ck{rank}.npz" if case == "checkpoint" and other
                           else None)
            if case == "size" and other:
                x, t = x[:500], t[:500]
            if case == "data" and other:
                x = x + 1e-3
            try:
                xpnet.Trainer(net, opt, progress=False, distributed=True, **options).fit(x, t)
                emit(f"{rank}:{case}", case=case, error=None)
            except ValueError as exc:
                emit(f"{rank}:{case}", case=case, error=str(exc), same=params(net) == before)
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    results = _results(run)
    by_case = {}
    for value in results.values():
        by_case.setdefault(value["case"], []).append(value)
    assert len(by_case) == 8, by_case.keys()
    for case, values in by_case.items():
        assert len(values) == 2 and values[0]["error"] == values[1]["error"], values
        assert values[0]["error"] and "disagree on" in values[0]["error"], values
        assert all(v["same"] for v in values), case  # refused before any step


INTERRUPTED = """
import os, signal, time
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
rng = np.random.default_rng(0)
x, t = rng.random((2000, 50)), rng.integers(0, 4, 2000)
net = xpnet.MultiLayerNet([50, 64, 4], dtype="float64")
checkpoint = sys.argv[1] if sys.argv[1] != "none" else None
calls = []
step = net.loss_and_gradient

def stepping(*args, **kwargs):
    calls.append(1)
    if rank == 1 and len(calls) == 20:  # Ctrl-C on rank 1 alone, mid-run
        for _ in range(int(sys.argv[2])):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    return step(*args, **kwargs)

net.loss_and_gradient = stepping
try:
    xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1000, progress=False,
                  distributed=True, checkpoint=checkpoint).fit(x, t)
except KeyboardInterrupt:
    emit(rank, interrupted=True, steps=len(calls))
"""


@pytest.mark.parametrize("checkpoint", [None, "ck.npz"])
def test_a_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, checkpoint):
    run = _mpirun(INTERRUPTED, tmp_path, 2, checkpoint or "none", "1", timeout=120)
    assert run.returncode == 0, run.stderr
    results = _results(run)
    assert results[0]["interrupted"] and results[1]["interrupted"]
    assert results[0]["steps"] == results[1]["steps"] <= 22
    if checkpoint:
        state = xpnet.checkpoint.read_training(tmp_path / checkpoint)
        assert state.position["global_step"] == results[0]["steps"]


def test_a_second_ctrl_c_stops_every_rank_at_once(tmp_path):
    run = _mpirun(INTERRUPTED, tmp_path, 2, "ck.npz", "2", timeout=120)
    assert run.returncode != 0  # every process stopped (MPI_Abort), none left waiting
    assert "interrupted twice: stopping every process" in run.stderr


def test_a_killed_rank_leaves_no_rank_waiting(tmp_path):
    script = INTERRUPTED.replace("os.kill(os.getpid(), signal.SIGINT)",
                                 "os.kill(os.getpid(), signal.SIGKILL)")
    run = _mpirun(script, tmp_path, 2, "none", "1", timeout=120)  # (a hang: the timeout)
    assert run.returncode != 0


def test_a_missing_checkpoint_directory_on_rank_0_stops_both_before_training(tmp_path):
    run = _mpirun("""
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        x, t = data()
        net = xpnet.MultiLayerNet([20, 16, 4], dtype="float64")
        try:
            xpnet.Trainer(net, xpnet.SGD(0.1), progress=False, distributed=True,
                          checkpoint="missing/ck.npz").fit(x, t)
        except ValueError as exc:
            emit(rank, error=str(exc))
        """, tmp_path)
    assert run.returncode == 0, run.stderr
    errors = {r["error"] for r in _results(run).values()}
    assert errors == {"checkpoint missing/ck.npz: the directory 'missing' does not exist"}
