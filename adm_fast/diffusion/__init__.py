"""The diffusion process, its samplers, guidance and training-time samplers."""

from .gaussian_diffusion import (
                                 GaussianDiffusion,
                                 LossType,
                                 ModelMeanType,
                                 ModelVarType,
                                 SpacedDiffusion,
                                 create_gaussian_diffusion,
)
from .guidance import ClassifierFreeGuidance, classifier_cond_fn, classifier_free_guidance
from .loops import NonFiniteSampleError
from .resample import (
                                 LossSecondMomentResampler,
                                 ScheduleSampler,
                                 UniformSampler,
                                 create_named_schedule_sampler,
)
from .schedules import betas_for_alpha_bar, get_named_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "SpacedDiffusion",
    "create_gaussian_diffusion", "ClassifierFreeGuidance", "classifier_cond_fn",
    "classifier_free_guidance", "NonFiniteSampleError", "LossSecondMomentResampler",
    "ScheduleSampler", "UniformSampler", "create_named_schedule_sampler",
    "betas_for_alpha_bar", "get_named_beta_schedule", "space_timesteps",
]
