"""The flags of `adm-fast train` / `train-classifier`: their defaults, help
and parsing, presets, and the run's logging set-up.

Defaults are guided-diffusion's image_train.py and classifier_train.py (same
names and values) plus adm_fast's additions (ADDED, and per command
ADDED_DIFFUSION / ADDED_CLASSIFIER).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

from ..defaults import (
    FLAG_HELP,
    add_dict_to_argparser,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    diffusion_defaults,
    model_and_diffusion_defaults,
)

DIFFUSION_DEFAULTS = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
    batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
    resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3)
CLASSIFIER_DEFAULTS = dict(
    data_dir="", val_data_dir="", noised=True, iterations=150000, lr=3e-4, weight_decay=0.0,
    anneal_lr=False, batch_size=4, microbatch=-1, schedule_sampler="uniform",
    resume_checkpoint="", log_interval=10, eval_interval=5, save_interval=10000)
ADDED = dict(
    preset="", bf16=False, max_steps=0, log_dir="", seed=0, device="", num_workers=-1,
    on_error="stop", backend="auto", checkpoint_attention=True, max_grad_norm=0.0,
    progress=True, random_flip=True, random_crop=False, allow_upscale=False,
    deterministic_data=False, num_classes=0,
    max_image_pixels=8192 * 8192)  # image_files.MAX_PIXELS (not imported: --help loads no PIL)
ADDED_DIFFUSION = dict(null_class=False, class_dropout_prob=0.0)
ADDED_CLASSIFIER = dict(ema_rate="", use_checkpoint=False, classifier_channel_mult="")

TRAIN_HELP = {
    "data_dir": "image folder to train on (recursive; class = file-name prefix before '_')",
    "val_data_dir": "image folder for validation (its classes must be among the training "
                    "classes; \"\": none)",
    "schedule_sampler": "how timesteps are drawn: uniform or loss-second-moment",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "anneal lr linearly to 0 over this many steps and stop there (0: off)",
    "anneal_lr": "anneal lr linearly to 0 over --iterations",
    "iterations": "training steps (--max_steps overrides)",
    "noised": "train on noised images q(x_t|x_0) (the guidance classifier); False: clean",
    "batch_size": "GLOBAL batch: each of N ranks takes batch_size / N",
    "microbatch": "split each rank's batch into microbatches of this size (-1: off); "
                  "the update is the same",
    "ema_rate": "comma list of EMA rates, one EMA file each (\"\": none)",
    "log_interval": "steps per log line and progress.jsonl / progress.csv row",
    "eval_interval": "steps between validation batches",
    "save_interval": "steps between checkpoints (one is also written at the end)",
    "resume_checkpoint": "model<step>.safetensors or .pt to resume from (\"\": the newest "
                         "intact checkpoint in --log_dir, if any)",
    "fp16_scale_growth": "growth of lg(loss scale) per good fp16 step",
    "preset": "take the model and diffusion flags of a released checkpoint (flags given "
              "still win)",
    "bf16": "train under bf16 autocast with fp32 weights (no loss scaling)",
    "max_steps": "stop after this many steps (0: --lr_anneal_steps, else forever)",
    "log_dir": "where logs and checkpoints go and resume comes from (\"\": $OPENAI_LOGDIR, "
               "else runs/train-<time>)",
    "seed": "seed of the initial weights, data order, augmentation, timesteps and noise",
    "device": "cpu, cuda or cuda:N (\"\": cuda when available)",
    "num_workers": "image-decoding worker processes (-1: up to 4, by the CPU count)",
    "on_error": "an undecodable image: stop with its name, or skip it (counted)",
    "backend": "adm_fast op backend: auto, or one that `adm-fast info` lists",
    "checkpoint_attention": "with --use_checkpoint, recompute the attention blocks too",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "progress": "a tqdm progress bar on stderr (the log lines print above it)",
    "random_flip": "flip images left-right at random",
    "random_crop": "random crops instead of centre crops (the classifier always crops at "
                   "random)",
    "allow_upscale": "resize images smaller than --image_size up instead of refusing them",
    "max_image_pixels": "refuse (or with --on_error skip, skip) an image of more pixels than "
                        "this, from its header before decoding (0: no limit but PIL's)",
    "deterministic_data": "read the images in folder order instead of shuffled",
    "num_classes": "class labels the model has (0: the number of classes in --data_dir; "
                   "stored in the checkpoint with the class names)",
    "class_dropout_prob": "share of labels replaced by the null label (classifier-free "
                          "guidance; needs --null_class True)",
}

log = logging.getLogger("adm_fast.train")


class TrainError(ValueError):
    """A flag, file or folder the training run cannot use."""


def prog(kind: str) -> str:
    return "adm-fast train" if kind == "diffusion" else "adm-fast train-classifier"


def _tables(kind: str):
    """(group title, {flag: default}) in --help order; each flag once, in its first group."""
    if kind == "diffusion":
        model = {k: v for k, v in model_and_diffusion_defaults().items()
                 if k not in diffusion_defaults()}
        groups = [("model (guided-diffusion's create_model flags)", model),
                  ("diffusion (guided-diffusion's diffusion flags)", diffusion_defaults()),
                  ("training (guided-diffusion's image_train.py)", DIFFUSION_DEFAULTS),
                  ("adm_fast's additions", {**ADDED, **ADDED_DIFFUSION})]
    else:
        groups = [("classifier model (guided-diffusion's create_classifier flags)",
                   classifier_defaults()),
                  ("diffusion (guided-diffusion's diffusion flags; the noise the classifier "
                   "learns under)", diffusion_defaults()),
                  ("training (guided-diffusion's classifier_train.py)", CLASSIFIER_DEFAULTS),
                  ("adm_fast's additions", {**ADDED, **ADDED_CLASSIFIER})]
    seen, out = set(), []
    for title, table in groups:
        out.append((title, {k: v for k, v in table.items() if k not in seen}))
        seen |= set(table)
    return out


def defaults(kind: str) -> dict:
    if kind == "diffusion":
        return {**DIFFUSION_DEFAULTS, **model_and_diffusion_defaults(), **ADDED,
                **ADDED_DIFFUSION}
    return {**CLASSIFIER_DEFAULTS, **classifier_and_diffusion_defaults(), **ADDED,
            **ADDED_CLASSIFIER}


def parser(kind: str) -> argparse.ArgumentParser:
    what = "a diffusion model" if kind == "diffusion" else "a noisy classifier"
    p = argparse.ArgumentParser(
        prog=prog(kind), allow_abbrev=False,
        description=f"Train {what} on an image folder with guided-diffusion's flags. "
        "--batch_size is the global batch: under torchrun each of N ranks takes "
        "batch_size / N, so the same flags train the same model on any number of processes.")
    helps = {**FLAG_HELP, **TRAIN_HELP}
    for title, table in _tables(kind):
        add_dict_to_argparser(p.add_argument_group(title), table, helps)
    return p


def diffusion_parser() -> argparse.ArgumentParser:
    return parser("diffusion")


def classifier_parser() -> argparse.ArgumentParser:
    return parser("classifier")


def parse(kind: str, argv) -> dict:
    """Flags as a dict; with --preset, the preset's flags fill in what the
    command line does not set explicitly."""
    p = parser(kind)
    args = vars(p.parse_args(argv))
    explicit = {k for k in args if any(a == f"--{k}" or a.startswith(f"--{k}=")
                                       for a in (argv or []))}
    return apply_preset(kind, args, explicit)


def apply_preset(kind: str, flags: dict, explicit) -> dict:
    name = flags.get("preset")
    if not name:
        return flags
    from .. import presets

    try:
        preset = presets.get(name)
    except KeyError as e:
        raise TrainError(str(e.args[0])) from None
    want = "unet" if kind == "diffusion" else "classifier"
    if preset.kind != want:
        raise TrainError(f"--preset {name} is a {preset.kind} preset; {prog(kind)} trains "
                         f"{want} presets")
    out = dict(flags)
    for k, v in preset.flags.items():
        if k in out and k not in explicit:
            out[k] = v
    # guided-diffusion's released models trained in fp16 on GPUs; on a CPU that
    # is slow and pointless, so the preset's use_fp16 is a GPU default only.
    for key in ("use_fp16", "classifier_use_fp16"):
        if key in preset.flags and key not in explicit and not _cuda_device(out):
            out[key] = False
    return out


def _cuda_device(flags: dict) -> bool:
    import torch
    return (flags.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")) \
        .startswith("cuda")


def flags_from_kwargs(kind: str, kwargs: dict) -> dict:
    known = defaults(kind)
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TrainError(f"unknown flags: {', '.join(sorted(unknown))}")
    return apply_preset(kind, {**known, **kwargs}, set(kwargs))


def precision_of(flags: dict, fp16_key: str) -> str:
    if flags["bf16"] and flags[fp16_key]:
        raise TrainError(f"--bf16 and --{fp16_key} exclude each other: choose one precision")
    return "bf16" if flags["bf16"] else ("fp16" if flags[fp16_key] else "fp32")


def default_log_dir() -> str:
    return os.environ.get("OPENAI_LOGDIR") or os.path.join(
        "runs", datetime.datetime.now().strftime("train-%Y%m%d-%H%M%S"))


def setup_logging(log_dir: str | None, is_main: bool) -> None:
    logger = logging.getLogger("adm_fast")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in list(logger.handlers):
        if getattr(h, "_adm_fast_train", False):
            logger.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if is_main and log_dir:
        handlers.append(logging.FileHandler(os.path.join(log_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        h._adm_fast_train = True
        logger.addHandler(h)
    logger.propagate = False
