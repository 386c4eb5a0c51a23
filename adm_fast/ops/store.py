"""What the op layer's run-time tables share: where they live, how they are
read and written, and the identities their keys are made of.

Two tables live in $ADM_FAST_CACHE (default ~/.cache/adm_fast): autotune.json
(which candidate was fastest, ops/autotune.py) and verify.json (whether an
implementation agreed with the reference, ops/verify.py). Both map a key that
names the machine, the build and the call signature to a value, and both
follow one rule: the first value stored for a key wins, in this process and in
every process that shares the folder (the ranks of one job, a resumed run),
so all of them make the same choices and a resumed run gives the same bytes.

A damaged table (unreadable, not JSON, nested past what the parser takes) or
an entry that is not what its table stores (a list where a name belongs) is
ignored, with one warning line per file in a process, and the value measured
again replaces it, never a crash. Entries this process does not look up stay
as they are (another version of adm_fast may read them), unless they cannot
be written back (nested too deep for the JSON writer): then they are dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import warnings
from collections.abc import Callable, MutableMapping

from ..io import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: the read-merge-write below is then unlocked
    fcntl = None

_IDS: dict[str, str] = {}
_WARNED: set[str] = set()  # files already reported damaged in this process


class CacheWarning(RuntimeWarning):
    """A table in $ADM_FAST_CACHE was damaged: what it held is measured again."""


def path(filename: str) -> str:
    root = os.environ.get("ADM_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adm_fast")
    return os.path.join(root, filename)


def _damaged(file: str, why: str) -> None:
    if file in _WARNED:
        return
    _WARNED.add(file)
    # Line 0 of the file itself: the warning is this one line, naming the file
    # (warnings.warn would print a line of adm_fast's source under it).
    warnings.warn_explicit(f"adm_fast: {why}; ignored, measured again", CacheWarning, file, 0)


def _read(file: str) -> dict:
    """The table in file: {} when absent or damaged."""
    try:
        with open(file, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        _damaged(file, f"this table cannot be read ({type(e).__name__}: {str(e)[:100]})")
        return {}
    if not isinstance(table, dict):
        _damaged(file, f"this table is {_json_type(table)}, not a JSON object")
        return {}
    return table


def _write(file: str, table: dict, valid: Callable[[object], bool]) -> None:
    """table into file through a temporary file and a rename; without the
    entries `valid` refuses where they are nested too deep to be written."""
    try:
        text = json.dumps(table, indent=0, sort_keys=True)
    except RecursionError:
        text = json.dumps({k: v for k, v in table.items() if valid(v)}, indent=0,
                          sort_keys=True)
    atomic_write(file, lambda f: f.write(text.encode("utf-8")))


def table(state: MutableMapping, filename: str) -> dict:
    """The table as this process knows it, read once per cache folder; state
    holds it ({"table": ..., "path": ...}; setting both to None forgets it, as
    a new process would). Its values may be anything: read them through
    `lookup`, or test them."""
    file = path(filename)
    if state.get("path") != file or state.get("table") is None:  # the folder may change (tests do)
        state.update(table=_read(file), path=file)
    return state["table"]


def lookup(state: MutableMapping, filename: str, key: str, valid: Callable[[object], bool]):
    """The value stored for key, or None: absent, or not what the table stores
    (then one warning line for the file: it is measured again)."""
    known = table(state, filename)
    if key not in known:
        return None
    value = known[key]
    if valid(value):
        return value
    _damaged(path(filename),
             f"an entry is damaged (not what this table stores: {_json_type(value)})")
    return None


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


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
            _write(file, merged, valid)
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


def drop(state: MutableMapping, filename: str, matches: Callable[[str], bool],
         valid: Callable[[object], bool]) -> int:
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
            _write(file, kept, valid)
    for k in [k for k in known if matches(k)]:
        del known[k]
    return dropped
