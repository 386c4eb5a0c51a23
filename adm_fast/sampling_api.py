"""Sampling as a function: batches of images from a loaded model, guided or not,
and guided-diffusion's output files.

`sample_images` is what `adm-fast sample` runs; the demo and the benchmarks
call it too. It keeps guided-diffusion's random draw order per batch (the
labels with `torch.randint(0, num_classes, (batch,))`, then the sampling
loop's own noise) and always samples full batches, truncating the last one,
as guided-diffusion's scripts do: so after `torch.manual_seed(seed)` the same
weights give guided-diffusion's samples. Beside it: reading super-resolution
base samples, gathering samples over torchrun ranks, and writing the .npz and
.png files.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .diffusion import classifier_cond_fn, classifier_free_guidance
from .models import SuperResModel

SAMPLERS = ("ddpm", "ddim", "dpm++")
GRID_MAX_IMAGES = 64  # a PNG of 10,000 samples would be gigapixels; the npz has them all


class _DropLabels(nn.Module):
    """Keeps y away from a model without classes: the labels in model_kwargs
    are for the classifier (guided-diffusion's classifier_sample model_fn)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, **kwargs) -> Tensor:
        return self.model(x, t, **kwargs)


def to_uint8_nhwc(sample: Tensor) -> Tensor:
    """[-1, 1] NCHW -> uint8 NHWC, with guided-diffusion's rounding (truncation)."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def low_res_batch(images: np.ndarray, device) -> Tensor:
    """uint8 NHWC low-res samples -> the model's low_res input in [-1, 1], NCHW."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return batch.permute(0, 3, 1, 2).to(device)


def check_low_res(low_res: np.ndarray, low_res_labels, image_size: int, class_cond: bool):
    if not isinstance(low_res, np.ndarray) or low_res.dtype != np.uint8 or low_res.ndim != 4 \
            or low_res.shape[-1] != 3 or len(low_res) == 0:
        shape = getattr(low_res, "shape", None)
        dtype = getattr(low_res, "dtype", type(low_res).__name__)
        raise ValueError(f"low-res samples must be a non-empty uint8 array [N, H, W, 3] "
                         f"(as image_sample.py writes arr_0), got {dtype} {shape}")
    if low_res.shape[1] > image_size or low_res.shape[2] > image_size:
        raise ValueError(f"low-res samples of {low_res.shape[1]}x{low_res.shape[2]} are larger "
                         f"than the model's {image_size}x{image_size} output")
    if class_cond:
        if low_res_labels is None:
            raise ValueError("a class-conditional super-resolution model needs the low-res "
                             "samples' labels (arr_1)")
        if np.shape(low_res_labels) != (len(low_res),):
            raise ValueError(f"need one label per low-res sample ({len(low_res)}), got labels "
                             f"of shape {np.shape(low_res_labels)}")


def load_base_samples(path: str, small_size: Optional[int] = None):
    """(uint8 NHWC images, labels or None) from an .npz as image_sample.py writes it
    (arr_0, and arr_1 when there), for super-resolution."""
    if not os.path.isfile(path):
        raise ValueError(f"--base_samples not found: {path}")
    try:
        with np.load(path) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"--base_samples {path} has no arr_0 (found {npz.files})")
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in npz.files else None
    except OSError as e:
        raise ValueError(f"--base_samples {path} is not a readable .npz ({e})") from None
    if small_size is not None and images.ndim == 4 and images.shape[1:3] != (small_size,) * 2:
        raise ValueError(f"--base_samples are {images.shape[1]}x{images.shape[2]} but the "
                         f"model upsamples {small_size}x{small_size} images")
    return images, labels


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


def _loop(diffusion, sampler: str, eta: float, steps: Optional[int]):
    if sampler == "ddpm":
        return diffusion.p_sample_loop_progressive, {}
    if sampler == "ddim":
        return diffusion.ddim_sample_loop_progressive, {"eta": eta}
    return diffusion.dpm_solver_sample_loop_progressive, {"steps": steps}


def sample_images(model: nn.Module, diffusion, *, num_samples: int, batch_size: int,
                  classifier: Optional[nn.Module] = None, classifier_scale: float = 0.0,
                  cfg_scale: Optional[float] = None, sampler: str = "ddpm", eta: float = 0.0,
                  steps: Optional[int] = None, clip_denoised: bool = True,
                  low_res: Optional[np.ndarray] = None, low_res_labels=None,
                  seed: Optional[int] = 0, device=None, progress: bool = False,
                  cuda_graph: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray], Dict]:
    """Sample `num_samples` images in batches of `batch_size`.

    sampler: "ddpm" (p_sample_loop), "ddim" (ddim_sample_loop, with eta) or
    "dpm++" (dpm_solver_sample_loop; steps=N picks N timesteps uniform in
    log-SNR, None runs over the diffusion's own timesteps).
    classifier, classifier_scale: classifier guidance; scale 0 samples as
    without a classifier. cfg_scale: classifier-free guidance weight (the model
    needs a null class). low_res, low_res_labels: super-resolution input, the
    uint8 NHWC samples (and labels, for a class-conditional model) of a base
    model, used in order and cycled. cuda_graph: replay each whole step as a
    CUDA graph (ddpm, ddim). seed: torch.manual_seed for the run
    (the caller's RNG state is left as it was); None uses the current state.

    Returns (uint8 [N, H, W, 3], int64 labels [N] or None, stats) where labels
    are there when the images were drawn for classes (class-conditional model
    or classifier guidance) and stats holds seconds, images_per_s,
    ms_per_step, steps (per batch) and batches.
    """
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta is DDIM's; the {sampler} sampler does not take it")
    if steps is not None and sampler != "dpm++":
        raise ValueError(f"steps picks dpm++'s timesteps; for {sampler}, respace the diffusion "
                         "(timestep_respacing) instead")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    num_classes = getattr(model, "num_classes", None)
    class_cond = num_classes is not None
    image_size = model.image_size
    is_sr = isinstance(model, SuperResModel)
    if is_sr != (low_res is not None):
        raise ValueError("a super-resolution model needs low_res samples" if is_sr else
                         "low_res samples are for super-resolution models only")
    if is_sr:
        check_low_res(low_res, low_res_labels, image_size, class_cond)
    if classifier is not None and classifier.image_size != image_size:
        raise ValueError(f"the classifier is for {classifier.image_size}x{classifier.image_size} "
                         f"images but the model samples {image_size}x{image_size}")
    guided = classifier is not None and classifier_scale != 0
    if guided and not class_cond:
        num_classes = classifier.out_channels
    elif classifier_scale != 0 and classifier is None:
        raise ValueError("classifier_scale needs a classifier")

    model_fn = model
    if cfg_scale is not None:
        model_fn = classifier_free_guidance(model, cfg_scale)
    elif guided and not class_cond:
        model_fn = _DropLabels(model)
    cond_fn = classifier_cond_fn(classifier, classifier_scale) if guided else None
    loop, loop_kwargs = _loop(diffusion, sampler, eta, steps)
    if cuda_graph:
        if sampler == "dpm++":
            raise ValueError("cuda_graph runs the ddpm and ddim steps; dpm++ has no graphed step")
        loop_kwargs["cuda_graph"] = True
    num_steps = (len(diffusion.log_snr_timesteps(int(steps))) if steps is not None
                 else diffusion.num_timesteps)
    batches = math.ceil(num_samples / batch_size)
    shape = (batch_size, 3, image_size, image_size)

    images, labels = [], []
    rng = contextlib.nullcontext()
    if seed is not None:
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, _bars(progress, num_samples, num_steps) as (sample_bar, step_bar):
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        for b in range(batches):
            kwargs = {}
            if is_sr:
                idx = np.arange(b * batch_size, (b + 1) * batch_size) % len(low_res)
                kwargs["low_res"] = low_res_batch(low_res[idx], device)
                if class_cond:
                    kwargs["y"] = torch.as_tensor(np.asarray(low_res_labels)[idx],
                                                  dtype=torch.long, device=device)
            elif class_cond or guided:
                kwargs["y"] = torch.randint(0, num_classes, (batch_size,), device=device)
            step_bar.reset()
            final = None
            for final in loop(model_fn, shape, clip_denoised=clip_denoised, cond_fn=cond_fn,
                              model_kwargs=kwargs, device=device, **loop_kwargs):
                step_bar.update()
            images.append(to_uint8_nhwc(final["sample"]).cpu())
            if "y" in kwargs:
                labels.append(kwargs["y"].cpu())
            sample_bar.update(min(batch_size, num_samples - b * batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

    arr = torch.cat(images)[:num_samples].numpy()
    label_arr = torch.cat(labels)[:num_samples].numpy() if labels else None
    stats = dict(seconds=seconds, images_per_s=num_samples / seconds,
                 ms_per_step=1000.0 * seconds / (batches * num_steps), steps=num_steps,
                 batches=batches, sampler=sampler)
    return arr, label_arr, stats


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def reset(self) -> None:
        pass


@contextlib.contextmanager
def _bars(progress: bool, num_samples: int, num_steps: int):
    if not progress:
        yield _NoBar(), _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=num_samples, desc="samples", unit="img", file=sys.stderr) as samples, \
            tqdm(total=num_steps, desc="steps", unit="step", leave=False,
                 file=sys.stderr) as steps:
        yield samples, steps


def gather_samples(images: np.ndarray, labels: Optional[np.ndarray], device):
    """Every rank's samples (and labels), rank 0's first, on every rank: all_gather,
    as NCCL has no gather. Every rank must pass arrays of the same shapes."""
    import torch.distributed as dist

    def gather(arr):
        t = torch.from_numpy(arr).to(device)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat([p.cpu() for p in parts]).numpy()

    return gather(images), None if labels is None else gather(labels)


# --- output files ------------------------------------------------------------------

def image_grid(images: np.ndarray, max_images: int = GRID_MAX_IMAGES, pad: int = 2) -> np.ndarray:
    """The first max_images of uint8 [N, H, W, 3] tiled in a near-square grid."""
    images = images[:max_images]
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = img
    return grid


def _atomic_write(path: str, write) -> None:
    """Write through a hidden temporary name and rename, so an interrupted run
    leaves no file that looks complete."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.partial{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # else a crash after the rename could still lose the data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_samples(images: np.ndarray, labels: Optional[np.ndarray], out_dir: str,
                 png: bool = True) -> Dict[str, str]:
    """Write samples_{N}x{H}x{W}x3.npz as guided-diffusion does (arr_0 the uint8
    images, arr_1 the labels when there are any) and, with png and Pillow
    installed, a .png grid of the first images. Returns {"npz": path, "png": path}."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "samples_" + "x".join(str(s) for s in images.shape))
    arrays = (images,) if labels is None else (images, labels)
    written = {"npz": stem + ".npz"}
    _atomic_write(written["npz"], lambda f: np.savez(f, *arrays))
    if png:
        try:
            from PIL import Image
        except ImportError:
            print("adm-fast sample: Pillow is not installed; no PNG grid written",
                  file=sys.stderr)
            return written
        written["png"] = stem + ".png"
        grid = Image.fromarray(image_grid(images))
        _atomic_write(written["png"], lambda f: grid.save(f, format="PNG"))
    return written
