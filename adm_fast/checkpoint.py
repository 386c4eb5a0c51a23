"""Safe checkpoint I/O: guided-diffusion `.pt` files as released, safetensors.

Nothing here executes code from a file: `.pt` files are read with
`torch.load(weights_only=True)`, and a pickle carrying anything but tensors
and plain containers is refused. A checkpoint's preset is recognised from its
tensor names and shapes; when it fits none (or not the one asked for), one
error lists the missing, unexpected and mis-shaped keys against the closest
preset.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import presets as _presets
from .models import EncoderUNetModel, SuperResModel, UNetModel
from .presets import Preset
from .script_util import create_from_flags

_CLASSES = {c.__name__: c for c in (UNetModel, SuperResModel, EncoderUNetModel)}
_META_CLASS, _META_CONFIG, _META_PRESET = "adm_fast.class", "adm_fast.config", "adm_fast.preset"
_META_FLAGS = "adm_fast.flags"
_SHOW = 12  # keys listed per category in a mismatch error


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """A .pt file that holds Python objects other than tensors."""


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj, path: str) -> Dict[str, Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        # A training checkpoint wrapping the weights beside other state.
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to "
                              f"tensors), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:_SHOW]))}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        return {k[len("module."):]: obj[k] for k in keys}
    return dict(obj)


def read_state_dict(path: Union[str, os.PathLike], device="cpu") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(state_dict, metadata) from a .pt or .safetensors file, without running code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return _unwrap(sd, path), meta
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        if lines:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors, and "
                f"unpickling them could run code; adm_fast loads only plain state_dicts "
                f"({lines[0]})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    return _unwrap(obj, path), {}


def _diff(sd_layout: Dict[str, Tuple[int, ...]], layout) -> Tuple[List[str], List[str], List[str]]:
    want = dict(layout)
    missing = [k for k in want if k not in sd_layout]
    unexpected = [k for k in sd_layout if k not in want]
    mis = [f"{k}: checkpoint {list(sd_layout[k])} vs model {list(want[k])}"
           for k in want if k in sd_layout and tuple(sd_layout[k]) != want[k]]
    return missing, unexpected, mis


def _shapes(sd: Mapping[str, Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _listing(title: str, items: List[str]) -> List[str]:
    if not items:
        return []
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return [f"  {title} ({len(items)}){more}:"] + [f"    {i}" for i in items[:_SHOW]]


def _closest(shapes) -> Tuple[str, Tuple[List[str], List[str], List[str]]]:
    scored = []
    for name in _presets.names():
        d = _diff(shapes, _presets.layout(name))
        scored.append((sum(map(len, d)), name, d))
    _, name, d = min(scored, key=lambda s: s[0])
    return name, d


def _mismatch_error(path: str, target: str, diff, shapes) -> CheckpointError:
    lines = [f"{path} does not fit {target}:"]
    for title, items in zip(("missing keys", "unexpected keys", "mis-shaped keys"), diff):
        lines += _listing(title, items)
    closest, closest_diff = _closest(shapes)
    if any(closest_diff):
        lines.append(f"  closest preset: {closest} ({sum(map(len, closest_diff))} keys differ)")
    else:
        lines.append(f"  closest preset: {closest} (the checkpoint fits it exactly)")
    return CheckpointError("\n".join(lines))


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, path: str,
               target: str) -> None:
    """Raise CheckpointError (missing / unexpected / mis-shaped keys and the
    closest preset) unless state_dict has exactly model's keys and shapes."""
    shapes = _shapes(state_dict)
    diff = _diff(shapes, [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    if any(diff):
        raise _mismatch_error(path, target, diff, shapes)


def detect_preset(state_dict: Mapping[str, Tensor], filename: str = "") -> Preset:
    """The preset whose layout this state_dict has (meta tensors are fine).

    Several presets share a layout (the LSUN models and the unconditional 256
    model differ only in dropout); a file name like `lsun_cat.pt` picks among
    them, else the first in PRESETS order is returned.
    """
    shapes = _shapes(state_dict)
    fits = [n for n in _presets.names() if not any(_diff(shapes, _presets.layout(n)))]
    if not fits:
        _, diff = _closest(shapes)
        raise _mismatch_error(filename or "this state_dict", "any released preset", diff, shapes)
    stem = os.path.basename(filename).split(".")[0]
    return _presets.get(stem if stem in fits else fits[0])


def apply_dtype(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """None/fp32: all fp32. fp16/bf16: guided-diffusion's use_fp16 recipe (the
    torso's convolutions in that dtype; embeddings, norms and head in fp32)."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be None, float32, float16 or bfloat16, got {dtype}")
    model.float()
    if dtype == torch.float16:
        model.convert_to_fp16()
    elif dtype == torch.bfloat16:
        model.convert_to_bf16()
    return model


def _build(spec, meta: Dict[str, str]):
    """(model on meta, preset or None) for a preset name/Preset/flags dict, or
    from the file's own metadata when spec is None."""
    with torch.device("meta"):
        if isinstance(spec, Preset):
            return spec.build(device="meta"), spec
        if isinstance(spec, str):
            preset = _presets.get(spec)
            return preset.build(device="meta"), preset
        if isinstance(spec, Mapping):
            flags = dict(spec)
            if "kind" not in flags:
                raise ValueError("a flags dict needs 'kind': 'unet', 'classifier' or 'sr'")
            return create_from_flags(flags.pop("kind"), flags), None
        if _META_CLASS in meta and _META_CONFIG in meta:
            cls = _CLASSES[meta[_META_CLASS]]
            config = json.loads(meta[_META_CONFIG])
            preset = _presets.PRESETS.get(meta.get(_META_PRESET, ""))
            model = cls(**config)
            if _META_FLAGS in meta:
                model.flags = json.loads(meta[_META_FLAGS])
            return model, preset
    raise TypeError(f"preset must be a name, a Preset or a flags dict, got {type(spec).__name__}")


def load_checkpoint(path: Union[str, os.PathLike], preset=None, device=None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a guided-diffusion `.pt` or an adm_fast `.safetensors` checkpoint.

    preset: a preset name, a Preset, a flags dict ({"kind": "unet", ...}), or
    None to use the file's metadata (safetensors written by save_checkpoint)
    or recognise the preset from the tensors' names and shapes.
    device: where the model goes (default cpu). dtype: None/float32 for fp32,
    float16/bfloat16 for guided-diffusion's use_fp16 recipe in that dtype.
    Returns the model in eval mode, with `.preset` set when one applies.
    """
    path = os.fspath(path)
    sd, meta = read_state_dict(path)
    shapes = _shapes(sd)
    if preset is None and _META_CLASS not in meta:
        preset = detect_preset(sd, path)
    model, found = _build(preset, meta)
    target = (f"preset {found.name}" if found else
              f"the model described by {'its metadata' if preset is None else 'the flags given'}")
    diff = _diff(shapes, [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    if any(diff):
        raise _mismatch_error(path, target, diff, shapes)
    model.load_state_dict(sd, strict=True, assign=True)
    apply_dtype(model, dtype)
    model.preset = found
    return model.to(device or "cpu").eval()


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> None:
    """Write the model's weights (or `state_dict`, weights for the same model,
    e.g. an EMA) as safetensors, with what rebuilds it (class, constructor
    arguments, script flags, preset) as metadata. The file is written to a
    temporary name, flushed to disk and renamed, so an interrupted save leaves
    no truncated checkpoint behind."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    cls = type(model).__name__
    if cls not in _CLASSES or not hasattr(model, "config"):
        raise TypeError(f"save_checkpoint takes an adm_fast model, got {cls}")
    meta = {_META_CLASS: cls, _META_CONFIG: json.dumps(model.config)}
    preset = getattr(model, "preset", None)
    if preset is not None:
        meta[_META_PRESET] = preset.name
    flags = getattr(model, "flags", None)
    if flags is not None:
        meta[_META_FLAGS] = json.dumps(flags)
    own = model.state_dict()
    if state_dict is not None:
        diff = _diff(_shapes(state_dict), [(k, tuple(v.shape)) for k, v in own.items()])
        if any(diff):
            raise _mismatch_error(path, f"the {cls} it is saved for", diff,
                                  _shapes(state_dict))
        own = state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in own.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_path(path: str) -> None:
    """Flush a written file to disk, so that a rename after it never exposes
    a file whose data a crash could still lose."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
