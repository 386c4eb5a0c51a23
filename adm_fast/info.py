"""What adm_fast can run here: `adm-fast info` or `python -m adm_fast.info`.

Lists every backend of the op layer, whether it is built and usable on this
machine (and why not), and which ops it implements; then the devices and
versions that matter.
"""

from __future__ import annotations

import platform
import sys

import torch


def report() -> str:
    from . import __version__, ops
    from .ops import cpu_backend, cuda_backend

    lines = [f"adm_fast {__version__}  (python {platform.python_version()}, "
             f"torch {torch.__version__})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("CUDA: not available" + (" (CPU build of torch)"
                                              if torch.version.cuda is None else ""))
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    lines.append("")
    lines.append("backends (auto tries them in this order, after measured preferences):")
    for name, backend in ops.backends().items():
        why = backend.unavailable_reasons()
        status = "usable" if not why else "unavailable: " + "; ".join(why)
        lines.append(f"  {name:<7} {status}")
        if backend.notes():
            lines.append(f"          runs on: {backend.notes()}")
        lines.append(f"          ops: {', '.join(sorted(backend.ops))}")
    lines.append("")
    lines.append(f"C++ CPU extension: {cpu_backend.build_info()}")
    lines.append(f"CUDA extension:    {cuda_backend.build_info()}")
    lines.append(f"setting: {ops.current_backend()} (use_backend / $ADM_FAST_BACKEND)")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
