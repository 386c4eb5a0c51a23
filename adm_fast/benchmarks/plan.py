"""`adm-fast bench plan`: what a GPU would run for one classifier-guided
sampling step, traced on a machine without one.

    adm-fast bench plan [--preset 256x256_diffusion] [--classifier 256x256_classifier]
                        [--arch 90] [--dtype bf16|fp16|fp32] [--batch 32]
                        [--sampler ddpm|ddim] [--backend auto] [--no-aot] [--json PATH]

The models are built as a user builds them (flags, the use_fp16 recipe in
the dtype, the device's preferred memory format), on fake CUDA tensors
(adm_fast.benchmarks.trace), and one step of the sampling loop runs — the
UNet, the classifier's forward and its backward to x_t, the fused update —
after one untraced warm-up step. The same step runs again as guided-diffusion
computes it (the eager backend, NCHW), and once more as a CUDA graph would
replay it. Then every Triton launch captured is compiled for sm_<arch>
(adm_fast/benchmarks/aot.py). Printed: which implementation each op took, launches by
kind, what could stall or slow the GPU (host syncs, CPU tensors, layout
copies, NCHW convolutions) and the roofline's prediction (roofline.py); with
--json, all of it as JSON.

What fake tensors cannot show: whether the kernels compute the right values
on that GPU (auto checks that on the first real call: ops/verify), their
speed, cuDNN's algorithm choice and workspace, and whether CUDA-graph
capture succeeds (the graphed step is traced eagerly; the plan shows what
stays outside the graph and that nothing inside syncs with the host).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from .flags import BenchInputError

PROG = "adm-fast bench plan"
DTYPES = ("bf16", "fp16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise BenchInputError(message)

    p = Parser(prog=PROG, allow_abbrev=False, description=(
        "What a GPU would run for one classifier-guided sampling step, traced on fake CUDA "
        "tensors without a GPU (needs a CUDA build of PyTorch)."))
    p.add_argument("--preset", default="256x256_diffusion",
                   help="a UNet preset (default 256x256_diffusion)")
    p.add_argument("--classifier", help="a classifier preset, or 'none' for no guidance "
                   "(default: the preset's own)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 to plan for "
                   "(default 90: H100/H200)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="the use_fp16 recipe's "
                   "dtype, or fp32 (default bf16)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", type=int, default=25, help="the respacing the step belongs to "
                   "(default 25)")
    p.add_argument("--backend", default="auto", help="adm_fast's backend setting (default auto)")
    p.add_argument("--device_model", help="the GPU the roofline predicts for (default: H200 "
                   "for --arch 90, A100 for 80)")
    p.add_argument("--aot", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every captured Triton launch for the arch (default on)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH")
    return p


def _dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _build(lay, kind: str, dtype, preferred_layout: bool):
    """A model as a user builds it, on the fake device in force."""
    from ..models.layout import use_preferred_layout
    from ..models.precision import apply_dtype
    from ..script_util import create_from_flags

    flags = lay.model_flags if kind == "unet" else lay.classifier_flags
    flags = {k: v for k, v in flags.items()
             if k not in ("diffusion_steps", "noise_schedule", "timestep_respacing")}
    model = apply_dtype(create_from_flags(kind, flags), None if dtype is None else dtype).eval()
    if preferred_layout:
        use_preferred_layout(model)
    return model


def trace_step(preset: str, classifier: str | None, arch: int, dtype: str, batch: int,
               sampler: str, steps: int, backend: str, graphed: bool = False,
               device_type: str = "cuda"):
    """The Trace of one guided step (the second of a loop) on fake tensors.
    backend "eager" is guided-diffusion's computation: NCHW models."""
    import torch

    from ..diffusion import classifier_cond_fn
    from ..ops import use_backend
    from . import layouts
    from .trace import Tracer, fake_device

    lay = layouts.layout(preset)
    lay = _with_classifier(lay, classifier)
    torch_dtype = _dtype(dtype)
    eager = backend == "eager"
    tracer = Tracer(device_type)
    with fake_device(device_type, arch), use_backend(backend):
        unet = _build(lay, "unet", None if dtype == "fp32" else torch_dtype, not eager)
        clf = None
        if lay.classifier_flags is not None:
            clf = _build(lay, "classifier", None if dtype == "fp32" else torch_dtype, not eager)
            if device_type == "cuda":
                # The backward is walked in Python here, which cannot prune as torch's
                # engine does: autograd.grad(…, x) leaves the weights' gradients
                # uncomputed, so their requires_grad off gives the same backward.
                for p in clf.parameters():
                    p.requires_grad_(False)
        diffusion = layouts.make_diffusion(lay, sampler, steps)
        shape = (batch, unet.in_channels, lay.image_size, lay.image_size)
        kw = {}
        if lay.class_cond or clf is not None:
            kw["y"] = torch.randint(0, 1000, (batch,))
        model = tracer.tag("unet", layouts.model_fn(unet, lay.class_cond))
        cond_fn = None
        if clf is not None:
            cond_fn = tracer.tag("classifier", classifier_cond_fn(clf, lay.classifier_scale or 1.0))
        noise = torch.randn(*shape)
        with tracer.running():
            if graphed:
                kind = sampler
                step = diffusion._graphed(kind, model, cond_fn, kw, True, None, 0.0)
                step._body = tracer.tag("graph", step._body)
                loop = diffusion._loop(step, model, shape, noise, None, False)
            elif sampler == "ddpm":
                loop = diffusion.p_sample_loop_progressive(model, shape, noise=noise,
                                                           cond_fn=cond_fn, model_kwargs=kw)
            else:
                loop = diffusion.ddim_sample_loop_progressive(model, shape, noise=noise,
                                                              cond_fn=cond_fn, model_kwargs=kw)
            next(loop)  # warm-up: one-time work (tables on the device, decisions)
            with tracer.recording():
                next(loop)
    return tracer.trace


def _with_classifier(lay, classifier: str | None):
    """The layout with its classifier replaced (a preset name) or dropped ('none')."""
    import dataclasses

    from .. import presets as _presets

    if classifier is None:
        return lay
    if classifier.lower() == "none":
        return dataclasses.replace(lay, classifier_flags=None)
    preset = _presets.PRESETS.get(classifier)
    if preset is None or preset.kind != "classifier":
        known = [n for n in _presets.names() if _presets.get(n).kind == "classifier"]
        raise BenchInputError(f"unknown classifier {classifier!r}; choose from "
                              f"{', '.join(known)} or none")
    return dataclasses.replace(lay, classifier_flags=dict(preset.flags))


_GRAPH_PARTS = ("graph", "unet", "classifier", "classifier_backward")


def summarize(trace, eager, graphed, aot: dict | None, cfg: dict, roofline: dict) -> dict:
    """The plan as a JSON-able dict (see the module docstring)."""
    launches = {kind: trace.count(kind) for kind in ("triton", "native", "aten")}
    launches["total"] = sum(launches.values())
    outside = graphed.count(parts=("other",))
    return {
        "config": cfg,
        "ops": {name: dict(sorted(impls.items())) for name, impls in sorted(trace.ops.items())},
        "launches": launches,
        "aten_top": dict(collections.Counter(
            f"{launch.name}" for launch in trace.launches if launch.kind == "aten").most_common(12)),
        "launches_by_part": {part: trace.count(parts=(part,))
                             for part in ("unet", "classifier", "classifier_backward", "other")},
        "eager_launches": eager.count(),
        "host_syncs": len(trace.syncs),
        "host_sync_sites": trace.syncs,
        "cpu_tensors": len(trace.cpu_tensors),
        "cpu_tensor_sites": trace.cpu_tensors,
        "layout_copies": len(trace.layout_copies),
        "layout_copy_sites": trace.layout_copies,
        "nchw_convolutions": len(trace.nchw_convolutions),
        "nchw_convolution_sites": trace.nchw_convolutions,
        "eager_nchw_convolutions": len(eager.nchw_convolutions),
        "image_input_convolutions": len(trace.image_convolutions),
        "classifier_backward_group_norm_forwards":
            trace.group_norm_forwards.get("classifier_backward", 0),
        "flops": {"mma": trace.flops(mma=True), "other": trace.flops(mma=False)},
        "bytes": {"memory_bound": trace.bytes(), "nchw_transposes": trace.nchw_conv_bytes},
        "cuda_graph": {
            "launches_in_graph": graphed.count(parts=_GRAPH_PARTS),
            "launches_outside": outside,
            "per_step_launches": outside + 1,
            "host_syncs_in_graph": sum(1 for s in graphed.syncs),
            "cpu_tensors_in_graph": len(graphed.cpu_tensors),
            "not_covered": ("fake tensors cannot capture a CUDA graph: the graphed step ran "
                            "eagerly; whether capture succeeds (cuDNN workspaces, allocator "
                            "pools) is for a GPU to show"),
        },
        "aot": aot,
        "roofline": roofline,
    }


def compile_launches(launches, arch: int) -> dict:
    """Compile each distinct captured launch for sm_<arch>; what failed or spilled."""
    from . import aot

    compiled, failures, spills, rows, seen = 0, [], [], [], set()
    for launch in launches:
        ready = aot.stand_in(launch)
        key = aot.specialization_key(ready)
        if key in seen:
            continue
        seen.add(key)
        name = launch.kernel.fn.__name__
        try:
            result = aot.compile_launch(ready, arch)
            regs, spill = aot.resource_usage(result)
            compiled += 1
            allowed = aot.spill_allowed(ready)
            if spill and not allowed:
                spills.append(f"{name} ({launch.case}): {spill} B")
            rows.append({"kernel": name, "op": launch.case, "regs": regs, "spill": spill,
                         "spill_allowed": bool(spill and allowed),
                         "smem": result.metadata.shared})
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures.append(f"{name} ({launch.case}): {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}")
    return {"compiled": compiled, "failures": len(failures), "failure_list": failures,
            "spills_unexpected": len(spills), "spill_list": spills, "kernels": rows}


def make_plan(args) -> dict:
    from . import roofline

    cfg = {"preset": args.preset, "classifier": args.classifier, "arch": args.arch,
           "dtype": args.dtype, "batch": args.batch, "sampler": args.sampler,
           "steps": args.steps, "backend": args.backend}
    common = dict(preset=args.preset, classifier=args.classifier, arch=args.arch,
                  dtype=args.dtype, batch=args.batch, sampler=args.sampler, steps=args.steps)
    trace = trace_step(backend=args.backend, **common)
    eager = trace_step(backend="eager", **common)
    graphed = trace_step(backend=args.backend, graphed=True, **common)
    aot = compile_launches(trace.triton + graphed.triton, args.arch) if args.aot else None
    device = roofline.device_for(args.device_model, args.arch)
    pred = {"device": device.name, "adm_fast": roofline.predict(trace, device, args.dtype),
            "eager": roofline.predict(eager, device, args.dtype),
            "adm_fast_graphed": roofline.predict(graphed, device, args.dtype, graphed=True)}
    return summarize(trace, eager, graphed, aot, cfg, pred)


def format_plan(plan: dict) -> str:
    c = plan["config"]
    lines = [f"plan: one guided {c['sampler']} step, {c['preset']} + "
             f"{c['classifier'] or 'its classifier'}, batch {c['batch']}, {c['dtype']}, sm_{c['arch']}, "
             f"backend {c['backend']} (traced on fake CUDA tensors)", "",
             "op implementations (calls):"]
    for name, impls in plan["ops"].items():
        lines.append(f"  {name:<28} " + ", ".join(f"{k} {v}" for k, v in impls.items()))
    la = plan["launches"]
    lines += ["", f"launches: {la['total']} ({la['triton']} Triton, {la['native']} native, "
              f"{la['aten']} ATen) against {plan['eager_launches']} for eager",
              "  by part: " + ", ".join(f"{k} {v}" for k, v in plan["launches_by_part"].items()),
              f"host syncs {plan['host_syncs']}, CPU tensors {plan['cpu_tensors']}, layout copies "
              f"{plan['layout_copies']}, NCHW 16-bit convolutions {plan['nchw_convolutions']} "
              f"(eager {plan['eager_nchw_convolutions']}), GroupNorm forwards in the "
              f"classifier's backward {plan['classifier_backward_group_norm_forwards']}"]
    lines.append("  most frequent ATen launches: " + ", ".join(
        f"{k.replace('aten::', '')} {v}" for k, v in plan["aten_top"].items()))
    for key in ("host_sync_sites", "cpu_tensor_sites", "layout_copy_sites",
                "nchw_convolution_sites"):
        for site in plan[key][:5]:
            lines.append(f"    {key.replace('_sites', '')}: {site}")
    g = plan["cuda_graph"]
    lines.append(f"CUDA graph: {g['launches_in_graph']} launches in the graph, "
                 f"{g['launches_outside']} outside it per step ({g['not_covered']})")
    if plan["aot"] is not None:
        a = plan["aot"]
        lines.append(f"AOT for sm_{c['arch']}: {a['compiled']} kernels compiled, "
                     f"{a['failures']} failures, {a['spills_unexpected']} unexpected spills")
        for item in a["failure_list"] + a["spill_list"]:
            lines.append(f"    {item}")
    from .roofline import format_prediction
    lines += ["", format_prediction(plan["roofline"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    if torch.version.cuda is None:
        raise BenchInputError(
            f"the plan traces on fake CUDA tensors, which needs a CUDA build of PyTorch (no GPU "
            f"needed); this one is {torch.__version__}")
    if args.batch < 1:
        raise BenchInputError(f"--batch must be at least 1, got {args.batch}")
    plan = make_plan(args)
    print(format_plan(plan), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
        print(f"plan written to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
