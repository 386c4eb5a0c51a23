"""guided-diffusion's script flags as data: the default tables, one help line
per flag, and the argparse helpers, with no torch import, so that every
command's --help answers at once. adm_fast.script_util (which builds models)
re-exports them.
"""

from __future__ import annotations

import argparse
import json

NUM_CLASSES = 1000

# channel_mult="" means this, per image size (guided-diffusion's choice).
AUTO_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
SR_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
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


# The sizes a flag or a checkpoint's metadata may ask for: (lowest, highest,
# the largest any released guided-diffusion model uses). The highest is far
# above every real config, so that only a typo or an edited file meets it, as
# one line naming the limit, before anything is built: a file saying
# num_res_blocks 3000 spent a long time and much memory building its model
# before its layout error (docs/performance.md), and diffusion_steps 1e12
# asked numpy for 7 TiB. Script flags and constructor arguments
# (adm_fast.config) share the table where they share a name and meaning.
SIZE_LIMITS: dict[str, tuple[int, int, int]] = {
    "image_size": (1, 4096, 512),
    "large_size": (1, 4096, 512),
    "small_size": (1, 4096, 128),
    "num_channels": (1, 4096, 256),
    "model_channels": (1, 4096, 256),
    "classifier_width": (1, 4096, 128),
    "num_res_blocks": (0, 32, 4),  # a classifier's depth among them
    "classifier_depth": (0, 32, 4),
    "num_heads": (1, 1024, 4),
    "num_heads_upsample": (1, 1024, 4),  # -1: as num_heads
    "num_head_channels": (1, 16384, 64),  # -1: from num_heads
    "num_classes": (1, 100_000, 1000),
    "out_channels": (1, 100_000, 1000),  # a classifier's logits
    "in_channels": (1, 64, 3),
    "diffusion_steps": (1, 100_000, 1000),
}
_MINUS_ONE_OK = ("num_heads_upsample", "num_head_channels")
# channel_mult: at most this many levels, each at most this many channels
# (multiplier times the base width; the released models reach 4 x 256).
MAX_LEVELS, MAX_LEVEL_CHANNELS = 16, 16384
# attention_resolutions: at most this many entries.
MAX_ATTENTION_ENTRIES = 64


def size_problem(name: str, value) -> str:
    """'' when `value` is within SIZE_LIMITS[name] (or is no integer: the
    types are checked elsewhere), else what is wrong, with the limit."""
    if name not in SIZE_LIMITS or isinstance(value, bool) or not isinstance(value, int):
        return ""
    low, high, released = SIZE_LIMITS[name]
    if value == -1 and name in _MINUS_ONE_OK:
        return ""
    if value < low:
        return f"{name} {value} is below {low}" + (" (or -1)" if name in _MINUS_ONE_OK else "")
    if value > high:
        return (f"{name} {value} is above adm_fast's limit of {high} (the released models "
                f"use at most {released})")
    return ""


def size_problems(values, base_channels: str = "model_channels") -> list:
    """What is out of bounds among `values` (script flags or a model's
    constructor arguments), one string each; channel_mult is checked when it
    is a sequence (parsed), against the base width named base_channels."""
    problems = [p for p in (size_problem(k, v) for k, v in values.items()) if p]
    mult, base = values.get("channel_mult"), values.get(base_channels)
    if isinstance(mult, (list, tuple)):
        if len(mult) > MAX_LEVELS:
            problems.append(f"channel_mult has {len(mult)} levels, above adm_fast's limit of "
                            f"{MAX_LEVELS} (the released models use at most 7)")
        elif isinstance(base, int) and not size_problem(base_channels, base):
            for m in mult:
                if isinstance(m, (int, float)) and not isinstance(m, bool) and \
                        not 1 <= m * base <= MAX_LEVEL_CHANNELS:
                    problems.append(f"channel_mult {m} gives {base_channels} {base} x {m} "
                                    f"channels at a level, outside adm_fast's limits of 1 to "
                                    f"{MAX_LEVEL_CHANNELS}")
                    break
    attention = values.get("attention_resolutions")
    if isinstance(attention, (list, tuple)) and len(attention) > MAX_ATTENTION_ENTRIES:
        problems.append(f"attention_resolutions has {len(attention)} entries, above adm_fast's "
                        f"limit of {MAX_ATTENTION_ENTRIES}")
    return problems


# adm_fast's additions to the model constructors (create_model, sr_create_model,
# create_classifier), with their defaults; tests/test_presets.py checks them
# against the constructors' signatures.
MODEL_ADDITIONS = dict(null_class=False, num_classes=NUM_CLASSES, classifier_channel_mult="")


# One line per flag for --help: what it means in guided-diffusion's scripts
# (adm_fast's additions say so).
FLAG_HELP: dict[str, str] = {
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
