"""MNIST-family datasets: a validating IDX reader, discovery on disk, a verified download.

Everything here is host NumPy; the trainer moves data to a device once.

Where :func:`load_mnist` looks, in order: ``data_dir`` (and ``data_dir/<name>``),
``$XPNET_DATA`` (and ``$XPNET_DATA/<name>``), ``~/.cache/xpnet/<name>`` and
``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` package
installs there).  A directory counts when it holds all four files, gzipped or not.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checks import check_flag
from ._io import MAX_DEFLATE_RATIO, atomic_write, read_exact

__all__ = ["DATASETS", "DatasetNotFoundError", "fetch", "find_dataset", "load_idx", "load_mnist"]

# IDX type codes -> big-endian dtypes (the format stores every number big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset packages install


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    mirrors: tuple  # base URLs, tried in order
    files: dict  # split part -> (file name, SHA-256 of the .gz as published)
    apt_package: str | None = None
    classes: tuple = tuple(str(d) for d in range(10))  # label k's name


FILE_PARTS = ("train_images", "train_labels", "test_images", "test_labels")

DATASETS = {
    "mnist": DatasetSpec(
        "MNIST",
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        {
            "train_images": ("train-images-idx3-ubyte.gz",
                             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train_labels": ("train-labels-idx1-ubyte.gz",
                             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "test_images": ("t10k-images-idx3-ubyte.gz",
                            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz",
                            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    ),
    "fashion-mnist": DatasetSpec(
        "Fashion-MNIST",
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        {
            "train_images": ("train-images-idx3-ubyte.gz",
                             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            "train_labels": ("train-labels-idx1-ubyte.gz",
                             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "test_images": ("t10k-images-idx3-ubyte.gz",
                            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz",
                            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        },
        apt_package="dataset-fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are in none of the places searched; the message lists them."""


# -- IDX -------------------------------------------------------------------------------------


def _parse_header(head: bytes, path) -> tuple:
    if len(head) < 4:
        raise ValueError(f"{path}: not an IDX file: {len(head)} bytes is shorter than the header")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number starts {head[:2].hex()} (expected 0000)"
        )
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX type code 0x{code:02x} (known: "
            f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    return _IDX_DTYPES[code], ndim


def load_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a NumPy array in native byte order.

    The header is validated before any data is read: the magic number, the
    type code, and the dimensions against the size of the file (for a gzipped
    file, against the most that deflate can expand it).  A truncated file,
    trailing bytes, or a corrupt gzip stream raise ``ValueError`` saying what
    is wrong; nothing larger than the file justifies is ever allocated.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ndarray of the shape the header declares (uint8 for MNIST images and labels).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an IDX file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw

        def read(n: int, what: str) -> bytes:
            try:
                return read_exact(stream, n, what)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None

        try:
            dtype, ndim = _parse_header(stream.read(4), path)
            dims = np.frombuffer(read(4 * ndim, "the dimension list"), ">u4")
            shape = tuple(int(d) for d in dims)
            count = 1
            for d in shape:
                count *= d
            nbytes = count * dtype.itemsize
            header = 4 + 4 * ndim
            limit = size * MAX_DEFLATE_RATIO if compressed else size - header
            if nbytes > limit:
                kind = f"at most {limit} bytes uncompressed" if compressed else f"{limit} bytes"
                raise ValueError(
                    f"{path}: header claims shape {shape} of {dtype.name} = {nbytes} bytes of data, "
                    f"but the file can hold {kind}: truncated or corrupt"
                )
            data = read(nbytes, f"shape {shape} of {dtype.name}")
            extra = stream.read(1)
            if extra:
                raise ValueError(
                    f"{path}: {'more' if compressed else size - header - nbytes} byte(s) of data "
                    f"after the {nbytes} that shape {shape} declares: corrupt"
                )
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip stream: {exc}") from None

    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# -- finding, downloading, loading -------------------------------------------------------------


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    return DATASETS[name]


def _candidate_dirs(name: str, data_dir) -> list:
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("XPNET_DATA")
    if env:
        dirs += [Path(env), Path(env) / name]
    dirs += [Path.home() / ".cache" / "xpnet" / name, SYSTEM_DATA_DIR / name]
    return dirs


def _files_in(directory: Path, spec: DatasetSpec) -> dict | None:
    found = {}
    for part, (gz_name, _) in spec.files.items():
        for candidate in (directory / gz_name, directory / gz_name[: -len(".gz")]):
            if candidate.is_file():
                found[part] = candidate
                break
        else:
            return None
    return found


def find_dataset(name: str, data_dir=None) -> dict | None:
    """Paths of the dataset's four files in the first directory that has them all, or None."""
    spec = _spec(name)
    for directory in _candidate_dirs(name, data_dir):
        files = _files_in(directory, spec)
        if files:
            return files
    return None


def _default_download_dir(name: str, data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("XPNET_DATA")
    return Path(env) / name if env else Path.home() / ".cache" / "xpnet" / name


class _ChecksumMismatch(Exception):
    pass


def _fetch_verified(urls, sha256: str, dest: Path, timeout: float, quiet: bool) -> None:
    """Download the first URL that answers with the right SHA-256 to ``dest``: the file
    appears, complete and verified, or not at all (an atomic write that a mismatch aborts)."""
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_write(dest) as out:
                if not quiet:
                    print(f"downloading {url}", file=sys.stderr)
                digest = hashlib.sha256()
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                if digest.hexdigest() != sha256:
                    raise _ChecksumMismatch(
                        f"{url}: SHA-256 {digest.hexdigest()} does not match the pinned {sha256}")
            return
        except _ChecksumMismatch as exc:
            errors.append(str(exc))
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            errors.append(f"{url}: {exc}")
    raise ValueError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


def fetch(name: str, data_dir=None, *, timeout: float = 60.0, quiet: bool = False) -> dict:
    """Download a dataset's four files from its official mirrors into ``data_dir``
    (default ``$XPNET_DATA/<name>`` or ``~/.cache/xpnet/<name>``).

    Each file is checked against its pinned SHA-256 before it is moved into
    place, so a file in the directory is always complete and verified.  Files
    already there are checked, not fetched again.  Returns the paths.
    """
    spec = _spec(name)
    target = _default_download_dir(name, data_dir)
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, (file_name, sha256) in spec.files.items():
        dest = target / file_name
        if not (dest.is_file() and _sha256(dest) == sha256):
            _fetch_verified([m + file_name for m in spec.mirrors], sha256, dest, timeout, quiet)
        paths[part] = dest
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_mnist(name: str = "mnist", *, data_dir=None, normalize: bool = True, flatten: bool = True,
               one_hot: bool = False, download: bool = False, one_hot_label: bool | None = None):
    """Load MNIST or Fashion-MNIST as host NumPy arrays.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : str or Path, optional
        Looked in first (see the module docstring for the search order), and
        where a download goes.
    normalize : bool, default True
        Images as float32 in [0, 1]; otherwise uint8 in [0, 255].
    flatten : bool, default True
        Images as (N, 784); otherwise (N, 1, 28, 28).
    one_hot : bool, default False
        Labels as float32 one-hot rows (N, 10); otherwise int64 labels (N,).
    one_hot_label : bool, optional
        The book's name for ``one_hot`` (``load_mnist(normalize=True, flatten=True,
        one_hot_label=False)``, as its ``dataset/mnist.py`` has it); the two must agree where
        both are given.
    download : bool, default False
        Fetch the files from the official mirrors when they are not found.

    Returns
    -------
    ((x_train, t_train), (x_test, t_test))

    Raises
    ------
    ValueError
        Unknown name, or a corrupt file.
    DatasetNotFoundError
        Not found and ``download`` is False; the message lists where it looked
        and how to get the data.
    """
    normalize, flatten = check_flag("normalize", normalize), check_flag("flatten", flatten)
    one_hot, download = check_flag("one_hot", one_hot), check_flag("download", download)
    if one_hot_label is not None:
        one_hot_label = check_flag("one_hot_label", one_hot_label)
        if one_hot and not one_hot_label:
            raise ValueError("one_hot=True and one_hot_label=False disagree: give one of them "
                             "(one_hot_label is the book's name for one_hot)")
        one_hot = one_hot_label
    spec = _spec(name)
    files = find_dataset(name, data_dir)
    if files is None:
        if not download:
            looked = "\n  ".join(str(d) for d in _candidate_dirs(name, data_dir))
            apt = (f"  - install it: apt-get install {spec.apt_package} (Debian/Ubuntu)\n"
                   if spec.apt_package else "")
            raise DatasetNotFoundError(
                f"{spec.title} not found; looked in:\n  {looked}\nGet it one of these ways:\n{apt}"
                f"  - download it: load_mnist({name!r}, download=True), or "
                f"xpnet train --dataset {name} --download\n"
                f"  - or put the four IDX files in a directory and pass data_dir= or set XPNET_DATA"
            )
        files = fetch(name, data_dir)
    arrays = {part: load_idx(files[part]) for part in FILE_PARTS}
    out = []
    for split in ("train", "test"):
        x, t = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or t.ndim != 1 or x.shape[0] != t.shape[0]:
            raise ValueError(
                f"{files[split + '_images']}: images of shape {x.shape} and labels of shape "
                f"{t.shape} do not make a (N, rows, cols) / (N,) pair"
            )
        x = x.reshape(x.shape[0], -1) if flatten else x.reshape(x.shape[0], 1, *x.shape[1:])
        if normalize:
            x = x.astype(np.float32) / np.float32(255.0)
        t = t.astype(np.int64)
        if t.size and (t.min() < 0 or t.max() > 9):
            raise ValueError(
                f"{files[split + '_labels']}: labels must lie in [0, 10), found {t.min()}..{t.max()}"
            )
        if one_hot:
            t = np.eye(10, dtype=np.float32)[t]
        out.append((x, t))
    return tuple(out)
