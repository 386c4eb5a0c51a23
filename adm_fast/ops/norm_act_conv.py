"""norm_act_conv: conv(between(group_norm_act(x))), keeping less for backward.

In training on a fused backend, the conv (and `between`, a parameter-free
resampling) would keep their inputs for backward — full activation tensors,
per block. Here they keep a recipe instead: x, which the fused norm keeps
anyway, and the small vectors; backward rebuilds their inputs with one
memory-bound pass — the trade flash attention makes for its weights — and
only when the backward reads it: a convolution's input makes only its
weight's gradient, so guidance, which asks for ∇x alone, rebuilds nothing
(nor for a pooling between, whose backward wants the shape). Tensors
saved inside are not seen by saved_tensors_hooks of the caller (as with
torch's checkpoint). The eager backend stays guided-diffusion's computation,
memory included.
"""

from __future__ import annotations

import contextlib
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


# Backward nodes that read a saved input's shape but never its values.
_SHAPE_ONLY = {"AvgPool2DBackward0", "AvgPool1DBackward0", "UpsampleNearest2DBackward0",
               "UpsampleNearest1DBackward0"}
# Convolution backward nodes: the input's values make only the weight's
# gradient, whose edge is the node's second (x, weight, bias).
_CONVOLUTIONS = {"ConvolutionBackward0", "_KernelFunctionBackward"}
_WALKED: dict = {"node": None}


@contextlib.contextmanager
def walking(node):
    """For a backward walked outside torch's engine (adm-fast bench plan's
    fake-GPU trace): `node` is the one whose saved tensors are unpacked."""
    previous, _WALKED["node"] = _WALKED["node"], node
    try:
        yield
    finally:
        _WALKED["node"] = previous


def _will_run(node) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # outside torch's engine: no pruning to know of
        return True


def _values_unread() -> bool:
    """Whether the backward node unpacking a saved tensor now will not read its
    values: a pooling that wants the shape, or a convolution whose weight's
    gradient this backward pass does not compute (guidance asks autograd for
    ∇x alone while the classifier's weights require grad)."""
    current = getattr(torch._C, "_current_autograd_node", lambda: None)()
    node = current if current is not None else _WALKED["node"]
    if node is None:
        return False
    kind = type(node).__name__
    if kind in _SHAPE_ONLY:
        return True
    if kind in _CONVOLUTIONS and len(node.next_functions) >= 2:
        weight = node.next_functions[1][0]
        return weight is None or not _will_run(weight)
    return False


class _Recipe:
    """What a saved conv input is rebuilt from: the norm's own saved input —
    or nothing, for a backward node that reads only its shape."""

    __slots__ = ("impl", "args", "between", "meta")

    def __init__(self, impl, args, made: Tensor, between=None):
        self.impl, self.args, self.between = impl, args, between
        self.meta = (made.shape, made.stride(), made.dtype, made.device)

    def rebuild(self) -> Tensor:
        if _values_unread():
            shape, stride, dtype, device = self.meta
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)
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
    recipes = [(h, _Recipe(impl, args, h))]

    def pack(t):
        for made, recipe in recipes:
            if t is made:
                return recipe
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        if between is not None:
            g = between(h)
            recipes.append((g, _Recipe(impl, args, g, between)))
            h = g
        return _conv(conv, h)
