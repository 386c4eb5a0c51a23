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
applies, as under torch.compile).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Dict, List, Optional

import torch

try:
    import fcntl
except ImportError:  # not POSIX: the read-merge-write below is then unlocked
    fcntl = None

from .impl import Call, Impl, dtype_name, layout_of

_STATE: Dict[str, object] = {"table": None, "path": None}


def enabled() -> bool:
    return os.environ.get("ADM_FAST_AUTOTUNE", "1") != "0" and not torch.compiler.is_compiling()


def _machine() -> str:
    return (f"{_cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|kernels={_kernels_build()}")


def _cpu_model() -> str:
    if "cpu" not in _STATE:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _STATE["cpu"] = model
    return _STATE["cpu"]


def _kernels_build() -> str:
    """Size and mtime of the CPU extension's file: decisions measured against
    older kernels must not outlive them."""
    if "build" not in _STATE:
        try:
            spec = importlib.util.find_spec("adm_fast._C_cpu")
            st = os.stat(spec.origin) if spec is not None and spec.origin else None
            _STATE["build"] = f"{st.st_size}:{int(st.st_mtime)}" if st else "none"
        except (ImportError, OSError, ValueError):
            _STATE["build"] = "none"
    return _STATE["build"]


def _path() -> str:
    root = os.environ.get("ADM_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adm_fast")
    return os.path.join(root, "autotune.json")


def _read(path: str) -> Dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again


def _table() -> Dict[str, str]:
    path = _path()
    if _STATE["path"] != path:  # the cache folder may change (tests do)
        _STATE.update(table=_read(path), path=path)
    return _STATE["table"]


def _record(k: str, choice: str) -> str:
    """Store choice for k, unless a process sharing the cache (another rank of
    the same torchrun job, timing at the same moment) stored one first: then
    that one. So every process on the machine, and every later run, makes the
    same choice, and a resumed run gives the bytes an uninterrupted one would."""
    table, path = _table(), _path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a", encoding="utf-8") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            merged = {**table, **_read(path)}
            merged.setdefault(k, choice)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        table.update(merged)
    except OSError:
        table.setdefault(k, choice)  # a read-only home: the choice holds for this process
    return table[k]


def key(op, call: Call) -> str:
    tensors = ",".join(f"{n}:{dtype_name(t.dtype)}:{list(t.shape)}:{layout_of(t)}"
                       for n, t in call.tensors.items())
    feats = ",".join(f"{k}={v}" for k, v in sorted(call.features.items()))
    return f"{_machine()}|{op.name}|{tensors}|{feats}|grad={call.grad}"


def _time_ms(op, impl: Impl, args, grad: bool, repeats: int = 3) -> float:
    """Median ms of the call on impl (forward and backward when autograd will
    want it), on detached copies of the inputs, after one warm-up."""
    def once():
        leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                  else a for a in args]
        with torch.enable_grad() if grad else torch.no_grad():
            out = op.run(impl, leaves, grad)
            if grad:
                outs = out if isinstance(out, tuple) else (out,)
                wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
                torch.autograd.grad([o.float().sum() for o in outs], wanted, allow_unused=True)
    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pick(op, call: Call, args, candidates: List[Impl]) -> Optional[Impl]:
    """The fastest of candidates for this call (all of which support it), from
    the machine's stored decision or measured now; None when not tuning."""
    if len(candidates) < 2 or not enabled() or call.device_type != "cpu":
        return None
    table = _table()
    k = key(op, call)
    by_name = {impl.backend: impl for impl in candidates}
    if table.get(k) in by_name:
        return by_name[table[k]]
    times = {impl.backend: _time_ms(op, impl, args, call.grad) for impl in candidates}
    best = min(times, key=times.get)
    return by_name.get(_record(k, best), by_name[best])
