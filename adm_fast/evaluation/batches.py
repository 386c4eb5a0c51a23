"""Image batches in and out, as guided-diffusion's evaluator reads them.

An evaluator batch is an NPZ whose `arr_0` is uint8 NHWC RGB (what `adm-fast
sample` writes); a reference batch may also hold `mu`, `sigma`, `mu_s` and
`sigma_s`. `arr_0` is streamed from the zip member batch by batch, so 50,000
images are never all in memory. No torch here: the CLI reads headers before
it loads the network.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from ..io import OutputError, atomic_write, describe_os_error, probe_write

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# The network's features: pool_3 is 2048-d, mixed_6/conv's first 7 channels of
# 17x17 are 2023-d (network.py). A reference batch's statistics must be these
# shapes to be compared with a sample's; checking them from the .npy headers
# refuses a wrong file before anything of its size is allocated.
STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
_CHUNK = 1 << 20  # bytes per read when draining a zip member to its CRC check
_MAX_HEADER = 10000  # numpy's own limit on a .npy header's length (max_header_size)

# What reading a damaged zip member raises: a bad CRC or local header
# (BadZipFile), a broken deflate stream (zlib.error, EOFError), an unknown
# compression method (NotImplementedError), an encrypted member (RuntimeError),
# an offset past the file (OSError: EINVAL from seek).
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            OSError)


class EvaluationError(ValueError):
    """A bad input to the evaluation: one line that names the file or flag."""


def _damaged(where: str, e: BaseException) -> EvaluationError:
    why = " ".join(str(e).split()) or type(e).__name__
    return EvaluationError(f"{where} is damaged ({why}): the file cannot be read as it was "
                           "written; write or download it again")


def positive_int(value, name: str) -> int:
    """`value` as an int, or EvaluationError naming `name` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_images(images, where: str) -> None:
    """Raise EvaluationError unless `images` is uint8 [N, H, W, 3] with N, H, W >= 1."""
    shape, dtype = tuple(images.shape), images.dtype
    if str(dtype) not in ("uint8", "torch.uint8"):
        raise EvaluationError(f"{where} is {dtype}: the evaluator takes uint8 images in "
                              "[0, 255] (NHWC), as adm-fast sample writes them")
    if len(shape) != 4:
        raise EvaluationError(f"{where} has shape {list(shape)}: expected 4-D images "
                              "[N, H, W, 3] (NHWC)")
    if shape[-1] != 3:
        hint = (" (this looks like NCHW; the evaluator takes NHWC: transpose to "
                "[N, H, W, 3])" if shape[1] == 3 else " (the evaluator takes RGB)")
        raise EvaluationError(f"{where} has shape {list(shape)}: expected 3 channels last"
                              + hint)
    if min(shape[:3]) < 1:
        raise EvaluationError(f"{where} has shape {list(shape)}: no images")


class ArrayReader:
    """arr_0 of an NPZ, read in batches: `shape`, `dtype`, `batches(n)`."""

    def __init__(self, member, shape: tuple[int, ...], dtype: np.dtype, where: str):
        self._f, self.shape, self.dtype, self._where = member, shape, dtype, where
        # Python ints: a hostile header's shape cannot overflow the byte count.
        self.row_bytes = math.prod(int(d) for d in shape[1:]) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, size: int) -> bytes:
        try:
            return self._f.read(size)
        except _DAMAGED as e:
            raise _damaged(self._where, e) from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = self.row_bytes
        for start in range(0, self.shape[0], batch_size):
            n = min(batch_size, self.shape[0] - start)
            data = self._read(n * row)
            if len(data) != n * row:
                read = start + len(data) // row
                raise EvaluationError(f"{self._where} is truncated: {read} of {self.shape[0]} "
                                      "images could be read")
            yield np.frombuffer(data, dtype=self.dtype).reshape((n,) + self.shape[1:])
        # zipfile checks the CRC once the member's last byte is read: read what
        # follows the images too, so that a damaged file never passes as whole.
        while self._read(_CHUNK):
            pass


class _InMemory(ArrayReader):
    # Fortran-ordered arrays cannot be streamed row by row; the evaluator loads
    # those whole too (their size is checked against the file's first).
    def __init__(self, array: np.ndarray, where: str):
        self._array = np.ascontiguousarray(array)
        super().__init__(None, self._array.shape, self._array.dtype, where)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self._array), batch_size):
            yield self._array[start:start + batch_size]


class _Header:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EvaluationError(f"{path} is not an NPZ file (not a zip archive)") from None
    except (EOFError, ValueError, OverflowError, NotImplementedError) as e:
        # A zip whose central directory is damaged past zipfile's own checks.
        raise _damaged(path, e) from None


def _open_member(zf: zipfile.ZipFile, name: str, where: str):
    try:
        return zf.open(name)
    except _DAMAGED + (ValueError, OverflowError) as e:
        raise _damaged(where, e) from None


def _free_memory() -> int | None:
    """Linux's MemAvailable (free memory and what the page cache would give
    back), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _npy_header(member, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy member's header, reading nothing
    else: neither a header that promises terabytes of data nor one that claims
    to be gigabytes long costs anything here."""
    try:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise EvaluationError(f"{where} is a .npy of format version "
                                  f"{'.'.join(map(str, version))}, which numpy does not write")
        # The length is checked before the header is read (numpy reads it first).
        length = member.read(2 if version == (1, 0) else 4)
        size = int.from_bytes(length, "little")
        if size > _MAX_HEADER:
            raise EvaluationError(f"{where} has a damaged .npy header ({size} bytes long; "
                                  f"numpy writes at most {_MAX_HEADER})")
        header = io.BytesIO(length + member.read(size))
        # 3.0 differs from 2.0 only by UTF-8 field names of structured dtypes,
        # which no evaluator array has (and the dtype checks refuse).
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(header)
    except _DAMAGED as e:
        raise _damaged(where, e) from None
    except EvaluationError:
        raise
    except Exception as e:  # noqa: BLE001
        # numpy parses the header's text with ast and tokenize, whose errors
        # (SyntaxError, TokenError, ValueError, ...) all mean a damaged header.
        # Its words may end with advice to trust the file (allow_pickle=True);
        # only the first sentence says what is wrong.
        why = " ".join(str(e).split()).split(". ")[0]
        raise EvaluationError(f"{where} has a damaged .npy header ({why})") from None
    if any(int(d) < 0 for d in shape):
        raise EvaluationError(f"{where} has a damaged .npy header (shape {list(shape)})")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _left(zf: zipfile.ZipFile, name: str, member) -> int:
    """Bytes of the member after what was read of it (its size as the zip says)."""
    return zf.getinfo(name).file_size - member.tell()


def npz_keys(path: str) -> set:
    """The array names in the NPZ at `path`."""
    with _open_zip(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


@contextlib.contextmanager
def open_images(path: str) -> Iterator[ArrayReader]:
    """A reader over the NPZ's arr_0 images, checked to be uint8 NHWC RGB, with
    as many bytes in the file as its header promises."""
    with _open_zip(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            what = ("statistics but no images" if set(STAT_KEYS) & set(keys)
                    else f"neither images nor statistics (arrays: {', '.join(keys) or 'none'})")
            raise EvaluationError(f"{path} holds {what}: an evaluator batch needs arr_0, uint8 "
                                  "images [N, H, W, 3] (the reference images too: Precision "
                                  "and Recall are computed from them)")
        where = f"{path}: arr_0"
        with _open_member(zf, "arr_0.npy", where) as member:
            shape, fortran, dtype = _npy_header(member, where)
            check_images(_Header(shape, dtype), where)
            reader = ArrayReader(member, shape, dtype, where)
            have, need = _left(zf, "arr_0.npy", member), len(reader) * reader.row_bytes
            if need > have:
                raise EvaluationError(f"{where} is truncated: {have // reader.row_bytes} of "
                                      f"{len(reader)} images could be read (its header "
                                      f"promises {need} bytes, the file holds {have})")
            if fortran:
                free = _free_memory()
                if free is not None and need > free:
                    raise EvaluationError(
                        f"{where} is Fortran-ordered, which is read whole, and {_size(need)}: "
                        f"more than the {_size(free)} of memory free; save it C-ordered "
                        "(np.ascontiguousarray) to have it streamed")
                try:
                    with np.load(path, allow_pickle=False) as f:
                        reader = _InMemory(f["arr_0"], where)
                except _DAMAGED + (ValueError,) as e:
                    raise _damaged(where, e) from None
            yield reader


def _read_stat(zf: zipfile.ZipFile, path: str, key: str) -> np.ndarray:
    where, name, want = f"{path}: {key}", f"{key}.npy", STAT_SHAPES[key]
    with _open_member(zf, name, where) as member:
        shape, fortran, dtype = _npy_header(member, where)
        if dtype.kind not in "fiu" or dtype.hasobject:
            raise EvaluationError(f"{where} is of dtype {dtype}: a reference batch's "
                                  f"statistics are real numbers (float {list(want)})")
        if shape != want:
            raise EvaluationError(f"{where} has shape {list(shape)}: expected {list(want)}, "
                                  "the statistics of the evaluator's InceptionV3 features")
        need = math.prod(want) * dtype.itemsize
        try:
            data = member.read(need)
            while member.read(_CHUNK):  # to the end, where zipfile checks the CRC
                pass
        except _DAMAGED as e:
            raise _damaged(where, e) from None
    if len(data) != need:
        raise EvaluationError(f"{where} is truncated: {len(data)} of {need} bytes could be read")
    array = np.frombuffer(data, dtype).reshape(want, order="F" if fortran else "C").copy()
    if not np.isfinite(array).all():
        raise EvaluationError(f"{where} holds NaN or infinite values")
    return array


def read_stats(path: str) -> dict | None:
    """mu, sigma, mu_s, sigma_s from the NPZ when it has them (all four), else None.
    Each is checked (dtype, shape, size, CRC, finite) from its header before its
    data is read."""
    keys = npz_keys(path)
    have = [k for k in STAT_KEYS if k in keys]
    if not have:
        return None
    if len(have) < len(STAT_KEYS):
        missing = [k for k in STAT_KEYS if k not in keys]
        raise EvaluationError(f"{path} has {', '.join(have)} but not {', '.join(missing)}: a "
                              "reference batch holds all four statistics or none")
    with _open_zip(path) as zf:
        return {k: _read_stat(zf, path, k) for k in STAT_KEYS}


def reference_bytes(shape: tuple[int, ...]) -> int:
    """A lower bound on the size of a reference NPZ of `shape` images: arr_0, mu
    and mu_s (fp32), sigma and sigma_s (fp64)."""
    return (math.prod(int(d) for d in shape)
            + sum(math.prod(STAT_SHAPES[k]) * (4 if k.startswith("mu") else 8)
                  for k in STAT_KEYS))


def check_output(path: str, flag: str, overwrite: bool = False, need: int = 0) -> None:
    """Refuse, before any work, an output that would replace a finished file
    without `overwrite`, or that cannot be written: its folder missing, not
    writable (permission, a read-only or full file system: a one-byte file is
    written beside it, synced and removed), or holding less than `need` free bytes."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise EvaluationError(f"{folder}: no such folder for the output")
    if os.path.isdir(path):
        raise EvaluationError(f"{flag} {path} is a folder: expected a file name")
    if os.path.lexists(path) and not overwrite:
        raise EvaluationError(f"{flag} {path} exists: pass --overwrite to replace it")
    try:
        probe_write(os.path.abspath(path))
    except OSError as e:
        raise EvaluationError(f"{flag}: {describe_os_error(e, path)}") from None
    check_room(path, need)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_room(path: str, need: int) -> None:
    """EvaluationError unless the file system of `path` has `need` bytes free."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself will say why
    if need > free:
        raise EvaluationError(f"disk full: {path} needs at least {_size(need)}, {_size(free)} "
                              f"are free on the device holding {folder}")


def write_atomic(path: str, write_file) -> None:
    """write_file(f) into a temporary beside `path`, synced, then renamed to it:
    a failure (a full disk) leaves neither a partial file nor a changed `path`,
    and raises one EvaluationError naming it."""
    try:
        atomic_write(path, write_file)
    except OutputError as e:
        raise EvaluationError(str(e)) from None


def write_reference(path: str, shape: tuple[int, ...], fill) -> None:
    """Write a reference NPZ. `fill(write)` calls write(batch) for each uint8 batch of
    arr_0 (adding up to `shape`), streamed into the zip member, and returns the dict
    of arrays to store beside it. Through a temporary file, so that a failure
    leaves no reference behind; a disk without room for it is refused before
    `fill` runs."""
    check_room(path, reference_bytes(shape))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": tuple(shape)}

    def write_file(f):
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            written = [0]
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)

                def write(batch: np.ndarray) -> None:
                    member.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())
                    written[0] += len(batch)

                arrays = fill(write)
            if written[0] != shape[0]:
                raise EvaluationError(f"{path}: {written[0]} images were written, {shape[0]} "
                                      "expected")
            for name, value in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    write_atomic(path, write_file)


@contextlib.contextmanager
def _image_errors():
    """image_files' errors as EvaluationErrors."""
    from ..image_files import ImageFileError, UnreadableImage

    try:
        yield
    except UnreadableImage as e:
        raise EvaluationError(f"{e.path}: not a readable image ({e.reason})") from None
    except ImageFileError as e:  # a FIFO or device, or an image past the pixel limit
        raise EvaluationError(str(e)) from None


def folder_images(folder: str, image_size: int | None = None,
                  max_pixels: int | None = None):
    """(shape, batches(n)) over the images of `folder` (recursively, guided-diffusion's
    order) as uint8 RGB. With image_size, each is resized and centre-cropped to it as
    guided-diffusion's data loader does; without, all must already share one size.
    Files are listed and opened by adm_fast.image_files: special files (FIFOs,
    devices) are left out with a warning, and an image of more than max_pixels
    pixels (None: image_files.MAX_PIXELS) is refused from its header."""
    from ..image_files import MAX_PIXELS, center_crop_arr, list_image_files, read_rgb

    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    with _image_errors():
        files = list_image_files(folder)

    def load(path: str) -> np.ndarray:
        with _image_errors():
            im = read_rgb(path, max_pixels)
        return center_crop_arr(im, image_size) if image_size else np.asarray(im)

    first = load(files[0])
    if image_size is None:
        _check_sizes(files, (first.shape[1], first.shape[0]), max_pixels)

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            stop = min(start + batch_size, len(files))
            yield np.stack([first if i == 0 else load(files[i]) for i in range(start, stop)])

    return (len(files),) + first.shape, batches


def _check_sizes(files, size, max_pixels) -> None:
    from ..image_files import open_image

    # Headers only (PIL decodes lazily): a mixed folder fails before any work.
    for path in files[1:]:
        with _image_errors(), open_image(path, max_pixels) as im:
            other = im.size
        if other != size:
            raise EvaluationError(
                f"{path} is {other[0]}x{other[1]} but {files[0]} is {size[0]}x{size[1]}: a "
                "batch holds one image size; pass --image_size to resize and centre-crop "
                "them all")
