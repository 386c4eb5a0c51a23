"""The inputs found to crash the process or to give a silent wrong value
(issue 13, items 5–7 and 9), each its own test: native ops that validate, edge
shapes through every layer, PyTorch crashes routed around, one output-dtype
rule. Crashes are reproduced in subprocesses, so a regression fails the test
instead of killing the run."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import CPU_EXT

import adm_fast
from adm_fast import ops


def _survives(code: str):
    """Run code in a fresh interpreter: (returncode, output)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


# --- item 5: the compiled ops validate -------------------------------------------

@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
def test_native_group_norm_with_a_short_weight_raises_instead_of_crashing():
    rc, out = _survives("""
        import torch, adm_fast.ops  # the ops' schemas and kernels register with adm_fast.ops
        try:
            torch.ops.adm_fast_native.group_norm_act_fwd(
                torch.randn(1, 1 << 20, 1, 1), 1, torch.ones(1), None, None, None, 1e-5, False)
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0])
    """)
    assert rc == 0, out
    assert "raised: adm_fast_native::group_norm_act_fwd: weight must have shape [1048576]" in out


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.ones(1)), r"weight must have shape \[64\]"),
    (dict(scale=torch.ones(2, 32)), r"scale must have shape \[2, 64\]"),
    (dict(num_groups=7), "num_groups=7 must divide the 64 channels"),
    (dict(x=torch.randn(2, 64, 4, 4).to(torch.int32)), "x must be fp32, fp16 or bf16"),
    (dict(x=torch.randn(2, 64, 4, 8)[..., ::2]), "NCHW-contiguous or channels-last"),
    # the op layer's rule (ops/group_norm_act.py), not a second one
    (dict(eps=0.0), "eps must be a finite number > 0, got 0"),
    (dict(eps=float("inf")), "eps must be a finite number > 0, got inf"),
])
def test_native_group_norm_checks_each_argument(bad, match):
    args = dict(x=torch.randn(2, 64, 4, 4), num_groups=32, weight=torch.ones(64),
                bias=None, scale=None, shift=None, eps=1e-5, act=True)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.adm_fast_native.group_norm_act_fwd(*args.values())


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
def test_native_steps_refuse_broadcastable_but_wrong_shapes_and_codes():
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4)
    coefs = torch.rand(8, 2)
    with pytest.raises(RuntimeError, match="model_out .* does not fit x"):
        torch.ops.adm_fast_native.ddpm_step(x, out[:, :, :1, :1], x, coefs, None, 0, 1, True)
    with pytest.raises(RuntimeError, match="mean_type code 9"):
        torch.ops.adm_fast_native.ddpm_step(x, out, x, coefs, None, 9, 1, True)
    with pytest.raises(RuntimeError, match=r"coefs must be \[7, 2\]"):
        torch.ops.adm_fast_native.ddim_step(x, out, x, coefs, None, 0, True, 0.0)


def test_the_custom_op_checks_what_a_direct_call_passes():
    """torch.ops.adm_fast.ddpm_step with a model output that broadcasts (it gave
    NaN) or an unknown backend: a clear error."""
    x = torch.randn(2, 3, 4, 4)
    coefs = torch.rand(8, 2)
    with pytest.raises(ValueError, match=r"model_out must be \[2, 6, 4, 4\]"):
        torch.ops.adm_fast.ddpm_step(x, torch.randn(2, 6, 1, 1), x, coefs, None, "eps",
                                     "learned_range", True, "triton")
    with pytest.raises(ValueError, match="backend 'nope' has no kernels"):
        torch.ops.adm_fast.ddpm_step(x, torch.randn(2, 6, 4, 4), x, coefs, None, "eps",
                                     "learned_range", True, "nope")


# --- item 6: edge shapes -------------------------------------------------------------

def _tiny_unet():
    torch.manual_seed(0)
    return adm_fast.create_model(image_size=16, num_channels=64, num_res_blocks=1,
                                 channel_mult="1,2", attention_resolutions="8",
                                 num_head_channels=32, class_cond=True, learn_sigma=True)


@pytest.mark.parametrize("backend", ["auto", "eager", "triton"])
def test_an_empty_batch_runs_through_every_op(backend):
    x = torch.randn(0, 3, 4, 4)
    with ops.use_backend(backend):
        sample, x0 = ops.ddpm_step(x, torch.randn(0, 6, 4, 4), x, torch.rand(8, 0))
        assert sample.shape == x0.shape == (0, 3, 4, 4)
        sample, _ = ops.ddim_step(x, torch.randn(0, 6, 4, 4), x, torch.rand(7, 0))
        assert sample.shape == (0, 3, 4, 4)
        assert ops.qkv_attention(torch.randn(0, 3 * 2 * 16, 9), 2).shape == (0, 32, 9)
        w = torch.ones(64)
        assert ops.group_norm_act(torch.randn(0, 64, 4, 4), 32, w, w).shape == (0, 64, 4, 4)


def test_an_empty_batch_runs_through_the_unet():
    model = _tiny_unet()
    out = model(torch.randn(0, 3, 16, 16), torch.zeros(0, dtype=torch.long),
                y=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 6, 16, 16)


def test_one_timestep_broadcasts_over_the_batch_as_in_guided_diffusion():
    model = _tiny_unet().eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([5]), y=y), model(x, torch.full((3,), 5), y=y))
    d = adm_fast.create_gaussian_diffusion(steps=50, learn_sigma=True)
    torch.manual_seed(1)
    one = d.q_sample(x, torch.tensor([7]))
    torch.manual_seed(1)
    assert torch.equal(one, d.q_sample(x, torch.full((3,), 7)))


@pytest.mark.parametrize("respacing, loop", [("1", "p_sample_loop"), ("ddim1", "ddim_sample_loop")])
def test_a_one_step_process_samples(respacing, loop):
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True,
                                           timestep_respacing=respacing)
    assert d.num_timesteps == 1
    out = getattr(d, loop)(_tiny_unet().eval(), (2, 3, 16, 16),
                           model_kwargs={"y": torch.zeros(2, dtype=torch.long)})
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


# --- item 7: PyTorch crashes on the default path ------------------------------------

def test_channels_last_group_norm_backward_does_not_crash():
    """F.group_norm's CPU backward segfaults here (plain torch reproduces it);
    the op layer routes around it and gives the eager values."""
    rc, out = _survives("""
        import torch, adm_fast
        from adm_fast import ops
        x = torch.randn(1, 64, 13, 1).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
        ops.group_norm_act(x, 1, w, b).sum().backward()
        w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with ops.use_backend("eager"):
            ops.group_norm_act(x.contiguous(), 1, w2, b2).sum().backward()
        assert torch.allclose(w.grad, w2.grad, atol=1e-5) and torch.allclose(b.grad, b2.grad)
        print("ok")
    """)
    assert rc == 0 and "ok" in out, out


def test_a_bias_without_a_weight_takes_its_gradient():
    b = torch.randn(64, requires_grad=True)
    x = torch.randn(2, 64, 4, 4)
    for backend in ("auto", "eager"):
        b.grad = None
        with ops.use_backend(backend):
            ops.group_norm_act(x, 32, None, b, act=False).pow(2).sum().backward()
        assert b.grad is not None and torch.isfinite(b.grad).all()


# --- item 9: one output-dtype rule ---------------------------------------------------

FUSED_STEPS = ["triton"] + (["cpu"] if CPU_EXT else [])


@pytest.mark.parametrize("backend", FUSED_STEPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean_type", ["eps", "x_start"])
def test_fused_steps_return_the_eager_dtypes(backend, dtype, mean_type):
    x = torch.randn(2, 3, 4, 4).to(dtype)
    out, noise, grad = torch.randn(2, 6, 4, 4).to(dtype), torch.randn_like(x), torch.randn_like(x)
    d = adm_fast.create_gaussian_diffusion(steps=50, learn_sigma=True)
    t = torch.tensor([3, 40])
    for op, coefs, tail in ((ops.ddpm_step, d.step_coefs("ddpm", t), (mean_type, "learned_range",
                                                                      True)),
                            (ops.ddim_step, d.step_coefs("ddim", t), (mean_type, True, 0.0))):
        for g in (None, grad):
            with ops.use_backend("eager"):
                want = [t.dtype for t in op(x, out, noise, coefs, g, *tail)]
            with ops.use_backend(backend):
                got = [t.dtype for t in op(x, out, noise, coefs, g, *tail)]
            assert got == want, (op, g is not None)
