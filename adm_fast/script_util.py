"""guided-diffusion's script-flag layer: the same function names, arguments,
defaults and meanings, so existing command lines and configs carry over.

Script flags differ from constructor arguments in two ways that matter:
`attention_resolutions` is a comma list of pixel resolutions ("32,16,8"),
turned into downsample rates here, and `channel_mult=""` picks the released
models' per-resolution multipliers.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
from typing import Dict, Tuple

from .diffusion import create_gaussian_diffusion
from .models import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# channel_mult="" means this, per image size (guided-diffusion's choice).
AUTO_CHANNEL_MULT: Dict[int, Tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
SR_CHANNEL_MULT: Dict[int, Tuple[float, ...]] = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}


def diffusion_defaults():
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults():
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


_SR_KEYS = (
    "class_cond", "learn_sigma", "num_channels", "num_res_blocks", "num_heads",
    "num_head_channels", "num_heads_upsample", "attention_resolutions", "dropout",
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm",
    "resblock_updown", "use_fp16",
)


def sr_model_and_diffusion_defaults():
    base = model_and_diffusion_defaults()
    res = dict(large_size=256, small_size=64)
    res.update({k: base[k] for k in _SR_KEYS})
    return res


def parse_channel_mult(channel_mult, image_size: int, table=AUTO_CHANNEL_MULT,
                       what: str = "image size"):
    """channel_mult flag -> tuple: "" is the automatic choice, "1,2,2" explicit."""
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    if channel_mult == "":
        if image_size not in table:
            sizes = ", ".join(str(s) for s in sorted(table))
            raise ValueError(f"unsupported {what}: {image_size}; the automatic channel_mult "
                             f"exists for {sizes}: pass channel_mult explicitly")
        return table[image_size]
    try:
        values = [float(v) for v in channel_mult.split(",")]
    except ValueError:
        raise ValueError(f"channel_mult must be a comma list of numbers, got {channel_mult!r}")
    return tuple(int(v) if v.is_integer() else v for v in values)


def attention_downsample_rates(attention_resolutions, image_size: int) -> Tuple[int, ...]:
    """"32,16,8" (pixel resolutions) -> downsample rates for an image_size UNet."""
    if isinstance(attention_resolutions, (tuple, list)):
        items = list(attention_resolutions)
    else:
        items = [r for r in str(attention_resolutions).split(",") if r.strip()]
    rates = []
    for r in items:
        try:
            res = int(r)
        except ValueError:
            raise ValueError(f"attention_resolutions must be a comma list of integers, "
                             f"got {attention_resolutions!r}")
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image size "
                             f"{image_size}")
        rates.append(image_size // res)
    return tuple(rates)


def _num_classes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_classes must be a positive integer, got {n!r}")
    return n


def _records_flags(kind: str):
    """Attach the script flags a model was built from as `model.flags`
    (with "kind"), so checkpoints and tools can tell how to rebuild it."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def build(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            model = fn(*args, **kwargs)
            model.flags = {"kind": kind, **bound.arguments}
            return model
        return build
    return wrap


@_records_flags("unet")
def create_model(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                 class_cond=False, use_checkpoint=False, attention_resolutions="16",
                 num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, dropout=0, resblock_updown=False,
                 use_fp16=False, use_new_attention_order=False, null_class=False,
                 num_classes=NUM_CLASSES):
    """guided-diffusion's create_model; null_class (an adm_fast addition, off by
    default so released checkpoints keep their shapes) adds the "no label"
    embedding row classifier-free guidance needs, and num_classes (another;
    guided-diffusion fixes it at 1000) sizes the label embedding of a
    class-conditional model."""
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=_num_classes(num_classes) if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        null_class=null_class,
    )


@_records_flags("classifier")
def create_classifier(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                      classifier_attention_resolutions, classifier_use_scale_shift_norm,
                      classifier_resblock_updown, classifier_pool, classifier_channel_mult="",
                      num_classes=NUM_CLASSES):
    """guided-diffusion's create_classifier; classifier_channel_mult (an
    adm_fast addition; "" keeps guided-diffusion's choice per image size) lets
    small classifiers exist for sizes guided-diffusion has no table for, and
    num_classes (another) is the number of logits."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=_num_classes(num_classes),
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_rates(
            classifier_attention_resolutions, image_size),
        channel_mult=parse_channel_mult(classifier_channel_mult, image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


@_records_flags("sr")
def sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma,
                    class_cond, use_checkpoint, attention_resolutions, num_heads,
                    num_head_channels, num_heads_upsample, use_scale_shift_norm, dropout,
                    resblock_updown, use_fp16, null_class=False, num_classes=NUM_CLASSES):
    if small_size <= 0 or small_size > large_size:
        raise ValueError(f"small_size must be in (0, large_size={large_size}], got {small_size}")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=parse_channel_mult("", large_size, SR_CHANNEL_MULT, "large size"),
        num_classes=_num_classes(num_classes) if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        null_class=null_class,
    )


def create_from_flags(kind: str, flags: dict):
    """Build a model of `kind` ("unet", "classifier", "sr") from script flags;
    flags not given take guided-diffusion's defaults, unknown ones are an error."""
    if kind == "unet":
        fn, defaults = create_model, model_and_diffusion_defaults()
        keys = [k for k in defaults if k not in diffusion_defaults()] + ["learn_sigma"]
    elif kind == "classifier":
        fn, defaults = create_classifier, {**classifier_defaults(), "classifier_channel_mult": ""}
        keys = list(defaults)
    elif kind == "sr":
        fn, defaults = sr_create_model, sr_model_and_diffusion_defaults()
        keys = [k for k in defaults if k not in diffusion_defaults()] + ["learn_sigma"]
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected unet, classifier or sr")
    if kind != "classifier":
        keys.append("null_class")
        defaults["null_class"] = False
    keys.append("num_classes")
    defaults["num_classes"] = NUM_CLASSES
    unknown = set(flags) - set(defaults) - set(diffusion_defaults()) - {"kind"}
    if unknown:
        raise ValueError(f"unknown {kind} flags: {', '.join(sorted(unknown))}")
    merged = {**defaults, **flags}
    return fn(**{k: merged[k] for k in keys})


def _diffusion(steps, learn_sigma, noise_schedule, use_kl, predict_xstart, rescale_timesteps,
               rescale_learned_sigmas, timestep_respacing, **_):
    return create_gaussian_diffusion(
        steps=steps, learn_sigma=learn_sigma, noise_schedule=noise_schedule, use_kl=use_kl,
        predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas, timestep_respacing=timestep_respacing)


def create_model_and_diffusion(image_size, class_cond, learn_sigma, num_channels,
                               num_res_blocks, channel_mult, num_heads, num_head_channels,
                               num_heads_upsample, attention_resolutions, dropout,
                               diffusion_steps, noise_schedule, timestep_respacing, use_kl,
                               predict_xstart, rescale_timesteps, rescale_learned_sigmas,
                               use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16,
                               use_new_attention_order, null_class=False,
                               num_classes=NUM_CLASSES):
    model = create_model(
        image_size, num_channels, num_res_blocks, channel_mult=channel_mult,
        learn_sigma=learn_sigma, class_cond=class_cond, use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, dropout=dropout,
        resblock_updown=resblock_updown, use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order, null_class=null_class,
        num_classes=num_classes)
    return model, _diffusion(diffusion_steps, **locals())


def create_classifier_and_diffusion(image_size, classifier_use_fp16, classifier_width,
                                    classifier_depth, classifier_attention_resolutions,
                                    classifier_use_scale_shift_norm, classifier_resblock_updown,
                                    classifier_pool, learn_sigma, diffusion_steps,
                                    noise_schedule, timestep_respacing, use_kl, predict_xstart,
                                    rescale_timesteps, rescale_learned_sigmas,
                                    classifier_channel_mult="", num_classes=NUM_CLASSES):
    classifier = create_classifier(
        image_size, classifier_use_fp16, classifier_width, classifier_depth,
        classifier_attention_resolutions, classifier_use_scale_shift_norm,
        classifier_resblock_updown, classifier_pool, classifier_channel_mult, num_classes)
    return classifier, _diffusion(diffusion_steps, **locals())


def sr_create_model_and_diffusion(large_size, small_size, class_cond, learn_sigma, num_channels,
                                  num_res_blocks, num_heads, num_head_channels,
                                  num_heads_upsample, attention_resolutions, dropout,
                                  diffusion_steps, noise_schedule, timestep_respacing, use_kl,
                                  predict_xstart, rescale_timesteps, rescale_learned_sigmas,
                                  use_checkpoint, use_scale_shift_norm, resblock_updown,
                                  use_fp16, null_class=False, num_classes=NUM_CLASSES):
    model = sr_create_model(
        large_size, small_size, num_channels, num_res_blocks, learn_sigma=learn_sigma,
        class_cond=class_cond, use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, dropout=dropout,
        resblock_updown=resblock_updown, use_fp16=use_fp16, null_class=null_class,
        num_classes=num_classes)
    return model, _diffusion(diffusion_steps, **locals())


# One line per flag for --help: what it means in guided-diffusion's scripts
# (adm_fast's additions say so).
FLAG_HELP: Dict[str, str] = {
    # model (create_model, sr_create_model)
    "image_size": "side of the square images the model takes, in pixels",
    "num_channels": "base channel width of the UNet (its first level)",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (when num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder (-1: as num_heads)",
    "num_head_channels": "channels per attention head, fixing the head count per width "
                         "(-1: use num_heads)",
    "attention_resolutions": "comma list of pixel resolutions that get self-attention",
    "channel_mult": "comma list of per-level width multipliers (\"\": the released "
                    "models' choice for image_size)",
    "dropout": "dropout rate in the residual blocks",
    "class_cond": "condition on class labels (the file-name prefix before '_')",
    "use_checkpoint": "recompute each block's activations in backward (less memory)",
    "use_scale_shift_norm": "FiLM-style timestep conditioning (scale and shift after the "
                            "GroupNorm)",
    "resblock_updown": "residual blocks for down- and upsampling (BigGAN style)",
    "use_fp16": "guided-diffusion's fp16 recipe: fp16 convolutions, fp32 master weights, "
                "dynamic loss scaling",
    "use_new_attention_order": "split qkv before heads (the 64x64 model's attention order)",
    "null_class": "adm_fast: add a 'no label' embedding row for classifier-free guidance",
    "num_classes": "adm_fast: number of classes (guided-diffusion fixes 1000)",
    "large_size": "super-resolution: output side in pixels",
    "small_size": "super-resolution: side of the low-resolution input",
    # diffusion (create_gaussian_diffusion)
    "learn_sigma": "the model also predicts the variance (6 output channels; L_hybrid)",
    "diffusion_steps": "timesteps T of the forward process",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "use a subset of the timesteps (\"250\", \"ddim50\", ...; \"\": all)",
    "use_kl": "train on the variational bound (KL) instead of the MSE",
    "predict_xstart": "the model predicts x_0 instead of the noise",
    "rescale_timesteps": "feed timesteps scaled to [0, 1000) to the model",
    "rescale_learned_sigmas": "weight the vb term by T/1000 (guided-diffusion's RESCALED_MSE)",
    # classifier (create_classifier)
    "classifier_use_fp16": "the classifier in guided-diffusion's fp16 recipe",
    "classifier_width": "base channel width of the classifier",
    "classifier_depth": "residual blocks per resolution level of the classifier",
    "classifier_attention_resolutions": "comma list of pixel resolutions with attention in "
                                        "the classifier",
    "classifier_use_scale_shift_norm": "FiLM-style timestep conditioning in the classifier",
    "classifier_resblock_updown": "residual blocks for downsampling in the classifier",
    "classifier_pool": "the classifier's head: adaptive, attention, spatial or spatial_v2",
    "classifier_channel_mult": "adm_fast: comma list of the classifier's per-level width "
                               "multipliers (\"\": guided-diffusion's choice for image_size)",
}


def show_default(v) -> str:
    """A default as the command line spells it (strings quoted, so "" shows)."""
    return json.dumps(v) if isinstance(v, str) else str(v)


def add_dict_to_argparser(parser, default_dict: dict, helps=None) -> None:
    """guided-diffusion's helper; with `helps` ({flag: text}), each flag gets
    its line of help and its default."""
    for k, v in default_dict.items():
        v_type = str2bool if isinstance(v, bool) else (str if v is None else type(v))
        kw = {}
        if helps is not None:
            kw = dict(help=f"{helps[k]} (default: {show_default(v)})",
                      metavar="BOOL" if isinstance(v, bool) else v_type.__name__.upper())
        parser.add_argument(f"--{k}", default=v, type=v_type, **kw)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
