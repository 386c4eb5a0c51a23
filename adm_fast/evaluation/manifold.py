"""Improved Precision and Recall (Kynkäänniemi et al. 2019) as guided-diffusion's
evaluator computes them (its ManifoldEstimator and DistanceBlock).

- Distances are squared Euclidean, max(|u|^2 - 2 u.v + |v|^2, 0), computed per
  block of rows x columns in fp16 and returned as fp32; a block in which any
  fp16 entry is not finite is computed again in fp32.
- A point's radius is the (k+1)-th smallest distance to the set it belongs
  to, the point itself included (np.partition's index k with k = 3, i.e. the
  3rd nearest other point).
- A point is on a manifold when its distance to some point of the other set
  is <= that point's radius. Precision: the share of samples on the reference
  manifold; recall: the share of reference points on the sample manifold.
The blocks are the evaluator's 10000 x 10000 by default; a row block keeps
only its k+1 smallest distances per column block, so no [rows, N] buffer is
needed (the (k+1)-th smallest of the union is the same value).
"""

from __future__ import annotations

import numpy as np
import torch

from .batches import EvaluationError, positive_int
from .stats import as_matrix, resolve_device

BLOCK = 10000


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = u.square().sum(1, keepdim=True)
    norm_v = v.square().sum(1).unsqueeze(0)
    return torch.clamp_min(norm_u - 2 * (u @ v.T) + norm_v, 0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[n, m] fp32 squared distances between the rows of u [n, D] and v [m, D]:
    the evaluator's DistanceBlock (fp16, or fp32 where fp16 is not finite)."""
    d = _squared_distances(u.half(), v.half())
    if bool(torch.isfinite(d).all()):
        return d.float()
    return _squared_distances(u.float(), v.float())


def _features(x, name: str, device) -> torch.Tensor:
    # The evaluator feeds fp32 placeholders; the fp16 cast happens in the block.
    return as_matrix(x, name).to(device, torch.float32)


def _radii(x: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    n = x.shape[0]
    if n <= k:
        raise EvaluationError(f"manifold radii with k={k} need more than {k} feature vectors, "
                              f"got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rows):
        block = x[r0:r0 + rows]
        smallest = []
        for c0 in range(0, n, cols):
            d = pairwise_distances(block, x[c0:c0 + cols])
            smallest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii[r0:r0 + rows] = torch.cat(smallest, 1).kthvalue(k + 1, dim=1).values
    return radii


def manifold_radii(features, k: int = 3, row_batch_size: int = BLOCK,
                   col_batch_size: int = BLOCK, device=None) -> np.ndarray:
    """[N] fp32: each feature vector's distance to its k-th nearest neighbour in
    `features` [N, D] (numpy or tensor), as the evaluator's manifold_radii."""
    dev = resolve_device(device, features)
    x = _features(features, "features", dev)
    radii = _radii(x, positive_int(k, "k"), positive_int(row_batch_size, "row_batch_size"),
                   positive_int(col_batch_size, "col_batch_size"))
    return radii.cpu().numpy()


def _on_manifolds(ref, ref_radii, sample, sample_radii, rows: int, cols: int):
    """(ref points on the sample manifold, samples on the reference manifold)."""
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(sample.shape[0], dtype=torch.bool, device=ref.device)
    for r0 in range(0, ref.shape[0], rows):
        for c0 in range(0, sample.shape[0], cols):
            d = pairwise_distances(ref[r0:r0 + rows], sample[c0:c0 + cols])
            ref_in[r0:r0 + rows] |= (d <= sample_radii[None, c0:c0 + cols]).any(1)
            sample_in[c0:c0 + cols] |= (d <= ref_radii[r0:r0 + rows, None]).any(0)
    return ref_in, sample_in


def precision_recall(ref_features, sample_features, k: int = 3,
                     row_batch_size: int = BLOCK, col_batch_size: int = BLOCK,
                     device=None) -> tuple[float, float]:
    """(precision, recall) of sample_features [N2, D] against ref_features [N1, D],
    as the evaluator's compute_prec_recall (numpy arrays or tensors)."""
    k = positive_int(k, "k")
    rows = positive_int(row_batch_size, "row_batch_size")
    cols = positive_int(col_batch_size, "col_batch_size")
    dev = resolve_device(device, ref_features, sample_features)
    ref = _features(ref_features, "ref_features", dev)
    sample = _features(sample_features, "sample_features", dev)
    if ref.shape[1] != sample.shape[1]:
        raise EvaluationError(f"ref_features are {ref.shape[1]}-d but sample_features are "
                              f"{sample.shape[1]}-d")
    ref_in, sample_in = _on_manifolds(ref, _radii(ref, k, rows, cols), sample,
                                      _radii(sample, k, rows, cols), rows, cols)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
