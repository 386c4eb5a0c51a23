"""The adm-fast command: one sub-command per module, each with its own flags.

Every sub-command is a function `main(argv) -> int` ("module" or
"module:function"), imported only when it runs. A command's --help is answered
by its parser alone ("module:function" returning an argparse parser, in a
module that imports no torch), so every --help is instant.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "info": ("adm_fast.info", "which backends are built and usable here, and why not"),
    "train": ("adm_fast.train.cli", "train a diffusion model (guided-diffusion's flags)"),
    "train-classifier": ("adm_fast.train.cli:main_classifier",
                         "train a noisy classifier (guided-diffusion's flags)"),
    "sample": ("adm_fast.sampling.cli", "sample images, guided or not (guided-diffusion's flags)"),
    "evaluate": ("adm_fast.evaluation.cli", "Inception Score, FID, sFID, Precision and Recall "
                 "of a sample batch, as guided-diffusion's evaluator"),
    "demo": ("adm_fast.demo.cli", "guided sampling on the shipped digits model: the "
             "fidelity/diversity trade-off and images/s vs the eager reference"),
    "bench": ("adm_fast.benchmarks.cli", "benchmarks: sample (guided sampling, validated "
              "against eager), ops, models, train, evaluate"),
}
# The parsers that answer `adm-fast COMMAND --help` without importing the command.
PARSERS = {
    "info": "adm_fast.info:build_parser",
    "train": "adm_fast.train.config:diffusion_parser",
    "train-classifier": "adm_fast.train.config:classifier_parser",
    "sample": "adm_fast.sampling.flags:build_parser",
    "evaluate": "adm_fast.evaluation.cli:build_parser",
    "demo": "adm_fast.demo.flags:build_parser",
}


# libgomp (torch's OpenMP on Linux) lets a worker spin 300,000 times after each
# parallel region before it sleeps. On a core another process wants, that spin
# takes the time slice the thread with the work needs. Beside busy processes,
# 10,000 spins made guided steps (eager's and adm_fast's alike) and the demo
# markedly faster than the default; idle, they are within its noise, while no
# spin at all (OMP_WAIT_POLICY=PASSIVE) slows both sides (docs/performance.md).
# libgomp reads it once, as torch loads it, so only a command, before importing
# torch, can choose it; both sides of every comparison run in the one process.
OPENMP_SPIN = "10000"


def openmp_defaults(environ=None) -> str | None:
    """Set GOMP_SPINCOUNT for this process unless the user chose an OpenMP
    wait policy or torch is loaded already (too late to matter); returns what
    was set."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return None
    environ["GOMP_SPINCOUNT"] = OPENMP_SPIN
    return OPENMP_SPIN


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return ("usage: adm-fast COMMAND [flags]   (adm-fast COMMAND --help for its flags)\n"
            "       adm-fast --version\n\n"
            "A fast, exact engine for ADM.\n\ncommands:\n" + rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv == ["--version"]:
        from . import __version__  # adm_fast is imported already to reach this module

        print(f"adm-fast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        what = "option" if name.startswith("-") else "command"
        print(f"adm-fast: unknown {what} {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in PARSERS and any(a in ("-h", "--help") for a in rest):
        module, _, func = PARSERS[name].partition(":")
        try:
            getattr(importlib.import_module(module), func)().parse_args(["--help"])
        except SystemExit as e:
            return int(e.code or 0)
    openmp_defaults()
    module, _, func = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
