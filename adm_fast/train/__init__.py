"""Training: diffusion models and noisy classifiers on adm_fast's fused ops.

`adm-fast train` / `adm-fast train-classifier` on the command line (also under
torchrun), `train(**flags)` / `train_classifier(**flags)` from Python, with
guided-diffusion's flag names. The pieces (data, precision, loop, checkpoints)
are importable on their own.
"""

import importlib

# name -> submodule; imported on first use, so that `adm-fast train --help`
# pays no torch import.
_WHERE = {
    "train": "cli", "train_classifier": "cli", "TrainError": "config", "DataError": "data",
    "ImageFolderDataset": "data", "load_data": "data", "make_image_folder": "data",
    "TrainLoop": "loop", "PRECISIONS": "precision", "MixedPrecisionTrainer": "precision",
    "find_latest": "state", "ClassifierTrainLoop": "tasks", "DiffusionTrainLoop": "tasks",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
