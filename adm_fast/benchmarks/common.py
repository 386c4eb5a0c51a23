"""What the packaged benchmarks share with the repository's bench/common.py:
where results go, the machine's identity (device, commit, date, versions) on
every row, CSV files that grow columns, and median timings.

bench/ is not installed, so the few conventions needed are kept here in the
same form: rows carry date, commit, device, torch and triton; a file that
gains columns is rewritten with their union.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def source_root() -> Optional[Path]:
    """The repository root when adm_fast runs from a source checkout (the
    editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "bench" / "common.py").is_file():
        return root
    return None


def default_results_dir() -> Path:
    root = source_root()
    return root / "bench" / "results" if root is not None else Path("bench_results")


def commit() -> str:
    """$ADM_FAST_COMMIT (set where the tree has no .git, as on a lent GPU),
    else git's short hash (+"-dirty") in a checkout, else the package version."""
    if os.environ.get("ADM_FAST_COMMIT"):
        return os.environ["ADM_FAST_COMMIT"]
    root = source_root()
    if root is not None:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=root, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, cwd=root).stdout
            return out + ("-dirty" if dirty.strip() else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    from .. import __version__
    return f"adm_fast-{__version__}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def context(device: torch.device) -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "commit": commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def append_rows(path: Path, rows: List[Dict]) -> Path:
    """Append rows to the CSV at path (created with its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: List[Dict] = []
    fields: List[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    extra = [k for r in rows for k in r if k not in fields]
    fields += list(dict.fromkeys(extra))
    # New columns: rewrite so the header names them (old rows leave them blank).
    mode = "w" if extra or not old else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
    return path


def format_table(rows: List[Dict], keys: List[str]) -> str:
    widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    for r in rows:
        lines.append("  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    return "\n".join(lines)


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Time of one fn() call in ms. GPU: CUDA events (the work is asynchronous,
    so host clocks would time the launches). CPU: torch.utils.benchmark with
    all of torch's threads (its default is one); its block-size estimate runs
    fn once untimed first, a warm-up for this round."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    import torch.utils.benchmark as tb

    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.0).median * 1e3


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
