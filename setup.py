"""adm_fast's build.

The Triton kernels live in adm_fast/kernels/. csrc/ holds
two optional extensions, built with torch's BuildExtension and ninja:
  adm_fast._C_cpu   fused C++ CPU kernels; built on every install
                    (ADM_FAST_CPU=0 skips it)
  adm_fast._C_cuda  CUDA kernels; built when torch is a CUDA build and nvcc is
                    found (ADM_FAST_CUDA=1 forces it, ADM_FAST_CUDA=0 skips it;
                    TORCH_CUDA_ARCH_LIST picks the targets, default sm_80, sm_90
                    and PTX for the newest)
Install torch first and build with --no-build-isolation so the build sees it.
"""

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup


def _flag(name: str):
    value = os.environ.get(name)
    return None if value is None else value not in ("0", "", "false", "False")


def _cuda_home():
    """(folder, how it was found) of the CUDA toolkit, or (None, why not).

    torch guesses CUDA_HOME as two folders above the `nvcc` on PATH, which is
    wrong where that nvcc is a wrapper script or a link (e.g. /usr/local/bin/nvcc
    gives /usr/local). So: $CUDA_HOME / $CUDA_PATH as given; else the folder
    above the real nvcc binary, asked of nvcc itself (its --dryrun prints the
    folder it runs from); else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return ("/usr/local/cuda", "the default folder") if os.path.isdir("/usr/local/cuda") \
            else (None, "no nvcc on PATH and no $CUDA_HOME")
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        return home, f"nvcc on PATH ({nvcc})"
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        here = None
    if here:
        home = os.path.dirname(here.group(1).strip())
        return home, f"nvcc on PATH ({nvcc}, which runs {home}/bin/nvcc)"
    return home, f"nvcc on PATH ({nvcc})"


want_cuda = _flag("ADM_FAST_CUDA")
CUDA_HOME_FOUND, CUDA_HOME_HOW = (None, "not looked for") if want_cuda is False else _cuda_home()
if CUDA_HOME_FOUND and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_HOME_FOUND  # before torch reads it, at import

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # the extensions need torch at build time
    raise SystemExit("adm_fast builds against an installed PyTorch: install torch first, then "
                     "pip install --no-build-isolation ...") from e


# No -std: torch's BuildExtension adds the standard its headers need (C++17 up
# to torch 2.9, C++20 from 2.10).
# -ffp-contract=off: the step kernels must round as the eager step does (no FMA).
# -fno-trapping-math: lets GCC turn the selects of the clamps and the SiLU into
# vector blends (with trapping math it keeps them as branches and leaves the
# loop scalar, the SiLU many times slower: docs/performance.md); results are
# unchanged.
CXX_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off"]
ext_modules = []
if _flag("ADM_FAST_CPU") is not False:
    # -fopenmp: at::parallel_for is inline OpenMP in the headers; without the
    # flag it compiles to a serial loop in this extension.
    ext_modules.append(CppExtension(
        "adm_fast._C_cpu", sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]}, extra_link_args=["-fopenmp"]))

have_cuda = torch.version.cuda is not None and CUDA_HOME_FOUND is not None
if want_cuda or (want_cuda is None and have_cuda):
    if torch.version.cuda is None:
        raise SystemExit("adm_fast: ADM_FAST_CUDA=1 but torch is a CPU build "
                         f"({torch.__version__}); install a CUDA build of torch first")
    header = os.path.join(CUDA_HOME_FOUND or "", "include", "cuda_runtime_api.h")
    if not CUDA_HOME_FOUND or not os.path.isfile(header):
        where = (f"looked for include/cuda_runtime_api.h in {CUDA_HOME_FOUND} (from "
                 f"{CUDA_HOME_HOW})" if CUDA_HOME_FOUND else CUDA_HOME_HOW)
        raise SystemExit(f"adm_fast: the CUDA headers were not found: {where}; set CUDA_HOME to "
                         "the CUDA toolkit's folder (the one holding bin/nvcc and include/), "
                         "or ADM_FAST_CUDA=0 to build without the CUDA extension")
    print(f"adm_fast: building the CUDA extension against CUDA_HOME={CUDA_HOME_FOUND} "
          f"(from {CUDA_HOME_HOW}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # adm-fast info says what the kernels were built for
    archs = [f'-DADM_FAST_CUDA_ARCHS="{os.environ["TORCH_CUDA_ARCH_LIST"]}"']
    ext_modules.append(CUDAExtension(
        "adm_fast._C_cuda",
        sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"],
        extra_compile_args={"cxx": CXX_FLAGS + archs,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr"]}))

setup(
    name="adm_fast",
    version="0.1.0",
    description="A fast, exact engine for ADM (guided-diffusion) models",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adm_fast", "adm_fast.*"]),
    package_data={"adm_fast.demo": ["weights/*.safetensors", "heldout_digits.npz"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    # "eval": adm-fast evaluate's statistics. Its network, torch-fidelity's
    # InceptionV3, is installed with `pip install --no-deps torch-fidelity==0.4.0`:
    # as a requirement it would pull torchvision, and with it another torch.
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3"], "eval": ["scipy>=1.9"]},
    entry_points={"console_scripts": ["adm-fast=adm_fast.cli:main"]},
)
