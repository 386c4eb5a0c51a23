"""The training benchmark's measurements: the saved-for-backward byte counter
on graphs whose saved tensors are known, and one tiny UNet L_hybrid step
where the fused backends must hold fewer bytes than eager and agree with it."""

import re

import pytest
import torch
from helpers import CPU_EXT

from adm_fast.benchmarks import train as bench_train
from adm_fast.benchmarks.saved_bytes import SavedBytes


def test_counts_saved_input_and_excludes_parameter():
    x = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000))
    with SavedBytes() as counter:
        y = (x * w).sum()  # saves x (for dw) and w (for dx)
    assert counter.nbytes() == 4000
    y.backward()
    assert torch.equal(x.grad, w.detach())


def test_views_of_one_storage_count_once_and_whole():
    x = torch.randn(1000, requires_grad=True)
    h = torch.randn(1000)
    with SavedBytes() as counter:
        # mul saves both halves of h for dx: two views, one 4000-byte storage.
        y = (x[:500] * h[:500]).sum() + (x[500:] * h[500:]).sum()
        # A slice keeps its whole base alive: 400 bytes, not 40.
        z = (x[:10] * torch.randn(100)[:10]).sum()
    assert counter.nbytes() == 4000 + 400
    (y + z).backward()


def test_views_of_parameters_excluded_by_storage():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8, 16))
    with SavedBytes(exclude=[w]) as counter:
        y = x @ w.t()  # w.t() is a view, not a Parameter: only exclude= catches it
    assert counter.nbytes() == x.nbytes
    with SavedBytes() as counter:
        y = x @ w.t()
    assert counter.nbytes() == x.nbytes + w.nbytes
    y.sum().backward()


def test_freed_branches_do_not_count():
    x = torch.randn(1000, requires_grad=True)
    with SavedBytes() as counter:
        (x * torch.randn(1000)).sum()  # graph and its saved tensor dropped at once
        kept = (x[:250] * torch.randn(250)).sum()
    assert counter.nbytes() == 1000
    kept.backward()


def tiny_trainer(dtype="fp32"):
    # 16x16 images, two levels, attention at 16² (256 tokens) and 8², dropout on.
    model, diffusion, flags, kind = bench_train.build(
        "64x64_diffusion", dict(image_size=16, num_channels=32, num_res_blocks=1,
                                channel_mult="1,2", num_head_channels=16,
                                attention_resolutions="16,8"),
        "none", dtype, torch.device("cpu"))
    trainer = bench_train.Trainer(model, diffusion, flags, kind, dtype, torch.device("cpu"))
    trainer.set_batch(2)
    return trainer


# (fused setting, bound on its bytes / eager's). Per-op settings leave the
# other ops on auto, which fuses GroupNorm on CPU when the extension is built;
# auto itself keeps eager attention below 1024 tokens on CPU, so its saving
# here is GroupNorm's alone.
FUSED = [pytest.param({"qkv_attention": "sdpa"}, 0.75, id="sdpa_attention"),
         pytest.param("auto", 0.9, id="auto", marks=pytest.mark.skipif(
             not CPU_EXT, reason="auto fuses GroupNorm on CPU only with the C++ extension"))]


@pytest.mark.parametrize("fused,bound", FUSED)
def test_fused_step_saves_less_and_agrees(fused, bound):
    trainer = tiny_trainer()
    saved, loss_rel, grad_rel = bench_train.compare(trainer, fused=fused)
    # Eager attention keeps the [N·H, T, T] softmax and its logits; the fused
    # GroupNorm keeps only x and per-group statistics for its backward.
    assert saved["adm_fast"] < bound * saved["eager"], saved
    assert saved["eager"] > 1 << 20
    assert loss_rel < 1e-5
    assert grad_rel < 1e-4


def test_step_updates_weights_and_repeats_with_the_seed():
    a, b = tiny_trainer(), tiny_trainer()
    before = [p.detach().clone() for p in a.model.parameters()]
    torch.manual_seed(1)
    a.step("auto")
    torch.manual_seed(1)
    b.step("auto")
    moved = [not torch.equal(p, q) for p, q in zip(a.model.parameters(), before)]
    # Every parameter had a gradient: the zero-initialised convs were re-drawn.
    assert all(moved)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_fp16_step_unscales_into_fp32_masters():
    ref = tiny_trainer("fp32")
    torch.manual_seed(2)
    ref.forward_backward("eager")
    ref_grads = [p.grad.clone() for p in ref.model.parameters()]
    trainer = tiny_trainer("fp16")
    halves = [(p, m) for p, m in trainer.pairs if p is not m]
    assert halves and all(p.dtype == torch.float16 for p, _ in halves)
    for _ in range(20):  # overflowing steps are skipped while the loss scale halves
        torch.manual_seed(2)
        if trainer.step("eager"):
            break
    else:
        pytest.fail("every fp16 step overflowed")
    # Each master holds its fp16 gradient with the loss scale divided out ...
    for p, m in halves:
        assert torch.equal(m.grad, p.grad.float() / trainer.scale)
        assert torch.equal(p, m.detach().half())
    # ... so all together they are the fp32 model's gradient up to fp16
    # rounding (per element that is loose: many gradients are sums that cancel).
    g16 = torch.cat([m.grad.flatten() for _, m in trainer.pairs])
    g32 = torch.cat([g.flatten() for g in ref_grads])
    assert abs(g16.norm() / g32.norm() - 1) < 0.05
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.95


@pytest.mark.parametrize("largest", [0, 1, 37, 64, 1000])
def test_max_batch_search_finds_the_boundary(largest):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest

    lo, hi, capped = bench_train.search_max_batch(fits, time_cap=60.0)
    assert (lo, hi, capped) == (largest, largest + 1, False)
    assert tried[0] == 1 and len(tried) == len(set(tried))
    assert len(tried) <= 2 * max(largest, 1).bit_length() + 1  # doubling, then bisection


def test_max_batch_search_reports_the_bracket_when_capped():
    lo, hi, capped = bench_train.search_max_batch(lambda b: b <= 100, time_cap=0.0)
    assert (lo, hi, capped) == (0, None, True)


# guided-diffusion's image_train.py defaults (adm-fast train's), at a size a
# test can afford: three levels, attention at the last (8x8).
SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
             attention_resolutions="8")


@pytest.mark.skipif(not CPU_EXT, reason="auto fuses GroupNorm on CPU only with the C++ extension")
def test_user_step_keeps_at_most_half_and_bench_train_reports_it(monkeypatch, capsys):
    """The figure a user gets: the model built by adm-fast train's own path
    (build_model: NCHW for eager, channels_last for auto), the training loop's
    loss, MixedPrecisionTrainer; adm_fast keeps at most half of what
    guided-diffusion keeps, nothing hides from the hooks (the memory the forward
    left allocated is what they count), and bench train prints that figure."""
    flags = bench_train.training_flags(None, SMALL)
    from adm_fast.train.run import build_model
    model, _ = build_model("diffusion", flags, torch.device("cpu"), 1000)
    conv = model.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    measured = []

    def spy(*args, **kwargs):
        measured.append(user_saved_ratio(*args, **kwargs))
        return measured[-1]

    user_saved_ratio = bench_train.user_saved_ratio
    monkeypatch.setattr(bench_train, "user_saved_ratio", spy)
    argv = ["--preset", "none", "--set", *[f"{k}={v}" for k, v in SMALL.items()],
            "--batch", "2", "--repeats", "1", "--min_run_time", "0", "--no_save"]
    assert bench_train.main(argv) == 0
    out = capsys.readouterr().out
    (user,) = measured
    ratio = user["adm_fast"]["saved"] / user["eager"]["saved"]
    assert ratio <= 0.5, user
    for impl in user.values():
        assert abs(impl["held"] - impl["saved"]) <= 0.01 * impl["saved"], user
    printed = re.search(r"saved for backward, adm_fast/eager: ([0-9.]+)", out)
    assert printed and float(printed.group(1)) == pytest.approx(ratio, abs=1e-3), out
    match = re.search(r"grad max rel diff ([0-9.e+-]+)", out)
    assert match and float(match.group(1)) < 1e-4, out
