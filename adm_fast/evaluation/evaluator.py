"""guided-diffusion's Evaluator (evaluations/evaluator.py) on torch-fidelity's
InceptionV3: activations streamed batch by batch through the network on the
device, then the evaluator's statistics (stats.py, manifold.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from .batches import (
    EvaluationError,
    check_images,
    folder_images,
    open_images,
    positive_int,
    read_stats,
    write_reference,
)
from .manifold import BLOCK, precision_recall
from .network import InceptionV3, ieee_fp32, read_weights
from .stats import Statistics, feature_statistics, inception_score, resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Activations = tuple[np.ndarray, np.ndarray]  # (pool_3 [N, 2048], spatial [N, 2023]), fp32


def _device(device) -> torch.device:
    try:
        dev = resolve_device(device)
    except RuntimeError as e:
        raise EvaluationError(f"device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r}: CUDA is not available here")
    return dev


class Evaluator:
    """The evaluator's network part and its metrics.

    weights: a state dict, a .pth/.safetensors path, or None for
    torch-fidelity's cache location (never downloaded). device: default CUDA
    when present. batch_size: images per forward (the evaluator's 64).
    dtype: "fp32" (the evaluator's arithmetic; IEEE fp32 convolutions on
    CUDA too) or "bf16" (autocast, faster on a GPU, not the paper's numbers).
    """

    def __init__(self, weights=None, device=None, batch_size: int = 64, dtype: str = "fp32",
                 softmax_batch_size: int = 512, progress: bool = False,
                 row_batch_size: int = BLOCK, col_batch_size: int = BLOCK):
        if dtype not in DTYPES:
            raise EvaluationError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = _device(device)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.softmax_batch_size = positive_int(softmax_batch_size, "softmax_batch_size")
        self.blocks = (positive_int(row_batch_size, "row_batch_size"),
                       positive_int(col_batch_size, "col_batch_size"))
        self.dtype, self.progress = dtype, progress
        if isinstance(weights, Mapping):
            state_dict, where = weights, "the weights given"
        else:
            path = None if weights is None else os.fspath(weights)
            state_dict, where = read_weights(path), path or "the cached weights"
        self.network = InceptionV3(state_dict, where).to(self.device)

    def _forward(self, batch) -> Activations:
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))
        x = x.to(self.device)
        with torch.no_grad():
            if self.dtype == "fp32":
                with ieee_fp32(self.device):
                    pool, spatial = self.network(x)
            else:
                with torch.autocast(self.device.type, dtype=DTYPES[self.dtype]):
                    pool, spatial = self.network(x)
        return pool.cpu().numpy(), spatial.cpu().numpy()

    def _run(self, batches: Iterable, total: int | None, where: str,
             keep: Callable | None = None) -> Activations:
        from tqdm.auto import tqdm

        pools, spatials = [], []
        with tqdm(total=total, unit="img", desc=where, disable=not self.progress,
                  file=sys.stderr, leave=False) as bar:
            for batch in batches:
                check_images(batch, where)
                pool, spatial = self._forward(batch)
                pools.append(pool)
                spatials.append(spatial)
                if keep is not None:
                    keep(batch)
                bar.update(len(batch))
        if not pools:
            raise EvaluationError(f"{where}: no images")
        return np.concatenate(pools), np.concatenate(spatials)

    def compute_activations(self, images) -> Activations:
        """(pool_3, spatial) fp32 features of uint8 [N, H, W, 3] images (an array or
        tensor, taken batch_size at a time, or an iterable of such batches)."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            check_images(images, "images")
            n = len(images)
            return self._run((images[i:i + self.batch_size] for i in range(0, n, self.batch_size)),
                             n, "images")
        return self._run(images, None, "images")

    def read_activations(self, npz_path: str) -> Activations:
        """Activations of an evaluator batch's arr_0, streamed from the file."""
        with open_images(npz_path) as reader:
            return self._run(reader.batches(self.batch_size), len(reader), npz_path)

    def softmax(self, pool) -> np.ndarray:
        """[N, 1008] softmax of pool_3 @ W (softmax/logits/MatMul: no bias), fp32."""
        w = self.network.logits_weight
        out = []
        for start in range(0, len(pool), self.softmax_batch_size):
            x = torch.as_tensor(pool[start:start + self.softmax_batch_size]).to(w.device)
            with torch.no_grad():
                out.append(torch.softmax(x.float() @ w.T, dim=1).cpu().numpy())
        return np.concatenate(out)

    def compute_inception_score(self, pool, split_size: int = 5000) -> float:
        return inception_score(self.softmax(pool), split_size=split_size, device=self.device)

    def compute_statistics(self, activations) -> Statistics:
        return feature_statistics(activations, device=self.device)

    def read_statistics(self, npz_path: str, activations: Activations
                        ) -> tuple[Statistics, Statistics]:
        """The NPZ's own mu, sigma, mu_s, sigma_s when it has them (as the
        evaluator), else those of the activations."""
        stats = read_stats(npz_path)
        if stats is not None:
            return (Statistics(stats["mu"], stats["sigma"]),
                    Statistics(stats["mu_s"], stats["sigma_s"]))
        return tuple(self.compute_statistics(a) for a in activations)

    def compute_prec_recall(self, ref_pool, sample_pool) -> tuple[float, float]:
        rows, cols = self.blocks
        return precision_recall(ref_pool, sample_pool, k=3, row_batch_size=rows,
                                col_batch_size=cols, device=self.device)

    def evaluate(self, ref_batch: str, sample_batch: str) -> dict[str, float]:
        """The evaluator's five numbers, in its order and with its names."""
        ref_acts = self.read_activations(ref_batch)
        ref_stats, ref_spatial = self.read_statistics(ref_batch, ref_acts)
        sample_acts = self.read_activations(sample_batch)
        sample_stats, sample_spatial = self.read_statistics(sample_batch, sample_acts)
        precision, recall = self.compute_prec_recall(ref_acts[0], sample_acts[0])
        return {"Inception Score": self.compute_inception_score(sample_acts[0]),
                "FID": sample_stats.frechet_distance(ref_stats),
                "sFID": sample_spatial.frechet_distance(ref_spatial),
                "Precision": precision, "Recall": recall}

    def save_reference(self, source: str, out_path: str, image_size: int | None = None) -> int:
        """Write a reference batch (arr_0 and mu, sigma, mu_s, sigma_s) from a folder of
        images or an NPZ, in one streamed pass; returns the number of images."""
        if os.path.isdir(source):
            shape, batches = folder_images(source, image_size)
            acts = self._write(out_path, shape, batches(self.batch_size), source)
            return len(acts[0])
        if image_size is not None:
            raise EvaluationError("--image_size resizes the images of a folder; an NPZ's "
                                  "arr_0 is used as it is")
        with open_images(source) as reader:
            acts = self._write(out_path, reader.shape, reader.batches(self.batch_size), source)
        return len(acts[0])

    def _write(self, out_path, shape, batches, where) -> Activations:
        acts = []

        def fill(write) -> dict:
            acts.append(self._run(batches, shape[0], where, keep=write))
            s, s_sp = (self.compute_statistics(a) for a in acts[0])
            return {"mu": s.mu, "sigma": s.sigma, "mu_s": s_sp.mu, "sigma_s": s_sp.sigma}

        write_reference(out_path, shape, fill)
        return acts[0]
