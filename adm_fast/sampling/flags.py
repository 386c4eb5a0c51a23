"""The flags of `adm-fast sample`: guided-diffusion's script flags and
defaults (image_sample.py, classifier_sample.py, super_res_sample.py) plus
adm_fast's, with no torch import, so that `adm-fast sample --help` answers at
once. Also the rules on the sampling options (check_options), which the
command and sample_images both check through the one function, with the one
message per rule."""

from __future__ import annotations

import argparse
import math
import numbers

from .. import presets as _presets
from ..defaults import (
    MODEL_ADDITIONS,
    classifier_defaults,
    model_and_diffusion_defaults,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from .classes import parse_classes

PROG = "adm-fast sample"
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
    """Bad flags or files: reported in one line, exit code 2 (from Python, a
    ValueError)."""


# --- the rules on the sampling options, for the command line and sample_images alike ---

# sample_images's keywords whose flag has another name
_FLAG_NAMES = {"classifier": "classifier_path"}


def _namer(flags: bool):
    """How the messages name an option: as its flag (--eta) or its keyword (eta)."""
    return (lambda key: "--" + _FLAG_NAMES.get(key, key)) if flags else (lambda key: key)


def _whole(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        what = "a non-negative integer" if low == 0 else f"an integer of at least {low}"
        raise InputError(f"{name} must be {what}, got {value!r}")


def check_options(*, num_samples, batch_size, sampler: str, eta, steps, cuda_graph: bool,
                  cfg_scale, classifier_scale, scale_without_classifier: bool, seed=None,
                  flags: bool = False, device_type: str | None = None) -> None:
    """Every rule on sample_images's options that needs no model: raises
    InputError naming the options as flags (flags=True: `adm-fast sample`,
    before anything is loaded) or as keywords (sample_images).
    scale_without_classifier: a classifier_scale asked for with no classifier
    (on the command line a scale given, 0 included; in Python one other than
    its default 0). device_type: the device the command line samples on;
    sample_images runs cuda_graph's buffers eagerly on the CPU (None)."""
    name = _namer(flags)
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        _whole(name(key), value, 1)
    if seed is not None:
        _whole(name("seed"), seed, 0)
    if batch_size > MAX_BATCH_SIZE:
        raise InputError(f"{name('batch_size')} {batch_size} is over the limit of "
                         f"{MAX_BATCH_SIZE} images a batch (each batch is sampled whole, "
                         "in memory at once)")
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for key, value in (("eta", eta), ("cfg_scale", cfg_scale),
                       ("classifier_scale", classifier_scale)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{name(key)} must be a finite number, got {value}")
    if eta != 0.0 and sampler != "ddim":
        raise InputError(f"{name('eta')} is DDIM's; the {sampler} sampler does not take it")
    if steps is not None and sampler != "dpm++":
        raise InputError(f"{name('steps')} picks dpm++'s timesteps ({name('sampler')} dpm++); "
                         f"respace the {sampler} sampler's with {name('timestep_respacing')}")
    if cuda_graph and (sampler == "dpm++" or device_type not in (None, "cuda")):
        here = sampler if device_type is None else f"{device_type}, {sampler}"
        raise InputError(f"{name('cuda_graph')} needs a CUDA device and {name('sampler')} ddpm "
                         f"or ddim: dpm++ has no graphed step (here: {here})")
    if scale_without_classifier:
        raise InputError(f"{name('classifier_scale')} needs {name('classifier')}")


def check_classifier_size(classifier_size: int, model_size: int, classifier: str = "",
                          model: str = "") -> None:
    """The classifier guides the model's own images: the same size. classifier,
    model: what the message calls them beside 'the classifier'/'the model'
    (the command line names their files)."""
    if classifier_size != model_size:
        raise InputError(
            f"the classifier{' ' + classifier if classifier else ''} is for {classifier_size}x"
            f"{classifier_size} images but the model{' ' + model if model else ''} samples "
            f"{model_size}x{model_size}")


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
    a.add_argument("--seed", type=int, default=0,
                   help="batch b is sampled from a seed derived from (seed, b), so a "
                   "resumed run or any number of ranks give the same images (default 0)")
    a.add_argument("--out", default=".", help="folder for samples_NxHxWx3.npz and .png, and "
                   "the finished batches of an unfinished run (default .)")
    a.add_argument("--overwrite", action="store_true",
                   help="sample again and replace a finished samples_NxHxWx3.npz (and .png) "
                   "in --out; without it, the same command says the run is done and another "
                   "one that would write that file is refused")
    # Checked against the registry once torch is imported (job._check_flags):
    # --help imports no torch.
    a.add_argument("--backend", metavar="NAME", help="adm_fast op backend: auto, or one that "
                   "`adm-fast info` lists (default: $ADM_FAST_BACKEND, else auto)")
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
