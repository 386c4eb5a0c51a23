"""The CUDA extension, built against a CUDA build of PyTorch on a machine
without a GPU (CI's CUDA stage): it imports, every adm_fast_native op a CUDA
implementation calls has a CUDA kernel, and `adm-fast info` says plainly that
the kernels are built but there is no GPU to run them."""

import subprocess
import sys

import pytest
import torch

needs_cuda_build = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build "
                                      "of PyTorch (CI's CUDA stage)")


def _built() -> bool:
    from adm_fast import ops
    return not ops.backends()["cuda"].unavailable_reasons()


@needs_cuda_build
def test_extension_imports_without_a_gpu():
    import adm_fast._C_cuda as ext

    assert "kernels for TORCH_CUDA_ARCH_LIST=" in ext.build_info()
    assert _built()


def _called(backend):
    from adm_fast import ops

    called = []
    for op in ops.ops().values():
        impl = op.impls.get(backend)
        if impl is not None:
            called += [o.name() for o in impl.native_ops()]
    return called


@needs_cuda_build
def test_every_native_op_a_cuda_implementation_calls_has_a_cuda_kernel():
    called = _called("cuda")
    assert {"adm_fast_native::group_norm_act_fwd", "adm_fast_native::group_norm_act_bwd",
            "adm_fast_native::ddpm_step", "adm_fast_native::ddim_step"} <= set(called)
    missing = [name for name in called
               if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")]
    assert not missing, missing


def test_every_native_op_a_cpu_implementation_calls_has_a_cpu_kernel():
    from adm_fast import ops

    if ops.backends()["cpu"].unavailable_reasons():
        pytest.skip("the CPU extension is not built")
    called = _called("cpu")
    assert "adm_fast_native::conv3x3_winograd_u" in called
    missing = [name for name in called
               if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")]
    assert not missing, missing


@needs_cuda_build
def test_info_says_kernels_are_built_but_no_gpu_is_present():
    out = subprocess.run([sys.executable, "-m", "adm_fast.info"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "CUDA kernels are built, but no GPU is present" in out
    assert f"torch is built for CUDA {torch.version.cuda}, but no GPU is present" in out
