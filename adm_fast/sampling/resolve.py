"""What a checkpoint is: the model kind and the flags to build and sample it
with, from the file read once (open_source), which the loader then takes.

Flags come, lowest to highest priority, from guided-diffusion's defaults, the
preset (recognised from the tensors, named in an adm_fast file, or given with
--preset), an adm_fast safetensors file's own model flags
("adm_fast.flags") and diffusion flags ("adm_fast.diffusion"), and the flags
given on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

from .. import presets as _presets
from ..checkpoint import CheckpointError, CheckpointFile, detect_preset, diffusion_flags_of
from ..checkpoint.formats import read_checkpoint, sniff
from ..checkpoint.metadata import KIND_OF_CLASS, META_CLASS, META_PRESET, model_flags_of
from ..script_util import create_classifier, create_model, sr_create_model
from .flags import DEFAULTS, SCRIPT_DEFAULTS, InputError  # noqa: F401  (this module's vocabulary)

CONSTRUCT = {kind: list(inspect.signature(fn).parameters)
             for kind, fn in (("unet", create_model), ("sr", sr_create_model),
                              ("classifier", create_classifier))}
# Flags of the constructors that leave the state_dict's layout as it is.
_NOT_LAYOUT = {"use_fp16", "use_checkpoint", "dropout", "small_size", "classifier_use_fp16"}


def open_source(path: str, what: str) -> CheckpointFile:
    """The checkpoint at --{what}_path, read once (tensors, metadata, both
    verified, and the file's identity): everything after this takes it."""
    if not path:
        raise InputError(f"--{what}_path is required")
    if not os.path.isfile(path):
        raise InputError(f"{what} checkpoint not found: {path}")
    with open(path, "rb") as f:
        kind = sniff(f, path)
        if kind is None:
            if os.fstat(f.fileno()).st_size == 0:
                raise InputError(f"{path} is empty (0 bytes), not a checkpoint")
            f.seek(0)
            raise InputError(f"{path} is not a checkpoint: neither safetensors nor a torch.save "
                             f"(.pt) file (it starts with {f.read(16)!r})")
        return read_checkpoint(f, path, kind, identify=True)


def stored_diffusion(meta: dict[str, str], path: str) -> dict:
    """The diffusion flags a checkpoint stores ({} when it stores none)."""
    try:
        return diffusion_flags_of(meta, path) or {}
    except CheckpointError as e:
        raise InputError(str(e)) from None


@dataclasses.dataclass
class Source:
    kind: str
    preset: _presets.Preset | None
    flags: dict  # guided-diffusion defaults < preset < the file's flags < flags given
    known: set  # the flags not left at guided-diffusion's defaults
    spec: object  # what load_checkpoint gets as preset=
    diffusion: dict  # the diffusion flags the file stores
    file: CheckpointFile  # what load_checkpoint gets instead of the path: read once


def _base_flags(path, meta, sd, preset_name, fallback):
    """(preset or None, flags from the preset and the file, from_meta, kind)."""
    preset, base, from_meta, kind = None, {}, False, None
    if preset_name:
        preset = _presets.get(preset_name)
    elif META_CLASS in meta:
        from_meta, kind = True, KIND_OF_CLASS.get(meta[META_CLASS])
        if kind is None:
            raise InputError(f"{path} holds an unknown model class {meta[META_CLASS]}")
        base = model_flags_of(meta, path)
        preset = _presets.PRESETS.get(meta.get(META_PRESET, ""))
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


def resolve(path: str, what: str, explicit: dict, preset_name: str | None = None,
            fallback: dict | None = None, keep_size: bool = False) -> Source:
    file = open_source(path, what)
    meta = file.metadata
    preset, base, from_meta, kind = _base_flags(path, meta, file.state_dict, preset_name,
                                                fallback)
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
    return Source(kind, preset, flags, set(base) | set(explicit), spec, stored, file)
