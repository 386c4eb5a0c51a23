"""The released guided-diffusion checkpoints, by name, with their flags.

Flags are guided-diffusion's script flags as its README gives them for each
checkpoint (defaults fill the rest); `classifier` and `classifier_scale` are
the README's guidance settings, `timestep_respacing` its sampling default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

# Torch and the models are imported where a model is built: the preset table
# itself is data, which every command's --help reads.

_ADM = dict(attention_resolutions="32,16,8", learn_sigma=True, diffusion_steps=1000,
            noise_schedule="linear", resblock_updown=True, use_scale_shift_norm=True,
            use_fp16=True)
_256 = dict(_ADM, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2)


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "unet", "classifier" or "sr"
    checkpoint: str  # the file name as released
    flags: dict = field(default_factory=dict)
    classifier: str | None = None
    classifier_scale: float | None = None
    timestep_respacing: str = "250"
    # The model that produced samples for an upsampler, or that a classifier guides.
    pairs_with: str | None = None

    def model_flags(self) -> dict:
        return {"kind": self.kind, **self.flags}

    def build(self, device=None, dtype=None, **overrides):
        """The model with this preset's layout (random weights).

        overrides change flags that do not alter the layout (use_checkpoint,
        dropout, use_fp16 ...). With device="meta" nothing is allocated.
        """
        import torch

        from .models.precision import apply_dtype
        from .script_util import create_from_flags

        with torch.device(device or "cpu"):
            model = create_from_flags(self.kind, {**self.flags, **overrides})
        apply_dtype(model, dtype)
        model.preset = self
        return model


def _unet(name, classifier=None, scale=None, respacing="250", **flags):
    return Preset(name, "unet", f"{name}.pt", flags, classifier, scale, respacing)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _unet("64x64_diffusion", "64x64_classifier", 1.0, **dict(
        _ADM, class_cond=True, dropout=0.1, image_size=64, noise_schedule="cosine",
        num_channels=192, num_head_channels=64, num_res_blocks=3,
        use_new_attention_order=True)),
    _unet("128x128_diffusion", "128x128_classifier", 0.5, **dict(
        _ADM, class_cond=True, image_size=128, num_channels=256, num_heads=4,
        num_res_blocks=2)),
    _unet("256x256_diffusion", "256x256_classifier", 1.0, **dict(_256, class_cond=True)),
    _unet("256x256_diffusion_uncond", "256x256_classifier", 10.0,
          **dict(_256, class_cond=False)),
    _unet("512x512_diffusion", "512x512_classifier", 4.0,
          **dict(_256, class_cond=True, image_size=512, use_fp16=False)),
    _unet("lsun_bedroom", respacing="1000", **dict(_256, class_cond=False, dropout=0.1)),
    _unet("lsun_cat", respacing="1000", **dict(_256, class_cond=False, dropout=0.1)),
    _unet("lsun_horse", respacing="1000", **dict(_256, class_cond=False, dropout=0.1)),
    _unet("lsun_horse_nodropout", respacing="1000",
          **dict(_256, class_cond=False, dropout=0.0)),
    Preset("64x64_classifier", "classifier", "64x64_classifier.pt",
           dict(image_size=64, classifier_depth=4), pairs_with="64x64_diffusion"),
    Preset("128x128_classifier", "classifier", "128x128_classifier.pt",
           dict(image_size=128), pairs_with="128x128_diffusion"),
    Preset("256x256_classifier", "classifier", "256x256_classifier.pt",
           dict(image_size=256), pairs_with="256x256_diffusion"),
    Preset("512x512_classifier", "classifier", "512x512_classifier.pt",
           dict(image_size=512), pairs_with="512x512_diffusion"),
    Preset("64_256_upsampler", "sr", "64_256_upsampler.pt", dict(
        _ADM, class_cond=True, large_size=256, small_size=64, num_channels=192,
        num_heads=4, num_res_blocks=2), pairs_with="64x64_diffusion"),
    Preset("128_512_upsampler", "sr", "128_512_upsampler.pt", dict(
        _ADM, attention_resolutions="32,16", class_cond=True, large_size=512,
        small_size=128, num_channels=192, num_head_channels=64, num_res_blocks=2),
        pairs_with="128x128_diffusion"),
]}


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def names() -> list[str]:
    return list(PRESETS)


Layout = tuple[tuple[str, tuple[int, ...]], ...]


@functools.cache
def layout(name: str) -> Layout:
    """The preset's state_dict keys and shapes, in order (built on meta)."""
    model = get(name).build(device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
