"""The one script a lent GPU runs (bench/gpu_check calls this after installing):
every section isolated, each writing its output as it goes, within a budget of
8 minutes on an H200, then a one-screen summary. --dry-run runs every section's
commands on the CPU at tiny sizes, so that CI proves the plumbing (commands,
flags, file outputs, summary) and a script error can never eat GPU minutes;
its sections have no time budget, only a limit against hangs.

    python -m adm_fast.benchmarks.gpu_check --out DIR [--dry-run] [--budget 470]

Files in DIR (8 at most come back from a lent GPU): env.txt, tests.log,
bench_ops.txt, bench_train.txt, bench_sample.txt, bench_eval.txt,
results.tar.gz (the CSV files the benchmarks appended rows to, with device,
commit, date and versions: bench/results/, or DIR/csv/ in a dry run) and
summary.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
BENCH = [PY, "-m", "adm_fast.cli", "bench"]
GPU_TESTS = ["tests/test_group_norm_act.py", "tests/test_qkv_attention.py",
             "tests/test_diffusion_step.py", "tests/test_dispatch.py",
             "tests/test_reference_numeric.py", "tests/test_model_backends.py",
             "tests/test_recompute.py", "tests/test_bench_train.py", "tests/test_graphed.py",
             "tests/test_edge_cases.py"]


@dataclass
class Section:
    name: str
    out: str  # file under DIR its output goes to (appended: sections may share one)
    commands: list[list[str]]  # run in turn; a failure stops this section only
    cap_s: int  # at most this long (and never past the budget)
    headline: Callable[[str], str] = lambda text: ""
    needs: Sequence[str] = ()  # modules the section cannot run without
    status: str = "not run"
    figure: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _last(pattern: str, text: str, fmt: str = "{}") -> str:
    found = re.findall(pattern, text, flags=re.M)
    if not found:
        return ""
    last = found[-1]
    return fmt.format(*last) if isinstance(last, tuple) else fmt.format(last)


def _tests_headline(text: str) -> str:
    return _last(r"(\d+ passed[^\n=]*)", text)


def column(text: str, name: str, keep: Callable[[dict], bool] = lambda row: True) -> list[str]:
    """The values of column `name` in the tables printed in text: a header row
    naming it, then rows whose cells start where the header's names start
    (the tables are left-justified; a cell may be empty)."""
    values: list[str] = []
    starts: list[int] | None = None
    names: list[str] = []
    for line in text.splitlines():
        cells = line.split()
        if name in cells:
            names = cells
            starts = [m.start() for m in re.finditer(r"\S+", line)]
            continue
        if starts is None or not cells or line[:starts[0]].strip():
            starts = None if not cells else starts
            continue
        bounds = starts[1:] + [len(line) + 1]
        row = {n: line[a:b].strip() for n, a, b in zip(names, starts, bounds)}
        if keep(row):
            values.append(row[name])
    return values


def _floats(values: list[str]) -> list[float]:
    out = []
    for v in values:
        with contextlib.suppress(ValueError):
            out.append(float(v.rstrip("x")))
    return out


def _ops_headline(text: str) -> str:
    """The range of the fused implementations' ratios to eager."""
    r = _floats(column(text, "x_vs_eager", lambda row: row.get("impl") not in ("eager", None)))
    return f"fused vs eager {min(r):.2f}-{max(r):.2f}x" if r else ""


def _sample_headline(text: str) -> str:
    """adm_fast's speed-up, and measured against the roofline's ms per step
    (benchmarks/roofline.py) for adm_fast and eager."""
    def pick(impl):
        return lambda row: row.get("impl") == impl
    r = _floats(column(text, "x_vs_eager", pick("adm_fast[auto]")))
    if not r:
        return ""
    out = f"guided sampling, adm_fast vs eager {r[-1]:.2f}x"
    for impl, label in (("adm_fast[auto]", "adm_fast"), ("eager", "eager")):
        ms = column(text, "ms_per_step", pick(impl))
        pred = column(text, "pred_ms", pick(impl))
        if ms and pred and pred[-1] not in ("", "-"):
            out += (f"; {label} {ms[-1]} ms/step vs {pred[-1]} predicted "
                    f"({float(ms[-1]) / float(pred[-1]):.2f}x)")
    return out


def _train_headline(text: str) -> str:
    return _last(r"saved for backward, adm_fast/eager: ([0-9.]+)", text,
                 "saved bytes {}x eager")


def _eval_headline(text: str) -> str:
    r = column(text, "images_per_s", lambda row: row.get("dtype") == "fp32")
    return f"{r[-1]} images/s of Inception features (fp32)" if r else ""


def sections(dry: bool, results: Path) -> list[Section]:
    """What runs, in order. dry: the same commands at tiny sizes on the CPU."""
    res = ["--results", str(results)]
    if dry:
        tests = [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/test_dispatch.py", "-k", "explicit_backend_is_strict"]
        ops = [BENCH + ["ops", "diffusion_step", "--device", "cpu", "--quick"] + res]
        train = [BENCH + ["train", "--device", "cpu", "--batch", "1", "--repeats", "1"] + res]
        sample = [BENCH + ["sample", "--preset", "tiny", "--device", "cpu", "--batch_size", "1",
                           "--steps", "1", "--repeats", "1", "--backends", "auto",
                           "--no-compile"] + res]
        evaluate = [BENCH + ["evaluate", "--n", "2", "--batch", "2", "--image_size", "32",
                             "--repeats", "1", "--distance_device", "cpu", "--distance_n",
                             "64"] + res]
    else:
        tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 *GPU_TESTS]
        ops = [BENCH + ["ops", "group_norm_act", "--dtypes", "bfloat16", "--compile"] + res,
               BENCH + ["ops", "qkv_attention", "--batch", "8"] + res,
               BENCH + ["ops", "diffusion_step"] + res]
        train = [BENCH + ["train", "--preset", "128x128_diffusion", "--dtype", "bf16",
                          "--batch", "16"] + res,
                 BENCH + ["train", "--preset", "256x256_diffusion", "--dtype", "bf16",
                          "--max_batch", "--time_cap", "15"] + res]
        sample = [BENCH + ["sample", "--preset", "64x64_diffusion", "--batch_size", "64",
                           "--steps", "10", "--repeats", "2", "--backends", "auto",
                           "--no-compile"] + res,
                  BENCH + ["sample", "--preset", "256x256_diffusion", "--batch_size", "32",
                           "--steps", "10", "--repeats", "2", "--backends", "auto",
                           "--compile"] + res]
        evaluate = [BENCH + ["evaluate", "--dtypes", "fp32,bf16"] + res]
    env = [[PY, "-c", "import torch, sys; print('python', sys.version.split()[0], 'torch', "
            "torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name()"
            " if torch.cuda.is_available() else 'no CUDA device')"],
           [PY, "-m", "adm_fast.cli", "info"]]
    return [
        Section("env", "env.txt", env, 30),
        Section("tests", "tests.log", [tests], 100, _tests_headline),
        Section("ops", "bench_ops.txt", ops, 110, _ops_headline),
        Section("train", "bench_train.txt", train, 80, _train_headline),
        Section("sample", "bench_sample.txt", sample, 200, _sample_headline),
        Section("evaluate", "bench_eval.txt", evaluate, 40, _eval_headline,
                needs=("torch_fidelity", "scipy")),
    ]


# A dry run proves the plumbing, not the speed: on a busy CI machine its tiny
# sections may take many times their GPU budgets, so there they are limited
# only against hangs.
DRY_HANG_S = 900


def run_section(sec: Section, folder: Path, deadline: float, env) -> None:
    start = time.monotonic()
    path = folder / sec.out
    missing = [m for m in sec.needs if importlib.util.find_spec(m) is None]
    if missing:
        sec.status = f"skipped (no {', '.join(missing)})"
        path.write_text(sec.status + "\n", encoding="utf-8")
        return
    sec.status = "ok"
    for cmd in sec.commands:
        left = min(sec.cap_s - (time.monotonic() - start), deadline - time.monotonic())
        if left < 5:
            sec.status = "skipped (budget)" if sec.status == "ok" else sec.status
            break
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd[2:] if cmd[:2] == [PY, '-m'] else cmd)}\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            sec.status = f"failed ({rc})"
    sec.seconds = time.monotonic() - start
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    sec.figure = sec.headline(text)


def summary(secs: Sequence[Section], dry: bool, total: float) -> str:
    rows = [("section", "status", "seconds", "headline")]
    rows += [(s.name, s.status, f"{s.seconds:.0f}", s.figure) for s in secs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"gpu_check{' --dry-run (CPU, tiny sizes)' if dry else ''}: {total:.0f} s"]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return "\n".join(lines) + "\n"


def _results_tar(folder: Path, results: Path, before: float) -> None:
    fresh = [p for p in results.glob("*.csv") if p.stat().st_mtime >= before]
    with tarfile.open(folder / "results.tar.gz", "w:gz") as tar:
        for p in fresh:
            tar.add(p, arcname=p.name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the 8 result files")
    p.add_argument("--dry-run", action="store_true",
                   help="every section on the CPU at tiny sizes (CI runs this)")
    p.add_argument("--budget", type=int, help="seconds for all sections (default 470; a dry "
                   "run has none, only each section's hang limit)")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    folder = Path(args.out)
    # The real run's rows are committed from bench/results; a dry run's stay in OUT.
    results = folder / "csv" if args.dry_run else root / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even where a GPU is
    start = time.monotonic()
    stamp = time.time() - 1
    deadline = start + (args.budget if args.budget is not None
                        else float("inf") if args.dry_run else 470)
    secs = sections(args.dry_run, results)
    if args.dry_run:
        for sec in secs:
            sec.cap_s = DRY_HANG_S
    for sec in secs:
        run_section(sec, folder, deadline, env)
        print(f"== {sec.name}: {sec.status} in {sec.seconds:.0f} s  {sec.figure}", flush=True)
    results.mkdir(parents=True, exist_ok=True)
    _results_tar(folder, results, stamp)
    text = summary(secs, args.dry_run, time.monotonic() - start)
    (folder / "summary.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0 if all(s.status == "ok" for s in secs) else 1


if __name__ == "__main__":
    sys.exit(main())
