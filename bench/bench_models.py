"""Whole-model CPU timing of ADM layouts: forward and a training step
(forward + backward), per backend, medians via torch.utils.benchmark.

    python bench/bench_models.py [--layouts ...] [--backends eager auto]

Rows go to bench/results/models_cpu.csv with device, commit and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, context, print_table  # noqa: E402

import adm_fast  # noqa: E402
from adm_fast.script_util import create_from_flags  # noqa: E402

# The numeric reference layouts, and a 64×64 ADM layout with 64 channels.
LAYOUTS = {
    "ref_unet_cond_32": (dict(kind="unet", image_size=32, num_channels=32, num_res_blocks=2,
                              channel_mult="1,2,2", attention_resolutions="16,8",
                              num_head_channels=16, resblock_updown=True,
                              use_scale_shift_norm=True, class_cond=True, learn_sigma=True), 4),
    "ref_classifier_64": (dict(kind="classifier", image_size=64, classifier_width=32,
                               classifier_depth=1, classifier_attention_resolutions="8"), 4),
    "adm64_c64": (dict(kind="unet", image_size=64, num_channels=64, num_res_blocks=2,
                       attention_resolutions="32,16,8", num_head_channels=32,
                       resblock_updown=True, use_scale_shift_norm=True, class_cond=True,
                       learn_sigma=True), 4),
}


def inputs(flags, batch):
    size = flags["image_size"]
    x = torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,)).float()
    kw = {"y": torch.randint(0, 1000, (batch,))} if flags.get("class_cond") else {}
    return x, t, kw


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--backends", nargs="+", default=["eager"])
    p.add_argument("--min_run_time", type=float, default=2.0)
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args()
    ctx = context(torch.device("cpu"))
    rows = []
    for name in args.layouts:
        flags, batch = LAYOUTS[name]
        flags = dict(flags)
        model = create_from_flags(flags.pop("kind"), flags)
        x, t, kw = inputs(LAYOUTS[name][0], batch)
        params = sum(p.numel() for p in model.parameters())

        def fwd():
            with torch.no_grad():
                model(x, t, **kw)

        def train_step():
            model.zero_grad(set_to_none=True)
            model(x, t, **kw).float().square().mean().backward()

        for backend in args.backends:
            for what, fn in (("forward", fwd), ("train_step", train_step)):
                with adm_fast.use_backend(backend):
                    m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(
                        min_run_time=args.min_run_time)
                rows.append({**ctx, "layout": name, "batch": batch, "params": params,
                             "backend": backend, "what": what,
                             "median_ms": f"{m.median * 1e3:.2f}",
                             "img_per_s": f"{batch / m.median:.2f}"})
    print_table(rows, ["layout", "batch", "backend", "what", "median_ms", "img_per_s"])
    if not args.no_save:
        print("appended to", append_rows("models_cpu", rows))


if __name__ == "__main__":
    main()
