"""Training-step memory and time of an ADM UNet: guided-diffusion's eager path
against adm_fast's fused backends ("auto"), interleaved in one process.

One step is `training_losses` (L_hybrid: MSE on eps plus the VB term that
trains the learned variance), backward and an AdamW step. Per implementation:
the bytes autograd holds for backward (distinct storages, parameters
excluded), the median step time, on CUDA the peak of max_memory_allocated,
and the agreement of loss and gradients with eager on the same seeded step.
With checkpointing, the bytes held are the checkpointed blocks' inputs; what a
block saves while it is recomputed in backward is transient and shows only in
the CUDA peak. `--max_batch` (CUDA) searches the largest batch that fits.

    python -m adm_fast.benchmarks.train [--preset 128x128_diffusion] [--batch 16]
        [--dtype fp32|bf16|fp16] [--checkpointing none|resblocks|all]
        [--max_batch] [--time_cap 60] [--repeats 3] [--no_save]

Rows go to bench/results/train_<cpu|gpu>.csv with device, commit and date.
"""

from __future__ import annotations

import argparse
import sys
import contextlib
import gc
import math
import statistics
import time

import torch

from .. import ops, presets
from ..diffusion import create_gaussian_diffusion
from .common import add_results_flags, append_rows, context, median_ms, print_table, results_file
from .saved_bytes import SavedBytes

IMPLS = {"eager": "eager", "adm_fast": "auto"}
# A 64x64_diffusion with 64 channels and one res block per level: every block
# type and all three attention resolutions, a step in about a second on 2 cores.
CPU_DEFAULT = ("64x64_diffusion", {"num_channels": 64, "num_res_blocks": 1}, 2)
GPU_DEFAULT = ("128x128_diffusion", {}, 16)
DTYPES = ("fp32", "bf16", "fp16")


def build(preset_name, overrides, checkpointing, dtype, device):
    """The model (zero-initialised convs given PyTorch's default init so that
    every layer gets a gradient to compare) and its diffusion."""
    preset = presets.get(preset_name)
    if preset.kind not in ("unet", "sr"):
        raise ValueError(f"{preset_name} is a {preset.kind}; the training benchmark takes a "
                         "diffusion UNet or an upsampler preset")
    torch.manual_seed(0)
    model = preset.build(device=device, dtype=torch.float16 if dtype == "fp16" else None,
                         **overrides)
    for p in model.parameters():
        if p.dim() > 1 and not p.detach().any():
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    if checkpointing != "none":
        model.set_checkpointing(resblocks=True, attention=checkpointing == "all")
    flags = {**preset.flags, **overrides}
    diffusion = create_gaussian_diffusion(
        steps=flags.get("diffusion_steps", 1000), learn_sigma=flags.get("learn_sigma", False),
        noise_schedule=flags.get("noise_schedule", "linear"))
    return model.train(), diffusion, flags, preset.kind


class Trainer:
    """One model and one AdamW shared by every implementation, so they start
    from the same weights and the same persistent memory (params, grads,
    optimizer state). fp16 is guided-diffusion's use_fp16 training: fp32
    master weights, a dynamic loss scale starting at 2^20."""

    def __init__(self, model, diffusion, flags, kind, dtype, device):
        self.model, self.diffusion, self.flags, self.kind = model, diffusion, flags, kind
        self.dtype, self.device = dtype, device
        params = list(model.parameters())
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float())
                      for p in params]
        self.scale = 2.0 ** 20 if dtype == "fp16" else 1.0
        self.opt = torch.optim.AdamW([m for _, m in self.pairs], lr=1e-4, weight_decay=0.0)

    def set_batch(self, batch: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        size = self.flags.get("large_size", self.flags.get("image_size"))
        self.x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(self.device)
        self.noise = torch.randn(batch, 3, size, size, generator=g).to(self.device)
        self.t = torch.randint(0, self.diffusion.num_timesteps, (batch,), generator=g)
        self.t = self.t.to(self.device)
        self.kw = {}
        if self.flags.get("class_cond"):
            self.kw["y"] = torch.randint(0, 1000, (batch,), generator=g).to(self.device)
        if self.kind == "sr":
            small = self.flags["small_size"]
            self.kw["low_res"] = torch.rand(batch, 3, small, small, generator=g).to(self.device)

    def forward_backward(self, setting, counter: SavedBytes = None):
        """Gradients of the mean L_hybrid loss; returns (loss, bytes held for
        backward or None). Backward runs under the same backend setting:
        checkpointed blocks recompute their forward there."""
        self.model.zero_grad(set_to_none=True)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.dtype == "bf16" else contextlib.nullcontext())
        with ops.use_backend(setting):
            with autocast, counter or contextlib.nullcontext():
                terms = self.diffusion.training_losses(self.model, self.x, self.t, self.kw,
                                                       noise=self.noise)
                loss = terms["loss"].mean()
            held = counter.nbytes() if counter is not None else None
            (loss * self.scale).backward()
        return loss.detach(), held

    def step(self, setting) -> bool:
        """One training step; False when fp16 gradients overflowed and the
        step was skipped (the loss scale halves, as in guided-diffusion)."""
        self.forward_backward(setting)
        if self.dtype == "fp16":
            grads = [p.grad for p, _ in self.pairs if p.grad is not None]
            if not torch.stack([g.float().abs().max() for g in grads]).isfinite().all():
                self.scale /= 2
                return False
            for p, master in self.pairs:
                if p.grad is not None:
                    master.grad = p.grad.float().div_(self.scale)
        self.opt.step()
        if self.dtype == "fp16":
            with torch.no_grad():
                for p, master in self.pairs:
                    if p is not master:
                        p.copy_(master)
        return True

    def release(self) -> None:
        self.model.zero_grad(set_to_none=True)
        for _, master in self.pairs:
            master.grad = None


def compare(trainer: Trainer, fused="auto", seed: int = 0):
    """Bytes held for backward by eager and by the `fused` backend setting
    (keys "eager", "adm_fast"), and the max relative difference of the loss
    and of the parameter gradients against eager, from the same weights,
    inputs and dropout RNG state."""
    params = [p for p, _ in trainer.pairs]
    saved, losses, grads = {}, {}, {}
    for impl, setting in (("eager", "eager"), ("adm_fast", fused)):
        torch.manual_seed(seed)
        counter = SavedBytes(exclude=params)
        losses[impl], saved[impl] = trainer.forward_backward(setting, counter)
        grads[impl] = [None if p.grad is None else p.grad.detach().float().clone()
                       for p in params]
    trainer.release()
    ref = losses["eager"].double()
    loss_rel = ((losses["adm_fast"].double() - ref).abs() / ref.abs().clamp_min(1e-30)).item()
    # Per tensor, against its own scale with a floor at 1e-2 of the largest
    # gradient: a conv bias right before a GroupNorm has an exactly-zero
    # gradient that holds only rounding noise.
    floor = 1e-2 * max(g.abs().max().item() for g in grads["eager"] if g is not None)
    grad_rel = max(((a - e).abs().max() / max(e.abs().max().item(), floor)).item()
                   for a, e in zip(grads["adm_fast"], grads["eager"]) if e is not None)
    return saved, loss_rel, grad_rel


def peak_step(trainer: Trainer, setting):
    """CUDA (peak bytes, peak bytes above the memory held before the step)."""
    trainer.release()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step(setting)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - base


def measure(trainer: Trainer, batch: int, repeats: int, min_run_time: float):
    trainer.set_batch(batch)
    saved, loss_rel, grad_rel = compare(trainer)
    cuda = trainer.device.type == "cuda"
    for setting in IMPLS.values():  # warm up: optimizer state, kernel compilation
        trainer.step(setting)
    times = {impl: [] for impl in IMPLS}
    peaks = {impl: [] for impl in IMPLS}
    for r in range(repeats):
        order = list(IMPLS.items())
        for impl, setting in order if r % 2 == 0 else order[::-1]:
            if cuda:
                peaks[impl].append(peak_step(trainer, setting))
            times[impl].append(median_ms(lambda s=setting: trainer.step(s), trainer.device,
                                         min_run_time))
    result = {}
    for impl in IMPLS:
        result[impl] = {"saved": saved[impl], "ms": statistics.median(times[impl]),
                        "peak": max(p[0] for p in peaks[impl]) if cuda else float("nan"),
                        "act_peak": max(p[1] for p in peaks[impl]) if cuda else float("nan")}
    return result, loss_rel, grad_rel


def fits(trainer: Trainer, setting, batch: int) -> bool:
    trainer.set_batch(batch)
    ok = True
    try:
        trainer.step(setting)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        ok = False
    except RuntimeError as e:  # cuBLAS/cuDNN workspaces fail with their own errors
        if "ALLOC_FAILED" not in str(e):
            raise
        ok = False
    # Out of the except block, the traceback and the activations its frames
    # hold are gone; give their memory back before the next try.
    trainer.release()
    trainer.x = trainer.noise = trainer.t = trainer.kw = None
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def search_max_batch(fits_fn, time_cap: float, limit: int = 1 << 14):
    """(largest batch that fit, smallest that did not or None, capped): doubling
    from 1, then bisection; `capped` when time_cap seconds ran out first."""
    deadline = time.monotonic() + time_cap  # a cap on the search, not a timing
    lo, hi, batch = 0, None, 1
    while hi is None and batch <= limit and time.monotonic() < deadline:
        ok = fits_fn(batch)
        print(f"    batch {batch}: {'fits' if ok else 'out of memory'}", flush=True)
        lo, hi, batch = (batch, None, 2 * batch) if ok else (lo, batch, batch)
    while hi is not None and hi - lo > 1 and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        ok = fits_fn(mid)
        print(f"    batch {mid}: {'fits' if ok else 'out of memory'}", flush=True)
        lo, hi = (mid, hi) if ok else (lo, mid)
    capped = time.monotonic() >= deadline and (hi is None or hi - lo > 1)
    return lo, hi, capped


def parse_overrides(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes FLAG=VALUE, got {item!r}")
        for kind in (int, float, str):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench train", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", help=f"default: {CPU_DEFAULT[0]} with {CPU_DEFAULT[1]} on CPU, "
                                    f"{GPU_DEFAULT[0]} on CUDA")
    p.add_argument("--set", nargs="*", default=None, metavar="FLAG=VALUE",
                   help="model flag overrides, e.g. num_channels=64 dropout=0.0")
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 (autocast) on CUDA")
    p.add_argument("--checkpointing", choices=("none", "resblocks", "all"), default="none")
    p.add_argument("--max_batch", action="store_true",
                   help="CUDA: the largest batch that fits, eager vs adm_fast")
    p.add_argument("--time_cap", type=float, default=60.0,
                   help="seconds per implementation for --max_batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min_run_time", type=float, default=0.1)
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.max_batch and not cuda:
        raise SystemExit("--max_batch measures CUDA out-of-memory; it needs --device cuda")
    if args.repeats < 1 or (args.batch is not None and args.batch < 1):
        raise SystemExit("--repeats and --batch must be at least 1")
    name, overrides, batch = GPU_DEFAULT if cuda else CPU_DEFAULT
    if args.preset is not None:
        name, overrides = args.preset, {}
    overrides = {**overrides, **parse_overrides(args.set or [])}
    batch = args.batch or batch
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    model, diffusion, flags, kind = build(name, overrides, args.checkpointing, dtype, device)
    trainer = Trainer(model, diffusion, flags, kind, dtype, device)
    layout = name + ("[" + ";".join(f"{k}={v}" for k, v in overrides.items()) + "]"
                     if overrides else "")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{layout}: {n_params / 1e6:.1f}M params, dtype {dtype}, checkpointing "
          f"{args.checkpointing}, {device}", flush=True)
    common = {**context(device), "layout": layout, "dtype": dtype,
              "checkpointing": args.checkpointing, "params_M": f"{n_params / 1e6:.1f}"}
    rows = []
    if args.max_batch:
        for impl, setting in IMPLS.items():
            print(f"  {impl}:", flush=True)
            lo, hi, capped = search_max_batch(lambda b, s=setting: fits(trainer, s, b),
                                              args.time_cap)
            rows.append({**common, "what": "max_batch", "impl": impl, "max_batch": lo,
                         "first_oom": "" if hi is None else hi, "capped": capped})
        eager_max = rows[0]["max_batch"]
        rows[1]["x_vs_eager"] = f"{rows[1]['max_batch'] / eager_max:.2f}" if eager_max else ""
        rows[0]["x_vs_eager"] = "1.00"
        keys = ["layout", "dtype", "checkpointing", "impl", "max_batch", "first_oom", "capped",
                "x_vs_eager"]
    else:
        result, loss_rel, grad_rel = measure(trainer, batch, args.repeats, args.min_run_time)
        e = result["eager"]
        for impl, r in result.items():
            rows.append({**common, "what": "step", "impl": impl, "batch": batch,
                         "saved_MiB": f"{r['saved'] / 2**20:.1f}",
                         "saved_vs_eager": f"{r['saved'] / e['saved']:.3f}",
                         "step_ms": f"{r['ms']:.1f}", "img_per_s": f"{batch * 1e3 / r['ms']:.2f}",
                         "x_vs_eager": f"{e['ms'] / r['ms']:.2f}",
                         "peak_MiB": f"{r['peak'] / 2**20:.0f}",
                         "peak_vs_eager": f"{r['peak'] / e['peak']:.3f}",
                         "act_peak_MiB": f"{r['act_peak'] / 2**20:.0f}",
                         "act_peak_vs_eager": f"{r['act_peak'] / e['act_peak']:.3f}",
                         "loss_rel_diff": f"{0.0 if impl == 'eager' else loss_rel:.1e}",
                         "grad_rel_diff": f"{0.0 if impl == 'eager' else grad_rel:.1e}"})
        keys = ["layout", "batch", "dtype", "checkpointing", "impl", "saved_MiB",
                "saved_vs_eager", "step_ms", "img_per_s", "x_vs_eager", "peak_MiB",
                "peak_vs_eager", "act_peak_MiB", "act_peak_vs_eager", "loss_rel_diff", "grad_rel_diff"]
    print_table(rows, keys)
    if not args.max_batch:
        ratio = result["adm_fast"]["saved"] / result["eager"]["saved"]
        print(f"saved for backward, adm_fast/eager: {ratio:.3f} (target <= 0.5); "
              f"loss max rel diff {loss_rel:.1e}, grad max rel diff {grad_rel:.1e}")
    if not args.no_save:
        name = f"train_{'gpu' if cuda else 'cpu'}"
        print("appended to", append_rows(results_file(args, name), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
