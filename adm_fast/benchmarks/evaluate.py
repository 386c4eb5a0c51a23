"""adm-fast evaluate's two costs: Inception feature extraction (images/s) and the
Precision/Recall distance blocks (50,000 x 50,000 at 2048-d on a GPU).

Feature extraction: `Evaluator.compute_activations` on random uint8 images
(resized to 299x299 by the network, as in the evaluator), per dtype, with the
agreement of each dtype's pool_3 and spatial features with fp32 (max |diff| /
max |fp32|) and, with --fid, the FID between the two feature sets. Random
InceptionV3 weights unless --inception PATH (then the FID is the real one).
Distances: every 10000 x 10000 block of the evaluator's DistanceBlock (fp16),
then manifold_radii (the blocks and their k-NN) and precision_recall (3 x N^2),
on CUDA only unless --distance_device cpu (with a small --distance_n).
Timing: CUDA events on a GPU, torch.utils.benchmark on CPU.

    adm-fast bench evaluate [--n 16] [--batch 8] [--image_size 64]
        [--dtypes fp32,bf16] [--fid] [--inception PATH] [--distance_n 50000]
        [--distance_device cuda|cpu] [--repeats 2] [--results DIR] [--no_save]

Rows go to <--results>/evaluate_<cpu|gpu>.csv with device, commit, date and versions.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from ..evaluation import Evaluator, feature_statistics, random_weights
from ..evaluation.manifold import BLOCK, manifold_radii, pairwise_distances, precision_recall
from .common import (
    add_results_flags,
    append_rows,
    context,
    format_table,
    results_file,
    time_once_ms,
)


def _median_ms(fn, device, repeats: int) -> float:
    fn()  # warm-up: cuDNN algorithm choice, allocator, first-call costs
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def bench_features(args, device, weights, where):
    images = np.random.default_rng(0).integers(
        0, 256, (args.n, args.image_size, args.image_size, 3), dtype=np.uint8)
    rows, ref = [], None
    for dtype in ["fp32"] + [d for d in args.dtypes if d != "fp32"]:
        ev = Evaluator(weights, device=device, batch_size=args.batch, dtype=dtype)
        acts = {}

        def run(ev=ev, acts=acts):
            acts["out"] = ev.compute_activations(images)

        ms = _median_ms(run, device, args.repeats)
        pool, spatial = acts["out"]
        ref = (pool, spatial) if dtype == "fp32" else ref
        row = {**context(device), "what": "features", "weights": where, "dtype": dtype,
               "n_images": args.n, "batch": args.batch, "image_size": args.image_size,
               "ms": f"{ms:.1f}", "images_per_s": f"{args.n / ms * 1e3:.2f}",
               "pool_rel_diff_vs_fp32": f"{_rel(pool, ref[0]):.2e}",
               "spatial_rel_diff_vs_fp32": f"{_rel(spatial, ref[1]):.2e}"}
        if args.fid and dtype != "fp32":
            a, b = feature_statistics(ref[0], device=device), feature_statistics(pool,
                                                                                device=device)
            row["fid_vs_fp32"] = f"{a.frechet_distance(b):.4g}"
        if dtype in args.dtypes:
            rows.append(row)
    return rows


def bench_distances(args, device):
    n, d = args.distance_n, 2048
    g = torch.Generator(device=device).manual_seed(0)
    # pool_3-like features: non-negative, O(1), so the fp16 blocks stay finite.
    ref = torch.rand((n, d), generator=g, device=device)
    sample = torch.rand((n, d), generator=g, device=device)
    blocks = [(r, c) for r in range(0, n, BLOCK) for c in range(0, n, BLOCK)]

    def all_blocks():
        for r, c in blocks:
            pairwise_distances(ref[r:r + BLOCK], ref[c:c + BLOCK])

    rows = []
    for what, fn, flop in (
            ("pairwise_distances", all_blocks, 2.0 * n * n * d),
            ("manifold_radii", lambda: manifold_radii(ref, k=3), 2.0 * n * n * d),
            ("precision_recall", lambda: precision_recall(ref, sample, k=3), 6.0 * n * n * d)):
        ms = _median_ms(fn, device, args.repeats)
        rows.append({**context(device), "what": what, "n": n, "dim": d, "block": BLOCK,
                     "ms": f"{ms:.1f}", "matmul_tflops": f"{flop / ms / 1e9:.1f}"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench evaluate", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="images (default 16; 512 on a GPU)")
    p.add_argument("--batch", type=int, default=8, help="images per forward (default 8; 256 "
                   "on a GPU)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--dtypes", default=None, help="default fp32 on CPU, fp32,bf16 on a GPU")
    p.add_argument("--fid", action="store_true", help="FID between bf16 and fp32 features "
                   "(a 2048-d scipy sqrtm)")
    p.add_argument("--inception", help="real InceptionV3 weights (default: random)")
    p.add_argument("--distance_n", type=int, default=50000)
    p.add_argument("--distance_device", default="cuda")
    p.add_argument("--repeats", type=int, default=2)
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        args.n = 512 if args.n == p.get_default("n") else args.n
        args.batch = 256 if args.batch == p.get_default("batch") else args.batch
    args.dtypes = (args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    weights = args.inception or random_weights(0)
    where = Path(args.inception).name if args.inception else "random"

    rows = bench_features(args, device, weights, where)
    print(format_table(rows, ["device", "dtype", "n_images", "batch", "ms", "images_per_s",
                              "pool_rel_diff_vs_fp32", "spatial_rel_diff_vs_fp32"]
                       + (["fid_vs_fp32"] if args.fid and len(rows) > 1 else [])))
    dist_device = torch.device(args.distance_device)
    if dist_device.type == "cuda" and not torch.cuda.is_available():
        print("distances: no GPU here, skipped (--distance_device cpu --distance_n 2000 runs "
              "the same code on the CPU)")
    else:
        drows = bench_distances(args, dist_device)
        print(format_table(drows, ["device", "what", "n", "dim", "ms", "matmul_tflops"]))
        rows += drows
    if not args.no_save:
        name = f"evaluate_{'gpu' if device.type == 'cuda' else 'cpu'}"
        path = append_rows(results_file(args, name), rows)
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
