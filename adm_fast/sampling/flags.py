"""The flags of `adm-fast sample`: guided-diffusion's script flags and
defaults (image_sample.py, classifier_sample.py, super_res_sample.py) plus
adm_fast's, with no torch import, so that `adm-fast sample --help` answers at
once."""

from __future__ import annotations

import argparse

from .. import presets as _presets
from ..defaults import (MODEL_ADDITIONS, classifier_defaults, model_and_diffusion_defaults,
                        sr_model_and_diffusion_defaults, str2bool)
from .classes import parse_classes

PROG = "adm-fast sample"
BACKENDS = ("auto", "eager", "cpu", "triton", "cuda", "sdpa")
SAMPLERS = ("ddpm", "ddim", "dpm++")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# Each batch is sampled whole (x_T and every activation at once): a batch past
# this is a typo or a memory bomb (guided-diffusion's largest runs used 256).
MAX_BATCH_SIZE = 65536
SCRIPT_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False,
                       model_path="", classifier_path="", classifier_scale=1.0, base_samples="")


def _gd_defaults():
    d = dict(SCRIPT_DEFAULTS)
    for table in (model_and_diffusion_defaults(), classifier_defaults(),
                  sr_model_and_diffusion_defaults()):
        d.update(table)
    # adm_fast's additions (null_class, ...) have no guided-diffusion default
    d.update({k: v for k, v in MODEL_ADDITIONS.items() if k not in d})
    return d


DEFAULTS = _gd_defaults()


class InputError(ValueError):
    """Bad flags or files: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(message)


def _arg_type(parse, what: str):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = what  # argparse names the type in its messages
    return convert


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=(
        "adm-fast sample: guided-diffusion's image_sample.py, classifier_sample.py and "
        "super_res_sample.py in one command, with their flags, defaults and output."))
    # guided-diffusion's flags default to SUPPRESS so that the ones given can be
    # told apart: they override the checkpoint's and the preset's.
    g = p.add_argument_group("guided-diffusion's flags (and adm_fast's model additions)")
    for k, v in DEFAULTS.items():
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
    a.add_argument("--classes", type=_arg_type(parse_classes, "classes"), metavar="LIST",
                   help="draw the labels uniformly from these classes: 0,3,7 or 0-9 or "
                   "0-4,7 (default: all of the model's or the classifier's)")
    a.add_argument("--seed", type=_arg_type(_seed, "seed"), default=0,
                   help="batch b is sampled from a seed derived from (seed, b), so a "
                   "resumed run or any number of ranks give the same images (default 0)")
    a.add_argument("--out", default=".", help="folder for samples_NxHxWx3.npz and .png, and "
                   "the finished batches of an unfinished run (default .)")
    a.add_argument("--overwrite", action="store_true",
                   help="sample again and replace a finished samples_NxHxWx3.npz (and .png) "
                   "in --out; without it, the same command says the run is done and another "
                   "one that would write that file is refused")
    a.add_argument("--backend", choices=BACKENDS, help="adm_fast op backend "
                   "(default: $ADM_FAST_BACKEND, else auto)")
    a.add_argument("--device", help="default: cuda if available, else cpu")
    a.add_argument("--dtype", choices=DTYPE_NAMES, help="default: fp16 on a GPU for a model "
                   "trained with use_fp16, else fp32")
    a.add_argument("--cuda_graph", action="store_true",
                   help="replay each whole guided step (model, classifier forward and "
                   "backward, update) as one CUDA graph: for launch-bound models (64x64); "
                   "ddpm and ddim, CUDA only")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm bars over samples and steps on stderr (default on)")
    return p
