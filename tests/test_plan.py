"""adm-fast bench plan: one guided sampling step traced on fake CUDA tensors as
an sm_90 GPU would run it, without a GPU. Needs a CUDA build of PyTorch (CI
runs this file in its CUDA stage); on a CPU build the command says so.

What a GPU step must look like: GroupNorm and attention on fused kernels, the
update fused, nothing that waits for the host, no CPU tensor, NHWC from the
first convolution to the last (no layout copy, no NCHW 16-bit convolution),
nothing rebuilt in the classifier's backward, every Triton launch compiling
for sm_90 without unexpected spills, and fewer launches than eager."""

import json
import os
import subprocess
import sys

import pytest
import torch

CUDA_BUILD = torch.version.cuda is not None
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILD, reason="needs a CUDA build of PyTorch "
                                      "(no GPU): CI's CUDA stage runs it")
FUSED = {"triton", "cuda"}


def _run(args, tmp_path):
    """The command in a process of its own: the plan needs Triton's JIT kernels,
    and this test session may have defined them for the interpreter (conftest
    turns it on where no GPU is)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "adm_fast.cli", "bench", "plan", *args],
                          capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)


def _plan(tmp_path, preset, dtype, sampler, batch, aot=True):
    out = tmp_path / "plan.json"
    proc = _run(["--preset", preset, "--dtype", dtype, "--sampler", sampler, "--batch",
                 str(batch), "--json", str(out)] + ([] if aot else ["--no-aot"]), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def _check(p, sampler):
    ops = p["ops"]
    for name in ("group_norm_act", "qkv_attention", "group_norm_act.backward",
                 "qkv_attention.backward"):
        used = set(ops[name])
        # the classifier's attention pool runs in fp32 (its head): SDPA there
        assert used - {"sdpa"} <= FUSED and used & FUSED, (name, ops[name])
    assert set(ops[f"{sampler}_step"]) <= FUSED, ops
    assert "conv3x3" in ops
    assert p["host_syncs"] == 0, p["host_sync_sites"]
    assert p["cpu_tensors"] == 0, p["cpu_tensor_sites"]
    assert p["layout_copies"] == 0, p["layout_copy_sites"]
    assert p["nchw_convolutions"] == 0, p["nchw_convolution_sites"]
    assert p["eager_nchw_convolutions"] > 0  # eager stays guided-diffusion's NCHW
    assert p["classifier_backward_group_norm_forwards"] == 0
    assert p["launches"]["total"] < p["eager_launches"]
    assert p["cuda_graph"]["host_syncs_in_graph"] == 0
    assert p["cuda_graph"]["cpu_tensors_in_graph"] == 0
    assert p["cuda_graph"]["per_step_launches"] < 40
    r = p["roofline"]
    assert 0 < r["adm_fast"]["ms"] < r["eager"]["ms"]
    assert r["adm_fast"]["tflop"] > 0.9 * r["eager"]["tflop"]  # the same arithmetic
    if p["aot"] is not None:
        assert p["aot"]["compiled"] > 0
        assert p["aot"]["failures"] == 0, p["aot"]["failure_list"]
        assert p["aot"]["spills_unexpected"] == 0, p["aot"]["spill_list"]


@needs_cuda_build
@pytest.mark.parametrize("preset, dtype, sampler, batch", [
    ("64x64_diffusion", "bf16", "ddpm", 8),
    ("64x64_diffusion", "fp16", "ddim", 8),
    ("256x256_diffusion", "bf16", "ddim", 32),
    ("256x256_diffusion", "fp16", "ddpm", 32),
])
def test_guided_step_plan(preset, dtype, sampler, batch, tmp_path):
    _check(_plan(tmp_path, preset, dtype, sampler, batch), sampler)


@needs_cuda_build
def test_plan_of_the_256_model_matches_the_flop_count(tmp_path):
    """81 TFLOP per guided step at batch 32: the UNet forward (2.24 TFLOP an
    image) and the classifier's forward and backward to x, counted alike for
    eager and adm_fast."""
    p = _plan(tmp_path, "256x256_diffusion", "bf16", "ddpm", 32, aot=False)
    assert 78 < p["roofline"]["eager"]["tflop"] < 84
    assert p["roofline"]["adm_fast"]["memory_ms"] < 0.5 * p["roofline"]["eager"]["memory_ms"]


@needs_cuda_build
def test_plan_command_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = _run(["--preset", "64x64_diffusion", "--batch", "2", "--no-aot", "--json", str(out)],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "roofline on H200" in proc.stdout and "launches:" in proc.stdout
    p = json.loads(out.read_text())
    for key in ("ops", "launches", "eager_launches", "host_syncs", "cpu_tensors",
                "layout_copies", "classifier_backward_group_norm_forwards", "aot", "cuda_graph",
                "roofline"):
        assert key in p
    assert set(p["launches"]) >= {"triton", "native", "aten"}


@pytest.mark.skipif(CUDA_BUILD, reason="checks the message of a CPU build of PyTorch")
def test_plan_on_a_cpu_build_says_what_it_needs(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 2
    assert "needs a CUDA build of PyTorch" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
