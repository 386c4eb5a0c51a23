"""The adm-fast command: one sub-command per module, each with its own flags.

Every sub-command is a function `main(argv) -> int` ("module" or
"module:function"), imported only when it runs, so `adm-fast info` stays quick and a command's flags live beside its code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("adm_fast.info", "which backends are built and usable here, and why not"),
    "train": ("adm_fast.train.cli", "train a diffusion model (guided-diffusion's flags)"),
    "train-classifier": ("adm_fast.train.cli:main_classifier",
                         "train a noisy classifier (guided-diffusion's flags)"),
    "sample": ("adm_fast.sample", "sample images, guided or not (guided-diffusion's flags)"),
    "evaluate": ("adm_fast.evaluation.cli", "Inception Score, FID, sFID, Precision and Recall "
                 "of a sample batch, as guided-diffusion's evaluator"),
    "demo": ("adm_fast.demo.cli", "guided sampling on the shipped digits model: the "
             "fidelity/diversity trade-off and images/s vs the eager reference"),
    "bench": ("adm_fast.benchmarks.cli", "benchmarks: sample (guided sampling, validated "
              "against eager), ops, train"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return ("usage: adm-fast COMMAND [flags]   (adm-fast COMMAND --help for its flags)\n\n"
            "A fast, exact engine for ADM.\n\ncommands:\n" + rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"adm-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
