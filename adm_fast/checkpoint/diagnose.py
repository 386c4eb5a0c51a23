"""What a checkpoint is, and how it differs from the model asked for: a
preset recognised from the tensors' names and shapes, and, when it fits none
(or not the model asked for), one short error that says what the checkpoint
holds, its missing / unexpected / mis-shaped keys and the closest preset."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from torch import Tensor, nn

from .. import presets as _presets
from ..presets import Preset
from .metadata import (
    CLASS_OF_KIND,
    KIND_OF_CLASS,
    META_CLASS,
    META_CONFIG,
    META_FLAGS,
    META_PRESET,
    CheckpointError,
    loads,
)

_SHOW = 3  # keys shown per category in a mismatch error


def diff(sd_layout: dict[str, tuple[int, ...]], layout) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of a state_dict's layout against a model's."""
    want = dict(layout)
    missing = [k for k in want if k not in sd_layout]
    unexpected = [k for k in sd_layout if k not in want]
    mis = [f"{k}: checkpoint {list(sd_layout[k])} vs model {list(want[k])}"
           for k in want if k in sd_layout and tuple(sd_layout[k]) != want[k]]
    return missing, unexpected, mis


def shapes_of(sd: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def model_layout(model: nn.Module):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _kind_of_shapes(shapes) -> str | None:
    first = shapes.get("input_blocks.0.0.weight")
    if first is None or len(first) != 4:
        return None
    if any(k.startswith("output_blocks.") for k in shapes):
        return "sr" if first[1] == 6 else "unet"
    return "classifier" if any(k.startswith("out.") for k in shapes) else None


def _describe(meta: Mapping[str, str], shapes) -> tuple[str | None, str]:
    """(kind, "a 16x16 UNet (64 channels, 10 classes, learned sigma)") from the
    file's own metadata when it has it, else from its tensors."""
    config, cls = None, meta.get(META_CLASS)
    if cls in KIND_OF_CLASS and META_CONFIG in meta:
        with contextlib.suppress(ValueError):
            config = loads(meta[META_CONFIG])
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
        cls = CLASS_OF_KIND[kind]
    kind = KIND_OF_CLASS[cls]
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
    if meta.get(META_PRESET):
        parts.append(f"preset {meta[META_PRESET]}")
    what = f"{size}x{size} {name}" if size else name
    article = "an" if str(size).startswith("8") or size in (11, 18) else "a"
    return kind, f"{article} {what} ({', '.join(parts)})"


def _closest(shapes, kind: str | None):
    """The preset of the checkpoint's own kind whose layout differs least."""
    scored = []
    for name in _presets.names():
        if kind is not None and _presets.get(name).kind != kind:
            continue  # a classifier is never the closest thing to a UNet
        d = diff(shapes, _presets.layout(name))
        scored.append((sum(map(len, d)), name, d))
    if not scored:
        return None, None
    _, name, d = min(scored, key=lambda s: s[0])
    return name, d


def _listing(title: str, items: list[str], inline: bool) -> list[str]:
    if not items:
        return []
    cut = len(items) > _SHOW
    if inline:
        more = f" and {len(items) - _SHOW} more" if cut else ""
        return [f"  {title} ({len(items)}): {', '.join(items[:_SHOW])}{more}"]
    return [f"  {title} ({len(items)}{f', the first {_SHOW}' if cut else ''}):"] + \
        [f"    {i}" for i in items[:_SHOW]]


def mismatch_error(path: str, target: str, differences, shapes,
                   meta: Mapping[str, str] | None = None,
                   asked: Mapping | None = None) -> CheckpointError:
    """The error for a state_dict (of `shapes`) that does not fit `target`."""
    meta = meta or {}
    kind, what = _describe(meta, shapes)
    lines = [f"{path} holds {what}, which does not fit {target}:"]
    if asked and META_FLAGS in meta:
        try:
            own = loads(meta[META_FLAGS])
        except ValueError:
            own = {}
        changed = [f"--{k} {v} (the checkpoint's: {own[k]})" for k, v in asked.items()
                   if isinstance(own, dict) and k in own and own[k] != v]
        if changed:
            lines.append(f"  flags that differ from the checkpoint's: {', '.join(changed)}")
    titles = ("missing keys", "unexpected keys", "mis-shaped keys")
    for title, items, inline in zip(titles, differences, (True, True, False)):
        lines += _listing(title, items, inline)
    closest, closest_diff = _closest(shapes, kind)
    if closest is not None and not any(closest_diff):
        lines.append(f"  closest preset: {closest} (the checkpoint fits it exactly)")
    elif closest is not None and META_CLASS not in meta:
        # A file that says what it is needs no guess; a bare state_dict may.
        lines.append(f"  closest preset: {closest} ({sum(map(len, closest_diff))} keys differ)")
    return CheckpointError("\n".join(lines))


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, path: str,
               target: str) -> None:
    """Raise CheckpointError (what the state_dict is, its missing / unexpected /
    mis-shaped keys) unless it has exactly model's keys and shapes."""
    shapes = shapes_of(state_dict)
    differences = diff(shapes, model_layout(model))
    if any(differences):
        raise mismatch_error(path, target, differences, shapes)


def detect_preset(state_dict: Mapping[str, Tensor], filename: str = "") -> Preset:
    """The preset whose layout this state_dict has (meta tensors are fine).

    Several presets share a layout (the LSUN models and the unconditional 256
    model differ only in dropout); a file name like `lsun_cat.pt` picks among
    them, else the first in PRESETS order is returned.
    """
    shapes = shapes_of(state_dict)
    fits = [n for n in _presets.names() if not any(diff(shapes, _presets.layout(n)))]
    if not fits:
        _, closest_diff = _closest(shapes, _kind_of_shapes(shapes))
        raise mismatch_error(filename or "this state_dict", "any released preset",
                             closest_diff or ([], [], []), shapes)
    stem = os.path.basename(filename).split(".")[0]
    return _presets.get(stem if stem in fits else fits[0])
