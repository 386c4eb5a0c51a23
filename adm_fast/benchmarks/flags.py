"""The flags of `adm-fast bench sample`, with no torch import (its --help
answers at once)."""

from __future__ import annotations

import argparse

PROG = "adm-fast bench"
GPU_PRESETS = ("64x64_diffusion", "128x128_diffusion", "256x256_diffusion", "512x512_diffusion")
TINY_NAME = "tiny"


class BenchInputError(ValueError):
    """Flags or files the benchmark cannot run with: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchInputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} sample", allow_abbrev=False, description=(
        "Classifier-guided sampling throughput: guided-diffusion's computation (eager), "
        "adm_fast's backends and torch.compile, timed over whole sampling loops, with their "
        "max |Δ| against eager on the same seed and (CUDA) MFU."))
    p.add_argument("--preset", nargs="+", metavar="NAME",
                   help=f"ADM layouts: a diffusion preset or {TINY_NAME!r} (32x32, 64 channels) "
                        f"(default: {' '.join(GPU_PRESETS)} on CUDA, {TINY_NAME} on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--batch_size", type=int, help="images per batch (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=25,
                   help="sampling steps (the respacing count) of each timed loop (default 25)")
    p.add_argument("--guidance", type=float, help="classifier scale; 0: no classifier "
                   "(default: the preset's classifier_scale)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="fp32, or guided-diffusion's use_fp16 "
                   "recipe in bf16/fp16 (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backends", nargs="+", metavar="NAME", help="adm_fast settings to time: "
                   "auto and/or backends (an explicit backend takes the ops it implements, auto "
                   "the rest; default: auto on a CPU, auto and every backend auto could pick here on "
                   "CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also torch.compile of the eager models (default on for CUDA, off on "
                        "CPU, where compiling takes minutes)")
    p.add_argument("--warmup", type=int, help="untimed loops per implementation after the "
                   "validation loop (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed loops per implementation, "
                   "interleaved; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's "
                   "choice); on a CPU shared with other jobs, fewer threads than cores avoid "
                   "OpenMP workers waiting on descheduled peers")
    p.add_argument("--model_path", help="UNet checkpoint (default: random weights)")
    p.add_argument("--classifier_path", help="classifier checkpoint (default: random weights)")
    p.add_argument("--results", metavar="DIR", help="where sample_<cpu|gpu>.csv is appended "
                   "to (default: the current folder)")
    p.add_argument("--no_save", action="store_true", help="print only")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a bar over the timed loops on stderr (default on)")
    return p
