"""adm_fast: a fast, exact engine for ADM (Dhariwal & Nichol, 2021).

Models, flags and checkpoints are guided-diffusion's; the hot operations go
through `adm_fast.ops`, whose backends are chosen per call.
"""

from . import ops, presets
from .checkpoint import (CheckpointError, UnsafeCheckpointError, detect_preset,
                         load_checkpoint, read_state_dict, save_checkpoint)
from .models import EncoderUNetModel, SuperResModel, UNetModel
from .ops import explain, use_backend
from .presets import PRESETS, Preset
from .script_util import (NUM_CLASSES, classifier_and_diffusion_defaults, classifier_defaults,
                          create_classifier, create_model, diffusion_defaults,
                          model_and_diffusion_defaults, sr_create_model,
                          sr_model_and_diffusion_defaults)

__version__ = "0.1.0"

__all__ = [
    "ops", "presets", "CheckpointError", "UnsafeCheckpointError", "detect_preset",
    "load_checkpoint", "read_state_dict", "save_checkpoint", "EncoderUNetModel",
    "SuperResModel", "UNetModel", "explain", "use_backend", "PRESETS", "Preset", "NUM_CLASSES",
    "classifier_and_diffusion_defaults", "classifier_defaults", "create_classifier",
    "create_model", "diffusion_defaults", "model_and_diffusion_defaults", "sr_create_model",
    "sr_model_and_diffusion_defaults",
]
