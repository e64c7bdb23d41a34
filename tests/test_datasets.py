"""IDX reading, dataset discovery, and the verified download against a 127.0.0.1 server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from xpnet import datasets
from xpnet.datasets import DatasetNotFoundError, DatasetSpec, load_idx, load_mnist

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
         np.float64: 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, CODES[a.dtype.type], a.ndim)
    header += struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_load_idx_round_trip(tmp_path, dtype, gz, rng):
    a = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    out = load_idx(write(tmp_path / "a.idx", idx_bytes(a), gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def _corrupt_cases():
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    huge = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    return {
        "empty": (b"", "shorter than the header"),
        "bad magic": (b"\x01\x02" + good[2:], "magic number"),
        "unknown type code": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "zero dimensions": (good[:3] + b"\x00", "0 dimensions"),
        "truncated dims": (good[:9], "truncated"),
        "truncated data": (good[:-1], "truncated|can hold"),
        "trailing bytes": (good + b"\x00", "after the 24"),
        "terabyte claim": (huge, "header claims shape"),
    }


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case_name", list(_corrupt_cases()))
def test_corrupt_idx_files_raise_value_error(tmp_path, case_name, gz):
    data, match = _corrupt_cases()[case_name]
    with pytest.raises(ValueError, match=match):
        load_idx(write(tmp_path / "bad.idx", data, gz))


def test_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((10, 10), dtype=np.uint8)))
    bad = good[:12] + bytes(b ^ 0xFF for b in good[12:30]) + good[30:]
    with pytest.raises(ValueError, match="corrupt gzip|truncated|can hold|IDX"):
        load_idx(write(tmp_path / "bad.gz", bad, False))


# --- a small fake dataset on disk -----------------------------------------------------------


def make_dataset(directory: Path, rng, n_train=20, n_test=6, gz=True) -> dict:
    """The four MNIST files for random data; returns {file name: bytes as written}."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    written = {}
    for stem, a in arrays.items():
        name = stem + (".gz" if gz else "")
        write(directory / name, idx_bytes(a), gz)
        written[name] = (directory / name).read_bytes()
    return written, arrays


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """Point HOME, XPNET_DATA and the system data directory away from anything real."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XPNET_DATA", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "usr-share-datasets")


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_data_dir(tmp_path, rng, no_default_dirs, gz):
    _, arrays = make_dataset(tmp_path / "d", rng, gz=gz)
    (x, t), (xt, tt) = load_mnist("mnist", data_dir=tmp_path / "d")
    assert x.shape == (20, 784) and x.dtype == np.float32 and xt.shape == (6, 784)
    assert 0.0 <= x.min() and x.max() <= 1.0
    expected = arrays["train-images-idx3-ubyte"][0].reshape(-1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(x[0], expected)
    assert t.dtype == np.int64
    np.testing.assert_array_equal(tt, arrays["t10k-labels-idx1-ubyte"])
    (x, t), _ = load_mnist("mnist", data_dir=tmp_path / "d", normalize=False, flatten=False,
                           one_hot=True)
    assert x.shape == (20, 1, 28, 28) and x.dtype == np.uint8
    assert t.shape == (20, 10) and np.all(t.sum(axis=1) == 1)


def test_load_mnist_finds_xpnet_data_subdir(tmp_path, rng, no_default_dirs, monkeypatch):
    make_dataset(tmp_path / "data" / "fashion-mnist", rng)
    monkeypatch.setenv("XPNET_DATA", str(tmp_path / "data"))
    (x, _), _ = load_mnist("fashion-mnist")
    assert x.shape == (20, 784)


def test_not_found_lists_where_it_looked_and_how_to_get_it(tmp_path, no_default_dirs):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist("fashion-mnist", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg
    assert str(tmp_path / "usr-share-datasets" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*fashion-mnist"):
        load_mnist("cifar")


def test_labels_out_of_range_are_rejected(tmp_path, rng, no_default_dirs):
    make_dataset(tmp_path / "d", rng)
    write(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 11], np.uint8)), True)
    write(tmp_path / "d" / "t10k-images-idx3-ubyte.gz",
          idx_bytes(np.zeros((2, 28, 28), np.uint8)), True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_mnist("mnist", data_dir=tmp_path / "d")


# --- the download, against a local server ---------------------------------------------------


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _pin(monkeypatch, mirrors, written):
    files = {}
    for part, (name, _) in datasets.DATASETS["mnist"].files.items():
        files[part] = (name, hashlib.sha256(written[name]).hexdigest())
    monkeypatch.setitem(datasets.DATASETS, "mnist", DatasetSpec("MNIST", tuple(mirrors), files))


def test_download_verifies_and_writes_atomically(tmp_path, rng, http_server, monkeypatch,
                                                 no_default_dirs):
    root, url = http_server
    written, arrays = make_dataset(root / "good", rng)
    (root / "evil").mkdir()
    for name, data in written.items():  # a mirror serving altered files
        (root / "evil" / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _pin(monkeypatch, [url + "missing/", url + "evil/", url + "good/"], written)

    dest = tmp_path / "cache"
    (x, t), _ = load_mnist("mnist", data_dir=dest, download=True)
    np.testing.assert_array_equal(t, arrays["train-labels-idx1-ubyte"])
    assert sorted(p.name for p in dest.iterdir()) == sorted(written)  # no .part files left
    for name, data in written.items():
        assert (dest / name).read_bytes() == data
    # found on disk the second time: the server is not needed
    (x2, _), _ = load_mnist("mnist", data_dir=dest)
    np.testing.assert_array_equal(x, x2)


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, rng, http_server, monkeypatch,
                                                     no_default_dirs):
    root, url = http_server
    written, _ = make_dataset(root / "good", rng)
    _pin(monkeypatch, [url + "good/"], written)
    name, _ = datasets.DATASETS["mnist"].files["train_images"]
    files = dict(datasets.DATASETS["mnist"].files)
    files["train_images"] = (name, "0" * 64)
    monkeypatch.setitem(datasets.DATASETS, "mnist", DatasetSpec("MNIST", (url + "good/",), files))
    dest = tmp_path / "cache"
    with pytest.raises(ValueError, match="SHA-256 .* does not match the pinned 0000"):
        load_mnist("mnist", data_dir=dest, download=True)
    assert not (dest / name).exists()
    assert not any(p.name.endswith(".part") for p in dest.iterdir())


def test_pinned_checksums_are_the_published_ones():
    # The official SHA-256 of the four gzip files of each dataset, as published by their mirrors.
    assert datasets.DATASETS["mnist"].files["train_images"][1].startswith("440fcabf73cc546f")
    assert datasets.DATASETS["fashion-mnist"].files["train_images"][1].startswith("3aede38d6186")
    for spec in datasets.DATASETS.values():
        assert len({sha for _, sha in spec.files.values()}) == 4
        assert all(len(sha) == 64 for _, sha in spec.files.values())


def test_real_fashion_mnist_when_installed():
    if datasets.find_dataset("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    (x, t), (xt, tt) = load_mnist("fashion-mnist")
    assert x.shape == (60000, 784) and xt.shape == (10000, 784)
    assert np.bincount(t).tolist() == [6000] * 10 and np.bincount(tt).tolist() == [1000] * 10


def test_the_not_found_hint_fetches_the_dataset_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XPNET_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="xpnet train --dataset mnist --download"):
        load_mnist("mnist", data_dir=tmp_path / "none")
