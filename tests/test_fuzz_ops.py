"""Fuzz: seeded random calls of every op on every backend usable here, over
dtypes, layouts and odd shapes (empty batch, 1×1 and 7×7 maps, one-channel
groups, T = 1, 65, head dims 1–96). Each call must either match the fp64
reference within twice the eager path's own error at that precision, or be
refused with a clear error (BackendNotSupported for an explicit backend that
cannot take it, a TypeError/ValueError for arguments no backend accepts); auto
must run every valid call. Malformed arguments given straight to the public
torch.ops (adm_fast::*, adm_fast_native::*) must raise, never crash: those run
in a subprocess, so a crash fails the test with the case that caused it.

ADM_FAST_FUZZ=N multiplies the number of cases (default 1: about 600 calls,
a minute or two on 2 cores; run N=20 locally before touching an op).
"""

import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import CPU_EXT

from adm_fast import ops

SCALE = max(1, int(os.environ.get("ADM_FAST_FUZZ", "1")))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# auto and every backend that can run here (a CPU, or CUDA's on a GPU machine: its
# calls on CPU tensors must be refused with a reason)
BACKENDS = ["auto"] + [name for name, b in ops.backends().items() if not b.unavailable_reasons()]


def _err(out, ref) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def _scale(t) -> float:
    return t.abs().max().item() if t is not None and t.numel() else 0.0


def _close(out, ref64, eager, dtype, what, scale, terms):
    """flash-attention's rule: within twice eager's error at that precision,
    plus rounding at the given scale grown with the length of the sums behind
    each value (for values that are zero by construction, where eager may be
    exact and a kernel's different summation order is not)."""
    eps = torch.finfo(dtype if dtype != torch.float64 else torch.float32).eps
    floor = 8 * eps * scale * terms ** 0.5
    err, base = _err(out, ref64), _err(eager, ref64)
    assert err <= 2 * base + floor, (what, err, base, floor)


def _terms(op, args) -> int:
    """How many terms the longest sum behind one output value has."""
    feats = op.features(*args)
    if "group_channels" in feats:
        return feats["group_channels"] * max(1, feats["hw"])
    if "tokens" in feats:
        return feats["tokens"] + feats["head_dim"]
    return 1


def _run(op, backend, args, grad_names):
    """(outputs, grads) of op(*args) on a backend, or the BackendNotSupported."""
    leaves = [a.detach().clone().requires_grad_(i in grad_names)
              if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    try:
        with ops.use_backend(backend):
            out = op(*leaves)
    except ops.BackendNotSupported as e:
        return e, None
    outs = out if isinstance(out, tuple) else (out,)
    wanted = [leaves[i] for i in sorted(grad_names)]
    grads = []
    if wanted and any(o.requires_grad for o in outs):
        g_out = [torch.ones_like(o) * 0.5 for o in outs]
        grads = torch.autograd.grad([o for o in outs if o.requires_grad], wanted,
                                    [g for g, o in zip(g_out, outs) if o.requires_grad],
                                    allow_unused=True)
    return outs, grads


def _refused(op, args):
    """The clear error op.check gives for arguments no backend accepts, or None."""
    try:
        op.check_devices(args)
        op.check(*args)
    except (TypeError, ValueError) as e:
        assert str(e).startswith(op.name + ":"), e
        return type(e)
    return None


def _check_call(op, args, grad_names, dtype, label):
    refused = _refused(op, args)
    if refused is not None:
        for backend in BACKENDS:
            with ops.use_backend(backend), pytest.raises(refused):
                op(*args)
        return
    ref = [a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
           for a in args]
    ref_out, ref_grads = _run(op, "eager", ref, grad_names)
    eager_out, eager_grads = _run(op, "eager", args, grad_names)
    for backend in BACKENDS:
        out, grads = _run(op, backend, args, grad_names)
        if isinstance(out, ops.BackendNotSupported):
            assert backend != "auto", (label, str(out))
            assert str(out).strip(), label
            continue
        terms = _terms(op, args)
        for o, e, r in zip(out, eager_out, ref_out):
            assert o.shape == e.shape and o.dtype == e.dtype, (label, backend, o.dtype, e.dtype)
            _close(o, r, e, dtype, (label, backend), _scale(r), terms)
        # Gradients against the scale of the whole set (a bias before a
        # one-channel group has an exactly-zero gradient that holds only noise).
        grad_scale = max([_scale(r) for r in ref_grads or ()] + [0.0])
        for g, e, r in zip(grads or (), eager_grads or (), ref_grads or ()):
            assert (g is None) == (e is None), (label, backend)
            if g is not None:
                _close(g, r, e, dtype, (label, backend, "grad"), grad_scale, terms)


def _layout(x, rng):
    kind = rng.choice(["contiguous", "contiguous", "channels_last", "strided"])
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided" and x.dim() >= 3 and x.shape[-1] > 0:
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x


def _group_norm_case(rng):
    dtype = rng.choice(DTYPES)
    groups = rng.choice([1, 2, 4, 32])
    c = groups * rng.choice([1, 2, 3])
    n = rng.choice([0, 1, 2, 3])
    spatial = rng.choice([(), (rng.randint(1, 9),), (1, 1), (7, 7), (rng.randint(1, 6),
                                                                    rng.randint(1, 6))])
    x = _layout((torch.randn(n, c, *spatial) * 2 + 1.5).to(dtype), rng)
    w = torch.randn(c) * 0.5 + 1 if rng.random() < 0.8 else None
    b = torch.randn(c) * 0.5 if rng.random() < 0.8 else None
    scale = shift = None
    if rng.random() < 0.5:
        scale, shift = (torch.randn(n, 2 * c) * 0.5).to(dtype).chunk(2, dim=1)
    args = (x, groups, w, b, scale, shift, 1e-5, rng.random() < 0.7)
    grad = {i for i in (0, 2, 3, 4, 5) if args[i] is not None and rng.random() < 0.5}
    return args, grad, dtype


def _attention_case(rng):
    dtype = rng.choice(DTYPES)
    heads = rng.choice([1, 2, 3])
    c = rng.choice([1, 8, 16, 24, 64, 96])
    t = rng.choice([1, 2, 5, 17, 64, 65])
    n = rng.choice([0, 1, 2])
    qkv = (torch.randn(n, 3 * heads * c, t) + 0.3).to(dtype)
    if rng.random() < 0.2 and t > 1:
        qkv = torch.cat([qkv, qkv], dim=-1)[..., ::2]
    grad = {0} if rng.random() < 0.6 else set()
    return (qkv, heads, rng.random() < 0.5), grad, dtype


def _step_case(rng, ddim: bool):
    dtype = rng.choice(DTYPES)
    b, c = rng.choice([0, 1, 2, 3]), rng.choice([1, 3, 4])
    spatial = rng.choice([(4, 4), (7, 5), (1, 1), (9,)])
    mean_type = rng.choice(["eps", "x_start", "x_prev"])
    var_type = rng.choice(["learned", "learned_range", "fixed"])
    learned = var_type != "fixed" and not (ddim and rng.random() < 0.5)
    oc = 2 * c if (learned if ddim else var_type != "fixed") else c
    x = torch.randn(b, c, *spatial).to(dtype)
    out = (torch.randn(b, oc, *spatial) * 0.5).to(rng.choice(DTYPES[:3]) if dtype != torch.float64
                                                 else dtype)
    noise = torch.randn(b, c, *spatial).to(dtype)
    grad = torch.randn(b, c, *spatial).to(dtype) * 0.1 if rng.random() < 0.6 else None
    rows = 7 if ddim else 8
    coefs = torch.rand(rows, b) + 0.1
    coefs[rows - 1] = (torch.rand(b) < 0.7).float()  # nonzero
    if ddim:
        coefs[4], coefs[5] = torch.rand(b) * 0.4 + 0.1, torch.rand(b) * 0.4 + 0.5  # ᾱ_t < ᾱ_{t−1}
        coefs[2], coefs[3] = coefs[4].rsqrt(), (1 / coefs[4] - 1).sqrt()
    else:
        coefs[4], coefs[5] = -torch.rand(b) * 3 - 2, -torch.rand(b) * 2 - 1  # log variances
    if rng.random() < 0.1:
        coefs = coefs.double()
    clip = rng.random() < 0.7
    tail = (mean_type, clip, rng.choice([0.0, 0.5])) if ddim else (mean_type, var_type, clip)
    args = (x, out, noise, coefs, grad) + tail
    grads = {i for i in (0, 1, 4) if args[i] is not None and rng.random() < 0.3}
    return args, grads, dtype


def _cases(seed, n):
    rng = random.Random(seed)
    makers = [("group_norm_act", ops.GROUP_NORM_ACT, _group_norm_case),
              ("qkv_attention", ops.QKV_ATTENTION, _attention_case),
              ("ddpm_step", ops.DDPM_STEP, lambda r: _step_case(r, False)),
              ("ddim_step", ops.DDIM_STEP, lambda r: _step_case(r, True))]
    for i in range(n):
        name, op, make = makers[i % len(makers)]
        yield f"{name}#{i}", op, make(rng)


@pytest.mark.parametrize("chunk", range(4))
def test_random_calls_match_the_reference_or_are_refused_clearly(chunk):
    n = 40 * SCALE
    for i, (label, op, (args, grad, dtype)) in enumerate(_cases(1000 + chunk, n)):
        _check_call(op, args, grad, dtype, label)
        tensors = [j for j, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if i % 4 == chunk and len(tensors) > 1:  # one of them on meta: refused everywhere
            j = tensors[1 + i % (len(tensors) - 1)]
            mixed = tuple(a.to("meta") if k == j else a for k, a in enumerate(args))
            assert _refused(op, mixed) is ValueError, label
            _check_call(op, mixed, set(), dtype, label + "-meta")


# --- every raw op and every public op: tensors on one device (issue 26, S1) ----
#
# The dispatcher sends a call with any meta tensor among its arguments to the
# op's Meta kernel, the fake: a CPU x beside a meta model_out got the fake's
# empty outputs back (uninitialised memory, different every call) instead of
# the kernel's device check. Every op must refuse the mix, and still answer
# all-meta calls and FakeTensorMode's tracing (adm-fast bench plan).

def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _raw_calls():
    """{name: (op, valid CPU arguments)} for every adm_fast_native and
    adm_fast op (the latter on the cpu backend)."""
    g = torch.Generator().manual_seed(26)
    cl = torch.channels_last
    x = _r(g, 2, 8, 4, 4)
    gn = (x, 2, _r(g, 8), _r(g, 8), _r(g, 2, 8), _r(g, 2, 8), 1e-5, True)
    stats = (_r(g, 2, 2), _r(g, 2, 2).abs() + 0.5)
    sx, out = _r(g, 2, 3, 4, 4), _r(g, 2, 6, 4, 4)
    noise, grad = _r(g, 2, 3, 4, 4), _r(g, 2, 3, 4, 4)
    coefs8, coefs7 = torch.rand(8, 2, generator=g), torch.rand(7, 2, generator=g)
    cx, w, b = _r(g, 1, 8, 5, 5).contiguous(memory_format=cl), _r(g, 4, 8, 3, 3), _r(g, 4)
    native, public = torch.ops.adm_fast_native, torch.ops.adm_fast
    return {
        "adm_fast_native::group_norm_act_fwd": (native.group_norm_act_fwd, gn),
        "adm_fast_native::group_norm_act_bwd": (
            native.group_norm_act_bwd, (_r(g, 2, 8, 4, 4),) + gn[:6] + stats + (True, True)),
        "adm_fast_native::ddpm_step": (native.ddpm_step,
                                       (sx, out, noise, coefs8, grad, 0, 1, True)),
        "adm_fast_native::ddim_step": (native.ddim_step,
                                       (sx, out, noise, coefs7, grad, 0, True, 0.5)),
        "adm_fast_native::conv3x3_winograd": (native.conv3x3_winograd, (cx, w, b)),
        "adm_fast_native::conv3x3_winograd_u": (native.conv3x3_winograd_u,
                                                (cx, _r(g, 16, 1, 8, 16), 4, b)),
        "adm_fast_native::conv3x3_winograd_weight_grad": (
            native.conv3x3_winograd_weight_grad,
            (cx, _r(g, 1, 4, 5, 5).contiguous(memory_format=cl))),
        "adm_fast_native::conv3x3_winograd_weight": (native.conv3x3_winograd_weight, (w, False)),
        "adm_fast::group_norm_act": (public.group_norm_act, gn + ("cpu",)),
        "adm_fast::ddpm_step": (public.ddpm_step, (sx, out, noise, coefs8, grad, "eps",
                                                   "learned_range", True, "cpu")),
        "adm_fast::ddim_step": (public.ddim_step, (sx, out, noise, coefs7, grad, "eps", True, 0.5,
                                                   "cpu")),
        "adm_fast::conv3x3": (public.conv3x3, (cx, w, b, "cpu")),
        "adm_fast::qkv_attention": (public.qkv_attention, (_r(g, 2, 3 * 2 * 8, 9), 2, True,
                                                           "triton")),
    }


_RAW = _raw_calls()
_MIXES = [(name, i) for name, (_, args) in _RAW.items()
          for i, a in enumerate(args) if isinstance(a, torch.Tensor)
          and sum(isinstance(b, torch.Tensor) for b in args) > 1]


def _avx2_fma() -> bool:
    from adm_fast.ops.backends import CPU
    return CPU.ext is not None and CPU.ext.has_avx2_fma()


def _on(args, device, only=None):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) and only in (None, i) else a
                 for i, a in enumerate(args))


@pytest.mark.parametrize("name, index", _MIXES, ids=[f"{n}-arg{i}" for n, i in _MIXES])
def test_a_meta_tensor_among_cpu_ones_is_refused_by_every_raw_op(name, index):
    op, args = _RAW[name]
    mixed = _on(args, "meta", only=index)
    for _ in range(2):  # a second call too: a kept decision must not skip the check
        with pytest.raises((RuntimeError, ValueError),
                           match=rf"^{name}: \w+ is on (meta but \w+ is on cpu|cpu but \w+ is "
                                 rf"on meta) \(all tensor arguments must be on one device\)"):
            op(*mixed)


@pytest.mark.parametrize("name", sorted(_RAW))
def test_all_meta_and_fake_tensor_calls_of_every_raw_op_still_trace(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _RAW[name]
    outs = op(*_on(args, "meta"))
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(o.device.type == "meta" for o in outs), name
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        traced = op(*fake)
    traced = traced if isinstance(traced, tuple) else (traced,)
    assert [o.shape for o in traced] == [o.shape for o in outs], name
    if CPU_EXT and not name.endswith("qkv_attention") and (
            "winograd" not in name or name.endswith("conv3x3_winograd") or _avx2_fma()):
        # the real call: the same shapes (the Winograd transform's ops need AVX2+FMA)
        real = op(*args)
        real = real if isinstance(real, tuple) else (real,)
        assert [o.shape for o in real] == [o.shape for o in outs], name


@pytest.mark.parametrize("op_name", ["group_norm_act", "ddpm_step", "ddim_step", "conv3x3"])
@pytest.mark.parametrize("backend", ["auto", "eager"] + (["cpu"] if CPU_EXT else []))
def test_the_public_ops_refuse_a_meta_tensor_among_cpu_ones(op_name, backend):
    _, args = _RAW[f"adm_fast::{op_name}"]
    args = args[:-1]
    op = ops.ops()[op_name]
    for i in [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)][1:]:
        with ops.use_backend(backend), pytest.raises(ValueError, match=rf"^{op_name}: \w+ is "
                                                     rf"on meta but x is on cpu"):
            op(*_on(args, "meta", only=i))


_MALFORMED = r'''
import random, sys, torch
import adm_fast
from adm_fast import ops
rng = random.Random(int(sys.argv[1]))
N = int(sys.argv[2])
E = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)
def maybe(v, bad):
    return bad if rng.random() < 0.3 else v
def gn_args():
    n, c, g = rng.choice([1, 2]), rng.choice([4, 8, 64]), rng.choice([1, 2, 4])
    x = maybe(t(n, c, 3, 3), rng.choice([t(n, c + 1, 3, 3), t(c), t(n, c, 3, 3, dtype=torch.int32),
                                         t(0, c, 3, 3), t(1 << 20, 1, 1, 1)]))
    w = maybe(t(c), rng.choice([t(1), t(c + 1), t(c, 2), t(c, dtype=torch.int64)]))
    s = maybe(None, rng.choice([t(n, c + 1), t(c), t(n + 1, c)]))
    return x, maybe(g, rng.choice([0, -1, 3, 7, 1 << 40])), w, maybe(None, t(c + 2)), s, None
def step_args(rows):
    b, c = rng.choice([1, 2]), rng.choice([1, 3])
    x = maybe(t(b, c, 4, 4), rng.choice([t(b, c, 4), t(c), t(b, c, 4, 4, dtype=torch.int32)]))
    out = maybe(t(b, 2 * c, 4, 4), rng.choice([t(b, c, 1, 1), t(b, 3 * c, 4, 4), t(1, 2 * c, 4, 4),
                                               t(b, 2 * c, 4, 5)]))
    noise = maybe(t(b, c, 4, 4), rng.choice([t(b, c, 1, 1), t(b, c, 4)]))
    coefs = maybe(t(rows, b), rng.choice([t(rows - 1, b), t(rows, b + 1), t(rows)]))
    grad = maybe(None, rng.choice([t(b, c, 1, 4), t(b + 1, c, 4, 4)]))
    return x, out, noise, coefs, grad
def conv_args():
    n, c, o, h = rng.choice([1, 2]), rng.choice([1, 8]), rng.choice([1, 4]), rng.choice([1, 3, 5])
    cl = torch.channels_last
    x = maybe(t(n, c, h, h).contiguous(memory_format=cl),
              rng.choice([t(n, c, h, h), t(n, c, h), t(c), t(n, c + 1, h, h).contiguous(memory_format=cl),
                          t(n, c, h, h, dtype=torch.float64).contiguous(memory_format=cl),
                          t(0, c, h, h).contiguous(memory_format=cl)]))
    w = maybe(t(o, c, 3, 3), rng.choice([t(o, c, 3, 2), t(o, c, 1, 1), t(o, c + 1, 3, 3), t(o, c),
                                         t(o, c, 3, 3, dtype=torch.int32)]))
    b = maybe(t(o), rng.choice([None, t(o + 1), t(o, 1), t(o, dtype=torch.float16)]))
    return x, w, b
def weight_grad_args():
    x, w, _ = conv_args()
    cl = torch.channels_last
    shape = list(x.shape) if x.dim() == 4 else [1, 2, 3, 3]
    shape[1] = w.shape[0] if w.dim() else 2
    dy = maybe(t(*shape).contiguous(memory_format=cl),
               rng.choice([t(*shape), t(shape[0] + 1, *shape[1:]).contiguous(memory_format=cl),
                           t(*shape[:3], shape[3] + 1).contiguous(memory_format=cl), t(*shape[:3]),
                           t(*shape, dtype=torch.float16).contiguous(memory_format=cl)]))
    return x, dy
def u_args():
    x, _, b = conv_args()
    c = x.shape[1] if x.dim() == 4 else 3
    o = rng.choice([1, 4, 17])
    s = (o + 15) // 16
    u = maybe(t(16, s, c, 16), rng.choice([t(16, s, c + 1, 16), t(15, s, c, 16), t(16, s + 1, c, 16),
                                           t(16, c, o), t(16, s, c, 16, dtype=torch.float64),
                                           t(16, s, 16, c).transpose(2, 3)]))
    return (x, u, maybe(o, rng.choice([-1, o + 16, 1 << 40])),
            maybe(t(o), rng.choice([None, t(o + 1), t(o, dtype=torch.float16)])))
calls = 0
for i in range(N):
    kind = i % 11
    try:
        if kind == 0:
            x, g, w, b, s, sh = gn_args()
            torch.ops.adm_fast_native.group_norm_act_fwd(x, g, w, b, s, sh, 1e-5, True)
        elif kind == 1:
            x, g, w, b, s, sh = gn_args()
            mean = maybe(t(x.shape[0] if x.dim() else 1, 2), t(3, 3))
            torch.ops.adm_fast_native.group_norm_act_bwd(maybe(x, t(1, 1)), x, g, w, b, s, sh,
                                                         mean, mean, True, True)
        elif kind == 2:
            x, out, noise, coefs, grad = step_args(8)
            torch.ops.adm_fast_native.ddpm_step(x, out, noise, coefs, grad,
                                                maybe(0, rng.choice([-1, 3, 99])),
                                                maybe(1, rng.choice([-1, 3, 99])), True)
        elif kind == 3:
            x, out, noise, coefs, grad = step_args(7)
            torch.ops.adm_fast_native.ddim_step(x, out, noise, coefs, grad,
                                                maybe(0, rng.choice([-1, 5])), True,
                                                maybe(0.5, float("nan")))
        elif kind == 4:
            x, g, w, b, s, sh = gn_args()
            torch.ops.adm_fast.group_norm_act(x, g, w, b, s, sh, 1e-5, True,
                                              maybe(rng.choice(["cpu", "triton"]), "nope"))
        elif kind == 5:
            x, out, noise, coefs, grad = step_args(8)
            torch.ops.adm_fast.ddpm_step(x, out, noise, coefs, grad, "eps",
                                         maybe("learned_range", "v"), True,
                                         rng.choice(["cpu", "triton", "eager"]))
        elif kind == 6:
            torch.ops.adm_fast_native.conv3x3_winograd(*conv_args())
        elif kind == 8:
            torch.ops.adm_fast_native.conv3x3_winograd_weight_grad(*weight_grad_args())
        elif kind == 7:
            torch.ops.adm_fast.conv3x3(*conv_args(), maybe("cpu", rng.choice(["eager", "nope"])))
        elif kind == 9:
            torch.ops.adm_fast_native.conv3x3_winograd_weight(conv_args()[1], rng.random() < 0.5)
        elif kind == 10:
            torch.ops.adm_fast_native.conv3x3_winograd_u(*u_args())
    except E as e:
        assert str(e).strip(), (i, kind)
    calls += 1
print("calls", calls)
'''


def test_malformed_calls_to_the_public_torch_ops_raise(tmp_path):
    script = tmp_path / "malformed.py"
    script.write_text(_MALFORMED)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    n = 300 * SCALE
    proc = subprocess.run([sys.executable, str(script), "7", str(n)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert f"calls {n}" in proc.stdout
