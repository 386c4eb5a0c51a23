"""The demo's experiment: guided sampling at several classifier scales, judged
by an independent clean classifier, and timed against the eager reference.

Every scale starts from the same seed, so sample i sees the same x_T and the
same per-step noise at every scale: the grids differ only by the guidance.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..checkpoint import load_checkpoint
from ..diffusion import classifier_cond_fn, create_gaussian_diffusion
from ..io import atomic_write
from ..models import EncoderUNetModel, UNetModel, use_preferred_layout
from ..sampling import grid as _grid
from . import digits
from .flags import DemoError
from .train import PARTS, SCHEDULE

GRID_FILL = 64  # grey between the tiles: black digits stay visible
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclass
class Row:
    scale: float
    fidelity: float
    diversity: float
    images_per_s: float
    eager_images_per_s: float | None
    seconds: float


def _schedule() -> dict[str, str]:
    return dict(zip(SCHEDULE[0::2], SCHEDULE[1::2]))


def load_models(weights_dir: str = WEIGHTS_DIR, device="cpu") -> dict[str, torch.nn.Module]:
    """The three demo models in fp32, eval mode, on `device`, checked to be
    what the demo expects."""
    models = {}
    for part in PARTS:
        path = os.path.join(weights_dir, f"{part}.safetensors")
        if not os.path.isfile(path):
            raise DemoError(f"missing {path}: the demo needs {', '.join(PARTS)}.safetensors "
                            "(run with --train to make them)")
        models[part] = load_checkpoint(path, device=device)
    unet, clf, clean = (models[p] for p in PARTS)
    if not isinstance(unet, UNetModel) or unet.num_classes is not None:
        raise DemoError(f"{weights_dir}: diffusion.safetensors must be an unconditional UNet")
    for name, m in (("classifier", clf), ("clean", clean)):
        if not isinstance(m, EncoderUNetModel):
            raise DemoError(f"{weights_dir}: {name}.safetensors must be a classifier")
        if m.image_size != unet.image_size:
            raise DemoError(f"{weights_dir}: {name} is for {m.image_size}px images, the "
                            f"diffusion model makes {unet.image_size}px ones")
    if clean.pool != "attention":
        raise DemoError(f"{weights_dir}: the clean classifier must pool 'attention' (its pooled "
                        "token is the feature that diversity is measured on)")
    return models


def make_diffusion(steps: int):
    s = _schedule()
    return create_gaussian_diffusion(steps=int(s["--diffusion_steps"]),
                                     learn_sigma=s["--learn_sigma"] == "True",
                                     noise_schedule=s["--noise_schedule"],
                                     timestep_respacing=str(steps))


def demo_labels(num_samples: int) -> torch.Tensor:
    """Digits 0..9 in turn, so every digit is asked for equally often."""
    return torch.arange(num_samples) % digits.NUM_DIGITS


def _unconditional(model):
    # The labels in model_kwargs are for cond_fn; the diffusion model has none.
    def model_fn(x, t, y=None):
        return model(x, t)
    return model_fn


def _batches(labels: torch.Tensor, batch_size: int):
    return [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":  # the GPU's queued work belongs to the time measured
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample(models, diffusion, scale: float, labels: torch.Tensor, batch_size: int,
           seed: int, max_steps: int | None = None) -> tuple[np.ndarray | None, float, int]:
    """(uint8 NHWC samples or None, seconds, loop steps run).

    Ancestral sampling with guided-diffusion's cond_fn; scale 0 skips the
    classifier (its shift would be exactly zero). With max_steps, only the
    first batch's first max_steps steps run (a timing probe; no images).
    """
    cond_fn = classifier_cond_fn(models["classifier"], scale) if scale else None
    model_fn = _unconditional(models["diffusion"])
    size = models["diffusion"].image_size
    device = next(models["diffusion"].parameters()).device
    out, steps_run = [], 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        start = _clock(device)
        for y in _batches(labels.to(device), batch_size):
            loop = diffusion.p_sample_loop_progressive(
                model_fn, (len(y), 3, size, size), cond_fn=cond_fn, model_kwargs={"y": y},
                device=device)
            if max_steps is not None:
                for _ in itertools.islice(loop, max_steps):
                    steps_run += 1
                return None, _clock(device) - start, steps_run
            final = None
            for final in loop:  # noqa: B007 (the last is the result)
                steps_run += 1
            out.append(((final["sample"] + 1) * 127.5).clamp(0, 255).to(torch.uint8))
        seconds = _clock(device) - start
    images = torch.cat(out).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return images, seconds, steps_run


@torch.no_grad()
def judge(clean: EncoderUNetModel, images: np.ndarray,
          batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted digit [N], L2-normalised features [N, D]) from the clean classifier.

    The features are the attention pool's pooled token before its output
    projection: the classifier's penultimate representation. Only the 10
    digit logits are compared: the other 990 of guided-diffusion's 1000
    outputs were never a target.
    """
    feats: list[torch.Tensor] = []
    hook = clean.out[2].c_proj.register_forward_pre_hook(
        lambda _m, args: feats.append(args[0][:, :, 0]))
    preds = []
    device = next(clean.parameters()).device
    try:
        x_all = digits.to_model_input(images).to(device)
        for x in x_all.split(batch_size):
            logits = clean(x, torch.zeros(len(x), dtype=torch.long, device=device))
            preds.append(logits[:, :digits.NUM_DIGITS].argmax(dim=1))
    finally:
        hook.remove()
    f = torch.cat(feats).flatten(1).float()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat(preds).cpu().numpy(), f.cpu().numpy()


def fidelity(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise distance among samples of the same label, averaged over
    labels with at least two samples."""
    per_label = []
    for d in np.unique(labels):
        f = features[labels == d].astype(np.float64)
        n = len(f)
        if n < 2:
            continue
        dist = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 0.0))
        per_label.append(dist[np.triu_indices(n, 1)].mean())
    return float(np.mean(per_label)) if per_label else float("nan")


def heldout_reference(clean: EncoderUNetModel) -> tuple[float, float]:
    """(fidelity, diversity) of the real held-out digits, by their true labels."""
    images8, labels = digits.load_heldout()
    preds, feats = judge(clean, digits.upsample(images8))
    return fidelity(preds, labels), diversity(feats, labels)


def engine_models(models, device) -> dict[str, torch.nn.Module]:
    """adm_fast's copies of the models, in the device's preferred layout for
    sampling; the originals stay as loaded: guided-diffusion's computation, for
    the eager column."""
    return {k: use_preferred_layout(copy.deepcopy(m), device) for k, m in models.items()}


def warm_up(runs, diffusion, batch_size: int) -> None:
    """One guided step per (models, backend) before timing: the first call pays
    for loading extensions and picking kernels, which is no sampler's speed."""
    y = demo_labels(min(2, batch_size))
    for models, backend in runs:
        with ops.use_backend(backend):
            sample(models, diffusion, 1.0, y, len(y), seed=0, max_steps=1)


# Interleaved timing rounds per speed column: with two, one slow moment of a
# shared machine moved the printed speed-up from run to run, and four still
# spread it; six fit in the time the default 30 steps leave
# (docs/performance.md).
ROUNDS = 6


def step_rates(runs, diffusion, scale: float, labels: torch.Tensor, batch_size: int,
               seed: int, steps: int, rounds: int = ROUNDS) -> list[float]:
    """images/s of each (models, backend) in runs, all measured alike: `steps`
    steps of the same batch, after a warm-up, in interleaved rounds (a noisy
    machine slows them all alike), the median per step scaled to the full loop."""
    probe = labels[:batch_size]
    per_step: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, (models, backend) in enumerate(runs):
            with ops.use_backend(backend):
                secs, run = sample(models, diffusion, scale, probe, batch_size, seed,
                                   max_steps=steps)[1:]
            per_step[i].append(secs / run)
    return [len(probe) / (float(np.median(t)) * diffusion.num_timesteps) for t in per_step]


def run_scale(fast, eager, diffusion, scale: float, num_samples: int, batch_size: int,
              seed: int, probe_steps: int, rates: dict) -> tuple[Row, np.ndarray]:
    """Sample one scale with adm_fast (its default backend and layout) and judge
    it. The speed columns come from step_rates, once per kind of step (guided or
    not: the work per step is the same at every nonzero scale), kept in rates."""
    labels = demo_labels(num_samples)
    images, seconds, _ = sample(fast, diffusion, scale, labels, batch_size, seed)
    preds, feats = judge(fast["clean"], images)
    y = labels.numpy()
    fast_rate, eager_rate = num_samples / seconds, None
    if probe_steps:
        key = scale != 0
        if key not in rates:
            rates[key] = step_rates([(fast, "auto"), (eager, "eager")], diffusion, scale,
                                    labels, batch_size, seed, probe_steps)
        fast_rate, eager_rate = rates[key]
    row = Row(scale, fidelity(preds, y), diversity(feats, y), fast_rate, eager_rate, seconds)
    return row, images


def grid(images: np.ndarray, labels: Sequence[int], max_cols: int = 10,
         zoom: int | None = None, pad: int = 2) -> np.ndarray:
    """One row per digit asked for (up to its first `max_cols` samples), enlarged
    (nearest) to a readable size (default: grid.zoom_for the image size)."""
    labels = np.asarray(labels)
    cols = min(max_cols, int(np.bincount(labels, minlength=digits.NUM_DIGITS).max()))
    zoom = _grid.zoom_for(*images.shape[1:3]) if zoom is None else zoom
    rows = [np.flatnonzero(labels == d) for d in range(digits.NUM_DIGITS)]
    return _grid.tile(images, rows, cols, zoom=zoom, pad=pad, fill=GRID_FILL)


def save_grid(images: np.ndarray, labels: Sequence[int], path: str) -> str:
    """The grid with each row labelled by its digit, as a PNG."""
    from PIL import Image

    zoom = _grid.zoom_for(*images.shape[1:3])
    tiles = grid(images, labels, zoom=zoom)
    labelled = _grid.label_rows(tiles, [str(d) for d in range(digits.NUM_DIGITS)],
                                row_height=images.shape[1] * zoom, fill=GRID_FILL)
    atomic_write(path, lambda f: Image.fromarray(labelled).save(f, format="PNG"))
    return path


def scale_name(scale: float) -> str:
    return f"scale_{scale:g}.png"
