"""Convs fed by a fused norm keep a recipe instead of their input: same
gradients (also second order), fewer bytes kept, eager left as it was."""

import sys

import pytest
import torch
from helpers import CPU_EXT

import adm_fast
from adm_fast.benchmarks.saved_bytes import SavedBytes

pytestmark = pytest.mark.skipif(not CPU_EXT, reason="needs the CPU extension (a fused backend)")
FUSED = {"group_norm_act": "cpu"}


def _unet():
    torch.manual_seed(0)
    model = adm_fast.create_model(image_size=16, num_channels=64, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="8",
                                  num_head_channels=32, learn_sigma=True, class_cond=True,
                                  resblock_updown=True, use_scale_shift_norm=True)
    for p in model.parameters():  # no zero-initialised layer: every grad is informative
        p.data.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g) + 0.3
    t = torch.tensor([3, 700])
    y = torch.tensor([1, 5])
    return model, x, t, y


def _step(model, x, t, y, backend, recompute):
    adm_fast.ops.set_norm_act_recompute(recompute)
    try:
        model.zero_grad()
        params = [p for p in model.parameters()]
        with adm_fast.use_backend(backend), SavedBytes(exclude=params) as saved:
            out = model(x, t, y)
            kept = saved.nbytes()
        with adm_fast.use_backend(backend):
            (out.float() ** 2).mean().backward()
        return out.detach(), [p.grad.clone() for p in params], kept
    finally:
        adm_fast.ops.set_norm_act_recompute(True)


def test_recompute_keeps_gradients_and_saves_bytes():
    model, x, t, y = _unet()
    out_r, grads_r, kept_r = _step(model, x, t, y, FUSED, True)
    out_k, grads_k, kept_k = _step(model, x, t, y, FUSED, False)
    assert torch.equal(out_r, out_k)
    for a, b in zip(grads_r, grads_k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert kept_r < 0.8 * kept_k, (kept_r, kept_k)
    _, grads_e, kept_e = _step(model, x, t, y, "eager", True)
    _, _, kept_e_off = _step(model, x, t, y, "eager", False)
    assert kept_e == kept_e_off  # the eager reference keeps guided-diffusion's memory
    for a, b in zip(grads_r, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_recompute_supports_double_backward():
    model, x, t, y = _unet()

    def grad_norm(backend):
        xi = x.clone().requires_grad_(True)
        with adm_fast.use_backend(backend):
            out = model(xi, t, y)
            (g,) = torch.autograd.grad(out.pow(2).mean(), xi, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xi)
        return g.detach(), gg

    g_fused, gg_fused = grad_norm(FUSED)
    g_eager, gg_eager = grad_norm("eager")
    torch.testing.assert_close(g_fused, g_eager, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gg_fused, gg_eager, rtol=1e-3, atol=1e-6)


def test_no_recipe_under_no_grad_or_checkpointing():
    model, x, t, y = _unet()
    with torch.no_grad(), adm_fast.use_backend(FUSED):
        ref = model(x, t, y)
    model.set_checkpointing(resblocks=True, attention=True)
    x2 = x.clone().requires_grad_(True)
    with adm_fast.use_backend(FUSED):
        out = model(x2, t, y)
        out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(x2.grad).all()


class _GroupNormCalls(adm_fast.ops.op.Observer):
    def __init__(self):
        self.forwards = 0

    def enter(self, op, impl, phase, args):
        self.forwards += op == "group_norm_act" and phase == "forward"


@pytest.mark.parametrize("backend", [FUSED, {"group_norm_act": "cpu", "conv3x3": "cpu"}])
def test_guidance_rebuilds_nothing_in_backward(backend):
    """∇x alone (guidance): no recipe is rebuilt — no conv input is read
    without its weight's gradient, no pooling reads values — and ∇x is the
    same as with nothing recomputed. Training still rebuilds."""
    torch.manual_seed(0)
    clf = adm_fast.create_classifier(image_size=16, classifier_use_fp16=False,
                                     classifier_width=32, classifier_depth=1,
                                     classifier_attention_resolutions="8",
                                     classifier_use_scale_shift_norm=True,
                                     classifier_resblock_updown=True, classifier_pool="attention",
                                     classifier_channel_mult="1,2")
    clf.eval()
    adm_fast.models.use_preferred_layout(clf, "cpu")
    x = torch.randn(2, 3, 16, 16) + 0.3
    t = torch.tensor([5, 600])
    cond_fn = adm_fast.classifier_cond_fn(clf, 1.0)
    y = torch.tensor([1, 3])
    counter = _GroupNormCalls()
    with adm_fast.use_backend(backend):
        with torch.no_grad(), adm_fast.ops.op.observe(counter):
            logits_only = clf(x, t)
        forwards = counter.forwards  # the forward's own
        counter.forwards = 0
        with adm_fast.ops.op.observe(counter):
            grad = cond_fn(x, t, y=y)
        assert counter.forwards == forwards, (counter.forwards, forwards)  # none in backward
        adm_fast.ops.set_norm_act_recompute(False)
        try:
            ref = cond_fn(x, t, y=y)
        finally:
            adm_fast.ops.set_norm_act_recompute(True)
    assert torch.equal(grad, ref)
    assert logits_only.shape == (2, 1000)
    counter.forwards = 0
    with adm_fast.use_backend(backend), adm_fast.ops.op.observe(counter):
        clf(x.requires_grad_(True), t).float().pow(2).mean().backward()
    assert counter.forwards > forwards  # the weights' gradients read rebuilt inputs


def _close(held, saved):
    # the step's inputs were allocated before: saved (the first conv's x), not held
    return abs(held - saved) <= 0.01 * saved


def _held_step(model, x, t, y, backend):
    """(bytes the saved-tensor hooks see, bytes the forward left allocated less
    its output, gradients) of one step."""
    from adm_fast.benchmarks.saved_bytes import HeldBytes

    model.zero_grad()
    params = list(model.parameters())
    with adm_fast.use_backend(backend):
        model(x, t, y).float().pow(2).mean().backward()  # warm-up: decisions, caches
        model.zero_grad()
        with HeldBytes("cpu") as held, SavedBytes(exclude=params) as saved:
            out = model(x, t, y)
        seen = saved.nbytes()
        (out.float() ** 2).mean().backward()
    return seen, held.nbytes - out.untyped_storage().nbytes(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nothing_kept_out_of_sight(layout):
    """What the forward leaves allocated is what the hooks count: a recipe's
    conv input is freed (the hook that packs it no longer names it), and what
    runs inside norm_act_conv (a channels_last attention projection's [N, T, C]
    view of the norm's output, through a matmul) is rebuilt or counted."""
    model, x, t, y = _unet()
    if layout == "channels_last":
        adm_fast.models.use_preferred_layout(model, "cpu", training=True)
    saved_r, held_r, grads_r = _held_step(model, x, t, y, FUSED)
    assert _close(held_r, saved_r), (held_r, saved_r)
    adm_fast.ops.set_norm_act_recompute(False)
    try:
        saved_k, held_k, grads_k = _held_step(model, x, t, y, FUSED)
    finally:
        adm_fast.ops.set_norm_act_recompute(True)
    assert _close(held_k, saved_k), (held_k, saved_k)
    assert held_r < 0.8 * held_k, (held_r, held_k)
    for a, b in zip(grads_r, grads_k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_auto_keeps_the_recipe_where_it_would_take_the_eager_norm(monkeypatch):
    """Auto times the norm alone; where the eager GroupNorm wins or ties, a conv
    after it would keep its input. Under auto the recipe takes a kernel anyway
    (same gradients, the bytes of the kernel path); the eager backend named
    for the norm stays eager."""
    gn = adm_fast.ops.GROUP_NORM_ACT
    model, x, t, y = _unet()
    adm_fast.models.use_preferred_layout(model, "cpu", training=True)
    saved_k, held_k, grads_k = _held_step(model, x, t, y, FUSED)
    decided = gn.checked_decision

    def eager_decision(args):
        impl, grad = decided(args)
        return (gn.impls["eager"] if impl is not None else None), grad

    monkeypatch.setattr(gn, "checked_decision", eager_decision)
    saved_a, held_a, grads_a = _held_step(model, x, t, y, "auto")
    assert _close(held_a, saved_a) and saved_a <= saved_k, (held_a, saved_a, saved_k)
    for a, b in zip(grads_a, grads_k):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    saved_e, _, _ = _held_step(model, x, t, y, {"group_norm_act": "eager"})
    assert saved_e > 1.3 * saved_a, (saved_e, saved_a)


def test_dropout_drops_what_eager_drops_and_keeps_a_bool_mask():
    """Training with dropout: adm_fast's channels_last model drops the positions
    guided-diffusion's NCHW model drops at the same seed (torch's dropout draws
    in memory order), with the same outputs and gradients, keeping the conv's
    input as a recipe and the mask as bools."""
    import copy

    nac = sys.modules["adm_fast.ops.norm_act_conv"]
    h = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    ref = torch.nn.functional.dropout(h.contiguous(), 0.3, training=True)
    torch.manual_seed(3)
    assert torch.equal(nac._Dropout(h, 0.3)(h), ref)

    torch.manual_seed(0)
    model = adm_fast.create_model(image_size=16, num_channels=64, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="8",
                                  num_head_channels=32, learn_sigma=True, class_cond=True,
                                  resblock_updown=True, use_scale_shift_norm=True, dropout=0.3)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    fast = adm_fast.models.use_preferred_layout(copy.deepcopy(model), "cpu", training=True)
    _, x, t, y = _unet()
    results = {}
    for name, m, backend in (("eager", model, "eager"), ("fused", fast, FUSED)):
        torch.manual_seed(5)
        results[name] = _held_step(m, x, t, y, backend)  # the warm-up draws too: same RNG
    (saved_e, held_e, grads_e), (saved_f, held_f, grads_f) = results["eager"], results["fused"]
    for a, b in zip(grads_f, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert _close(held_f, saved_f) and _close(held_e, saved_e)
    assert saved_f < 0.5 * saved_e, (saved_f, saved_e)


def test_a_fake_or_meta_tensor_shares_memory_only_with_its_views():
    """Fake and meta tensors have no data (every data pointer is 0): whether a
    saved tensor is a view of the conv input is told by the storage object,
    not by a pointer that all of them share (they all matched before)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adm_fast.ops.norm_act_conv import _shares_memory

    def pair(make):
        a, b = make(), make()
        return _shares_memory(a[1:], a), _shares_memory(b, a), _shares_memory(a.t(), a)

    with FakeTensorMode():
        assert pair(lambda: torch.empty(4, 4)) == (True, False, True)
    assert pair(lambda: torch.empty(4, 4, device="meta")) == (True, False, True)
    assert pair(lambda: torch.empty(4, 4)) == (True, False, True)
