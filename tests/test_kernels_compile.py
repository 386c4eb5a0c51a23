"""Every Triton kernel compiles for sm_90 and sm_80 with the specialisations a
real launch gets, without register spills but the allowed ones (fp32
attention past head dim 128) (no GPU needed: Triton's bundled ptxas). The
table (registers, spills, vector width) is in the test output."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "adm_fast.benchmarks.aot"], env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ compilations: 0 failures, \d+ spill within the allowed fp32 "
                        r"head-dim 192/256 attention cases, 0 unexpected", summary), summary


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_allowed_spills_are_fp32_attention_past_head_dim_128():
    """spill_allowed reads PREC and BLOCK_D from the launch's arguments (the
    launchers pass them by position): it allows the fp32 hd192/256 attention
    kernels with the three-product dots and no other (bench plan uses it too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from adm_fast.benchmarks import aot\n"
            "for l in aot.representative_launches(90):\n"
            "    if aot.spill_allowed(l):\n"
            "        print(l.case, l.kernel.fn.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    allowed = set(proc.stdout.splitlines())
    want = {f"attention hd{d} T{t}{ntc} float32 attn_{k}_kernel"
            for d, t in ((192, 256), (256, 1024)) for ntc in ("", " NTC")
            for k in ("fwd", "bwd_dkdv", "bwd_dq")}
    assert allowed == want, sorted(allowed ^ want)
