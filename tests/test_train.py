"""Training: the loops learn, fused and eager backends train alike, a resumed
run continues exactly, and bad input is a clear error (kills and damaged
checkpoints: test_train_faults.py; the command line: test_train_cli.py)."""

import json
import os

import pytest
import torch

import adm_fast
import adm_fast.cli
from adm_fast.checkpoint import read_state_dict
from adm_fast.distributed import World
from adm_fast.train import make_image_folder, train
from adm_fast.train.state import find_latest
from adm_fast.train.tasks import ClassifierTrainLoop, DiffusionTrainLoop

# 64 channels: with GroupNorm(32) over 32 channels each group is one channel,
# the biases feeding it get an exactly-zero gradient and Adam turns float noise
# there into full steps, which no backend comparison can tolerate.
TINY_UNET = dict(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", learn_sigma=True, class_cond=True,
                 diffusion_steps=50, num_head_channels=16)
TINY_CLS = dict(image_size=8, classifier_width=32, classifier_depth=1,
                classifier_channel_mult="1,2", classifier_attention_resolutions="4",
                diffusion_steps=50)
RUN = dict(num_workers=0, progress=False, log_interval=1, seed=3)
CPU = World(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    make_image_folder(path, 16, 8, classes=("a", "b"), seed=1)
    return str(path)


def _fixed_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1 + 0.2
    return x, {"y": torch.arange(n) % 2}


def _repeat(batch):
    while True:
        yield batch[0].clone(), {k: v.clone() for k, v in batch[1].items()}


def _unet(seed=0):
    torch.manual_seed(seed)
    flags = {k: v for k, v in TINY_UNET.items() if k != "diffusion_steps"}
    model = adm_fast.create_model(**{k: v for k, v in flags.items()})
    diffusion = adm_fast.create_gaussian_diffusion(steps=50, learn_sigma=True)
    return model, diffusion


def _eval_loss(model, diffusion, batch):
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, diffusion.num_timesteps, (batch[0].shape[0],), generator=g)
    noise = torch.randn(batch[0].shape, generator=g)
    with torch.no_grad():
        return diffusion.training_losses(model, batch[0], t, model_kwargs=batch[1],
                                         noise=noise)["loss"].mean().item()


def _loop(cls, model, diffusion, batch, tmp_path, **kw):
    sampler = adm_fast.create_named_schedule_sampler("uniform", diffusion)
    return cls(model=model, diffusion=diffusion, data=_repeat(batch), world=CPU,
               log_dir=str(tmp_path), batch_size=batch[0].shape[0], schedule_sampler=sampler,
               progress=False, save_interval=10 ** 6, **kw)


def test_diffusion_overfits_a_fixed_batch(tmp_path):
    model, diffusion = _unet()
    batch = _fixed_batch()
    before = _eval_loss(model, diffusion, batch)
    loop = _loop(DiffusionTrainLoop, model, diffusion, batch, tmp_path, lr=2e-3, max_steps=25)
    loop.run()
    after = _eval_loss(model.eval(), diffusion, batch)
    assert after < 0.7 * before, (before, after)


def test_classifier_overfits_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    model = adm_fast.create_classifier(**{k: v for k, v in TINY_CLS.items()
                                          if k != "diffusion_steps"},
                                       classifier_use_fp16=False,
                                       classifier_use_scale_shift_norm=True,
                                       classifier_resblock_updown=True, classifier_pool="attention")
    diffusion = adm_fast.create_gaussian_diffusion(steps=50)
    batch = _fixed_batch(seed=1)
    t = torch.zeros(4, dtype=torch.long)

    def ce():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(batch[0], t), batch[1]["y"]).item()
    before = ce()
    loop = _loop(ClassifierTrainLoop, model, diffusion, batch, tmp_path, lr=1e-3, max_steps=15,
                 noised=False)
    loop.run()
    model.eval()
    assert ce() < 0.3 * before
    assert model(batch[0], t).argmax(-1).tolist() == batch[1]["y"].tolist()


def _first_step(backend, tmp_path, microbatch=-1):
    """(loss, gradients) of the first training step: the accumulated gradients
    the optimizer is handed, captured before it steps."""
    model, diffusion = _unet(seed=5)
    loop = _loop(DiffusionTrainLoop, model, diffusion, _fixed_batch(seed=2), tmp_path, lr=1e-3,
                 max_steps=1, microbatch=microbatch)
    grads = []
    loop.opt.register_step_pre_hook(
        lambda opt, args, kwargs: grads.extend(p.grad.detach().clone()
                                               for p in loop.mp.master_params))
    with adm_fast.use_backend(backend):
        loop.run_step(*_fixed_batch(seed=2))
    return loop.metrics.dump(loop.step)["loss"], grads, loop


def _fp64_first_step(loop, tmp_path):
    """The same first step in float64 on the eager reference: the same
    timesteps, noise and weights (drawn from the loop's step-0 generator)."""
    model, diffusion = _unet(seed=5)
    model = model.double()
    x, cond = _fixed_batch(seed=2)
    loop.step = 0
    gen = loop.generator()
    t, weights = loop.draw_timesteps(gen)
    noise = torch.randn((loop.global_batch,) + tuple(x.shape[1:]), generator=gen)
    cond = loop.prepare_cond(cond, gen)
    with adm_fast.use_backend("eager"):
        terms = diffusion.training_losses(model, x.double(), t, model_kwargs=cond,
                                          noise=noise.double())
    loss = (terms["loss"] * weights.double()).mean()
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


def _assert_fp32_close(out, ref64, torch32, what):
    """Each gradient within twice the error of eager fp32's (the whole batch in
    one pass) against fp64, plus rounding at the scale of the whole set (a
    bias feeding a one-channel GroupNorm group has an exactly-zero gradient
    that holds only noise)."""
    floor = 4 * torch.finfo(torch.float32).eps * max(r.abs().max().item() for r in ref64)
    for i, (o, r, e) in enumerate(zip(out, ref64, torch32)):
        err = (o.double() - r).abs().max().item()
        base = (e.double() - r).abs().max().item()
        assert err <= 2 * base + floor, (what, i, tuple(r.shape), err, base, floor)


def test_fused_and_eager_backends_train_alike(tmp_path):
    """The fused backends' first update is the eager one within fp32's own error
    (against fp64). Parameters after several AdamW steps are not compared: AdamW
    divides by sqrt(v), so where a gradient is ~0 rounding noise becomes a step of
    up to lr and no tolerance derived from the precision could hold."""
    eager_loss, eager, loop = _first_step("eager", tmp_path / "e")
    ref_loss, ref = _fp64_first_step(loop, tmp_path)
    fused_loss, fused, _ = _first_step("auto", tmp_path / "f")
    _assert_fp32_close(fused, ref, eager, "auto vs fp64")
    tol = 2 * abs(eager_loss - ref_loss) + 8 * torch.finfo(torch.float32).eps * abs(ref_loss)
    assert abs(fused_loss - ref_loss) <= tol, (fused_loss, eager_loss, ref_loss)


@pytest.mark.parametrize("microbatch", [1, 3])
def test_microbatching_gives_the_same_update(tmp_path, microbatch):
    """Microbatching only reorders the sums (3 leaves an uneven 3 + 1 split):
    its accumulated gradient is the whole batch's within fp32's own error."""
    whole_loss, whole, loop = _first_step("eager", tmp_path / "w")
    ref_loss, ref = _fp64_first_step(loop, tmp_path)
    micro_loss, micro, _ = _first_step("eager", tmp_path / "m", microbatch=microbatch)
    _assert_fp32_close(micro, ref, whole, f"microbatch {microbatch} vs fp64")
    tol = 2 * abs(whole_loss - ref_loss) + 8 * torch.finfo(torch.float32).eps * abs(ref_loss)
    assert abs(micro_loss - ref_loss) <= tol, (micro_loss, whole_loss, ref_loss)


def _train_flags(data_dir, log_dir, **kw):
    return {**TINY_UNET, **RUN, "data_dir": data_dir, "log_dir": str(log_dir), "batch_size": 4,
            "lr": 1e-3, "ema_rate": "0.9,0.99", "save_interval": 2, **kw}


def test_resume_continues_exactly(data_dir, tmp_path):
    train(**_train_flags(data_dir, tmp_path / "full", max_steps=4))
    train(**_train_flags(data_dir, tmp_path / "cut", max_steps=2))
    assert find_latest(str(tmp_path / "cut")).endswith("model000002.safetensors")
    train(**_train_flags(data_dir, tmp_path / "cut", max_steps=4))  # auto-resume from log_dir
    for name in ("model000004.safetensors", "ema_0.9_000004.safetensors",
                 "ema_0.99_000004.safetensors"):
        full, _ = read_state_dict(str(tmp_path / "full" / name))
        cut, _ = read_state_dict(str(tmp_path / "cut" / name))
        for k in full:
            assert torch.equal(full[k], cut[k]), (name, k)
    rows = [json.loads(line)
            for line in (tmp_path / "cut" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    model = adm_fast.load_checkpoint(str(tmp_path / "cut" / "ema_0.99_000004.safetensors"))
    assert model.flags["num_channels"] == 64


def test_damaged_latest_pointer_falls_back_to_a_complete_set(data_dir, tmp_path):
    log_dir = tmp_path / "run"
    train(**_train_flags(data_dir, log_dir, max_steps=4))
    (log_dir / "latest.json").write_text("{not json")
    os.remove(log_dir / "state000004.pt")
    assert find_latest(str(log_dir)).endswith("model000002.safetensors")


def test_classifier_cli_trains_and_saves(data_dir, tmp_path, capsys):
    argv = ["train-classifier", "--data_dir", data_dir, "--val_data_dir", data_dir,
            "--log_dir", str(tmp_path), "--iterations", "2", "--batch_size", "4",
            "--num_workers", "0", "--progress", "False", "--eval_interval", "1"]
    for k, v in TINY_CLS.items():
        argv += [f"--{k}", str(v)]
    assert adm_fast.cli.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_acc@1", "val_loss", "val_acc@5"} <= set(rows[-1])
    model = adm_fast.load_checkpoint(str(tmp_path / "model000002.safetensors"))
    assert type(model).__name__ == "EncoderUNetModel"


def _cli_error(argv, capsys, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = adm_fast.cli.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, capsys.readouterr().err


def _argv(data_dir, log_dir, **kw):
    flags = {**TINY_UNET, **RUN, "data_dir": data_dir, "log_dir": str(log_dir),
             "batch_size": 4, "max_steps": 1, **kw}
    out = ["train"]
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def test_bad_input_is_a_clear_error(data_dir, tmp_path, capsys):
    code, err = _cli_error(_argv(str(tmp_path / "nope"), tmp_path / "l1"), capsys)
    assert code == 2 and "does not exist" in err and "nope" in err
    code, err = _cli_error(_argv(data_dir, tmp_path / "l2", image_size=16, channel_mult="1,2"),
                           capsys)
    assert code == 2 and "smaller" in err.lower() and "allow_upscale" in err
    code, err = _cli_error(_argv(data_dir, tmp_path / "l3", batch_size=3), capsys,
                           env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert code == 2 and "not divisible by the world size 2" in err
    code, err = _cli_error(_argv(data_dir, tmp_path / "l4", bf16=True, use_fp16=True), capsys)
    assert code == 2 and "exclude each other" in err


def test_resume_from_another_model_is_a_clear_error(data_dir, tmp_path, capsys):
    train(**_train_flags(data_dir, tmp_path / "a", max_steps=2))
    other = _argv(data_dir, tmp_path / "b", num_channels=96, resume_checkpoint=str(
        tmp_path / "a" / "model000002.safetensors"), max_steps=3)
    code, err = _cli_error(other, capsys)
    assert code == 2 and "does not fit the model these flags build" in err
    assert "mis-shaped" in err


def test_preset_flags_apply_unless_given(monkeypatch):
    from adm_fast.train.config import parse
    flags = parse("diffusion", ["--preset", "64x64_diffusion", "--num_channels", "64",
                                "--device", "cpu", "--data_dir", "x"])
    assert flags["num_channels"] == 64 and flags["num_res_blocks"] == 3
    assert flags["noise_schedule"] == "cosine" and flags["use_new_attention_order"] is True
    assert flags["use_fp16"] is False  # a GPU default only
    with pytest.raises(ValueError, match="classifier preset"):
        parse("diffusion", ["--preset", "64x64_classifier"])


def test_fp16_run_tracks_fp32_and_saves_fp32_masters(data_dir, tmp_path):
    # The loss-scaling mechanics (overflow -> skip, lower the scale, no NaN) are
    # tested on MixedPrecisionTrainer itself; here the loop runs with it.
    train(**_train_flags(data_dir, tmp_path / "h", max_steps=3, use_fp16=True, ema_rate=""))
    train(**_train_flags(data_dir, tmp_path / "f", max_steps=3, ema_rate=""))
    half = [json.loads(line) for line in (tmp_path / "h" / "progress.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (tmp_path / "f" / "progress.jsonl").read_text().splitlines()]
    assert half[-1]["lg_loss_scale"] == pytest.approx(
        20 + 1e-3 * (3 - half[-1]["skipped_steps"]) - half[-1]["skipped_steps"])
    for a, b in zip(half, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    sd, _ = read_state_dict(str(tmp_path / "h" / "model000003.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert all(v.dtype == torch.float32 for v in sd.values())  # the fp32 masters are saved
    model = adm_fast.load_checkpoint(str(tmp_path / "h" / "model000003.safetensors"))
    assert model.flags["use_fp16"] is True
