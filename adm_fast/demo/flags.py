"""adm-fast demo: classifier guidance on handwritten digits, in a few minutes on a CPU.

A small unconditional ADM samples 16×16 digits, steered by a noisy classifier
at each --scales value (guided-diffusion's classifier_sample.py, Algorithm 1
of Dhariwal & Nichol). An independent classifier, trained on clean digits
only and never used for guidance, then scores the samples:

  fidelity   the share it reads as the digit the guidance asked for
             (0.10 is chance: at scale 0 the label is ignored)
  diversity  the mean distance between its features of samples asked for
             the same digit, averaged over the digits

The paper's trade-off shows as fidelity rising and diversity falling with the
scale. Sampling speed is printed for adm_fast's default backend and for the
eager reference. The models ship in adm_fast/demo/weights; --train remakes
them from scratch with adm_fast's trainer (needs scikit-learn, ~30 minutes).

These are its flags, with no torch import (its --help answers at once).
"""

from __future__ import annotations

import argparse
import math

NUM_DIGITS = 10  # the classes of scikit-learn's digits


class DemoError(ValueError):
    """Bad flags or files: one line, exit code 2."""


PROG = "adm-fast demo"
DEFAULT_SCALES = "0,1,3,10"
MIN_SAMPLES = 2 * NUM_DIGITS  # two per digit, so each digit has a pair to compare


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise DemoError(message)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _scales(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of numbers such as {DEFAULT_SCALES}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one scale")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise argparse.ArgumentTypeError(f"scales must be finite and >= 0, got {bad[0]:g}")
    return values


def build_parser() -> argparse.ArgumentParser:
    text = __doc__.rsplit("\n\n", 1)[0]  # without the line about this module
    p = _Parser(prog=PROG, description=text.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=text.split("\n\n", 1)[1], allow_abbrev=False)
    p.add_argument("--out", default="adm_fast_demo",
                   help="folder for the grids, results.json and, with --train, data and weights")
    p.add_argument("--num_samples", type=_int_at_least(MIN_SAMPLES), default=100,
                   help=f"samples per scale, the digits in turn (default 100; at least "
                        f"{MIN_SAMPLES})")
    p.add_argument("--steps", type=_int_at_least(1), default=30,
                   help="DDPM sampling steps, respaced from the 1000 trained (default 30: "
                        "the demo well within a minute on 2 cores; 40 gave fidelity and "
                        "diversity within 0.04 of these)")
    p.add_argument("--scales", type=_scales, default=_scales(DEFAULT_SCALES),
                   help=f"classifier scales, a comma list (default {DEFAULT_SCALES})")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="the same seed at every scale: same x_T and noise (default 0)")
    p.add_argument("--batch_size", type=_int_at_least(1), default=100,
                   help="samples per sampling batch (default 100)")
    p.add_argument("--eager_steps", type=_int_at_least(0), default=2,
                   help="steps of one batch timed per backend for the speed columns, "
                        "adm_fast and eager alike (0: no eager column, adm_fast's from the "
                        "whole run; default 2)")
    p.add_argument("--device", default="",
                   help="where to sample: cpu, cuda, cuda:1 ... (default: cuda when there is "
                        "one, else cpu)")
    p.add_argument("--weights", default="",
                   help="folder with diffusion/classifier/clean.safetensors (default: shipped)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again into an --out that holds a finished demo (results.json), "
                        "replacing its grids and results")
    p.add_argument("--train", action="store_true",
                   help="retrain all three models into OUT/weights first, then sample with them")
    return p
