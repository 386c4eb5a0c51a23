"""`adm-fast train` and `adm-fast train-classifier`: guided-diffusion's
image_train.py and classifier_train.py flags (same names and defaults) and
adm_fast's additions, all listed with their help by `--help` (the tables are
in train/config.py).

`--batch_size` is the GLOBAL batch: under torchrun each of N ranks takes
batch_size / N (stated in the log), so the same flags train the same model
on any number of processes. The Python entry points are `train(**flags)` and
`train_classifier(**flags)`.
"""

from __future__ import annotations

import sys

from ..defaults import str2bool
from .config import TrainError, flags_from_kwargs, parse, prog


def _run(kind: str, argv) -> int:
    from ..checkpoint import CheckpointError
    from .data import DataError
    from .run import run

    try:
        run(kind, parse(kind, argv))
    except (TrainError, DataError, CheckpointError, ValueError, OSError) as e:
        print(f"{prog(kind)}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # not "[Errno 28] ..."
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def main(argv=None) -> int:
    return _run("diffusion", list(sys.argv[1:] if argv is None else argv))


def main_classifier(argv=None) -> int:
    return _run("classifier", list(sys.argv[1:] if argv is None else argv))


def train(**flags) -> int:
    """Train a diffusion model; flags as `adm-fast train` takes them. Returns the last step."""
    from .run import run
    return run("diffusion", flags_from_kwargs("diffusion", flags))


def train_classifier(**flags) -> int:
    """Train a noisy classifier; flags as `adm-fast train-classifier`. Returns the last step."""
    from .run import run
    return run("classifier", flags_from_kwargs("classifier", flags))


__all__ = ["main", "main_classifier", "train", "train_classifier", "TrainError", "str2bool"]
