"""Measured backend preferences that `auto` applies before the static priorities.

Each rule names a device type and an op, optional bounds on the call's
features, and the backends to prefer, in order, among those that support the
call; the first matching rule wins, and backends it does not name follow by
priority. Rules come from the benchmarks (bench/, rows in bench/results/);
bench/gpu_check prints candidate rules for the GPU it ran on.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

RULES: List[Dict] = [
    # CPU (2 threads, fp32; bench/bench_qkv_attention.py, 2026-11-29): SDPA's
    # flash kernel wins from 1024 tokens (1.4–2.9× eager at N=4), while below
    # 1024 its layout copies cost more than it saves (0.6–0.98×).
    {"device": "cpu", "op": "qkv_attention", "min_tokens": 768, "order": ["sdpa"]},
    {"device": "cpu", "op": "qkv_attention", "order": ["eager", "sdpa"]},
    # CPU (2 threads, fp32, 2026-11-29, OpenMP build; one GroupNorm(32)+AdaGN+
    # SiLU, cpu vs eager): the fused forward wins at every size (1.07–6×), but
    # forward+backward on maps of 8×8 and below is 0.67–0.88× eager from
    # batch 4 up (the backward kernel's fixed costs), 1.0–1.4× from 16×16.
    {"device": "cpu", "op": "group_norm_act", "grad": True, "max_hw": 64, "order": ["eager"]},
]


def features(op: str, args) -> Dict:
    """What rules may test: device type, dtype, whether autograd will want the
    backward; for attention tokens and head dim, for GroupNorm the map size."""
    x = args[0]
    feats = {"device": x.device.type, "dtype": x.dtype,
             "grad": torch.is_grad_enabled() and any(
                 isinstance(a, torch.Tensor) and a.requires_grad for a in args)}
    if op == "qkv_attention":
        qkv, heads = args[0], args[1]
        feats["tokens"] = qkv.shape[-1]
        feats["head_dim"] = qkv.shape[1] // (3 * heads)
    elif op == "group_norm_act":
        feats["hw"] = math.prod(x.shape[2:])
    return feats


def _matches(rule: Dict, op: str, feats: Dict) -> bool:
    if rule["op"] != op or rule["device"] != feats["device"]:
        return False
    if "dtype" in rule and str(feats["dtype"]).replace("torch.", "") != rule["dtype"]:
        return False
    if "grad" in rule and feats["grad"] != rule["grad"]:
        return False
    for key, name in (("min_tokens", "tokens"), ("min_head_dim", "head_dim"), ("min_hw", "hw")):
        if key in rule and feats.get(name, 0) < rule[key]:
            return False
    for key, name in (("max_tokens", "tokens"), ("max_head_dim", "head_dim"), ("max_hw", "hw")):
        if key in rule and feats.get(name, 0) > rule[key]:
            return False
    return True


def preferred(op: str, args) -> List[str]:
    feats = features(op, args)
    for rule in RULES:
        if _matches(rule, op, feats):
            return list(rule["order"])
    return []
