"""norm_act_conv: conv(between(group_norm_act(x))), keeping less for backward.

In training on a fused backend, the conv (and `between`, a parameter-free
resampling) would keep their inputs for backward — full activation tensors,
per block. Here they keep a recipe instead: x, which the fused norm keeps
anyway, and the small vectors; backward rebuilds their inputs with one
memory-bound pass — the trade flash attention makes for its weights. Tensors
saved inside are not seen by saved_tensors_hooks of the caller (as with
torch's checkpoint). The eager backend stays guided-diffusion's computation,
memory included.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .conv3x3 import conv as _conv
from .group_norm_act import GROUP_NORM_ACT

# Whether convs fed by a fused norm keep a recipe instead of their input. On by
# default; set_norm_act_recompute(False) trades the memory back for the time.
_RECOMPUTE = {"on": True}


def set_norm_act_recompute(enabled: bool) -> None:
    _RECOMPUTE["on"] = bool(enabled)


class _Recipe:
    """What a saved conv input is rebuilt from: the norm's own saved input."""

    __slots__ = ("impl", "args", "between")

    def __init__(self, impl, args, between=None):
        self.impl, self.args, self.between = impl, args, between

    def rebuild(self) -> Tensor:
        # Grad mode is on here only for double backward (create_graph=True): then
        # the rebuilt input carries its graph back to x, as the original did.
        h = GROUP_NORM_ACT.run(self.impl, self.args)
        return h if self.between is None else self.between(h)


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, _Recipe) else saved


def norm_act_conv(norm: nn.GroupNorm, x: Tensor, conv: nn.Module, scale: Tensor = None,
                  shift: Tensor = None, act: bool = True,
                  between: Optional[Callable[[Tensor], Tensor]] = None,
                  recompute: bool = True) -> Tensor:
    """conv(between(SiLU(norm(x)·(1 + scale) + shift))) (act=False: no SiLU).

    recompute=False (e.g. inside a checkpointed block, which keeps nothing
    anyway) is the plain composition."""
    args = (x, norm.num_groups, norm.weight, norm.bias, scale, shift, float(norm.eps),
            bool(act))
    wants_recipe = (recompute and _RECOMPUTE["on"] and torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()
                    and any(isinstance(t, Tensor) and t.requires_grad for t in args[:6]))
    decision = GROUP_NORM_ACT.checked_decision(args)
    impl = decision[0]  # None for an empty x: the reference
    if not wants_recipe or impl is None or impl.kind == "composite":
        h = GROUP_NORM_ACT.run_decided(decision, args)
        return _conv(conv, h if between is None else between(h))
    h = GROUP_NORM_ACT.run(impl, args, grad=True)
    recipes = [(h, _Recipe(impl, args))]

    def pack(t):
        for made, recipe in recipes:
            if t is made:
                return recipe
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        if between is not None:
            g = between(h)
            recipes.append((g, _Recipe(impl, args, between)))
            h = g
        return _conv(conv, h)
