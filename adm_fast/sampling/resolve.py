"""What a checkpoint is, before its weights are read: the model kind and the
flags to build and sample it with.

Flags come, lowest to highest priority, from guided-diffusion's defaults, the
preset (recognised from the tensors, named in an adm_fast file, or given with
--preset), an adm_fast safetensors file's own model flags
("adm_fast.flags") and diffusion flags ("adm_fast.diffusion"), and the flags
given on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Dict, Optional

import torch

from .. import presets as _presets
from ..checkpoint import (CheckpointError, detect_preset, diffusion_flags_of, read_metadata,
                          read_state_dict)
from ..script_util import create_classifier, create_model, sr_create_model
from .flags import DEFAULTS, SCRIPT_DEFAULTS, InputError  # noqa: F401  (this module's vocabulary)

CONSTRUCT = {kind: list(inspect.signature(fn).parameters)
             for kind, fn in (("unet", create_model), ("sr", sr_create_model),
                              ("classifier", create_classifier))}
# Flags of the constructors that leave the state_dict's layout as it is.
_NOT_LAYOUT = {"use_fp16", "use_checkpoint", "dropout", "small_size", "classifier_use_fp16"}
_KIND_OF_CLASS = {"UNetModel": "unet", "SuperResModel": "sr", "EncoderUNetModel": "classifier"}


def _file_kind(path: str) -> str:
    """'safetensors', 'torch' (a torch.save zip or legacy pickle) or an InputError."""
    if path.endswith(".safetensors"):
        return "safetensors"
    if os.path.getsize(path) == 0:
        raise InputError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then a JSON object
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: a zip, or a pickle
        return "torch"
    raise InputError(f"{path} is not a checkpoint: neither safetensors nor a torch.save "
                     f"(.pt) file (it starts with {head!r})")


def inspect_checkpoint(path: str, what: str):
    """(metadata, state_dict of meta tensors): enough to tell the model apart
    without reading its weights."""
    if not path:
        raise InputError(f"--{what}_path is required")
    if not os.path.isfile(path):
        raise InputError(f"{what} checkpoint not found: {path}")
    if _file_kind(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        # the metadata as every reader takes it: under adm_fast.metadata_sha256
        meta = read_metadata(path)
        try:
            with safe_open(path, framework="pt") as f:
                sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                      for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable safetensors file: {e}") from None
        return meta, sd
    try:
        sd, meta = read_state_dict(path, device="meta")
    except CheckpointError:
        raise
    except Exception as e:  # torch.load's unpickler raises anything on a damaged file
        raise InputError(f"{path} is not a readable torch.save checkpoint "
                         f"({type(e).__name__}: {e})") from None
    return meta, sd


def stored_diffusion(meta: Dict[str, str], path: str) -> Dict:
    """The diffusion flags a checkpoint stores ({} when it stores none)."""
    try:
        return diffusion_flags_of(meta, path) or {}
    except CheckpointError as e:
        raise InputError(str(e)) from None


@dataclasses.dataclass
class Source:
    kind: str
    preset: Optional[_presets.Preset]
    flags: Dict  # guided-diffusion defaults < preset < the file's flags < flags given
    known: set  # the flags not left at guided-diffusion's defaults
    spec: object  # what load_checkpoint gets as preset=
    diffusion: Dict  # the diffusion flags the file stores


def _base_flags(path, meta, sd, preset_name, fallback):
    """(preset or None, flags from the preset and the file, from_meta, kind)."""
    preset, base, from_meta, kind = None, {}, False, None
    if preset_name:
        preset = _presets.get(preset_name)
    elif "adm_fast.class" in meta:
        from_meta, kind = True, _KIND_OF_CLASS.get(meta["adm_fast.class"])
        if kind is None:
            raise InputError(f"{path} holds an unknown model class {meta['adm_fast.class']}")
        try:
            base = json.loads(meta.get("adm_fast.flags", "{}"))
        except ValueError as e:
            raise InputError(f"{path}: metadata adm_fast.flags is not JSON ({e})") from None
        if not isinstance(base, dict):
            raise InputError(f"{path}: metadata adm_fast.flags must be a JSON object")
        preset = _presets.PRESETS.get(meta.get("adm_fast.preset", ""))
    else:
        try:
            preset = detect_preset(sd, path)
        except CheckpointError:
            if not fallback:
                raise
            kind, base = fallback.pop("kind"), fallback
    if preset is not None:
        kind, base = preset.kind, {**preset.flags, **base}
    base.pop("kind", None)
    return preset, base, from_meta, kind


def resolve(path: str, what: str, explicit: Dict, preset_name: Optional[str] = None,
            fallback: Optional[Dict] = None, keep_size: bool = False) -> Source:
    meta, sd = inspect_checkpoint(path, what)
    preset, base, from_meta, kind = _base_flags(path, meta, sd, preset_name, fallback)
    stored = stored_diffusion(meta, path)
    base = {**base, **{k: v for k, v in stored.items() if k != "timestep_respacing"}}
    changed = {k for k, v in explicit.items() if k in CONSTRUCT.get(kind, ()) and
               k not in _NOT_LAYOUT and v != base.get(k, DEFAULTS[k]) and
               not (keep_size and k == "image_size")}
    flags = {**DEFAULTS, **base, **{k: v for k, v in explicit.items()
                                   if not (keep_size and k == "image_size")}}
    if from_meta and not changed:
        spec = None
    elif preset is not None and not changed:
        spec = preset
    else:
        spec = {"kind": kind, **{k: flags[k] for k in CONSTRUCT.get(kind, ())}}
    return Source(kind, preset, flags, set(base) | set(explicit), spec, stored)
