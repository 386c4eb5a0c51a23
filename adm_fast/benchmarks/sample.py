"""`adm-fast bench sample`: classifier-guided sampling throughput.

Per layout, in one process: guided-diffusion's computation (the eager
backend), adm_fast on each backend setting, and torch.compile of the eager
models, each timed over whole sampling loops (per step: UNet forward,
classifier forward and backward to x_t, the step update: what
`p_sample_loop` / `ddim_sample_loop` with `classifier_cond_fn` do), in
interleaved rounds so a noisy machine slows all of them alike. The same run
checks agreement with eager on the same seed: one step from the same x_t,
and the final samples of a whole loop.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..diffusion import classifier_cond_fn
from ..models.layout import use_preferred_layout
from ..ops import BackendNotSupported, use_backend
from . import common
from .flops import step_flops
from .layouts import (
    TINY,
    BenchInputError,
    Layout,
    backend_settings,
    build,
    layout,
    make_diffusion,
    model_fn,
)

__all__ = ["SampleBenchConfig", "run_sample_bench", "TINY", "TABLE_KEYS"]

TABLE_KEYS = ["preset", "batch", "steps", "sampler", "dtype", "impl", "ms_per_step",
              "pred_ms", "meas/pred", "img_per_s", "x_vs_eager", "TFLOP/s", "MFU%",
              "step_max_abs_diff", "loop_max_abs_diff", "compile_s"]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class SampleBenchConfig:
    presets: list[str]
    device: torch.device
    batch_size: int
    steps: int = 25
    guidance: float | None = None  # None: the layout's classifier_scale
    sampler: str = "ddpm"
    dtype: torch.dtype | None = None  # None/fp32: all fp32; bf16/fp16: use_fp16 recipe
    backends: list[str] | None = None  # None: every backend usable here
    compile: bool = False
    warmup: int = 0
    repeats: int = 3
    seed: int = 0
    results_dir: Path | None = None
    save: bool = True
    model_path: str | None = None
    classifier_path: str | None = None
    progress: bool = True


@dataclasses.dataclass
class _Impl:
    label: str
    setting: object
    model: Callable
    classifier: torch.nn.Module | None
    diffs: tuple = (0.0, 0.0)  # max |Δ| against eager: one step, whole loop


def _setting_str(setting) -> str:
    if isinstance(setting, str):
        return setting
    return ";".join(f"{op}={name}" for op, name in setting.items()) + ";others=auto"


def _fmt(v: float, spec: str) -> str:
    return "nan" if v != v else format(v, spec)


def _plan(lay: Layout, cfg: SampleBenchConfig):
    """(guidance scale, diffusion, backend settings): every input error of a
    layout, found before any layout runs."""
    scale = lay.classifier_scale if cfg.guidance is None else cfg.guidance
    if scale > 0 and lay.classifier_flags is None:
        raise BenchInputError(f"{lay.name} has no paired classifier: pass --guidance 0")
    return (scale, make_diffusion(lay, cfg.sampler, cfg.steps),
            backend_settings(cfg.backends, cfg.device, cfg.dtype or torch.float32))


@dataclasses.dataclass
class _Run:
    """One layout's fixed inputs and loops."""
    lay: Layout
    cfg: SampleBenchConfig
    scale: float
    diffusion: object
    shape: tuple
    kwargs: dict
    x_t: torch.Tensor
    x_T: torch.Tensor
    t_mid: torch.Tensor

    def loop(self, impl: _Impl, noise=None):
        fn = (self.diffusion.ddim_sample_loop if self.cfg.sampler == "ddim"
              else self.diffusion.p_sample_loop)
        with use_backend(impl.setting):
            return fn(impl.model, self.shape, noise=noise, cond_fn=self._cond(impl),
                      model_kwargs=self.kwargs, device=self.cfg.device, progress=False)

    def one_step(self, impl: _Impl):
        fn = (self.diffusion.ddim_sample if self.cfg.sampler == "ddim"
              else self.diffusion.p_sample)
        with use_backend(impl.setting), torch.no_grad():  # as inside the loops
            torch.manual_seed(self.cfg.seed)
            return fn(impl.model, self.x_t, self.t_mid, cond_fn=self._cond(impl),
                      model_kwargs=self.kwargs)["sample"]

    def _cond(self, impl: _Impl):
        return None if impl.classifier is None else classifier_cond_fn(impl.classifier,
                                                                      self.scale)


def _setup(lay: Layout, cfg: SampleBenchConfig):
    """(the run's inputs, its implementations). adm_fast rows run copies of the
    models in the device's preferred layout; eager and compile the models as
    built (guided-diffusion's computation)."""
    device = cfg.device
    scale, diffusion, settings = _plan(lay, cfg)
    unet = build(lay, "unet", device, cfg.dtype, cfg.model_path)
    classifier = (build(lay, "classifier", device, cfg.dtype, cfg.classifier_path)
                  if scale > 0 else None)
    b, size = cfg.batch_size, lay.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    y = torch.randint(0, 1000, (b,), generator=g).to(device)
    x_t = torch.randn((b, 3, size, size), generator=g).to(device)
    x_T = torch.randn((b, 3, size, size), generator=g).to(device)
    kwargs = {"y": y} if (lay.class_cond or classifier is not None) else {}
    t_mid = torch.full((b,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)
    run = _Run(lay, cfg, scale, diffusion, (b, 3, size, size), kwargs, x_t, x_T, t_mid)
    fast_unet = use_preferred_layout(copy.deepcopy(unet), device)
    fast_cls = None if classifier is None else use_preferred_layout(copy.deepcopy(classifier),
                                                                    device)
    impls = [_Impl("eager", "eager", model_fn(unet, lay.class_cond), classifier)]
    impls += [_Impl(label, s, model_fn(fast_unet, lay.class_cond), fast_cls)
              for label, s in settings]
    if cfg.compile:
        impls.append(_Impl("compile(eager)", "eager",
                           model_fn(torch.compile(unet, dynamic=False), lay.class_cond),
                           None if classifier is None else torch.compile(classifier,
                                                                         dynamic=False)))
    return run, impls, (unet, classifier, y)


def _validate(run: _Run, impls: list[_Impl], log) -> dict[str, float]:
    """The first, untimed, runs (compilation happens here): each impl's one step
    and whole loop against eager's; returns each impl's seconds for this."""
    outs: dict[str, tuple] = {}
    took: dict[str, float] = {}
    name = run.lay.name
    for impl in list(impls):
        start = time.perf_counter()
        try:
            one = run.one_step(impl)
            torch.manual_seed(run.cfg.seed + 1)
            outs[impl.label] = (one, run.loop(impl))
        except BackendNotSupported as e:
            if impl.label == "eager":
                raise
            log(f"  {name}: {impl.label} skipped: {str(e).splitlines()[-1].strip()}")
            impls.remove(impl)
            continue
        except Exception as e:
            if not impl.label.startswith("compile"):
                raise
            log(f"  {name}: torch.compile failed, row skipped: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            impls.remove(impl)
            continue
        took[impl.label] = time.perf_counter() - start
    ref_one, ref_loop = outs["eager"]
    for impl in impls[1:]:
        one, final = outs[impl.label]
        impl.diffs = ((one.float() - ref_one.float()).abs().max().item(),
                      (final.float() - ref_loop.float()).abs().max().item())
        log(f"validation  {name}  {impl.label} vs eager (same seed, "
            f"{DTYPE_NAMES[run.cfg.dtype or torch.float32]}): one step max|Δ| "
            f"{impl.diffs[0]:.2e}, {run.cfg.steps}-step loop max|Δ| {impl.diffs[1]:.2e}"
            + (f"  (compile and first loop: {took[impl.label]:.0f} s)"
               if impl.label.startswith("compile") else ""))
    return took


def _time(run: _Run, impls: list[_Impl]) -> dict[str, list[float]]:
    """Interleaved rounds of whole loops (a bar on stderr: loops take seconds)."""
    from tqdm import tqdm

    cfg = run.cfg
    times: dict[str, list[float]] = {impl.label: [] for impl in impls}
    with tqdm(total=(cfg.warmup + cfg.repeats) * len(impls), desc=f"{run.lay.name} loops",
              unit="loop", leave=False, file=sys.stderr, disable=not cfg.progress) as bar:
        for r in range(cfg.warmup + cfg.repeats):
            for impl in impls:
                if r < cfg.warmup:
                    run.loop(impl, run.x_T)
                else:
                    times[impl.label].append(
                        common.time_once_ms(lambda impl=impl: run.loop(impl, run.x_T),
                                            cfg.device))
                bar.update()
    return times


def _bench_layout(lay: Layout, cfg: SampleBenchConfig, ctx: dict, log) -> list[dict]:
    run, impls, (unet, classifier, y) = _setup(lay, cfg)
    took = _validate(run, impls, log)
    times = _time(run, impls)
    b, device = cfg.batch_size, cfg.device
    t_model = torch.full((b,), run.diffusion.timestep_map[run.t_mid[0].item()], device=device)
    flops = step_flops(model_fn(unet, lay.class_cond), run.x_t, t_model, run.kwargs,
                       classifier, y)
    log(f"{lay.name}: {flops['total'] / b / 1e9:.2f} GFLOP per image per step (UNet forward "
        f"{flops['unet'] / b / 1e9:.2f}, classifier forward+backward "
        f"{flops['classifier'] / b / 1e9:.2f}), guidance scale {run.scale:g}")
    predicted = _predictions(run, impls, log)
    rows = _rows(run, impls, times, took, flops, ctx, predicted)
    if cfg.compile:  # the next layout's models must not count against recompile limits
        torch.compiler.reset()
    return rows


def _roofline_device(device: torch.device):
    from . import roofline

    if device.type == "cpu":
        return roofline.measure_cpu()
    name = torch.cuda.get_device_name(device).upper()
    known = next((k for k in roofline.DEVICES if k in name), None)
    major, minor = torch.cuda.get_device_capability(device)
    return roofline.device_for(known, 10 * major + minor)


def _predictions(run: _Run, impls, log) -> dict[str, dict]:
    """The roofline's ms per step (benchmarks/roofline.py) for eager and each
    adm_fast setting, from a step traced on fake tensors of the device."""
    from . import roofline
    from .plan import trace_step

    cfg, lay = run.cfg, run.lay
    out: dict[str, dict] = {}
    try:
        device = _roofline_device(cfg.device)
        for impl in impls:
            if impl.label.startswith("compile"):
                continue  # the compiled graph is Inductor's, not a traced dispatch
            trace = trace_step(lay.name, None if run.scale > 0 else "none", 90,
                               DTYPE_NAMES[cfg.dtype or torch.float32], cfg.batch_size,
                               cfg.sampler, cfg.steps, impl.setting,
                               device_type=cfg.device.type)
            out[impl.label] = roofline.predict(trace, device)
        log(roofline.format_prediction({"device": device.name, **out}).splitlines()[0]
            + f" ceilings: {device.tflops_fp32 * 1e3:.0f} GFLOP/s fp32, {device.gbps:.0f} GB/s"
            + (f", {device.host_us:.1f} us/op ({device.source})" if device.cpu else
               f" ({device.source})"))
    except Exception as e:  # noqa: BLE001 - the prediction must not cost the measurement
        log(f"  {lay.name}: roofline not traced: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}")
    return out


def _rows(run: _Run, impls, times, took, flops, ctx, predicted=None) -> list[dict]:
    cfg, lay, b = run.cfg, run.lay, run.cfg.batch_size
    peak = common.ceilings(cfg.device)[1] if cfg.device.type == "cuda" else None
    eager_ms = common.median(times["eager"])
    rows = []
    for impl in impls:
        loop_ms = common.median(times[impl.label])
        step_ms = loop_ms / cfg.steps
        tflops = flops["total"] / (step_ms * 1e-3) / 1e12
        d1, dl = impl.diffs
        rows.append({
            **ctx, "preset": lay.name, "image_size": lay.image_size, "batch": b,
            "steps": cfg.steps, "sampler": cfg.sampler, "guidance": f"{run.scale:g}",
            "dtype": DTYPE_NAMES[cfg.dtype or torch.float32], "impl": impl.label,
            "backend": _setting_str(impl.setting),
            "compile": impl.label.startswith("compile"), "repeats": cfg.repeats,
            "ms_per_step": f"{step_ms:.2f}",
            "pred_ms": (f"{predicted[impl.label]['ms']:.2f}"
                        if predicted and impl.label in predicted else "-"),
            "meas/pred": (f"{step_ms / predicted[impl.label]['ms']:.2f}"
                          if predicted and impl.label in predicted else "-"),
            "img_per_s": f"{b * 1e3 / loop_ms:.3f}",
            "x_vs_eager": f"{eager_ms / loop_ms:.2f}",
            "GFLOP_per_img_step": f"{flops['total'] / b / 1e9:.3f}",
            "TFLOP/s": _fmt(tflops, ".3f"),
            # No bf16 peak is known for a CPU: no MFU rather than a made-up one.
            "MFU%": _fmt(100 * tflops / peak, ".1f") if peak else "-",
            "step_max_abs_diff": f"{d1:.2e}", "loop_max_abs_diff": f"{dl:.2e}",
            "compile_s": f"{took[impl.label]:.0f}" if impl.label.startswith("compile") else "",
        })
    return rows


def run_sample_bench(cfg: SampleBenchConfig, log=print) -> list[dict]:
    """Benchmark every layout in cfg.presets; print the table, append the rows
    to <results_dir (default: the current folder)>/sample_<cpu|gpu>.csv (when
    cfg.save) and return them."""
    if cfg.batch_size < 1:
        raise BenchInputError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.steps < 1:
        raise BenchInputError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise BenchInputError("--repeats must be at least 1 and --warmup at least 0")
    if cfg.guidance is not None and cfg.guidance < 0:
        raise BenchInputError(f"--guidance must be >= 0, got {cfg.guidance}")
    if cfg.sampler not in ("ddpm", "ddim"):
        raise BenchInputError(f"--sampler must be ddpm or ddim, got {cfg.sampler!r}")
    layouts = [layout(name) for name in cfg.presets]
    if (cfg.model_path or cfg.classifier_path) and len(layouts) != 1:
        raise BenchInputError("--model_path/--classifier_path need exactly one --preset")
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda, but CUDA is not available here")
    for lay in layouts:
        _plan(lay, cfg)
    ctx = common.context(cfg.device)
    rows: list[dict] = []
    for lay in layouts:
        rows += _bench_layout(lay, cfg, ctx, log)
    log(common.format_table(rows, TABLE_KEYS))
    if cfg.save:
        name = "sample_gpu.csv" if cfg.device.type == "cuda" else "sample_cpu.csv"
        folder = Path(cfg.results_dir) if cfg.results_dir else Path(".")
        log(f"appended to {common.append_rows(folder / name, rows)}")
    return rows
