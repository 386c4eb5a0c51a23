"""adm_fast: a fast, exact engine for ADM (Dhariwal & Nichol, 2021).

Models, flags and checkpoints are guided-diffusion's; the hot operations go
through `adm_fast.ops`, whose backends are chosen per call.
"""

from . import diffusion, ops, presets
from .checkpoint import (CheckpointError, UnsafeCheckpointError, detect_preset,
                         load_checkpoint, read_state_dict, save_checkpoint)
from .diffusion import (ClassifierFreeGuidance, GaussianDiffusion, SpacedDiffusion,
                        classifier_cond_fn, classifier_free_guidance, create_gaussian_diffusion,
                        create_named_schedule_sampler)
from .models import EncoderUNetModel, SuperResModel, UNetModel
from .ops import explain, use_backend
from .patch import patch
from .presets import PRESETS, Preset
from .script_util import (NUM_CLASSES, classifier_and_diffusion_defaults, classifier_defaults,
                          create_classifier, create_classifier_and_diffusion, create_model,
                          create_model_and_diffusion, diffusion_defaults,
                          model_and_diffusion_defaults, sr_create_model,
                          sr_create_model_and_diffusion, sr_model_and_diffusion_defaults)

__version__ = "0.1.0"

__all__ = [
    "diffusion", "ClassifierFreeGuidance", "GaussianDiffusion", "SpacedDiffusion",
    "classifier_cond_fn", "classifier_free_guidance", "create_gaussian_diffusion",
    "create_named_schedule_sampler", "create_classifier_and_diffusion",
    "create_model_and_diffusion", "sr_create_model_and_diffusion",
    "ops", "presets", "patch", "CheckpointError", "UnsafeCheckpointError", "detect_preset",
    "load_checkpoint", "read_state_dict", "save_checkpoint", "EncoderUNetModel",
    "SuperResModel", "UNetModel", "explain", "use_backend", "PRESETS", "Preset", "NUM_CLASSES",
    "classifier_and_diffusion_defaults", "classifier_defaults", "create_classifier",
    "create_model", "diffusion_defaults", "model_and_diffusion_defaults", "sr_create_model",
    "sr_model_and_diffusion_defaults",
]
