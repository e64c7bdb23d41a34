"""While a fit runs, memory a step frees stays with the process for the next one (glibc's
mallopt), and what is free is given back afterwards, also when the fit fails."""

from __future__ import annotations

import numpy as np
import pytest

import xpnet
from xpnet import _fast


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_a_fit_keeps_freed_memory_and_gives_it_back_after(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setitem(_fast._state, "glibc", fake)
    x = np.random.default_rng(0).random((64, 5), dtype=np.float32)
    t = np.arange(64) % 3

    def during(record):
        assert fake.calls == [("mallopt", -3, _fast.MMAP_FROM),
                              ("mallopt", -1, _fast.KEEP_FREED)]

    history = xpnet.Trainer(xpnet.MultiLayerNet([5, 4, 3]), xpnet.SGD(0.1), progress=False,
                            epochs=1).fit(x, t, on_epoch=during)
    assert fake.calls[2:] == [("malloc_trim", 0)]  # the free memory back to the system
    assert history.config["allocator"].startswith("glibc: arrays up to 32 MiB")
    fake.calls.clear()
    with pytest.raises(RuntimeError), _fast.training_memory():
        raise RuntimeError("a failed fit")
    assert fake.calls[-1] == ("malloc_trim", 0)  # restored on the way out
    monkeypatch.setenv("XPNET_NO_MALLOC_TUNING", "1")
    fake.calls.clear()
    history = xpnet.Trainer(xpnet.MultiLayerNet([5, 4, 3]), xpnet.SGD(0.1), progress=False,
                            epochs=1).fit(x, t)
    assert fake.calls == [] and history.config["allocator"] == "the system's, as it is"
