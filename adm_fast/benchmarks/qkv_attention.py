"""QKV attention benchmark at the released models' shapes: fwd and bwd TFLOP/s
(4·N·H·T²·C, ×2.5 for bwd) of adm_fast's Triton kernel against SDPA (through
adm_fast's layout copies, and its bare kernel on pre-laid-out q, k, v) and the
eager einsum path; the error against fp64; and the memory one attention
block's training step keeps (saved for backward, and CUDA peak), in one run.

    python -m adm_fast.benchmarks.qkv_attention [--device cuda] [--batch 8] [--no_save]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from .. import ops
from ..models import AttentionBlock
from ..ops.qkv_attention import reference, split_heads
from .common import (
    add_results_flags,
    ceilings,
    context,
    median_ms,
    op_backends,
    print_table,
    save_rows,
)

# (model, heads, head dim, tokens, legacy order) at each attention resolution.
SHAPES = [
    ("64x64 @32²", 6, 64, 1024, False), ("64x64 @16²", 9, 64, 256, False),
    ("64x64 @8²", 12, 64, 64, False),
    ("128x128 @32²", 4, 128, 1024, True), ("128x128 @16²", 4, 192, 256, True),
    ("128x128 @8²", 4, 256, 64, True),
    ("256x256 @32²", 8, 64, 1024, True), ("256x256 @16²", 16, 64, 256, True),
    ("classifier pool", 16, 64, 65, False),
    ("64→256 up @32²", 4, 96, 1024, True), ("64→256 up @16²", 4, 192, 256, True),
]


def sdpa_bare(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def block_memory(channels, heads, tokens, batch, dtype, device, backend):
    """(bytes saved for backward, CUDA peak bytes above the inputs) of one
    AttentionBlock training step."""
    block = AttentionBlock(channels, num_heads=heads).to(device=device, dtype=dtype)
    side = int(math.isqrt(tokens))
    x = torch.randn(batch, channels, side, tokens // side, device=device, dtype=dtype,
                    requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with ops.use_backend({"qkv_attention": backend}):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x)
        y.float().square().mean().backward()
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
    return sum(saved.values()), peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adm-fast bench ops qkv_attention", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    add_results_flags(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = op_backends(ops.QKV_ATTENTION, device) + ["eager"]
    ctx, rows = context(device), []
    peak = ceilings(device)[1]
    for name, heads, c, t, legacy in SHAPES:
        n = args.batch
        qkv = torch.randn(n, 3 * heads * c, t, device=device).to(dtype)
        exact = reference(qkv.double(), heads, legacy)
        fwd_flops = 4 * n * heads * t * t * c
        q, k, v = (x.reshape(n, heads, c, t).transpose(-1, -2).contiguous()
                   for x in split_heads(qkv, heads, legacy))
        impls = {b: (lambda a, b=b, heads=heads, legacy=legacy: _op(b, a, heads, legacy))
                 for b in backends}
        times = {}
        for impl, fn in list(impls.items()) + [("sdpa bare", None)]:
            try:
                if impl == "sdpa bare":
                    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
                    out = sdpa_bare(*leaves)
                    err = float("nan")
                    f = lambda leaves=leaves: sdpa_bare(*leaves)  # noqa: E731
                else:
                    leaves = [qkv.detach().clone().requires_grad_(True)]
                    out = fn(leaves[0])
                    err = (out.double() - exact).abs().max().item()
                    f = lambda fn=fn, leaf=leaves[0]: fn(leaf)  # noqa: E731
                dout = torch.randn_like(out)
                fwd = median_ms(f, device)
                bwd = median_ms(lambda out=out, leaves=leaves, dout=dout: torch.autograd.grad(
                    out, leaves, dout, retain_graph=True), device)
            except Exception as e:  # report and keep going
                print(f"  {impl} {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            times[impl] = (fwd, bwd)
            saved, peak_mem = (block_memory(heads * c, heads, t, n, dtype, device, impl)
                               if impl in backends else (float("nan"), float("nan")))
            rows.append({"shape": name, "N": n, "H": heads, "C": c, "T": t, "impl": impl,
                         "fwd_ms": f"{fwd:.4f}", "fwd_TFLOPs": f"{fwd_flops / fwd / 1e9:.1f}",
                         "bwd_ms": f"{bwd:.4f}",
                         "bwd_TFLOPs": f"{2.5 * fwd_flops / bwd / 1e9:.1f}",
                         "fwd_%peak": f"{100 * fwd_flops / fwd / 1e9 / peak:.0f}",
                         "max_err": f"{err:.2e}",
                         "saved_MiB": f"{saved / 2**20:.1f}",
                         "peak_MiB": f"{peak_mem / 2**20:.1f}"})
        for row in rows[-len(times):]:
            if row["impl"] == "triton" and "sdpa bare" in times:
                row["fwd_x_sdpa"] = f"{times['sdpa bare'][0] / times['triton'][0]:.2f}"
                row["bwd_x_sdpa"] = f"{times['sdpa bare'][1] / times['triton'][1]:.2f}"
                row["fwd_x_eager"] = f"{times['eager'][0] / times['triton'][0]:.2f}"
    for row in rows:
        for k in ("fwd_x_sdpa", "bwd_x_sdpa", "fwd_x_eager"):
            row.setdefault(k, "")
    print_table(rows, ["shape", "N", "H", "C", "T", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_%peak",
                       "bwd_ms", "bwd_TFLOPs", "max_err", "saved_MiB", "peak_MiB",
                       "fwd_x_sdpa", "bwd_x_sdpa", "fwd_x_eager"])
    if device.type == "cuda":
        print("candidate rules for qkv_attention's preferences (adm_fast/ops/qkv_attention.py) "
              "(fwd + bwd time):")
        for name, _heads, c, t, _legacy in SHAPES:
            mine = {r["impl"]: float(r["fwd_ms"]) + float(r["bwd_ms"]) for r in rows
                    if r["shape"] == name and r["impl"] in ("triton", "sdpa")}
            if len(mine) == 2:
                order = sorted(mine, key=mine.get)
                print(f'    {{"device": "cuda", "dtype": "{args.dtype}", '
                      f'"min": {{"tokens": {t}, "head_dim": {c}}}, '
                      f'"max": {{"tokens": {t}, "head_dim": {c}}}, "order": {order}}},  # {name}')
    save_rows(args, "qkv_attention", ctx, rows)
    return 0


def _op(backend, qkv, heads, legacy):
    with ops.use_backend({"qkv_attention": backend}):
        return ops.qkv_attention(qkv, heads, legacy=legacy)


if __name__ == "__main__":
    sys.exit(main())
