from .blocks import (AttentionBlock, AttentionPool2d, Downsample, QKVAttention,
                     QKVAttentionLegacy, ResBlock, TimestepBlock, TimestepEmbedSequential,
                     Upsample)
from .nn import GroupNorm32, timestep_embedding
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "AttentionBlock", "AttentionPool2d", "Downsample", "QKVAttention", "QKVAttentionLegacy",
    "ResBlock", "TimestepBlock", "TimestepEmbedSequential", "Upsample", "GroupNorm32",
    "timestep_embedding", "EncoderUNetModel", "SuperResModel", "UNetModel",
]
