"""torchrun with 2 gloo processes on loopback trains the same parameters as one
process with the same global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from adm_fast.checkpoint import read_state_dict
from adm_fast.train import make_image_folder

FLAGS = dict(image_size=8, num_channels=64, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="4", num_head_channels=16, learn_sigma=True,
             class_cond=True, diffusion_steps=50, batch_size=4, max_steps=3, lr=1e-3,
             save_interval=3, log_interval=1, num_workers=0, progress=False, seed=7,
             deterministic_data=True, ema_rate="0.9", device="cpu")


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


@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform == "win32",
                    reason="torchrun needs a POSIX host")
def test_two_gloo_ranks_match_one_process(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, 16, 8, classes=("a", "b", "c"), seed=2)
    _run([sys.executable, "-m", "adm_fast.cli"] + _argv(data, tmp_path / "one"))
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "adm_fast.cli"] + _argv(data, tmp_path / "two"))
    assert "global batch 4 = 2 rank(s) x 2 per rank" in proc.stderr
    for name in ("model000003.safetensors", "ema_0.9_000003.safetensors"):
        one, _ = read_state_dict(str(tmp_path / "one" / name))
        two, _ = read_state_dict(str(tmp_path / "two" / name))
        for k in one:
            # Gradients are all-reduced in another order than one process sums
            # them; Adam turns that float noise into at most a sliver of lr.
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4, msg=f"{name}:{k}")
    # Only rank 0 writes: one log, one set of files.
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
