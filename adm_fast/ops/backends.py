"""The backends adm_fast ships: where each can run here, and why not.

  eager   guided-diffusion's arithmetic, the reference; everywhere
  sdpa    torch's scaled_dot_product_attention; everywhere
  triton  Triton kernels (adm_fast/kernels/): CUDA tensors, or CPU tensors in Triton's
          interpreter when TRITON_INTERPRET=1 was set before adm_fast was imported
  cpu     fused C++ kernels (csrc/cpu, the adm_fast._C_cpu extension)
  cuda    hand-written CUDA kernels (csrc/cuda, the adm_fast._C_cuda extension)

What each supports per op is declared by the op's implementations (the Impl
classes in each op's spec file); a Triton implementation names its kernel
module (TritonImpl.module), which the backend imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import store
from .backend import REFERENCE, Backend, register_backend
from .impl import Impl


class _Anywhere(Backend):
    """Plain torch code: runs on every device torch does (meta tensors too)."""

    def device_reasons(self, device_type: str) -> list[str]:
        return []


class EagerBackend(_Anywhere):
    name, priority, is_reference = REFERENCE, 0, True

    def notes(self) -> str:
        return "everywhere: guided-diffusion's arithmetic, the reference"


class SdpaBackend(_Anywhere):
    name, priority = "sdpa", 10

    def notes(self) -> str:
        return "any device: torch.nn.functional.scaled_dot_product_attention"


class TritonBackend(Backend):
    """Kernels are defined once, when the op that runs them registers its
    TritonImpl: compiled for CUDA, or interpreted on CPU tensors (Triton reads
    TRITON_INTERPRET when the kernels are defined). These are module-level
    facts that torch.compile reads as constants. On a CPU build of torch
    without TRITON_INTERPRET nothing can run them, and they are defined on
    first use instead."""

    name, priority = "triton", 20

    def __init__(self) -> None:
        self.error: str | None = None
        self.modules: dict[str, object] = {}  # kernel module name -> module (None: not yet)
        self.interpreted, self.device_types = False, ("cuda",)
        self.deferred = False
        if torch.version.cuda is None and not os.environ.get("TRITON_INTERPRET") \
                and importlib.util.find_spec("triton") is not None:
            # A CPU build of torch, no interpreter asked for: no tensor here can
            # reach a kernel, so defining them (Triton reads and parses each
            # one's source) waits for a first use.
            self.deferred = True
            return
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            self.error = f"triton is not importable ({type(e).__name__}: {e})"

    def add_module(self, name: str) -> None:
        """A TritonImpl's kernel module (adm_fast/kernels/<name>.py)."""
        self.modules.setdefault(name, None)
        if not self.deferred and not self.error:
            self.kernels(name)

    def kernels(self, name: str):
        module = self.modules.get(name)
        if module is None:
            module = self.modules[name] = importlib.import_module(f"adm_fast.kernels.{name}")
            self.interpreted = any(type(v).__name__ == "InterpretedFunction"
                                   for v in vars(module).values())
            self.device_types = ("cpu",) if self.interpreted else ("cuda",)
        return module

    def build_id(self) -> str:
        # Triton's version pins its compiler (ptxas ships with it); the kernels
        # are compiled from their source files here, so an edited file is a
        # new build too.
        if self.error:
            return "none"
        files = ",".join(store.module_build(f"adm_fast.kernels.{m}") for m in sorted(self.modules))
        return f"{triton_version()}{'-interpreted' if self.interpreted else ''}[{files}]"

    def unavailable_reasons(self) -> list[str]:
        return [self.error] if self.error else []

    def device_reasons(self, device_type: str) -> list[str]:
        if self.interpreted and device_type == "cuda":
            return ["kernels were defined for the interpreter (TRITON_INTERPRET=1); "
                    "unset it to run them on the GPU"]
        if not self.interpreted and device_type == "cpu":
            return ["CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 "
                    "before importing adm_fast"]
        return super().device_reasons(device_type)

    def auto_reasons(self, device_type: str) -> list[str]:
        if device_type == "cpu":
            return ["CPU tensors would run in Triton's interpreter, which auto never picks"]
        return []

    def notes(self) -> str:
        if self.interpreted:
            return "CPU tensors, in Triton's interpreter (TRITON_INTERPRET=1): for tests"
        return "CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 at import)"


def triton_version() -> str | None:
    """Triton's version, from its installed metadata (no import), or None."""
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


class NativeBackend(Backend):
    """A compiled extension registering kernels for the adm_fast_native ops
    (their schemas are defined in Python, by the op specs through ops/native.py).
    Loaded as it is registered, whatever the specs have defined by then: the
    dispatcher keeps a kernel registered before its schema and checks the two
    agree when the schema comes, so no import order matters."""

    module = ""
    how_to_build = ""

    def __init__(self) -> None:
        self.ext = None
        self.error: str | None = None
        if os.environ.get("ADM_FAST_NO_EXT") == "1":
            self.error = "extensions disabled by ADM_FAST_NO_EXT=1"
            return
        try:
            self.ext = importlib.import_module(self.module)
        except ImportError as e:
            self.error = f"{self.how_to_build()} ({type(e).__name__}: {e})"

    def unavailable_reasons(self) -> list[str]:
        return [self.error] if self.error else []

    def build_info(self) -> str:
        return self.ext.build_info() if self.ext is not None else self.error

    def build_id(self) -> str:
        return store.module_build(self.module) if self.ext is not None else "none"


class CpuBackend(NativeBackend):
    name, priority, device_types, module = "cpu", 30, ("cpu",), "adm_fast._C_cpu"

    def how_to_build(self) -> str:
        return ("the C++ CPU extension is not built; reinstall with "
                "pip install --no-build-isolation -e .")

    def notes(self) -> str:
        return "CPU tensors"


class CudaBackend(NativeBackend):
    # Until bench/gpu_check's measurements say otherwise per shape, auto ranks
    # the CUDA kernels below Triton's.
    name, priority, device_types, module = "cuda", 15, ("cuda",), "adm_fast._C_cuda"

    def how_to_build(self) -> str:
        why = ("torch is a CPU build" if torch.version.cuda is None else
               "adm_fast was installed without it (ADM_FAST_CUDA=0, or nvcc was not found)")
        return f"the CUDA extension is not built: {why}"

    def notes(self) -> str:
        return "CUDA tensors"


EAGER = register_backend(EagerBackend())
SDPA = register_backend(SdpaBackend())
TRITON = register_backend(TritonBackend())
CPU = register_backend(CpuBackend())
CUDA = register_backend(CudaBackend())


class TritonImpl(Impl):
    """A Triton implementation: `module` names its kernel module in
    adm_fast/kernels/, which the backend imports (TritonBackend)."""

    backend = TRITON.name
    module = ""

    def on_register(self) -> None:
        TRITON.add_module(self.module)

    @property
    def kernels(self):
        return TRITON.kernels(self.module)
