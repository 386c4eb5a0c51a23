"""adm_fast's build. The Triton kernels live in kernels/ and install as
adm_fast.kernels; csrc/ holds the C++/CUDA sources."""

from setuptools import find_packages, setup

setup(
    name="adm_fast",
    version="0.1.0",
    description="A fast, exact engine for ADM (guided-diffusion) models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adm_fast", "adm_fast.*"]) + ["adm_fast.kernels"],
    package_dir={"adm_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest>=7"]},
)
