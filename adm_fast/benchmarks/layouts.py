"""What `bench sample` runs: the model layouts (the released presets and a
tiny one for CPUs and tests), their classifiers and diffusions, and the
backend settings worth timing on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .. import presets as _presets
from ..checkpoint import load_checkpoint
from ..diffusion import create_gaussian_diffusion
from ..models.precision import apply_dtype
from ..ops.backend import Setting
from ..script_util import create_from_flags
from .flags import GPU_PRESETS, TINY_NAME, BenchInputError  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Layout:
    name: str
    model_flags: dict  # script flags of the UNet and its diffusion
    classifier_flags: dict | None
    classifier_scale: float

    @property
    def image_size(self) -> int:
        return int(self.model_flags["image_size"])

    @property
    def class_cond(self) -> bool:
        return bool(self.model_flags.get("class_cond", False))


# A 32×32 class-conditional ADM: every block type (AdaGN res blocks, resblock
# up/down-sampling, attention at 16 and 8, learned variance) with a classifier
# of the same kind; a guided step of a small batch takes about 0.2 s on one
# CPU core.
TINY = Layout(
    TINY_NAME,
    dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2",
         attention_resolutions="16,8", num_head_channels=32, learn_sigma=True, class_cond=True,
         resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000,
         noise_schedule="linear"),
    dict(image_size=32, classifier_width=32, classifier_depth=1,
         classifier_attention_resolutions="16,8", classifier_channel_mult="1,2,2",
         classifier_pool="attention"),
    1.0,
)


def layout(name: str) -> Layout:
    if name == TINY.name:
        return TINY
    preset = _presets.PRESETS.get(name)
    if preset is None or preset.kind != "unet":
        known = [TINY.name] + [n for n in _presets.names() if _presets.get(n).kind == "unet"]
        raise BenchInputError(f"unknown preset {name!r}; choose from {', '.join(known)}")
    clf = _presets.get(preset.classifier).flags if preset.classifier else None
    return Layout(name, dict(preset.flags), clf, float(preset.classifier_scale or 0.0))


def _randomise_zeros(model: torch.nn.Module) -> None:
    """ADM zero-initialises its output convolutions; with random weights the
    UNet would predict eps = 0 everywhere and hide any disagreement, so those
    get PyTorch's default init instead."""
    for p in model.parameters():
        if p.dim() > 1 and not p.detach().any():
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def build(lay: Layout, kind: str, device: torch.device, dtype: torch.dtype | None,
          path: str | None = None) -> torch.nn.Module:
    """The UNet (kind "unet") or classifier in eval mode: loaded from path, or
    with random weights (seeded) in the layout's shape."""
    flags = lay.model_flags if kind == "unet" else lay.classifier_flags
    flags = {k: v for k, v in flags.items()
             if k not in ("diffusion_steps", "noise_schedule", "timestep_respacing")}
    if path:
        try:
            return load_checkpoint(path, preset={"kind": kind, **flags}, device=device,
                                   dtype=dtype).eval()
        except (OSError, ValueError) as e:
            raise BenchInputError(f"cannot load {kind} from {path}: "
                                  f"{str(e).splitlines()[0]}") from None
    torch.manual_seed(0 if kind == "unet" else 1)
    with torch.device(device):
        model = create_from_flags(kind, flags)
    _randomise_zeros(model)
    return apply_dtype(model, dtype).eval()


def make_diffusion(lay: Layout, sampler: str, steps: int):
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    flags = lay.model_flags
    try:
        return create_gaussian_diffusion(
            steps=flags.get("diffusion_steps", 1000), learn_sigma=flags.get("learn_sigma", False),
            noise_schedule=flags.get("noise_schedule", "linear"), timestep_respacing=respacing)
    except ValueError as e:
        raise BenchInputError(f"--steps {steps} with --sampler {sampler}: {e}") from None


def _probes(device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """A small call of each model op, in the dtype the model's torso runs in."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 4, 4, generator=g).to(device, dtype)
    w = torch.ones(64, device=device)
    qkv = torch.randn(2, 3 * 2 * 32, 16, generator=g).to(device, dtype)
    return [("group_norm_act", (x, 32, w, torch.zeros_like(w), None, None, 1e-5, True)),
            ("qkv_attention", (qkv, 2, True))]


def backend_reasons(name: str, device: torch.device, dtype: torch.dtype,
                    as_auto: bool = False) -> list[str]:
    """Why backend `name` cannot run the models' ops here (empty: it can run
    at least one). as_auto also counts the reasons `auto` passes a backend
    over for (e.g. Triton's CPU interpreter, a debugging tool)."""
    why = ops.backends()[name].unavailable_reasons()
    if why:
        return why
    reasons: list[str] = []
    for op_name, args in _probes(device, dtype):
        op = ops.ops()[op_name]
        impl = op.impls.get(name)
        if impl is None:
            continue
        call = op.describe(args)
        r = impl.not_supported_reasons(call)
        if not r and as_auto:
            r = impl.auto_reasons(call)
        if not r:
            return []
        reasons += [f"{op_name}: {x}" for x in r]
    return reasons or [f"{name} implements none of the models' ops"]


def backend_settings(requested: list[str] | None, device: torch.device,
                     dtype: torch.dtype) -> list[tuple[str, Setting]]:
    """(label, use_backend setting) per adm_fast row. An explicit backend
    takes the ops it implements; the rest stay auto (SDPA has only attention,
    the C++ CPU backend no attention). Without a request: auto and every
    backend auto could pick here."""
    known = list(ops.backends())
    if requested is None:
        names = ["auto"] + [n for n in known
                            if not ops.backends()[n].is_reference
                            and not backend_reasons(n, device, dtype, True)]
    else:
        names = []
        for n in requested:
            if n != "auto" and n not in known:
                raise BenchInputError(f"unknown backend {n!r}; choose from "
                                      f"{', '.join(['auto'] + known)}")
            if n not in names and (n == "auto" or not ops.backends()[n].is_reference):
                # the reference (eager) is always run
                names.append(n)
        for n in names:
            why = [] if n == "auto" else backend_reasons(n, device, dtype)
            if why:
                raise BenchInputError(f"backend {n!r} cannot run on {device.type} here: "
                                      f"{'; '.join(why)}")
    out = []
    for n in names:
        setting = "auto" if n == "auto" else {op: n for op in ops.ops_of_backend(n)}
        out.append((f"adm_fast[{n}]", setting))
    return out


def model_fn(model, class_cond: bool):
    """The UNet as the sampler calls it. Guidance passes y to the model too;
    an unconditional UNet ignores it, as guided-diffusion's model_fn does."""
    if class_cond:
        return model

    def unconditional(x, t, y=None):
        return model(x, t)
    return unconditional
