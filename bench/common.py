"""What every adm_fast benchmark shares: the machine's identity and appending
result rows (with device, commit, date and versions) to bench/results/*.csv."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The commit measured: $ADM_FAST_COMMIT (set where the tree has no .git,
    as on a lent GPU), else git's."""
    if os.environ.get("ADM_FAST_COMMIT"):
        return os.environ["ADM_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def append_rows(name: str, rows: List[Dict]) -> Path:
    """Append rows to bench/results/<name>.csv. When a benchmark gained
    columns, the file is rewritten with the union (old rows leave them blank)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    old: List[Dict] = []
    fields: List[str] = []
    if path.exists() and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    extra = [k for r in rows for k in r if k not in fields]
    fields += list(dict.fromkeys(extra))
    mode = "w" if extra or not old else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
    return path


def print_table(rows: List[Dict], keys: List[str]) -> None:
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))


# Measured device ceilings (H200: copy bandwidth, dense bf16 matmul).
PEAK_GBPS = {"cuda": 4300.0}
PEAK_TFLOPS_BF16 = {"cuda": 790.0}


def median_ms(fn, device: torch.device, min_run_time: float = 0.5) -> float:
    """Median wall time of fn() in ms: CUDA events via triton.testing.do_bench on
    GPU, torch.utils.benchmark on CPU; never time.time() around async work."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import torch.utils.benchmark as tb

    # Timer runs on one thread unless told: measure on the threads torch uses.
    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def try_compile(fn):
    """torch.compile(fn), or None where it cannot compile here."""
    try:
        compiled = torch.compile(fn, dynamic=False)
        return compiled
    except Exception:  # e.g. no C++ compiler for Inductor
        return None
