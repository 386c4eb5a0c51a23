"""Whole models on the fused backends, and torch.compile over the op layer."""

import pytest
import torch
from helpers import (
    CPU_EXT,
    DEVICE,
    NUMERIC_CASES,
    assert_grads_close,
    build_case,
    case_inputs,
    load_case,
    rel_err,
)

import adm_fast


def _forward_and_grads(model, case, batch):
    """Output, input gradient and parameter gradients on the first `batch` samples."""
    kw = {} if case["flags"]["kind"] == "classifier" else case_inputs(case)
    kw = {k: v[:batch].to(DEVICE) for k, v in kw.items()}
    x = case["x"][:batch].to(DEVICE).clone().requires_grad_(True)
    out = model(x, case["t"][:batch].to(DEVICE), **kw)
    if case["flags"]["kind"] == "classifier":
        y = case["y"][:batch].to(DEVICE)
        loss = torch.log_softmax(out, -1)[torch.arange(len(out)), y].sum()
    else:
        loss = out.square().mean()
    return out, torch.autograd.grad(loss, [x] + list(model.parameters()), allow_unused=True)


# In the interpreter the two largest reference models take over a minute each.
_SLOW_IN_INTERPRETER = {"superres_64", "unet_cond_scaleshift_legacyattn"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if DEVICE == "cpu" and n in _SLOW_IN_INTERPRETER
    else n for n in NUMERIC_CASES])
def test_reference_models_on_triton(name):
    """Forward, input gradient (the classifier's grad_log_p_y) and parameter
    gradients with every op on the Triton kernels equal eager within 1e-4."""
    case = load_case(name)
    model = build_case(case).to(DEVICE)
    batch = 1 if DEVICE == "cpu" else len(case["x"])  # the interpreter is slow
    with adm_fast.use_backend("eager"):
        ref_out, ref_grads = _forward_and_grads(model, case, batch)
    with adm_fast.use_backend("triton"):
        out, grads = _forward_and_grads(model, case, batch)
    assert rel_err(out, ref_out) <= 1e-4
    assert rel_err(out, case["out"][:batch].to(DEVICE)) <= 1e-4
    assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.skipif(not CPU_EXT or DEVICE != "cpu", reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_reference_models_on_cpu_kernels(name):
    """The default CPU path (C++ GroupNorm and steps) equals eager within 1e-4."""
    case = load_case(name)
    model = build_case(case)
    with adm_fast.use_backend("eager"):
        ref_out, ref_grads = _forward_and_grads(model, case, len(case["x"]))
    with adm_fast.use_backend({"group_norm_act": "cpu"}):
        out, grads = _forward_and_grads(model, case, len(case["x"]))
    assert rel_err(out, ref_out) <= 1e-4 and rel_err(out, case["out"]) <= 1e-4
    assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.skipif(not CPU_EXT or DEVICE != "cpu", reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_reference_models_sample_through_winograd(name, monkeypatch):
    """Sampling's forward (no grad, channels_last) with the 3x3 res-block convs
    on the Winograd kernel gives guided-diffusion's outputs within 1e-4, and
    within 2x of the eager path's own distance from them (it was 0.75-0.8x)."""
    from adm_fast.ops.conv3x3 import CONV3X3
    case = load_case(name)
    model = adm_fast.models.use_preferred_layout(build_case(case), torch.device("cpu"))
    calls = []
    cpu = CONV3X3.impls["cpu"]
    monkeypatch.setattr(cpu, "forward", lambda *a, f=cpu.forward: calls.append(1) or f(*a))
    kw = {} if case["flags"]["kind"] == "classifier" else case_inputs(case)
    with torch.no_grad(), adm_fast.use_backend({"conv3x3": "cpu", "group_norm_act": "cpu"}):
        out = model(case["x"], case["t"], **kw)
    assert calls, "no conv ran on the Winograd kernel"
    with torch.no_grad(), adm_fast.use_backend("eager"):
        eager_err = rel_err(model(case["x"], case["t"], **kw), case["out"])
    assert rel_err(out, case["out"]) <= min(1e-4, 2 * max(eager_err, 2 ** -23))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or bool(adm_fast.ops.backends()["cuda"].unavailable_reasons()),
                    reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_reference_models_on_cuda_kernels(name):
    case = load_case(name)
    model = build_case(case).to(DEVICE)
    with adm_fast.use_backend("eager"):
        ref_out, ref_grads = _forward_and_grads(model, case, len(case["x"]))
    with adm_fast.use_backend({"group_norm_act": "cuda"}):
        out, grads = _forward_and_grads(model, case, len(case["x"]))
    assert rel_err(out, ref_out) <= 1e-4
    assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("setting, name", [("auto", "unet_cond_scaleshift_legacyattn"),
                                           ("triton", "unet_uncond_addnorm_newattn")])
def test_torch_compile_traces_without_graph_breaks(setting, name):
    case = load_case(name)
    model = build_case(case).to(DEVICE)
    x, t, kw = case["x"][:1].to(DEVICE), case["t"][:1].to(DEVICE), case_inputs(case)
    kw = {k: v[:1].to(DEVICE) for k, v in kw.items()}
    torch._dynamo.reset()
    with adm_fast.use_backend(setting):
        explanation = torch._dynamo.explain(model)(x, t, **kw)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        if setting == "triton":
            ops_in_graph = str(explanation.graphs[0].graph)
            assert "adm_fast.group_norm_act" in ops_in_graph
            assert "adm_fast.qkv_attention" in ops_in_graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Inductor compiles the "
                    "Triton kernels into the graph")
def test_inductor_compiles_fused_ops_on_gpu():
    case = load_case("unet_cond_scaleshift_legacyattn")
    model = build_case(case).cuda()
    x, t, y = case["x"].cuda(), case["t"].cuda(), case["y"].cuda()
    with torch.no_grad():
        ref = model(x, t, y=y)
        with adm_fast.use_backend("auto"):
            out = torch.compile(model)(x, t, y=y)
    assert rel_err(out, ref) <= 1e-4


def _saved_bytes(model, x, t, kw):
    """Bytes autograd keeps for backward in one training step (each storage once)."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, **kw).square().mean()
    # What autograd keeps is packed during the forward: the count is complete here,
    # and the backward (half a minute of interpreted Triton) would add nothing to it.
    return sum(seen.values())


def test_fused_training_step_saves_less():
    """A UNet with attention at 32×32 (T = 1024): the fused attention keeps qkv,
    the output and the logsumexp instead of the T×T weights, and the fused
    GroupNorm keeps x and per-group statistics."""
    model = adm_fast.create_model(image_size=32, num_channels=32, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="32,16",
                                  num_head_channels=32, use_scale_shift_norm=True).to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    t = torch.tensor([10], device=DEVICE)
    with adm_fast.use_backend("eager"):
        eager = _saved_bytes(model, x, t, {})
    with adm_fast.use_backend("triton"):
        fused = _saved_bytes(model, x, t, {})
    print(f"saved for backward: eager {eager / 2**20:.1f} MiB, fused {fused / 2**20:.1f} MiB, "
          f"ratio {fused / eager:.2f}")
    assert fused < 0.7 * eager
