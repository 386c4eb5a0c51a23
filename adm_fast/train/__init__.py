"""Training: diffusion models and noisy classifiers on adm_fast's fused ops.

`adm-fast train` / `adm-fast train-classifier` on the command line (also under
torchrun), `train(**flags)` / `train_classifier(**flags)` from Python, with
guided-diffusion's flag names. The pieces (data, precision, loop, checkpoints)
are importable on their own.
"""

from .cli import train, train_classifier
from .config import TrainError
from .data import DataError, ImageFolderDataset, load_data, make_image_folder
from .loop import TrainLoop
from .precision import PRECISIONS, MixedPrecisionTrainer
from .state import find_latest
from .tasks import ClassifierTrainLoop, DiffusionTrainLoop

__all__ = ["TrainError", "train", "train_classifier", "DataError", "ImageFolderDataset",
           "load_data", "make_image_folder", "TrainLoop", "MixedPrecisionTrainer", "PRECISIONS",
           "find_latest", "ClassifierTrainLoop", "DiffusionTrainLoop"]
