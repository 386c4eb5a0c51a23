"""`adm-fast train` and `adm-fast train-classifier`: guided-diffusion's
image_train.py and classifier_train.py flags (same names and defaults), plus
--preset, --bf16, --max_steps, --log_dir and the rest listed in EXTRA.

`--batch_size` is the GLOBAL batch: under torchrun each of N ranks takes
batch_size / N (stated in the log), so the same flags train the same model
on any number of processes. The Python entry points are `train(**flags)` and
`train_classifier(**flags)`.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from typing import Dict, Optional

from .. import presets
from ..checkpoint import CheckpointError
from ..script_util import (add_dict_to_argparser, classifier_and_diffusion_defaults,
                           model_and_diffusion_defaults, str2bool)

DIFFUSION_DEFAULTS = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
    batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
    resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3)
CLASSIFIER_DEFAULTS = dict(
    data_dir="", val_data_dir="", noised=True, iterations=150000, lr=3e-4, weight_decay=0.0,
    anneal_lr=False, batch_size=4, microbatch=-1, schedule_sampler="uniform",
    resume_checkpoint="", log_interval=10, eval_interval=5, save_interval=10000)
# adm_fast's additions, for both commands.
EXTRA = dict(
    preset="", bf16=False, max_steps=0, log_dir="", seed=0, device="", num_workers=-1,
    on_error="stop", backend="auto", checkpoint_attention=True, max_grad_norm=0.0,
    progress=True, random_flip=True, random_crop=False, allow_upscale=False,
    deterministic_data=False)
EXTRA_DIFFUSION = dict(null_class=False, class_dropout_prob=0.0)
EXTRA_CLASSIFIER = dict(ema_rate="", use_checkpoint=False, classifier_channel_mult="")

log = logging.getLogger("adm_fast.train")


class TrainError(ValueError):
    """A flag, file or folder the training run cannot use."""


def defaults(kind: str) -> Dict:
    if kind == "diffusion":
        return {**DIFFUSION_DEFAULTS, **model_and_diffusion_defaults(), **EXTRA,
                **EXTRA_DIFFUSION}
    return {**CLASSIFIER_DEFAULTS, **classifier_and_diffusion_defaults(), **EXTRA,
            **EXTRA_CLASSIFIER}


def parser(kind: str) -> argparse.ArgumentParser:
    prog = "adm-fast train" if kind == "diffusion" else "adm-fast train-classifier"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(p, defaults(kind))
    return p


def parse(kind: str, argv) -> Dict:
    """Flags as a dict; with --preset, the preset's flags fill in what the
    command line does not set explicitly."""
    p = parser(kind)
    args = vars(p.parse_args(argv))
    explicit = {k for k in args if any(a == f"--{k}" or a.startswith(f"--{k}=")
                                       for a in (argv or []))}
    return apply_preset(kind, args, explicit)


def apply_preset(kind: str, flags: Dict, explicit) -> Dict:
    name = flags.get("preset")
    if not name:
        return flags
    try:
        preset = presets.get(name)
    except KeyError as e:
        raise TrainError(str(e.args[0])) from None
    want = "unet" if kind == "diffusion" else "classifier"
    if preset.kind != want:
        raise TrainError(f"--preset {name} is a {preset.kind} preset; "
                         f"{'adm-fast train' if kind == 'diffusion' else 'adm-fast train-classifier'}"
                         f" trains {want} presets")
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


def _cuda_device(flags: Dict) -> bool:
    import torch
    return (flags.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")) \
        .startswith("cuda")


def precision_of(flags: Dict, fp16_key: str) -> str:
    if flags["bf16"] and flags[fp16_key]:
        raise TrainError(f"--bf16 and --{fp16_key} exclude each other: choose one precision")
    return "bf16" if flags["bf16"] else ("fp16" if flags[fp16_key] else "fp32")


def default_log_dir() -> str:
    return os.environ.get("OPENAI_LOGDIR") or os.path.join(
        "runs", datetime.datetime.now().strftime("train-%Y%m%d-%H%M%S"))


def setup_logging(log_dir: Optional[str], is_main: bool) -> None:
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


def _run(kind: str, argv) -> int:
    from ..train.data import DataError
    prog = "adm-fast train" if kind == "diffusion" else "adm-fast train-classifier"
    try:
        flags = parse(kind, argv)
        from .run import run
        run(kind, flags)
    except (TrainError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    return _run("diffusion", list(sys.argv[1:] if argv is None else argv))


def main_classifier(argv=None) -> int:
    return _run("classifier", list(sys.argv[1:] if argv is None else argv))


def _flags_from_kwargs(kind: str, kwargs: Dict) -> Dict:
    known = defaults(kind)
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TrainError(f"unknown flags: {', '.join(sorted(unknown))}")
    merged = {**known, **kwargs}
    return apply_preset(kind, merged, set(kwargs))


def train(**flags) -> int:
    """Train a diffusion model; flags as `adm-fast train` takes them. Returns the last step."""
    from .run import run
    return run("diffusion", _flags_from_kwargs("diffusion", flags))


def train_classifier(**flags) -> int:
    """Train a noisy classifier; flags as `adm-fast train-classifier`. Returns the last step."""
    from .run import run
    return run("classifier", _flags_from_kwargs("classifier", flags))


__all__ = ["main", "main_classifier", "train", "train_classifier", "TrainError", "str2bool"]
