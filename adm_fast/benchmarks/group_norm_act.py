"""group_norm_act benchmark: AdaGN+SiLU (ADM's res-block norm) fwd and bwd on ADM
shapes, per implementation, with bandwidth against the device ceiling, the
ratio to the eager reference (guided-diffusion's chain) and to torch.compile
of that chain, and the error against an fp64 reference, all in one run.

    python -m adm_fast.benchmarks.group_norm_act [--device cuda] [--quick] [--no_save]

Bytes are the minimum a fused kernel must move: forward reads x and writes y,
backward reads x and dy and writes dx (per-channel vectors are negligible).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .. import ops
from ..ops.group_norm_act import reference
from .common import (
    add_results_flags,
    ceilings,
    context,
    median_ms,
    op_backends,
    print_table,
    save_rows,
    try_compile,
)

# (C, H·W) pairs from ADM's levels: 128 channels at 128², ..., 1024 at 8².
SHAPES = [(128, 128 * 128), (256, 64 * 64), (256, 32 * 32), (512, 16 * 16), (1024, 8 * 8),
          (128, 64 * 64), (384, 32 * 32), (768, 16 * 16)]
BATCHES = (1, 8, 32)


def inputs(n, c, hw, dtype, device):
    side = int(hw ** 0.5)
    x = (torch.randn(n, c, side, side, device=device) * 2 + 0.5).to(dtype)
    w = torch.randn(c, device=device) * 0.2 + 1
    b = torch.randn(c, device=device) * 0.2
    s, sh = (torch.randn(n, 2 * c, device=device) * 0.2).to(dtype).chunk(2, dim=1)
    return x, w, b, s, sh


def run(backend, x, w, b, s, sh):
    with ops.use_backend({"group_norm_act": backend}):
        return ops.group_norm_act(x, 32, w, b, s, sh)


def usable(backend: str) -> bool:
    return not ops.backends()[backend].unavailable_reasons()


def bench_case(n, c, hw, dtype, device, with_compile):
    x, w, b, s, sh = inputs(n, c, hw, dtype, device)
    exact = reference(x.double(), 32, w.double(), b.double(), s.double(), sh.double())
    nbytes = x.numel() * x.element_size()
    fused = op_backends(ops.GROUP_NORM_ACT, device)
    impls = {"adm_fast": lambda *a: run("auto", *a)}
    impls.update({b: (lambda *a, b=b: run(b, *a)) for b in fused})
    impls["eager"] = lambda *a: run("eager", *a)
    if with_compile:
        compiled = try_compile(lambda x, w, b, s, sh: reference(x, 32, w, b, s, sh))
        if compiled is not None:
            impls["compile"] = compiled
    rows = []
    times = {}
    for name, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, s, sh)]
        try:
            y = fn(*leaves)
            err = (y.double() - exact).abs().max().item()
            dy = torch.randn_like(y)
            fwd = median_ms(lambda fn=fn, leaves=leaves: fn(*leaves), device)
            bwd = median_ms(lambda y=y, leaves=leaves, dy=dy: torch.autograd.grad(
                y, leaves, dy, retain_graph=True), device)
        except Exception as e:  # report and keep going
            print(f"  {name} N={n} C={c} HW={hw} {dtype}: {type(e).__name__}: {e}")
            continue
        times[name] = (fwd, bwd)
        for what, ms, moved in (("fwd", fwd, 2 * nbytes), ("bwd", bwd, 3 * nbytes)):
            gbps = moved / ms / 1e6
            rows.append({"impl": name, "N": n, "C": c, "HW": hw,
                         "dtype": str(dtype).replace("torch.", ""), "pass": what,
                         "ms": f"{ms:.4f}", "GB/s": f"{gbps:.0f}",
                         "%peak": f"{100 * gbps / ceilings(device)[0]:.0f}",
                         "max_err": f"{err:.2e}"})
    for row in rows:  # speedups of adm_fast against the others, per pass
        i = 0 if row["pass"] == "fwd" else 1
        base = times.get("adm_fast")
        row["x_vs_eager"] = f"{times['eager'][i] / base[i]:.2f}" if base and "eager" in times \
            and row["impl"] == "adm_fast" else ""
        row["x_vs_compile"] = f"{times['compile'][i] / base[i]:.2f}" if base and \
            "compile" in times and row["impl"] == "adm_fast" else ""
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench ops group_norm_act", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile of the eager chain (slow to build: the first "
                        "--compile_shapes shapes, largest batch, first dtype)")
    p.add_argument("--compile_shapes", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=None, help="e.g. bfloat16 float16")
    add_results_flags(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = SHAPES[:3] if args.quick else SHAPES
    batches = (1, 8) if args.quick else BATCHES
    dtypes = ([getattr(torch, d) for d in args.dtypes] if args.dtypes else
              (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,))
    ctx = context(device)
    rows = []
    for dtype in dtypes:
        for c, hw in shapes:
            for n in batches:
                if device.type == "cpu" and n * c * hw > 8 * 256 * 1024:
                    continue
                with_compile = (args.compile and dtype == dtypes[0] and n == batches[-1]
                                and (c, hw) in shapes[:args.compile_shapes])
                rows += bench_case(n, c, hw, dtype, device, with_compile)
    print_table(rows, ["impl", "N", "C", "HW", "dtype", "pass", "ms", "GB/s", "%peak",
                       "max_err", "x_vs_eager", "x_vs_compile"])
    if device.type == "cuda" and usable("cuda"):
        print("cuda vs triton (fwd + bwd ms per shape), for group_norm_act's preferences "
              "(adm_fast/ops/group_norm_act.py):")
        totals = {}
        for r in rows:
            if r["impl"] in ("cuda", "triton"):
                key = (r["N"], r["C"], r["HW"], r["dtype"])
                totals.setdefault(key, {})
                totals[key][r["impl"]] = totals[key].get(r["impl"], 0.0) + float(r["ms"])
        for (n, c, hw, dt), total in totals.items():
            if len(total) == 2:
                print(f"  N={n} C={c} HW={hw} {dt}: cuda {total['cuda']:.4f} "
                      f"triton {total['triton']:.4f} -> {min(total, key=total.get)}")
    save_rows(args, "group_norm_act", ctx, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
