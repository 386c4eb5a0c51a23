"""The .npz files of a sampling run, written so that the same arrays always
give the same bytes.

numpy's format (np.load reads it; guided-diffusion's evaluator too) but with
a fixed timestamp in the zip entries, which np.savez takes from the clock: an
interrupted-and-resumed run then writes the same bytes as an uninterrupted
one. It streams its arrays in chunks, so 50,000 images need never sit in
memory at once. Files reach the disk through adm_fast.io.atomic_write.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold


Member = tuple[str, np.dtype, tuple[int, ...], Iterable[np.ndarray]]


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
