"""What every benchmark shares: the machine's identity (device, commit, date,
versions) on every result row, CSV files that grow columns, median timings,
the device ceilings, table printing, and the results flags.

Rows go where the user says (`--results DIR`, default the current folder);
the repository's bench/results/ gets rows only when it is named (bench/gpu_check
does).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from .roofline import DEVICES

# The lent GPU's ceilings (roofline.DEVICES holds every device's, H200: copy
# bandwidth and dense bf16 matmul, measured); ceilings(device) picks by name.
PEAK_GBPS = {"cuda": DEVICES["H200"].gbps}
PEAK_TFLOPS_BF16 = {"cuda": DEVICES["H200"].tflops_16}


def ceilings(device: torch.device):
    """(GB/s, dense bf16 TFLOP/s) of this GPU from roofline.DEVICES (the H200's
    for a GPU not in the table), or (nan, nan) for a CPU."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    name = torch.cuda.get_device_name(device).upper()
    dev = next((d for k, d in DEVICES.items() if k in name), DEVICES["H200"])
    return dev.gbps, dev.tflops_16


def source_root() -> Path | None:
    """The repository root when adm_fast runs from a source checkout (the
    editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "bench").is_dir():
        return root
    return None


def commit() -> str:
    """$ADM_FAST_COMMIT (set where the tree has no .git, as on a lent GPU),
    else git's short hash (+"-dirty" when tracked files other than the result
    rows under bench/results differ: appending rows is not a code change) in a
    checkout, else the package version."""
    if os.environ.get("ADM_FAST_COMMIT"):
        return os.environ["ADM_FAST_COMMIT"]
    root = source_root()
    if root is not None:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=root, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                    "--", ".", ":(exclude)bench/results"],
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


def context(device: torch.device) -> dict[str, str]:
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
        # what else the machine was doing: a CPU row's speed depends on it
        "loadavg_1min": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
        "cpus": str(os.cpu_count() or ""),
    }


def op_backends(op, device: torch.device) -> list[str]:
    """The backends with an implementation of op (an ops.Op) that auto could use
    on device here, but the reference, in auto's static order."""
    from .. import ops

    return [name for name, b in ops.backends().items()
            if name in op.impls and not b.is_reference and not b.unavailable_reasons()
            and not b.device_reasons(device.type) and not b.auto_reasons(device.type)]


def add_results_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=".", metavar="DIR",
                        help="folder the result rows (CSV) are appended to (default: the "
                             "current folder)")
    parser.add_argument("--no_save", action="store_true", help="print only")


def results_file(args: argparse.Namespace, name: str) -> Path:
    return Path(args.results) / f"{name}.csv"


def save_rows(args: argparse.Namespace, name: str, ctx: dict, rows: list[dict]) -> None:
    """Unless --no_save: rows, each with the run's context, appended to
    <--results>/<name>.csv."""
    if not args.no_save:
        print("appended to", append_rows(results_file(args, name), [{**ctx, **r} for r in rows]))


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Append rows to the CSV at path (created with its folder if needed). When
    a benchmark gained columns, the file is rewritten with their union (old rows
    leave them blank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    fields: list[str] = []
    if path.exists() and path.stat().st_size > 0:
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


def format_table(rows: list[dict], keys: list[str]) -> str:
    widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    for r in rows:
        lines.append("  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    return "\n".join(lines)


def print_table(rows: list[dict], keys: list[str]) -> None:
    if rows:
        print(format_table(rows, keys), flush=True)


def median_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    """Median wall time of fn() in ms: CUDA events via triton.testing.do_bench on
    GPU, torch.utils.benchmark on CPU (on all of torch's threads: its default is
    one); never time.time() around asynchronous work."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import torch.utils.benchmark as tb

    timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Time of one fn() call in ms (for interleaved rounds): CUDA events on GPU,
    torch.utils.benchmark on CPU, whose block-size estimate runs fn once
    untimed first, a warm-up for this round."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    return median_ms(fn, device, min_run_time=0.0)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def try_compile(fn):
    """torch.compile(fn), or None where it cannot compile here."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # e.g. no C++ compiler for Inductor
        return None
