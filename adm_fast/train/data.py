"""The training data pipeline: guided-diffusion's image folders, reproducibly.

Semantics follow guided-diffusion's `image_datasets.py`: images are listed
recursively (each level sorted), a file's class is its name up to the first
`_`, rank r of W takes files[r::W], and an image is BOX-halved, BICUBIC-resized
and centre- (or randomly) cropped, optionally flipped, and scaled to [-1, 1].

Added: every data problem is a `DataError` naming the file; undecodable images
can be skipped (and counted, across worker processes); augmentation and
shuffling draw from generators seeded by (seed, epoch, image), so a stream is
the same for any number of workers and `start_batch=k` resumes it exactly at
batch k without decoding the k batches before it.

One departure, so that the data do not depend on the number of processes:
`load_data` orders all files per epoch (shuffled by (seed, epoch)) into global
batches of batch_size x world_size, and rank r takes the items r, r + W, ...
of each. One process and W ranks then see the same global batches, each item
in the same place (with deterministic=True this is guided-diffusion's
files[r::W] sharding, up to the epoch's last partial batch).
"""

from __future__ import annotations

import colorsys
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import image_files
from ..image_files import IMAGE_EXTENSIONS, MAX_PIXELS, center_crop_arr, fit_short_side

__all__ = ["DataError", "list_image_files", "class_of", "class_names",
           "random_crop_arr", "ImageFolderDataset", "ImageBatchStream",
           "load_data", "make_image_folder"]

_log = logging.getLogger(__name__)
_LIMIT_HINT = ("raise the limit with max_pixels= (adm-fast train: --max_image_pixels; "
               "0: no limit but PIL's)")
# Domain tags keep the item and shuffle seed sequences apart when their numbers coincide.
_ITEM_TAG, _SHUFFLE_TAG = 1, 2


class DataError(ValueError):
    """A problem with the training data or its settings; the message names the path."""


def list_image_files(data_dir: str | os.PathLike) -> list[str]:
    """Image files under `data_dir`, recursively, in guided-diffusion's order;
    special files (FIFOs, devices, sockets) left out with a warning
    (adm_fast.image_files.list_image_files, errors as DataError)."""
    try:
        return image_files.list_image_files(data_dir)
    except image_files.ImageFileError as e:
        raise DataError(str(e)) from None


def class_of(path: str | os.PathLike) -> str:
    """A file's class: its name up to the first `_` (the whole name if it has none)."""
    return os.path.basename(os.fspath(path)).split("_")[0]


def class_names(files: Sequence[str | os.PathLike]) -> list[str]:
    """The sorted distinct classes of `files`; a label is an index into this list."""
    return sorted({class_of(f) for f in files})


def random_crop_arr(pil_image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Resize the shorter side to a random size in [S/max_frac, S/min_frac], crop S×S anywhere."""
    if not 0 < min_crop_frac <= max_crop_frac <= 1:
        raise DataError(f"random_crop_arr: need 0 < min_crop_frac <= max_crop_frac <= 1, got "
                        f"min_crop_frac={min_crop_frac}, max_crop_frac={max_crop_frac}")
    rng = np.random.default_rng() if rng is None else rng
    lo, hi = math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)
    arr = np.asarray(fit_short_side(pil_image, int(rng.integers(lo, hi + 1))))
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return arr[top:top + image_size, left:left + image_size]


def _decode(path: str, max_pixels: int | None) -> Image.Image:
    return image_files.read_rgb(path, max_pixels, _LIMIT_HINT)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class ImageFolderDataset(Dataset):
    """One shard of an image folder; items are (x [3,S,S] float32 in [-1,1], {"y": label}|{}).

    Index with an int (epoch 0) or with (epoch, index): flips and random crops
    are drawn from a generator seeded by (seed, epoch, the file's index among
    all files), so they differ by epoch but not by worker, rank count or order.
    """

    def __init__(self, data_dir_or_files, image_size: int, *, class_cond: bool = False,
                 classes: Sequence[str] | None = None, random_crop: bool = False,
                 random_flip: bool = True, shard: int = 0, num_shards: int = 1,
                 on_error: str = "stop", allow_upscale: bool = False, seed: int = 0,
                 max_pixels: int = MAX_PIXELS):
        super().__init__()
        if isinstance(data_dir_or_files, (str, os.PathLike)):
            all_files = list_image_files(data_dir_or_files)
        elif not (all_files := [os.fspath(f) for f in data_dir_or_files]):
            raise DataError("ImageFolderDataset: the list of image files is empty")
        self.image_size = _check_int("image_size", image_size, 1)
        self.num_shards = _check_int("num_shards (world_size)", num_shards, 1)
        self.shard = _check_int("shard (rank)", shard, 0)
        self.seed = _check_int("seed", seed, 0)
        self.max_pixels = _check_int("max_pixels", max_pixels, 0) or None
        if self.shard >= self.num_shards:
            raise DataError(f"shard (rank) {shard} is out of range for num_shards (world_size) "
                            f"{num_shards}")
        if on_error not in ("stop", "skip"):
            raise DataError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        if classes is not None and not class_cond:
            raise DataError("classes= was given but class_cond=False; labels are only made "
                            "with class_cond=True")
        self.on_error, self.allow_upscale = on_error, allow_upscale
        self.random_crop, self.random_flip = random_crop, random_flip
        self.files = all_files[self.shard::self.num_shards]
        if not self.files:
            raise DataError(f"shard (rank) {shard} of num_shards (world_size) {num_shards} gets "
                            f"no images: there are only {len(all_files)}")
        self.classes: list[str] | None = None
        self.labels: list[int] | None = None
        if class_cond:
            # Labels come from all files so that every rank numbers classes alike.
            self.classes = class_names(all_files) if classes is None else _checked(classes)
            index = {c: i for i, c in enumerate(self.classes)}
            for f in all_files:
                if class_of(f) not in index:
                    shown = ", ".join(map(repr, self.classes[:10]))
                    more = f", ... ({len(self.classes)} in all)" if len(self.classes) > 10 else ""
                    raise DataError(f"{f}: class {class_of(f)!r} (the name before '_') is not "
                                    f"among the given classes [{shown}{more}]")
            self.labels = [index[class_of(f)] for f in self.files]
        # One byte per file, in shared memory, so that DataLoader workers report
        # the files they skipped to the main process.
        self._bad = multiprocessing.RawArray("B", len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped_files(self) -> list[str]:
        """Files found undecodable so far (on_error="skip"), in shard order."""
        return [f for f, bad in zip(self.files, self._bad) if bad]

    @property
    def skipped_count(self) -> int:
        return int(np.frombuffer(self._bad, dtype=np.uint8).sum())

    def __getitem__(self, key) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a shard of {n} images")
        index = int(index) % n
        j, img = self._load(index)
        rng = np.random.default_rng((self.seed, _ITEM_TAG, int(epoch),
                                     self.shard + index * self.num_shards))
        if self.random_crop:
            arr = random_crop_arr(img, self.image_size, rng=rng)
        else:
            arr = center_crop_arr(img, self.image_size)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        x = arr.astype(np.float32) / np.float32(127.5) - np.float32(1)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        cond = {} if self.labels is None else {"y": torch.tensor(self.labels[j], dtype=torch.int64)}
        return x, cond

    def _load(self, index: int) -> tuple[int, Image.Image]:
        """The image at `index`, or with on_error="skip" the next decodable one after it."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            if self._bad[j]:
                continue
            path = self.files[j]
            try:
                img = _decode(path, self.max_pixels)
            except image_files.ImageFileError as e:
                what = (f"{path}: cannot decode the image ({e.reason})"
                        if isinstance(e, image_files.UnreadableImage) else str(e))
                if self.on_error == "stop":
                    raise DataError(f"{what}; skip undecodable images with on_error='skip' "
                                    "(adm-fast train: --on_error skip)") from None
                self._bad[j] = 1
                _log.warning("skipping image %s", what)
                continue
            if min(img.size) < self.image_size and not self.allow_upscale:
                raise DataError(f"{path}: the image is {img.width}x{img.height}, smaller than "
                                f"image_size={self.image_size} on its shorter side; resize such "
                                "images up with allow_upscale=True (adm-fast train: "
                                "--allow_upscale True)")
            return j, img
        raise DataError(f"none of the {n} images of shard {self.shard}/{self.num_shards} can be "
                        f"decoded (first: {self.files[0]})")


def _checked(classes: Sequence[str]) -> list[str]:
    names = list(classes)
    if not names or not all(isinstance(c, str) for c in names) or len(set(names)) != len(names):
        raise DataError(f"classes must be a non-empty list of distinct names, got {classes!r}")
    return names


class _EpochBatchSampler:
    """This rank's share of each global batch, as lists of (epoch, index), forever
    from global batch `start`. An epoch orders all n items (shuffled by (seed,
    epoch), never by rank or world size) into n // (batch_size * world_size)
    global batches, the remainder dropped; rank r takes items r::world_size."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int,
                 world_size: int, start: int):
        self.n, self.shuffle, self.start = n, shuffle, start
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.key = (seed, _SHUFFLE_TAG)
        self.per_epoch = n // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng(self.key + (epoch,)).permutation(self.n)

    def __iter__(self):
        batch, epoch, order = self.start, -1, None
        while True:
            e, k = divmod(batch, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            items = order[k * self.global_batch:(k + 1) * self.global_batch]
            yield [(epoch, int(i)) for i in items[self.rank::self.world_size]]
            batch += 1


class ImageBatchStream:
    """The endless iterator `load_data` returns: (x [B,3,S,S], cond) per step."""

    def __init__(self, dataset: ImageFolderDataset, loader: DataLoader, start_batch: int):
        self.dataset, self.loader = dataset, loader
        self.batches_done = start_batch  # what to pass as start_batch to resume after this
        self._it = None

    classes = property(lambda self: self.dataset.classes)
    num_images = property(lambda self: len(self.dataset))
    skipped_count = property(lambda self: self.dataset.skipped_count)
    batches_per_epoch = property(lambda self: self.loader.batch_sampler.per_epoch)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:  # workers start at the first batch, not at construction
            self.loader.batch_sampler.start = self.batches_done  # after close(), carry on
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except DataError as e:
            # From a worker, the message is the worker's whole traceback.
            raise DataError(_worker_message(e)) from None
        self.batches_done += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (dropping the stream does it too)."""
        self._it = None


def _worker_message(e: DataError) -> str:
    text = str(e).rstrip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


def load_data(*, data_dir, batch_size: int, image_size: int, class_cond: bool = False,
              deterministic: bool = False, random_crop: bool = False, random_flip: bool = True,
              rank: int = 0, world_size: int = 1, num_workers: int | None = None,
              on_error: str = "stop", seed: int = 0, start_batch: int = 0,
              classes: Sequence[str] | None = None,
              allow_upscale: bool = False, max_pixels: int = MAX_PIXELS) -> ImageBatchStream:
    """guided-diffusion's load_data as a resumable stream; `batch_size` is per rank.

    Each epoch covers the whole folder once in global batches of batch_size x
    world_size (shuffled by (seed, epoch) unless `deterministic`; the last
    partial batch dropped), of which this rank gets items rank::world_size.
    An image of more than max_pixels pixels (0: no limit but PIL's) is refused
    from its header, before decoding, as an undecodable one is (on_error).
    """
    if not data_dir:
        raise DataError("load_data: data_dir is empty; give the image folder to train on")
    batch_size = _check_int("batch_size", batch_size, 1)
    start_batch = _check_int("start_batch", start_batch, 0)
    if num_workers is None:
        num_workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    num_workers = _check_int("num_workers", num_workers, 0)
    rank, world_size = _check_int("rank", rank, 0), _check_int("world_size", world_size, 1)
    if rank >= world_size:
        raise DataError(f"rank {rank} is out of range for world_size {world_size}")
    dataset = ImageFolderDataset(data_dir, image_size, class_cond=class_cond, classes=classes,
                                 random_crop=random_crop, random_flip=random_flip,
                                 on_error=on_error, seed=seed, allow_upscale=allow_upscale,
                                 max_pixels=max_pixels)
    if len(dataset) < batch_size * world_size:
        raise DataError(f"{os.fspath(data_dir)}: {len(dataset)} images, fewer than one global "
                        f"batch (batch_size={batch_size} per rank x world_size={world_size}); "
                        "use a smaller batch or more images")
    sampler = _EpochBatchSampler(len(dataset), batch_size, not deterministic, dataset.seed,
                                 rank, world_size, start_batch)
    # Its own generator: a DataLoader iterator otherwise draws its base seed from
    # the global RNG, which dropout uses, and a resumed run creates it elsewhere.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(dataset.seed))
    return ImageBatchStream(dataset, loader, start_batch)


def make_image_folder(path, num_images: int, size, classes: Sequence[str] = ("a", "b"),
                      seed: int = 0, ext: str = "png") -> list[str]:
    """Write `num_images` synthetic images `{class}_{i:05d}.{ext}`; return their paths, sorted.

    Image i has class i % len(classes); a class has its own hue and stripe
    direction and frequency, and each image a random phase and noise, so a small
    classifier can tell the classes apart. `size` is S or (width, height).
    """
    num_images = _check_int("num_images", num_images, 1)
    if ext.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"make_image_folder: ext must be one of {IMAGE_EXTENSIONS}, got {ext!r}")
    for c in classes:
        if not c or "_" in c or os.sep in c or "/" in c:
            raise DataError(f"make_image_folder: class name {c!r} must be non-empty, without "
                            "'_' or a path separator")
    _checked(classes)
    w, h = (size, size) if isinstance(size, (int, np.integer)) else size
    w, h = _check_int("width", w, 1), _check_int("height", h, 1)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    k_all = len(classes)
    paths = []
    for i in range(num_images):
        k = i % k_all
        colour = np.array(colorsys.hsv_to_rgb(k / k_all, 0.7, 0.9)) * 255.0
        angle, period = math.pi * k / k_all, max(2.0, min(w, h) / (2 + k))
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        pixels = colour * (0.6 + 0.4 * wave[..., None]) + rng.normal(0, 12, (h, w, 3))
        file = os.path.join(os.fspath(path), f"{classes[k]}_{i:05d}.{ext}")
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        image.save(file, **({"quality": 95} if ext.lower() in ("jpg", "jpeg") else {}))
        paths.append(file)
    return sorted(paths)
