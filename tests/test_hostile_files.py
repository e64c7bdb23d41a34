"""Files can't hurt us: fuzzed IDX files and checkpoints give ValueError and nothing else,
never allocate more than the file justifies, and nothing in the package unpickles."""

from __future__ import annotations

import gzip
import io
import re
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_datasets import idx_bytes

import xpnet
from xpnet.datasets import load_idx

FUZZ_EXAMPLES = {"count": 0}  # reported in the terminal summary
SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROOT = Path(__file__).resolve().parents[1]


def _load_bounded(loader, data: bytes, bound: int):
    """Run loader on a file holding ``data``; return its result or the ValueError it raised.
    Fails on any other exception, or if it allocated more than ``bound`` bytes at its peak."""
    FUZZ_EXAMPLES["count"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            return loader(path)
        except ValueError as exc:
            return exc
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak <= bound, f"allocated {peak} bytes for a {len(data)}-byte file"


def _idx_bound(raw_len: int) -> int:
    # The array, its native-order copy, the read chunks: a few times the data, plus slack.
    return 4 * raw_len + (1 << 20)


# --- IDX ---------------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=4096), st.booleans())
def test_idx_random_bytes(data, gz):
    content = gzip.compress(data) if gz else data
    _load_bounded(load_idx, content, _idx_bound(len(data)))


idx_arrays = st.builds(
    lambda shape, code, seed: (np.random.default_rng(seed).random(shape) * 100).astype(code),
    st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
    st.integers(0, 2**32 - 1),
)


@SETTINGS
@given(idx_arrays, st.data(), st.booleans())
def test_idx_mutated_files(a, data, gz):
    good = idx_bytes(a)
    kind = data.draw(st.sampled_from(["truncate", "flip header", "flip any", "huge dims", "append"]))
    b = bytearray(good)
    header_len = 4 + 4 * a.ndim
    if kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "flip header":
        i = data.draw(st.integers(0, header_len - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "flip any":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "huge dims":
        i = data.draw(st.integers(0, a.ndim - 1))
        b[4 + 4 * i: 8 + 4 * i] = data.draw(st.integers(2**20, 2**32 - 1)).to_bytes(4, "big")
    else:
        b += data.draw(st.binary(min_size=1, max_size=64))
    content = gzip.compress(bytes(b)) if gz else bytes(b)
    out = _load_bounded(load_idx, content, _idx_bound(len(b)))
    if kind in ("truncate", "huge dims", "append"):
        assert isinstance(out, ValueError), kind


def test_idx_claiming_terabytes_is_refused_before_allocating():
    header = bytes([0, 0, 0x08, 3]) + (2**32 - 1).to_bytes(4, "big") * 3
    for content in (header, gzip.compress(header)):
        out = _load_bounded(load_idx, content, 1 << 20)
        assert isinstance(out, ValueError) and "header claims shape" in str(out)


# --- checkpoints -------------------------------------------------------------------------------


def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.npz"
        xpnet.TwoLayerNet(6, 4, 3, weight_init_std=0.5).save(path)
        return path.read_bytes()


GOOD_CHECKPOINT = _checkpoint_bytes()


def _load_net(path):
    return xpnet.TwoLayerNet.load(path)


@SETTINGS
@given(st.binary(max_size=4096))
def test_checkpoint_random_bytes(data):
    assert isinstance(_load_bounded(_load_net, data, 1 << 21), ValueError)


@SETTINGS
@given(st.data())
def test_checkpoint_mutations(data):
    b = bytearray(GOOD_CHECKPOINT)
    kind = data.draw(st.sampled_from(["truncate", "flip", "flip many", "shape"]))
    if kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind in ("flip", "flip many"):
        for _ in range(1 if kind == "flip" else data.draw(st.integers(2, 20))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
    else:  # a .npy header that claims another (possibly enormous) shape, sizes left as they were
        text = bytes(b)
        spots = [m.start(1) for m in re.finditer(rb"'shape': \((\d+)", text)]
        i = data.draw(st.sampled_from(spots))
        digits = re.match(rb"\d+", text[i:]).group(0)
        new = str(data.draw(st.integers(0, 10**15))).encode()[: len(digits)].rjust(len(digits), b"9")
        b[i: i + len(digits)] = new
    out = _load_bounded(_load_net, bytes(b), 1 << 21)
    if kind == "truncate":
        assert isinstance(out, ValueError)


def test_checkpoint_with_an_object_array_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    buf = io.BytesIO()
    np.savez(buf, __xpnet__=np.array("{}"), W1=np.array([Boom()], dtype=object))
    out = _load_bounded(_load_net, buf.getvalue(), 1 << 21)
    assert isinstance(out, ValueError) and "object" in str(out)


def test_nothing_in_the_package_unpickles():
    offenders = []
    for path in sorted((ROOT / "xpnet").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b|\bpickle\.|"
                         r"allow_pickle\s*=\s*True|\bnp\.load\(|\bnumpy\.load\(|torch\.load\(",
                         code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


# -- model files whose header claims more than the file holds --------------------------------


def _model_file(tmp_path, name, config, arrays):
    from xpnet.checkpoint import save_model

    path = tmp_path / name
    save_model(path, config, arrays)
    return path


@pytest.mark.parametrize("hidden", [50_000_000, 10**11])
def test_a_header_claiming_a_huge_net_costs_nothing(tmp_path, hidden):
    small = xpnet.TwoLayerNet(6, 5, 3)
    arrays = {k: np.asarray(v) for k, v in small.params.items()}
    config = {**small.config(), "sizes": [6, hidden, 3]}
    path = _model_file(tmp_path, "huge.npz", config, arrays)
    assert path.stat().st_size < 4096
    tracemalloc.start()
    with pytest.raises(ValueError, match=rf"W1 has shape \(6, 5\), expected \(6, {hidden}\)"):
        xpnet.TwoLayerNet.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # under 1 MiB, not the GiB the header claims
    HOSTILE_PEAKS[f"sizes [6, {hidden}, 3]"] = peak


HOSTILE_PEAKS: dict = {}


def test_a_compressed_member_is_refused_before_it_is_inflated(tmp_path):
    import zipfile

    path = tmp_path / "bomb.npz"
    header = io.BytesIO()
    np.save(header, np.array('{"format": "xpnet-net-1"}'))
    big = io.BytesIO()
    np.save(big, np.zeros(16 << 20, dtype=np.uint8))  # 16 MiB of zeros deflate to ~16 kB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__xpnet__.npy", header.getvalue())
        zf.writestr("W1.npy", big.getvalue())
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    with pytest.raises(ValueError, match="is compressed"):
        xpnet.TwoLayerNet.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    HOSTILE_PEAKS["a 16 MiB deflated member"] = peak


def test_a_member_listed_twice_is_refused(tmp_path):
    import zipfile
    import warnings

    good = tmp_path / "good.npz"
    xpnet.TwoLayerNet(6, 5, 3).save(good)
    path = tmp_path / "twice.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("W1.npy", src.read("W1.npy"))
    with pytest.raises(ValueError, match=r"listed twice: \['W1.npy'\]"):
        xpnet.TwoLayerNet.load(path)


def test_a_deeply_nested_header_is_a_value_error(tmp_path):
    path = tmp_path / "nested.npz"
    from xpnet._io import write_npz

    write_npz(path, {}, {})
    import zipfile

    nested = "[" * 100_000 + "]" * 100_000
    buf = io.BytesIO()
    np.save(buf, np.array(nested))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__xpnet__.npy", buf.getvalue())
    with pytest.raises(ValueError, match="corrupt header"):
        xpnet.TwoLayerNet.load(path)
