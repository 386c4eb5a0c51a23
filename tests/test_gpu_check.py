"""bench/gpu_check --dry-run: every section's commands on the CPU at tiny
sizes, so a script error can never eat the minutes of a lent GPU."""

import subprocess
import sys
from pathlib import Path

from adm_fast.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
FILES = {"env.txt", "tests.log", "bench_ops.txt", "bench_train.txt", "bench_sample.txt",
         "bench_eval.txt", "results.tar.gz", "summary.txt"}


def test_dry_run_runs_every_section_and_writes_the_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check"), "--dry-run"],
                          env={**__import__("os").environ, "OUT": str(out),
                               "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert files == FILES and len(files) <= 8
    for sec in gpu_check.sections(True, out):
        line = next(ln for ln in summary.splitlines() if ln.split()[:1] == [sec.name])
        assert line.split()[1] == "ok", line
    # every benchmark section found its headline figure in its own output
    for name in ("tests", "ops", "train", "sample", "evaluate"):
        line = next(ln for ln in summary.splitlines() if ln.split()[:1] == [name])
        assert len(line.split()) > 3, line


def test_one_failing_section_does_not_stop_the_rest(tmp_path, monkeypatch):
    secs = [gpu_check.Section("bad", "a.txt", [[sys.executable, "-c", "raise SystemExit(3)"]], 30),
            gpu_check.Section("good", "b.txt", [[sys.executable, "-c", "print('1 passed')"]],
                              30, gpu_check._tests_headline)]
    monkeypatch.setattr(gpu_check, "sections", lambda dry, results: secs)
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 1
    text = (tmp_path / "summary.txt").read_text()
    assert "failed (3)" in text and "1 passed" in text


def test_headlines_read_the_tables_as_the_benchmarks_print_them():
    from adm_fast.benchmarks.common import format_table

    rows = [{"impl": "eager", "N": 1, "x_vs_eager": "", "note": "a b"},
            {"impl": "cpu", "N": 1, "x_vs_eager": "2.50", "note": ""},
            {"impl": "triton", "N": 8, "x_vs_eager": "3.10", "note": "x"}]
    text = "some log line\n" + format_table(rows, ["impl", "N", "x_vs_eager", "note"]) + "\nend\n"
    assert gpu_check._ops_headline(text) == "fused vs eager 2.50-3.10x"
    assert gpu_check._ops_headline("nothing here\n") == ""


def test_a_dry_run_is_limited_only_against_hangs(tmp_path, monkeypatch):
    """On a busy machine the dry run's tiny sections may take many times their
    GPU budgets; a dry run must not fail for that (only for a hang)."""
    slow = [gpu_check.Section("slow", "a.txt", [[sys.executable, "-c",
                                                  "import time; time.sleep(3); print('1 passed')"]],
                              1, gpu_check._tests_headline)]
    monkeypatch.setattr(gpu_check, "sections", lambda dry, results: slow)
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    assert "1 passed" in (tmp_path / "summary.txt").read_text()
    assert slow[0].cap_s == gpu_check.DRY_HANG_S >= 600
