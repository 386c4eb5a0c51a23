"""Kernels must agree with the reference before auto uses them.

A kernel right on the machines it was tested on can be wrong on another: a
GPU generation, driver or compiler that miscompiles it, an extension built
with other flags. So auto, before it uses an implementation for a call
signature on a device, driver and build it has not seen, runs it on the
call's own inputs and compares its outputs — and, when autograd will want the
backward, its gradients for a fixed random cotangent — with the reference's.
Every implementation auto may pick is checked: the one the static order gives
and each candidate autotune would time, kernel or composite (SDPA). An
explicitly named backend runs what was named, unchecked (the user chose it),
and eager is the reference itself.

The rule is flash-attention's: the implementation's largest error against
the reference computed in fp64 (on CUDA, for fp16/bf16 calls, in fp32, as
flash-attention upcasts) may be at most `Op.verify_factor` (2 by default; an
Impl may declare its own) times the error torch's own computation at the
call's precision — the eager reference on the same inputs — makes against
it, plus a floor of max(1e-6, the dtype's epsilon) times the reference's
largest magnitude, so that what torch computes exactly passes
(tests/conftest.assert_lowp_close is the same rule). Each output and each
gradient is judged alone. In fp32 the floor (8 units in the last place)
carries most of the weight, the two errors being a few units each and their
ratio noise; in fp16/bf16 the factor does.

The verdict is stored in $ADM_FAST_CACHE/verify.json under a key naming the
device (CPU model and thread count; GPU name, compute capability, driver and
CUDA version), torch's version, the implementation's build (the compiled
extension's file, Triton's version and kernel sources: a new build is checked
again) and the call signature (every argument's dtype, shape and layout, the
other arguments' values, whether gradients are wanted). The first verdict
stored wins, as in autotune.json, so every process sharing the folder and
every later run makes the same choices: a resumed sampling run gives the same
bytes. A refused implementation is passed over for that signature, with one
warning per op and implementation in a process; `adm-fast info` lists what is
refused here, and `adm_fast.explain` says why for a call.

When it is not checked: under torch.compile tracing and on meta or fake
tensors (no values), under torch.jit tracing or a dispatch mode (whose users
would see the check's work), inside CUDA-graph capture (nothing may run
outside the graph), and when an input holds NaN or inf (it would judge the
inputs, not the kernel). Then auto uses the implementation unchecked for that
call and does not remember the decision, so the next real call checks it;
under torch.compile auto passes over what this process has refused for any
signature (all a traced graph can read). If a check runs out of memory, or
the reference itself fails, the implementation is trusted for this process
and nothing is stored.

Cost: once per call signature per machine and build, one more run of the
implementation and two of the reference (forward and backward when grads are
wanted); later runs read the verdict. On 2 CPU cores, the demo's first run
makes 98 checks in 3.2-4.4 s (most of it fp64 convolutions at batch 100-297),
the test suite 577 in 4.4 s. ADM_FAST_VERIFY=0 turns the check off
and ignores stored verdicts: auto then trusts every implementation as it is
ordered or timed, and a kernel that is wrong on this device, driver or build
(a miscompilation, a driver bug) gives wrong outputs silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import warnings

import torch
from torch import Tensor

from . import backend as _backend
from . import store
from .impl import Call, Impl, dtype_name, holds_values, layout_of

log = logging.getLogger("adm_fast.verify")

_FILE = "verify.json"
_STATE: dict[str, object] = {"table": None, "path": None}
_REFUSED: dict[tuple[str, str], str] = {}  # (op, backend) -> a reason: what compile reads
_TRUSTED: dict[str, str] = {}  # key -> why it could not be checked (this process only)
_INCONCLUSIVE: dict[str, int] = {}  # key -> checks whose reference error was not finite
_WARNED: set[tuple[str, str]] = set()
_CUDA: dict[int, str] = {}
_LOCAL = threading.local()
_MAX_INCONCLUSIVE = 3  # then trusted for the process, rather than re-checked at every call
STATS = {"checks": 0, "seconds": 0.0}  # what checking cost this process


class VerificationWarning(RuntimeWarning):
    """An implementation disagreed with the reference: auto passes it over."""


def enabled() -> bool:
    return os.environ.get("ADM_FAST_VERIFY", "1") != "0"


def unverified() -> int:
    """How many times, in this thread, auto let an implementation run
    unchecked because the call could not be checked (no values, capture,
    NaN/inf inputs). Op.checked_decision keeps a decision only if this did not
    move while it was made."""
    return getattr(_LOCAL, "count", 0)


def _unverified(op, impl: Impl, why: str) -> list[str]:
    _LOCAL.count = unverified() + 1
    log.debug("%s on %s not checked against the reference: %s", op.name, impl.backend, why)
    return []


# --- what a verdict is keyed by --------------------------------------------------
def device_id(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu={store.cpu_model()}"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CUDA:
            p = torch.cuda.get_device_properties(index)
            _CUDA[index] = (f"cuda={p.name}|sm_{p.major}{p.minor}|driver={_driver()}"
                            f"|cuda_runtime={torch.version.cuda or torch.version.hip}")
        return _CUDA[index]
    return device.type


def _driver() -> str:
    """The GPU driver's version: its kernel module's, else the CUDA driver API's."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            found = re.search(r"Kernel Module\s+(\S+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        import ctypes
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-api-{version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def _threads(device_type: str) -> str:
    # The CPU kernels split their work by thread; another count is another run.
    return f"threads={torch.get_num_threads()}" if device_type == "cpu" else ""


def signature(op, call: Call) -> str:
    """Every argument: tensors' dtype, shape, layout (and whether they want a
    gradient), the other arguments' values."""
    parts = []
    for (_, name), a in zip(op.args, call.args):
        if isinstance(a, Tensor):
            wants = ",grad" if call.grad and a.requires_grad else ""
            parts.append(f"{name}={dtype_name(a.dtype)}{list(a.shape)}:{layout_of(a)}{wants}")
        else:
            parts.append(f"{name}={a!r}")
    return f"{op.name}({', '.join(parts)})"


def factor(op, impl: Impl) -> float:
    return float(op.verify_factor if impl.verify_factor is None else impl.verify_factor)


def _build(impl: Impl) -> str:
    return f"{impl.backend}={_backend.get(impl.backend).build_id()}"


def key(op, impl: Impl, call: Call) -> str:
    device = next(iter(call.tensors.values())).device
    return "|".join([device_id(device), _threads(device.type), f"torch={torch.__version__}",
                     _build(impl), signature(op, call)])


_TEXT = ("op", "impl", "call", "what", "device", "threads", "torch", "build")


def _valid(v) -> bool:
    """A verdict as _verdict writes it (flat: numbers, text, a bool); anything
    else is checked again."""
    num = (int, float)
    return (isinstance(v, dict) and all(isinstance(x, (str, int, float)) for x in v.values())
            and isinstance(v.get("ok"), bool)
            and isinstance(v.get("error"), num) and isinstance(v.get("allowed"), num)
            and not isinstance(v.get("error"), bool) and not isinstance(v.get("allowed"), bool)
            and all(isinstance(v.get(name), str) for name in _TEXT))


def _stored(k: str) -> dict | None:
    return store.lookup(_STATE, _FILE, k, _valid)  # None: absent or damaged, checked again


# --- the decision ----------------------------------------------------------------
def reasons(op, impl: Impl, call: Call) -> list[str]:
    """Why auto must not use impl for this call ([] when it may): its stored
    verdict, or one measured now on call.args."""
    if not enabled() or _backend.get(impl.backend).is_reference:
        return []
    if torch.compiler.is_compiling():  # no values here, and a traced graph reads only this
        why = _REFUSED.get((op.name, impl.backend))
        return [why] if why else []
    why = _no_values(call)
    if why:
        return _unverified(op, impl, why)
    k = key(op, impl, call)
    verdict = _stored(k)
    if verdict is None:
        if k in _TRUSTED:
            return []
        why = _not_now(call)
        if why:
            return _unverified(op, impl, why)
        verdict = _check(op, impl, call, k)
        if verdict is None:
            return [] if k in _TRUSTED else _unverified(op, impl, "not conclusive")
        verdict = store.record(_STATE, _FILE, k, verdict, valid=_valid)
        if not verdict["ok"]:
            _warn(op, impl, verdict)
    if verdict["ok"]:
        return []
    why = refusal(verdict)
    _REFUSED.setdefault((op.name, impl.backend), why)
    return [why]


def refusal(verdict: dict) -> str:
    return (f"disagreed with the reference on this machine ({verdict.get('what', '?')}: max "
            f"error {verdict['error']:.3g} > {verdict['allowed']:.3g} allowed); auto passes "
            f"it over (ops/verify.py)")


def _warn(op, impl: Impl, verdict: dict) -> None:
    if (op.name, impl.backend) in _WARNED:
        log.warning("%s on %s: %s for %s", op.name, impl.backend, refusal(verdict),
                    verdict.get("call"))
        return
    _WARNED.add((op.name, impl.backend))
    warnings.warn(
        f"adm_fast: {op.name} on {impl.backend} disagrees with the reference for "
        f"{verdict.get('call')}: {verdict.get('what')} max error {verdict['error']:.3g} > "
        f"{verdict['allowed']:.3g} allowed ({factor(op, impl):g}x torch's own error at this "
        f"precision, plus a floor). auto will not use it for such calls on this machine "
        f"and build (stored in {store.path(_FILE)}; `adm-fast info` lists what is refused; "
        f"later refusals of {impl.backend}'s {op.name} go to the adm_fast.verify log)",
        VerificationWarning, stacklevel=2)


def _no_values(call: Call) -> str | None:
    if torch.jit.is_tracing():
        return "torch.jit is tracing"
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    if is_in_torch_dispatch_mode():
        return "a dispatch mode is active"
    if not holds_values(call.tensors.values()):
        return "its tensors hold no values (meta or fake)"
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in call.tensors.values()):
        return "its tensors are functorch's wrappers (vmap, grad)"
    return None


def _not_now(call: Call) -> str | None:
    if call.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    for t in call.tensors.values():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return "an input holds NaN or inf"
    return None


# --- the measurement -------------------------------------------------------------
class _Mismatch(Exception):
    pass


def _check(op, impl: Impl, call: Call, k: str) -> dict | None:
    """The verdict for impl on call.args, or None (inconclusive, or trusted:
    out of memory, the reference failed)."""
    start = time.perf_counter()
    up = _upcast(call)
    verdict = None
    try:
        with _no_autocast(call.device_type):
            low, cot = _evaluate(lambda a: op.reference(*a), op, call, None, None)
            ref, _ = _evaluate(lambda a: op.reference(*a), op, call, up, cot)
            try:
                got, _ = _evaluate(lambda a: op.run(impl, a, call.grad), op, call, None, cot,
                                   low)
            except _Mismatch as e:
                verdict = _verdict(op, impl, call, False, float("inf"), 0.0, str(e))
            except Exception as e:  # noqa: BLE001 - a kernel that fails here is refused
                if _out_of_memory(e):
                    raise
                verdict = _verdict(op, impl, call, False, float("inf"), 0.0,
                                   f"raised {type(e).__name__}: {str(e)[:200]}")
            if verdict is None:
                verdict = _judge(op, impl, call, got, low, ref)
    except Exception as e:  # noqa: BLE001 - out of memory, or the reference failed
        _TRUSTED[k] = f"{type(e).__name__}: {e}"
        if _out_of_memory(e) and call.device_type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(f"adm_fast: {op.name} on {impl.backend} could not be checked against "
                      f"the reference for {signature(op, call)} ({type(e).__name__}: "
                      f"{str(e)[:200]}); auto uses it unchecked in this process",
                      VerificationWarning, stacklevel=3)
        return None
    finally:
        STATS["checks"] += 1
        STATS["seconds"] += time.perf_counter() - start
    if verdict is None:
        _INCONCLUSIVE[k] = _INCONCLUSIVE.get(k, 0) + 1
        if _INCONCLUSIVE[k] >= _MAX_INCONCLUSIVE:
            _TRUSTED[k] = "the reference's own error was not finite"
    log.debug("%s on %s: %s in %.1f ms", op.name, impl.backend, verdict,
              1e3 * (time.perf_counter() - start))
    return verdict


def _out_of_memory(e: Exception) -> bool:
    # CPU allocators raise a plain RuntimeError: no verdict on a kernel for that
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e)
                                         or "can't allocate memory" in str(e)))


def _upcast(call: Call) -> torch.dtype:
    # fp64 wherever it is affordable; a GPU's fp64 is slow, and fp32 is 2^13
    # finer than fp16 and 2^16 than bf16 (flash-attention's upcast reference).
    floats = [t.dtype for t in call.tensors.values() if t.is_floating_point()]
    if call.device_type == "cuda" and floats and all(
            d in (torch.float16, torch.bfloat16) for d in floats):
        return torch.float32
    return torch.float64


def _no_autocast(device_type: str):
    # The three runs compare arithmetic at the call's own dtypes.
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _evaluate(fn, op, call: Call, dtype, cotangents, like=None):
    """[(what, value)]: fn's outputs on call.args (floating tensors cast to
    dtype) and, when the call wants them, the gradients of Σ out·cotangent
    for the inputs that require grad; and the cotangents. cotangents None:
    drawn from a fixed seed (the global RNG is left alone: a run's bytes must
    not depend on whether it checked). like: values whose outputs' number,
    shapes and dtypes these must have."""
    leaves = [_cast(a, dtype).requires_grad_(a.requires_grad and call.grad)
              if isinstance(a, Tensor) else a for a in call.args]
    with torch.enable_grad() if call.grad else torch.no_grad():
        outs = fn(leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if like is not None:
            want = [v for what, v in like if what.startswith("output")]
            if len(outs) != len(want):
                raise _Mismatch(f"{len(outs)} outputs, the reference's {len(want)}")
            for i, (o, r) in enumerate(zip(outs, want)):
                if o.shape != r.shape or o.dtype != r.dtype:
                    raise _Mismatch(f"output {i} is {dtype_name(o.dtype)}{list(o.shape)}, the "
                                    f"reference's {dtype_name(r.dtype)}{list(r.shape)}")
        if cotangents is None:
            gen = torch.Generator().manual_seed(0)
            cotangents = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
                          for o in outs]
        values = [(f"output {i}", o.detach()) for i, o in enumerate(outs)]
        if call.grad:
            names = [name for (_, name), a in zip(op.args, leaves)
                     if isinstance(a, Tensor) and a.requires_grad]
            wanted = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
            pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs],
                                      allow_unused=True) if pairs else [None] * len(wanted)
            values += [(f"grad of {n}", torch.zeros_like(w) if g is None else g)
                       for n, g, w in zip(names, got, wanted)]
    return values, cotangents


def _cast(t: Tensor, dtype) -> Tensor:
    return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()


def _judge(op, impl: Impl, call: Call, got, low, ref) -> dict | None:
    """The worst of got's outputs and gradients, each against ref, allowed
    verify_factor × low's error against ref plus the floor; None when low's
    error is not finite (nothing to measure by)."""
    times = factor(op, impl)
    rows = [torch.stack([_max_err(g, r), _max_err(lo, r),
                         r.abs().max().double() * max(1e-6, torch.finfo(lo.dtype).eps)])
            for (_, g), (_, lo), (_, r) in zip(got, low, ref) if r.numel()]
    if not rows:
        return _verdict(op, impl, call, True, 0.0, 0.0, "")
    worst = None
    measured = torch.stack(rows).cpu().tolist()  # one sync for all of them
    for (what, _), (err, base, floor) in zip([v for v in got if v[1].numel()], measured):
        if not (base < float("inf") and floor < float("inf")):  # NaN too
            return None
        err = err if err == err else float("inf")
        allowed = times * base + floor
        ratio = err / allowed if allowed > 0 else (0.0 if err == 0 else float("inf"))
        if worst is None or ratio > worst[0]:
            worst = (ratio, what, err, allowed)
    ratio, what, err, allowed = worst
    return _verdict(op, impl, call, ratio <= 1, err, allowed, what)


def _max_err(a: Tensor, ref: Tensor) -> Tensor:
    # NaN where a is NaN (torch's max propagates it): read as an infinite error
    return (a.to(ref.dtype) - ref).abs().max().double()


def _verdict(op, impl: Impl, call: Call, ok: bool, error: float, allowed: float,
             what: str) -> dict:
    device = next(iter(call.tensors.values())).device
    return {"ok": bool(ok), "op": op.name, "impl": impl.backend, "call": signature(op, call),
            "device": device_id(device), "threads": _threads(device.type),
            "torch": torch.__version__, "build": _build(impl), "what": what,
            "error": float(error), "allowed": float(allowed),
            "factor": factor(op, impl)}


# --- what is refused here (adm-fast info) ----------------------------------------
def refused_here() -> list[dict]:
    """The stored refusals that hold for this machine's devices, this torch and
    the builds installed now."""
    devices = {device_id(torch.device("cpu"))}
    if torch.cuda.is_available():
        devices |= {device_id(torch.device("cuda", i)) for i in range(torch.cuda.device_count())}
    builds = {name: f"{name}={b.build_id()}" for name, b in _backend.backends().items()}
    return [v for _, v in sorted(store.table(_STATE, _FILE).items())
            if _valid(v) and not v["ok"] and v.get("device") in devices
            and v.get("torch") == torch.__version__ and builds.get(v.get("impl")) == v.get("build")]
