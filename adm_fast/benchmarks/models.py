"""Whole-model timing of ADM layouts: forward (no grad) and a training step
(forward + backward), adm_fast's default backends against the eager reference
and torch.compile of the eager model, interleaved in rounds in one process
(medians via torch.utils.benchmark), with the max |Δ| of each output against
eager.

    python -m adm_fast.benchmarks.models [--layouts ...] [--rounds 3] [--compile] [--no_save]

Rows go to bench/results/models_<device>.csv with device, commit and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.utils.benchmark as tb

from .. import ops
from ..script_util import create_from_flags
from .common import add_results_flags, append_rows, context, median_ms, print_table, results_file

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


def inputs(flags, batch, device):
    size = flags["image_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    kw = {"y": torch.randint(0, 1000, (batch,), device=device)} if flags.get("class_cond") else {}
    return x, t, kw


def _timer(fn, device, min_run_time):
    if device.type == "cuda":
        return median_ms(fn, device)
    # Timer runs on one thread unless told: measure on the threads torch uses.
    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench models", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_run_time", type=float, default=1.0)
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile of the eager model (forward only: building the "
                        "training graph too takes many minutes on a small CPU)")
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ctx, rows = context(device), []
    for name in args.layouts:
        flags, batch = LAYOUTS[name]
        flags = dict(flags)
        kind = flags.pop("kind")
        model = create_from_flags(kind, flags).to(device)
        for prm in model.parameters():  # zero-initialised heads would hide differences
            torch.nn.init.normal_(prm, std=0.02)
        x, t, kw = inputs(LAYOUTS[name][0], batch, device)

        def forward(m, setting):
            def run():
                with torch.no_grad(), ops.use_backend(setting):
                    return m(x, t, **kw)
            return run

        def step(m, setting):
            def run():
                m.zero_grad(set_to_none=True)
                with ops.use_backend(setting):
                    m(x, t, **kw).float().square().mean().backward()
            return run

        impls = {"eager": (model, "eager"), "adm_fast": (model, "auto")}
        with torch.no_grad(), ops.use_backend("eager"):
            ref = model(x, t, **kw)
        errors = {}
        if args.compile:
            compiled = torch.compile(model, dynamic=False)
            try:
                with torch.no_grad(), ops.use_backend("eager"):
                    errors["compile(eager)"] = (compiled(x, t, **kw) - ref).abs().max().item()
                impls["compile(eager)"] = (compiled, "eager")
            except Exception as e:  # say so and go on without it
                print(f"  {name}: torch.compile failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}")
        times = {(i, w): [] for i in impls for w in ("forward", "train_step")}
        for _ in range(args.rounds):  # interleaved: each round times every impl
            for impl, (m, setting) in impls.items():
                with torch.no_grad(), ops.use_backend(setting):
                    errors[impl] = (m(x, t, **kw).float() - ref.float()).abs().max().item()
                times[(impl, "forward")].append(_timer(forward(m, setting), device,
                                                       args.min_run_time))
                if not impl.startswith("compile"):
                    times[(impl, "train_step")].append(_timer(step(m, setting), device,
                                                              args.min_run_time))
        for what in ("forward", "train_step"):
            eager_ms = statistics.median(times[("eager", what)])
            for impl in impls:
                if not times[(impl, what)]:
                    continue
                ms = statistics.median(times[(impl, what)])
                rows.append({**ctx, "layout": name, "batch": batch, "impl": impl, "what": what,
                             "median_ms": f"{ms:.2f}", "img_per_s": f"{batch * 1e3 / ms:.2f}",
                             "x_vs_eager": f"{eager_ms / ms:.2f}",
                             "max_abs_diff": f"{errors[impl]:.2e}"})
    print_table(rows, ["layout", "batch", "impl", "what", "median_ms", "img_per_s", "x_vs_eager",
                       "max_abs_diff"])
    if not args.no_save:
        print("appended to", append_rows(results_file(args, f"models_{device.type}"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
