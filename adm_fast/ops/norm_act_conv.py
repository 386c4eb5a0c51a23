"""norm_act_conv: conv(between(group_norm_act(x))), keeping less for backward.

`conv` is any function of the activations (a convolution, a projection);
adm_fast.models.fused.norm_act_conv hands a model's GroupNorm and conv
modules in. In training on a fused backend, the conv (and `between`, a
parameter-free resampling) would keep their inputs for backward — full
activation tensors, per block. Here they keep a recipe instead: x, which the
fused norm keeps anyway, and the small vectors; backward rebuilds their inputs
with one memory-bound pass — the trade flash attention makes for its weights —
and only when the backward reads it: a convolution's input makes only its
weight's gradient, so guidance, which asks for ∇x alone, rebuilds nothing
(nor for a pooling between, whose backward wants the shape). A view of the
conv's input saved by what runs inside (the [N, T, C] matmul input of a
channels_last attention projection) is rebuilt as that view. Everything else
saved inside goes through the caller's saved_tensors_hooks, if any (a
counter of saved bytes sees it; torch's checkpoint takes it).

The recipe needs the norm's kernel: when auto would take the eager
GroupNorm for a call (it times the norm alone, and at some shapes the two
tie), a conv after it would keep its input and the norm its intermediates,
two full activations more per block; so here auto takes the first kernel
implementation that may run the call. The eager backend, or one named for
group_norm_act, stays as chosen: eager is guided-diffusion's computation,
memory included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import backend as _backend
from . import dispatch, verify
from .group_norm_act import GROUP_NORM_ACT
from .impl import holds_values

# Whether convs fed by a fused norm keep a recipe instead of their input. On by
# default; set_norm_act_recompute(False) trades the memory back for the time.
_RECOMPUTE = {"on": True}


def set_norm_act_recompute(enabled: bool) -> None:
    _RECOMPUTE["on"] = bool(enabled)


# Backward nodes that read a saved input's shape but never its values.
_SHAPE_ONLY = {"AvgPool2DBackward0", "AvgPool1DBackward0", "UpsampleNearest2DBackward0",
               "UpsampleNearest1DBackward0"}
# Backward nodes of a product of the input and a weight: the input's values
# make only the weight's gradient, and this is the weight's edge among the
# node's inputs: convolutions (x, weight, bias), a Linear's matmul on the
# [N·T, C] view (addmm: bias, x, weightᵀ; mm: x, weightᵀ).
_WEIGHT_EDGE = {"ConvolutionBackward0": 1, "_KernelFunctionBackward": 1,
                "AddmmBackward0": 2, "MmBackward0": 1}
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
    edge = _WEIGHT_EDGE.get(kind)
    if edge is not None and len(node.next_functions) > edge:
        weight = node.next_functions[edge][0]
        return weight is None or not _will_run(weight)
    return False


class _Recipe:
    """What a saved conv input (or a view of it) is rebuilt from: the norm's
    own saved input — or nothing, for a backward node that reads only its
    shape or makes no gradient from its values."""

    __slots__ = ("impl", "args", "between", "meta", "view")

    def __init__(self, impl, args, meta, between=None, view=None):
        self.impl, self.args, self.between = impl, args, between
        self.meta = meta  # of the tensor made: shape, stride, dtype, device
        self.view = view  # (size, stride, storage offset) of a view of it

    @staticmethod
    def of(impl, args, made: Tensor, between=None) -> _Recipe:
        return _Recipe(impl, args, (made.shape, made.stride(), made.dtype, made.device), between)

    def of_view(self, t: Tensor) -> _Recipe:
        return _Recipe(self.impl, self.args, self.meta, self.between,
                       (t.shape, t.stride(), t.storage_offset()))

    def rebuild(self) -> Tensor:
        shape, stride, dtype, device = self.meta
        if _values_unread():
            h = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        else:
            # Grad mode is on here only for double backward (create_graph=True): then
            # the rebuilt input carries its graph back to x, as the original did.
            h = GROUP_NORM_ACT.run(self.impl, self.args)
            h = h if self.between is None else self.between(h)
            if h.stride() != tuple(stride):  # the view's strides address the original's memory
                h = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(h)
        return h if self.view is None else h.as_strided(*self.view)


def _outer_hooks():
    """The caller's saved_tensors_hooks (pack, unpack), or (None, None)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks if hooks is not None else (None, None)


def _shares_memory(t: Tensor, made: Tensor) -> bool:
    if t.device != made.device:
        return False
    mine, theirs = t.untyped_storage(), made.untyped_storage()
    if theirs.nbytes() == 0:
        return False
    if t.device.type == "meta" or is_fake(t) or is_fake(made):
        # no data, so every data pointer is 0: a view shares its base's storage object
        return mine._cdata == theirs._cdata
    return mine.data_ptr() == theirs.data_ptr()


# (group_norm_act's decision key) -> the kernel implementation a recipe uses
_KERNEL_FOR: dict = {}


def _kernel_decision(args, decision):
    """decision, or under auto, where it names a composite (eager) norm, the
    first kernel implementation auto may use for the call (supported,
    verified on this machine), so that the conv after it keeps a recipe."""
    impl, grad = decision
    if impl is None or impl.kind != "composite" or \
            _backend.current_backend(GROUP_NORM_ACT.name) != _backend.AUTO:
        return decision
    key = GROUP_NORM_ACT._key(args)
    if key in _KERNEL_FOR:
        found = _KERNEL_FOR[key]
        return decision if found is None else (found, grad)
    call = GROUP_NORM_ACT.describe(args)
    found = next((c for c in dispatch.auto_order(GROUP_NORM_ACT, call)
                  if c.kind != "composite" and not (
                      c.not_supported_reasons(call) or c.auto_reasons(call)
                      or verify.reasons(GROUP_NORM_ACT, c, call))), None)
    if holds_values(call.tensors.values()):
        if len(_KERNEL_FOR) >= 4096:
            _KERNEL_FOR.clear()
        _KERNEL_FOR[key] = found
    return decision if found is None else (found, grad)


class _Dropout:
    """F.dropout(h, p, training=True) as torch computes it on a CPU (noise =
    bernoulli(1 - p) / (1 - p), h · noise), with the noise drawn in NCHW order
    whatever h's memory format: torch draws in memory order, so a
    channels_last h would drop other positions than guided-diffusion's NCHW
    model at the same RNG state; here the same ones, and the same values bit
    for bit. Backward keeps a bool mask (h · keep · scale), not the float noise."""

    __slots__ = ("keep", "scale")

    def __init__(self, h: Tensor, p: float):
        noise = torch.empty(h.shape, dtype=h.dtype, device=h.device).bernoulli_(1 - p)
        noise.div_(1 - p)
        self.keep = noise != 0
        # noise's nonzero value, made on the host (no device sync)
        self.scale = float(torch.ones((), dtype=h.dtype).div_(1 - p))

    def __call__(self, h: Tensor) -> Tensor:
        return h * self.keep * self.scale


def norm_act_conv(conv: Callable[[Tensor], Tensor], x: Tensor, num_groups: int,
                  weight: Tensor | None = None, bias: Tensor | None = None,
                  scale: Tensor | None = None, shift: Tensor | None = None,
                  eps: float = 1e-5, act: bool = True, *,
                  between: Callable[[Tensor], Tensor] | None = None,
                  recompute: bool = True, dropout: float = 0.0) -> Tensor:
    """conv(between(group_norm_act(x, num_groups, weight, bias, scale, shift,
    eps, act))); dropout: the probability of a training-mode dropout in place
    of between.

    recompute=False (e.g. inside a checkpointed block, which keeps nothing
    anyway) is the plain composition."""
    if dropout and between is not None:
        raise ValueError("norm_act_conv: dropout takes the place of between; give one")
    args = (x, num_groups, weight, bias, scale, shift, float(eps), bool(act))
    wants_recipe = (recompute and _RECOMPUTE["on"] and torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()
                    and any(isinstance(t, Tensor) and t.requires_grad for t in args[:6]))
    decision = GROUP_NORM_ACT.checked_decision(args)
    if wants_recipe:
        decision = _kernel_decision(args, decision)
    impl = decision[0]  # None for an empty x: the reference
    if dropout and (not 0 < dropout < 1 or impl is None
                    or _backend.current_backend(GROUP_NORM_ACT.name) == "eager"):
        def between(h, p=dropout):  # guided-diffusion's nn.Dropout (and p = 1, empty x)
            return F.dropout(h, p, training=True)
        dropout = 0.0
    if not wants_recipe or impl is None or impl.kind == "composite":
        h = GROUP_NORM_ACT.run_decided(decision, args)
        if dropout:
            between = _Dropout(h, dropout)
        return conv(h if between is None else between(h))
    h = GROUP_NORM_ACT.run(impl, args, grad=True)
    if dropout:
        between = _Dropout(h, dropout)
    recipes = [(h, _Recipe.of(impl, args, h))]
    outer_pack, outer_unpack = _outer_hooks()

    def pack(t):
        for made, recipe in recipes:
            if t is made:
                return recipe
        for made, recipe in recipes:
            if _shares_memory(t, made):
                return recipe.of_view(t)
        return outer_pack(t) if outer_pack is not None else t

    def unpack(saved):
        if isinstance(saved, _Recipe):
            return saved.rebuild()
        return outer_unpack(saved) if outer_unpack is not None else saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            if between is not None:
                g = between(h)
                recipes.append((g, _Recipe.of(impl, args, g, between)))
                h = g
            return conv(h)
    finally:
        # Every tensor saved here keeps `pack` alive with it (torch holds both
        # hooks); while `recipes` named the tensors made, the memory a recipe
        # stands for stayed allocated, out of the hooks' sight.
        recipes.clear()
