"""guided-diffusion's FID statistics and Inception Score, formula for formula.

evaluations/evaluator.py computes, in numpy:
- statistics: mu = mean of the activations (fp32, as np.mean of fp32 gives),
  sigma = np.cov(rowvar=False) (fp64: np.cov upcasts and centres in fp64);
- the Fréchet distance |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)),
  with scipy's sqrtm; when that has a non-finite entry (a singular product) it
  warns and retries with eps on both diagonals; an imaginary part above 1e-3 on
  the diagonal of the root is an error, a smaller one is dropped;
- the Inception Score: softmax predictions in splits of 5000, exp of the mean
  KL(p(y|x) || p(y)) per split, averaged over the splits (the last split may
  be short, as there).

Here the covariance runs in torch, in fp64, on the device, streamed in row
chunks (two passes: mean, then the centred outer products, which is np.cov's
arithmetic); the Fréchet distance is fp64 throughout (the evaluator forms
mu1 - mu2 in the means' fp32, a difference far below the metric's noise).
The IS uses the convention 0 log 0 = 0, where the evaluator's numpy would
return NaN for a probability that underflowed to exactly 0.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from .batches import EvaluationError, positive_int

_CHUNK = 8192  # rows per step of the streamed covariance


def resolve_device(device, *arrays) -> torch.device:
    """`device`, else the first tensor's device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_matrix(x, name: str) -> torch.Tensor:
    """A numpy array or tensor as a finite 2-D float tensor (left on its device)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 2 or min(t.shape) < 1:
        raise EvaluationError(f"{name} has shape {list(t.shape)}: expected [N, D] with N, D >= 1")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise EvaluationError(f"{name} is {t.dtype}: expected real numbers")
    t = t.detach()
    if not torch.isfinite(t).all():
        raise EvaluationError(f"{name} holds NaN or infinite values")
    return t


@dataclasses.dataclass
class Statistics:
    """The evaluator's FIDStatistics: mu [D] (fp32) and sigma [D, D] (fp64)."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other: Statistics, eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def feature_statistics(features, device=None) -> Statistics:
    """mu and np.cov(features, rowvar=False) of [N, D] features, N >= 2."""
    x = as_matrix(features, "features")
    n = x.shape[0]
    if n < 2:
        raise EvaluationError("features: a covariance needs at least 2 feature vectors, got 1")
    dev = resolve_device(device, features)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    for start in range(0, n, _CHUNK):
        total += x[start:start + _CHUNK].to(dev, torch.float64).sum(0)
    mean = total / n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=dev)
    for start in range(0, n, _CHUNK):
        c = x[start:start + _CHUNK].to(dev, torch.float64) - mean
        cov.addmm_(c.T, c)
    cov /= n - 1
    return Statistics(mean.float().cpu().numpy(), cov.cpu().numpy())


def _checked(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = (np.atleast_1d(np.asarray(_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64))
                      for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise EvaluationError(f"frechet_distance: the means have shapes {list(mu1.shape)} and "
                              f"{list(mu2.shape)}; expected two vectors of one length")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise EvaluationError(f"frechet_distance: {name} has shape {list(s.shape)}; "
                                  f"expected [{d}, {d}] to match the means")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise EvaluationError(f"frechet_distance: {name} holds NaN or infinite values")
    return mu1, sigma1, mu2, sigma2


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as the evaluator's
    FIDStatistics.frechet_distance (numpy arrays or tensors)."""
    try:
        from scipy import linalg
    except ImportError:
        raise EvaluationError("frechet_distance needs scipy (its sqrtm, as the evaluator): "
                              "pip install scipy") from None

    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # The evaluator calls sqrtm(disp=False), which keeps scipy quiet about a
        # singular or ill-conditioned product; the fallback below is the warning.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to "
                          "diagonal of cov estimates", RuntimeWarning, stacklevel=3)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise EvaluationError(f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary "
                                  f"component of {m:.3g} (the evaluator's limit is 1e-3 on the "
                                  "diagonal): are both covariances symmetric positive "
                                  "semi-definite?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(softmax_probs, split_size: int = 5000, device=None) -> float:
    """The evaluator's Inception Score of [N, classes] softmax predictions."""
    split_size = positive_int(split_size, "split_size")
    p = as_matrix(softmax_probs, "softmax_probs")
    p = p.to(resolve_device(device, softmax_probs), torch.float64)
    if (p < 0).any():
        raise EvaluationError("softmax_probs has negative entries: pass probabilities "
                              "(softmax of the logits), not logits")
    worst = (p.sum(1) - 1).abs().max().item()
    if worst > 1e-3:  # loose enough for probabilities stored in fp16
        raise EvaluationError(f"softmax_probs: a row's sum differs from 1 by {worst:.3g}; "
                              "expected probabilities (rows summing to 1)")
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start:start + split_size]
        marginal = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(math.exp(kl.sum(1).mean().item()))
    return float(np.mean(scores))
