"""What every op shares, written once: the call path, the torch.library custom
op, autograd, and the registry of implementations.

An op's spec subclasses `Op` (in the op's own file) and gives its signature,
argument check, eager reference, size features, fake, and — when its kernels
have a backward — how to call it. Each call then goes:

  check → (empty input: the reference) → dispatch picks an Impl (auto: one
    that agreed with the reference on this machine, ops/verify.py) →
    composite Impl:       impl.run(*args), torch's autograd
    kernel Impl, tracing: torch.ops.adm_fast.<op>(*args, backend), a
                          custom op with a fake and autograd, so torch.compile
                          sees it (and the Triton kernels inside it)
    kernel Impl, grads:   a plain autograd.Function with the same autograd
                          (the custom op's dispatch costs ~150 µs per call in
                          eager mode, more than a small op's kernels)
    kernel Impl, no grad: impl.forward(*args) straight (sampling)

Gradients: the spec's `kernel_backward`, or, for ops without one and under
create_graph=True (double backward), the eager reference differentiated on the
saved inputs, so every kernel implementation supports double backward; a
composite one has torch's autograd (sdpa's attention: first-order, as torch's
fused SDPA kernels are).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from . import autotune, dispatch, verify
from . import backend as _backend
from .impl import FLOATS, Call, Impl, holds_values
from .native import one_device

_TYPES = {"Tensor": Tensor, "Tensor?": Tensor | None, "int": int, "float": float,
          "bool": bool, "str": str}
_OPS: dict[str, Op] = {}
_MAX_DECISIONS = 4096  # calls of distinct shapes remembered per op before starting over
# Observers told of every op call and kernel backward (the benchmarks' traces:
# adm-fast bench plan); empty otherwise, and then one truth test per call.
_OBSERVERS: list = []


class Observer:
    """Told, around each op call in an `observe` block, which implementation
    ran it: impl is a backend name, or "reference" (the eager reference an
    empty input takes, or a backward through it); phase is "forward" or
    "backward". Work done between enter and exit is the call's."""

    def enter(self, op: str, impl: str, phase: str, args) -> None:
        pass

    def exit(self, op: str, impl: str, phase: str, args, outs) -> None:
        pass


@contextlib.contextmanager
def observe(observer: Observer):
    _OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _OBSERVERS.remove(observer)


def _observed(op: str, impl: str, phase: str, args, fn):
    for o in list(_OBSERVERS):
        o.enter(op, impl, phase, args)
    outs = None
    try:
        outs = fn()
        return outs
    finally:
        for o in reversed(list(_OBSERVERS)):
            o.exit(op, impl, phase, args, outs)


def parse_signature(signature: str) -> list[tuple[str, str]]:
    """"Tensor x, int n" -> [("Tensor", "x"), ("int", "n")]."""
    return [tuple(part.split()) for part in signature.split(",")]


def ops() -> dict[str, Op]:
    return dict(_OPS)


def ops_of_backend(name: str) -> tuple[str, ...]:
    """The ops backend `name` has an implementation of."""
    return tuple(op.name for op in _OPS.values() if name in op.impls)


def explain(op_name: str, *args) -> str:
    """Which backend `op_name` would use for these arguments, and why not the others."""
    op = _OPS[op_name]
    op.check_devices(args)
    op.check(*args)
    call = op.describe(args)
    name = _backend.current_backend(op_name)
    lines = [f"{op_name} (backend setting: {name})"]
    order = dispatch.auto_order(op, call) if name == _backend.AUTO else [
        op.impls[n] for n in _backend.backends() if n in op.impls]
    chosen = None
    for impl in order:
        why = impl.not_supported_reasons(call)
        if name == _backend.AUTO and not why:
            why = impl.auto_reasons(call) or verify.reasons(op, impl, call)
        if not why and chosen is None and name in (_backend.AUTO, impl.backend):
            chosen = impl.backend
            lines.append(f"  {impl.backend}: chosen")
        elif why:
            lines.append(f"  {impl.backend}: not supported: " + "; ".join(why))
        else:
            lines.append(f"  {impl.backend}: supported, not chosen")
    for other in _backend.backends():
        if other not in op.impls:
            lines.append(f"  {other}: not supported: " + "; ".join(dispatch.no_impl(op, other)))
    if chosen is None:
        lines.append("  -> no backend can run this call")
    return "\n".join(lines)


class ReferenceImpl(Impl):
    """Every op's implementation on the reference backend: its spec's reference."""

    backend, kind = _backend.REFERENCE, "composite"
    dtypes = FLOATS + (torch.float64,)

    def __init__(self, spec: Op):
        self.spec = spec

    def run(self, *args):
        return self.spec.reference(*args)


class Op:
    """An op's spec; subclasses set the attributes and override the methods.
    Its reference is its implementation on the reference backend (eager);
    the spec registers the others."""

    name: str = ""
    signature: str = ""  # torch schema arguments, in the public function's order
    returns: int = 1  # outputs the caller gets (one: a tensor; more: a tuple)
    kernel_returns: int = 1  # what Impl.forward returns: the outputs, then what backward keeps
    kept_outputs: tuple[int, ...] = ()  # indices of forward's returns saved for backward
    has_kernel_backward: bool = False  # else gradients through the reference
    preferences: Sequence[dict] = ()  # measured rules for auto (see dispatch.matches)
    # device type -> backends auto times against each other per call signature
    # (ops/autotune.py), where machines disagree on which is faster
    tune: dict[str, tuple[str, ...]] = {}
    # How many times torch's own error at the call's precision an
    # implementation's may be before auto refuses it (ops/verify.py).
    verify_factor: float = 2.0

    # --- the spec -------------------------------------------------------------
    def check(self, *args) -> None:
        """Raise a clear error for arguments no implementation can accept."""

    def reference(self, *args):
        """The upcast eager computation, differentiable, any float dtype."""
        raise NotImplementedError

    def features(self, *args) -> dict[str, int]:
        """Sizes that limits and preferences read."""
        return {}

    def fake(self, *args) -> tuple[Tensor, ...]:
        """Empty tensors shaped as Impl.forward's returns (for torch.compile)."""
        raise NotImplementedError

    def kernel_backward(self, impl: Impl, args, kept, grads, needs) -> tuple:
        """Gradients per argument from impl.backward (has_kernel_backward)."""
        raise NotImplementedError

    @property
    def family(self) -> str:
        """The name its spec file (adm_fast/ops/<family>.py), kernels, tests and
        benchmark share: the op's, or the file's that holds several (the two
        steps: diffusion_step). Empty for an op defined outside adm_fast.ops."""
        package, _, family = type(self).__module__.rpartition(".")
        return family if package == __package__ else ""

    # --- the machinery --------------------------------------------------------
    def __init__(self) -> None:
        self.args = parse_signature(self.signature)
        self.tensor_pos = [i for i, (t, _) in enumerate(self.args) if t.startswith("Tensor")]
        self.impls: dict[str, Impl] = {}
        self._decisions: dict[tuple, tuple] = {}
        self._define_custom_op()
        self.torch_op = getattr(torch.ops.adm_fast, self.name).default
        _OPS[self.name] = self
        self.register(ReferenceImpl(self))

    def register(self, impl: Impl) -> Impl:
        impl.op = self.name
        self.impls[impl.backend] = impl
        impl.on_register()
        _backend.bump()
        return impl

    def unregister(self, backend_name: str) -> None:
        self.impls.pop(backend_name, None)
        _backend.bump()

    def check_devices(self, args, label: str = "") -> None:
        """Refuse tensor arguments on more than one device (meta included):
        no implementation runs such a call, and the custom op's fake, which
        the dispatcher picks for any meta argument, must not answer it."""
        one_device(label or self.name, [n for _, n in self.args], args, error=ValueError)

    def describe(self, args) -> Call:
        tensors = {self.args[i][1]: args[i] for i in self.tensor_pos if args[i] is not None}
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
        return Call(tensors, self.features(*args), grad, tuple(args))

    def __call__(self, *args):
        return self.run_decided(self.checked_decision(args), args)

    def run_decided(self, decision, args):
        """The call on a decision from checked_decision (None: the reference)."""
        impl, grad = decision
        if impl is not None:
            return self.run(impl, args, grad)
        if _OBSERVERS:
            return _observed(self.name, "reference", "forward", args,
                             lambda: self.reference(*args))
        return self.reference(*args)

    def checked_decision(self, args):
        """check(*args), then decide(args), both skipped for a call with the key
        of one already seen (see _key). Under torch.compile every call is
        checked and decided: it is traced once, and the key's Python work would
        be traced with it."""
        if torch.compiler.is_compiling():
            self.check_devices(args)
            self.check(*args)
            return self.decide(args)
        key = self._key(args)
        decision = self._decisions.get(key)
        if decision is None:
            self.check_devices(args)
            self.check(*args)
            unverified = verify.unverified()
            decision = self.decide(args)
            if verify.unverified() != unverified or not holds_values(
                    args[i] for i in self.tensor_pos):
                # not kept: something ran unchecked, or the static order stood in
                # for what tensors without data cannot time; a later call decides
                return decision
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def decide(self, args):
        """(implementation, autograd wants the backward); None: the reference."""
        if any(args[i] is not None and args[i].numel() == 0 for i in self.tensor_pos):
            return None, False  # nothing to compute: shapes and dtypes as eager
        call = self.describe(args)
        impl = dispatch.select(self, call)
        names = self.tune.get(call.device_type, ())
        if (impl.backend in names and _backend.current_backend(self.name) == _backend.AUTO
                and autotune.active(call)):
            candidates = [self.impls[n] for n in names if n in self.impls
                          and not self.impls[n].not_supported_reasons(call)
                          and not self.impls[n].auto_reasons(call)]
            if len(candidates) > 1:  # else nothing is timed: the static order's holds
                candidates = [c for c in candidates if not verify.reasons(self, c, call)]
                impl = autotune.pick(self, call, args, candidates, default=impl) or impl
        return impl, call.grad

    def _key(self, args):
        """Everything a decision (and the argument check) depends on: the
        setting, the registrations, grad mode and each argument's type, shape,
        strides, device and requires_grad. Calls with the same key skip straight
        to the implementation chosen for the first: the per-call cost of
        checking and choosing is ~30 us, a small op's whole time on a CPU."""
        parts = [_backend.current_backend(self.name), _backend.version(),
                 torch.is_grad_enabled()]
        for a in args:
            if isinstance(a, Tensor):
                parts.append((a.dtype, a.device, a.shape, a.stride(), a.requires_grad))
            elif isinstance(a, (int, float, bool, str)) or a is None:
                parts.append((type(a), a))
            else:
                parts.append((type(a), id(a)))  # an object check() will refuse
        return tuple(parts)

    def run(self, impl: Impl, args, grad: bool | None = None):
        """This call on one implementation, whatever the backend setting (a value
        recomputed in backward must come from the implementation that made it)."""
        if _OBSERVERS:
            return _observed(self.name, impl.backend, "forward", args,
                             lambda: self._run(impl, args, grad))
        return self._run(impl, args, grad)

    def _run(self, impl: Impl, args, grad: bool | None = None):
        if impl.kind == "composite":
            return impl.run(*args)
        if torch.compiler.is_compiling():
            return self._public(self.torch_op(*args, impl.backend))
        if grad is None:
            grad = self.describe(args).grad
        if grad:
            return _KernelFunction.apply(self, impl, *args)
        return self._public(impl.forward(*args))

    def _public(self, outs):
        outs = outs if isinstance(outs, tuple) else (outs,)
        return outs[0] if self.returns == 1 else tuple(outs[: self.returns])

    # --- autograd, shared by the custom op and the plain Function --------------
    def save(self, ctx, args, outs, backend: str) -> None:
        ctx.save_for_backward(*[args[i] for i in self.tensor_pos],
                              *[outs[i] for i in self.kept_outputs])
        ctx.params = [None if i in self.tensor_pos else a for i, a in enumerate(args)]
        ctx.backend = backend

    def gradients(self, ctx, grads, needs) -> tuple:
        saved = ctx.saved_tensors
        args = list(ctx.params)
        for i, t in zip(self.tensor_pos, saved):
            args[i] = t
        kept = saved[len(self.tensor_pos):]
        needs = tuple(needs[: len(self.args)])
        if self.has_kernel_backward and not torch.is_grad_enabled():
            def run():
                return self.kernel_backward(self.impls[ctx.backend], args, kept, grads, needs)
            used = ctx.backend
        else:
            def run():
                return self._through_reference(args, grads, needs)
            used = "reference"
        got = _observed(self.name, used, "backward", args, run) if _OBSERVERS else run()
        return tuple(g if needs[i] else None for i, g in enumerate(got))

    def _through_reference(self, args, grads, needs) -> tuple:
        wanted = [i for i in self.tensor_pos if needs[i]]
        if not wanted:
            return (None,) * len(self.args)
        create = torch.is_grad_enabled()  # double backward: keep the graph to the inputs
        with torch.enable_grad():
            # Each input a node of its own: detached for a first-order backward; for
            # double backward a view, which keeps the graph to the input but not its
            # ancestry, so that the gradient for an input derived from another one
            # (shift = s * 0.5) is the partial one: autograd adds the path between
            # them itself (the input itself gave the total twice: 8-20% off).
            args = [(a.view_as(a) if create else a.detach().requires_grad_(needs[i]))
                    if i in self.tensor_pos and a is not None else a
                    for i, a in enumerate(args)]
            outs = self.reference(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted],
                                  [g for _, g in pairs], create_graph=create, allow_unused=True)
        result: list[Tensor | None] = [None] * len(self.args)
        for i, g in zip(wanted, got):
            result[i] = g if g is not None else torch.zeros_like(args[i])
        return tuple(result)

    def _define_custom_op(self):
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_TYPES[t]) for t, n in self.args]
        params.append(inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=str))
        n = self.kernel_returns
        ret = tuple[tuple([Tensor] * n)] if n > 1 else Tensor

        def run(*args):
            *args, backend = args
            outs = self._checked_impl(args, backend).forward(*args)
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)  # one: a tensor
            return outs if n > 1 else outs[0]

        body = _sourceless(run, f"<adm_fast::{self.name}>")
        body.__signature__ = inspect.Signature(params, return_annotation=ret)
        op = torch.library.triton_op(f"adm_fast::{self.name}", body, mutates_args=())

        def fake(*args):
            # the dispatcher's answer for any meta argument: a CPU x beside a
            # meta weight must be refused here, or it returns empty memory
            self.check_devices(args[:-1], f"adm_fast::{self.name}")
            outs = self.fake(*args[:-1])
            return outs if n > 1 else outs[0]

        op.register_fake(fake)

        def setup(ctx, inputs, output):
            output = output if isinstance(output, tuple) else (output,)
            self.save(ctx, inputs[:-1], output, inputs[-1])
            ctx.tensor_inputs = [isinstance(a, Tensor) for a in inputs]

        def backward(ctx, *grads):
            return self.gradients(ctx, grads, engine_needs(ctx, ctx.needs_input_grad)) + (None,)

        op.register_autograd(backward, setup_context=setup)

    def _checked_impl(self, args, backend: str) -> Impl:
        """torch.ops.adm_fast.<op> is public: validate what a direct call passes."""
        impl = self.impls.get(backend)
        if impl is None or impl.kind != "kernel":
            kernels = ", ".join(k for k, v in self.impls.items() if v.kind == "kernel")
            raise ValueError(f"adm_fast::{self.name}: backend {backend!r} has no kernels for "
                             f"this op (kernel backends: {kernels})")
        self.check_devices(args, f"adm_fast::{self.name}")
        self.check(*args)
        call = self.describe(args)
        if any(t.numel() == 0 for t in call.tensors.values()):
            raise ValueError(f"adm_fast::{self.name}: empty inputs are not kernel work; call "
                             f"adm_fast.ops.{self.name}")
        why = impl.not_supported_reasons(call)
        if why:
            raise dispatch.BackendNotSupported(
                dispatch.format_reasons(self.name, {backend: why}, chosen=backend))
        return impl


def _sourceless(fn, filename: str):
    """fn behind a one-line function whose source inspect cannot find. Given a
    function with source, triton_op parses it (and what it calls) for Triton
    kernels, importing torch._inductor to do it: 2.3 s of every `import
    adm_fast.ops`, to find none (ours are behind the dispatch, so the list
    it keeps stays empty either way)."""
    namespace = {"_fn": fn}
    exec(compile("def body(*args):\n    return _fn(*args)\n", filename, "exec"), namespace)
    return namespace["body"]


class _KernelFunction(torch.autograd.Function):
    """The custom op's autograd, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, op: Op, impl: Impl, *args):
        outs = impl.forward(*args)
        op.save(ctx, args, outs, impl.backend)
        ctx.op = op
        ctx.tensor_inputs = [False, False] + [isinstance(a, Tensor) for a in args]
        return op._public(outs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + ctx.op.gradients(ctx, grads,
                                               engine_needs(ctx, ctx.needs_input_grad)[2:])


def engine_needs(ctx, needs) -> tuple[bool, ...]:
    """needs (ctx.needs_input_grad: which inputs require grad) less the inputs
    this backward pass will not deliver a gradient to. Guidance asks
    autograd.grad for ∇x alone while the classifier's weights require grad: a
    weight's gradient, as costly as the forward, would be computed and dropped
    (torch's own convolution backward skips it the same way)."""
    fns = iter(ctx.next_functions)  # one per tensor input, in order
    out = []
    for need, is_tensor in zip(needs, ctx.tensor_inputs):
        fn = next(fns)[0] if is_tensor else None
        if need and fn is not None:
            try:
                need = torch._C._will_engine_execute_node(fn)
            except RuntimeError:  # a leaf named in autograd.grad's inputs: it is wanted
                need = True
        out.append(bool(need))
    return tuple(out)
