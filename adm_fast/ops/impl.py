"""One implementation of one op, declared as data (xformers' way).

An `Impl` states where it runs — its backend, device types, dtypes, layouts,
the largest sizes it takes — and `not_supported_reasons(call)` reads those
declarations; the dispatcher walks a list of them and can say, for any call,
why each was passed over. `kind` tells the op machinery how to call it:
  "composite"  `run(*args)` is differentiable torch code (eager, SDPA);
  "kernel"     `forward(*args)` returns the outputs and what backward keeps,
               `backward(...)` the gradients (the op's spec says the shapes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backend as _backend

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def layout_of(t: Tensor) -> str:
    """"contiguous", "channels_last" (4-D), "channels_last_3d" (5-D),
    "channels_last_1d" (3-D [N, C, T] with C contiguous: the [N, C, H·W] view
    of a channels_last map, as attention takes it) or "strided"."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    if t.dim() == 3 and t.movedim(1, -1).is_contiguous():
        return "channels_last_1d"
    return "strided"


def holds_values(tensors) -> bool:
    """Whether these tensors hold data: not meta or fake tensors (a traced plan,
    torch.compile's tracing), whose shapes alone cannot time or check a kernel."""
    from torch._subclasses.fake_tensor import is_fake

    return not any(t is not None and (t.device.type == "meta" or is_fake(t)) for t in tensors)


def has_layout(t: Tensor, layout: str) -> bool:
    """Whether t is laid out as `layout` (a layout_of name). A tensor can be in
    several at once (a 1x1 map is contiguous and channels_last), where
    layout_of names only the first."""
    if layout == "contiguous":
        return t.is_contiguous()
    if layout == "channels_last":
        return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    if layout == "channels_last_1d":
        return t.dim() == 3 and t.movedim(1, -1).is_contiguous()
    return layout == "strided"


@dataclass
class Call:
    """What implementations are chosen by: the op's tensors by name (absent
    optional ones left out), the op's own size features, and whether autograd
    will want the backward; and the call's own arguments, on which auto checks
    an implementation against the reference before it uses it (ops/verify.py)."""

    tensors: dict[str, Tensor]
    features: dict[str, int]
    grad: bool
    args: tuple = ()

    @property
    def device_type(self) -> str:
        return next(iter(self.tensors.values())).device.type

    def devices(self):
        return {t.device for t in self.tensors.values()}


class Impl:
    """Subclass per (op, backend); override only what differs from these defaults."""

    op: str = ""  # set by the op's spec when the implementation is registered
    backend: str = ""
    kind: str = "kernel"
    device_types: tuple[str, ...] | None = None  # None: wherever the backend runs
    dtypes: tuple[torch.dtype, ...] = FLOATS  # of every tensor argument
    layouts: Mapping[str, tuple[str, ...]] = {}  # tensor name -> accepted layouts
    max_features: Mapping[str, int] = {}  # feature -> largest supported value
    differentiable: bool = True  # has a backward (composite: torch's autograd)
    # The op's verify_factor unless set: one that rounds differently from the
    # reference by design may be allowed more of torch's error (ops/verify.py).
    verify_factor: float | None = None

    def not_supported_reasons(self, call: Call) -> list[str]:
        b = _backend.get(self.backend)
        why = b.unavailable_reasons()
        if why:
            return list(why)
        devices = call.devices()
        if len(devices) > 1:
            return [f"inputs on several devices: {sorted(map(str, devices))}"]
        dev = call.device_type
        why = b.device_reasons(dev)
        if not why and self.device_types is not None and dev not in self.device_types:
            why = [f"{dev} tensors are not supported (runs on {'/'.join(self.device_types)})"]
        for name, t in call.tensors.items():
            if t.dtype not in self.dtypes:
                why.append(f"{name} dtype {dtype_name(t.dtype)} is not one of "
                           f"{'/'.join(map(dtype_name, self.dtypes))}")
        for name, accepted in self.layouts.items():
            t = call.tensors.get(name)
            if t is not None and not any(has_layout(t, a) for a in accepted):
                wanted = (f"neither {' nor '.join(accepted)}" if len(accepted) > 1
                          else f"not {accepted[0]}")
                why.append(f"{name} is {wanted} (it is {layout_of(t)})")
        for feature, most in self.max_features.items():
            if call.features.get(feature, 0) > most:
                why.append(f"{feature.replace('_', ' ')} {call.features[feature]} is more "
                           f"than {most}")
        if call.grad and not self.differentiable:
            why.append("has no backward")
        return why + self.extra_reasons(call)

    def extra_reasons(self, call: Call) -> list[str]:
        """Limits that are not plain data."""
        return []

    def layouts_accepted(self) -> str:
        """What `layouts` declares, for `adm-fast info`: "x contiguous/
        channels_last, weight contiguous", or "any layout" when it declares
        nothing. An Impl whose limit on layouts is in extra_reasons says it here."""
        names: dict[tuple[str, ...], list[str]] = {}
        for name, accepted in self.layouts.items():
            names.setdefault(tuple(accepted), []).append(name)
        return ", ".join(f"{'/'.join(n)} {'/'.join(a)}" for a, n in names.items()) or \
            "any layout"

    def auto_reasons(self, call: Call) -> list[str]:
        """Why auto should pass over a call this implementation could run."""
        return _backend.get(self.backend).auto_reasons(call.device_type)

    def on_register(self) -> None:
        """Called when an op registers it (a backend may prepare its code then)."""

    def native_ops(self) -> tuple:
        """The adm_fast_native ops (torch.ops OpOverloads) this implementation
        calls: each needs a kernel for the backend's device (CI checks the CUDA
        build registers them all)."""
        return ()

    # "composite": differentiable torch code with the op's signature.
    def run(self, *args):
        raise NotImplementedError

    # "kernel": see the op's spec for what forward returns and backward takes.
    def forward(self, *args):
        raise NotImplementedError

    def backward(self, *args):
        raise NotImplementedError


