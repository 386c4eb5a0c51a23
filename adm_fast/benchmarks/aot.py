"""Compile adm_fast's Triton kernels for NVIDIA GPUs on a machine without one.

CI has no GPU, and Triton's interpreter checks what a kernel computes, not
that it compiles. Here the launchers run on CPU tensors with the launch
itself intercepted; each launch (kernel, arguments, meta-parameters) is then
compiled ahead of time for sm_80/sm_90 with the very specialisation a real
launch would get (dtypes, unit strides, 16-byte alignment), through Triton's
bundled ptxas, and its registers, spills and vector loads are reported. It
covers the kernel modules the op registry's Triton implementations name
(TritonImpl.module), at the launch shapes CASES gives for each.

    python -m adm_fast.benchmarks.aot         # table; exit status 1 on failure

Must run without TRITON_INTERPRET (the kernels must be JIT functions).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Shared memory one block may use (bytes): sm_90 227 KB, sm_80 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}


@dataclass
class Launch:
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    case: str = ""


@contextlib.contextmanager
def captured() -> Iterator[list[Launch]]:
    """Record every Triton launch (instead of running it) inside the block."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel for this launch's specialisation on sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    k = launch.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, launch.kwargs, bound,
                                                         specialization, options)
    src = ASTSource(k, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def stand_in(launch: Launch) -> Launch:
    """The launch with tensors that hold no data (fake, meta, or a GPU's) in
    place of small CPU tensors of the same dtype and 16-byte alignment: what a
    launch's specialisation reads of a tensor. For launches captured on fake
    tensors (adm-fast bench plan)."""
    def swap(a):
        if not isinstance(a, torch.Tensor) or (a.device.type == "cpu"
                                               and type(a) is torch.Tensor):
            return a
        size = a.element_size()
        base = torch.empty(128 // size, dtype=a.dtype)  # CPU allocations are 64-byte aligned
        return base[(a.storage_offset() * size % 16) // size:]
    return Launch(launch.kernel, tuple(swap(a) for a in launch.args),
                  {k: swap(v) for k, v in launch.kwargs.items()}, launch.grid, launch.case)


def specialization_key(launch: Launch) -> tuple:
    """Launches with equal keys compile to the same kernel: the same function,
    meta-parameters, dtypes, 16-byte alignments and integer specialisations."""
    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, bool) or not isinstance(a, int):
            return (type(a).__name__, a if isinstance(a, (bool, str)) else None)
        return ("int", a == 1, a % 16 == 0)
    return (launch.kernel.fn.__module__, launch.kernel.fn.__qualname__,
            tuple(describe(a) for a in launch.args),
            tuple(sorted((k, describe(v) if isinstance(v, torch.Tensor) else v)
                         for k, v in launch.kwargs.items())))


# What an allowed spill is, for the table's notes and the summary.
ALLOWED_SPILL = "fp32 head-dim 192/256 attention"


def spill_allowed(launch: Launch) -> bool:
    """The one case allowed to spill registers, by the kernel's arguments: fp32
    attention past head dim 128 (PREC 1, BLOCK_D 192/256), where three TF32
    products per tile need more registers than exist (auto leaves fp32
    attention to SDPA); everything else must not spill. The launchers pass
    PREC and BLOCK_D by position."""
    args = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.kwargs}
    return (launch.kernel.fn.__name__.startswith("attn_") and args.get("PREC") == 1
            and args.get("BLOCK_D", 0) > 128)


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, spill bytes: stack frame + local memory) of a
    compiled kernel, from its cubin."""
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = int(re.search(r"STACK:(\d+)", out).group(1)) + int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, spill


def vector_width(compiled) -> int:
    """The widest global load in the PTX, in bytes (16 = 128-bit vector loads)."""
    widths = [int(v) * int(b) // 8 for v, b in
              re.findall(r"ld\.global(?:\.[a-z]+)*\.v(\d)\.b(\d+)", compiled.asm["ptx"])]
    scalar = [int(b) // 8 for b in re.findall(r"ld\.global(?:\.[a-z]+)*\.b(\d+)",
                                              compiled.asm["ptx"])]
    return max(widths + scalar, default=0)


@contextlib.contextmanager
def as_if_on_gpu(arch: int = 90):
    """The launchers pick launch shapes by device type (and architecture): make
    CPU tensors get an sm_<arch> GPU's, so that what is compiled is what that
    GPU would run."""
    from ..kernels import group_norm_act, qkv_attention

    tables = (group_norm_act.TILE, group_norm_act.FUSED_MAX, group_norm_act.TARGET_PROGRAMS)
    saved = [t.get("cpu") for t in tables]
    saved_arch = qkv_attention.TARGET_ARCH.get("cpu")
    for t in tables:
        t["cpu"] = t["cuda"]
    qkv_attention.INTERPRETED_DEVICES.discard("cpu")
    qkv_attention.TARGET_ARCH["cpu"] = arch
    try:
        yield
    finally:
        for t, v in zip(tables, saved):
            t["cpu"] = v
        qkv_attention.INTERPRETED_DEVICES.add("cpu")
        qkv_attention.TARGET_ARCH["cpu"] = saved_arch


def _channels_last(t):  # channels_last, or for [N, C, T] the view of a channels_last map
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


Cases = list[tuple[str, Callable[[], object]]]


def _group_norm_act_cases(group_norm_act) -> Cases:
    cases: Cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dn = str(dtype).replace("torch.", "")
        # The [N, C, T] ones are attention's norm on 8x8 and 16x16 maps, one
        # group in registers.
        for shape, cl in (((8, 256, 32, 32), False), ((8, 256, 32, 32), True),
                          ((1, 128, 128, 128), False), ((1, 128, 128, 128), True),
                          ((8, 512, 64), True), ((4, 256, 256), True)):
            x = torch.randn(shape, dtype=dtype)
            if cl:
                x = _channels_last(x)
            c, n = shape[1], shape[0]
            w, b = torch.ones(c), torch.zeros(c)
            s, sh = torch.zeros(n, 2 * c, dtype=dtype).chunk(2, dim=1)
            fmt = ("NTC" if x.dim() == 3 else "NHWC") if cl else "NCHW"
            name = f"gn {list(shape)} {fmt} {dn}"

            def fwd(x=x, w=w, b=b, s=s, sh=sh):
                group_norm_act.forward(x, 32, w, b, s, sh, 1e-5, True)

            def bwd(x=x, w=w, b=b, s=s, sh=sh, n=n):
                mean = torch.zeros(n, 32)
                group_norm_act.backward(torch.randn_like(x), x, 32, w, b, s, sh, mean, mean + 1,
                                        True, True)
            cases += [(name + " fwd", fwd), (name + " bwd", bwd)]
    return cases


def _diffusion_step_cases(diffusion_step) -> Cases:
    cases: Cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dn = str(dtype).replace("torch.", "")
        x = torch.randn(16, 3, 64, 64, dtype=dtype)
        coefs = torch.rand(8, 16)
        # NCHW throughout, and as a GPU sampler has them: the model output and
        # the guidance gradient channels_last, x and the noise NCHW.
        for layout, cl in (("", False), (" NHWC out+grad", True)):
            out = torch.randn(16, 6, 64, 64, dtype=dtype)
            grad = torch.randn_like(x)
            if cl:
                out, grad = _channels_last(out), _channels_last(grad)
            cases.append((f"ddpm_step{layout} {dn}", lambda x=x, out=out, g=grad, c=coefs:
                          diffusion_step.ddpm_step(x, out, torch.randn_like(x), c, g, "eps",
                                                   "learned_range", True)))
            cases.append((f"ddim_step{layout} {dn}", lambda x=x, out=out, g=grad, c=coefs:
                          diffusion_step.ddim_step(x, out, torch.randn_like(x), c[:7], g, "eps",
                                                   True, 0.5)))
    return cases


def _qkv_attention_cases(qkv_attention) -> Cases:
    cases: Cases = []
    for dtype in (torch.bfloat16, torch.float32):
        dn = str(dtype).replace("torch.", "")
        for heads, c, t, cl in ((4, 64, 1024, False), (2, 96, 256, False),
                                (2, 128, 1024, False), (2, 192, 256, False),
                                (1, 256, 1024, False), (8, 64, 65, False),
                                # qkv from conv1x1 on channels_last maps: channels contiguous
                                (4, 64, 1024, True), (2, 128, 256, True), (2, 192, 256, True),
                                (1, 256, 1024, True), (8, 64, 65, True)):
            qkv = torch.randn(2, 3 * heads * c, t, dtype=dtype)
            dout = torch.randn(2, heads * c, t, dtype=dtype)
            if cl:
                qkv, dout = _channels_last(qkv), _channels_last(dout)

            def attn(qkv=qkv, dout=dout, heads=heads):
                out, lse = qkv_attention.forward(qkv, heads, True)
                qkv_attention.backward(dout, qkv, out, lse, heads, True)
            cases.append((f"attention hd{c} T{t}{' NTC' if cl else ''} {dn}", attn))
    return cases


# The launch shapes per kernel module: ADM-like shapes, layouts and dtypes.
CASES = {"group_norm_act": _group_norm_act_cases, "diffusion_step": _diffusion_step_cases,
         "qkv_attention": _qkv_attention_cases}


def kernel_modules() -> list[str]:
    """The kernel modules the op registry's Triton implementations name."""
    from ..ops.backends import TRITON

    return sorted(TRITON.modules)


def representative_launches(arch: int = 90) -> list[Launch]:
    """The launches of every kernel module the registry names, as an sm_<arch>
    GPU would make them."""

    launches: list[Launch] = []
    for module in kernel_modules():
        if module not in CASES:
            raise KeyError(f"adm_fast/kernels/{module}.py has no launch shapes in aot.CASES")
        for name, run in CASES[module](importlib.import_module(f"adm_fast.kernels.{module}")):
            with as_if_on_gpu(arch), captured() as got:
                run()
            for launch in got:
                launch.case = name
            launches += got
    return launches


def main(archs=(90, 80)) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs JIT kernels")
        return 2
    failures, spills, allowed, count = 0, 0, 0, 0
    print(f"{'case':<34} {'kernel':<26} {'arch':>4} {'regs':>4} {'spill':>5} {'vec':>3} "
          f"{'smem':>7}")
    for arch in archs:
        seen = set()
        for launch in representative_launches(arch):
            name = launch.kernel.fn.__name__
            if (name, launch.case) in seen:
                continue
            seen.add((name, launch.case))
            count += 1
            try:
                compiled = compile_launch(launch, arch)
                regs, spill = resource_usage(compiled)
                smem = compiled.metadata.shared
                ok_spill = spill > 0 and spill_allowed(launch)
                bad_spill = spill > 0 and not ok_spill
                spills += bad_spill
                allowed += ok_spill
                over = smem > SHARED_LIMIT[arch]
                failures += over
                note = (f"  over the {SHARED_LIMIT[arch]} B shared-memory limit" if over else
                        "  spills" if bad_spill else
                        f"  spills (allowed: {ALLOWED_SPILL})" if ok_spill else "")
                print(f"{launch.case:<34} {name:<26} {arch:>4} {regs:>4} {spill:>5} "
                      f"{vector_width(compiled):>3} {smem:>7}{note}")
            except Exception as e:  # report every failure, then fail
                failures += 1
                print(f"{launch.case:<34} {name:<26} {arch:>4} FAILED: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")
    print(f"{count} compilations: {failures} failures, {allowed} spill within the allowed "
          f"{ALLOWED_SPILL} cases, {spills} unexpected")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
