"""One training run from a dict of flags: process group, model, data, resume,
loop. Shared by `adm-fast train`, `adm-fast train-classifier` and the Python API."""

from __future__ import annotations

import logging
import os
from typing import Dict

import torch

from .. import ops
from ..diffusion import create_named_schedule_sampler
from ..script_util import (classifier_and_diffusion_defaults,
                           create_classifier_and_diffusion, create_model_and_diffusion,
                           model_and_diffusion_defaults)
from . import state as st
from .cli import TrainError, default_log_dir, precision_of, setup_logging
from .data import load_data
from .distributed import broadcast_object, cleanup, env_world_size, setup
from .tasks import ClassifierTrainLoop, DiffusionTrainLoop

log = logging.getLogger("adm_fast.train")


def _build(kind: str, flags: Dict):
    if kind == "diffusion":
        keys = list(model_and_diffusion_defaults()) + ["null_class"]
        return create_model_and_diffusion(**{k: flags[k] for k in keys})
    keys = list(classifier_and_diffusion_defaults()) + ["classifier_channel_mult"]
    return create_classifier_and_diffusion(**{k: flags[k] for k in keys})


def _resume_path(flags: Dict, log_dir: str) -> str:
    if flags["resume_checkpoint"]:
        path = flags["resume_checkpoint"]
        if not os.path.isfile(path):
            raise TrainError(f"--resume_checkpoint {path} does not exist")
        return path
    return st.find_latest(log_dir) or "" if os.path.isdir(log_dir) else ""


def run(kind: str, flags: Dict) -> int:
    fp16_key = "use_fp16" if kind == "diffusion" else "classifier_use_fp16"
    precision = precision_of(flags, fp16_key)
    if not flags["data_dir"]:
        raise TrainError("--data_dir is required: the image folder to train on")
    # Checked before the rendezvous, so every rank fails fast with the reason.
    world_size, gb = env_world_size(), flags["batch_size"]
    if gb < 1 or gb % world_size:
        raise TrainError(f"--batch_size {gb} (the global batch) is not divisible by the world "
                         f"size {world_size}: use a multiple of {world_size}")
    world = setup(flags["device"] or None)
    try:
        log_dir = broadcast_object(world, flags["log_dir"] or default_log_dir())
        if world.is_main:
            os.makedirs(log_dir, exist_ok=True)
        setup_logging(log_dir if world.is_main else None, world.is_main)
        return _train(kind, flags, world, log_dir, precision, fp16_key)
    finally:
        cleanup(world)


def _train(kind, flags, world, log_dir, precision, fp16_key) -> int:
    gb = flags["batch_size"]
    # The model is built in fp32 and MixedPrecisionTrainer converts it for fp16,
    # keeping fp32 masters of the freshly initialised weights.
    torch.manual_seed(flags["seed"])  # the same initial weights for the same --seed
    model, diffusion = _build(kind, {**flags, fp16_key: False})
    model.flags = {**getattr(model, "flags", {}), fp16_key: flags[fp16_key]}
    if flags["use_checkpoint"]:
        model.set_checkpointing(resblocks=True, attention=bool(flags["checkpoint_attention"]))
    sampler = create_named_schedule_sampler(flags["schedule_sampler"], diffusion)
    resume_path = _resume_path(flags, log_dir)
    resume = st.load_resume(resume_path, _rates(flags)) if resume_path else None
    start = resume["step"] if resume else 0
    if resume:
        log.info("resuming from %s at step %d", resume_path, start)
    workers = None if flags["num_workers"] < 0 else flags["num_workers"]
    class_cond = kind == "classifier" or flags["class_cond"]
    local = gb // world.world_size
    data_kw = dict(batch_size=local, image_size=flags["image_size"], class_cond=class_cond,
                   deterministic=flags["deterministic_data"], allow_upscale=flags["allow_upscale"],
                   random_flip=flags["random_flip"], rank=world.rank,
                   world_size=world.world_size, num_workers=workers, on_error=flags["on_error"],
                   seed=flags["seed"])
    random_crop = True if kind == "classifier" else flags["random_crop"]
    data = load_data(data_dir=flags["data_dir"], random_crop=random_crop, start_batch=start,
                     **data_kw)
    common = dict(
        model=model, diffusion=diffusion, data=data, world=world, log_dir=log_dir,
        batch_size=gb, lr=flags["lr"], weight_decay=flags["weight_decay"],
        microbatch=flags["microbatch"], ema_rate=flags["ema_rate"],
        log_interval=flags["log_interval"], save_interval=flags["save_interval"], resume=resume,
        precision=precision, schedule_sampler=sampler, seed=flags["seed"],
        max_grad_norm=flags["max_grad_norm"] or None, progress=flags["progress"],
        run_info={"kind": kind, **{k: v for k, v in flags.items() if k != "resume_checkpoint"}})
    log.info("%s: %d images in this rank's shard, %d classes; log dir %s", kind,
             data.num_images, len(data.classes or []), log_dir)
    if kind == "diffusion":
        loop = DiffusionTrainLoop(
            fp16_scale_growth=flags["fp16_scale_growth"], lr_anneal_steps=flags["lr_anneal_steps"],
            max_steps=flags["max_steps"], class_dropout_prob=flags["class_dropout_prob"], **common)
    else:
        val = None
        if flags["val_data_dir"]:
            val = load_data(data_dir=flags["val_data_dir"], random_crop=False,
                            classes=data.classes, **{**data_kw, "random_flip": False})
        iterations = flags["max_steps"] or flags["iterations"]
        loop = ClassifierTrainLoop(
            noised=flags["noised"], val_data=val, eval_interval=flags["eval_interval"],
            lr_anneal_steps=iterations if flags["anneal_lr"] else 0, max_steps=iterations,
            initial_lg_loss_scale=16.0, **common)
    with ops.use_backend(flags["backend"]):
        step = loop.run()
    if data.skipped_count:
        log.warning("skipped %d undecodable image(s) on this rank", data.skipped_count)
    return step


def _rates(flags):
    from .loop import parse_ema_rates
    return parse_ema_rates(flags["ema_rate"])

