"""What adm_fast can run here: `adm-fast info` or `python -m adm_fast.info`.

Lists every backend of the op layer, whether it can run on this machine (built,
importable, and a device here it runs on) and why not, and which ops it
implements; then the devices and versions that matter.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _openmp_wait() -> str:
    """How idle OpenMP workers wait: what the process was started with (read
    once, as torch loaded libgomp)."""
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if key in os.environ:
            return f"{key}={os.environ[key]}"
    return ("libgomp's default (300,000 spins; adm-fast sets GOMP_SPINCOUNT=10000 for its "
            "commands: on a shared machine set it before importing torch)")


def _here(backend, devices: list[str]) -> str:
    """"usable" or why not, on this machine's devices."""
    why = backend.unavailable_reasons()
    if why:
        return "unavailable: " + "; ".join(why)
    usable = [d for d in devices if not backend.device_reasons(d)]
    if not usable:
        runs = "/".join(backend.device_types)
        return f"installed, but not usable here: it runs on {runs} tensors and this machine has none"
    auto = [d for d in usable if not backend.auto_reasons(d)]
    if not auto:
        return f"usable on {'/'.join(usable)} when chosen by name (auto passes it over here)"
    return f"usable on {'/'.join(usable)}"


def _layouts(backend: str) -> str:
    """What each op's implementation on `backend` declares it takes, ops that
    take the same named together ("ddim_step, ddpm_step: any layout;
    group_norm_act: x contiguous/channels_last, weight/bias contiguous")."""
    from . import ops

    by_text = {}
    for name, op in sorted(ops.ops().items()):
        if backend in op.impls:
            by_text.setdefault(op.impls[backend].layouts_accepted(), []).append(name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in by_text.items())


def report() -> str:
    import torch

    from . import __version__, ops
    from .ops.backends import triton_version

    lines = [f"adm_fast {__version__}  (python {platform.python_version()}, "
             f"torch {torch.__version__})"]
    triton = ops.backends()["triton"]
    if triton.unavailable_reasons():
        lines.append(f"triton: {'; '.join(triton.unavailable_reasons())}")
    else:
        lines.append(f"triton {triton_version()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    elif torch.version.cuda is None:
        lines.append("CUDA: not available (CPU build of torch)")
    else:
        lines.append(f"CUDA: torch is built for CUDA {torch.version.cuda}, but no GPU is present "
                     "(torch.cuda.is_available() is False)")
    lines.append(f"CPU threads: {torch.get_num_threads()}; OpenMP waiting: {_openmp_wait()}")
    lines.append("")
    lines.append("backends (auto tries them in this order, after measured preferences):")
    for name, backend in ops.backends().items():
        lines.append(f"  {name:<7} {_here(backend, devices)}")
        if backend.notes():
            lines.append(f"          runs on: {backend.notes()}")
        lines.append(f"          ops: {', '.join(sorted(ops.ops_of_backend(name)))}")
        lines.append(f"          layouts: {_layouts(name)}")
    lines.append("")
    lines.append(f"C++ CPU extension: {ops.backends()['cpu'].build_info()}")
    cuda = ops.backends()["cuda"]
    built = "" if cuda.unavailable_reasons() or "cuda" in devices else (
        "  -- CUDA kernels are built, but no GPU is present: they cannot run here")
    lines.append(f"CUDA extension:    {cuda.build_info()}{built}")
    lines.append(f"setting: {ops.current_backend()} (use_backend / $ADM_FAST_BACKEND)")
    lines += _refused()
    return "\n".join(lines)


def _refused() -> list[str]:
    """What auto will not use here: implementations that disagreed with the
    reference on this machine and build (ops/verify.py)."""
    from .ops import store, verify

    if not verify.enabled():
        return ["", "checked against the reference before auto uses them: no "
                "(ADM_FAST_VERIFY=0)"]
    refused = verify.refused_here()
    lines = ["", f"refused by auto here (they disagreed with the reference; "
             f"{store.path('verify.json')}): {len(refused) or 'none'}"]
    for v in refused:
        at = f" at {v['threads']}" if v.get("threads") else f" on {v['device'].split('|')[0]}"
        lines.append(f"  {v['op']} on {v['impl']}: {v['call']}{at}: {v['what']} max error "
                     f"{v['error']:.3g} > {v['allowed']:.3g} allowed")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adm-fast info", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--retune", action="store_true",
                        help="forget this machine's stored autotune timings ($ADM_FAST_CACHE/"
                             "autotune.json), e.g. ones taken while the machine was busy: the "
                             "next runs time their candidates again")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, or a flag it does not know: argparse said which
        return int(e.code or 0)
    if args.retune:
        from .ops import autotune
        from .ops import ops as all_ops

        dropped = autotune.forget()
        for op in all_ops().values():  # and this process times them again too
            op._decisions.clear()
        print(f"autotune: dropped {dropped} stored choice{'s' if dropped != 1 else ''} of this "
              "machine; the next runs time their candidates again")
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
