"""Training-step memory and time of an ADM UNet: guided-diffusion's eager path
against adm_fast's fused backends ("auto"), interleaved in one process.

Each implementation's model is built as `adm-fast train` builds it from its
flags (train/run.py's build_model: the weights --seed gives, the checkpointing
flags, the layout --backend takes on the device: NCHW for eager, channels_last
for adm_fast on a CPU), and one step is the training loop's loss
(train/tasks.py's diffusion_loss: `training_losses`, L_hybrid for a learned
variance, under the precision's autocast), backward and an AdamW step. Per
implementation: the bytes a user's step holds for backward (user_step_bytes:
distinct storages seen by saved-tensor hooks, parameters excluded, checked
against the memory the forward left allocated), the median step time, on
CUDA the peak of max_memory_allocated, and the agreement of loss and gradients
with eager on the same seeded step (for which the zero-initialised convs get
PyTorch's default init in both models alike). With checkpointing, the bytes
held are the checkpointed blocks' inputs; what a block saves while it is
recomputed in backward is transient and shows only in the CUDA peak.
`--max_batch` (CUDA) searches the largest batch that fits.

    python -m adm_fast.benchmarks.train [--preset 128x128_diffusion] [--batch 16]
        [--dtype fp32|bf16|fp16] [--checkpointing none|resblocks|all]
        [--max_batch] [--time_cap 60] [--repeats 3] [--no_save]

Rows go to bench/results/train_<cpu|gpu>.csv with device, commit and date.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import statistics
import sys
import time

import torch

from .. import ops, presets
from ..defaults import NUM_CLASSES
from .common import add_results_flags, append_rows, context, median_ms, print_table, results_file
from .saved_bytes import HeldBytes, SavedBytes

IMPLS = {"eager": "eager", "adm_fast": "auto"}
# A 64x64_diffusion with 64 channels and one res block per level: every block
# type and all three attention resolutions (dropout and the learned variance
# too), a step in about two seconds at batch 4 on 2 cores.
CPU_DEFAULT = ("64x64_diffusion", {"num_channels": 64, "num_res_blocks": 1}, 4)
GPU_DEFAULT = ("128x128_diffusion", {}, 16)
DTYPES = ("fp32", "bf16", "fp16")


def training_flags(preset_name, overrides, checkpointing="none", dtype="fp32", device="cpu",
                   backend="auto"):
    """`adm-fast train`'s flags (its defaults, then the preset's, then these) for
    a run of preset_name (None: the defaults alone) with overrides, the
    checkpointing of --checkpointing, dtype's precision and backend."""
    from ..train.config import flags_from_kwargs

    kw = dict(overrides)
    if preset_name:
        preset = presets.get(preset_name)
        if preset.kind != "unet":
            raise ValueError(f"{preset_name} is a {preset.kind} preset; the training benchmark "
                             "takes the diffusion UNets adm-fast train trains")
        kw["preset"] = preset_name
    kw.update(device=str(device), backend=backend, data_dir="(benchmark)",
              bf16=dtype == "bf16", use_fp16=dtype == "fp16",
              use_checkpoint=checkpointing != "none",
              checkpoint_attention=checkpointing == "all")
    return flags_from_kwargs("diffusion", kw)


def device_of(flags: dict) -> torch.device:
    """--device, or as adm-fast train takes it when not given."""
    return torch.device(flags["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_as_trained(flags: dict):
    """(model on its device, diffusion) as `adm-fast train` builds them from flags."""
    from ..train.run import build_model

    device = device_of(flags)
    model, diffusion = build_model("diffusion", flags, device,
                                   flags["num_classes"] or NUM_CLASSES)
    return model.to(device).train(), diffusion


def step_inputs(flags: dict, batch: int, device, seed: int = 0) -> dict:
    """A seeded batch for diffusion_loss: images in [-1, 1], noise, timesteps,
    the uniform sampler's weights (ones) and, class-conditional, labels."""
    g = torch.Generator().manual_seed(seed)
    size = flags["image_size"]
    out = {"x": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
           "noise": torch.randn(batch, 3, size, size, generator=g),
           "t": torch.randint(0, int(flags["diffusion_steps"]), (batch,), generator=g),
           "weights": torch.ones(batch), "cond": {}}
    if flags["class_cond"]:
        out["cond"]["y"] = torch.randint(0, flags["num_classes"] or NUM_CLASSES, (batch,),
                                         generator=g)
    return {k: ({n: v.to(device) for n, v in t.items()} if k == "cond" else t.to(device))
            for k, t in out.items()}


def user_step_bytes(flags: dict, batch: int, seed: int = 0) -> dict[str, int]:
    """What one step of `adm-fast train` (or adm_fast.train.train(**flags))
    keeps for backward: the model built as the run builds it (build_model:
    seed, checkpointing, the backend's layout), MixedPrecisionTrainer for the
    precision, the loss as the loop computes it (diffusion_loss under the
    precision's autocast) at `batch` images, under the backend. After one
    warm-up step (auto's choices, kernels, caches), the measured forward gives
    {"saved": bytes of the distinct storages the saved-tensor hooks see,
    parameters and master weights excluded; "held": the bytes that forward
    left allocated (HeldBytes), which counts what hides from the hooks too}."""
    from ..train.config import precision_of
    from ..train.precision import MixedPrecisionTrainer
    from ..train.tasks import diffusion_loss

    model, diffusion = build_as_trained(flags)
    mp = MixedPrecisionTrainer(model, precision=precision_of(flags, "use_fp16"))
    device = device_of(flags)
    inp = step_inputs(flags, batch, device, seed)
    params = mp.model_params + [m for m in mp.master_params if id(m) not in
                                {id(p) for p in mp.model_params}]

    def loss():
        with mp.autocast():
            return diffusion_loss(diffusion, model, inp["x"], inp["cond"], inp["t"],
                                  inp["weights"], inp["noise"])[0]

    with ops.use_backend(flags["backend"]):
        torch.manual_seed(seed)
        mp.backward(loss())
        mp.zero_grad()
        torch.manual_seed(seed)
        with HeldBytes(device) as held, SavedBytes(exclude=params) as counter:
            out = loss()
        saved = counter.nbytes()
        del out
    return {"saved": saved, "held": held.nbytes}


def user_saved_ratio(flags: dict, batch: int, seed: int = 0) -> dict[str, dict[str, int]]:
    """user_step_bytes for guided-diffusion's computation (--backend eager: NCHW,
    the eager ops) and for flags' backend, from the same weights and inputs:
    {"eager": ..., "adm_fast": ...}."""
    return {impl: user_step_bytes({**flags, "backend": "eager" if impl == "eager"
                                   else flags["backend"]}, batch, seed)
            for impl in ("eager", "adm_fast")}


def build(preset_name, overrides, checkpointing, dtype, device, backend="auto"):
    """The model as `adm-fast train` builds it for backend (build_as_trained),
    its zero-initialised convs then given PyTorch's default init so that every
    layer gets a gradient to compare (the same draw for every backend), and its
    diffusion."""
    flags = training_flags(preset_name, overrides, checkpointing, dtype, device, backend)
    model, diffusion = build_as_trained(flags)
    for p in model.parameters():
        if p.dim() > 1 and not p.detach().any():
            # drawn in NCHW order whatever p's memory format: the same values
            # in every backend's layout
            drawn = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            with torch.no_grad():
                p.copy_(torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5)))
    return model, diffusion, flags, "unet"


class Trainer:
    """A model (from build) and its AdamW. Each implementation gets its own, in
    the layout its backend trains in, from the same weights (a setting may
    also be run on another's model: the per-op settings of the tests). fp16 is
    guided-diffusion's use_fp16 training: the torso converted, fp32 master
    weights copied before, a dynamic loss scale starting at 2^20."""

    def __init__(self, model, diffusion, flags, kind, dtype, device):
        self.model, self.diffusion, self.flags, self.kind = model, diffusion, flags, kind
        self.dtype, self.device = dtype, device
        params = list(model.parameters())
        fp32 = [p.detach().clone() for p in params] if dtype == "fp16" else None
        if dtype == "fp16":
            model.convert_to_fp16()
        self.pairs = [(p, p if p.dtype == torch.float32 else fp32[i])
                      for i, p in enumerate(params)]
        self.scale = 2.0 ** 20 if dtype == "fp16" else 1.0
        self.opt = torch.optim.AdamW([m for _, m in self.pairs], lr=1e-4, weight_decay=0.0)

    def set_batch(self, batch: int, seed: int = 0) -> None:
        self.inputs = step_inputs(self.flags, batch, self.device, seed)

    def forward_backward(self, setting, counter: SavedBytes = None):
        """Gradients of the training loop's loss (diffusion_loss: L_hybrid for
        a learned variance); returns (loss, bytes held for backward or None).
        Backward runs under the same backend setting: checkpointed blocks
        recompute their forward there."""
        from ..train.tasks import diffusion_loss

        self.model.zero_grad(set_to_none=True)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.dtype == "bf16" else contextlib.nullcontext())
        b = self.inputs
        with ops.use_backend(setting):
            with autocast, counter or contextlib.nullcontext():
                loss, _ = diffusion_loss(self.diffusion, self.model, b["x"], b["cond"], b["t"],
                                         b["weights"], b["noise"])
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


def nchw_twin(trainer: Trainer) -> Trainer:
    """A Trainer of a copy of trainer's model in guided-diffusion's layout
    (NCHW weights, as --backend eager trains)."""
    model = copy.deepcopy(trainer.model)
    for p in model.parameters():
        p.data = p.data.contiguous()
    twin = Trainer(model, trainer.diffusion, trainer.flags, trainer.kind, trainer.dtype,
                   trainer.device)
    twin.inputs = trainer.inputs
    return twin


def compare(trainer: Trainer, fused="auto", seed: int = 0, eager: Trainer = None):
    """Bytes held for backward by eager (on the eager Trainer's model, else on
    an NCHW copy of trainer's) and by the `fused` backend setting on trainer's
    model (keys "eager", "adm_fast"), and the max relative difference of the
    loss and of the parameter gradients against eager, from the same weights,
    inputs and dropout RNG state. Eager runs in its own layout: dropout draws
    its mask in memory order, and adm_fast's draws it in NCHW order so as to
    drop what guided-diffusion's model drops."""
    eager = eager or nchw_twin(trainer)
    saved, losses, grads = {}, {}, {}
    for impl, setting, run in (("eager", "eager", eager),
                               ("adm_fast", fused, trainer)):
        params = [p for p, _ in run.pairs]
        torch.manual_seed(seed)
        counter = SavedBytes(exclude=params)
        losses[impl], saved[impl] = run.forward_backward(setting, counter)
        grads[impl] = [None if p.grad is None else p.grad.detach().float().clone()
                       for p in params]
        run.release()
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


def measure(trainers: dict[str, Trainer], batch: int, repeats: int, min_run_time: float):
    """Each implementation's Trainer (keys of IMPLS) stepped under its setting,
    interleaved in rounds; with compare's agreement first."""
    for trainer in trainers.values():
        trainer.set_batch(batch)
    saved, loss_rel, grad_rel = compare(trainers["adm_fast"], eager=trainers["eager"])
    cuda = trainers["eager"].device.type == "cuda"
    for impl, setting in IMPLS.items():  # warm up: optimizer state, kernel compilation
        trainers[impl].step(setting)
    times = {impl: [] for impl in IMPLS}
    peaks = {impl: [] for impl in IMPLS}
    for r in range(repeats):
        order = list(IMPLS.items())
        for impl, setting in order if r % 2 == 0 else order[::-1]:
            trainer = trainers[impl]
            if cuda:
                peaks[impl].append(peak_step(trainer, setting))
            times[impl].append(median_ms(lambda s=setting, tr=trainer: tr.step(s),
                                         trainer.device, min_run_time))
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
    trainer.inputs = None
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
                                    f"{GPU_DEFAULT[0]} on CUDA; none: adm-fast train's own "
                                    "defaults (guided-diffusion's image_train.py)")
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
        name, overrides = (None if args.preset == "none" else args.preset), {}
    overrides = {**overrides, **parse_overrides(args.set or [])}
    batch = args.batch or batch
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    try:
        flags = training_flags(name, overrides, args.checkpointing, dtype, device)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"adm-fast bench train: {e.args[0] if e.args else e}") from None
    layout = (name or "train_defaults") + (
        "[" + ";".join(f"{k}={v}" for k, v in overrides.items()) + "]" if overrides else "")
    user = None
    if not args.max_batch:
        # First, while nothing else holds memory: the figure a user's step gets.
        user = user_saved_ratio(flags, batch)
        gc.collect()
    trainers = {}
    for impl, setting in IMPLS.items():
        model, diffusion, _, kind = build(name, overrides, args.checkpointing, dtype, device,
                                          backend=setting)
        trainers[impl] = Trainer(model, diffusion, flags, kind, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{layout}: {n_params / 1e6:.1f}M params, dtype {dtype}, checkpointing "
          f"{args.checkpointing}, {device}", flush=True)
    common = {**context(device), "layout": layout, "dtype": dtype,
              "checkpointing": args.checkpointing, "params_M": f"{n_params / 1e6:.1f}"}
    rows = []
    if args.max_batch:
        for impl, setting in IMPLS.items():
            print(f"  {impl}:", flush=True)
            lo, hi, capped = search_max_batch(
                lambda b, s=setting, tr=trainers[impl]: fits(tr, s, b), args.time_cap)
            rows.append({**common, "what": "max_batch", "impl": impl, "max_batch": lo,
                         "first_oom": "" if hi is None else hi, "capped": capped})
        eager_max = rows[0]["max_batch"]
        rows[1]["x_vs_eager"] = f"{rows[1]['max_batch'] / eager_max:.2f}" if eager_max else ""
        rows[0]["x_vs_eager"] = "1.00"
        keys = ["layout", "dtype", "checkpointing", "impl", "max_batch", "first_oom", "capped",
                "x_vs_eager"]
    else:
        result, loss_rel, grad_rel = measure(trainers, batch, args.repeats, args.min_run_time)
        e, ue = result["eager"], user["eager"]
        for impl, r in result.items():
            u = user[impl]
            rows.append({**common, "what": "step", "impl": impl, "batch": batch,
                         "saved_MiB": f"{u['saved'] / 2**20:.1f}",
                         "saved_vs_eager": f"{u['saved'] / ue['saved']:.3f}",
                         "held_MiB": f"{u['held'] / 2**20:.1f}",
                         "held_vs_eager": f"{u['held'] / ue['held']:.3f}",
                         "step_ms": f"{r['ms']:.1f}", "img_per_s": f"{batch * 1e3 / r['ms']:.2f}",
                         "x_vs_eager": f"{e['ms'] / r['ms']:.2f}",
                         "peak_MiB": f"{r['peak'] / 2**20:.0f}",
                         "peak_vs_eager": f"{r['peak'] / e['peak']:.3f}",
                         "act_peak_MiB": f"{r['act_peak'] / 2**20:.0f}",
                         "act_peak_vs_eager": f"{r['act_peak'] / e['act_peak']:.3f}",
                         "loss_rel_diff": f"{0.0 if impl == 'eager' else loss_rel:.1e}",
                         "grad_rel_diff": f"{0.0 if impl == 'eager' else grad_rel:.1e}"})
        keys = ["layout", "batch", "dtype", "checkpointing", "impl", "saved_MiB",
                "saved_vs_eager", "held_MiB", "held_vs_eager", "step_ms", "img_per_s",
                "x_vs_eager", "peak_MiB", "peak_vs_eager", "act_peak_MiB", "act_peak_vs_eager",
                "loss_rel_diff", "grad_rel_diff"]
    print_table(rows, keys)
    if not args.max_batch:
        ratio = user["adm_fast"]["saved"] / user["eager"]["saved"]
        held = user["adm_fast"]["held"] / user["eager"]["held"]
        print(f"saved for backward, adm_fast/eager: {ratio:.3f} (target <= 0.5; a user's step, "
              f"built as adm-fast train builds it; memory the forward left allocated: "
              f"{held:.3f}); loss max rel diff {loss_rel:.1e}, grad max rel diff {grad_rel:.1e}")
    if not args.no_save:
        name = f"train_{'gpu' if cuda else 'cpu'}"
        print("appended to", append_rows(results_file(args, name), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
