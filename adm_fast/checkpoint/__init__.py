"""Safe checkpoint I/O: guided-diffusion `.pt` files as released, safetensors.

Nothing here executes code from a file (formats.py). A checkpoint's preset is
recognised from its tensor names and shapes; when it fits none (or not the
model asked for), one short error says what the checkpoint is and how it
differs (diagnose.py). The safetensors files adm_fast writes carry what
rebuilds the model, its diffusion flags, class names and checksums as
metadata (metadata.py); the model is built from them, or from a preset or
flags (build.py). Files are written through adm_fast.io (atomically).

  formats.py   reading .pt (weights_only) and safetensors, the tensors' checksum
  metadata.py  the metadata keys, what each holds, how it is checked
  diagnose.py  presets recognised, mismatches explained
  build.py     the model a file describes, its arguments checked against a schema
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..io import DiskFullError, atomic_write, is_safetensors
from ..models import EncoderUNetModel
from ..models.precision import apply_dtype
from ..presets import Preset
from .build import MODEL_CLASSES, build, check_dtypes
from .diagnose import check_fits, detect_preset, diff, mismatch_error, model_layout, shapes_of
from .formats import (
    CheckpointFile,
    UnsafeCheckpointError,
    digest,
    open_checkpoint,
    read_metadata,
    read_state_dict,
    write_safetensors,
)
from .metadata import (
    META_CLASS,
    META_CLASSES,
    META_CONFIG,
    META_DIFFUSION,
    META_DIGEST,
    META_FLAGS,
    META_PRESET,
    META_SHA256,
    CheckpointError,
    checked_classes,
    checked_diffusion,
    class_names_of,
    diffusion_flags_of,
    metadata_digest,
)

__all__ = ["CheckpointError", "UnsafeCheckpointError", "DiskFullError", "CheckpointFile",
           "is_safetensors", "open_checkpoint", "read_state_dict", "read_metadata",
           "read_diffusion_flags", "read_class_names", "diffusion_flags_of", "check_fits",
           "detect_preset", "load_checkpoint", "save_checkpoint", "META_DIFFUSION",
           "META_CLASSES"]


def read_diffusion_flags(path: str | os.PathLike) -> dict | None:
    """The diffusion flags (guided-diffusion's names) stored in an adm_fast
    checkpoint as metadata adm_fast.diffusion, or None when it has none."""
    path = os.fspath(path)
    return diffusion_flags_of(read_metadata(path), path)


def read_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names stored in an adm_fast checkpoint (label i is names[i]), or None."""
    path = os.fspath(path)
    return class_names_of(read_metadata(path), path)


def load_checkpoint(source: str | os.PathLike | CheckpointFile, preset=None, device=None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a guided-diffusion `.pt` or an adm_fast `.safetensors` checkpoint.

    source: its path, or the CheckpointFile read from it already (open_checkpoint),
    which is then not read again.
    preset: a preset name, a Preset, a flags dict ({"kind": "unet", ...}), or
    None to use the file's metadata (safetensors written by save_checkpoint)
    or recognise the preset from the tensors' names and shapes.
    device: where the model goes (default cpu). dtype: None/float32 for fp32,
    float16/bfloat16 for guided-diffusion's use_fp16 recipe in that dtype.
    Returns the model in eval mode, with `.preset` set when one applies and,
    from an adm_fast file, `.diffusion_flags` and `.class_names` (or None).
    """
    path = source.path if isinstance(source, CheckpointFile) else os.fspath(source)
    if preset is not None and not isinstance(preset, (str, Preset, Mapping)):
        raise CheckpointError(f"load_checkpoint({path!r}): preset must be a name, a Preset or "
                              f"a flags dict, got {type(preset).__name__} {preset!r}")
    ckpt = source if isinstance(source, CheckpointFile) else open_checkpoint(path)
    sd, meta = ckpt.state_dict, ckpt.metadata
    check_dtypes(sd, path)
    shapes = shapes_of(sd)
    if preset is None and META_CLASS not in meta:
        preset = detect_preset(sd, path)
    model, found = build(preset, meta, path, sd)
    target = (f"preset {found.name}" if found else
              f"the model described by {'its metadata' if preset is None else 'the flags given'}")
    differences = diff(shapes, model_layout(model))
    if any(differences):
        asked = preset.flags if isinstance(preset, Preset) else (
            {k: v for k, v in preset.items() if k != "kind"} if isinstance(preset, Mapping)
            else None)
        raise mismatch_error(path, target, differences, shapes, meta, asked)
    diffusion = diffusion_flags_of(meta, path)
    classes = class_names_of(meta, path)
    model.load_state_dict(sd, strict=True, assign=True)
    apply_dtype(model, dtype)
    model.preset, model.diffusion_flags, model.class_names = found, diffusion, classes
    return model.to(device or "cpu").eval()


def _num_labels(model: nn.Module) -> int | None:
    if isinstance(model, EncoderUNetModel):
        return model.out_channels
    return getattr(model, "num_classes", None)


def _metadata(model: nn.Module, diffusion, classes) -> dict[str, str]:
    meta = {META_CLASS: type(model).__name__, META_CONFIG: json.dumps(model.config)}
    if getattr(model, "preset", None) is not None:
        meta[META_PRESET] = model.preset.name
    if getattr(model, "flags", None) is not None:
        meta[META_FLAGS] = json.dumps(model.flags)
    if diffusion is not None:
        if not isinstance(diffusion, Mapping):
            raise TypeError(f"save_checkpoint: diffusion must be a dict of diffusion flags, "
                            f"got {type(diffusion).__name__}")
        meta[META_DIFFUSION] = json.dumps(checked_diffusion(diffusion, "save_checkpoint",
                                                            complete=True))
    if classes is not None:
        names = checked_classes(classes, "save_checkpoint")
        labels = _num_labels(model)
        # A model without labels may still name the classes of its training
        # images, so that a sampler can tell whether a guiding classifier fits it.
        if labels is not None and len(names) > labels:
            raise CheckpointError(f"save_checkpoint: {len(names)} class names for a model with "
                                  f"{labels} class labels")
        meta[META_CLASSES] = json.dumps(names)
    return meta


def save_checkpoint(model: nn.Module, path: str | os.PathLike,
                    state_dict: Mapping[str, Tensor] | None = None,
                    diffusion: Mapping | None = None,
                    classes: Sequence[str] | None = None) -> None:
    """Write the model's weights (or `state_dict`, weights for the same model,
    e.g. an EMA) as safetensors, with what rebuilds it (class, constructor
    arguments, script flags, preset), the diffusion flags it goes with
    (`diffusion`: guided-diffusion's diffusion flags, all of them), its class
    names (`classes`, label i = classes[i]), a checksum of its tensors and one
    of the metadata itself (metadata.py), as metadata.
    diffusion and classes default to the model's own `.diffusion_flags` /
    `.class_names` (set by load_checkpoint). The file is written atomically
    (adm_fast.io.atomic_write): a full disk raises DiskFullError."""
    path = os.fspath(path)
    cls = type(model).__name__
    if cls not in MODEL_CLASSES or not hasattr(model, "config"):
        raise TypeError(f"save_checkpoint takes an adm_fast model, got {cls}")
    if diffusion is None:
        diffusion = getattr(model, "diffusion_flags", None)
    if classes is None:
        classes = getattr(model, "class_names", None)
    meta = _metadata(model, diffusion, classes)
    own = model.state_dict()
    if state_dict is not None:
        shapes = shapes_of(state_dict)
        differences = diff(shapes, [(k, tuple(v.shape)) for k, v in own.items()])
        if any(differences):
            raise mismatch_error(path, f"the {cls} it is saved for", differences, shapes)
        own = state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in own.items()}
    meta[META_SHA256] = digest(tensors)
    meta[META_DIGEST] = metadata_digest(meta)
    atomic_write(path, lambda f: write_safetensors(f, tensors, meta), hint=True)
