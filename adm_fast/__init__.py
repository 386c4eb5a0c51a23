"""adm_fast: a fast, exact engine for ADM (Dhariwal & Nichol, 2021).

Models, flags and checkpoints are guided-diffusion's; the hot operations go
through `adm_fast.ops`, whose backends are chosen per call.

The names below are imported on first use (PEP 562), so that `import adm_fast`
and every command's --help cost no torch import.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    **{name: "adm_fast.checkpoint" for name in (
        "CheckpointError", "UnsafeCheckpointError", "detect_preset", "load_checkpoint",
        "read_state_dict", "save_checkpoint")},
    **{name: "adm_fast.diffusion" for name in (
        "ClassifierFreeGuidance", "GaussianDiffusion", "SpacedDiffusion", "classifier_cond_fn",
        "classifier_free_guidance", "create_gaussian_diffusion",
        "create_named_schedule_sampler")},
    **{name: "adm_fast.models" for name in ("EncoderUNetModel", "SuperResModel", "UNetModel")},
    **{name: "adm_fast.sampling.api" for name in ("sample_images", "save_samples")},
    "explain": "adm_fast.ops", "use_backend": "adm_fast.ops", "patch": "adm_fast.patch",
    "PRESETS": "adm_fast.presets", "Preset": "adm_fast.presets",
    **{name: "adm_fast.script_util" for name in (
        "NUM_CLASSES", "classifier_and_diffusion_defaults", "classifier_defaults",
        "create_classifier", "create_classifier_and_diffusion", "create_model",
        "create_model_and_diffusion", "diffusion_defaults", "model_and_diffusion_defaults",
        "sr_create_model", "sr_create_model_and_diffusion", "sr_model_and_diffusion_defaults")},
}
# modules reached by their dotted name (adm_fast.checkpoint.read_class_names),
# as README shows them
_SUBMODULES = ("checkpoint", "diffusion", "evaluation", "models", "ops", "presets",
               "sampling", "train")

__all__ = list(_SUBMODULES) + list(_WHERE)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"adm_fast.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once found, a plain attribute
        return value
    raise AttributeError(f"module 'adm_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
