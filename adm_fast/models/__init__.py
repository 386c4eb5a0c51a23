from .blocks import (
                     AttentionBlock,
                     AttentionPool2d,
                     Downsample,
                     QKVAttention,
                     QKVAttentionLegacy,
                     ResBlock,
                     TimestepBlock,
                     TimestepEmbedSequential,
                     Upsample,
)
from .layout import preferred_memory_format, use_preferred_layout
from .nn import GroupNorm32, timestep_embedding
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "AttentionBlock", "AttentionPool2d", "Downsample", "QKVAttention", "QKVAttentionLegacy",
    "ResBlock", "TimestepBlock", "TimestepEmbedSequential", "Upsample", "GroupNorm32",
    "timestep_embedding", "EncoderUNetModel", "SuperResModel", "UNetModel",
    "preferred_memory_format", "use_preferred_layout",
]
