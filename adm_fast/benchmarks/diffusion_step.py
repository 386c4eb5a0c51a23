"""Guided sampling step benchmark: one DDPM (learned-range variance, classifier
guidance) and one DDIM (eta 0.5, guidance) step, fused vs the eager chain vs
torch.compile of it, with bandwidth against the device ceiling and the error
against an fp64 reference, in one run.

    python -m adm_fast.benchmarks.diffusion_step [--device cuda] [--no_save]

Bytes: DDPM reads x, eps, v, grad, noise and writes x_{t-1}, x_0 (7 tensors);
DDIM reads x, eps, grad, noise and writes 2 (6 tensors).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .. import ops
from ..diffusion import create_gaussian_diffusion
from ..ops.diffusion_step import ddim_reference, ddpm_reference
from .common import (
    add_results_flags,
    ceilings,
    context,
    median_ms,
    print_table,
    save_rows,
    try_compile,
)

SIZES = (64, 256, 512)
BATCHES = (1, 8, 32)


def case(kind, b, size, device):
    d = create_gaussian_diffusion(learn_sigma=True, timestep_respacing="250")
    t = torch.full((b,), 100, device=device, dtype=torch.long)
    x = torch.randn(b, 3, size, size, device=device)
    out = torch.randn(b, 6, size, size, device=device)
    noise, grad = torch.randn_like(x), torch.randn_like(x) * 0.1
    if kind == "ddpm":
        args = (x, out, noise, d.step_coefs("ddpm", t), grad, "eps", "learned_range", True)
        return args, ops.ddpm_step, ddpm_reference, 7
    args = (x, out, noise, d.step_coefs("ddim", t), grad, "eps", True, 0.5)
    return args, ops.ddim_step, ddim_reference, 6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench ops diffusion_step", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="one size and batch only")
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ctx, rows = context(device), []
    sizes, batches = ((SIZES[0],), (BATCHES[0],)) if args.quick else (SIZES, BATCHES)
    for kind in ("ddpm", "ddim"):
        for size in sizes:
            for b in batches:
                call_args, op, reference, tensors = case(kind, b, size, device)
                exact = reference(*[a.double() if isinstance(a, torch.Tensor) else a
                                    for a in call_args])[0]
                impls = {"adm_fast": lambda a=call_args, op=op: op(*a),
                         "eager": lambda a=call_args, ref=reference: ref(*a)}
                if args.compile and b == batches[-1]:
                    compiled = try_compile(reference)
                    if compiled is not None:
                        impls["compile"] = lambda a=call_args, f=compiled: f(*a)
                nbytes = tensors * call_args[0].numel() * 4
                times = {}
                for name, fn in impls.items():
                    try:
                        err = (fn()[0].double() - exact).abs().max().item()
                        times[name] = median_ms(fn, device)
                    except Exception as e:
                        print(f"  {name} {kind} B={b} {size}²: {type(e).__name__}: {e}")
                        continue
                    gbps = nbytes / times[name] / 1e6
                    rows.append({"impl": name, "step": kind, "B": b, "size": size,
                                 "ms": f"{times[name]:.4f}", "GB/s": f"{gbps:.0f}",
                                 "%peak": f"{100 * gbps / ceilings(device)[0]:.0f}",
                                 "max_err": f"{err:.2e}"})
                if "adm_fast" in times:
                    for row in rows[-len(times):]:
                        if row["impl"] == "adm_fast":
                            row["x_vs_eager"] = f"{times['eager'] / times['adm_fast']:.2f}"
                            row["x_vs_compile"] = (f"{times['compile'] / times['adm_fast']:.2f}"
                                                   if "compile" in times else "")
    for row in rows:
        row.setdefault("x_vs_eager", "")
        row.setdefault("x_vs_compile", "")
    print_table(rows, ["impl", "step", "B", "size", "ms", "GB/s", "%peak", "max_err",
                       "x_vs_eager", "x_vs_compile"])
    save_rows(args, "diffusion_step", ctx, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
