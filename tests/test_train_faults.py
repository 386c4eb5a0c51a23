"""Training survives faults: a kill -9 at any moment (mid-save included) or a
damaged newest checkpoint costs at most the steps since the last intact one,
and the rerun ends with the same bytes as a run never interrupted; logs hold
each step once; killed runs' temporaries are cleaned up.

Every run here uses one CPU thread: a float sum's order (and so the bytes)
depends on the thread count, and bitwise equality is only promised for the
same machine set-up. Mid-save kills run in forked children (no second start
of Python and adm_fast); the random-moment kill is a real `adm-fast train`
subprocess. ADM_FAST_FAULT_KILLS (default 1) sets how many random-moment kills
to try in a row, ADM_FAST_FAULT_SEED their timing.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from adm_fast.train import make_image_folder, train
from adm_fast.train.state import find_latest

# dropout > 0: the resumed RNG state must be the very one the run had.
FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="4", num_head_channels=16, learn_sigma=True,
             class_cond=True, diffusion_steps=50, dropout=0.1, batch_size=4, lr=1e-3,
             ema_rate="0.9", log_interval=1, num_workers=0, progress=False, seed=5)
STEPS = 4
FINAL = [f"model{STEPS:06d}.safetensors", f"ema_0.9_{STEPS:06d}.safetensors"]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(mode: str, target: str) -> None:
    """In a child about to train: SIGKILL when `target` is being saved.
    partial: its temporary half written; before: written, not renamed;
    after: renamed, nothing after it."""
    from adm_fast import checkpoint

    if mode == "partial":
        real_write, calls = checkpoint._Recording.write, [0]

        def write(self, data):
            if os.path.basename(self._f.name).startswith(target + ".tmp"):
                calls[0] += 1
                if calls[0] == 3:
                    raw = bytes(memoryview(data).cast("B"))
                    self._f.write(raw[:len(raw) // 2])
                    self._f.flush()
                    _die()
            return real_write(self, data)
        checkpoint._Recording.write = write
        return
    real_replace = os.replace

    def replace(src, dst):
        hit = os.path.basename(dst) == target
        if hit and mode == "before":
            _die()
        real_replace(src, dst)
        if hit:
            _die()
    os.replace = replace


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _flags(data_dir, log_dir, **kw):
    return {**FLAGS, "data_dir": str(data_dir), "log_dir": str(log_dir), **kw}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    make_image_folder(path, 12, 8, classes=("a", "b", "c"), seed=1)
    return path


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("reference")
    train(**_flags(data_dir, log_dir, max_steps=STEPS, save_interval=2))
    return log_dir


@pytest.fixture(scope="module")
def cut(data_dir, tmp_path_factory):
    """A run stopped at step 2: checkpoints at steps 1 and 2."""
    log_dir = tmp_path_factory.mktemp("cut")
    train(**_flags(data_dir, log_dir, max_steps=2, save_interval=1))
    return log_dir


@pytest.fixture
def resumed_log(caplog):
    """The messages of the adm_fast logger (which does not propagate) in caplog."""
    logger = logging.getLogger("adm_fast")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="adm_fast")
    yield caplog
    logger.removeHandler(caplog.handler)


def _finish(data_dir, log_dir):
    assert train(**_flags(data_dir, log_dir, max_steps=STEPS, save_interval=2)) == STEPS


def _assert_like_reference(log_dir, reference):
    for name in FINAL:
        assert (log_dir / name).read_bytes() == (reference / name).read_bytes(), name
    a = torch.load(log_dir / f"state{STEPS:06d}.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(reference / f"state{STEPS:06d}.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i])
    rows = [json.loads(line) for line in (log_dir / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref = [json.loads(line) for line in (reference / "progress.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    csv_steps = [line.split(",")[0] for line in
                 (log_dir / "progress.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(1, STEPS + 1)]
    assert not [p.name for p in log_dir.iterdir() if ".tmp" in p.name]


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_resume_with_dropout_is_bitwise(data_dir, reference, cut, tmp_path):
    log_dir = _copy(cut, tmp_path)
    _finish(data_dir, log_dir)
    _assert_like_reference(log_dir, reference)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x55
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated state": (lambda d: _truncate(d / "state000002.pt"), 1, "not a readable"),
    "empty state": (lambda d: (d / "state000002.pt").write_bytes(b""), 1, "not a readable"),
    "state without optimizer": (lambda d: torch.save({"step": 2}, d / "state000002.pt"), 1,
                                "incomplete training state, without optimizer"),
    "missing state": (lambda d: (d / "state000002.pt").unlink(), 1, "is missing"),
    "corrupt model": (lambda d: _flip_a_byte(d / "model000002.safetensors"), 1, "checksum"),
    "truncated EMA": (lambda d: _truncate(d / "ema_0.9_000002.safetensors"), 1,
                      "not a readable safetensors file"),
    "missing EMA": (lambda d: (d / "ema_0.9_000002.safetensors").unlink(), 1, "is missing"),
    "latest.json at a missing step": (lambda d: (d / "latest.json").write_text(json.dumps(
        {"step": 8, "files": ["model000008.safetensors", "state000008.pt"]})), 2, None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back(data_dir, reference, cut, tmp_path, case,
                                                resumed_log):
    damage, resumed_at, reason = DAMAGE[case]
    log_dir = _copy(cut, tmp_path)
    damage(log_dir)
    _finish(data_dir, log_dir)
    messages = [r.getMessage() for r in resumed_log.records]
    assert any(m.startswith("resuming from") and m.endswith(f"at step {resumed_at}")
               for m in messages), messages
    if reason:
        skipped = [m for m in messages if m.startswith("not resuming from the checkpoint at "
                                                       "step 2")]
        assert skipped and reason in skipped[0], messages
    _assert_like_reference(log_dir, reference)


def test_a_torn_log_line_is_repaired_and_no_step_is_logged_twice(data_dir, reference, cut,
                                                                   tmp_path):
    log_dir = _copy(cut, tmp_path)
    (log_dir / "state000002.pt").unlink()  # resume at 1: row 2 is replayed
    with open(log_dir / "progress.jsonl", "a") as f:
        f.write('{"step": 3, "loss')  # a kill mid-line
    _finish(data_dir, log_dir)
    _assert_like_reference(log_dir, reference)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_at_start(data_dir, reference, cut, tmp_path):
    log_dir = _copy(cut, tmp_path)
    dead, alive = _dead_pid(), os.getppid()
    stale = [f"model000003.safetensors.tmp{dead}", f"state000002.pt.tmp{dead}",
             f"progress.csv.tmp{dead}", f"latest.json.tmp{dead}"]
    for name in stale:
        (log_dir / name).write_bytes(b"x" * 1000)
    (log_dir / f"state000003.pt.tmp{alive}").write_bytes(b"another process writes this")
    (log_dir / "notes.tmp1").write_text("not ours")
    _finish(data_dir, log_dir)
    assert not [n for n in stale if (log_dir / n).exists()]
    assert (log_dir / f"state000003.pt.tmp{alive}").exists() and (log_dir / "notes.tmp1").exists()
    (log_dir / f"state000003.pt.tmp{alive}").unlink()
    (log_dir / "notes.tmp1").unlink()
    _assert_like_reference(log_dir, reference)


def _argv(data_dir, log_dir):
    out = []
    for k, v in _flags(data_dir, log_dir, max_steps=STEPS, save_interval=1).items():
        out += [f"--{k}", str(v)]
    return ["train"] + out


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("where, leftover", [
    ("partial:ema_0.9_000002.safetensors", "ema_0.9_000002.safetensors.tmp"),
    ("before:state000002.pt", "state000002.pt.tmp"),
    ("after:model000003.safetensors", None),
    ("before:latest.json", "latest.json.tmp"),
])
def test_kill_mid_save_then_rerun_gives_the_same_bytes(data_dir, reference, tmp_path, where,
                                                       leftover):
    from adm_fast.train.cli import main

    log_dir = tmp_path / "run"
    pid = os.fork()
    if pid == 0:  # the child trains until the kill; it never returns to pytest
        try:
            _arm(*where.split(":"))
            main(_argv(data_dir, log_dir)[1:])
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    if leftover:
        assert [p for p in log_dir.iterdir() if p.name.startswith(leftover)]
    _finish(data_dir, log_dir)
    _assert_like_reference(log_dir, reference)


def _rows(log_dir) -> int:
    try:
        return (log_dir / "progress.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_kill_at_random_moments_then_rerun_gives_the_same_bytes(data_dir, reference, tmp_path):
    """kill -9 of `adm-fast train` once it has logged a random step, a random
    time within the next step and save later (they alternate here, so the kill
    lands in either); repeated, each rerun is killed past its resume point."""
    rng = random.Random(int(os.environ.get("ADM_FAST_FAULT_SEED", "13")))
    log_dir = tmp_path / "run"
    # A step's time as the reference run logged it (a save takes about as long).
    rows = [json.loads(line) for line in (reference / "progress.jsonl").read_text().splitlines()]
    step = sum(FLAGS["batch_size"] / r["samples_per_s"] for r in rows) / len(rows)
    for _ in range(int(os.environ.get("ADM_FAST_FAULT_KILLS", "1"))):
        latest = find_latest(str(log_dir)) if log_dir.exists() else None
        done = int(os.path.basename(latest)[5:11]) if latest else 0
        if done >= STEPS - 1:
            break
        after = rng.randint(done + 1, STEPS - 1)
        proc = subprocess.Popen([sys.executable, "-m", "adm_fast.cli"] +
                                _argv(data_dir, log_dir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=_env())
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and _rows(log_dir) < after:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 2 * step))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (log_dir / FINAL[0]).exists(), "the kill came after the run finished"
    _finish(data_dir, log_dir)
    _assert_like_reference(log_dir, reference)
