"""Choices timed at run time (ops/autotune.py): made once per call signature,
stored per machine so a later run makes the same one, off on request."""

import json

import pytest
import torch

import adm_fast
from adm_fast import ops
from adm_fast.ops import autotune


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("ADM_FAST_CACHE", str(tmp_path))
    ops.QKV_ATTENTION._decisions.clear()
    yield tmp_path
    ops.QKV_ATTENTION._decisions.clear()


def test_attention_on_cpu_is_timed_once_and_stored(tuning, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "_time_ms",
                        lambda op, impl, args, grad: calls.append(impl.backend) or
                        {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    qkv = torch.randn(2, 3 * 64, 65)
    out = ops.qkv_attention(qkv, 2)
    # interleaved rounds, the order rotating: a busy spell slows both alike
    rounds = autotune.ROUNDS
    assert calls == [name for r in range(rounds) for name in
                     (["eager", "sdpa"] if r % 2 == 0 else ["sdpa", "eager"])]
    torch.testing.assert_close(out, ops.QKV_ATTENTION.reference(qkv, 2, True))
    ops.qkv_attention(qkv, 2)  # the same signature: decided already
    assert len(calls) == 2 * rounds
    table = json.loads((tuning / "autotune.json").read_text())
    assert list(table.values()) == ["sdpa"]
    # A new process (the decisions forgotten) reads the machine's choice back.
    ops.QKV_ATTENTION._decisions.clear()
    autotune._STATE.update(table=None, path=None)
    ops.qkv_attention(qkv, 2)
    assert len(calls) == 2 * rounds


def test_the_timing_runs_the_candidates_for_real(tuning):
    qkv = torch.randn(1, 3 * 32, 17, requires_grad=True)
    call = ops.QKV_ATTENTION.describe((qkv, 1, True))
    impls = [ops.QKV_ATTENTION.impls["eager"], ops.QKV_ATTENTION.impls["sdpa"]]
    chosen = autotune.pick(ops.QKV_ATTENTION, call, (qkv, 1, True), impls)
    assert chosen in impls and qkv.grad is None  # timed on copies


def test_off_and_damaged_caches_fall_back(tuning, monkeypatch):
    (tuning / "autotune.json").write_text("{not json")
    autotune._STATE.update(table=None, path=None)
    qkv = torch.randn(1, 3 * 32, 9)
    torch.testing.assert_close(ops.qkv_attention(qkv, 1), ops.QKV_ATTENTION.reference(qkv, 1, True))
    monkeypatch.setenv("ADM_FAST_AUTOTUNE", "0")
    ops.QKV_ATTENTION._decisions.clear()
    assert not autotune.enabled()
    assert "eager: chosen" in ops.explain("qkv_attention", qkv, 1, True)


def test_a_choice_stored_first_by_another_process_wins(tuning, monkeypatch):
    # Two ranks of one job time the same call at once: the first to store
    # decides for both (and for every later run), whatever the second measured.
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad:
                        {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    qkv = torch.randn(2, 3 * 64, 33)
    call = ops.QKV_ATTENTION.describe((qkv, 2, True))
    impls = [ops.QKV_ATTENTION.impls["eager"], ops.QKV_ATTENTION.impls["sdpa"]]
    autotune._table()  # this process loaded the (empty) table earlier
    k = autotune.key(ops.QKV_ATTENTION, call)
    (tuning / "autotune.json").write_text(json.dumps({k: "eager", "other|key": "sdpa"}))
    assert autotune.pick(ops.QKV_ATTENTION, call, (qkv, 2, True), impls).backend == "eager"
    stored = json.loads((tuning / "autotune.json").read_text())
    assert stored == {k: "eager", "other|key": "sdpa"}
    # Without a rival, the measured choice is stored beside what is there.
    qkv2 = torch.randn(2, 3 * 64, 34)
    call2 = ops.QKV_ATTENTION.describe((qkv2, 2, True))
    assert autotune.pick(ops.QKV_ATTENTION, call2, (qkv2, 2, True), impls).backend == "sdpa"
    stored = json.loads((tuning / "autotune.json").read_text())
    assert stored[autotune.key(ops.QKV_ATTENTION, call2)] == "sdpa" and stored[k] == "eager"


def test_fake_tensors_are_not_timed_and_their_decisions_not_kept(tuning, monkeypatch):
    """A traced step (adm-fast bench plan, bench sample's roofline) runs on fake
    tensors: nothing to time there, and the static order that stands in must
    not be stored or remembered for the real tensors of the same shape. (The
    timer is a stand-in: real timings on a busy machine may be too noisy to
    store, which is not what this test is about.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adm_fast.ops import autotune

    timed = []
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad: timed.append(
        impl.backend) or {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    qkv_shape = (2, 3 * 2 * 32, 256)
    with FakeTensorMode():
        adm_fast.ops.qkv_attention(torch.randn(qkv_shape), 2)
    assert not timed
    assert not autotune._table()
    assert not adm_fast.ops.QKV_ATTENTION._decisions
    adm_fast.ops.qkv_attention(torch.randn(qkv_shape), 2)
    assert timed  # the real call is timed
    assert list(autotune._table().values()) == ["sdpa"]  # and stored


@pytest.mark.parametrize("times, default, choice, trusted", [
    ({"eager": [5, 5, 5, 5, 5], "sdpa": [1, 1, 1, 1, 1]}, "eager", "sdpa", True),
    # 5% faster is not a clear win: the static order holds
    ({"eager": [5, 5, 5, 5, 5], "sdpa": [4.75] * 5}, "eager", "eager", True),
    # faster by median but slower in most rounds: no clear win (and scattered)
    ({"eager": [9, 9, 5, 5, 1], "sdpa": [10, 10, 1, 1, 2]}, "eager", "eager", False),
    # a busy machine: rounds scatter, nothing is trusted
    ({"eager": [5, 9, 5, 14, 6], "sdpa": [1, 4, 1, 9, 2]}, "eager", "sdpa", False),
])
def test_a_choice_needs_a_clear_win_and_steady_timings(times, default, choice, trusted):
    assert autotune.judge(times, default) == (choice, trusted)


def test_noisy_timings_keep_the_static_order_and_store_nothing(tuning, monkeypatch):
    """Timed while the machine was busy: the rounds scatter, so the static
    order's choice is used in this process and nothing is stored (the next run
    times again); steady timings are stored."""
    noisy = iter([5, 1, 9, 4, 5, 1, 14, 9, 6, 2] * 4)
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad: next(noisy))
    qkv = torch.randn(2, 3 * 64, 47)
    ops.qkv_attention(qkv, 2)
    assert "eager: chosen" in ops.explain("qkv_attention", qkv, 2, True)
    assert not (tuning / "autotune.json").exists() or not json.loads(
        (tuning / "autotune.json").read_text())
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad:
                        {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    ops.QKV_ATTENTION._decisions.clear()
    ops.qkv_attention(qkv, 2)
    assert list(json.loads((tuning / "autotune.json").read_text()).values()) == ["sdpa"]


def test_retune_forgets_this_machines_choices(tuning, monkeypatch, capsys):
    from adm_fast import info

    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad:
                        {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    ops.qkv_attention(torch.randn(2, 3 * 64, 51), 2)
    table = json.loads((tuning / "autotune.json").read_text())
    table["another machine|qkv_attention|x"] = "eager"
    (tuning / "autotune.json").write_text(json.dumps(table))
    autotune._STATE.update(table=None, path=None)
    assert info.main(["--retune"]) == 0
    assert "dropped 1 stored choice of this machine" in capsys.readouterr().out
    assert json.loads((tuning / "autotune.json").read_text()) == {
        "another machine|qkv_attention|x": "eager"}
    assert not ops.QKV_ATTENTION._decisions
