"""What every adm_fast benchmark shares: the machine's identity and appending
result rows (with device, commit, date and versions) to bench/results/*.csv.

The row conventions live in the package (adm_fast.benchmarks.common), which
`adm-fast bench` uses too; this file points them at bench/results."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from adm_fast.benchmarks import common as _rows
from adm_fast.benchmarks.common import commit, context, device_name  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"


def append_rows(name: str, rows: List[Dict]) -> Path:
    """Append rows to bench/results/<name>.csv. When a benchmark gained
    columns, the file is rewritten with the union (old rows leave them blank)."""
    return _rows.append_rows(RESULTS / f"{name}.csv", rows)


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
