"""The third hostile round's library cases: a weight decay that overflows the loss, thread
counts past what a BLAS library takes, and what a divergence is blamed on."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet


def _data(n=40, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(np.float32), rng.integers(0, classes, n)


def test_a_weight_decay_whose_term_is_infinite_is_refused_before_any_step():
    net = xpnet.MultiLayerNet([6, 5, 3], weight_decay=1e308)
    before = {k: np.array(v) for k, v in net.params.items()}
    trainer = xpnet.Trainer(net, xpnet.SGD(0.1), batch_size=10, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"weight_decay=1e\+308 makes the loss's L2 term"):
        trainer.fit(*_data())
    for k, v in before.items():
        np.testing.assert_array_equal(net.params[k], v)


def test_a_divergence_of_a_net_with_weight_decay_names_it_too():
    net = xpnet.MultiLayerNet([6, 5, 3], weight_decay=1e30)
    trainer = xpnet.Trainer(net, xpnet.SGD(1e10), batch_size=10, epochs=3, progress=False)
    with np.errstate(all="ignore"), pytest.raises(xpnet.DivergenceError,
                                                  match="learning rate or the weight decay"):
        trainer.fit(*_data())


@pytest.mark.parametrize("threads", [10**20, 4097, 2**31])
def test_thread_counts_past_a_c_int_are_refused(threads):
    with pytest.raises(ValueError, match=f"blas_threads must be at most 4096, got {threads}"):
        xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), blas_threads=threads)


def test_the_history_records_the_threads_the_blas_library_runs():
    from xpnet import speedups
    if speedups.blas_threads is None:
        pytest.skip("no speed module")
    history = xpnet.Trainer(xpnet.TwoLayerNet(6, 5, 3), xpnet.SGD(0.1), batch_size=10, epochs=1,
                            progress=False, blas_threads=4096).fit(*_data())
    threads = history.config["blas_threads"]
    assert 1 <= threads <= 4096
    if threads < 4096:
        assert "4096 asked, the BLAS library runs at most" in history.config["thread_policy"]
