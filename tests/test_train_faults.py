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
    from adm_fast import io

    if mode == "partial":
        real_write, calls = io._Recording.write, [0]

        def write(self, data):
            if os.path.basename(self._f.name).startswith(f".{target}.partial"):
                calls[0] += 1
                if calls[0] == 3:
                    raw = bytes(memoryview(data).cast("B"))
                    self._f.write(raw[:len(raw) // 2])
                    self._f.flush()
                    _die()
            return real_write(self, data)
        io._Recording.write = write
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
    assert not [p.name for p in log_dir.iterdir() if ".partial" in p.name]


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
    # Typed but wrong: each was a traceback at load or at the first step.
    "mis-shaped exp_avg": (lambda d: _edit_state(d, lambda s: s["optimizer"]["state"][0]
                                                 .update(exp_avg=torch.zeros(3))), 1,
                           "moments of parameter 0 differ in shape (exp_avg [3], exp_avg_sq"),
    "exp_avg for another model": (lambda d: _edit_state(d, _swap_moments), 1,
                                  "has shape"),
    "lr a string": (lambda d: _edit_state(d, lambda s: s["optimizer"]["param_groups"][0]
                                          .update(lr="0.001")), 1, "optimizer lr '0.001'"),
    "betas of one number": (lambda d: _edit_state(d, lambda s: s["optimizer"]["param_groups"][0]
                                                  .update(betas=(0.9,))), 1, "optimizer betas"),
    "wrong-size RNG state": (lambda d: _edit_state(d, lambda s: s["rng"][0].update(
        cpu=s["rng"][0]["cpu"][:100])), 1, "rng cpu of rank 0 is torch.uint8 [100]"),
    "float RNG state": (lambda d: _edit_state(d, lambda s: s["rng"][0].update(
        cpu=s["rng"][0]["cpu"].float())), 1, "rng cpu of rank 0 is torch.float32"),
    "empty precision": (lambda d: _edit_state(d, lambda s: s.update(precision={})), 1,
                        "precision None"),
    "step a float": (lambda d: _edit_state(d, lambda s: s.update(step=2.0)), 1,
                     "wrong types in step"),
    # Non-finite values resumed are a damaged state too: resume never starts from NaN.
    "NaN exp_avg_sq": (lambda d: _edit_state(d, lambda s: s["optimizer"]["state"][3][
        "exp_avg_sq"].fill_(float("nan"))), 1, "exp_avg_sq of parameter 3 holds NaN"),
    "inf weights": (lambda d: _edit_weights(d / "model000002.safetensors"), 1,
                    "holds NaN or infinite values"),
}


def _edit_state(log_dir, change, step=2):
    path = log_dir / f"state{step:06d}.pt"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _swap_moments(state):
    # Each tensor well-formed, but the moments of parameters 0 and 1 (shapes
    # differ) swapped: only the weights saved beside the state can tell.
    per = state["optimizer"]["state"]
    per[0], per[1] = per[1], per[0]


def _edit_weights(path, value=float("inf")):
    """A checksummed file whose first float tensor holds `value`, the checksum
    re-made so that only the values are wrong (as a run that diverged wrote it)."""
    from adm_fast import checkpoint

    sd, meta = checkpoint.read_state_dict(path)
    model = checkpoint.load_checkpoint(str(path))
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = value
    checkpoint.save_checkpoint(model, str(path), state_dict=sd,
                               diffusion=checkpoint.read_diffusion_flags(str(path)),
                               classes=checkpoint.read_class_names(str(path)))


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
    stale = [f".model000003.safetensors.partial{dead}", f".state000002.pt.partial{dead}",
             f".progress.csv.partial{dead}", f".latest.json.partial{dead}"]
    for name in stale:
        (log_dir / name).write_bytes(b"x" * 1000)
    (log_dir / f".state000003.pt.partial{alive}").write_bytes(b"another process writes this")
    (log_dir / "notes.tmp1").write_text("not ours")
    _finish(data_dir, log_dir)
    assert not [n for n in stale if (log_dir / n).exists()]
    assert (log_dir / f".state000003.pt.partial{alive}").exists() and \
        (log_dir / "notes.tmp1").exists()
    (log_dir / f".state000003.pt.partial{alive}").unlink()
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
    ("partial:ema_0.9_000002.safetensors", ".ema_0.9_000002.safetensors.partial"),
    ("before:state000002.pt", ".state000002.pt.partial"),
    ("after:model000003.safetensors", None),
    ("before:latest.json", ".latest.json.partial"),
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


# --- nothing lost: damaged states never lead to training over intact weights ---


def _cli(argv_flags, capsys):
    from adm_fast.train.cli import main

    argv = []
    for k, v in argv_flags.items():
        argv += [f"--{k}", str(v)]
    code = main(argv)
    return code, capsys.readouterr().err


def _snapshot(log_dir):
    return {p.name: p.read_bytes() for p in log_dir.iterdir()
            if p.suffix in (".safetensors", ".pt")}


def test_damaged_states_stop_the_run_and_keep_the_intact_weights(data_dir, reference, tmp_path,
                                                                  capsys):
    """Every state of a finished run truncated: the rerun stops with one line
    naming the intact weights instead of training from step 0 over them; the
    weights-only resume it offers continues from them, saying so loudly."""
    log_dir = _copy(reference, tmp_path)
    for p in log_dir.glob("state*.pt"):
        _truncate(p)
    before = _snapshot(log_dir)
    code, err = _cli(_flags(data_dir, log_dir, max_steps=6, save_interval=2), capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    weights = log_dir / "model000004.safetensors"
    assert last.startswith("adm-fast train: error: ") and "no checkpoint to resume exactly" in last
    assert f"--resume_checkpoint {weights}" in last and "steps 4, 2" in last, last
    assert "training from step 0" not in err
    assert _snapshot(log_dir) == before  # nothing overwritten
    code, err = _cli(_flags(data_dir, log_dir, max_steps=6, save_interval=2,
                            resume_checkpoint=weights), capsys)
    assert code == 0, err
    assert "RESUMING FROM THE WEIGHTS ONLY" in err and "not a readable training state" in err
    assert "training from step 4" in err
    after = _snapshot(log_dir)
    assert all(after[name] == data for name, data in before.items())
    assert {"model000006.safetensors", "ema_0.9_000006.safetensors", "state000006.pt"} <= set(after)
    # A rerun now resumes exactly from the new intact set.
    code, err = _cli(_flags(data_dir, log_dir, max_steps=7, save_interval=2), capsys)
    assert code == 0 and "at step 6" in err, err


def test_all_finished_saves_damaged_stop_the_run(data_dir, cut, tmp_path, capsys):
    log_dir = _copy(cut, tmp_path)
    for step in (1, 2):
        _truncate(log_dir / f"state{step:06d}.pt")
        _flip_a_byte(log_dir / f"model{step:06d}.safetensors")
    before = _snapshot(log_dir)
    code, err = _cli(_flags(data_dir, log_dir, max_steps=STEPS, save_interval=2), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "finished saves (steps 2, 1), all damaged" in last, err
    assert "Move them away or give another --log_dir" in last
    assert _snapshot(log_dir) == before


def test_weights_without_a_state_are_a_save_cut_short(data_dir, reference, cut, tmp_path,
                                                       resumed_log):
    """The state is written last: weights without one are a save a kill cut
    short, never a finished checkpoint, and the run starts again over them."""
    log_dir = _copy(cut, tmp_path)
    for step in (1, 2):
        (log_dir / f"state{step:06d}.pt").unlink()
    _finish(data_dir, log_dir)
    messages = [r.getMessage() for r in resumed_log.records]
    assert any(m.startswith("training from step 0") for m in messages), messages
    _assert_like_reference(log_dir, reference)


def test_a_state_saved_for_other_flags_is_one_line(data_dir, cut, tmp_path, capsys):
    """A state that fits its own weights but not the model the flags build (an
    older state, without param_names, checked at restore) is refused in one line."""
    log_dir = _copy(cut, tmp_path)
    _edit_state(log_dir, lambda s: (s.pop("param_names"), s["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))))
    code, err = _cli(_flags(data_dir, log_dir, max_steps=3), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "state000002.pt: optimizer exp_avg of " in last, err
    assert "has shape [3], the parameter these flags build" in last
    assert "Traceback" not in err


# --- non-finite values stop the run before anything non-finite is saved ---


def _tiny_loop(data_dir, log_dir, **kw):
    from adm_fast.diffusion import create_named_schedule_sampler
    from adm_fast.distributed import World
    from adm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from adm_fast.train.data import load_data
    from adm_fast.train.tasks import DiffusionTrainLoop

    torch.manual_seed(0)
    model_flags = {k: FLAGS.get(k, v) for k, v in model_and_diffusion_defaults().items()}
    model_flags["class_cond"] = False
    model, diffusion = create_model_and_diffusion(**model_flags)
    data = load_data(data_dir=str(data_dir), batch_size=4, image_size=8, num_workers=0)
    return DiffusionTrainLoop(
        model=model, diffusion=diffusion, data=data, world=World(0, 1, 0, torch.device("cpu")),
        log_dir=str(log_dir), batch_size=4, lr=1e-3, ema_rate="0.9", progress=False,
        schedule_sampler=create_named_schedule_sampler("uniform", diffusion), **kw)


def _poison_exp_avg_sq(value):
    def poison(loop):
        loop.opt.state[loop.mp.master_params[3]]["exp_avg_sq"].fill_(value)
    return poison


def _poison_ema(loop):
    loop.emas[0][2].view(-1)[0] = float("nan")


@pytest.mark.parametrize("poison, save_interval, said", [
    # NaN moments make step 3's update NaN: with no save there, caught at step 4
    (_poison_exp_avg_sq(float("nan")), 10,
     r"the weights are not finite \(param norm nan\) after step 3"),
    # the same, with a save at step 3: caught by the save's check
    (_poison_exp_avg_sq(float("nan")), 1, "step 3: weight .* holds NaN or infinite values"),
    # inf moments leave the weights finite (the update is 0) but would be saved
    (_poison_exp_avg_sq(float("inf")), 1, "step 3: optimizer exp_avg_sq of "),
    (_poison_ema, 1, "step 3: EMA 0.9 of "),
], ids=["NaN moments, no save", "NaN moments, a save", "inf moments", "NaN EMA"])
def test_non_finite_training_values_stop_before_a_save(data_dir, tmp_path, poison,
                                                       save_interval, said):
    from adm_fast.checkpoint import read_state_dict
    from adm_fast.train import TrainError

    loop = _tiny_loop(data_dir, tmp_path, max_steps=2, save_interval=1)
    loop.run()
    poison(loop)
    loop.max_steps, loop.save_interval = 5, save_interval
    with pytest.raises(TrainError, match=said) as e:
        loop.run()
    assert "training stopped before saving anything non-finite (the newest intact " \
           f"checkpoint is {tmp_path / 'model000002.safetensors'})" in str(e.value)
    saved = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert saved == ["ema_0.9_000001.safetensors", "ema_0.9_000002.safetensors",
                     "model000001.safetensors", "model000002.safetensors"], saved
    for name in saved:
        assert all(torch.isfinite(v).all() for v in read_state_dict(tmp_path / name)[0].values())


def test_the_cli_says_non_finite_weights_in_one_line(data_dir, cut, tmp_path, capsys,
                                                     monkeypatch):
    """The whole path of S3 at the command line: rc 2, one line, nothing saved."""
    from adm_fast.train import loop as loop_module

    real = loop_module.TrainLoop._restore

    def restore(self, resume):  # the resumed moments go non-finite after their checks
        real(self, resume)
        self.opt.state[self.mp.master_params[3]]["exp_avg_sq"].fill_(float("nan"))
    monkeypatch.setattr(loop_module.TrainLoop, "_restore", restore)
    log_dir = _copy(cut, tmp_path)
    code, err = _cli(_flags(data_dir, log_dir, max_steps=STEPS, save_interval=1), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("adm-fast train: error: step 3: weight "), err
    assert "training stopped before saving anything non-finite" in last
    assert not (log_dir / "model000003.safetensors").exists()


def test_batch_size_0_is_one_line(data_dir, tmp_path, capsys):
    code, err = _cli(_flags(data_dir, tmp_path, batch_size=0), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "adm-fast train: error: --batch_size must be an integer >= 1 (the global batch, split "
        "over the ranks), got 0")


# --- special files and oversized images in the data folder ---


def _hung(*_):
    raise TimeoutError("reading the data folder hung")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_the_data_folder_is_left_out(data_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(data_dir, images)
    os.mkfifo(images / "a_fifo.png")  # reading it would block forever
    old = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(300)  # before the fix, open() of the FIFO waited for a writer forever
    try:
        code, err = _cli(_flags(images, tmp_path / "run", max_steps=1), capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 0, err
    said = [ln for ln in err.splitlines() if "special file" in ln]
    assert len(said) == 1 and f"{images / 'a_fifo.png'}" in said[0], err
    assert "12 images" in err  # the FIFO is not counted as one


def test_an_image_past_the_pixel_limit_is_one_line(data_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(data_dir, images)
    code, err = _cli(_flags(images, tmp_path / "run", max_steps=1, max_image_pixels=63,
                            deterministic_data=True), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "a_00000.png: 8x8 is 64 pixels, more than the limit of 63" in last, err
    assert "--max_image_pixels" in last and "--on_error skip" in last
