"""Image batches in and out, as guided-diffusion's evaluator reads them.

An evaluator batch is an NPZ whose `arr_0` is uint8 NHWC RGB (what `adm-fast
sample` writes); a reference batch may also hold `mu`, `sigma`, `mu_s` and
`sigma_s`. `arr_0` is streamed from the zip member batch by batch, so 50,000
images are never all in memory. No torch here: the CLI reads headers before
it loads the network.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Iterator, Optional, Tuple

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class EvaluationError(ValueError):
    """A bad input to the evaluation: one line that names the file or flag."""


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

    def __init__(self, member, shape: Tuple[int, ...], dtype: np.dtype, where: str):
        self._f, self.shape, self.dtype, self._where = member, shape, dtype, where
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.shape[0], batch_size):
            n = min(batch_size, self.shape[0] - start)
            data = self._f.read(n * self._row)
            if len(data) != n * self._row:
                read = start + len(data) // self._row
                raise EvaluationError(f"{self._where} is truncated: {read} of {self.shape[0]} "
                                      "images could be read")
            yield np.frombuffer(data, dtype=self.dtype).reshape((n,) + self.shape[1:])


class _InMemory(ArrayReader):
    # Fortran-ordered arrays and newer .npy header versions cannot be streamed
    # row by row; the evaluator loads those whole too.
    def __init__(self, array: np.ndarray, where: str):
        self._array = np.ascontiguousarray(array)
        super().__init__(None, self._array.shape, self._array.dtype, where)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self._array), batch_size):
            yield self._array[start:start + batch_size]


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EvaluationError(f"{path} is not an NPZ file (not a zip archive)") from None


def npz_keys(path: str) -> set:
    """The array names in the NPZ at `path`."""
    with _open_zip(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


@contextlib.contextmanager
def open_images(path: str) -> Iterator[ArrayReader]:
    """A reader over the NPZ's arr_0 images, checked to be uint8 NHWC RGB."""
    with _open_zip(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            what = ("statistics but no images" if set(STAT_KEYS) & set(keys)
                    else f"neither images nor statistics (arrays: {', '.join(keys) or 'none'})")
            raise EvaluationError(f"{path} holds {what}: an evaluator batch needs arr_0, uint8 "
                                  "images [N, H, W, 3] (the reference images too: Precision "
                                  "and Recall are computed from them)")
        where = f"{path}: arr_0"
        with zf.open("arr_0.npy") as member:
            version = np.lib.format.read_magic(member)
            readers = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
            if version in readers:
                shape, fortran, dtype = readers[version](member)
            if version not in readers or fortran:
                with np.load(path, allow_pickle=False) as f:
                    reader = _InMemory(f["arr_0"], where)
            else:
                reader = ArrayReader(member, tuple(shape), dtype, where)
            check_images(reader, where)
            yield reader


def read_stats(path: str) -> Optional[dict]:
    """mu, sigma, mu_s, sigma_s from the NPZ when it has them (all four), else None."""
    keys = npz_keys(path)
    have = [k for k in STAT_KEYS if k in keys]
    if not have:
        return None
    if len(have) < len(STAT_KEYS):
        missing = [k for k in STAT_KEYS if k not in keys]
        raise EvaluationError(f"{path} has {', '.join(have)} but not {', '.join(missing)}: a "
                              "reference batch holds all four statistics or none")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in STAT_KEYS}


def write_reference(path: str, shape: Tuple[int, ...], fill) -> None:
    """Write a reference NPZ. `fill(write)` calls write(batch) for each uint8 batch of
    arr_0 (adding up to `shape`), streamed into the zip member, and returns the dict
    of arrays to store beside it. Through a temporary file, so that a failure
    leaves no reference behind."""
    from ..sampling.files import atomic_write

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

    atomic_write(path, write_file)


@contextlib.contextmanager
def _opened(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except EvaluationError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise EvaluationError(f"{path}: not a readable image ({e})") from None


def folder_images(folder: str, image_size: Optional[int] = None):
    """(shape, batches(n)) over the images of `folder` (recursively, guided-diffusion's
    order) as uint8 RGB. With image_size, each is resized and centre-cropped to it as
    guided-diffusion's data loader does; without, all must already share one size."""
    from ..train.data import DataError, center_crop_arr, list_image_files

    try:
        files = list_image_files(folder)
    except DataError as e:
        raise EvaluationError(str(e)) from None

    def load(path: str) -> np.ndarray:
        with _opened(path) as im:
            im = im.convert("RGB")
            return center_crop_arr(im, image_size) if image_size else np.asarray(im)

    first = load(files[0])
    if image_size is None:
        _check_sizes(files, (first.shape[1], first.shape[0]))

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            stop = min(start + batch_size, len(files))
            yield np.stack([first if i == 0 else load(files[i]) for i in range(start, stop)])

    return (len(files),) + first.shape, batches


def _check_sizes(files, size) -> None:
    # Headers only (PIL decodes lazily): a mixed folder fails before any work.
    for path in files[1:]:
        with _opened(path) as im:
            other = im.size
        if other != size:
            raise EvaluationError(
                f"{path} is {other[0]}x{other[1]} but {files[0]} is {size[0]}x{size[1]}: a "
                "batch holds one image size; pass --image_size to resize and centre-crop "
                "them all")
