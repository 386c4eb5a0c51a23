"""Files written so that nothing half-written ever looks finished, and the
facts about files that every reader and writer shares.

Every file adm_fast writes (checkpoints, training state and logs, sample
shards and outputs, run manifests, the autotune and verify tables, evaluation
and demo results) goes through `atomic_write`: into a hidden temporary beside
it, `.NAME.partialPID`, flushed to disk, renamed into place, and the folder's
entry synced. A killed writer leaves only such temporaries;
`remove_stale_temporaries` deletes those whose process is gone. A write that
fails is one OutputError (an OSError) naming the file; a full disk or quota is
its subclass DiskFullError.

Readers share `file_format` (what a file is, by its first bytes),
`read_safetensors_header` and `file_identity` (what a file held, for a run
record), so that a checkpoint is opened once however many of them look at it.

This module is the bottom layer: it imports nothing from adm_fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from typing import BinaryIO

_TEMP = re.compile(r"^\..+\.partial(\d+)$")
_WHY = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system"}
_FULL = (errno.ENOSPC, errno.EDQUOT)
# A safetensors header longer than this is a damaged length field, not a header.
_MAX_HEADER = 100 << 20
_HASH_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones in 16 blocks
_BLOCK = 1 << 20


class OutputError(OSError):
    """A file that cannot be written; the message names it and says why."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(code, message)

    def __str__(self) -> str:  # the message alone, not "[Errno 5] ..."
        return self.strerror

    def __reduce__(self):  # OSError's own would pass (errno, message)
        return type(self), (self.strerror, self.errno)


class DiskFullError(OutputError):
    """A write that ran out of space (ENOSPC, or the quota: EDQUOT)."""


class OutputExists(OutputError):
    """atomic_write(..., replace=False) found `path` already there."""

    def __init__(self, message: str, code: int = errno.EEXIST):
        super().__init__(message, code)


def describe_os_error(e: OSError, path: str, doing: str = "writing") -> str:
    """'disk full writing PATH', 'permission denied creating PATH', ..."""
    why = _WHY.get(e.errno) or e.strerror or str(e)
    return f"{why} {doing} {path}"


def output_error(path: str, exc: BaseException, recorded: OSError | None = None,
                 hint: bool = False) -> OutputError:
    """The OutputError for a failed write of `path`, from its cause (exc, its
    chain, or `recorded`): DiskFullError for ENOSPC/EDQUOT. hint: a full disk's
    message also names the device and says what to do (training and
    checkpoints, whose writes come between hours of work)."""
    seen, e = [], exc
    while e is not None and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    cause = recorded or next((x for x in seen if isinstance(x, OSError)), None)
    if cause is None:
        return OutputError(f"cannot write {path}: {exc}")
    if cause.errno in _FULL:
        if hint:
            where = os.path.dirname(os.path.abspath(path))
            return DiskFullError(f"disk full: cannot write {path} (no space left on the device "
                                 f"holding {where}); free space and run again", errno.ENOSPC)
        return DiskFullError(describe_os_error(cause, path), cause.errno)
    return OutputError(describe_os_error(cause, path), cause.errno or errno.EIO)


def temp_name(path: str) -> str:
    """The hidden temporary `path` is written to by this process."""
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
    except OSError:
        return False
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Delete the temporaries (files or folders) that killed writers left in
    `folder`; those of processes still running stay. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in sorted(names):
        m = _TEMP.match(name)
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


def probe_write(path: str) -> None:
    """Write one byte at path's temporary name, sync it (some file systems
    report a full disk only then) and remove it: raises the OSError a write
    there would (no permission, read-only, full)."""
    probe = temp_name(path)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


class _Recording:
    """A file whose first failing write is remembered: torch.save reports a
    failed write as '[enforce fail ...] unexpected pos', hiding the OSError."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 replace: bool = True, hint: bool = False) -> None:
    """write(f) (f: a binary file) into a temporary beside `path`, flush it to
    disk, rename it to `path`, sync the folder: an interrupted write leaves no
    truncated file, only a temporary nothing reads. A failed write is one
    OutputError naming `path` (output_error; `hint` as there).
    replace=False: a file already at `path` (or one that appears there while
    this one is written) is kept and OutputExists raised; the new file goes."""
    path = os.fspath(path)
    tmp, f = temp_name(path), None
    try:
        if not replace and os.path.lexists(path):  # before the work, not only after it
            raise OutputExists(f"{path} is already there")
        with open(tmp, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())  # else a crash after the rename could still lose the data
        if replace:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OutputError:
        raise
    except (OSError, RuntimeError) as e:
        recorded = f.error if f is not None else None
        if isinstance(e, RuntimeError) and recorded is None:
            raise  # not a failed write: the writer's own error
        raise output_error(path, e, recorded, hint) from None
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


# --- reading -------------------------------------------------------------------

def file_format(head: bytes) -> str | None:
    """'safetensors', 'torch' (a torch.save zip or legacy pickle) or None, from
    a file's first 16 bytes."""
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then a JSON object
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


def is_safetensors(path: str) -> bool:
    """By name, else by content."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        return file_format(f.read(16)) == "safetensors"


class HeaderError(ValueError):
    """A safetensors header that cannot be read; the message says why."""


def read_safetensors_header(f: BinaryIO) -> tuple[dict, int]:
    """(header, offset of the data) of the safetensors file open in `f`,
    read from its start: the JSON object after the 8-byte length, with its
    "__metadata__" (if any) as it is. HeaderError when it is not one."""
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise HeaderError(f"the file is {len(raw)} bytes, shorter than a header length")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
        raise HeaderError(f"the header length {n} is over the limit of {_MAX_HEADER} bytes")
    blob = f.read(n)
    if len(blob) < n:
        raise HeaderError(f"the header is cut short ({len(blob)} of {n} bytes)")
    try:
        header = json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"the header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("__metadata__ is not a map of strings")
    return header, 8 + n


def file_identity(f: str | BinaryIO | None) -> dict | None:
    """Size and SHA-256 of a file's content (of 16 evenly spread 1 MiB blocks
    when it is large: a retrained checkpoint differs in all of them); `f` a
    path or a file open for reading (read from its start)."""
    if f is None or f == "":
        return None
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as opened:
            return file_identity(opened)
    size = os.fstat(f.fileno()).st_size
    h = hashlib.sha256()
    f.seek(0)
    if size <= _HASH_WHOLE:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    else:
        for i in range(16):
            f.seek((size - _BLOCK) * i // 15)
            h.update(f.read(_BLOCK))
    return {"size": size, "sha256": h.hexdigest()}
