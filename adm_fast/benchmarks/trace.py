"""What one sampling step runs, recorded without running it: every kernel
launch (ATen, adm_fast's native ops, Triton), which implementation each
adm_fast op took, FLOPs and bytes, host syncs, CPU tensors and layout
copies, each attributed to the part of the step it belongs to.

The step runs for real on fake tensors (torch's FakeTensorMode: shapes,
dtypes, strides and devices, no data), so the dispatch takes exactly the
decisions it would take on that device. On CUDA that works without a GPU,
with these stand-ins, all stated in the plan:
  * torch's autograd engine asks the CUDA driver about the device before it
    runs a backward, so guidance's `torch.autograd.grad` is walked here in
    Python instead (`python_grad`): the same backward nodes, called in a
    dependency order, with the same saved-tensor hooks;
  * Triton launches are captured, not run (adm_fast/benchmarks/aot.py), with torch's
    wrap_triton routing switched off so the launchers call the kernels
    directly, as they do outside torch.compile.
  * cuDNN's memory format for a convolution's outputs and SDPA's kernel
    choice are what a GPU would answer: without one, torch's fake
    convolution assumes its slow NCHW kernels and SDPA its math path.
On a CPU the engine itself runs (fake CPU tensors need no stand-in).
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import op as _op
from ..ops.norm_act_conv import walking

aten = torch.ops.aten

# Ops that launch nothing: views, metadata, allocation (the caching allocator
# hands out memory without a kernel), and what fake tensors answer themselves.
_FREE = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::detach", "aten::alias", "aten::lift_fresh",
    "aten::_unsafe_view", "aten::set_", "aten::resize_", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size",
    "aten::_has_same_storage_numel", "aten::promote_types", "aten::result_type",
}
# Ops that wait for the device: the host reads a value back.
_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal",
         "aten::is_nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive",
         "aten::allclose"}
# Copies that may only change the memory format.
_COPIES = {"aten::clone", "aten::_to_copy", "aten::copy_", "aten::contiguous"}
# Matrix-multiply-class ops: their FLOPs run on the tensor cores.
_MMA = {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::bmm",
        "aten::addmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
        "aten::_scaled_dot_product_flash_attention_backward",
        "aten::_scaled_dot_product_efficient_attention_backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_cudnn_attention_backward"}
_CONVS = {"aten::convolution", "aten::convolution_backward"}


def _tensors(tree) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _where() -> str:
    """The innermost adm_fast frame that led here, as file:line (function)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "adm_fast" in frame.filename and "benchmarks" not in frame.filename:
            name = frame.filename.split("adm_fast/")[-1]
            return f"{name}:{frame.lineno} ({frame.name})"
    return "?"


def _layout(t: Tensor) -> str:
    from ..ops.impl import layout_of
    return layout_of(t)


@dataclass
class Launch:
    kind: str  # "aten", "native", "triton"
    name: str
    part: str  # the part of the step: unet, classifier, classifier_backward, graph, other
    op: str  # the adm_fast op call it ran inside ("" outside any)


@dataclass
class Work:
    """Arithmetic and memory traffic, for the roofline: an ATen op's, or a
    kernel implementation's (its launches move what the op reads and writes)."""

    part: str
    flops: int
    bytes: int
    mma: bool  # matrix-multiply-class: on the tensor cores
    dtype: torch.dtype
    what: str


@dataclass
class Trace:
    """Everything one traced step did, by part of the step."""

    launches: list[Launch] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)
    ops: dict[str, dict[str, int]] = field(default_factory=dict)  # op(.backward) -> impl -> n
    syncs: list[str] = field(default_factory=list)
    cpu_tensors: list[str] = field(default_factory=list)
    layout_copies: list[str] = field(default_factory=list)
    nchw_convolutions: list[str] = field(default_factory=list)  # on activations
    image_convolutions: list[str] = field(default_factory=list)  # NCHW images in
    nchw_conv_bytes: int = 0  # what cuDNN's transposes around those move
    group_norm_forwards: collections.Counter = field(default_factory=collections.Counter)
    triton: list = field(default_factory=list)  # aot.Launch records, for compiling

    def count(self, kind: str | None = None, parts=None) -> int:
        return sum(1 for launch in self.launches
                   if (kind is None or launch.kind == kind)
                   and (parts is None or launch.part in parts))

    def flops(self, mma: bool | None = None, parts=None) -> int:
        return sum(w.flops for w in self.work
                   if (mma is None or w.mma == mma) and (parts is None or w.part in parts))

    def bytes(self, mma: bool | None = False, parts=None) -> int:
        return sum(w.bytes for w in self.work
                   if (mma is None or w.mma == mma) and (parts is None or w.part in parts))


class _Recorder(TorchDispatchMode, _op.Observer):
    """Sees every ATen and native op below Python (inside fake tensors' mode,
    so views and fakes are seen as the real dispatch would make them) and
    every adm_fast op call (as an ops.op.Observer)."""

    def __init__(self, trace: Trace, device_type: str):
        super().__init__()
        self.trace, self.device_type = trace, device_type
        self.part = "other"
        self.on = False  # recording (else ops are only answered)
        self.stack: list[str] = []  # adm_fast op calls in progress

    # --- adm_fast ops ------------------------------------------------------------
    def enter(self, op, impl, phase, args):
        self.stack.append(op)
        name = op if phase == "forward" else f"{op}.backward"
        by_impl = self.trace.ops.setdefault(name, {})
        by_impl[impl] = by_impl.get(impl, 0) + 1
        if op == "group_norm_act" and phase == "forward":
            self.trace.group_norm_forwards[self.part] += 1

    def exit(self, op, impl, phase, args, outs):
        self.stack.pop()
        spec = _op.ops()[op]
        kernel = impl in spec.impls and spec.impls[impl].kind == "kernel"
        if not kernel or outs is None:
            return  # composite implementations' work is their ATen ops'
        tensors = [t for t in _tensors(list(args)) if t is not None]
        moved = sum(_nbytes(t) for t in tensors) + sum(
            _nbytes(t) for t in _tensors(outs) if t is not None)
        dtype = tensors[0].dtype
        self.trace.work.append(Work(self.part, 0, moved, False, dtype, f"{op} {phase}"))
        if op == "qkv_attention":  # its products: 4·N·H·T²·C, the backward 2.5x that
            n, width, t = tensors[0].shape
            flops = 4 * n * (width // 3) * t * t * (2.5 if phase == "backward" else 1)
            self.trace.work.append(Work(self.part, int(flops), 0, True, dtype,
                                        f"{op} {phase} products"))

    # --- ATen and native ops -----------------------------------------------------
    def _answer(self, func, name, args, kwargs):
        try:
            out = func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a value fake tensors cannot know
            if name not in _SYNC:
                raise
            t = args[0]
            return True if t.dtype == torch.bool else 0 if not t.is_floating_point() else 0.0
        if name in _CONVS and self.device_type == "cuda":
            out = _as_cudnn_would(name, args, out)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # without the overload: "aten::empty"
        if name.startswith("prim::"):
            return func(*args, **kwargs)
        if not self.on:  # a step run before the recorded one: answered, not counted
            return self._answer(func, name, args, kwargs)
        if name in _SYNC:
            self.trace.syncs.append(f"{name} at {_where()}")
            try:
                return func(*args, **kwargs)
            except Exception:  # noqa: BLE001 - fake tensors cannot answer: a stand-in value
                t = args[0]
                return True if t.dtype == torch.bool else 0 if not t.is_floating_point() else 0.0
        out = func(*args, **kwargs)
        if name in _CONVS and self.device_type == "cuda":
            out = _as_cudnn_would(name, args, out)
        if name in _FREE or getattr(func, "is_view", False):
            return out
        inputs = [t for t in _tensors((args, kwargs))]
        outputs = [t for t in _tensors(out)]
        if any(t.device.type == "cpu" for t in inputs + outputs) and self.device_type != "cpu":
            self.trace.cpu_tensors.append(f"{name} at {_where()}")
        native = name.startswith("adm_fast_native::")
        self.trace.launches.append(Launch("native" if native else "aten", name, self.part,
                                          self.stack[-1] if self.stack else ""))
        if not native:  # a native kernel's traffic is its op's (exit above)
            inplace = name.endswith("_") or "out" in kwargs
            moved = sum(_nbytes(t) for t in inputs) + (
                0 if inplace else sum(_nbytes(t) for t in outputs))
            dtype = (inputs or outputs)[0].dtype if inputs or outputs else torch.float32
            self.trace.work.append(Work(self.part, _flops(func, args, kwargs, out), moved,
                                        name in _MMA, dtype, name))
        self._layout_checks(name, args, inputs, outputs)
        return out

    def _layout_checks(self, name, args, inputs, outputs) -> None:
        if name in _COPIES and inputs and outputs:
            src = inputs[-1] if name == "aten::copy_" else inputs[0]
            dst = outputs[0]
            if (src.shape == dst.shape and src.dim() >= 3 and src.numel() > 1
                    and src.stride() != dst.stride() and _layout(src) != _layout(dst)):
                self.trace.layout_copies.append(
                    f"{name} {list(src.shape)} {_layout(src)} -> {_layout(dst)} at {_where()}")
        if name in _CONVS and self.device_type == "cuda":
            x = args[1] if name == "aten::convolution_backward" else args[0]
            w = args[2] if name == "aten::convolution_backward" else args[1]
            if (x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 4
                    and not x.is_contiguous(memory_format=torch.channels_last)
                    and x.shape[2] * x.shape[3] > 1):
                if x.shape[1] <= 4:  # the image itself, at a model's input: a small copy
                    self.trace.image_convolutions.append(
                        f"{name} {list(x.shape)} {self.part} at {_where()}")
                    return
                # cuDNN's 16-bit convolutions run NHWC: an NCHW one transposes its
                # input and output (and, backward, the incoming gradient) around it
                moved = 2 * sum(_nbytes(t) for t in inputs + outputs if t.dim() == 4
                                and t is not w)
                self.trace.nchw_conv_bytes += moved
                self.trace.nchw_convolutions.append(
                    f"{name} {list(x.shape)} {self.part} at {_where()}")


def _as_cudnn_would(name: str, args, out):
    """The convolution's outputs in the memory format cuDNN gives them. Without
    a GPU torch's fake convolution assumes its slow NCHW kernels; on a GPU
    cuDNN runs it and answers NHWC for a channels_last input or weight."""
    x = args[1] if name == "aten::convolution_backward" else args[0]
    w = args[2] if name == "aten::convolution_backward" else args[1]
    if x.dim() != 4:
        return out  # conv1d: cuDNN's NCHW (it unsqueezes a contiguous input)
    fmt = torch._C._conv_determine_backend_memory_format(x, w, torch._C._ConvBackend.Cudnn)
    if name == "aten::convolution":
        return out.contiguous(memory_format=fmt)
    return tuple(t if t is None or i == 2 else t.contiguous(memory_format=fmt)
                 for i, t in enumerate(out))


def _sdpa_as_a_gpu_would(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                         scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as an sm_80+ GPU runs it: flash attention
    for fp16/bf16 up to head dim 256, the memory-efficient kernel for fp32
    (torch's default order). Without a GPU torch's choice asks the device and
    takes its math path (a dozen ATen ops and copies); the kernels' own ops
    have fake implementations and autograd formulas."""
    plain = attn_mask is None and not dropout_p and not is_causal and not enable_gqa
    if not plain:
        return None
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return aten._scaled_dot_product_efficient_attention(q, k, v, None, need_lse,
                                                        scale=scale)[0]


def _flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    fn = flop_registry.get(func._overloadpacket)
    if fn is None:
        return 0
    try:
        return int(fn(*args, **kwargs, out_val=out))
    except Exception:  # noqa: BLE001 - an overload the counter does not know: no FLOPs
        return 0


# --- autograd, walked in Python ------------------------------------------------------

def python_grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
                allow_unused=None, is_grads_batched=False, materialize_grads=False,
                only_inputs=True):
    """torch.autograd.grad without torch's engine (first order): the nodes on a
    path from outputs to inputs, each called once all its gradients are in."""
    if create_graph or is_grads_batched:
        raise NotImplementedError("a traced step's backward is first order, unbatched")
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    elif isinstance(grad_outputs, Tensor):
        grad_outputs = [grad_outputs]
    targets = {}
    for i, t in enumerate(inputs):
        edge = torch.autograd.graph.get_gradient_edge(t)
        targets[(edge.node, edge.output_nr)] = i
    target_nodes = {node for node, _ in targets}

    needed: dict[object, bool] = {}

    def reaches(node) -> bool:  # iterative DFS: graphs are thousands of nodes deep
        stack = [(node, iter(node.next_functions))]
        needed.setdefault(node, node in target_nodes)
        while stack:
            cur, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                if stack:
                    needed[stack[-1][0]] = needed[stack[-1][0]] or needed[cur]
                continue
            child = nxt[0]
            if child is None:
                continue
            if child in needed:
                needed[cur] = needed[cur] or needed[child]
                continue
            needed[child] = child in target_nodes
            stack.append((child, iter(child.next_functions)))
        return needed[node]

    roots = []
    for out, g in zip(outputs, grad_outputs):
        if out.grad_fn is None:
            continue
        if reaches(out.grad_fn):
            roots.append((out, g if g is not None else torch.ones_like(out)))
    # consumers per needed node, to call each once its gradients are all in
    waiting = collections.Counter()
    for node, ok in needed.items():
        if ok:
            for child, _ in node.next_functions:
                if child is not None and needed.get(child):
                    waiting[child] += 1
    pending: dict[object, list] = {}

    def deliver(node, nr, g):
        slot = pending.setdefault(node, [None] * len(node._input_metadata))
        slot[nr] = g if slot[nr] is None else slot[nr] + g

    for out, g in roots:
        deliver(out.grad_fn, out.output_nr, g)
    got: list[Tensor | None] = [None] * len(inputs)
    ready = collections.deque(node for node in pending if waiting[node] == 0)
    with torch.no_grad():  # as the engine runs a first-order backward
        _walk(ready, pending, waiting, needed, targets, target_nodes, got, deliver)
    for i, g in enumerate(got):
        if g is None and not allow_unused:
            raise RuntimeError(f"input {i} of the traced backward was not reached")
    return tuple(got)


def _walk(ready, pending, waiting, needed, targets, target_nodes, got, deliver) -> None:
    while ready:
        node = ready.popleft()
        grads = pending.pop(node, None)
        if node in target_nodes and grads is not None:
            for nr, g in enumerate(grads):
                if (node, nr) in targets and g is not None:
                    got[targets[(node, nr)]] = g
        children = [(child, nr) for child, nr in node.next_functions]
        onward = grads is not None and any(c is not None and needed.get(c) for c, _ in children)
        if onward:
            with walking(node):  # what torch's engine would tell saved-tensor hooks
                results = _call_node(node, grads)
        else:
            results = (None,) * len(children)
        for (child, nr), g in zip(children, results):
            if child is None or not needed.get(child):
                continue
            if g is not None:
                deliver(child, nr, g)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)


def _call_node(node, grads):
    metas = node._input_metadata
    if callable(node):  # a C++ node: it takes undefined (None) gradients as the engine does
        out = node(*grads)
    else:  # a Python Function: the engine hands it zeros for missing gradients
        grads = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                 for g, m in zip(grads, metas)]
        out = node.apply(*grads)
        out = out if isinstance(out, tuple) else (out,)
        if len(out) != len(node.next_functions):
            # It returns a gradient per forward argument; the engine keeps the
            # tensors' (adm_fast's Functions record which those were).
            tensor_inputs = getattr(node, "tensor_inputs", None)
            if tensor_inputs is None or len(tensor_inputs) != len(out):
                raise NotImplementedError(
                    f"{type(node).__name__}: cannot tell which of its {len(out)} gradients "
                    "belong to tensor inputs")
            out = tuple(g for g, is_tensor in zip(out, tensor_inputs) if is_tensor)
    return out if isinstance(out, tuple) else (out,)


@contextlib.contextmanager
def _in_part(recorder: _Recorder, part: str):
    """Launches made in this block count as `part` of the step."""
    previous, recorder.part = recorder.part, part
    try:
        yield
    finally:
        recorder.part = previous


class _PythonAutograd(TorchFunctionMode):
    """Routes torch.autograd.grad to python_grad, marking its launches as the
    classifier's backward, and SDPA to the kernel a GPU would pick."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad:
            # a backward that itself asks autograd.grad comes here too
            with _in_part(self.recorder, "classifier_backward"), self:
                return python_grad(*args, **(kwargs or {}))
        if func is torch.nn.functional.scaled_dot_product_attention:
            out = _sdpa_as_a_gpu_would(*args, **(kwargs or {}))
            if out is not None:
                return out
        return func(*args, **(kwargs or {}))


class _EngineParts(TorchFunctionMode):
    """Marks launches of torch's own autograd.grad (CPU traces) as the backward."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad:
            with _in_part(self.recorder, "classifier_backward"):
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _captured_triton(on_launch):
    """Triton launches handed to on_launch(kernel, args, kwargs, grid), not run."""
    from triton.runtime.jit import JITFunction

    real_run = JITFunction.run

    def run(kernel, *args, grid, warmup, **kwargs):
        on_launch(kernel, args, kwargs, grid)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = real_run


class Tracer:
    """Runs steps on fake tensors inside `running()` (autograd — Python-walked
    on CUDA, torch's engine on a CPU —, Triton launches caught), recording
    into `trace` what runs inside `recording()`, each launch with the part of
    the step `tag` set."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.trace = Trace()
        self.recorder = _Recorder(self.trace, device_type)
        self._on = False

    def _triton(self, kernel, args, kwargs, grid) -> None:
        if not self._on:
            return
        from .aot import Launch as AotLaunch

        op = self.recorder.stack[-1] if self.recorder.stack else ""
        self.trace.launches.append(Launch("triton", kernel.fn.__name__, self.recorder.part, op))
        self.trace.triton.append(AotLaunch(kernel, args, kwargs, grid, op))

    @contextlib.contextmanager
    def running(self):
        grads = (_PythonAutograd(self.recorder) if self.device_type == "cuda"
                 else _EngineParts(self.recorder))
        with _captured_triton(self._triton), grads, self.recorder:
            yield

    @contextlib.contextmanager
    def recording(self):
        self._on = self.recorder.on = True
        try:
            with _op.observe(self.recorder):
                yield self.trace
        finally:
            self._on = self.recorder.on = False

    def tag(self, part: str, fn):
        """fn, whose launches count as `part` of the step."""
        recorder = self.recorder

        def wrapped(*args, **kwargs):
            with _in_part(recorder, part):
                return fn(*args, **kwargs)
        return wrapped


@contextlib.contextmanager
def fake_device(device_type: str, arch: int = 90):
    """Fake tensors (made with torch.device(device_type) in force), as seen by
    adm_fast's kernels on that device. CUDA needs a CUDA build of torch (no
    GPU): a CPU build cannot even record autograd on a CUDA tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if device_type == "cuda" and torch.version.cuda is None:
        raise RuntimeError(f"tracing a GPU step needs a CUDA build of PyTorch (no GPU needed); "
                           f"this one is {torch.__version__}")
    from ..kernels import qkv_attention

    saved = dict(qkv_attention.TARGET_ARCH)
    qkv_attention.TARGET_ARCH[device_type] = arch
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # older torch: wrap_triton launches directly outside compile
        set_wrap_triton_enabled = None
    routing = (set_wrap_triton_enabled(False) if set_wrap_triton_enabled is not None
               else contextlib.nullcontext())
    try:
        with FakeTensorMode(allow_non_fake_inputs=False), routing, torch.device(device_type):
            yield
    finally:
        qkv_attention.TARGET_ARCH.clear()
        qkv_attention.TARGET_ARCH.update(saved)
