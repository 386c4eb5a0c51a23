"""conv3x3 benchmark: ADM's 3×3 res-block convolutions on the CPU, oneDNN
(F.conv2d, the eager reference) against the Winograd kernel and what auto
picks, forward alone (each weight's Winograd transform kept, as in sampling)
and forward + backward (∇x, ∇w, ∇b, a training step's share: the transforms
made on every call, as the weights change at every step), with the direct
convolution's GFLOP/s (2·N·H·W·C·O·9 a pass, the work either does in effect;
three passes with the backward), the ratio to oneDNN, and each one's error
against fp64 (the largest of its outputs'), in one run.

    python -m adm_fast.benchmarks.conv3x3 [--quick] [--no_save]

The op has CPU kernels only; on another device this prints so and times nothing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.winograd_weights import WinogradWeights
from .common import add_results_flags, context, median_ms, print_table, save_rows

_conv3x3 = importlib.import_module("adm_fast.ops.conv3x3")  # the module; ops.conv3x3 is the op

# (label, N, C, H, O): the 64×64 layout (64 channels, mult 1,2,3,4) at batch 4,
# a decoder conv after its skip concat, and the demo's 16×16 model at batch 100.
SHAPES = [
    ("adm64 @64", 4, 64, 64, 64), ("adm64 @32", 4, 128, 32, 128),
    ("adm64 @16", 4, 192, 16, 192), ("adm64 @8", 4, 256, 8, 256),
    ("adm64 dec @32", 4, 256, 32, 128), ("adm64 dec @64", 4, 128, 64, 64),
    ("demo @16", 100, 32, 16, 32), ("demo @8", 100, 64, 8, 64), ("demo @4", 100, 64, 4, 64),
    ("demo dec @16", 100, 96, 16, 32),
]


def inputs(n, c, h, o):
    g = torch.Generator().manual_seed(n * 7919 + c * 31 + h * 7 + o)
    x = (torch.randn(n, c, h, h, generator=g) + 0.3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(o, c, 3, 3, generator=g) / (9 * c) ** 0.5
    return x, w, torch.randn(o, generator=g)


def run(backend, x, w, b):
    with ops.use_backend({"conv3x3": backend}), torch.no_grad():
        return ops.conv3x3(x, w, b)


def run_grad(backend, x, w, b, dy):
    # A training step's weights change at every step: the Winograd transforms
    # (the weights' and the turned ones for ∇x) are made anew on every call.
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
    kept, _conv3x3.WEIGHTS = _conv3x3.WEIGHTS, WinogradWeights(0)
    try:
        with ops.use_backend({"conv3x3": backend}):
            return torch.autograd.grad(ops.conv3x3(*leaves), leaves, dy)
    finally:
        _conv3x3.WEIGHTS = kept


def exact(x, w, b, dy):
    leaves = [t.double().requires_grad_(True) for t in (x, w, b)]
    y = F.conv2d(*leaves, padding=1)
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def rel(out, ref) -> float:
    return (out.double() - ref).abs().max().item() / ref.abs().max().item()


def bench_case(label, n, c, h, o):
    x, w, b = inputs(n, c, h, o)
    dy = torch.randn(n, o, h, h, generator=torch.Generator().manual_seed(h)).contiguous(
        memory_format=torch.channels_last)
    y64, grads64 = exact(x, w, b, dy)
    passes = {
        "forward": (lambda name: run(name, x, w, b), lambda y: rel(y, y64), 1),
        "fwd+bwd": (lambda name: run_grad(name, x, w, b, dy),
                    lambda gs: max(rel(g, r) for g, r in zip(gs, grads64)), 3)}
    rows = []
    for what, (call, error, work) in passes.items():
        flops = work * 2 * n * h * h * c * o * 9
        times, these = {}, []
        for name in ("eager", "cpu", "auto"):
            try:
                err = error(call(name))
                times[name] = median_ms(lambda name=name, call=call: call(name),
                                        torch.device("cpu"))
            except Exception as e:  # report and keep going
                print(f"  {label} {what} {name}: {type(e).__name__}: {e}")
                continue
            these.append({"shape": label, "N": n, "C": c, "HW": f"{h}x{h}", "O": o,
                          "what": what,
                          "impl": {"eager": "onednn", "cpu": "winograd", "auto": "adm_fast"}[name],
                          "ms": f"{times[name]:.3f}",
                          "GFLOP/s": f"{flops / times[name] / 1e6:.0f}", "rel_err": f"{err:.1e}"})
        for row in these:
            impl = {"onednn": "eager", "winograd": "cpu", "adm_fast": "auto"}[row["impl"]]
            row["x_vs_onednn"] = (f"{times['eager'] / times[impl]:.2f}" if "eager" in times
                                  else "")
        rows += these
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench ops conv3x3", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="three shapes only")
    add_results_flags(p)
    args = p.parse_args(argv)
    if torch.device(args.device).type != "cpu":
        print(f"conv3x3: no {args.device} kernels (the Winograd kernel is the CPU's); "
              "nothing to time")
        return 0
    shapes = [SHAPES[0], SHAPES[6], SHAPES[8]] if args.quick else SHAPES
    rows = [r for shape in shapes for r in bench_case(*shape)]
    print_table(rows, ["shape", "N", "C", "HW", "O", "what", "impl", "ms", "GFLOP/s",
                       "rel_err", "x_vs_onednn"])
    save_rows(args, "conv3x3", context(torch.device("cpu")), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
