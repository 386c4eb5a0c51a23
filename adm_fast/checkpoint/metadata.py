"""The metadata adm_fast writes into a safetensors checkpoint: its keys (each
defined here once), what each holds, and how it is checked.

  adm_fast.class      the model class (UNetModel, SuperResModel, EncoderUNetModel)
  adm_fast.config     JSON: its constructor arguments
  adm_fast.flags      JSON: the script flags it was built from (guided-diffusion's names)
  adm_fast.preset     the preset name, when it is one
  adm_fast.diffusion  JSON: guided-diffusion's diffusion flags it was trained with
                      (diffusion_steps, noise_schedule, learn_sigma, use_kl,
                      predict_xstart, rescale_timesteps, rescale_learned_sigmas,
                      timestep_respacing); read it with read_diffusion_flags
  adm_fast.classes    JSON: the class names, label i being classes[i]; for a model
                      without labels (an unconditional UNet), the classes of the
                      images it was trained on
  adm_fast.sha256     hex SHA-256 over [[name, dtype, shape], ...] (JSON, tensors
                      sorted by name) followed by each tensor's bytes in that
                      order: verified on load, so an edited header (a dtype or a
                      shape) or damaged data is refused rather than read as garbage
  adm_fast.metadata_sha256
                      hex SHA-256 over every other metadata entry, adm_fast.sha256
                      among them (JSON: [[key, value], ...] sorted by key):
                      verified whenever the metadata is read, so an edited, added
                      or removed entry (the config, the diffusion flags, the class
                      names, the tensors' checksum) is refused

Files written before adm_fast.metadata_sha256 existed carry adm_fast.sha256
alone: their tensors are verified as before and their metadata is read as it
is (load and save such a file again to cover it). Files without either (from
guided-diffusion or elsewhere) are read as they are; their metadata is still
type- and range-checked, as every file's is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from ..defaults import size_problem
from ..script_util import diffusion_defaults


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why."""


META_CLASS = "adm_fast.class"
META_CONFIG = "adm_fast.config"
META_FLAGS = "adm_fast.flags"
META_PRESET = "adm_fast.preset"
META_DIFFUSION = "adm_fast.diffusion"
META_CLASSES = "adm_fast.classes"
META_SHA256 = "adm_fast.sha256"
META_DIGEST = "adm_fast.metadata_sha256"

# The model classes a checkpoint may name, and the kind of model each is.
KIND_OF_CLASS = {"UNetModel": "unet", "SuperResModel": "sr", "EncoderUNetModel": "classifier"}
CLASS_OF_KIND = {kind: cls for cls, kind in KIND_OF_CLASS.items()}


def metadata_digest(meta: Mapping[str, str]) -> str:
    covered = sorted((k, v) for k, v in meta.items() if k != META_DIGEST)
    return hashlib.sha256(json.dumps(covered).encode()).hexdigest()


def check_metadata(meta: Mapping[str, str], path: str) -> None:
    """CheckpointError unless the metadata matches its adm_fast.metadata_sha256
    (files without one pass)."""
    want = meta.get(META_DIGEST)
    if want is not None and metadata_digest(meta) != want:
        raise CheckpointError(
            f"{path}: the metadata does not match the checksum adm_fast wrote "
            f"({META_DIGEST}): an entry (the model's config or flags, its diffusion flags, its "
            "class names...) was edited, added or removed after the file was written")


def loads(text: str):
    """json.loads, with JSON nested past the interpreter's recursion limit a
    ValueError like any other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_meta(meta: Mapping[str, str], key: str, path: str, kind: type):
    """The JSON value of metadata `key`, a `kind` (dict or list), or CheckpointError."""
    try:
        value = loads(meta[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata {key} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: metadata {key} must be a JSON "
                              f"{'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def checked_diffusion(flags: Mapping, where: str, complete: bool = False) -> dict:
    """The diffusion flags, type-checked: unknown names are an error, and so are
    absent ones when complete (what adm_fast writes has all of them; a file
    someone made with a few is read as it is)."""
    types = {k: type(v) for k, v in diffusion_defaults().items()}
    unknown = [k for k in flags if k not in types]
    if unknown:
        raise CheckpointError(f"{where}: unknown diffusion flag(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(types)})")
    missing = [k for k in types if k not in flags]
    if complete and missing:
        raise CheckpointError(f"{where}: diffusion flags lack {', '.join(missing)}")
    out = {k: flags[k] for k in types if k in flags}
    for k, t in types.items():
        if k not in out:
            continue
        v = out[k]
        if isinstance(v, bool) != (t is bool) or not isinstance(v, t) or (t is int and v < 1):
            raise CheckpointError(f"{where}: diffusion flag {k} must be "
                                  f"{'a positive int' if t is int else 'a ' + t.__name__}, "
                                  f"got {v!r}")
        if size_problem(k, v):  # diffusion_steps sizes the diffusion's tables
            raise CheckpointError(f"{where}: diffusion flag {size_problem(k, v)}")
    return out


def checked_classes(names, where: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names) \
            or len(set(names)) != len(names):
        raise CheckpointError(f"{where}: class names must be a list of distinct strings, "
                              f"got {names!r}")
    return list(names)


def diffusion_flags_of(meta: Mapping[str, str], path: str) -> dict | None:
    """The diffusion flags metadata stores (adm_fast.diffusion), checked, or None."""
    if META_DIFFUSION not in meta:
        return None
    return checked_diffusion(json_meta(meta, META_DIFFUSION, path, dict),
                             f"{path} ({META_DIFFUSION})")


def class_names_of(meta: Mapping[str, str], path: str) -> list[str] | None:
    """The class names metadata stores (adm_fast.classes), checked, or None."""
    if META_CLASSES not in meta:
        return None
    return checked_classes(json_meta(meta, META_CLASSES, path, list), f"{path} ({META_CLASSES})")


def model_flags_of(meta: Mapping[str, str], path: str) -> dict:
    """The script flags metadata stores (adm_fast.flags), or {}."""
    return json_meta(meta, META_FLAGS, path, dict) if META_FLAGS in meta else {}
