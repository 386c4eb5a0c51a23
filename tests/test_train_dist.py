"""torchrun with 2 gloo processes on loopback computes the update one process
computes for the same global batch, with the default (shuffled) data order.

What is compared is the first step's gradient, read back from the AdamW state
the run saves (after one step from zero, exp_avg = (1 - beta1) * grad), and its
logged loss: each within twice the error eager fp32 makes in one process
against a float64 reference of the same step. Parameters after several AdamW
steps are not compared: AdamW divides by sqrt(v), so where a gradient is ~0
the all-reduce's reordering of a float sum becomes a step of up to lr, and no
tolerance derived from the precision holds.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import adm_fast
from adm_fast.distributed import World
from adm_fast.train import make_image_folder
from adm_fast.train.config import flags_from_kwargs
from adm_fast.train.data import load_data
from adm_fast.train.run import _build
from adm_fast.train.tasks import DiffusionTrainLoop

FLAGS = dict(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="4", num_head_channels=16, learn_sigma=True,
             class_cond=True, diffusion_steps=50, batch_size=4, max_steps=1, lr=1e-3,
             save_interval=1, log_interval=1, num_workers=0, progress=False, seed=7,
             ema_rate="0.9", device="cpu")
EPS = torch.finfo(torch.float32).eps


def _argv(data_dir, log_dir):
    out = ["train", "--data_dir", str(data_dir), "--log_dir", str(log_dir)]
    for k, v in FLAGS.items():
        out += [f"--{k}", str(v)]
    return out


def _run(cmd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _reference_step(data_dir, tmp_path, dtype):
    """(loss, gradients) of the first step in one process, on the eager backend:
    the run's initial weights, first batch, timesteps and noise."""
    flags = flags_from_kwargs("diffusion", {**FLAGS, "data_dir": str(data_dir),
                                            "num_classes": 3})
    torch.manual_seed(flags["seed"])
    model, diffusion = _build("diffusion", flags)
    data = load_data(data_dir=data_dir, batch_size=4, image_size=8, class_cond=True,
                     num_workers=0, seed=flags["seed"])
    x, cond = next(data)
    sampler = adm_fast.create_named_schedule_sampler("uniform", diffusion)
    loop = DiffusionTrainLoop(model=model, diffusion=diffusion, data=data,
                              world=World(0, 1, 0, torch.device("cpu")), log_dir=str(tmp_path),
                              batch_size=4, schedule_sampler=sampler, progress=False,
                              seed=flags["seed"])
    gen = loop.generator()
    t, weights = loop.draw_timesteps(gen)
    noise = torch.randn(x.shape, generator=gen)
    cond = loop.prepare_cond(cond, gen)
    model = model.to(dtype)
    with adm_fast.use_backend("eager"):
        terms = diffusion.training_losses(model, x.to(dtype), t, model_kwargs=cond,
                                          noise=noise.to(dtype))
    loss = (terms["loss"] * weights.to(dtype)).mean()
    loss.backward()
    return loss.item(), [p.grad.double() for p in model.parameters()]


@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform == "win32",
                    reason="torchrun needs a POSIX host")
def test_two_gloo_ranks_match_one_process(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, 16, 8, classes=("a", "b", "c"), seed=2)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "adm_fast.cli"] + _argv(data, tmp_path / "two"))
    assert "global batch 4 = 2 rank(s) x 2 per rank" in proc.stderr
    state = torch.load(tmp_path / "two" / "state000001.pt", weights_only=True)
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    two = [state["optimizer"]["state"][i]["exp_avg"].double() / (1 - beta1)
           for i in range(len(state["optimizer"]["state"]))]
    ref_loss, ref = _reference_step(data, tmp_path / "r64", torch.float64)
    one_loss, one = _reference_step(data, tmp_path / "r32", torch.float32)
    assert len(two) == len(ref)
    floor = 4 * EPS * max(r.abs().max().item() for r in ref)
    for i, (g, r, e) in enumerate(zip(two, ref, one)):
        err, base = (g - r).abs().max().item(), (e - r).abs().max().item()
        assert err <= 2 * base + floor, (i, tuple(r.shape), err, base, floor)
    # A different batch, timesteps or noise would be far off: the check has teeth.
    assert max((g - r).abs().max().item() for g, r in zip(two, ref)) < 1e-3 * max(
        r.abs().max().item() for r in ref)
    row = json.loads((tmp_path / "two" / "progress.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    tol = 2 * abs(one_loss - ref_loss) + 8 * EPS * abs(ref_loss)
    assert abs(row["loss"] - ref_loss) <= tol, (row["loss"], one_loss, ref_loss)
    # Only rank 0 writes: one log, one set of files.
    assert sorted(os.listdir(tmp_path / "two")) == [
        "ema_0.9_000001.safetensors", "latest.json", "log.txt", "model000001.safetensors",
        "progress.csv", "progress.jsonl", "state000001.pt"]
