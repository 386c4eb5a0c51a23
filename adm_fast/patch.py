"""adm_fast.patch(model): guided-diffusion models onto adm_fast's op layer, in place.

guided-diffusion's blocks are recognised by class name and by the attributes
adm_fast's implementation of that block reads (so a look-alike with another
structure is left alone), then re-typed in place as the adm_fast class of the
same name: the very same module objects and parameter tensors, now running
GroupNorm(+AdaGN)(+SiLU), attention and the rest through adm_fast.ops. No
weights are copied or reloaded, and guided-diffusion is never imported.
"""

from __future__ import annotations

import math

from torch import nn

from .models import blocks, fused, unet
from .models import nn as adm_nn

# name -> (adm_fast class, attributes its forward needs)
_BLOCKS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "GroupNorm32": (adm_nn.GroupNorm32, ("num_groups", "weight", "bias", "eps")),
    "ResBlock": (blocks.ResBlock, ("in_layers", "emb_layers", "out_layers", "skip_connection",
                                   "h_upd", "x_upd", "updown", "use_scale_shift_norm",
                                   "use_checkpoint")),
    "AttentionBlock": (blocks.AttentionBlock, ("norm", "qkv", "attention", "proj_out",
                                               "use_checkpoint")),
    "QKVAttention": (blocks.QKVAttention, ("n_heads",)),
    "QKVAttentionLegacy": (blocks.QKVAttentionLegacy, ("n_heads",)),
    "AttentionPool2d": (blocks.AttentionPool2d, ("positional_embedding", "qkv_proj", "c_proj",
                                                 "attention")),
    "TimestepEmbedSequential": (blocks.TimestepEmbedSequential, ()),
    "Upsample": (blocks.Upsample, ("use_conv", "channels")),
    "Downsample": (blocks.Downsample, ("op", "channels")),
    "UNetModel": (unet.UNetModel, ("time_embed", "input_blocks", "middle_block",
                                   "output_blocks", "out", "model_channels", "in_channels",
                                   "channel_mult", "num_classes")),
    "SuperResModel": (unet.SuperResModel, ("time_embed", "input_blocks", "middle_block",
                                           "output_blocks", "out", "model_channels",
                                           "in_channels", "channel_mult", "num_classes")),
    "EncoderUNetModel": (unet.EncoderUNetModel, ("time_embed", "input_blocks",
                                                 "middle_block", "out", "model_channels",
                                                 "in_channels", "channel_mult", "pool")),
}


def _retype(module: nn.Module) -> bool:
    cls = type(module)
    entry = _BLOCKS.get(cls.__name__)
    if entry is None or cls is entry[0] or isinstance(module, entry[0]):
        return False
    target, needed = entry
    if not all(hasattr(module, a) for a in needed):
        return False
    if target is blocks.AttentionPool2d:  # adm_fast checks the feature size it was built for
        module.spacial_dim = math.isqrt(module.positional_embedding.shape[-1] - 1)
    if target in (unet.UNetModel, unet.SuperResModel) and not hasattr(module, "null_label"):
        module.null_label = None
    # guided-diffusion keeps `dtype` as an attribute; adm_fast reads it off the torso.
    module.__dict__.pop("dtype", None)
    module.__class__ = target
    return True


class NormActSequential(nn.Sequential):
    """A Sequential that starts with GroupNorm then SiLU: both in one fused op."""

    def forward(self, x):
        x = fused.norm_act(self[0], x)
        for layer in list(self)[2:]:
            x = layer(x)
        return x


def _fuse_norm_act(module: nn.Module) -> bool:
    if type(module) is not nn.Sequential or len(module) < 2:
        return False
    first, second = module[0], module[1]
    if isinstance(first, nn.GroupNorm) and type(second).__name__ == "SiLU":
        module.__class__ = NormActSequential
        return True
    return False


def patch(module: nn.Module) -> nn.Module:
    """Re-type guided-diffusion's blocks inside `module` (and `module` itself) as
    adm_fast's, in place, sharing every parameter; returns `module`.

    Handles UNetModel, SuperResModel, EncoderUNetModel, ResBlock, AttentionBlock,
    QKVAttention(Legacy), AttentionPool2d, TimestepEmbedSequential, Up/Downsample,
    GroupNorm32, and GroupNorm→SiLU sequences anywhere. adm_fast's own models
    already run on the op layer and are returned unchanged. `model.patched`
    lists what was changed.
    """
    changed: list[str] = []
    for name, m in list(module.named_modules()):
        before = type(m).__name__
        if _retype(m):
            changed.append(f"{name or '<root>'}: {before} -> adm_fast {before}")
    # adm_fast's blocks and models already fuse the sequences they own.
    owned = {id(child) for m in module.modules()
             if isinstance(m, (blocks.ResBlock, unet.UNetModel, unet.EncoderUNetModel))
             for child in m.children()}
    for name, m in list(module.named_modules()):
        if id(m) not in owned and _fuse_norm_act(m):
            changed.append(f"{name or '<root>'}: Sequential(GroupNorm, SiLU, ...) -> "
                           f"adm_fast NormActSequential")
    module.patched = changed
    return module
