"""kill -9 at any moment of `adm-fast sample` loses at most the batch in flight:
the rerun finishes with the same bytes as a run never interrupted.

Each run is a real process (the shipped demo model, a few respaced steps) killed
with SIGKILL: at random moments while it samples, and at each step of the
assembly (through a wrapper that kills the process from inside os.replace and
shutil.rmtree, so the moment is exact). ADM_FAST_FAULT_RUNS=N runs N random
kills instead of 2 (a larger setting for local runs)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import adm_fast

MODEL = Path(adm_fast.__file__).parent / "demo" / "weights" / "diffusion.safetensors"
N, BATCH = 24, 2
NAME = f"samples_{N}x16x16x3"
ARGS = ["sample", "--model_path", str(MODEL), "--num_samples", str(N), "--batch_size",
        str(BATCH), "--timestep_respacing", "6", "--seed", "5", "--device", "cpu",
        "--no-progress"]
# Run inside the child: kill this process at the named point (before/after
# renaming a file to a name matching a pattern, by os.replace or, for a file
# that must not replace another, os.link; or inside the folder's removal).
WRAPPER = r"""
import fnmatch, os, shutil, signal, sys
point, argv = sys.argv[1], sys.argv[2:]
when, _, pattern = point.partition(":")
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_link, real_rmtree = os.replace, os.link, shutil.rmtree
def killing(real):
    def rename(src, dst, *a, **k):
        hit = fnmatch.fnmatch(os.path.basename(dst), pattern)
        if hit and when == "before":
            die()
        real(src, dst, *a, **k)
        if hit and when == "after":
            die()
    return rename
def rmtree(path, *a, **k):
    if when == "rmtree":
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))  # halfway through
        die()
    real_rmtree(path, *a, **k)
os.replace, os.link, shutil.rmtree = killing(real_replace), killing(real_link), rmtree
from adm_fast.cli import main
sys.exit(main(argv))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per run: the bytes, and a shared machine
    return env


def _run(out: Path, point: str = None) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, "-c", WRAPPER, point] if point else
           [sys.executable, "-m", "adm_fast.cli"]) + ARGS + ["--out", str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _files(out: Path):
    return {p.relative_to(out).as_posix() for p in out.rglob("*")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return {ext: (out / f"{NAME}.{ext}").read_bytes() for ext in ("npz", "png")}


def _finished_cleanly(out: Path, reference) -> None:
    assert _files(out) == {f"{NAME}.npz", f"{NAME}.png"}
    for ext, data in reference.items():
        assert (out / f"{NAME}.{ext}").read_bytes() == data, ext


def _shards(out: Path) -> int:
    parts = out / f"{NAME}.parts"
    return len([n for n in os.listdir(parts) if n.startswith("batch_")]) if parts.is_dir() else 0


def _kill_when(out: Path, at_least: int, delay: float) -> int:
    """Start a run, SIGKILL it `delay` s after `at_least` shards exist; the
    number of shards at the kill (None if it finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "adm_fast.cli", *ARGS, "--out", str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and _shards(out) < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGKILL)
        return _shards(out)
    finally:
        proc.wait()  # reaped: a killed run's pid is then known to be gone


def test_killed_at_random_moments_resumes_to_the_same_bytes(reference, tmp_path):
    rng = random.Random(13)
    runs = int(os.environ.get("ADM_FAST_FAULT_RUNS", "2"))
    seen, at_least = [], 0
    for _ in range(runs):
        at_least = rng.randint(at_least, min(at_least + 5, N // BATCH - 1))
        kept = _kill_when(tmp_path, at_least, rng.uniform(0.0, 0.3))
        seen.append(kept)
        if kept is not None:  # what was finished stays finished
            assert kept >= at_least
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    if seen[-1]:  # killed with batches finished: the rerun continued from them
        assert "resuming:" in proc.stderr, proc.stderr
    _finished_cleanly(tmp_path, reference)


def test_killed_while_writing_a_shard_and_at_each_step_of_the_assembly(reference, tmp_path):
    parts = f"{NAME}.parts"
    steps = [
        # killed with batch 3 written but not yet renamed: its temporary is left
        ("before:batch_000003.npz", lambda f: any(".batch_000003.npz.partial" in n for n in f)
         and f"{parts}/batch_000002.npz" in f and f"{parts}/batch_000003.npz" not in f),
        # the final .npz written in full under its temporary name
        (f"before:{NAME}.npz", lambda f: any(n.startswith(f".{NAME}.npz.partial") for n in f)
         and f"{NAME}.npz" not in f),
        # the .npz in place, no .png yet
        (f"after:{NAME}.npz", lambda f: f"{NAME}.npz" in f and f"{NAME}.png" not in f),
        # both in place, the folder renamed away and half deleted: by a rerun that
        # found the .npz finished, wrote the .png from it and sampled nothing
        ("rmtree", lambda f: {f"{NAME}.npz", f"{NAME}.png"} <= f and parts not in f),
    ]
    for point, state in steps:
        proc = _run(tmp_path, point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr)
        assert state(_files(tmp_path)), (point, sorted(_files(tmp_path)))
        if point == "rmtree":
            assert "which a killed run left unwritten" in proc.stderr, proc.stderr
            assert f"{N} images of 16x16" not in proc.stderr, proc.stderr  # no sampling
    for ext, data in reference.items():  # the files in place are already the right ones
        assert (tmp_path / f"{NAME}.{ext}").read_bytes() == data
    proc = _run(tmp_path)  # cleans the half-deleted folder, and is done at once
    assert proc.returncode == 0, proc.stderr
    assert "left by a killed run" in proc.stderr
    assert "nothing to sample" in proc.stdout and "sampled" not in proc.stdout, proc.stdout
    _finished_cleanly(tmp_path, reference)


def test_two_processes_with_the_same_arguments_into_one_folder(reference, tmp_path):
    """Started together: the one that does not sample says another process is
    sampling there (or, started after it finished, that the run is done); no
    "No such file ... batch_... rerun the same command", and the result is
    the reference's."""
    procs = [subprocess.Popen([sys.executable, "-m", "adm_fast.cli", *ARGS, "--out",
                               str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    results = [(rc, out, err) for out, err, rc in results]
    assert any(rc == 0 and "sampled" in out for rc, out, _ in results), results
    for rc, out, err in results:
        assert "No such file" not in err and "Traceback" not in err, err
        if rc != 0:
            assert rc == 2 and err.strip().splitlines()[-1].startswith(
                f"adm-fast sample: error: another process is sampling into "
                f"{tmp_path}/{NAME}.parts now"), err
        elif "sampled" not in out:
            assert "nothing to sample" in out, out
    _finished_cleanly(tmp_path, reference)
