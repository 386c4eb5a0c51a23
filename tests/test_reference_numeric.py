"""adm_fast against outputs computed by guided-diffusion itself (fp32, CPU)."""

import pytest
import torch
from helpers import NUMERIC_CASES, build_case, case_inputs, load_case, rel_err, run_case

import adm_fast

TOL = 1e-5


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_matches_guided_diffusion(name):
    case = load_case(name)
    out, grad = run_case(build_case(case), case)
    err = rel_err(out, case["out"])
    print(f"{name}: out rel err {err:.3g}")
    assert err <= TOL
    if grad is not None:
        gerr = rel_err(grad, case["grad_log_p_y"])
        print(f"{name}: grad_log_p_y rel err {gerr:.3g}")
        assert gerr <= TOL


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_load_checkpoint_pt_and_safetensors(name, tmp_path):
    """The released .pt format (a plain state_dict) and our safetensors both load strictly."""
    case = load_case(name)
    pt = tmp_path / f"{name}.pt"
    torch.save(case["state_dict"], pt)
    model = adm_fast.load_checkpoint(pt, preset=dict(case["flags"]))
    assert not model.training
    out, _ = run_case(model, case)
    assert rel_err(out, case["out"]) <= TOL

    st = tmp_path / f"{name}.safetensors"
    adm_fast.save_checkpoint(model, st)
    again = adm_fast.load_checkpoint(st)  # rebuilt from the file's own metadata
    assert type(again) is type(model) and again.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    out2, _ = run_case(again, case)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_checkpointing_changes_nothing(name):
    """use_checkpoint (res and attention blocks) gives the same outputs, grads
    and double-backward grads (a gradient penalty on the input), on the eager
    backend: this compares checkpointing, not backends (tests/test_double_backward.py)."""
    case = load_case(name)
    kind = case["flags"]["kind"]
    kw = {} if kind == "classifier" else case_inputs(case)
    results = []
    with adm_fast.use_backend("eager"):
        for flag in (False, True):
            model = build_case(case).set_checkpointing(flag).train()
            x = case["x"].clone().requires_grad_(True)
            out = model(x, case["t"], **kw)
            params = [p for p in model.parameters()]
            (gx,) = torch.autograd.grad(out.square().mean(), x, create_graph=True)
            penalty = gx.square().sum()
            gp = torch.autograd.grad(penalty, params, allow_unused=True)
            results.append([out, gx] + [g for g in gp if g is not None])
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(*results):
        assert rel_err(b, a) <= 1e-6


# guided-diffusion's create_classifier has no use_checkpoint flag.
@pytest.mark.parametrize("name", [n for n in NUMERIC_CASES if "classifier" not in n])
def test_use_checkpoint_flag_reaches_every_block(name):
    case = load_case(name)
    model = build_case(case, use_checkpoint=True)
    blocks = [m for m in model.modules() if type(m).__name__ in ("ResBlock", "AttentionBlock")]
    assert blocks and all(m.use_checkpoint for m in blocks)


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_channels_last_input(name):
    case = load_case(name)
    model = build_case(case)
    out, grad = run_case(model, case, case["x"].to(memory_format=torch.channels_last))
    assert rel_err(out, case["out"]) <= 1e-4
    if grad is not None:
        assert rel_err(grad, case["grad_log_p_y"]) <= 1e-4
