"""The backend dispatcher: auto, strict explicit choices, explain, settings."""

import pytest
import torch

import adm_fast
from adm_fast import ops
from conftest import CPU_EXT


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
    with pytest.raises(ValueError, match="unknown adm_fast backend"):
        with adm_fast.use_backend("nope"):
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
