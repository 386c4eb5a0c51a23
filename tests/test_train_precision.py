"""MixedPrecisionTrainer: fp32 equals plain training, fp16 loss scaling unscales
every gradient and never lets a non-finite value reach the weights, bf16
autocast, clipping, trainer state and master-param <-> state_dict conversion."""

import copy
import io
import logging

import pytest
import torch
from helpers import rel_err
from torch import nn

import adm_fast
from adm_fast.train.precision import MixedPrecisionTrainer


def tiny_unet(**kw):
    torch.manual_seed(0)
    model = adm_fast.create_model(image_size=8, num_channels=32, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="4",
                                  learn_sigma=True, num_head_channels=32, **kw)
    # ADM zero-initialises its output convolutions, which makes most gradients
    # exactly zero; perturb every weight so each gradient carries information.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def unet_batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 500]),
            torch.randn(2, 6, 8, 8, generator=g))


def unet_loss(model, batch):
    x, t, target = batch
    return (model(x, t).float() - target).square().mean()


class TinyNet(nn.Module):
    """A torso convolution that convert_to_fp16 casts, an fp32 head, a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.register_buffer("offset", torch.arange(3.0))

    def convert_to_fp16(self):
        self.conv.to(torch.float16)

    def forward(self, x):
        h = self.conv(x.to(self.conv.weight.dtype)).float().mean(dim=(2, 3))
        return self.head(h) + self.offset


def tiny_loss(model, scale=1.0):
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    return (model(x) * scale).square().mean()


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def test_fp32_step_equals_plain_optimizer_step():
    model = tiny_unet()
    ref = copy.deepcopy(model)
    trainer = MixedPrecisionTrainer(model, precision="fp32")
    assert trainer.master_params == list(model.parameters())
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    batch = unet_batch()
    for _ in range(2):
        trainer.zero_grad()
        with trainer.autocast():
            loss = unet_loss(model, batch)
        trainer.backward(loss)
        assert trainer.optimize(opt)
        ref_opt.zero_grad()
        unet_loss(ref, batch).backward()
        ref_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        ref_opt.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, r)
    assert trainer.grad_norm == pytest.approx(ref_grad_norm.item(), rel=1e-6)
    assert trainer.loss_scale == 1.0 and trainer.skipped_steps == 0
    assert all(p.grad is None for p in model.parameters())


def _fp16_step(trainer, opt, batch):
    trainer.zero_grad()
    with trainer.autocast():
        loss = unet_loss(trainer.model, batch)
    trainer.backward(loss)
    return trainer.optimize(opt)


# The perturbed tiny UNet's gradients reach 0.09: at the default 2**20 they
# overflow fp16 (as guided-diffusion's first steps do), at 2**14 they do not.
LG = 14.0


def test_fp16_step_unscales_every_gradient_and_syncs_weights():
    model = tiny_unet()
    ref = copy.deepcopy(model)
    trainer = MixedPrecisionTrainer(model, precision="fp16", initial_lg_loss_scale=LG)
    assert model.dtype == torch.float16
    assert {p.dtype for p in model.parameters()} == {torch.float16, torch.float32}
    assert all(m.dtype == torch.float32 for m in trainer.master_params)
    # Masters are copied before the conversion: they hold the fp32 weights.
    for m, r in zip(trainer.master_params, ref.parameters()):
        assert torch.equal(m, r)
    seen = []
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        [p.grad.clone() for p in trainer.master_params]))
    before = snapshot(trainer.master_params)
    batch = unet_batch()
    assert _fp16_step(trainer, opt, batch)

    unet_loss(ref, batch).backward()
    names = [n for n, _ in ref.named_parameters()]
    # Biases right before a one-channel-per-group GroupNorm have a true gradient
    # of 0 (fp32 gives ~1e-9 noise, fp16 ~1e-6): measure against a floor.
    floor = 1e-2 * max(r.grad.abs().max().item() for r in ref.parameters())
    for name, g, r in zip(names, seen[0], ref.parameters()):
        assert g.dtype == torch.float32
        err = (g - r.grad).abs().max().item() / max(r.grad.abs().max().item(), floor)
        assert err < 2e-2, name
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    assert trainer.grad_norm == pytest.approx(ref_norm, rel=1e-2)
    for name, m, b, p in zip(names, trainer.master_params, before, model.parameters()):
        assert not torch.equal(m, b), name
        assert torch.equal(p, m.to(p.dtype)), name
    assert trainer.lg_loss_scale == pytest.approx(LG + 1e-3)
    assert trainer.loss_scale == pytest.approx(2.0 ** (LG + 1e-3))


def test_fp16_overflow_skips_step_then_recovers(caplog):
    model = tiny_unet()
    trainer = MixedPrecisionTrainer(model, precision="fp16", initial_lg_loss_scale=LG)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3)
    batch = unet_batch()
    # An inf in a parameter that stayed fp32: it must be checked as well.
    victim = model.time_embed[0].weight
    assert victim.dtype == torch.float32
    handle = victim.register_hook(lambda g: torch.full_like(g, float("inf")))
    masters, weights = snapshot(trainer.master_params), snapshot(model.parameters())
    with caplog.at_level(logging.WARNING, logger="adm_fast.train"):
        assert not _fp16_step(trainer, opt, batch)
    assert trainer.skipped_steps == 1
    assert trainer.lg_loss_scale == LG - 1
    assert any("lg_loss_scale is now 13.000" in r.getMessage() for r in caplog.records)
    for m, b in zip(trainer.master_params, masters):
        assert torch.equal(m, b) and torch.isfinite(m).all()
    for p, b in zip(model.parameters(), weights):
        assert torch.equal(p, b) and torch.isfinite(p).all()
    assert all(m.grad is None for m in trainer.master_params)
    assert not opt.state  # Adam's moments and step count did not advance

    handle.remove()
    assert _fp16_step(trainer, opt, batch)
    assert trainer.lg_loss_scale == pytest.approx(LG - 1 + 1e-3)
    assert trainer.skipped_steps == 1
    for p, m in zip(model.parameters(), trainer.master_params):
        assert torch.isfinite(m).all() and torch.equal(p, m.to(p.dtype))


def test_fp16_loss_scale_floor_and_real_overflow():
    model = TinyNet()
    trainer = MixedPrecisionTrainer(model, precision="fp16", initial_lg_loss_scale=1.5,
                                    min_lg_loss_scale=1.0)
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    # Gradients around 1e5 overflow fp16 however they are scaled down to 2**1.
    for expected in (1.0, 1.0):
        trainer.zero_grad()
        trainer.backward(tiny_loss(model, scale=1e4))
        assert not trainer.optimize(opt)
        assert trainer.lg_loss_scale == expected
    assert trainer.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_idempotent_for_use_fp16_model():
    model = tiny_unet(use_fp16=True)
    weights = snapshot(model.parameters())
    trainer = MixedPrecisionTrainer(model, precision="fp16")
    for w, p, m in zip(weights, model.parameters(), trainer.master_params):
        assert p.dtype == w.dtype and torch.equal(p, w) and torch.equal(m, w.float())


def test_bf16_autocast_close_to_fp32_and_weights_stay_fp32():
    model = tiny_unet()
    ref = copy.deepcopy(model)
    trainer = MixedPrecisionTrainer(model, precision="bf16")
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    batch = unet_batch()
    with trainer.autocast():
        out = model(batch[0], batch[1])
        loss = (out.float() - batch[2]).square().mean()
    assert out.dtype == torch.bfloat16  # autocast was really on
    ref_loss = unet_loss(ref, batch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    trainer.backward(loss)
    ref_loss.backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    assert trainer.optimize(opt)
    assert trainer.grad_norm == pytest.approx(ref_norm, rel=5e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert trainer.master_params == list(model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_grad_clipping(precision):
    torch.manual_seed(3)
    model = TinyNet()
    ref = copy.deepcopy(model)
    trainer = MixedPrecisionTrainer(model, precision=precision, max_grad_norm=0.05,
                                    initial_lg_loss_scale=8.0)
    opt = torch.optim.SGD(trainer.master_params, lr=1.0)
    before = snapshot(trainer.master_params)
    trainer.zero_grad()
    with trainer.autocast():
        loss = tiny_loss(model, scale=3.0)
    trainer.backward(loss)
    assert trainer.optimize(opt)
    tiny_loss(ref, scale=3.0).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    ref_norm = torch.nn.utils.get_total_norm(ref_grads).item()
    assert ref_norm > 0.5  # clipping really engages
    tol = 1e-5 if precision == "fp32" else 3e-2
    assert trainer.grad_norm == pytest.approx(ref_norm, rel=tol)
    # With SGD(lr=1) the update is the clipped gradient: norm 0.05, same direction.
    steps = [b - m.detach() for b, m in zip(before, trainer.master_params)]
    assert torch.nn.utils.get_total_norm(steps).item() == pytest.approx(0.05, rel=1e-4)
    for s, g in zip(steps, ref_grads):
        assert rel_err(s, g * (0.05 / ref_norm)) < tol


def test_fp32_nonfinite_gradient_skips(caplog):
    model = TinyNet()
    trainer = MixedPrecisionTrainer(model)
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    weights = snapshot(model.parameters())
    model.head.bias.register_hook(lambda g: g * float("nan"))
    trainer.backward(tiny_loss(model))
    with caplog.at_level(logging.WARNING, logger="adm_fast.train"):
        assert not trainer.optimize(opt)
    assert caplog.records and trainer.skipped_steps == 1 and trainer.lg_loss_scale == 20.0
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w) and p.grad is None


def test_state_dict_round_trip_and_mismatch():
    model = TinyNet()
    trainer = MixedPrecisionTrainer(model, precision="fp16", initial_lg_loss_scale=12.0)
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    trainer.backward(tiny_loss(model, scale=1e4))  # overflows
    assert not trainer.optimize(opt)
    trainer.backward(tiny_loss(model))
    assert trainer.optimize(opt)
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = MixedPrecisionTrainer(TinyNet(), precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == trainer.state_dict()
    assert fresh.lg_loss_scale == pytest.approx(11.0 + 1e-3) and fresh.skipped_steps == 1

    with pytest.raises(ValueError, match=r"precision='fp16'.*precision='fp32'"):
        MixedPrecisionTrainer(TinyNet(), precision="fp32").load_state_dict(state)
    with pytest.raises(KeyError, match="skipped_steps"):
        fresh.load_state_dict({"precision": "fp16", "lg_loss_scale": 3.0})


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"'fp32', 'fp16', 'bf16'.*'float16'"):
        MixedPrecisionTrainer(TinyNet(), precision="float16")
    half = TinyNet()
    half.convert_to_fp16()
    with pytest.raises(ValueError, match=r"'conv.weight' is torch.float16"):
        MixedPrecisionTrainer(half, precision="bf16")
    with pytest.raises(TypeError, match="convert_to_fp16"):
        MixedPrecisionTrainer(nn.Linear(2, 2), precision="fp16")
    with pytest.raises(ValueError, match="max_grad_norm"):
        MixedPrecisionTrainer(TinyNet(), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="min_lg_loss_scale"):
        MixedPrecisionTrainer(TinyNet(), precision="fp16", initial_lg_loss_scale=-1.0)
    model = TinyNet()
    trainer = MixedPrecisionTrainer(model, precision="fp16")
    wrong = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.backward(tiny_loss(model))
    with pytest.raises(ValueError, match="master_params"):
        trainer.optimize(wrong)
    trainer.zero_grad()
    with pytest.raises(RuntimeError, match="backward"):
        trainer.optimize(torch.optim.SGD(trainer.master_params, lr=0.1))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_master_params_state_dict_round_trip(precision):
    model = TinyNet()
    trainer = MixedPrecisionTrainer(model, precision=precision)
    ema = [m.detach() * 0.5 + 0.125 for m in trainer.master_params]
    sd = trainer.master_params_to_state_dict(ema)
    assert list(sd) == list(TinyNet().state_dict())
    assert torch.equal(sd["offset"], model.offset)
    for (name, _), e in zip(model.named_parameters(), ema):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], e)
    fp32_model = TinyNet()
    fp32_model.load_state_dict(sd, strict=True)  # a checkpoint any fp32 model loads

    back = trainer.state_dict_to_master_params(sd)
    assert len(back) == len(ema)
    for b, e in zip(back, ema):
        assert b.dtype == torch.float32 and torch.equal(b, e)
        assert b.data_ptr() != e.data_ptr()

    trainer.load_model_state_dict(sd)
    for m, p, e in zip(trainer.master_params, model.parameters(), ema):
        assert torch.equal(m, e) and torch.equal(p, e.to(p.dtype))

    with pytest.raises(ValueError, match="2 parameters"):
        trainer.master_params_to_state_dict(ema[:2])
    bad = dict(sd, **{"head.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(2, 2\)"):
        trainer.state_dict_to_master_params(bad)
    with pytest.raises(KeyError, match="conv.weight"):
        trainer.state_dict_to_master_params({"head.weight": sd["head.weight"]})
