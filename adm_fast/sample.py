"""adm-fast sample: guided-diffusion's image_sample.py, classifier_sample.py and
super_res_sample.py in one command, with their flags, defaults and output.

Model flags come, lowest to highest priority, from guided-diffusion's
defaults, the checkpoint (its preset, recognised from the tensors, or an
adm_fast safetensors file's own flags) or `--preset`, and the flags given.
Flags that change the layout make the checkpoint load against them (and fail
with the checkpoint's differences if it does not fit). Under torchrun each rank
samples its share with seed+rank and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from typing import Dict, Optional

import torch

from . import presets as _presets
from .checkpoint import CheckpointError, detect_preset, load_checkpoint, read_state_dict
from .diffusion import NonFiniteSampleError, create_gaussian_diffusion
from .ops import BackendNotSupported, current_backend, use_backend
from .sampling_api import (SAMPLERS, check_low_res, gather_samples, load_base_samples,
                           sample_images, save_samples)
from .script_util import (classifier_defaults, create_classifier, create_model,
                          model_and_diffusion_defaults, sr_create_model,
                          sr_model_and_diffusion_defaults, str2bool)

__all__ = ["main", "build_parser", "sample_images", "save_samples"]

PROG = "adm-fast sample"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("auto", "eager", "cpu", "triton", "cuda", "sdpa")
_SCRIPT_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False,
                        model_path="", classifier_path="", classifier_scale=1.0, base_samples="")
_CONSTRUCT = {kind: [p for p in inspect.signature(fn).parameters]
              for kind, fn in (("unet", create_model), ("sr", sr_create_model),
                               ("classifier", create_classifier))}
# Flags of the constructors that leave the state_dict's layout as it is.
_NOT_LAYOUT = {"use_fp16", "use_checkpoint", "dropout", "small_size", "classifier_use_fp16"}
_KIND_OF_CLASS = {"UNetModel": "unet", "SuperResModel": "sr", "EncoderUNetModel": "classifier"}


class InputError(ValueError):
    """Bad flags or files: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(message)


def _gd_defaults() -> Dict:
    d = dict(_SCRIPT_DEFAULTS)
    for table in (model_and_diffusion_defaults(), classifier_defaults(),
                  sr_model_and_diffusion_defaults()):
        d.update(table)
    for fn in (create_model, sr_create_model, create_classifier):
        # adm_fast's additions (null_class, ...) have no guided-diffusion default
        for name, p in inspect.signature(fn).parameters.items():
            if name not in d and p.default is not inspect.Parameter.empty:
                d[name] = p.default
    return d


_DEFAULTS = _gd_defaults()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    # guided-diffusion's flags default to SUPPRESS so that the ones given can be
    # told apart: they override the checkpoint's and the preset's.
    g = p.add_argument_group("guided-diffusion's flags (and adm_fast's model additions)")
    for k, v in _DEFAULTS.items():
        g.add_argument(f"--{k}", type=str2bool if isinstance(v, bool) else type(v),
                       default=argparse.SUPPRESS, metavar=type(v).__name__.upper(),
                       help=f"default: {v!r}")
    a = p.add_argument_group("adm_fast's flags")
    models = [n for n in _presets.names() if _presets.get(n).kind != "classifier"]
    a.add_argument("--preset", metavar="NAME", help="take model flags, respacing and "
                   "classifier scale from a released checkpoint (default: recognised from "
                   f"the checkpoint): {', '.join(models)}")
    a.add_argument("--sampler", choices=SAMPLERS,
                   help="default ddpm, or ddim with --use_ddim True")
    a.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (default 0)")
    a.add_argument("--steps", type=int, help="dpm++: timesteps uniform in log-SNR (default 20 "
                   "on the full process; without it after --timestep_respacing, those steps)")
    a.add_argument("--cfg_scale", type=float, help="classifier-free guidance weight "
                   "(a model with a null class)")
    a.add_argument("--seed", type=int, default=0, help="rank r uses seed+r (default 0)")
    a.add_argument("--out", default=".", help="folder for samples_NxHxWx3.npz and .png "
                   "(default .)")
    a.add_argument("--backend", choices=BACKENDS, help="adm_fast op backend "
                   "(default: $ADM_FAST_BACKEND, else auto)")
    a.add_argument("--device", help="default: cuda if available, else cpu")
    a.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on a GPU for a model "
                   "trained with use_fp16, else fp32")
    a.add_argument("--cuda_graph", action="store_true",
                   help="replay each whole guided step (model, classifier forward and "
                   "backward, update) as one CUDA graph: for launch-bound models (64x64); "
                   "ddpm and ddim, CUDA only")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm bars over samples and steps on stderr (default on)")
    return p


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _inspect(path: str, what: str):
    """(metadata, state_dict of meta tensors): enough to tell the model apart
    without reading its weights."""
    if not path:
        raise InputError(f"--{what}_path is required")
    if not os.path.isfile(path):
        raise InputError(f"{what} checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                      for k in f.keys()}
        except SafetensorError as e:
            raise InputError(f"{path} is not a readable safetensors file: {e}") from None
        return meta, sd
    sd, meta = read_state_dict(path, device="meta")
    return meta, sd


@dataclasses.dataclass
class _Source:
    kind: str
    preset: Optional[_presets.Preset]
    flags: Dict  # guided-diffusion defaults < checkpoint/preset < flags given
    known: set  # the flags not left at guided-diffusion's defaults
    spec: object  # what load_checkpoint gets as preset=


def _resolve(path: str, what: str, explicit: Dict, preset_name: Optional[str] = None,
             fallback: Optional[Dict] = None, keep_size: bool = False) -> _Source:
    meta, sd = _inspect(path, what)
    preset, base, from_meta, kind = None, {}, False, None
    if preset_name:
        preset = _presets.get(preset_name)
    elif "adm_fast.class" in meta:
        from_meta, kind = True, _KIND_OF_CLASS.get(meta["adm_fast.class"])
        if kind is None:
            raise InputError(f"{path} holds an unknown model class {meta['adm_fast.class']}")
        base = json.loads(meta.get("adm_fast.flags", "{}"))
        preset = _presets.PRESETS.get(meta.get("adm_fast.preset", ""))
    else:
        try:
            preset = detect_preset(sd, path)
        except CheckpointError:
            if not fallback:
                raise
            kind, base = fallback.pop("kind"), fallback
    if preset is not None:
        kind, base = preset.kind, {**preset.flags, **base}
    base.pop("kind", None)
    changed = {k for k, v in explicit.items() if k in _CONSTRUCT.get(kind, ()) and
               k not in _NOT_LAYOUT and v != base.get(k, _DEFAULTS[k]) and
               not (keep_size and k == "image_size")}
    flags = {**_DEFAULTS, **base, **{k: v for k, v in explicit.items()
                                    if not (keep_size and k == "image_size")}}
    if from_meta and not changed:
        spec = None
    elif preset is not None and not changed:
        spec = preset
    else:
        spec = {"kind": kind, **{k: flags[k] for k in _CONSTRUCT.get(kind, ())}}
    return _Source(kind, preset, flags, set(base) | set(explicit), spec)


def _dtype(args, device: torch.device, trained_fp16: bool) -> torch.dtype:
    if args["dtype"]:
        return DTYPES[args["dtype"]]
    return torch.float16 if device.type == "cuda" and trained_fp16 else torch.float32


@dataclasses.dataclass
class _Job:
    model: torch.nn.Module
    diffusion: object
    kwargs: Dict
    dtype: str


def _prepare(args, explicit: Dict, device: torch.device, world_size: int) -> _Job:
    for name in ("num_samples", "batch_size"):
        if args[name] < 1:
            raise InputError(f"--{name} must be at least 1, got {args[name]}")
    sampler = args["sampler"] or ("ddim" if args["use_ddim"] else "ddpm")
    if args["use_ddim"] and sampler != "ddim":
        raise InputError(f"--use_ddim True asks for DDIM but --sampler is {sampler}")
    if args["eta"] != 0.0 and sampler != "ddim":
        raise InputError(f"--eta is DDIM's; the {sampler} sampler does not take it")
    if args["steps"] is not None and sampler != "dpm++":
        raise InputError("--steps is for --sampler dpm++; respace the others with "
                         "--timestep_respacing")
    if args["cuda_graph"] and (device.type != "cuda" or sampler == "dpm++"):
        raise InputError("--cuda_graph needs a CUDA device and --sampler ddpm or ddim "
                         f"(here: {device.type}, {sampler})")
    sr_hint = bool(args["base_samples"]) or bool({"large_size", "small_size"} & set(explicit))
    model_fallback = ({"kind": "sr" if sr_hint else "unet"}
                      if set(explicit) & (set(_CONSTRUCT["unet"]) | set(_CONSTRUCT["sr"]))
                      else None)
    src = _resolve(args["model_path"], "model", explicit, args["preset"], model_fallback)
    if src.kind == "classifier":
        what = f"--preset {args['preset']}" if args["preset"] else args["model_path"]
        raise InputError(f"{what} is a classifier; pass it with --classifier_path and the "
                         "diffusion model with --model_path")
    if src.kind == "sr" and not args["base_samples"]:
        raise InputError("--base_samples is required for a super-resolution model: an .npz "
                         "of low-res samples (arr_0 uint8 NHWC, arr_1 labels) as "
                         "image_sample.py writes")
    if src.kind != "sr" and args["base_samples"]:
        raise InputError("--base_samples is for super-resolution models only")
    if args["classifier_path"] == "" and "classifier_scale" in explicit:
        raise InputError("--classifier_scale needs --classifier_path")
    low_res = labels = None
    if src.kind == "sr":
        low_res, labels = load_base_samples(
            args["base_samples"], src.flags["small_size"] if "small_size" in src.known else None)
        if len(low_res) < world_size:
            raise InputError(f"--base_samples holds {len(low_res)} images, fewer than the "
                             f"{world_size} ranks")

    dtype = _dtype(args, device, src.flags["use_fp16"])
    model = load_checkpoint(args["model_path"], preset=src.spec, device=device, dtype=dtype)
    if src.kind == "sr":
        labels = labels if model.num_classes is not None else None
        check_low_res(low_res, labels, model.image_size, model.num_classes is not None)
    if args["cfg_scale"] is not None and getattr(model, "null_label", None) is None:
        raise InputError(f"--cfg_scale needs a model with a null class (built with "
                         f"null_class=True, trained with label dropout); "
                         f"{args['model_path']} has none")

    classifier, scale = None, 0.0
    if args["classifier_path"]:
        csrc = _resolve(args["classifier_path"], "classifier", explicit, keep_size=True,
                        fallback={"kind": "classifier", "image_size": model.image_size})
        if csrc.kind != "classifier":
            raise InputError(f"--classifier_path {args['classifier_path']} holds a "
                             f"{csrc.kind} model, not a classifier")
        classifier = load_checkpoint(args["classifier_path"], preset=csrc.spec, device=device,
                                     dtype=_dtype(args, device, csrc.flags["classifier_use_fp16"]))
        if classifier.image_size != model.image_size:
            raise InputError(
                f"the classifier {args['classifier_path']} is for {classifier.image_size}x"
                f"{classifier.image_size} images but the model {args['model_path']} samples "
                f"{model.image_size}x{model.image_size}")
        scale = args.get("classifier_scale")
        if scale is None:
            preset_scale = src.preset.classifier_scale if src.preset else None
            scale = preset_scale if preset_scale is not None else 1.0

    f = src.flags
    respacing = args.get("timestep_respacing")
    steps = args["steps"]
    if respacing is None:
        if sampler == "dpm++":
            respacing, steps = "", steps if steps is not None else 20
        else:
            respacing = src.preset.timestep_respacing if src.preset else ""
    diffusion = create_gaussian_diffusion(
        steps=f["diffusion_steps"], learn_sigma=model.out_channels == 6,
        noise_schedule=f["noise_schedule"], use_kl=f["use_kl"],
        predict_xstart=f["predict_xstart"], rescale_timesteps=f["rescale_timesteps"],
        rescale_learned_sigmas=f["rescale_learned_sigmas"], timestep_respacing=respacing)
    if steps is not None:
        diffusion.log_snr_timesteps(steps)  # a bad --steps is an input error, found here
    kwargs = dict(classifier=classifier, classifier_scale=scale, cfg_scale=args["cfg_scale"],
                  sampler=sampler, eta=args["eta"], steps=steps,
                  clip_denoised=args["clip_denoised"], low_res=low_res, low_res_labels=labels,
                  cuda_graph=args["cuda_graph"])
    return _Job(model, diffusion, kwargs, {v: k for k, v in DTYPES.items()}[dtype])


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    from .train import distributed

    parser = build_parser()
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except InputError as e:
        _error(f"{e} (see {PROG} --help)")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    explicit = {k: v for k, v in vars(ns).items() if k in _DEFAULTS}
    args = {**_SCRIPT_DEFAULTS, **vars(ns)}
    args["classifier_scale"] = explicit.get("classifier_scale")
    args["timestep_respacing"] = explicit.get("timestep_respacing")
    world = None
    try:
        world = distributed.setup(args["device"])
        if not world.distributed and args["device"]:
            # setup() puts a single process on cuda:LOCAL_RANK; honour "cuda:1"
            world = dataclasses.replace(world, device=torch.device(args["device"]))
        job = _prepare(args, explicit, world.device, world.world_size)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        _error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        if world is not None:
            distributed.cleanup(world)
        return 2
    try:
        n, bs, w = args["num_samples"], args["batch_size"], world.world_size
        share = math.ceil(n / (w * bs)) * bs if world.distributed else n
        low_res = job.kwargs.pop("low_res")
        labels_in = job.kwargs.pop("low_res_labels")
        if low_res is not None and world.distributed:
            low_res = low_res[world.rank::w]
            labels_in = None if labels_in is None else labels_in[world.rank::w]
        size = job.model.image_size
        if world.is_main:
            steps = job.kwargs["steps"] or job.diffusion.num_timesteps
            print(f"{PROG}: {n} images of {size}x{size}, {job.kwargs['sampler']}, {steps} "
                  f"steps, seed {args['seed']}, {w} rank(s)", file=sys.stderr)
        backend = args["backend"] or current_backend()
        start = time.perf_counter()
        try:
            with use_backend(args["backend"]) if args["backend"] else contextlib.nullcontext():
                images, labels, stats = sample_images(
                    job.model, job.diffusion, num_samples=share, batch_size=bs,
                    low_res=low_res, low_res_labels=labels_in, seed=args["seed"] + world.rank,
                    device=world.device, progress=args["progress"] and world.is_main,
                    **job.kwargs)
        except BackendNotSupported as e:
            _error(str(e))
            return 2
        except NonFiniteSampleError as e:
            _error(str(e))
            return 1
        if world.distributed:
            images, labels = gather_samples(images, labels, world.device)
            stats["seconds"] = time.perf_counter() - start
        if world.is_main:
            images = images[:n]
            labels = None if labels is None else labels[:n]
            for path in save_samples(images, labels, args["out"]).values():
                print(f"wrote {path}")
            sec = stats["seconds"]
            print(f"sampled {n} images in {sec:.2f} s: {n / sec:.2f} images/s, "
                  f"{stats['ms_per_step']:.1f} ms per step ({stats['sampler']}, "
                  f"{stats['steps']} steps, {backend}, {world.device}, {job.dtype})")
        distributed.barrier(world)
        return 0
    finally:
        distributed.cleanup(world)


if __name__ == "__main__":
    sys.exit(main())
