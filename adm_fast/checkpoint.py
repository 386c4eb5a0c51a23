"""Safe checkpoint I/O: guided-diffusion `.pt` files as released, safetensors.

Nothing here executes code from a file: `.pt` files are read with
`torch.load(weights_only=True)`, and a pickle carrying anything but tensors
and plain containers is refused. A checkpoint's preset is recognised from its
tensor names and shapes; when it fits none (or not the model asked for), one
short error says what the checkpoint is and how it differs.

The safetensors files adm_fast writes carry, as string metadata:
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

import errno
import hashlib
import inspect
import json
import os
import pickle
import struct
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import presets as _presets
from .defaults import size_problem, size_problems
from .models import EncoderUNetModel, SuperResModel, UNetModel
from .models.precision import apply_dtype
from .presets import Preset
from .script_util import create_from_flags, diffusion_defaults

_CLASSES = {c.__name__: c for c in (UNetModel, SuperResModel, EncoderUNetModel)}
_KIND = {"UNetModel": "unet", "SuperResModel": "sr", "EncoderUNetModel": "classifier"}
_META_CLASS, _META_CONFIG, _META_PRESET = "adm_fast.class", "adm_fast.config", "adm_fast.preset"
_META_FLAGS, _META_SHA = "adm_fast.flags", "adm_fast.sha256"
_META_DIGEST = "adm_fast.metadata_sha256"
META_DIFFUSION, META_CLASSES = "adm_fast.diffusion", "adm_fast.classes"
_SHOW = 3  # keys shown per category in a mismatch error
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

__all__ = ["CheckpointError", "UnsafeCheckpointError", "DiskFullError", "is_safetensors",
           "read_state_dict", "read_metadata", "read_diffusion_flags", "read_class_names",
           "check_fits", "detect_preset", "load_checkpoint", "save_checkpoint", "write_atomic",
           "write_error",
           "fsync_path", "META_DIFFUSION", "META_CLASSES"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """A .pt file that holds Python objects other than tensors."""


class DiskFullError(OSError):
    """A write that ran out of space (errno ENOSPC); the message names the file."""


def is_safetensors(path: str) -> bool:
    """By name, else by content: an 8-byte little-endian header length, then '{'."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# --- reading ---------------------------------------------------------------

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
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:12]))}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        return {k[len("module."):]: obj[k] for k in keys}
    return dict(obj)


def _tensor_bytes(t: Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(tensors: Mapping[str, Tensor]) -> str:
    names = sorted(tensors)
    h = hashlib.sha256(json.dumps(
        [[n, _ST_DTYPES.get(tensors[n].dtype, str(tensors[n].dtype)), list(tensors[n].shape)]
         for n in names]).encode())
    for n in names:
        h.update(_tensor_bytes(tensors[n]))
    return h.hexdigest()


def _metadata_digest(meta: Mapping[str, str]) -> str:
    covered = sorted((k, v) for k, v in meta.items() if k != _META_DIGEST)
    return hashlib.sha256(json.dumps(covered).encode()).hexdigest()


def _check_metadata(meta: Mapping[str, str], path: str) -> None:
    want = meta.get(_META_DIGEST)
    if want is not None and _metadata_digest(meta) != want:
        raise CheckpointError(
            f"{path}: the metadata does not match the checksum adm_fast wrote "
            f"({_META_DIGEST}): an entry (the model's config or flags, its diffusion flags, its "
            "class names...) was edited, added or removed after the file was written")


def _read_safetensors(path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            _check_metadata(meta, path)
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError and friends: a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    want = meta.get(_META_SHA)
    if want is not None and _digest(sd) != want:
        raise CheckpointError(
            f"{path}: the tensors do not match the checksum adm_fast wrote ({_META_SHA}): "
            "the file was modified (a dtype or shape in its header?) or damaged")
    return sd, meta


def read_state_dict(path: Union[str, os.PathLike], device="cpu") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(state_dict, metadata) from a .pt or .safetensors file, without running code.
    A safetensors file with adm_fast's checksums is verified: its metadata
    (adm_fast.metadata_sha256), then its tensors (adm_fast.sha256)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        sd, meta = _read_safetensors(path)
        if str(device) != "cpu":
            sd = {k: v.to(device) for k, v in sd.items()}
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
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_what_file(path, e)}") from None
    except Exception as e:  # zip, pickle and storage errors of a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_what_file(path, e)}") from None
    return _unwrap(obj, path), {}


def _what_file(path: str, error: BaseException) -> str:
    """What a file torch.load failed on holds, by its first bytes: torch.save
    writes a zip archive (a pickle in its legacy format). torch.load's own
    message only helps for those (for text it can be a bare number)."""
    with open(path, "rb") as f:
        head = f.read(64)
    said = str(error).split(". ")[0].splitlines()[0].strip() if str(error).strip() else ""
    said = said or type(error).__name__
    if not head:
        return "the file is empty (0 bytes)"
    if head[:4] == b"PK\x03\x04":
        return f"a damaged zip archive ({said})"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a damaged pickle ({said})"
    text = None
    for cut in range(4):  # the 64 bytes may end inside a character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            pass
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return (f"it is text (it starts with {text[:32]!r}), not a torch.save zip archive "
                "or pickle")
    return (f"an unknown format (it starts with {head[:8]!r}), not a torch.save zip archive "
            "or pickle")


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """A safetensors file's metadata from its header alone ({} for a .pt file),
    verified against adm_fast.metadata_sha256 when the file has one (the
    tensors are verified when they are read: read_state_dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not is_safetensors(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    _check_metadata(meta, path)
    return meta


def _loads(text: str):
    """json.loads, with JSON nested past the interpreter's recursion limit a
    ValueError like any other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_meta(meta: Mapping[str, str], key: str, path: str, kind: type):
    try:
        value = _loads(meta[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata {key} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: metadata {key} must be a JSON "
                              f"{'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def _diffusion_types() -> Dict[str, type]:
    return {k: type(v) for k, v in diffusion_defaults().items()}


def _checked_diffusion(flags: Mapping, where: str, complete: bool = False) -> Dict:
    """The diffusion flags, type-checked: unknown names are an error, and so are
    absent ones when complete (what adm_fast writes has all of them; a file
    someone made with a few is read as it is)."""
    types = _diffusion_types()
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


def read_diffusion_flags(path: Union[str, os.PathLike]) -> Optional[Dict]:
    """The diffusion flags (guided-diffusion's names) stored in an adm_fast
    checkpoint as metadata adm_fast.diffusion, or None when it has none."""
    path = os.fspath(path)
    return diffusion_flags_of(read_metadata(path), path)


def diffusion_flags_of(meta: Mapping[str, str], path: str) -> Optional[Dict]:
    """read_diffusion_flags for metadata already read."""
    if META_DIFFUSION not in meta:
        return None
    return _checked_diffusion(_json_meta(meta, META_DIFFUSION, path, dict),
                              f"{path} ({META_DIFFUSION})")


def _checked_classes(names, where: str) -> List[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names) \
            or len(set(names)) != len(names):
        raise CheckpointError(f"{where}: class names must be a list of distinct strings, "
                              f"got {names!r}")
    return list(names)


def read_class_names(path: Union[str, os.PathLike]) -> Optional[List[str]]:
    """The class names stored in an adm_fast checkpoint (label i is names[i]), or None."""
    path = os.fspath(path)
    meta = read_metadata(path)
    if META_CLASSES not in meta:
        return None
    return _checked_classes(_json_meta(meta, META_CLASSES, path, list), f"{path} ({META_CLASSES})")


# --- what a checkpoint is, and how it differs from a model -------------------

def _diff(sd_layout: Dict[str, Tuple[int, ...]], layout) -> Tuple[List[str], List[str], List[str]]:
    want = dict(layout)
    missing = [k for k in want if k not in sd_layout]
    unexpected = [k for k in sd_layout if k not in want]
    mis = [f"{k}: checkpoint {list(sd_layout[k])} vs model {list(want[k])}"
           for k in want if k in sd_layout and tuple(sd_layout[k]) != want[k]]
    return missing, unexpected, mis


def _shapes(sd: Mapping[str, Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _kind_of_shapes(shapes) -> Optional[str]:
    first = shapes.get("input_blocks.0.0.weight")
    if first is None or len(first) != 4:
        return None
    if any(k.startswith("output_blocks.") for k in shapes):
        return "sr" if first[1] == 6 else "unet"
    return "classifier" if any(k.startswith("out.") for k in shapes) else None


def _describe(meta: Mapping[str, str], shapes) -> Tuple[Optional[str], str]:
    """(kind, "a 16x16 UNet (64 channels, 10 classes, learned sigma)") from the
    file's own metadata when it has it, else from its tensors."""
    config, cls = None, meta.get(_META_CLASS)
    if cls in _CLASSES and _META_CONFIG in meta:
        try:
            config = _loads(meta[_META_CONFIG])
        except ValueError:
            pass
    if not isinstance(config, dict):
        kind = _kind_of_shapes(shapes)
        if kind is None:
            return None, "a state_dict of no known adm_fast/guided-diffusion model"
        first = shapes["input_blocks.0.0.weight"]
        label = shapes.get("label_emb.weight")
        config = {"model_channels": first[0], "num_classes": label[0] if label else None}
        if kind == "classifier":
            config["out_channels"] = next(s[0] for k, s in reversed(shapes.items())
                                          if k.startswith("out."))
        cls = {"unet": "UNetModel", "sr": "SuperResModel", "classifier": "EncoderUNetModel"}[kind]
    kind = _KIND[cls]
    size = config.get("image_size")
    name = {"unet": "UNet", "sr": "super-resolution UNet", "classifier": "noisy classifier"}[kind]
    parts = [f"{config.get('model_channels')} channels"]
    if kind == "classifier":
        parts.append(f"{config.get('out_channels')} classes")
    elif config.get("num_classes"):
        parts.append(f"{config['num_classes']} classes")
    else:
        parts.append("unconditional")
    if kind != "classifier" and config.get("out_channels") == 6:
        parts.append("learned sigma")
    if meta.get(_META_PRESET):
        parts.append(f"preset {meta[_META_PRESET]}")
    what = f"{size}x{size} {name}" if size else name
    article = "an" if str(size).startswith("8") or size in (11, 18) else "a"
    return kind, f"{article} {what} ({', '.join(parts)})"


def _closest(shapes, kind: Optional[str]):
    """The preset of the checkpoint's own kind whose layout differs least."""
    scored = []
    for name in _presets.names():
        if kind is not None and _presets.get(name).kind != kind:
            continue  # a classifier is never the closest thing to a UNet
        d = _diff(shapes, _presets.layout(name))
        scored.append((sum(map(len, d)), name, d))
    if not scored:
        return None, None
    _, name, d = min(scored, key=lambda s: s[0])
    return name, d


def _listing(title: str, items: List[str], inline: bool) -> List[str]:
    if not items:
        return []
    cut = len(items) > _SHOW
    if inline:
        more = f" and {len(items) - _SHOW} more" if cut else ""
        return [f"  {title} ({len(items)}): {', '.join(items[:_SHOW])}{more}"]
    return [f"  {title} ({len(items)}{f', the first {_SHOW}' if cut else ''}):"] + \
        [f"    {i}" for i in items[:_SHOW]]


def _mismatch_error(path: str, target: str, diff, shapes, meta: Mapping[str, str] = None,
                    asked: Optional[Mapping] = None) -> CheckpointError:
    meta = meta or {}
    kind, what = _describe(meta, shapes)
    lines = [f"{path} holds {what}, which does not fit {target}:"]
    if asked and _META_FLAGS in meta:
        try:
            own = _loads(meta[_META_FLAGS])
        except ValueError:
            own = {}
        changed = [f"--{k} {v} (the checkpoint's: {own[k]})" for k, v in asked.items()
                   if isinstance(own, dict) and k in own and own[k] != v]
        if changed:
            lines.append(f"  flags that differ from the checkpoint's: {', '.join(changed)}")
    titles = ("missing keys", "unexpected keys", "mis-shaped keys")
    for title, items, inline in zip(titles, diff, (True, True, False)):
        lines += _listing(title, items, inline)
    closest, closest_diff = _closest(shapes, kind)
    if closest is not None and not any(closest_diff):
        lines.append(f"  closest preset: {closest} (the checkpoint fits it exactly)")
    elif closest is not None and _META_CLASS not in meta:
        # A file that says what it is needs no guess; a bare state_dict may.
        lines.append(f"  closest preset: {closest} ({sum(map(len, closest_diff))} keys differ)")
    return CheckpointError("\n".join(lines))


def _model_layout(model: nn.Module):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, path: str,
               target: str) -> None:
    """Raise CheckpointError (what the state_dict is, its missing / unexpected /
    mis-shaped keys) unless it has exactly model's keys and shapes."""
    shapes = _shapes(state_dict)
    diff = _diff(shapes, _model_layout(model))
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
        _, diff = _closest(shapes, _kind_of_shapes(shapes))
        raise _mismatch_error(filename or "this state_dict", "any released preset",
                              diff or ([], [], []), shapes)
    stem = os.path.basename(filename).split(".")[0]
    return _presets.get(stem if stem in fits else fits[0])


# --- building the model a file describes -------------------------------------

_TYPES: Dict[str, Callable[[object], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "Optional[int]": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "Sequence[int]": lambda v: isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v),
    "Sequence[float]": lambda v: isinstance(v, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
}


def _least_size(config: Mapping) -> Tuple[int, int]:
    """(parameters, tensors) a model built from these constructor arguments
    has at least: the time embedding's second Linear, the label embedding, and
    in each res block of the encoder its 10 tensors and its second 3x3 conv
    (width x width x 9). Well below the real count, which only building tells."""
    base, blocks = config["model_channels"], config["num_res_blocks"]
    widths = [int(m * base) for m in config["channel_mult"]]
    params = 16 * base * base + blocks * sum(9 * w * w for w in widths)
    params += (config.get("num_classes") or 0) * 4 * base
    return params, 4 + 10 * blocks * len(widths)


def _model_from_meta(meta: Mapping[str, str], path: str,
                     weights: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """The model adm_fast.class / adm_fast.config describe (on the current
    device); with `weights`, refused before it is built when it needs more
    parameters or tensors than they hold."""
    name = meta[_META_CLASS]
    if name not in _CLASSES:
        raise CheckpointError(f"{path}: metadata {_META_CLASS} names an unknown model class "
                              f"{name!r}; expected one of {', '.join(_CLASSES)}")
    if _META_CONFIG not in meta:
        raise CheckpointError(f"{path}: metadata has {_META_CLASS} but no {_META_CONFIG}")
    config = _json_meta(meta, _META_CONFIG, path, dict)
    cls = _CLASSES[name]
    # SuperResModel forwards to UNetModel's arguments and records them.
    params = inspect.signature((UNetModel if cls is SuperResModel else cls).__init__).parameters
    params = {k: p for k, p in params.items() if k != "self"}
    unknown = sorted(set(config) - set(params))
    missing = [k for k, p in params.items() if p.default is p.empty and k not in config]
    bad = [f"{k}={config[k]!r} (expected {p.annotation})" for k, p in params.items()
           if k in config and not _TYPES.get(str(p.annotation), lambda v: True)(config[k])]
    problems = ([f"unknown arguments {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing arguments {', '.join(missing)}"] if missing else []) + bad
    if problems:
        raise CheckpointError(f"{path}: metadata {_META_CONFIG} does not describe a {name}: "
                              f"{'; '.join(problems)}")
    # Sizes are bounded before anything is built: building on the meta device
    # allocates nothing, but thousands of blocks still take minutes.
    too_big = size_problems(config)
    if too_big:
        raise CheckpointError(f"{path}: metadata {_META_CONFIG} does not build a {name}: "
                              f"{'; '.join(too_big)}")
    if weights is not None:
        defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
        least, tensors = _least_size({**defaults, **config})
        held = sum(t.numel() for t in weights.values())
        if least > held or tensors > len(weights):
            raise CheckpointError(
                f"{path}: metadata {_META_CONFIG} describes a {name} of at least {least:,} "
                f"parameters in {tensors:,} tensors, but the file holds {held:,} in "
                f"{len(weights):,}: the metadata does not describe these weights")
    try:
        return cls(**config)
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: metadata {_META_CONFIG} does not build a {name}: "
                              f"{first}") from None


def _build(spec, meta: Dict[str, str], path: str, weights: Mapping[str, Tensor]):
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
        model = _model_from_meta(meta, path, weights)
        if _META_FLAGS in meta:
            model.flags = _json_meta(meta, _META_FLAGS, path, dict)
        return model, _presets.PRESETS.get(meta.get(_META_PRESET, ""))


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtypes(sd: Mapping[str, Tensor], path: str) -> None:
    """A model's weights are floating point; anything else fails in
    load_state_dict with one traceback line per tensor."""
    bad = [k for k, v in sd.items() if v.dtype not in _WEIGHT_DTYPES]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: tensor {bad[0]} has dtype "
                              f"{str(sd[bad[0]].dtype).replace('torch.', '')}{more}; a model's "
                              "weights are float32, float16, bfloat16 or float64")


def load_checkpoint(path: Union[str, os.PathLike], preset=None, device=None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a guided-diffusion `.pt` or an adm_fast `.safetensors` checkpoint.

    preset: a preset name, a Preset, a flags dict ({"kind": "unet", ...}), or
    None to use the file's metadata (safetensors written by save_checkpoint)
    or recognise the preset from the tensors' names and shapes.
    device: where the model goes (default cpu). dtype: None/float32 for fp32,
    float16/bfloat16 for guided-diffusion's use_fp16 recipe in that dtype.
    Returns the model in eval mode, with `.preset` set when one applies and,
    from an adm_fast file, `.diffusion_flags` and `.class_names` (or None).
    """
    path = os.fspath(path)
    if preset is not None and not isinstance(preset, (str, Preset, Mapping)):
        raise CheckpointError(f"load_checkpoint({path!r}): preset must be a name, a Preset or "
                              f"a flags dict, got {type(preset).__name__} {preset!r}")
    sd, meta = read_state_dict(path)
    _check_dtypes(sd, path)
    shapes = _shapes(sd)
    if preset is None and _META_CLASS not in meta:
        preset = detect_preset(sd, path)
    model, found = _build(preset, meta, path, sd)
    target = (f"preset {found.name}" if found else
              f"the model described by {'its metadata' if preset is None else 'the flags given'}")
    diff = _diff(shapes, _model_layout(model))
    if any(diff):
        asked = preset.flags if isinstance(preset, Preset) else (
            {k: v for k, v in preset.items() if k != "kind"} if isinstance(preset, Mapping)
            else None)
        raise _mismatch_error(path, target, diff, shapes, meta, asked)
    diffusion = read_diffusion_flags(path) if META_DIFFUSION in meta else None
    classes = (_checked_classes(_json_meta(meta, META_CLASSES, path, list),
                                f"{path} ({META_CLASSES})") if META_CLASSES in meta else None)
    model.load_state_dict(sd, strict=True, assign=True)
    apply_dtype(model, dtype)
    model.preset, model.diffusion_flags, model.class_names = found, diffusion, classes
    return model.to(device or "cpu").eval()


# --- writing -------------------------------------------------------------------

class _Recording:
    """A file whose first failing write is remembered: torch.save reports a
    failed write as '[enforce fail ...] unexpected pos', hiding the OSError."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_error(path: str, exc: BaseException, recorded: Optional[OSError] = None) -> OSError:
    """The OSError to raise for a failed write of `path`: DiskFullError when
    the cause (exc, its chain, or `recorded`) is ENOSPC/EDQUOT."""
    seen, e = [], exc
    while e is not None and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    oserr = recorded or next((x for x in seen if isinstance(x, OSError)), None)
    code = getattr(oserr, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        where = os.path.dirname(os.path.abspath(path))
        return DiskFullError(errno.ENOSPC, f"disk full: cannot write {path} (no space left on "
                             f"the device holding {where}); free space and run again")
    detail = oserr.strerror if oserr is not None and oserr.strerror else str(exc)
    return OSError(code or errno.EIO, f"cannot write {path}: {detail}")


def write_atomic(path: Union[str, os.PathLike], write: Callable) -> None:
    """Write a file through write(f) (f: a binary file) to a temporary name
    beside it, flush it to disk and rename it over `path`: an interrupted write
    leaves no truncated file behind, only a `.tmp<pid>` that nothing reads.
    A full disk raises DiskFullError, any other failed write an OSError that
    names the file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise write_error(path, e, f.error if f is not None else None) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_safetensors(f, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    # The safetensors format, streamed: header length (u64 LE), the JSON header
    # padded to 8 bytes, then the tensors back to back. Wider dtypes first keep
    # every tensor aligned to its element size, as safetensors itself does.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"save_checkpoint: {name} has dtype {t.dtype}, which safetensors "
                            "does not store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(meta)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
        f.write(_tensor_bytes(tensors[name]).data)


def _num_labels(model: nn.Module) -> Optional[int]:
    if isinstance(model, EncoderUNetModel):
        return model.out_channels
    return getattr(model, "num_classes", None)


def _metadata(model: nn.Module, diffusion, classes) -> Dict[str, str]:
    cls = type(model).__name__
    meta = {_META_CLASS: cls, _META_CONFIG: json.dumps(model.config)}
    if getattr(model, "preset", None) is not None:
        meta[_META_PRESET] = model.preset.name
    if getattr(model, "flags", None) is not None:
        meta[_META_FLAGS] = json.dumps(model.flags)
    if diffusion is not None:
        if not isinstance(diffusion, Mapping):
            raise TypeError(f"save_checkpoint: diffusion must be a dict of diffusion flags, "
                            f"got {type(diffusion).__name__}")
        meta[META_DIFFUSION] = json.dumps(_checked_diffusion(diffusion, "save_checkpoint",
                                                             complete=True))
    if classes is not None:
        names = _checked_classes(classes, "save_checkpoint")
        labels = _num_labels(model)
        # A model without labels may still name the classes of its training
        # images, so that a sampler can tell whether a guiding classifier fits it.
        if labels is not None and len(names) > labels:
            raise CheckpointError(f"save_checkpoint: {len(names)} class names for a model with "
                                  f"{labels} class labels")
        meta[META_CLASSES] = json.dumps(names)
    return meta


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike],
                    state_dict: Optional[Mapping[str, Tensor]] = None,
                    diffusion: Optional[Mapping] = None,
                    classes: Optional[Sequence[str]] = None) -> None:
    """Write the model's weights (or `state_dict`, weights for the same model,
    e.g. an EMA) as safetensors, with what rebuilds it (class, constructor
    arguments, script flags, preset), the diffusion flags it goes with
    (`diffusion`: guided-diffusion's diffusion flags, all of them), its class
    names (`classes`, label i = classes[i]), a checksum of its tensors and one
    of the metadata itself (see the module's docstring), as metadata.
    diffusion and classes default to the model's own `.diffusion_flags` /
    `.class_names` (set by load_checkpoint). The file is written atomically
    (write_atomic)."""
    path = os.fspath(path)
    cls = type(model).__name__
    if cls not in _CLASSES or not hasattr(model, "config"):
        raise TypeError(f"save_checkpoint takes an adm_fast model, got {cls}")
    if diffusion is None:
        diffusion = getattr(model, "diffusion_flags", None)
    if classes is None:
        classes = getattr(model, "class_names", None)
    meta = _metadata(model, diffusion, classes)
    own = model.state_dict()
    if state_dict is not None:
        shapes = _shapes(state_dict)
        diff = _diff(shapes, [(k, tuple(v.shape)) for k, v in own.items()])
        if any(diff):
            raise _mismatch_error(path, f"the {cls} it is saved for", diff, shapes)
        own = state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in own.items()}
    meta[_META_SHA] = _digest(tensors)
    meta[_META_DIGEST] = _metadata_digest(meta)
    write_atomic(path, lambda f: _write_safetensors(f, tensors, meta))


def fsync_path(path: str) -> None:
    """Flush a written file (or a directory's entries) to disk, so that a
    rename after it never exposes a file whose data a crash could still lose."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
