"""A step's predicted time from what it does: a roofline with a launch floor.

From a trace (benchmarks/trace.py) of one step:
  compute  the matrix-multiply-class FLOPs (convolutions, matmuls, attention's
           products) at MMA_SHARE of the device's peak for their dtype
  memory   the bytes every other pass reads and writes (ATen ops', and each
           fused kernel's inputs and outputs), plus what cuDNN's layout
           transposes move around 16-bit NCHW convolutions, at BW_SHARE of
           the device's bandwidth
  launches every kernel's fixed cost on the device (DEVICE_FLOOR_US) and the
           host's cost to launch it (HOST_US by kind)
On a GPU the host enqueues while the device runs: the step takes
max(compute + memory + launches × device floor, launches × host cost) (a
CUDA graph replays with one host launch). On a CPU one thread does both:
the terms add.

The shares and floors are stated assumptions, not fits: the measured/predicted
ratio a benchmark prints beside them says how far a device is from the model.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

MMA_SHARE = 0.65  # convolutions and matmuls reach 60-70% of peak at ADM's shapes
BW_SHARE = 0.80  # streaming passes reach ~80% of copy bandwidth
DEVICE_FLOOR_US = 2.5  # a kernel's minimum time on the GPU, launch gap included
HOST_US = {"aten": 6.0, "native": 6.0, "triton": 12.0}  # eager-mode launch cost from Python


@dataclass(frozen=True)
class Device:
    name: str
    tflops_16: float  # dense fp16/bf16 tensor-core throughput
    tflops_tf32: float  # dense TF32 (cuDNN runs fp32 convolutions so by default)
    tflops_fp32: float  # plain fp32 (matmuls: torch leaves TF32 off for them)
    gbps: float  # achievable copy bandwidth
    source: str
    cpu: bool = False
    host_us: float | None = None  # CPU: measured per-op overhead


# Ceilings per device. H200: measured (dense bf16 matmul 790 TFLOP/s of 989,
# copy 4.3 TB/s of 4.8); the others: their data sheets times the H200's
# measured/spec ratios (0.80 for compute, 0.90 for bandwidth), until measured.
DEVICES = {
    "H200": Device("H200 SXM", 790.0, 395.0, 53.0, 4300.0,
                   "measured: bf16 matmul, copy bandwidth"),
    "H100": Device("H100 SXM", 790.0, 395.0, 53.0, 3000.0,
                   "data sheet x the H200's measured/spec ratios"),
    "A100": Device("A100 SXM 80GB", 250.0, 125.0, 15.6, 1835.0,
                   "data sheet x the H200's measured/spec ratios"),
}


def device_for(name: str | None, arch: int) -> Device:
    if name:
        key = name.upper().replace("-", "").split()[0]
        if key not in DEVICES:
            raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
        return DEVICES[key]
    return DEVICES["A100"] if arch < 90 else DEVICES["H200"]


_CPU: dict[int, Device] = {}


def measure_cpu() -> Device:
    """This CPU's ceilings on torch's threads, measured now: an fp32 matmul
    (the FMA peak as torch reaches it), a large copy, and one tiny op (the
    per-op overhead). A few tenths of a second; once per thread count."""
    threads = torch.get_num_threads()
    if threads in _CPU:
        return _CPU[threads]

    def best(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.randn(768, 768), torch.randn(768, 768)
    gflops = 2 * 768 ** 3 / best(lambda: torch.mm(a, b), 5) / 1e9
    src = torch.randn(16 * 2 ** 20)  # 64 MB: past the caches
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), 5) / 1e9
    tiny = torch.zeros(1)
    host_us = best(lambda: [tiny.add_(1) for _ in range(200)], 5) / 200 * 1e6
    name = f"{platform.processor() or platform.machine()} x{threads} threads"
    dev = Device(name, gflops / 1e3, gflops / 1e3, gflops / 1e3,
                 gbps, "measured now: fp32 matmul, copy, one tiny op", cpu=True,
                 host_us=host_us)
    _CPU[threads] = dev
    return dev


def _peak(device: Device, dtype: torch.dtype, name: str) -> float:
    if dtype in (torch.float16, torch.bfloat16):
        return device.tflops_16
    if "conv" in name:  # cuDNN takes TF32 for fp32 convolutions unless told not to
        return device.tflops_tf32
    return device.tflops_fp32


def predict(trace, device: Device, dtype: str = "bf16", graphed: bool = False) -> dict:
    """Predicted ms of the traced step on device, with its terms."""
    compute = sum(w.flops / (_peak(device, w.dtype, w.what) * 1e12 * MMA_SHARE)
                  for w in trace.work if w.mma)
    moved = trace.bytes(mma=False) + trace.nchw_conv_bytes
    memory = moved / (device.gbps * 1e9 * BW_SHARE)
    launches = trace.count()
    if device.cpu:
        launch_s = launches * device.host_us * 1e-6
        total = compute + memory + launch_s
        host = launch_s
    else:
        launch_s = launches * DEVICE_FLOOR_US * 1e-6
        host_launches = {kind: trace.count(kind) for kind in HOST_US}
        if graphed:  # one replay, and what runs outside the graph
            outside = trace.count(parts=("other",))
            host = (1 + outside) * HOST_US["aten"] * 1e-6
        else:
            host = sum(n * HOST_US[k] for k, n in host_launches.items()) * 1e-6
        total = max(compute + memory + launch_s, host)
    return {"ms": round(1e3 * total, 3), "compute_ms": round(1e3 * compute, 3),
            "memory_ms": round(1e3 * memory, 3), "launch_ms": round(1e3 * launch_s, 3),
            "host_ms": round(1e3 * host, 3), "launches": launches,
            "tflop": round(trace.flops(mma=True) / 1e12, 4),
            "gbytes": round(moved / 1e9, 4)}


def format_prediction(pred: dict) -> str:
    lines = [f"roofline on {pred['device']} (MMA at {MMA_SHARE:.0%} of peak, memory at "
             f"{BW_SHARE:.0%} of bandwidth, {DEVICE_FLOOR_US} us/launch on the device, host "
             f"{HOST_US['aten']}-{HOST_US['triton']} us/launch):"]
    for key in ("eager", "adm_fast", "adm_fast_graphed"):
        p = pred.get(key)
        if p is None:
            continue
        lines.append(f"  {key:<17} {p['ms']:9.2f} ms/step  (compute {p['compute_ms']:.2f}, "
                     f"memory {p['memory_ms']:.2f}, launches {p['launch_ms']:.2f} device / "
                     f"{p['host_ms']:.2f} host; {p['tflop']} TFLOP, {p['gbytes']} GB, "
                     f"{p['launches']} launches)")
    return "\n".join(lines)
