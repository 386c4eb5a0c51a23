"""adm_fast's build.

The Triton kernels live in kernels/ and install as adm_fast.kernels. csrc/ holds
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

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # the extensions need torch at build time
    raise SystemExit("adm_fast builds against an installed PyTorch: install torch first, then "
                     "pip install --no-build-isolation ...") from e


def _flag(name: str):
    value = os.environ.get(name)
    return None if value is None else value not in ("0", "", "false", "False")


# -ffp-contract=off: the step kernels must round as the eager step does (no FMA).
# -fno-trapping-math: lets GCC turn the selects of the clamps and the SiLU into
# vector blends (with trapping math it keeps them as branches and leaves the
# loop scalar: SiLU ran 20x slower on an AVX2 EPYC); results are unchanged.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off"]
ext_modules = []
if _flag("ADM_FAST_CPU") is not False:
    # -fopenmp: at::parallel_for is inline OpenMP in the headers; without the
    # flag it compiles to a serial loop in this extension.
    ext_modules.append(CppExtension(
        "adm_fast._C_cpu", sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]}, extra_link_args=["-fopenmp"]))

want_cuda = _flag("ADM_FAST_CUDA")
have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
if want_cuda or (want_cuda is None and have_cuda):
    if not have_cuda:
        raise SystemExit("ADM_FAST_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext_modules.append(CUDAExtension(
        "adm_fast._C_cuda",
        sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"],
        extra_compile_args={"cxx": CXX_FLAGS,
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}))

setup(
    name="adm_fast",
    version="0.1.0",
    description="A fast, exact engine for ADM (guided-diffusion) models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adm_fast", "adm_fast.*"]) + ["adm_fast.kernels"],
    package_dir={"adm_fast.kernels": "kernels"},
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
