"""Writing sample files so that nothing half-written ever looks finished, and
the same arrays always give the same bytes.

Every file goes through a hidden temporary name, `.NAME.partialPID`, is
flushed to disk and renamed into place. A killed run leaves only such
temporaries; `remove_stale_partials` deletes those whose process is gone.
The .npz writer is numpy's format (np.load reads it; guided-diffusion's
evaluator too) but with a fixed timestamp in the zip entries, which np.savez
takes from the clock: an interrupted-and-resumed run then writes the same
bytes as an uninterrupted one. It streams its arrays in chunks, so 50,000
images need never sit in memory at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import zipfile
from typing import BinaryIO, Callable, Iterable, Sequence, Tuple

import numpy as np

_PARTIAL = re.compile(r"^\..+\.partial(\d+)$")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
_WHY = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system"}


class OutputError(Exception):
    """A sample file that cannot be written; the message names it and says why."""


def describe_os_error(e: OSError, path: str, doing: str = "writing") -> str:
    why = _WHY.get(e.errno) or e.strerror or str(e)
    return f"{why} {doing} {path}"


def partial_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has written nothing yet: a reused pid's leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's running process
    return True


def remove_stale_partials(folder: str) -> list:
    """Delete the temporaries (files or folders) that killed writers left in
    `folder`; those of processes still running stay. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        m = _PARTIAL.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (a crash after it keeps the new name)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return  # not every file system lets a folder be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputExists(OutputError):
    """atomic_write(..., replace=False) found `path` already there."""


def atomic_write(path: str, write: Callable[[BinaryIO], None], replace: bool = True) -> None:
    """write(f) into a temporary, flush it to disk, rename it to `path`.
    OSError (a full disk, no permission) becomes one OutputError naming `path`.
    replace=False: a file already at `path` (or one that appears there while
    this one is written) is kept and OutputExists raised; the new file goes."""
    tmp = partial_name(path)
    try:
        if not replace and os.path.lexists(path):  # before the work, not only after it
            raise OutputExists(f"{path} is already there")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # else a crash after the rename could still lose the data
        if replace:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _rename_no_clobber(tmp: str, path: str) -> None:
    """Rename tmp to path unless path exists, in one step where the file system
    allows it: a hard link fails on an existing name, a rename would replace it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExists(f"{path} is already there") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                           errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):  # no hard links here (FAT, some FUSE): check, then rename
            raise OutputExists(f"{path} is already there") from None
        os.replace(tmp, path)


Member = Tuple[str, np.dtype, Tuple[int, ...], Iterable[np.ndarray]]


def write_npz(f: BinaryIO, members: Sequence[Member], comment: bytes = b"") -> None:
    """An uncompressed .npz of `members`: (name, dtype, shape, chunks), where
    the chunks, concatenated along the first axis, make the array. `comment`
    goes into the zip's archive comment (at most 65,535 bytes), which np.load
    does not read."""
    if len(comment) > 0xFFFF:
        raise ValueError(f"a zip comment holds at most 65535 bytes, got {len(comment)}")
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.comment = comment
        for name, dtype, shape, chunks in members:
            dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, {
                    "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": shape})
                rows = 0
                for chunk in chunks:
                    chunk = np.asarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"{name}: a chunk of {chunk.dtype} {chunk.shape} in "
                                         f"an array of {dtype} {shape}")
                    out.write(np.ascontiguousarray(chunk).tobytes())
                    rows += len(chunk)
                if rows != (shape[0] if shape else 1):
                    raise ValueError(f"{name}: chunks hold {rows} rows, the shape says {shape}")


def npz_members(*arrays: np.ndarray) -> list:
    """Members for write_npz named as np.savez names positional arrays."""
    return [(f"arr_{i}", a.dtype, a.shape, [a] if a.ndim else [a.reshape(1)])
            for i, a in enumerate(arrays)]
