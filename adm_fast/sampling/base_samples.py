"""Super-resolution input: the low-res samples of a base model, as
guided-diffusion's image_sample.py writes them (an .npz with uint8 NHWC
images in arr_0 and, for class-conditional models, labels in arr_1)."""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

_EXPECTED = ("an .npz as image_sample.py writes (arr_0: uint8 images [N, H, W, 3], "
             "arr_1: labels), e.g. np.savez(path, images, labels)")


def check_low_res(low_res: np.ndarray, low_res_labels, image_size: int, class_cond: bool,
                  where: str = "low-res samples") -> None:
    if not isinstance(low_res, np.ndarray) or low_res.dtype != np.uint8 or low_res.ndim != 4 \
            or low_res.shape[-1] != 3 or len(low_res) == 0:
        shape = getattr(low_res, "shape", None)
        dtype = getattr(low_res, "dtype", type(low_res).__name__)
        raise ValueError(f"{where} must be a non-empty uint8 array [N, H, W, 3] "
                         f"(as image_sample.py writes arr_0), got {dtype} {shape}")
    if low_res.shape[1] > image_size or low_res.shape[2] > image_size:
        raise ValueError(f"{where} of {low_res.shape[1]}x{low_res.shape[2]} are larger "
                         f"than the model's {image_size}x{image_size} output")
    if class_cond:
        if low_res_labels is None:
            raise ValueError(f"a class-conditional super-resolution model needs the {where}' "
                             "labels (arr_1)")
        if np.shape(low_res_labels) != (len(low_res),):
            raise ValueError(f"{where}: need one label per low-res sample ({len(low_res)}), "
                             f"got labels of shape {np.shape(low_res_labels)}")


def check_labels(labels, num_classes: int, where: str) -> None:
    """Every label a class of the model (0 .. num_classes-1): one out of range
    would index past its class embedding."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{where} must be integers, got {labels.dtype}")
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        bad = int(low if low < 0 else high)
        raise ValueError(f"{where} holds label {bad}, out of range: the model has "
                         f"{num_classes} classes (0-{num_classes - 1})")


def _kind_problem(path: str) -> str | None:
    """Why `path` cannot be an .npz, judged from its first bytes (None: it may be)."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return "is a .npy file (one array, no labels)"
    if head[:4] != b"PK\x03\x04":
        return f"is not an .npz file (it starts with {head[:4]!r})"
    return None


def load_base_samples(path: str, small_size: int | None = None):
    """(uint8 NHWC images, labels or None) from an .npz as image_sample.py writes
    it (arr_0, and arr_1 when there), for super-resolution. Every problem is one
    ValueError naming the file."""
    where = f"--base_samples {path}"
    if not os.path.isfile(path):
        raise ValueError(f"--base_samples not found: {path}")
    problem = _kind_problem(path)
    if problem:
        raise ValueError(f"{where} {problem}; it must be {_EXPECTED}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{where} has no arr_0 (found {', '.join(npz.files) or 'nothing'})"
                                 f"; it must be {_EXPECTED}")
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in npz.files else None
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where} cannot be read ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise ValueError(f"{where} is truncated or not a readable .npz "
                         f"({type(e).__name__}: {e})") from None
    if images.ndim == 0:
        raise ValueError(f"{where}: arr_0 is a 0-d array (one {images.dtype} value), not "
                         "uint8 images [N, H, W, 3]")
    check_low_res(images, None, max(images.shape[1:3], default=0) if images.ndim == 4 else 0,
                  False, where=f"{where}: arr_0")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise ValueError(f"{where}: arr_1 must hold one integer label per image "
                         f"({len(images)}), got {labels.dtype} {labels.shape}")
    if small_size is not None and images.shape[1:3] != (small_size,) * 2:
        raise ValueError(f"{where}: images are {images.shape[1]}x{images.shape[2]} but the "
                         f"model upsamples {small_size}x{small_size} images")
    return images, labels
