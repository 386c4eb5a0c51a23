"""Preferences measured at run time, where a table measured once is wrong.

CPUs differ: on one x86-64 machine SDPA's CPU flash kernel lost to the eager
attention below 1024 tokens, on another (AVX2 EPYC) it won from 256. So, for
the ops that declare candidates (`Op.tune`), auto times each candidate that
supports the call on the call's own inputs, once per call signature, and keeps
the fastest. Decisions are stored per machine (CPU model, threads, torch
version, and the compiled kernels' build: a rebuilt extension is timed anew)
in $ADM_FAST_CACHE/autotune.json (default ~/.cache/adm_fast), so a
later run on the same machine makes the same choices: a resumed sampling run
gives the same bytes. ADM_FAST_AUTOTUNE=0 turns it off (the static order then
applies, as under torch.compile). Timings are taken in interleaved rounds and a
choice needs a clear win (below); `adm-fast info --retune` drops this
machine's stored choices so the next run times them again.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from . import store
from .impl import Call, Impl, dtype_name, holds_values, layout_of

_STATE: dict[str, object] = {"table": None, "path": None}
_FILE = "autotune.json"


def enabled() -> bool:
    return os.environ.get("ADM_FAST_AUTOTUNE", "1") != "0" and not torch.compiler.is_compiling()


def active(call: Call) -> bool:
    """Whether pick() may time candidates for this call (the op checks them
    against the reference first, ops/verify.py: only what would be timed).
    Not on fake or meta tensors: nothing to time, and a choice made on them
    must not be stored."""
    return enabled() and call.device_type == "cpu" and holds_values(call.tensors.values())


def _machine() -> str:
    return (f"{store.cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|kernels={store.module_build('adm_fast._C_cpu')}")


def _valid(v) -> bool:
    return isinstance(v, str)  # a backend's name; anything else is timed again


def _table() -> dict[str, object]:
    return store.table(_STATE, _FILE)


def _record(k: str, choice: str) -> str:
    """Store choice for k, unless a process sharing the cache (another rank of
    the same torchrun job, timing at the same moment) stored one first: then
    that one. So every process on the machine, and every later run, makes the
    same choice, and a resumed run gives the bytes an uninterrupted one would."""
    return store.record(_STATE, _FILE, k, choice, valid=_valid)


def key(op, call: Call) -> str:
    tensors = ",".join(f"{n}:{dtype_name(t.dtype)}:{list(t.shape)}:{layout_of(t)}"
                       for n, t in call.tensors.items())
    feats = ",".join(f"{k}={v}" for k, v in sorted(call.features.items()))
    return f"{_machine()}|{op.name}|{tensors}|{feats}|grad={call.grad}"


# Timing that load cannot fool: every candidate is timed in each of ROUNDS
# rounds, the order rotating, so a busy spell slows all of them alike; a
# challenger replaces the static order's choice only with a clear win (MARGIN
# faster by median and faster in most rounds), and timings that scatter more
# than NOISY (median absolute deviation over the median) are not stored: the
# static order holds for this process and the next run times again.
ROUNDS = 5
MARGIN = 0.10
NOISY = 0.25


def _once(op, impl: Impl, args, grad: bool) -> None:
    """The call on impl (forward and backward when autograd will want it), on
    detached copies of the inputs."""
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
              else a for a in args]
    with torch.enable_grad() if grad else torch.no_grad():
        out = op.run(impl, leaves, grad)
        if grad:
            outs = out if isinstance(out, tuple) else (out,)
            wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad([o.float().sum() for o in outs], wanted, allow_unused=True)


def _time_ms(op, impl: Impl, args, grad: bool) -> float:
    start = time.perf_counter()
    _once(op, impl, args, grad)
    return 1e3 * (time.perf_counter() - start)


def _rounds(op, candidates: list[Impl], args, grad: bool) -> dict[str, list[float]]:
    for impl in candidates:  # warm-up: first-call costs are not the kernel's
        _once(op, impl, args, grad)
    times: dict[str, list[float]] = {impl.backend: [] for impl in candidates}
    for r in range(ROUNDS):
        shift = r % len(candidates)
        for impl in candidates[shift:] + candidates[:shift]:
            times[impl.backend].append(_time_ms(op, impl, args, grad))
    return times


def _spread(values: list[float]) -> float:
    mid = statistics.median(values)
    return statistics.median(abs(v - mid) for v in values) / mid if mid > 0 else 0.0


def judge(times: dict[str, list[float]], default: str):
    """(choice, trusted): the static order's `default` unless another candidate
    wins clearly; trusted when every candidate's rounds agree with each other."""
    med = {name: statistics.median(v) for name, v in times.items()}
    best = min(med, key=med.get)
    choice = default
    if best != default:
        wins = sum(b < d for b, d in zip(times[best], times[default]))
        if med[best] <= (1 - MARGIN) * med[default] and wins > len(times[best]) // 2:
            choice = best
    return choice, all(_spread(v) <= NOISY for v in times.values())


def pick(op, call: Call, args, candidates: list[Impl],
         default: Impl | None = None) -> Impl | None:
    """The fastest of candidates for this call (all of which support it), from
    the machine's stored decision or measured now; None when not tuning.
    default: the static order's choice, which holds without a clear win."""
    if len(candidates) < 2 or not active(call):
        return None
    k = key(op, call)
    by_name = {impl.backend: impl for impl in candidates}
    stored = store.lookup(_STATE, _FILE, k, _valid)
    if stored in by_name:  # else absent, damaged or refused
        return by_name[stored]
    fallback = default.backend if default is not None and default.backend in by_name \
        else candidates[0].backend
    choice, trusted = judge(_rounds(op, candidates, args, call.grad), fallback)
    if not trusted:
        return by_name[fallback]
    return by_name.get(_record(k, choice), by_name[choice])


def forget() -> int:
    """Drop this machine's stored choices (`adm-fast info --retune`): the next
    processes time their candidates again (this one keeps the decisions its
    ops remember: Op._decisions). Returns how many were dropped."""
    prefix = _machine() + "|"
    return store.drop(_STATE, _FILE, lambda k: k.startswith(prefix), _valid)
