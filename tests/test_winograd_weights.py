"""The Winograd weights kept across calls (adm_fast/ops/winograd_weights.py):
a kept transform is served only while the weight holds the same bytes,
whatever wrote to it (in place, through .data, or a new tensor at a freed
weight's address); the convolution gives the same bytes from a kept transform
as from a fresh one; entries go with their weights and fit the budget."""

import gc

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_EXT

from adm_fast import ops
from adm_fast.ops.backends import CPU
from adm_fast.ops.conv3x3 import FROM_U, NATIVE
from adm_fast.ops.winograd_weights import TRANSFORM, WinogradWeights

pytestmark = pytest.mark.skipif(CPU.ext is None or not CPU.ext.has_avx2_fma(),
                                reason="the Winograd ops need the C++ extension on AVX2+FMA")


def weight(o=16, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(o, c, 3, 3, generator=g) / 9 + 0.02).contiguous(
        memory_format=torch.channels_last)


def fresh(w, turned=False):
    return TRANSFORM(w.detach().clone(), turned)


def test_a_kept_transform_is_the_fresh_one_and_a_hit():
    cache, w = WinogradWeights(1 << 30), weight()
    u1 = cache.get(w)
    u2 = cache.get(w)
    assert u2 is u1 and cache.hits == 1 and cache.misses == 1
    assert torch.equal(u1, fresh(w))


@pytest.mark.parametrize("write", ["in_place", "through_data", "one_element"])
def test_a_rewritten_weight_gets_a_new_transform(write):
    cache, w = WinogradWeights(1 << 30), torch.nn.Parameter(weight())
    cache.get(w)
    version = w._version
    with torch.no_grad():
        if write == "in_place":
            w.mul_(1.5)
        elif write == "through_data":  # leaves the version as it was
            w.data.copy_(weight(seed=1))
        else:  # the last word only: the compare must read it all
            w.data[-1, -1, -1, -1] += 1.0  # last in memory in either layout
    if write != "in_place":
        assert w._version == version
    assert torch.equal(cache.get(w), fresh(w))
    assert torch.equal(cache.get(w), fresh(w)) and cache.hits == 1


def test_turned_is_the_transform_of_the_turned_kernel():
    w = weight(16, 8)
    turned = w.transpose(0, 1).flip(2, 3).contiguous()
    assert torch.equal(TRANSFORM(w, True), TRANSFORM(turned, False))
    cache = WinogradWeights(1 << 30)
    assert torch.equal(cache.get(w, turned=True), TRANSFORM(turned, False))
    assert cache.get(w).shape == (16, 1, 8, 16) and cache.get(w, turned=True).shape == (16, 1, 16, 16)


def test_a_freed_weight_takes_its_entry_and_its_address_is_not_trusted():
    cache = WinogradWeights(1 << 30)
    w = weight()
    cache.get(w)
    assert cache.used_bytes() > 0
    del w
    gc.collect()
    assert cache.used_bytes() == 0
    # Same shape, same strides: whatever lands at a reused address is compared.
    for seed in range(4):
        w = weight(seed=seed)
        assert torch.equal(cache.get(w), fresh(w))
        del w


def test_past_the_budget_weights_are_transformed_each_call():
    w1, w2 = weight(seed=1), weight(seed=2)
    size = 4 * (w1.numel() + 16 * 16 * 8)
    cache = WinogradWeights(size)
    cache.get(w1)
    assert torch.equal(cache.get(w2), fresh(w2)) and cache.used_bytes() == size
    cache.get(w2)
    assert cache.hits == 0 and cache.get(w1) is cache.get(w1)
    off = WinogradWeights(0)
    assert torch.equal(off.get(w1), fresh(w1)) and off.used_bytes() == 0 and off.hits == 0


def test_a_weight_that_changes_every_call_stops_being_copied_and_comes_back():
    cache, w = WinogradWeights(1 << 30), weight()
    copies = []
    for step in range(40):  # training: a new weight at every call
        with torch.no_grad():
            w.add_(1e-3)
        entry = next(iter(cache._entries.values()), None)
        before = None if entry is None else entry.snap.clone()
        assert torch.equal(cache.get(w), fresh(w)), step
        entry = next(iter(cache._entries.values()))
        copies.append(before is not None and not torch.equal(before, entry.snap))
    assert sum(copies) < 6, copies  # refreshed every 16th change once volatile
    for _ in range(17):  # holding still: kept again within 16 calls
        cache.get(w)
    assert cache.get(w) is cache.get(w)


def test_the_convolution_gives_the_same_bytes_kept_or_fresh():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 8, 9, 7, generator=g) + 0.3).contiguous(memory_format=torch.channels_last)
    w, b = weight(), torch.randn(16, generator=g)
    direct = NATIVE(x, w, b)
    with ops.use_backend("cpu"):
        first = ops.conv3x3(x, w, b)
        kept = ops.conv3x3(x, w, b)
    assert torch.equal(direct, first) and torch.equal(first, kept)
    assert torch.equal(FROM_U(x, fresh(w), 16, b), direct)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert (kept - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_budget_setting_is_checked_at_the_first_entry(monkeypatch):
    for raw, message in (("lots", "ADM_FAST_WINOGRAD_CACHE_MB"), ("-1", ">= 0")):
        monkeypatch.setenv("ADM_FAST_WINOGRAD_CACHE_MB", raw)
        cache = WinogradWeights()  # as at import: nothing read yet
        with pytest.raises(ValueError, match=message):
            cache.get(weight())
    monkeypatch.setenv("ADM_FAST_WINOGRAD_CACHE_MB", "0.5")
    cache, w = WinogradWeights(), weight()
    cache.get(w)
    assert cache.budget == 2**19 and cache.used_bytes() > 0


def test_the_strips_pad_with_zeros_past_the_output_channels():
    w = weight(20, 8)  # two strips of 16, the second with 4 channels
    u = TRANSFORM(w, False)
    assert u.shape == (16, 2, 8, 16) and u[:, 1, :, 4:].abs().sum() == 0
    # U[ξ][c][o] = (G·g·Gᵀ)[ξ] for g = w[o, c]: the corners ξ = 0, 3, 12, 15 are g's corners
    flat = u.permute(0, 2, 1, 3).reshape(16, 8, 32)[:, :, :20]  # [ξ, C, O]
    for xi, (ky, kx) in zip((0, 3, 12, 15), ((0, 0), (0, 2), (2, 0), (2, 2))):
        assert torch.equal(flat[xi], w[:, :, ky, kx].t())


@pytest.mark.parametrize("bad, message", [
    (lambda x, u, b: (x, u[:15], 16, b), r"\[16, 1, C=8, 16\]"),
    (lambda x, u, b: (x, u[:, :, :4].contiguous(), 16, b), r"\[16, 1, C=8, 16\]"),
    (lambda x, u, b: (x, u, 17, b), r"\[16, 2, C=8, 16\] for 17"),
    (lambda x, u, b: (x, u, -1, b), ">= 0"),
    (lambda x, u, b: (x, u.double(), 16, b), "contiguous CPU fp32"),
    (lambda x, u, b: (x, u.transpose(2, 3), 16, b), "contiguous CPU fp32"),
    (lambda x, u, b: (x.contiguous(), u, 16, b), "channels_last"),
    (lambda x, u, b: (x, u, 16, b[:3]), "bias"),
])
def test_the_raw_ops_check_their_arguments(bad, message):
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    u, b = TRANSFORM(weight(16, 8), False), torch.randn(16)
    with pytest.raises(RuntimeError, match=message):
        FROM_U(*bad(x, u, b))
    with pytest.raises(RuntimeError, match=r"\[O, C, 3, 3\]"):
        TRANSFORM(torch.randn(4, 8, 3, 2), False)
    with pytest.raises(RuntimeError, match="fp32"):
        TRANSFORM(torch.randn(4, 8, 3, 3).double(), True)


@pytest.mark.skipif(not CPU_EXT, reason="needs the CPU extension")
def test_the_cache_compares_bytes_with_one_memcmp():
    """torch.equal is a parallel region (ms on a busy machine, at every
    convolution); the extension's memcmp compares the same bits: -0.0 is not
    0.0, one flipped bit counts, and tensors of other layouts are refused."""
    import sys

    ext = sys.modules["adm_fast.ops.backends"].CPU.ext
    a = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    assert ext.bytes_equal(a, a.clone())
    b = a.clone()
    b.view(torch.int32)[1, 2, 0, 1] ^= 1
    assert not ext.bytes_equal(a, b)
    assert not ext.bytes_equal(torch.zeros(4), -torch.zeros(4))
    with pytest.raises(RuntimeError, match="one shape, strides and dtype"):
        ext.bytes_equal(a, a.contiguous())
    with pytest.raises(RuntimeError, match="dense"):
        ext.bytes_equal(a[:, ::2], a[:, ::2])


def test_traced_weights_are_transformed_not_kept_nor_compared():
    # bench sample traces a step on fake tensors after its real loops; every
    # fake weight has data_ptr 0, so a second fake weight of a shape met its
    # predecessor's entry and the compare read address 0 (the process died
    # with SIGSEGV).
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache, real = WinogradWeights(1 << 30), weight()
    cache.get(real)  # a real entry beside
    with FakeTensorMode() as mode:
        for seed in range(3):
            u = cache.get(mode.from_tensor(weight(seed=seed)))
            assert u.shape == (16, 1, 8, 16)
    assert len(cache._entries) == 1 and cache.misses == 1
    meta = weight().to("meta")
    assert cache.get(meta).device.type == "meta" and len(cache._entries) == 1
