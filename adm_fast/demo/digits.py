"""The demo's dataset: scikit-learn's 8×8 handwritten digits (1797 images, 10
classes, ink 0..16), split once into a training set and a held-out set,
upsampled to 16×16 and replicated to RGB, as adm_fast's models take 3 channels.

Only training needs scikit-learn. The held-out split ships with the package
(`heldout_digits.npz`, the raw 8×8 images and labels) so that sampling, the
demo's reference row and the tests can measure the clean classifier on real
digits without it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .flags import NUM_DIGITS  # noqa: F401  (the one definition)

IMAGE_SIZE = 16
HELDOUT = 297  # of 1797; the remaining 1500 train all three models
SPLIT_SEED = 0
HELDOUT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heldout_digits.npz")


class DigitsUnavailable(RuntimeError):
    """scikit-learn is not installed, so the digits cannot be loaded for training."""


def load_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (held-out images, labels)); images uint8 [N, 8, 8] in 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DigitsUnavailable("training the demo needs scikit-learn for its digits dataset: "
                                "pip install scikit-learn") from None
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    # A fixed permutation rather than sklearn's order, which groups writers.
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    held, train = np.sort(perm[:HELDOUT]), np.sort(perm[HELDOUT:])
    return (images[train], labels[train]), (images[held], labels[held])


def upsample(images8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, 8, 8] ink in 0..16 -> uint8 [N, size, size, 3] (white ink on black).

    Bicubic keeps the strokes smooth at 2×; the digits' 17 ink levels are
    stretched to the full 0..255 range first, so nothing is lost to rounding.
    """
    out = np.empty((len(images8), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images8):
        grey = Image.fromarray(np.rint(img.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8))
        big = np.asarray(grey.resize((size, size), resample=Image.Resampling.BICUBIC))
        out[i] = big[..., None]
    return out


def write_image_folder(path: str, images8: np.ndarray, labels: np.ndarray) -> int:
    """Write `{digit}_{i:05d}.png` files that adm_fast.train.load_data reads (the
    class is the name before '_'); returns how many."""
    os.makedirs(path, exist_ok=True)
    for i, (img, label) in enumerate(zip(upsample(images8), labels)):
        Image.fromarray(img).save(os.path.join(path, f"{int(label)}_{i:05d}.png"))
    return len(images8)


def save_heldout(path: str, images8: np.ndarray, labels: np.ndarray) -> None:
    np.savez_compressed(path, images=images8.astype(np.uint8), labels=labels.astype(np.int64))


def load_heldout(path: str = HELDOUT_FILE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 8, 8], int64 [N]) of the held-out digits."""
    with np.load(path) as f:
        return f["images"], f["labels"]


def to_model_input(images: np.ndarray):
    """uint8 NHWC in 0..255 -> float32 NCHW in [-1, 1], as the training pipeline feeds models."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return x.permute(0, 3, 1, 2).contiguous()
