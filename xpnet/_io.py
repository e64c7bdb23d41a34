"""Atomic file writes: a reader sees the complete old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- reading untrusted files -------------------------------------------------------------------

# Deflate expands data by at most about 1032:1: a compressed stream or zip entry that claims
# more is corrupt, and is rejected before anything that size is allocated.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 22


def read_exact(stream, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes from ``stream``, read in chunks so that memory grows only as data
    arrives (never to what a header merely claims); ValueError naming ``what`` if it ends first."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(min(_CHUNK, n - got))
        if not chunk:
            raise ValueError(f"truncated: {what} needs {n} bytes, the file holds {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# -- .npz archives with a JSON header, read without trusting them -----------------------------

HEADER_KEY = "__xpnet__"


def write_npz(path, header: dict, arrays: dict) -> None:
    """Write ``arrays`` and a JSON ``header`` as an uncompressed ``.npz``, atomically."""
    import json

    import numpy as np

    with atomic_write(path) as f:
        np.savez(f, **{HEADER_KEY: np.array(json.dumps(header))}, **arrays)


def read_npz(path, *, max_bytes: int | None = None):
    """Read an ``.npz`` written by :func:`write_npz`: ``(header dict, {name: ndarray})``.

    Nothing in the file is trusted: every entry must be a ``.npy`` array of a
    plain (non-object) dtype whose header agrees with the entry's size, which
    must agree with the archive's size (or deflate's limit) before a byte of
    data is read; memory is allocated only as data actually arrives, and never
    for what a header merely claims.  Never unpickles.  Anything else raises
    ``ValueError`` naming the file and the problem.
    """
    import json
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    path = Path(path)
    size = path.stat().st_size
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise ValueError(f"unexpected entry {info.filename!r}")
                ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
                if info.file_size > ratio * max(info.compress_size, 1) or info.compress_size > size:
                    raise ValueError(f"entry {info.filename!r} declares {info.file_size} bytes, "
                                     f"more than its {info.compress_size} stored bytes can hold")
                if max_bytes is not None and info.file_size > max_bytes:
                    raise ValueError(f"entry {info.filename!r} is larger than {max_bytes} bytes")
                with zf.open(info) as member:
                    version = npy.read_magic(member)
                    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
                    if version not in readers:
                        raise ValueError(f"entry {info.filename!r}: unsupported .npy version {version}")
                    shape, fortran, dtype = readers[version](member)
                    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
                        raise ValueError(f"entry {info.filename!r}: dtype {dtype} is not a plain "
                                         "numeric or string dtype (object arrays need pickle)")
                    count = 1
                    for n in shape:
                        count *= int(n)
                    nbytes = count * dtype.itemsize
                    if nbytes != info.file_size - member.tell():
                        raise ValueError(f"entry {info.filename!r}: shape {shape} of {dtype} is "
                                         f"{nbytes} bytes, the entry holds "
                                         f"{info.file_size - member.tell()}")
                    data = read_exact(member, nbytes, f"entry {info.filename!r}")
                    if member.read(1):  # reading to the end also makes zipfile check the CRC
                        raise ValueError(f"entry {info.filename!r} has bytes after its data")
                order = "F" if fortran else "C"
                arrays[info.filename[:-4]] = np.frombuffer(data, dtype=dtype).reshape(
                    shape, order=order).copy()
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            TypeError, SyntaxError, NotImplementedError, RuntimeError, KeyError) as exc:
        # (zlib errors are OSErrors; a bad .npy header dict raises ValueError or SyntaxError)
        raise ValueError(f"{path}: not a readable xpnet file: {exc}") from None
    raw = arrays.pop(HEADER_KEY, None)
    if raw is None or raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"{path}: not an xpnet file (no {HEADER_KEY} header)")
    try:
        header = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header: not a JSON object")
    return header, arrays


def remove_stale_temps(path) -> None:
    """Remove temporary files that an :func:`atomic_write` to ``path`` killed midway left behind."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    for stale in directory.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
