"""csrc/: the CUDA sources compile (nvcc, registers and spills in the log),
the torch-facing CUDA binding passes a host syntax check, the package works
without any extension, and `adm-fast info` reports what is built."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import adm_fast
from adm_fast.info import report

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a",
           "-gencode=arch=compute_80,code=sm_80", "-Xptxas", "-v", str(source),
           "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    print(log[-8000:])
    assert proc.returncode == 0, log[-4000:]
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, "register spills"


def _torch_includes():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


@pytest.mark.skipif(not Path("/usr/local/cuda/include/cuda_runtime.h").exists()
                    or shutil.which("g++") is None,
                    reason="needs the CUDA toolkit headers and g++")
def test_cuda_binding_host_syntax(tmp_path):
    """bindings.cpp against torch's headers. A CPU build of torch lacks the CUDA
    libraries' headers; empty stand-ins (plus the few handle typedefs torch's
    headers name) let g++ check our code, which uses none of them."""
    stubs = tmp_path / "stubs"
    (stubs / "c10/cuda/impl").mkdir(parents=True)
    typedefs = {"cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;",
                "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                               "typedef int cublasStatus_t;",
                "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
                "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;",
                "cusolver_common.h": "typedef int cusolverStatus_t;"}
    for name, body in typedefs.items():
        (stubs / name).write_text(f"#pragma once\n{body}\n")
    cmd = ["g++", "-fsyntax-only", "-std=c++17", f"-I{stubs}", *_torch_includes(),
           f"-I{sysconfig.get_paths()['include']}", "-I/usr/local/cuda/include",
           "-DTORCH_EXTENSION_NAME=_C_cuda", str(ROOT / "csrc/cuda/bindings.cpp")]
    for _ in range(12):  # stand in for any other library header this torch includes
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        missing = re.search(r"fatal error: (\S+\.h): No such file", proc.stderr)
        if proc.returncode == 0 or not missing:
            break
        header = stubs / missing.group(1)
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n")
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_info_reports_every_backend():
    text = report()
    for name in adm_fast.ops.backends():
        assert f"  {name} " in text
    assert "C++ CPU extension:" in text and "CUDA extension:" in text


def test_no_triton_kernel_is_defined_where_none_can_run():
    """A CPU build of torch without TRITON_INTERPRET: info says what it says of
    Triton without defining a kernel; the first call that asks defines them."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch defines the kernels at import")
    code = ("import sys\n"
            "from adm_fast.info import report\n"
            "text = report()\n"
            "print([m for m in sys.modules if m.startswith('adm_fast.kernels.') and "
            "m != 'adm_fast.kernels.step_codes'])\n"
            "print([ln for ln in text.splitlines() if 'triton' in ln.lower()])\n"
            "from adm_fast.ops.backends import TRITON\n"
            "print(TRITON.kernels('diffusion_step').__name__, TRITON.interpreted)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    defined, lines, first_use = proc.stdout.splitlines()[-3:]
    assert defined == "[]"
    from importlib import metadata
    assert f"triton {metadata.version('triton')}" in lines
    assert "installed, but not usable here: it runs on cuda tensors" in lines
    assert first_use == "adm_fast.kernels.diffusion_step False"


def test_works_without_extensions():
    """With the compiled extensions unavailable, the package imports, says why
    in `adm-fast info`, and the eager/Triton/SDPA paths still pass their tests."""
    env = {**os.environ, "ADM_FAST_NO_EXT": "1"}
    info = subprocess.run([sys.executable, "-m", "adm_fast.info"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert info.returncode == 0
    assert re.search(r"cpu +unavailable: extensions disabled", info.stdout)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(ROOT / "tests/test_dispatch.py"), str(ROOT / "tests/test_reference_diffusion.py"),
         str(ROOT / "tests/test_reference_numeric.py") + "::test_matches_guided_diffusion",
         str(ROOT / "tests/test_group_norm_act.py"), "-k", "not split and not low_precision"],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    print(tests.stdout[-3000:])
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "skipped" in tests.stdout  # the CPU-extension tests skip cleanly


def test_step_codes_header_is_generated_from_the_python_table():
    """The C++/CUDA kernels read the mean/variance codes from csrc/step_codes.h,
    generated from adm_fast/kernels/step_codes.py (the one definition)."""
    from adm_fast.kernels import step_codes

    assert (ROOT / "csrc" / "step_codes.h").read_text() == step_codes.header(), \
        "regenerate: python -m adm_fast.kernels.step_codes > csrc/step_codes.h"
