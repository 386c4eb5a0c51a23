"""guided-diffusion's script-flag layer: the same function names, arguments,
defaults and meanings, so existing command lines and configs carry over.

Script flags differ from constructor arguments in two ways that matter:
`attention_resolutions` is a comma list of pixel resolutions ("32,16,8"),
turned into downsample rates here, and `channel_mult=""` picks the released
models' per-resolution multipliers.
"""

from __future__ import annotations

import functools
import inspect

from .defaults import (  # noqa: F401
    AUTO_CHANNEL_MULT,
    FLAG_HELP,
    MODEL_ADDITIONS,
    NUM_CLASSES,
    SR_CHANNEL_MULT,
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    diffusion_defaults,
    model_and_diffusion_defaults,
    show_default,
    size_problems,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from .diffusion import create_gaussian_diffusion
from .models import EncoderUNetModel, SuperResModel, UNetModel


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
        raise ValueError(f"channel_mult must be a comma list of numbers, got {channel_mult!r}") from None
    return tuple(int(v) if v.is_integer() else v for v in values)


def attention_downsample_rates(attention_resolutions, image_size: int) -> tuple[int, ...]:
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
                             f"got {attention_resolutions!r}") from None
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image size "
                             f"{image_size}")
        rates.append(image_size // res)
    return tuple(rates)


def _num_classes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_classes must be a positive integer, got {n!r}")
    _check_sizes(num_classes=n)
    return n


def _check_sizes(base_channels: str = "num_channels", **flags) -> None:
    """ValueError naming each flag past adm_fast's size limits (defaults.SIZE_LIMITS),
    raised before anything is built or allocated."""
    problems = size_problems(flags, base_channels)
    if problems:
        raise ValueError("; ".join(problems))


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
    flags = dict(locals())
    _check_sizes(image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
                 num_heads=num_heads, num_head_channels=num_head_channels,
                 num_heads_upsample=num_heads_upsample)
    mult = parse_channel_mult(channel_mult, image_size)
    rates = attention_downsample_rates(attention_resolutions, image_size)
    _check_sizes(num_channels=num_channels, channel_mult=mult, attention_resolutions=rates)
    return _unet(UNetModel, flags, image_size, mult, rates)


@_records_flags("classifier")
def create_classifier(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                      classifier_attention_resolutions, classifier_use_scale_shift_norm,
                      classifier_resblock_updown, classifier_pool, classifier_channel_mult="",
                      num_classes=NUM_CLASSES):
    """guided-diffusion's create_classifier; classifier_channel_mult (an
    adm_fast addition; "" keeps guided-diffusion's choice per image size) lets
    small classifiers exist for sizes guided-diffusion has no table for, and
    num_classes (another) is the number of logits."""
    _check_sizes(image_size=image_size, classifier_width=classifier_width,
                 classifier_depth=classifier_depth)
    mult = parse_channel_mult(classifier_channel_mult, image_size)
    rates = attention_downsample_rates(classifier_attention_resolutions, image_size)
    _check_sizes("classifier_width", classifier_width=classifier_width, channel_mult=mult,
                 attention_resolutions=rates)
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=_num_classes(num_classes),
        num_res_blocks=classifier_depth,
        attention_resolutions=rates,
        channel_mult=mult,
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
    flags = dict(locals())
    _check_sizes(large_size=large_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
                 num_heads=num_heads, num_head_channels=num_head_channels,
                 num_heads_upsample=num_heads_upsample)
    if small_size <= 0 or small_size > large_size:
        raise ValueError(f"small_size must be in (0, large_size={large_size}], got {small_size}")
    rates = attention_downsample_rates(attention_resolutions, large_size)
    _check_sizes(attention_resolutions=rates)
    return _unet(SuperResModel, flags, large_size,
                 parse_channel_mult("", large_size, SR_CHANNEL_MULT, "large size"), rates)


# The script flags UNetModel (and SuperResModel) take under their own name.
_UNET_AS_IS = ("num_res_blocks", "dropout", "use_checkpoint", "use_fp16", "num_heads",
               "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
               "resblock_updown", "use_new_attention_order", "null_class")


def _unet(cls, flags: dict, image_size: int, channel_mult, rates):
    """A UNetModel or SuperResModel from its checked script flags, with its
    channel multipliers and attention downsample rates parsed."""
    return cls(image_size=image_size, in_channels=3, model_channels=flags["num_channels"],
               out_channels=6 if flags["learn_sigma"] else 3, attention_resolutions=rates,
               channel_mult=channel_mult,
               num_classes=_num_classes(flags["num_classes"]) if flags["class_cond"] else None,
               **{k: flags[k] for k in _UNET_AS_IS if k in flags})


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


def _flags_of(fn, flags: dict) -> dict:
    """The flags among `flags` that `fn` takes."""
    return {k: flags[k] for k in inspect.signature(fn).parameters if k in flags}


def _diffusion(diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
               rescale_timesteps, rescale_learned_sigmas, timestep_respacing, **_):
    return create_gaussian_diffusion(
        steps=diffusion_steps, learn_sigma=learn_sigma, noise_schedule=noise_schedule,
        use_kl=use_kl, predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas, timestep_respacing=timestep_respacing)


def create_model_and_diffusion(image_size, class_cond, learn_sigma, num_channels,
                               num_res_blocks, channel_mult, num_heads, num_head_channels,
                               num_heads_upsample, attention_resolutions, dropout,
                               diffusion_steps, noise_schedule, timestep_respacing, use_kl,
                               predict_xstart, rescale_timesteps, rescale_learned_sigmas,
                               use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16,
                               use_new_attention_order, null_class=False,
                               num_classes=NUM_CLASSES):
    flags = dict(locals())
    _check_sizes(diffusion_steps=diffusion_steps)  # before the model's memory
    return create_model(**_flags_of(create_model, flags)), _diffusion(**flags)


def create_classifier_and_diffusion(image_size, classifier_use_fp16, classifier_width,
                                    classifier_depth, classifier_attention_resolutions,
                                    classifier_use_scale_shift_norm, classifier_resblock_updown,
                                    classifier_pool, learn_sigma, diffusion_steps,
                                    noise_schedule, timestep_respacing, use_kl, predict_xstart,
                                    rescale_timesteps, rescale_learned_sigmas,
                                    classifier_channel_mult="", num_classes=NUM_CLASSES):
    flags = dict(locals())
    _check_sizes(diffusion_steps=diffusion_steps)  # before the model's memory
    return create_classifier(**_flags_of(create_classifier, flags)), _diffusion(**flags)


def sr_create_model_and_diffusion(large_size, small_size, class_cond, learn_sigma, num_channels,
                                  num_res_blocks, num_heads, num_head_channels,
                                  num_heads_upsample, attention_resolutions, dropout,
                                  diffusion_steps, noise_schedule, timestep_respacing, use_kl,
                                  predict_xstart, rescale_timesteps, rescale_learned_sigmas,
                                  use_checkpoint, use_scale_shift_norm, resblock_updown,
                                  use_fp16, null_class=False, num_classes=NUM_CLASSES):
    flags = dict(locals())
    _check_sizes(diffusion_steps=diffusion_steps)  # before the model's memory
    return sr_create_model(**_flags_of(sr_create_model, flags)), _diffusion(**flags)
