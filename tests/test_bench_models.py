"""adm-fast bench models end to end on the small reference layout: the rows it
appends (ratios, errors, saved bytes, the allocator setting) and
--keep_freed_memory, in a process of its own (the setting is process-wide)."""

import csv
import os
import subprocess
import sys


def test_models_bench_appends_rows_with_the_allocator_setting(tmp_path):
    env = {**os.environ, "ADM_FAST_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "adm_fast.benchmarks.models", "--layouts", "ref_unet_cond_32",
         "--device", "cpu", "--rounds", "1", "--min_run_time", "0.05", "--keep_freed_memory",
         "--results", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "models_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["impl"], r["what"]) for r in rows} == {
        (impl, what) for impl in ("eager", "adm_fast") for what in ("forward", "train_step")}
    assert all(r["malloc"] == "keep_freed" for r in rows)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["x_vs_eager"]) > 0
        assert float(r["max_abs_diff"]) < 1e-4, r
    train = {r["impl"]: r for r in rows if r["what"] == "train_step"}
    assert 0 < float(train["adm_fast"]["saved_vs_eager"]) < 1
