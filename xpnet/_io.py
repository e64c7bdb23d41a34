"""Atomic file writes: a reader sees the complete old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path


TEMP_SUFFIX = ".xpnet-tmp"  # the temporary files of atomic_write, and nothing else, end so


def _temp_pattern(path: Path) -> str:
    return f".{path.name}.*{TEMP_SUFFIX}"


def check_writable(path, name: str) -> None:
    """ValueError naming ``name`` (a flag or parameter) and ``path`` unless a file can be
    written there: not a directory, in a directory that exists and can be written.  Asked
    before a run starts, so that nothing is computed for an output that cannot be kept."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{name} {path}: that is a directory; name a file in it")
    if not parent.is_dir():
        raise ValueError(f"{name} {path}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{name} {path}: cannot write in {str(parent)!r}")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.  Temporary
    files that an earlier write to the same path left behind (a killed process) are removed
    first.  The file gets the permissions the umask gives a new file, as ``open`` would.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 whatever the umask
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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


# -- reading untrusted files -------------------------------------------------------------------

# Deflate expands data by at most about 1032:1: a compressed stream or zip entry that claims
# more is corrupt, and is rejected before anything that size is allocated.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 22
_FIRST_CHUNK = 1 << 16


def read_exact(stream, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes from ``stream``, read in chunks so that memory grows only as data
    arrives (never to what a header merely claims); ValueError naming ``what`` if it ends first."""
    chunks, got, size = [], 0, _FIRST_CHUNK
    while got < n:
        # Chunks that double from 64 KiB: a read asks for (and a gzip stream allocates) no
        # more than about what has arrived already.
        chunk = stream.read(min(size, n - got))
        if not chunk:
            raise ValueError(f"truncated: {what} needs {n} bytes, the file holds {got}")
        chunks.append(chunk)
        got += len(chunk)
        size = min(2 * size, _CHUNK)
    return b"".join(chunks)


def _read_into(stream, n: int, what: str) -> bytearray:
    """Exactly ``n`` bytes from ``stream`` into one writable buffer (the caller has checked
    that ``n`` is no more than the file holds); ValueError naming ``what`` if it ends first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        count = stream.readinto(view[got:got + _CHUNK])
        if not count:
            raise ValueError(f"truncated: {what} needs {n} bytes, the file holds {got}")
        got += count
    return buf


# -- .npz archives with a JSON header, read without trusting them -----------------------------

HEADER_KEY = "__xpnet__"


def write_npz(path, header: dict, arrays: dict) -> None:
    """Write ``arrays`` and a JSON ``header`` as an uncompressed ``.npz``, atomically."""
    import json

    import numpy as np

    with atomic_write(path) as f:
        np.savez(f, **{HEADER_KEY: np.array(json.dumps(header))}, **arrays)


def read_npz(path, *, max_bytes: int | None = None, compressed: bool = False):
    """Read an ``.npz`` written by :func:`write_npz`: ``(header dict, {name: ndarray})``.

    Nothing in the file is trusted: every entry must be a ``.npy`` array of a
    plain (non-object) dtype whose header agrees with the entry's size, which
    must agree with the archive's size before a byte of data is read; memory is
    allocated only as data actually arrives, and never for what a header merely
    claims.  Entries must be stored uncompressed (as :func:`write_npz` writes them),
    so the file's size bounds the memory a read takes, unless ``compressed=True``
    (then deflate's limit bounds it).  Each name appears once.  Never unpickles.
    Anything else raises ``ValueError`` naming the file and the problem.
    """
    import json
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            names = [info.filename for info in zf.infolist()]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"entries listed twice: {twice}")
            arrays = {info.filename[:-4]: _read_member(zf, info, size, max_bytes, compressed)
                      for info in zf.infolist()}
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
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly nested
        raise ValueError(f"{path}: corrupt header: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header: not a JSON object")
    return header, arrays


def _read_member(zf, info, size: int, max_bytes, compressed: bool):
    """One ``.npy`` entry of an archive of ``size`` bytes, checked before its data is read."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    what = f"entry {info.filename!r}"
    if not info.filename.endswith(".npy") or info.is_dir():
        raise ValueError(f"unexpected {what}")
    if info.compress_type != zipfile.ZIP_STORED and not compressed:
        raise ValueError(f"{what} is compressed; xpnet writes its files uncompressed, so that "
                         "their size bounds what they hold")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
    if info.file_size > ratio * max(info.compress_size, 1) or info.compress_size > size:
        raise ValueError(f"{what} declares {info.file_size} bytes, more than its "
                         f"{info.compress_size} stored bytes can hold")
    if max_bytes is not None and info.file_size > max_bytes:
        raise ValueError(f"{what} is larger than {max_bytes} bytes")
    with zf.open(info) as member:
        version = npy.read_magic(member)
        readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{what}: unsupported .npy version {version}")
        shape, fortran, dtype = readers[version](member)
        if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
            raise ValueError(f"{what}: dtype {dtype} is not a plain numeric or string dtype "
                             "(object arrays need pickle)")
        nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
        if nbytes != info.file_size - member.tell():
            raise ValueError(f"{what}: shape {shape} of {dtype} is {nbytes} bytes, the entry "
                             f"holds {info.file_size - member.tell()}")
        # nbytes agrees with the entry's size, which the file's size bounds: one buffer,
        # filled as the data arrives, becomes the array.
        data = _read_into(member, nbytes, what)
        if member.read(1):  # reading to the end also makes zipfile check the CRC
            raise ValueError(f"{what} has bytes after its data")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def remove_stale_temps(path) -> None:
    """Remove temporary files that an :func:`atomic_write` to ``path`` killed midway left behind
    (only files named as atomic_write names them: ``.<name>.<random>.xpnet-tmp``)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    for stale in directory.glob(_temp_pattern(path)):
        with contextlib.suppress(OSError):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
