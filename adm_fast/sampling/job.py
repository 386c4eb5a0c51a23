"""From `adm-fast sample`'s flags to loaded models, a diffusion and the
sample_images arguments, with every problem an InputError before sampling."""

from __future__ import annotations

import dataclasses

import torch

from ..checkpoint import load_checkpoint
from ..diffusion import create_gaussian_diffusion
from ..ops.backend import check_name
from .base_samples import check_labels, check_low_res, load_base_samples
from .classes import check_classes
from .flags import check_classifier_size, check_options
from .resolve import CONSTRUCT, InputError, Source, resolve

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Job:
    model: torch.nn.Module
    diffusion: object
    kwargs: dict  # sample_images's keyword arguments beyond the counts and the seed
    dtype: str
    steps: int  # per batch
    labelled: bool  # whether the samples come with labels (arr_1)
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr
    # io.file_identity of the checkpoints as read ("model_path", "classifier_path")
    files: dict = dataclasses.field(default_factory=dict)


def _dtype(args, device: torch.device, trained_fp16: bool) -> torch.dtype:
    if args["dtype"]:
        return DTYPES[args["dtype"]]
    return torch.float16 if device.type == "cuda" and trained_fp16 else torch.float32


def _check_flags(args, explicit: dict, device: torch.device) -> str:
    """The sampler the flags ask for, after the rules sample_images shares."""
    sampler = args["sampler"] or ("ddim" if args["use_ddim"] else "ddpm")
    if args["use_ddim"] and sampler != "ddim":
        raise InputError(f"--use_ddim True asks for DDIM but --sampler is {sampler}")
    if args["backend"]:
        try:
            check_name(args["backend"])
        except ValueError as e:
            raise InputError(f"--backend: {e}") from None
    check_options(num_samples=args["num_samples"], batch_size=args["batch_size"],
                  sampler=sampler, eta=args["eta"], steps=args["steps"],
                  cuda_graph=args["cuda_graph"], cfg_scale=args["cfg_scale"],
                  classifier_scale=args["classifier_scale"], seed=args["seed"],
                  scale_without_classifier=(args["classifier_path"] == ""
                                            and "classifier_scale" in explicit),
                  flags=True, device_type=device.type)
    return sampler


def _model_source(args, explicit: dict) -> Source:
    sr_hint = bool(args["base_samples"]) or bool({"large_size", "small_size"} & set(explicit))
    fallback = ({"kind": "sr" if sr_hint else "unet"}
                if set(explicit) & (set(CONSTRUCT["unet"]) | set(CONSTRUCT["sr"])) else None)
    src = resolve(args["model_path"], "model", explicit, args["preset"], fallback)
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
    return src


def _classifier(args, explicit: dict, model, src: Source, device: torch.device):
    """(classifier or None, scale, the identity of its file as read)."""
    if not args["classifier_path"]:
        return None, 0.0, None
    csrc = resolve(args["classifier_path"], "classifier", explicit, keep_size=True,
                   fallback={"kind": "classifier", "image_size": model.image_size})
    if csrc.kind != "classifier":
        raise InputError(f"--classifier_path {args['classifier_path']} holds a "
                         f"{csrc.kind} model, not a classifier")
    classifier = load_checkpoint(csrc.file, preset=csrc.spec, device=device,
                                 dtype=_dtype(args, device, csrc.flags["classifier_use_fp16"]))
    check_classifier_size(classifier.image_size, model.image_size, args["classifier_path"],
                          args["model_path"])
    scale = args.get("classifier_scale")
    if scale is None:
        preset_scale = src.preset.classifier_scale if src.preset else None
        scale = preset_scale if preset_scale is not None else 1.0
    return classifier, scale, csrc.file.identity


def _diffusion(args, src: Source, model, sampler: str):
    """The diffusion: flags given > the file's stored diffusion flags > the
    preset's > guided-diffusion's defaults. Returns (diffusion, dpm++ steps)."""
    stored_sigma = src.diffusion.get("learn_sigma")
    if stored_sigma is not None and stored_sigma != (model.out_channels == 6):
        raise InputError(f"{args['model_path']} stores learn_sigma={stored_sigma} but its model "
                         f"outputs {model.out_channels} channels")
    f = src.flags
    respacing, steps = args.get("timestep_respacing"), args["steps"]
    if respacing is None:
        if sampler == "dpm++":  # dpm++ picks its own timesteps on the full process
            respacing, steps = "", steps if steps is not None else 20
        elif "timestep_respacing" in src.diffusion:
            respacing = src.diffusion["timestep_respacing"]
        else:
            respacing = src.preset.timestep_respacing if src.preset else ""
    diffusion = create_gaussian_diffusion(
        steps=f["diffusion_steps"], learn_sigma=model.out_channels == 6,
        noise_schedule=f["noise_schedule"], use_kl=f["use_kl"],
        predict_xstart=f["predict_xstart"], rescale_timesteps=f["rescale_timesteps"],
        rescale_learned_sigmas=f["rescale_learned_sigmas"], timestep_respacing=respacing)
    if steps is not None:
        diffusion.log_snr_timesteps(steps)  # a bad --steps is an input error, found here
    return diffusion, steps


def _base_samples(args, src: Source, world_size: int):
    if src.kind != "sr":
        return None, None
    low_res, labels = load_base_samples(
        args["base_samples"], src.flags["small_size"] if "small_size" in src.known else None)
    if len(low_res) < world_size:
        raise InputError(f"--base_samples holds {len(low_res)} images, fewer than the "
                         f"{world_size} ranks")
    return low_res, labels


def prepare(args, explicit: dict, device: torch.device, world_size: int) -> Job:
    sampler = _check_flags(args, explicit, device)
    src = _model_source(args, explicit)
    low_res, labels = _base_samples(args, src, world_size)
    dtype = _dtype(args, device, src.flags["use_fp16"])
    model = load_checkpoint(src.file, preset=src.spec, device=device, dtype=dtype)
    if src.kind == "sr":
        labels = labels if model.num_classes is not None else None
        check_low_res(low_res, labels, model.image_size, model.num_classes is not None)
        if labels is not None:
            try:
                check_labels(labels, model.num_classes, f"--base_samples {args['base_samples']}: "
                             "arr_1")
            except ValueError as e:
                raise InputError(str(e)) from None
    if args["cfg_scale"] is not None and getattr(model, "null_label", None) is None:
        raise InputError(f"--cfg_scale needs a model with a null class (built with "
                         f"null_class=True, trained with label dropout); "
                         f"{args['model_path']} has none")
    classifier, scale, classifier_file = _classifier(args, explicit, model, src, device)
    guided = classifier is not None and scale != 0
    classes = _classes(args, model, classifier if guided else None, src.kind == "sr")
    diffusion, steps = _diffusion(args, src, model, sampler)
    kwargs = dict(classifier=classifier, classifier_scale=scale, cfg_scale=args["cfg_scale"],
                  sampler=sampler, eta=args["eta"], steps=steps,
                  clip_denoised=args["clip_denoised"], low_res=low_res, low_res_labels=labels,
                  classes=classes, cuda_graph=args["cuda_graph"])
    return Job(model, diffusion, kwargs, {v: k for k, v in DTYPES.items()}[dtype],
               steps if steps is not None else diffusion.num_timesteps,
               model.num_classes is not None or guided,
               _label_warnings(args, model, classifier if guided else None, classes),
               {"model_path": src.file.identity, "classifier_path": classifier_file})


def _label_warnings(args, model, guide, classes) -> list[str]:
    """A guiding classifier that names no classes and has more labels than the
    unconditional model's training images had classes: its labels are drawn
    from all of them, most likely ones the model never saw (a 1000-way head
    trained on 10 classes). Said, not guessed: which labels are the model's
    classes is not known."""
    trained = getattr(model, "class_names", None)
    if guide is None or model.num_classes is not None or classes is not None or not trained \
            or getattr(guide, "class_names", None) or guide.out_channels <= len(trained):
        return []
    n, labels = len(trained), guide.out_channels
    return [f"the classifier {args['classifier_path']} names no classes and has {labels} "
            f"labels, the model {args['model_path']} was trained on {n} classes: labels are "
            f"drawn from all {labels}; --classes 0-{n - 1} draws from the first {n}"]


def _classes(args, model, guide, is_sr: bool) -> list | None:
    if args["classes"] is None:
        return None
    if is_sr:
        raise InputError("--classes: a super-resolution model takes its labels from "
                         "--base_samples (arr_1)")
    if model.num_classes is not None:
        count, what = model.num_classes, f"the model {args['model_path']}"
    elif guide is not None:
        count, what = guide.out_channels, f"the classifier {args['classifier_path']}"
    else:
        raise InputError(f"--classes needs a class-conditional model or classifier guidance; "
                         f"{args['model_path']} is unconditional")
    try:
        return check_classes(args["classes"], count, what)
    except ValueError as e:
        raise InputError(f"--classes: {e}") from None
