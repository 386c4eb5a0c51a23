"""One training run from a dict of flags: process group, resume, classes,
model, data, loop. Shared by `adm-fast train`, `adm-fast train-classifier`
and the Python API."""

from __future__ import annotations

import logging
import os

import torch

from .. import ops
from ..diffusion import create_named_schedule_sampler
from ..distributed import barrier, broadcast_object, cleanup, env_world_size, setup
from ..io import remove_stale_temporaries
from ..models.layout import use_preferred_layout
from ..script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
)
from . import state as st
from .config import TrainError, default_log_dir, precision_of, setup_logging
from .data import class_names, list_image_files, load_data
from .loop import parse_ema_rates
from .tasks import ClassifierTrainLoop, DiffusionTrainLoop

log = logging.getLogger("adm_fast.train")


def _build(kind: str, flags: dict):
    if kind == "diffusion":
        keys = list(model_and_diffusion_defaults()) + ["null_class", "num_classes"]
        return create_model_and_diffusion(**{k: flags[k] for k in keys})
    keys = list(classifier_and_diffusion_defaults()) + ["classifier_channel_mult", "num_classes"]
    return create_classifier_and_diffusion(**{k: flags[k] for k in keys})


def build_model(kind: str, flags: dict, device, num_classes: int):
    """(model, diffusion) as a training run builds them from its flags, before
    MixedPrecisionTrainer takes the model: the weights --seed gives, the
    checkpointing flags, and the layout of --backend on device. Shared with the
    benchmarks' measure of what a user's training step keeps for backward."""
    fp16_key = "use_fp16" if kind == "diffusion" else "classifier_use_fp16"
    precision = precision_of(flags, fp16_key)
    # The model is built in fp32 and MixedPrecisionTrainer converts it for fp16,
    # keeping fp32 masters of the freshly initialised weights.
    torch.manual_seed(flags["seed"])  # the same initial weights for the same --seed
    model, diffusion = _build(kind, {**flags, fp16_key: False, "num_classes": num_classes})
    model.flags = {**getattr(model, "flags", {}), fp16_key: flags[fp16_key]}
    if flags["use_checkpoint"]:
        model.set_checkpointing(resblocks=True, attention=bool(flags["checkpoint_attention"]))
    if flags["backend"] != "eager":  # eager stays guided-diffusion's computation, layout too
        # the dtype the convolutions will run in: converted or autocast later
        low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        use_preferred_layout(model, device, training=True, dtype=low)
    return model, diffusion


def _resume(flags: dict, log_dir: str, world) -> dict | None:
    """The verified checkpoint to resume from: --resume_checkpoint as given
    (an error if its weights are damaged; its weights alone, said loudly, if
    only the state beside them is), else the newest intact set in log_dir,
    newer damaged or incomplete ones skipped with a warning. Rank 0 chooses.

    When log_dir holds a finished save (its state file is there) and no set
    is intact, the run stops instead of training from step 0 over weights
    that may be intact: a weights-only resume changes the run (fresh Adam
    moments, loss scale and RNG), so it is the user's choice, made by naming
    the weights with --resume_checkpoint, which the message gives."""
    rates = parse_ema_rates(flags["ema_rate"])
    path = flags["resume_checkpoint"]
    if path:
        if not os.path.isfile(path):
            raise TrainError(f"--resume_checkpoint {path} does not exist")
        try:
            return st.load_resume(path, rates)
        except st.StateError as e:
            resume = st.load_resume(path, rates, weights_only=True)
            resume["weights_only"] = str(e)
            return resume
    found, refusal = None, None
    if world.is_main:
        found, skipped = st.newest_intact(log_dir, rates)
        for why in skipped:
            log.warning("not resuming from the checkpoint at %s", why)
        if found is None:
            refusal = _no_intact_set(log_dir, rates)
    chosen = broadcast_object(world, (found["path"] if found else None, refusal))
    if chosen[1]:
        raise TrainError(chosen[1])
    if chosen[0] is None or found is not None:
        return found
    return st.load_resume(chosen[0], rates, require_state=True)  # the other ranks


def _no_intact_set(log_dir: str, rates) -> str | None:
    """Why training must not start from step 0 in log_dir, or None when it may:
    no save there ever finished (weights without a state file are a save cut
    short, written again)."""
    finished = st.finished_steps(log_dir)
    if not finished:
        return None
    steps = ", ".join(map(str, finished))
    weights = st.newest_weights(log_dir, rates)
    if weights:
        return (f"{log_dir} holds no checkpoint to resume exactly: the training state of "
                f"every finished save (steps {steps}) or its weights are damaged (the "
                f"warnings above say how); the weights in {weights} are intact. To continue "
                f"from them with a fresh optimizer, loss scale and RNG, rerun with "
                f"--resume_checkpoint {weights}; to start over, give another --log_dir. "
                "Nothing was overwritten")
    return (f"{log_dir} holds finished saves (steps {steps}), all damaged (the warnings "
            "above say how): training from step 0 would write over them. Move them away or "
            "give another --log_dir. Nothing was overwritten")


def _labels(kind: str, flags: dict, resume: dict | None):
    """(class names, num_classes) for a class-conditional run, else (None, default).

    Names come from the checkpoint resumed (so labels keep their meaning) or
    the data folder (sorted, as guided-diffusion numbers them); num_classes
    from --num_classes, else the checkpoint resumed, else the names found."""
    if not (kind == "classifier" or flags["class_cond"]):
        return None, flags["num_classes"] or 1000
    names = None
    if resume is not None:
        names = (resume["state"] or {}).get("classes")
        if names is None and "adm_fast.classes" in resume["meta"]:
            from ..checkpoint import read_class_names
            names = read_class_names(resume["path"])
    if names is None:
        names = class_names(list_image_files(flags["data_dir"]))
    n = flags["num_classes"]
    if n < 0:
        raise TrainError(f"--num_classes must be >= 0 (0: as many as the data has), got {n}")
    if n == 0:
        n = _labels_in(resume, kind, flags) or len(names)
    if n < len(names):
        raise TrainError(f"--num_classes {n} is fewer than the {len(names)} classes of "
                         f"{flags['data_dir']} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return list(names), n


def _labels_in(resume: dict | None, kind: str, flags: dict) -> int | None:
    """The number of labels the checkpoint resumed has (a guided-diffusion
    release has 1000), so that resuming keeps the model's shape."""
    if resume is None:
        return None
    w = resume["weights"]
    if kind == "classifier":
        heads = [v for k, v in w.items() if k.startswith("out.") and v.dim() >= 1]
        return int(heads[-1].shape[0]) if heads else None
    if "label_emb.weight" in w:
        return int(w["label_emb.weight"].shape[0]) - int(bool(flags["null_class"]))
    return None


def run(kind: str, flags: dict) -> int:
    fp16_key = "use_fp16" if kind == "diffusion" else "classifier_use_fp16"
    precision = precision_of(flags, fp16_key)
    if not flags["data_dir"]:
        raise TrainError("--data_dir is required: the image folder to train on")
    # Checked before the rendezvous, so every rank fails fast with the reason.
    world_size, gb = env_world_size(), flags["batch_size"]
    if isinstance(gb, bool) or not isinstance(gb, int) or gb < 1:
        raise TrainError(f"--batch_size must be an integer >= 1 (the global batch, split "
                         f"over the ranks), got {gb!r}")
    if flags["max_image_pixels"] < 0:
        raise TrainError(f"--max_image_pixels must be >= 0 (0: no limit but PIL's), got "
                         f"{flags['max_image_pixels']}")
    if gb % world_size:
        raise TrainError(f"--batch_size {gb} (the global batch) is not divisible by the world "
                         f"size {world_size}: use a multiple of {world_size}")
    world = setup(flags["device"] or None)
    try:
        log_dir = broadcast_object(world, flags["log_dir"] or default_log_dir())
        if world.is_main:
            os.makedirs(log_dir, exist_ok=True)
        setup_logging(log_dir if world.is_main else None, world.is_main)
        if world.is_main:
            removed = remove_stale_temporaries(log_dir)
            if removed:
                log.info("removed %d temporary file(s) of an interrupted run: %s",
                         len(removed), ", ".join(removed))
        barrier(world)
        return _train(kind, flags, world, log_dir, precision, fp16_key)
    finally:
        cleanup(world)


def _train(kind, flags, world, log_dir, precision, fp16_key) -> int:
    gb = flags["batch_size"]
    resume = _resume(flags, log_dir, world)
    start = resume["step"] if resume else 0
    if resume:
        log.info("resuming from %s at step %d", resume["path"], start)
    classes, num_classes = _labels(kind, flags, resume)
    model, diffusion = build_model(kind, flags, world.device, num_classes)
    sampler = create_named_schedule_sampler(flags["schedule_sampler"], diffusion)
    workers = None if flags["num_workers"] < 0 else flags["num_workers"]
    local = gb // world.world_size
    data_kw = dict(batch_size=local, image_size=flags["image_size"],
                   class_cond=classes is not None, deterministic=flags["deterministic_data"],
                   allow_upscale=flags["allow_upscale"], random_flip=flags["random_flip"],
                   rank=world.rank, world_size=world.world_size, num_workers=workers,
                   on_error=flags["on_error"], seed=flags["seed"], classes=classes,
                   max_pixels=flags["max_image_pixels"])
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
        run_info={"kind": kind, **{k: v for k, v in flags.items() if k != "resume_checkpoint"}},
        diffusion_flags={k: flags[k] for k in diffusion_defaults()}, classes=classes)
    log.info("%s: %d images, %s; log dir %s", kind, data.num_images,
             f"{len(classes)} classes ({num_classes} labels)" if classes else "unconditional",
             log_dir)
    if kind == "diffusion":
        loop = DiffusionTrainLoop(
            fp16_scale_growth=flags["fp16_scale_growth"], lr_anneal_steps=flags["lr_anneal_steps"],
            max_steps=flags["max_steps"], class_dropout_prob=flags["class_dropout_prob"], **common)
    else:
        val = None
        if flags["val_data_dir"]:
            val = load_data(data_dir=flags["val_data_dir"], random_crop=False,
                            **{**data_kw, "random_flip": False})
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
