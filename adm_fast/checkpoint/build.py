"""Building the model a checkpoint describes: from a preset, a flags dict, or
the file's own metadata (adm_fast.class and adm_fast.config), which is checked
against an explicit schema of each model class's constructor arguments before
anything is built."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import presets as _presets
from ..defaults import size_problems
from ..models import EncoderUNetModel, SuperResModel, UNetModel
from ..presets import Preset
from ..script_util import create_from_flags
from .metadata import (
    KIND_OF_CLASS,
    META_CLASS,
    META_CONFIG,
    META_FLAGS,
    META_PRESET,
    CheckpointError,
    json_meta,
    model_flags_of,
)


class ArgType(NamedTuple):
    name: str  # as the error says what was expected
    check: Callable[[object], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


INT = ArgType("int", _is_int)
BOOL = ArgType("bool", lambda v: isinstance(v, bool))
FLOAT = ArgType("float", _is_number)
STR = ArgType("str", lambda v: isinstance(v, str))
OPTIONAL_INT = ArgType("Optional[int]", lambda v: v is None or _is_int(v))
INTS = ArgType("Sequence[int]", lambda v: isinstance(v, list) and all(map(_is_int, v)))
FLOATS = ArgType("Sequence[float]", lambda v: isinstance(v, list) and all(map(_is_number, v)))

_SHARED = {
    "image_size": INT, "in_channels": INT, "model_channels": INT, "out_channels": INT,
    "num_res_blocks": INT, "attention_resolutions": INTS, "dropout": FLOAT,
    "channel_mult": FLOATS, "conv_resample": BOOL, "dims": INT, "use_checkpoint": BOOL,
    "use_fp16": BOOL, "num_heads": INT, "num_head_channels": INT, "num_heads_upsample": INT,
    "use_scale_shift_norm": BOOL, "resblock_updown": BOOL, "use_new_attention_order": BOOL,
}
_UNET = {**_SHARED, "num_classes": OPTIONAL_INT, "null_class": BOOL}
# Every constructor argument adm_fast.config may hold, per class, and its type:
# an argument not listed here is refused, never let through unchecked
# (tests/test_checkpoint_files.py holds this table to the constructors' signatures).
CONFIG_SCHEMA: dict[str, dict[str, ArgType]] = {
    "UNetModel": _UNET,
    "SuperResModel": _UNET,  # it forwards to UNetModel's arguments and records them
    "EncoderUNetModel": {**_SHARED, "pool": STR},
}
MODEL_CLASSES = {c.__name__: c for c in (UNetModel, SuperResModel, EncoderUNetModel)}
assert set(MODEL_CLASSES) == set(KIND_OF_CLASS) == set(CONFIG_SCHEMA)

_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def constructor_defaults(name: str) -> dict:
    """The default of each constructor argument of model class `name` that has one."""
    cls = MODEL_CLASSES[name]
    params = inspect.signature((UNetModel if cls is SuperResModel else cls).__init__).parameters
    return {k: p.default for k, p in params.items()
            if k != "self" and p.default is not p.empty}


def least_size(config: Mapping) -> tuple[int, int]:
    """(parameters, tensors) a model built from these constructor arguments
    has at least: the time embedding's second Linear, the label embedding, and
    in each res block of the encoder its 10 tensors and its second 3x3 conv
    (width x width x 9). Well below the real count, which only building tells."""
    base, blocks = config["model_channels"], config["num_res_blocks"]
    widths = [int(m * base) for m in config["channel_mult"]]
    params = 16 * base * base + blocks * sum(9 * w * w for w in widths)
    params += (config.get("num_classes") or 0) * 4 * base
    return params, 4 + 10 * blocks * len(widths)


def model_from_meta(meta: Mapping[str, str], path: str,
                    weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The model adm_fast.class / adm_fast.config describe (on the current
    device); with `weights`, refused before it is built when it needs more
    parameters or tensors than they hold."""
    name = meta[META_CLASS]
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: metadata {META_CLASS} names an unknown model class "
                              f"{name!r}; expected one of {', '.join(MODEL_CLASSES)}")
    if META_CONFIG not in meta:
        raise CheckpointError(f"{path}: metadata has {META_CLASS} but no {META_CONFIG}")
    config = json_meta(meta, META_CONFIG, path, dict)
    schema, defaults = CONFIG_SCHEMA[name], constructor_defaults(name)
    unknown = sorted(set(config) - set(schema))
    missing = [k for k in schema if k not in defaults and k not in config]
    bad = [f"{k}={config[k]!r} (expected {t.name})" for k, t in schema.items()
           if k in config and not t.check(config[k])]
    problems = ([f"unknown arguments {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing arguments {', '.join(missing)}"] if missing else []) + bad
    if problems:
        raise CheckpointError(f"{path}: metadata {META_CONFIG} does not describe a {name}: "
                              f"{'; '.join(problems)}")
    # Sizes are bounded before anything is built: building on the meta device
    # allocates nothing, but thousands of blocks still take minutes.
    too_big = size_problems(config)
    if too_big:
        raise CheckpointError(f"{path}: metadata {META_CONFIG} does not build a {name}: "
                              f"{'; '.join(too_big)}")
    if weights is not None:
        least, tensors = least_size({**defaults, **config})
        held = sum(t.numel() for t in weights.values())
        if least > held or tensors > len(weights):
            raise CheckpointError(
                f"{path}: metadata {META_CONFIG} describes a {name} of at least {least:,} "
                f"parameters in {tensors:,} tensors, but the file holds {held:,} in "
                f"{len(weights):,}: the metadata does not describe these weights")
    try:
        return MODEL_CLASSES[name](**config)
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: metadata {META_CONFIG} does not build a {name}: "
                              f"{first}") from None


def build(spec, meta: Mapping[str, str], path: str, weights: Mapping[str, Tensor]):
    """(model on meta, preset or None) for a preset name/Preset/flags dict, or
    from the file's own metadata (checked against its weights) when spec is None."""
    with torch.device("meta"):
        if isinstance(spec, Preset):
            return spec.build(device="meta"), spec
        if isinstance(spec, str):
            if spec not in _presets.PRESETS:
                raise CheckpointError(f"{path}: unknown preset {spec!r}; known: "
                                      f"{', '.join(_presets.names())}")
            preset = _presets.get(spec)
            return preset.build(device="meta"), preset
        if isinstance(spec, Mapping):
            flags = dict(spec)
            if "kind" not in flags:
                raise ValueError("a flags dict needs 'kind': 'unet', 'classifier' or 'sr'")
            return create_from_flags(flags.pop("kind"), flags), None
        model = model_from_meta(meta, path, weights)
        if META_FLAGS in meta:
            model.flags = model_flags_of(meta, path)
        return model, _presets.PRESETS.get(meta.get(META_PRESET, ""))


def check_dtypes(sd: Mapping[str, Tensor], path: str) -> None:
    """A model's weights are floating point; anything else fails in
    load_state_dict with one traceback line per tensor."""
    bad = [k for k, v in sd.items() if v.dtype not in _WEIGHT_DTYPES]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: tensor {bad[0]} has dtype "
                              f"{str(sd[bad[0]].dtype).replace('torch.', '')}{more}; a model's "
                              "weights are float32, float16, bfloat16 or float64")
