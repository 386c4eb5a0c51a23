"""What the op layer's run-time tables share: where they live, how they are
read and written, and the identities their keys are made of.

Two tables live in $ADM_FAST_CACHE (default ~/.cache/adm_fast): autotune.json
(which candidate was fastest, ops/autotune.py) and verify.json (whether an
implementation agreed with the reference, ops/verify.py). Both map a key that
names the machine, the build and the call signature to a value, and both
follow one rule: the first value stored for a key wins, in this process and in
every process that shares the folder (the ranks of one job, a resumed run),
so all of them make the same choices and a resumed run gives the same bytes.

A damaged table or an entry that is not what its table stores is ignored: the
value is measured again and replaces it, never a crash.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from typing import Callable, Dict, MutableMapping

try:
    import fcntl
except ImportError:  # not POSIX: the read-merge-write below is then unlocked
    fcntl = None

_IDS: Dict[str, str] = {}


def path(filename: str) -> str:
    root = os.environ.get("ADM_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adm_fast")
    return os.path.join(root, filename)


def _read(file: str) -> Dict:
    try:
        with open(file, encoding="utf-8") as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again


def table(state: MutableMapping, filename: str) -> Dict:
    """The table as this process knows it, read once per cache folder; state
    holds it ({"table": ..., "path": ...}; setting both to None forgets it, as
    a new process would)."""
    file = path(filename)
    if state.get("path") != file or state.get("table") is None:  # the folder may change (tests do)
        state.update(table=_read(file), path=file)
    return state["table"]


def record(state: MutableMapping, filename: str, key: str, value,
           valid: Callable[[object], bool]):
    """Store value for key unless a valid value is there already (stored by a
    process sharing the folder since this one read it): then that one. Returns
    the value that holds. Under a lock, read-merge-write through a temporary
    file and a rename, so a reader never sees half a table."""
    known, file = table(state, filename), path(filename)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(f"{file}.lock", "a", encoding="utf-8") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            merged = {**known, **_read(file)}
            if not valid(merged.get(key)):
                merged[key] = value
            tmp = f"{file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, file)
        known.update(merged)
    except OSError:
        if not valid(known.get(key)):  # a read-only home: it holds for this process
            known[key] = value
    return known[key]


def cpu_model() -> str:
    if "cpu" not in _IDS:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _IDS["cpu"] = model
    return _IDS["cpu"]


def module_build(module: str) -> str:
    """Size and mtime of a compiled extension's file ("none" when absent):
    whatever was measured against one build must not outlive it."""
    if module not in _IDS:
        try:
            spec = importlib.util.find_spec(module)
            st = os.stat(spec.origin) if spec is not None and spec.origin else None
            _IDS[module] = f"{st.st_size}:{int(st.st_mtime)}" if st else "none"
        except (ImportError, OSError, ValueError):
            _IDS[module] = "none"
    return _IDS[module]


def drop(state: MutableMapping, filename: str, matches: Callable[[str], bool]) -> int:
    """Remove the entries whose key matches, in the file and in this process's
    view of it; how many the file held."""
    known, file = table(state, filename), path(filename)
    dropped = 0
    if os.path.exists(file):
        with open(f"{file}.lock", "a", encoding="utf-8") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            current = _read(file)
            kept = {k: v for k, v in current.items() if not matches(k)}
            dropped = len(current) - len(kept)
            tmp = f"{file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(kept, f, indent=0, sort_keys=True)
            os.replace(tmp, file)
    for k in [k for k in known if matches(k)]:
        del known[k]
    return dropped
