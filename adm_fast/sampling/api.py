"""Sampling as a function: batches of images from a loaded model, guided or not,
and guided-diffusion's output files.

`sample_images` is what `adm-fast sample` runs (through `iter_batches`, one
batch at a time); the benchmarks call it too. Per batch it keeps
guided-diffusion's random draw order (the labels with
`torch.randint(0, num_classes, (batch,))`, then the sampling loop's own
noise) and always samples full batches, truncating the last one, as
guided-diffusion's scripts do. Each batch starts from its own seed,
`batch_seed(seed, b)`, so batch b's images depend only on the seed and b:
not on which batches ran before, in which process, or on how many ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion import classifier_cond_fn, classifier_free_guidance
from ..io import OutputExists, atomic_write
from ..models import SuperResModel
from .base_samples import check_labels, check_low_res, load_base_samples
from .classes import check_classes
from .flags import SAMPLERS, check_classifier_size, check_options
from .grid import GRID_MAX_IMAGES, image_grid
from .npz import npz_members, write_npz
from .progress import Progress

__all__ = ["SAMPLERS", "GRID_MAX_IMAGES", "batch_seed", "check_low_res", "image_grid",
           "iter_batches", "load_base_samples", "low_res_batch", "named_labels", "sample_images",
           "save_samples", "to_uint8_nhwc", "write_png"]


class _DropLabels(nn.Module):
    """Keeps y away from a model without classes: the labels in model_kwargs
    are for the classifier (guided-diffusion's classifier_sample model_fn)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs) -> Tensor:
        return self.model(x, t, **kwargs)


def named_labels(model: nn.Module, labels: int) -> int:
    """How many of a model's `labels` labels are drawn from: those its file
    names (`class_names` from load_checkpoint, label i = names[i]), else all.
    A head wider than the classes trained (guided-diffusion's 1000-way one on
    10 classes) has untrained labels past the names."""
    names = getattr(model, "class_names", None)
    return min(len(names), labels) if names else labels


def to_uint8_nhwc(sample: Tensor) -> Tensor:
    """[-1, 1] NCHW -> uint8 NHWC, with guided-diffusion's rounding (truncation)."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def low_res_batch(images: np.ndarray, device) -> Tensor:
    """uint8 NHWC low-res samples -> the model's low_res input in [-1, 1], NCHW."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return batch.permute(0, 3, 1, 2).to(device)


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch `batch` in a run seeded `seed`: the first 64-bit
    word of numpy's SeedSequence(seed, spawn_key=(batch,)), i.e. child `batch`
    of SeedSequence(seed). Distinct (seed, batch) pairs give unrelated streams
    (seed + batch would make seed 1's batch 0 seed 0's batch 1)."""
    words = np.random.SeedSequence(seed, spawn_key=(batch,)).generate_state(1, np.uint64)
    return int(words[0])


def _loop(diffusion, sampler: str, eta: float, steps: int | None):
    if sampler == "ddpm":
        return diffusion.p_sample_loop_progressive, {}
    if sampler == "ddim":
        return diffusion.ddim_sample_loop_progressive, {"eta": eta}
    return diffusion.dpm_solver_sample_loop_progressive, {"steps": steps}


@dataclasses.dataclass
class _Plan:
    """Everything a batch needs, checked once."""
    model_fn: Callable
    cond_fn: Callable | None
    loop: Callable
    loop_kwargs: dict
    num_samples: int
    batch_size: int
    image_size: int
    device: torch.device
    clip_denoised: bool
    labels_from: int | None  # draw labels among this many classes (None: no draw)
    classes: Tensor | None  # ... or among these, on the device
    low_res: np.ndarray | None
    low_res_labels: np.ndarray | None

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)


def _plan(model, diffusion, *, num_samples, batch_size, classifier=None, classifier_scale=0.0,
          cfg_scale=None, sampler="ddpm", eta=0.0, steps=None, clip_denoised=True,
          low_res=None, low_res_labels=None, classes=None, device=None,
          cuda_graph=False, seed=None) -> _Plan:
    check_options(num_samples=num_samples, batch_size=batch_size, sampler=sampler, eta=eta,
                  steps=steps, cuda_graph=cuda_graph, cfg_scale=cfg_scale,
                  classifier_scale=classifier_scale, seed=seed,
                  scale_without_classifier=classifier_scale != 0 and classifier is None)
    num_samples, batch_size = int(num_samples), int(batch_size)
    device = torch.device(device if device is not None else next(model.parameters()).device)
    num_classes = getattr(model, "num_classes", None)
    class_cond = num_classes is not None
    image_size = model.image_size
    is_sr = isinstance(model, SuperResModel)
    if is_sr != (low_res is not None):
        raise ValueError("a super-resolution model needs low_res samples" if is_sr else
                         "low_res samples are for super-resolution models only")
    if is_sr:
        check_low_res(low_res, low_res_labels, image_size, class_cond)
        if class_cond:
            check_labels(low_res_labels, num_classes, "low_res_labels")
    if classifier is not None:
        check_classifier_size(classifier.image_size, image_size)
    guided = classifier is not None and classifier_scale != 0
    labels = None if is_sr else (num_classes if class_cond else
                                 classifier.out_channels if guided else None)
    what = ("a super-resolution model (its labels come with low_res)" if is_sr else
            "the model" if class_cond else "the classifier" if guided else
            "an unconditional model without classifier guidance")
    classes = check_classes(classes, labels, what)
    draws = None if labels is None else named_labels(model if class_cond else classifier, labels)

    model_fn = model
    if cfg_scale is not None:
        model_fn = classifier_free_guidance(model, cfg_scale)
    elif guided and not class_cond:
        model_fn = _DropLabels(model)
    loop, loop_kwargs = _loop(diffusion, sampler, eta, steps)
    if cuda_graph:
        loop_kwargs["cuda_graph"] = True
    return _Plan(model_fn, classifier_cond_fn(classifier, classifier_scale) if guided else None,
                 loop, loop_kwargs, num_samples, batch_size, image_size, device, clip_denoised,
                 draws, None if classes is None else torch.tensor(classes, device=device),
                 low_res, None if not (is_sr and class_cond) else np.asarray(low_res_labels))


def _sample_batch(plan: _Plan, b: int, progress: Progress | None):
    bs, dev = plan.batch_size, plan.device
    kwargs = {}
    if plan.low_res is not None:
        idx = np.arange(b * bs, (b + 1) * bs) % len(plan.low_res)  # cycled, in order
        kwargs["low_res"] = low_res_batch(plan.low_res[idx], dev)
        if plan.low_res_labels is not None:
            kwargs["y"] = torch.as_tensor(plan.low_res_labels[idx], dtype=torch.long, device=dev)
    elif plan.classes is not None:  # the same single draw as below, over the chosen classes
        kwargs["y"] = plan.classes[torch.randint(0, len(plan.classes), (bs,), device=dev)]
    elif plan.labels_from is not None:
        kwargs["y"] = torch.randint(0, plan.labels_from, (bs,), device=dev)
    if progress is not None:
        progress.start_batch()
    final = None
    for final in plan.loop(plan.model_fn, (bs, 3, plan.image_size, plan.image_size),  # noqa: B007 (the last is the result)
                           clip_denoised=plan.clip_denoised, cond_fn=plan.cond_fn,
                           model_kwargs=kwargs, device=dev, **plan.loop_kwargs):
        if progress is not None:
            progress.step()
    keep = min(bs, plan.num_samples - b * bs)
    images = to_uint8_nhwc(final["sample"][:keep]).cpu().numpy()
    labels = kwargs["y"][:keep].cpu().numpy().astype(np.int64) if "y" in kwargs else None
    if progress is not None:
        progress.end_batch(keep)
    return images, labels


def _check_batch(plan: _Plan, b) -> None:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or \
            not 0 <= b < plan.num_batches:
        raise ValueError(f"batch index {b!r} is not in 0..{plan.num_batches - 1}")


def _run(plan: _Plan, order: Iterable[int], seed: int | None, progress: Progress | None):
    cuda = [plan.device] if plan.device.type == "cuda" else []
    for b in order:
        _check_batch(plan, b)  # an iterator's indices are checked as they come
        rng = torch.random.fork_rng(devices=cuda) if seed is not None else \
            contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(batch_seed(seed, b))
            images, labels = _sample_batch(plan, b, progress)
        yield b, images, labels


def iter_batches(model: nn.Module, diffusion, *, num_samples: int, batch_size: int,
                 batches: Iterable[int] | None = None, seed: int | None = 0,
                 progress: Progress | None = None,
                 **options) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (b, uint8 images [k, H, W, 3], int64 labels [k] or None) for each
    batch index b in `batches` (default all, in order), k = the images of
    batch b that are within num_samples. The arguments are sample_images's
    (checked here, before the first batch); progress: a sampling.progress.Progress."""
    plan = _plan(model, diffusion, num_samples=num_samples, batch_size=batch_size, seed=seed,
                 **options)
    seed = None if seed is None else int(seed)
    # Never a list of every batch: num_samples 1e9 with batch_size 1 would hold a
    # billion indices before the first batch. A sequence given is checked whole
    # here, an iterator as it is consumed.
    order = range(plan.num_batches) if batches is None else batches
    if isinstance(order, Sequence) and not isinstance(order, range):
        for b in order:
            _check_batch(plan, b)
    elif isinstance(order, range) and len(order):
        for b in (order[0], order[-1]):
            _check_batch(plan, b)
    return _run(plan, order, seed, progress)


def sample_images(model: nn.Module, diffusion, *, num_samples: int, batch_size: int,
                  classifier: nn.Module | None = None, classifier_scale: float = 0.0,
                  cfg_scale: float | None = None, sampler: str = "ddpm", eta: float = 0.0,
                  steps: int | None = None, clip_denoised: bool = True,
                  low_res: np.ndarray | None = None, low_res_labels=None,
                  classes: Sequence[int] | None = None, seed: int | None = 0, device=None,
                  progress: bool = False,
                  cuda_graph: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Sample `num_samples` images in batches of `batch_size`.

    sampler: "ddpm" (p_sample_loop), "ddim" (ddim_sample_loop, with eta) or
    "dpm++" (dpm_solver_sample_loop; steps=N picks N timesteps uniform in
    log-SNR, None runs over the diffusion's own timesteps).
    classifier, classifier_scale: classifier guidance; scale 0 samples as
    without a classifier. cfg_scale: classifier-free guidance weight (the model
    needs a null class). low_res, low_res_labels: super-resolution input, the
    uint8 NHWC samples (and labels, for a class-conditional model) of a base
    model, used in order and cycled. classes: draw the labels uniformly from
    these classes (sorted, each once: label = classes[randint(0, len(classes))])
    instead of from the model's (or the guiding classifier's): those it names
    (`class_names`, from its file's metadata), else all its labels.
    cuda_graph: replay each whole step as a CUDA graph (ddpm, ddim).

    seed: batch b (images b*batch_size ...) is sampled after
    torch.manual_seed(batch_seed(seed, b)), drawing first its labels (one
    randint of batch_size), then the loop's noise (x_T, then each step's), as
    guided-diffusion does after a manual_seed. So a batch's images depend only
    on (seed, b), and any subset of batches, in any order or process, gives the
    same images as one run. The caller's RNG state is left as it was. None:
    no seeding, the batches draw from the current RNG state one after another.

    Returns (uint8 [N, H, W, 3], int64 labels [N] or None, stats) where labels
    are there when the images were drawn for classes (class-conditional model
    or classifier guidance) and stats holds seconds, images_per_s,
    ms_per_step, steps (per batch) and batches.
    """
    options = dict(classifier=classifier, classifier_scale=classifier_scale, cfg_scale=cfg_scale,
                   sampler=sampler, eta=eta, steps=steps, clip_denoised=clip_denoised,
                   low_res=low_res, low_res_labels=low_res_labels, classes=classes,
                   device=device, cuda_graph=cuda_graph)
    bar = Progress(progress, total=num_samples, steps=0)
    batches = iter_batches(model, diffusion, num_samples=num_samples, batch_size=batch_size,
                           seed=seed, progress=bar, **options)  # checks the arguments
    num_steps = (len(diffusion.log_snr_timesteps(int(steps))) if steps is not None
                 else diffusion.num_timesteps)
    bar.steps = num_steps
    images, labels = [], []
    with bar:
        start = time.perf_counter()
        for _, imgs, labs in batches:
            images.append(imgs)
            if labs is not None:
                labels.append(labs)
        where = torch.device(device if device is not None else next(model.parameters()).device)
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        seconds = time.perf_counter() - start
    n_batches = len(images)
    stats = dict(seconds=seconds, images_per_s=num_samples / seconds,
                 ms_per_step=1000.0 * seconds / (n_batches * num_steps), steps=num_steps,
                 batches=n_batches, sampler=sampler)
    return np.concatenate(images), np.concatenate(labels) if labels else None, stats


# --- output files ------------------------------------------------------------------

def write_png(images: np.ndarray, path: str) -> str | None:
    """A .png grid of the first images (atomically); None without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return None
    grid = Image.fromarray(image_grid(images))
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return path


def save_samples(images: np.ndarray, labels: np.ndarray | None, out_dir: str,
                 png: bool = True, overwrite: bool = False) -> dict[str, str]:
    """Write samples_{N}x{H}x{W}x3.npz as guided-diffusion does (arr_0 the uint8
    images, arr_1 the labels when there are any; the same arrays always give
    the same bytes) and, with png and Pillow installed, a .png grid of the
    first images, each written atomically. Returns {"npz": path, "png": path}.
    An .npz already there is kept (adm_fast.io.OutputExists, nothing
    written) unless overwrite=True. Raises adm_fast.io.OutputError (naming
    the file: disk full, ...)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "samples_" + "x".join(str(s) for s in images.shape))
    arrays = (images,) if labels is None else (images, labels)
    written = {"npz": stem + ".npz"}
    try:
        atomic_write(written["npz"], lambda f: write_npz(f, npz_members(*arrays)),
                     replace=overwrite)
    except OutputExists:
        raise OutputExists(f"{written['npz']} is already there: pass overwrite=True to "
                           "replace it, or another out_dir") from None
    if png and write_png(images, stem + ".png"):
        written["png"] = stem + ".png"
    return written
