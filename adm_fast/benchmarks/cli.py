"""adm-fast bench: the guided-sampling benchmark, and the repository's op and
training benchmarks.

    adm-fast bench sample [--preset NAME ...] [--batch_size N] [--steps 25]
                          [--guidance S] [--sampler ddpm|ddim] [--dtype fp32|bf16|fp16]
                          [--backends auto cpu ...] [--compile/--no-compile]
                          [--warmup N] [--repeats N] [--threads N] [--results_dir DIR]
    adm-fast bench ops [group_norm_act|qkv_attention|diffusion_step ...] [their flags]
    adm-fast bench train [bench/bench_train.py's flags]

Misuse exits with code 2 and one line `adm-fast bench: error: ...`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List

import torch

from .common import source_root
from .layouts import GPU_PRESETS, TINY, BenchInputError

PROG = "adm-fast bench"
OPS_SCRIPTS = {"group_norm_act": "bench_group_norm_act.py",
               "qkv_attention": "bench_qkv_attention.py",
               "diffusion_step": "bench_diffusion_step.py"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USAGE = (f"usage: {PROG} {{sample,ops,train}} [flags]   ({PROG} sample --help for its flags)\n\n"
         "  sample  classifier-guided sampling throughput: adm_fast's backends against the eager\n"
         "          reference and torch.compile, with max |Δ| against eager and MFU\n"
         "  ops     the repository's per-op benchmarks (bench/bench_{group_norm_act,\n"
         "          qkv_attention,diffusion_step}.py); leading names pick some, other flags\n"
         "          pass through to each\n"
         "  train   the repository's training benchmark (bench/bench_train.py), flags passed on")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchInputError(message)


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = _Parser(prog=f"{PROG} sample", description=(
        "Classifier-guided sampling throughput: guided-diffusion's computation (eager), "
        "adm_fast's backends and torch.compile, timed over whole sampling loops, with their "
        "max |Δ| against eager on the same seed and (CUDA) MFU."))
    p.add_argument("--preset", nargs="+", metavar="NAME",
                   help=f"ADM layouts: a diffusion preset or {TINY.name!r} (32x32, 64 channels) "
                        f"(default: {' '.join(GPU_PRESETS)} on CUDA, {TINY.name} on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument("--batch_size", type=int, help="images per batch (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=25,
                   help="sampling steps (the respacing count) of each timed loop (default 25)")
    p.add_argument("--guidance", type=float, help="classifier scale; 0: no classifier "
                   "(default: the preset's classifier_scale)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--dtype", choices=list(DTYPES), help="fp32, or guided-diffusion's use_fp16 "
                   "recipe in bf16/fp16 (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backends", nargs="+", metavar="NAME", help="adm_fast settings to time: "
                   "auto and/or backends (an explicit backend takes the ops it implements, auto "
                   "the rest; default: auto and every backend auto could pick here)")
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
    p.add_argument("--results_dir", help="where sample_<cpu|gpu>.csv is appended to (default: "
                   "bench/results in a source checkout, else ./bench_results)")
    p.add_argument("--no_save", action="store_true", help="print only")
    return p


def _sample(argv: List[str]) -> int:
    from .sample import SampleBenchConfig, run_sample_bench

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise BenchInputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    backends = None
    if args.backends:
        backends = [b for item in args.backends for b in item.split(",") if b]
    cfg = SampleBenchConfig(
        presets=args.preset or (list(GPU_PRESETS) if cuda else [TINY.name]),
        device=device,
        batch_size=args.batch_size if args.batch_size is not None else (8 if cuda else 4),
        steps=args.steps, guidance=args.guidance, sampler=args.sampler,
        dtype=DTYPES[args.dtype or ("bf16" if cuda else "fp32")],
        backends=backends,
        compile=cuda if args.compile is None else args.compile,
        warmup=args.warmup if args.warmup is not None else (1 if cuda else 0),
        repeats=args.repeats, seed=args.seed,
        results_dir=Path(args.results_dir) if args.results_dir else None,
        save=not args.no_save, model_path=args.model_path, classifier_path=args.classifier_path)
    run_sample_bench(cfg)
    return 0


def _bench_dir() -> Path:
    root = source_root()
    if root is None:
        raise BenchInputError("the op and training benchmarks live in the adm_fast repository's "
                              "bench/ folder, which an installed package does not carry: run "
                              "them from a source checkout (python bench/bench_*.py)")
    return root / "bench"


def _run_scripts(scripts: List[str], args: List[str]) -> int:
    folder, status = _bench_dir(), 0
    for script in scripts:
        if len(scripts) > 1:
            print(f"== {script}", flush=True)
        rc = subprocess.run([sys.executable, str(folder / script), *args]).returncode
        status = status or rc
    return status


def _ops(argv: List[str]) -> int:
    picked = []
    while argv and argv[0] in OPS_SCRIPTS:
        picked.append(argv.pop(0))
    if argv and not argv[0].startswith("-"):
        raise BenchInputError(f"unknown op benchmark {argv[0]!r}; choose from "
                              f"{', '.join(OPS_SCRIPTS)} (or none for all three)")
    return _run_scripts([OPS_SCRIPTS[n] for n in picked or OPS_SCRIPTS], argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        if name == "sample":
            return _sample(rest)
        if name == "ops":
            return _ops(rest)
        if name == "train":
            return _run_scripts(["bench_train.py"], rest)
        raise BenchInputError(f"unknown benchmark {name!r}; choose from sample, ops, train")
    except BenchInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
