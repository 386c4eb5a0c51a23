"""The paper's metrics (Inception Score, FID, sFID, Precision, Recall), numerically
guided-diffusion's evaluations/evaluator.py, in PyTorch.

    from adm_fast.evaluation import Evaluator, frechet_distance, inception_score
    ev = Evaluator()                                  # torch-fidelity's InceptionV3 weights
    print(ev.evaluate("VIRTUAL_imagenet64_labeled.npz", "samples_50000x64x64x3.npz"))

`adm-fast evaluate REF_BATCH SAMPLE_BATCH` is the command. The statistics take
numpy arrays or tensors: `frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6)`,
`inception_score(softmax_probs, split_size=5000)`, `precision_recall(ref_features,
sample_features, k=3)` -> (precision, recall), `manifold_radii(features, k=3)`,
`feature_statistics(features)` -> Statistics(mu, sigma).

Names are resolved on first use, so importing this package (as the CLI does
for --help) loads neither scipy nor the network library.
"""

import importlib

_EXPORTS = {
    "EvaluationError": "batches",
    "Statistics": "stats", "feature_statistics": "stats", "frechet_distance": "stats",
    "inception_score": "stats",
    "manifold_radii": "manifold", "pairwise_distances": "manifold",
    "precision_recall": "manifold",
    "InceptionV3": "network", "random_weights": "network", "default_weights_path": "network",
    "Evaluator": "evaluator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
