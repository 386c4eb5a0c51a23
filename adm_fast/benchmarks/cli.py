"""adm-fast bench: the guided-sampling benchmark, the per-op, model and
training benchmarks, all in this process.

    adm-fast bench sample [--preset NAME ...] [--batch_size N] [--steps 25]
                          [--guidance S] [--sampler ddpm|ddim] [--dtype fp32|bf16|fp16]
                          [--backends auto cpu ...] [--compile/--no-compile]
                          [--warmup N] [--repeats N] [--threads N] [--results DIR]
    adm-fast bench ops [OP ...] [their flags]   (OP: an op spec file of adm_fast.ops)
    adm-fast bench models [its flags]
    adm-fast bench train [its flags]
    adm-fast bench evaluate [its flags]
    adm-fast bench plan [--preset NAME] [--classifier NAME|none] [--arch 90]
                        [--dtype bf16|fp16|fp32] [--batch 32] [--sampler ddpm|ddim]
                        [--backend auto] [--json PATH]

Rows go to --results DIR (default: the current folder).

Misuse exits with code 2 and one line `adm-fast bench: error: ...`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .flags import GPU_PRESETS, BenchInputError, build_parser

PROG = "adm-fast bench"
USAGE = (f"usage: {PROG} {{sample,ops,models,train,evaluate,plan}} [flags]   ({PROG} NAME --help "
         "for its flags)\n\n"
         "  sample  classifier-guided sampling throughput: adm_fast's backends against the eager\n"
         "          reference and torch.compile, with max |Δ| against eager and MFU\n"
         "  ops     the per-op benchmarks, one per op spec file of adm_fast.ops (conv3x3,\n"
         "          diffusion_step, ...): leading names pick some, other flags go to each\n"
         "  models  UNet forward and training step, eager vs adm_fast (vs torch.compile)\n"
         "  train   a training step: bytes saved for backward, time, GPU peak, max batch\n"
         "  evaluate  adm-fast evaluate's costs: Inception features/s, the P/R distance blocks\n"
         "  plan    what a GPU would run for one guided step, traced without one (needs a CUDA\n"
         "          build of torch): implementations, launches, syncs, layout copies, AOT, roofline\n\n"
         "Result rows go to --results DIR (default: the current folder).")


def _sample(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    import torch

    from .layouts import TINY
    from .sample import SampleBenchConfig, run_sample_bench
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        if args.threads < 1:
            raise BenchInputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    backends = None if cuda else ["auto"]  # on a CPU, each setting costs a minute or more
    if args.backends:
        backends = [b for item in args.backends for b in item.split(",") if b]
    cfg = SampleBenchConfig(
        presets=args.preset or (list(GPU_PRESETS) if cuda else [TINY.name]),
        device=device,
        batch_size=args.batch_size if args.batch_size is not None else (8 if cuda else 4),
        steps=args.steps, guidance=args.guidance, sampler=args.sampler,
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
               "fp16": torch.float16}[args.dtype or ("bf16" if cuda else "fp32")],
        backends=backends,
        compile=cuda if args.compile is None else args.compile,
        warmup=args.warmup if args.warmup is not None else (1 if cuda else 0),
        repeats=args.repeats, seed=args.seed,
        results_dir=Path(args.results) if args.results else None,
        save=not args.no_save, model_path=args.model_path, classifier_path=args.classifier_path,
        progress=args.progress)
    run_sample_bench(cfg)
    return 0


def _module_main(name: str, argv: list[str]) -> int:
    try:
        return int(importlib.import_module(f"adm_fast.benchmarks.{name}").main(argv) or 0)
    except SystemExit as e:  # --help, or argparse's own error (it printed why)
        return int(e.code or 0)


def op_benchmarks() -> list[str]:
    """The per-op benchmarks: adm_fast.benchmarks.<name> for each op spec file
    adm_fast.ops.<name> in the registry (one for the two steps: diffusion_step)."""
    from .. import ops

    return sorted({op.family for op in ops.ops().values() if op.family})


def _ops(argv: list[str]) -> int:
    names = op_benchmarks()
    picked = []
    while argv and argv[0] in names:
        picked.append(argv.pop(0))
    if argv and not argv[0].startswith("-"):
        raise BenchInputError(f"unknown op benchmark {argv[0]!r}; choose from "
                              f"{', '.join(names)} (or none for all)")
    status = 0
    for name in picked or names:
        if len(picked or names) > 1:
            print(f"== {name}", flush=True)
        status = status or _module_main(name, list(argv))
    return status


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
        if name in ("models", "train", "evaluate", "plan"):
            return _module_main(name, rest)
        raise BenchInputError(f"unknown benchmark {name!r}; choose from sample, ops, models, "
                              "train, evaluate, plan")
    except BenchInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
