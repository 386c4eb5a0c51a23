"""Whole-model timing of ADM layouts, interleaved in rounds in one process:
guided-diffusion's eager computation against adm_fast (its default backends
and the device's preferred layout) and torch.compile of the eager model (its
best mode, with the compile time), with the max |Δ| of each output against
eager. Per layout:

  forward      the UNet, no grad
  guided_step  one DDPM step with classifier guidance: UNet forward, the noisy
               classifier's forward and backward to x, the update
  train_step   forward + backward of the UNet (and the bytes it saves for it)

    python -m adm_fast.benchmarks.models [--layouts ...] [--rounds 3] [--compile]

Rows go to <--results>/models_<device>.csv with device, commit and date.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from .. import ops
from ..diffusion import classifier_cond_fn, create_gaussian_diffusion
from ..models.layout import use_preferred_layout
from ..script_util import create_from_flags
from .common import add_results_flags, append_rows, context, median_ms, print_table, results_file
from .saved_bytes import SavedBytes

_ADM64 = dict(kind="unet", image_size=64, num_channels=64, num_res_blocks=2,
              attention_resolutions="32,16,8", num_head_channels=32, resblock_updown=True,
              use_scale_shift_norm=True, class_cond=True, learn_sigma=True)
_CLS64 = dict(kind="classifier", image_size=64, classifier_width=64, classifier_depth=2,
              classifier_attention_resolutions="32,16,8", classifier_pool="attention")
# (UNet flags, classifier flags or None, batch): the 64x64 ADM layout with 64
# channels, and the numeric reference layouts.
LAYOUTS = {
    "adm64_c64": (_ADM64, _CLS64, 4),
    "ref_unet_cond_32": (dict(kind="unet", image_size=32, num_channels=32, num_res_blocks=2,
                              channel_mult="1,2,2", attention_resolutions="16,8",
                              num_head_channels=16, resblock_updown=True,
                              use_scale_shift_norm=True, class_cond=True, learn_sigma=True),
                         None, 4),
}
TARGETS = {("adm64_c64", "forward"): 1.5, ("adm64_c64", "guided_step"): 1.5,
           ("adm64_c64", "train_step"): 1.3}


def build(flags: dict, device, seed: int):
    torch.manual_seed(seed)
    flags = dict(flags)
    model = create_from_flags(flags.pop("kind"), flags).to(device)
    for prm in model.parameters():  # zero-initialised heads would hide differences
        torch.nn.init.normal_(prm, std=0.02)
    return model


def inputs(flags, batch, device):
    size = flags["image_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    kw = {"y": torch.randint(0, 1000, (batch,), generator=g).to(device)} \
        if flags.get("class_cond") else {}
    return x, t, kw


class Impl:
    """One way of running a layout: its models and backend setting (and the
    UNet it trains, which may be in another layout)."""

    def __init__(self, label, unet, classifier, setting, train_unet=None):
        self.label, self.unet, self.classifier, self.setting = label, unet, classifier, setting
        self.train_unet = unet if train_unet is None else train_unet

    def forward(self, x, t, kw):
        with torch.no_grad(), ops.use_backend(self.setting):
            return self.unet(x, t, **kw)

    def guided_step(self, diffusion, x, t, kw):
        cond = classifier_cond_fn(self.classifier, 1.0)
        with torch.no_grad(), ops.use_backend(self.setting):
            torch.manual_seed(3)
            return diffusion.p_sample(self.unet, x, t, cond_fn=cond, model_kwargs=kw)["sample"]

    def train_step(self, x, t, kw):
        self.train_unet.zero_grad(set_to_none=True)
        with ops.use_backend(self.setting):
            self.train_unet(x, t, **kw).float().square().mean().backward()

    def saved_bytes(self, x, t, kw) -> int:
        params = list(self.train_unet.parameters())
        with ops.use_backend(self.setting), SavedBytes(exclude=params) as s:
            out = self.train_unet(x, t, **kw)
            n = s.nbytes()
        del out
        return n


def impls(unet, classifier, device, compile_model: bool, log) -> dict[str, Impl]:
    """eager (the models as built), adm_fast (copies in the preferred layouts
    for sampling and for training) and, asked for, torch.compile of the eager
    models in each mode."""
    out = {"eager": Impl("eager", unet, classifier, "eager")}
    fast_unet = use_preferred_layout(copy.deepcopy(unet), device)
    fast_cls = None if classifier is None else use_preferred_layout(
        copy.deepcopy(classifier), device)
    train_unet = use_preferred_layout(copy.deepcopy(unet), device, training=True)
    out["adm_fast"] = Impl("adm_fast", fast_unet, fast_cls, "auto", train_unet)
    if compile_model:
        for mode in ("default", "max-autotune-no-cudagraphs"):
            label = f"compile({mode})"
            out[label] = Impl(label, torch.compile(unet, mode=mode, dynamic=False),
                              None if classifier is None else
                              torch.compile(classifier, mode=mode, dynamic=False), "eager")
    return out


def bench_layout(name: str, args, device, ctx, log):
    uflags, cflags, batch = LAYOUTS[name]
    unet = build(uflags, device, 0)
    classifier = build(cflags, device, 1) if cflags else None
    x, t, kw = inputs(uflags, batch, device)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="250")
    ti = torch.full((batch,), diffusion.num_timesteps // 2, device=device)
    runs = impls(unet, classifier, device, args.compile, log)
    whats = {"forward": lambda r: r.forward(x, t, kw)}
    if classifier is not None:
        whats["guided_step"] = lambda r: r.guided_step(diffusion, x, ti, kw)
    whats["train_step"] = lambda r: r.train_step(x, t, kw)
    ref = {w: f(runs["eager"]) for w, f in whats.items() if w != "train_step"}
    errors, compile_s = {}, {}
    for label, run in list(runs.items()):
        start = time.perf_counter()
        try:
            for w in ref:
                errors[(label, w)] = (whats[w](run).float() - ref[w].float()).abs().max().item()
        except Exception as e:  # a compile that fails: say so, go on without it
            log(f"  {name}: {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del runs[label]
            continue
        compile_s[label] = time.perf_counter() - start
    times = {(label, w): [] for label in runs for w in whats}
    for _ in range(args.rounds):  # interleaved: each round times every impl
        for label, run in runs.items():
            for w, f in whats.items():
                if w == "train_step" and label.startswith("compile"):
                    continue  # building the training graph takes many minutes on a CPU
                times[(label, w)].append(median_ms(lambda f=f, run=run: f(run), device,
                                                   args.min_run_time))
    saved = {label: runs[label].saved_bytes(x, t, kw) for label in ("eager", "adm_fast")}
    return rows_of(name, batch, runs, whats, times, errors, compile_s, saved, ctx)


def rows_of(name, batch, runs, whats, times, errors, compile_s, saved, ctx):
    rows = []
    for w in whats:
        eager_ms = statistics.median(times[("eager", w)])
        best_compile = min([statistics.median(times[(lb, w)]) for lb in runs
                            if lb.startswith("compile") and times[(lb, w)]], default=None)
        for label in runs:
            if not times[(label, w)]:
                continue
            ms = statistics.median(times[(label, w)])
            row = {**ctx, "layout": name, "batch": batch, "impl": label, "what": w,
                   "median_ms": f"{ms:.1f}", "img_per_s": f"{batch * 1e3 / ms:.2f}",
                   "x_vs_eager": f"{eager_ms / ms:.2f}",
                   "x_vs_compile": f"{best_compile / ms:.2f}" if best_compile else "",
                   "target": TARGETS.get((name, w), "") if label == "adm_fast" else "",
                   "max_abs_diff": f"{errors.get((label, w), 0.0):.2e}",
                   "compile_s": f"{compile_s[label]:.0f}" if label.startswith("compile") else ""}
            if w == "train_step" and label in saved:
                row["saved_MiB"] = f"{saved[label] / 2**20:.1f}"
                row["saved_vs_eager"] = f"{saved[label] / saved['eager']:.3f}"
            rows.append(row)
    return rows


def keep_freed_memory() -> None:
    """Set glibc's M_MMAP_THRESHOLD to 1 GiB and M_TRIM_THRESHOLD to its
    largest: freed blocks stay in the heap for the next allocation."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        raise SystemExit(f"--keep_freed_memory needs glibc's mallopt: {e}") from None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)):
        raise SystemExit("--keep_freed_memory: mallopt refused the settings")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench models", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["adm64_c64"], choices=list(LAYOUTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_run_time", type=float, default=1.0)
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile of the eager models (default and max-autotune "
                        "modes; forward and guided step: minutes to build on a CPU)")
    p.add_argument("--keep_freed_memory", action="store_true",
                   help="glibc keeps freed memory for reuse (mallopt: no mmap below 1 GiB, "
                        "no trimming), so neither side page-faults on fresh temporaries; "
                        "eager's larger ones fault in some processes and not in others "
                        "(its forward's time then differs by half from run to run). Linux "
                        "with glibc only")
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ctx, rows = context(device), []
    ctx["malloc"] = "default"
    if args.keep_freed_memory:
        keep_freed_memory()
        ctx["malloc"] = "keep_freed"
    for name in args.layouts:
        rows += bench_layout(name, args, device, ctx, lambda m: print(m, flush=True))
    print_table(rows, ["layout", "batch", "impl", "what", "median_ms", "img_per_s", "x_vs_eager",
                       "x_vs_compile", "target", "compile_s", "saved_vs_eager", "max_abs_diff"])
    if not args.no_save:
        print("appended to", append_rows(results_file(args, f"models_{device.type}"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
