"""The backend dispatcher: auto, strict explicit choices, explain, settings."""

import pytest
import torch
from helpers import CPU_EXT

import adm_fast
from adm_fast import ops


class Fp64Only(ops.Impl):
    """A test backend's group_norm_act that only takes fp64 inputs (and records
    its calls): a new backend is a Backend, an Impl declaration and its kernels."""

    backend, kind = "fp64only", "composite"
    dtypes = (torch.float64,)

    def __init__(self):
        self.calls = 0

    def extra_reasons(self, call):
        x = call.tensors["x"]
        return [] if x.dtype == torch.float64 else [f"dtype {x.dtype} is not float64"]

    def not_supported_reasons(self, call):
        # Only this backend's own reason, so the test can match it exactly.
        return self.extra_reasons(call)

    def run(self, *args):
        self.calls += 1
        return ops.GROUP_NORM_ACT.reference(*args)


@pytest.fixture
def fp64only():
    backend = ops.Backend()
    backend.name, backend.priority = "fp64only", 100
    ops.register_backend(backend)
    impl = ops.GROUP_NORM_ACT.register(Fp64Only())
    yield impl
    ops.GROUP_NORM_ACT.unregister("fp64only")
    from adm_fast.ops import backend as registry
    registry.unregister_backend("fp64only")


def test_auto_picks_best_supported_and_explains(fp64only):
    w, b = torch.ones(64), torch.zeros(64)
    x32 = torch.randn(2, 64, 16, 16)  # above the CPU preference for eager on small maps
    ops.group_norm_act(x32, 32, w, b)
    assert fp64only.calls == 0  # fp32: auto falls back to eager
    ops.group_norm_act(x32.double(), 32, w, b)
    assert fp64only.calls == 2  # checked against the reference once (ops/verify.py), then run
    ops.group_norm_act(x32.double(), 32, w, b)
    assert fp64only.calls == 3
    text = adm_fast.explain("group_norm_act", x32, 32, w, b, None, None, 1e-5, True)
    assert "fp64only: not supported: dtype torch.float32 is not float64" in text
    assert ("cpu: chosen" if CPU_EXT else "eager: chosen") in text


def test_explicit_backend_is_strict(fp64only):
    w, b = torch.ones(64), torch.zeros(64)
    with adm_fast.use_backend("fp64only"):
        with pytest.raises(ops.BackendNotSupported,
                           match="'fp64only' \\(chosen explicitly\\) cannot run group_norm_act"):
            ops.group_norm_act(torch.randn(2, 64, 4, 4), 32, w, b)
        with pytest.raises(ops.BackendNotSupported, match="no implementation of qkv_attention"):
            ops.qkv_attention(torch.randn(1, 6, 4), 1)
        ops.group_norm_act(torch.randn(2, 64, 4, 4, dtype=torch.float64), 32, w, b)
    assert fp64only.calls == 1


def test_use_backend_nests_and_env(monkeypatch):
    assert ops.current_backend() == "auto"
    with adm_fast.use_backend("eager"):
        assert ops.current_backend() == "eager"
        with adm_fast.use_backend("auto"):
            assert ops.current_backend() == "auto"
        assert ops.current_backend() == "eager"
    assert ops.current_backend() == "auto"
    monkeypatch.setenv("ADM_FAST_BACKEND", "eager")
    assert ops.current_backend() == "eager"
    monkeypatch.setenv("ADM_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown adm_fast backend 'cuda-magic'; known: auto, .*eager"):
        ops.current_backend()
    with pytest.raises(ValueError, match="unknown adm_fast backend"), adm_fast.use_backend("nope"):
        pass


def test_measured_preferences_order_auto():
    """On CPU, eager for GroupNorm on maps of 8×8 and below when autograd
    wants the backward; the fused CPU kernels otherwise."""
    from adm_fast.ops.dispatch import select

    def chosen(*args):
        op = ops.GROUP_NORM_ACT
        return select(op, op.describe(args)).backend

    w, b = torch.ones(64), torch.zeros(64)
    small, big = torch.randn(2, 64, 8, 8), torch.randn(2, 64, 16, 16)
    fused = "cpu" if CPU_EXT else "eager"
    assert chosen(small, 32, w, b, None, None, 1e-5, True) == fused
    assert chosen(small.requires_grad_(), 32, w, b, None, None, 1e-5, True) == "eager"
    with torch.no_grad():
        assert chosen(small, 32, w, b, None, None, 1e-5, True) == fused
    assert chosen(big.requires_grad_(), 32, w, b, None, None, 1e-5, True) == fused
    tiny = torch.randn(2, 64, 4, 4)
    assert chosen(tiny, 32, w, b, None, None, 1e-5, True) == fused


def test_layouts_are_checked_as_declared_and_info_says_them():
    """A tensor in several layouts at once (a 1x1 map) passes any of them, so a
    channels_last-only declaration (the CPU conv3x3) takes it; info's line for
    each backend is what its implementations declare."""
    from adm_fast.info import report
    from adm_fast.ops.impl import has_layout

    one = torch.randn(2, 8, 1, 1)
    assert has_layout(one, "contiguous") and has_layout(one, "channels_last")
    nchw = torch.randn(2, 8, 4, 4)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    assert not has_layout(nchw, "channels_last") and not has_layout(nhwc, "contiguous")
    assert has_layout(nhwc.flatten(2), "channels_last_1d")
    cpu = ops.CONV3X3.impls["cpu"]
    w, b = torch.randn(8, 8, 3, 3), torch.randn(8)
    reasons = [cpu.not_supported_reasons(ops.CONV3X3.describe((x, w, b)))
               for x in (one, nchw, nhwc)]
    if CPU_EXT:
        assert reasons[0] == reasons[2] == []
        assert reasons[1] == ["x is not channels_last (it is contiguous)"]
    text = report()
    lines, backend = {}, None
    for line in text.splitlines():
        if line[:2] == "  " and line[2:3] != " " and line.split()[0] in ops.backends():
            backend = line.split()[0]
        elif backend and line.strip().startswith("layouts:"):
            lines[backend] = line
    assert set(lines) == set(ops.backends())
    assert "conv3x3: x channels_last" in lines["cpu"]
    assert "group_norm_act: x contiguous/channels_last/channels_last_1d" in lines["cpu"]
    assert "ddim_step, ddpm_step: any layout" in lines["cpu"]
    for name, op in ops.ops().items():
        for backend, impl in op.impls.items():
            assert impl.layouts_accepted() in lines[backend], (name, backend)
    assert "NCHW-contiguous" not in text


def test_the_op_layer_reads_its_registry():
    """What the op layer lists comes from the registry: each op's eager
    implementation is its reference, the triton backend imports the modules
    its implementations name, the per-op benchmarks and the AOT launch list
    follow the ops' spec files."""
    from adm_fast.benchmarks import aot
    from adm_fast.benchmarks.cli import op_benchmarks
    from adm_fast.ops.backends import TRITON, TritonImpl
    from adm_fast.ops.op import ReferenceImpl

    triton_modules = set()
    for op in ops.ops().values():
        assert isinstance(op.impls["eager"], ReferenceImpl), op.name
        impl = op.impls.get("triton")
        if impl is not None:
            assert isinstance(impl, TritonImpl) and impl.module == op.family, op.name
            triton_modules.add(impl.module)
    assert triton_modules <= set(TRITON.modules)
    assert set(aot.CASES) == set(TRITON.modules)
    families = {op.family for op in ops.ops().values()}
    assert set(op_benchmarks()) == families
    assert families == {"conv3x3", "diffusion_step", "group_norm_act", "qkv_attention"}
    assert ops.DDPM_STEP.family == ops.DDIM_STEP.family == "diffusion_step"
