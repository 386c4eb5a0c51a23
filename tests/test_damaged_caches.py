"""The run-time tables in $ADM_FAST_CACHE (autotune.json, verify.json) may be
damaged in any way a file can be: what they held is ignored with one warning
line naming the file, measured again, and the next write replaces the damage;
never a crash (issue 26, U1: a deeply nested file raised RecursionError, list
and dict values where names or numbers belong raised TypeError, on every run
until the file was deleted)."""

import json
import warnings

import pytest
import torch

from adm_fast import ops
from adm_fast.ops import autotune, store, verify

QKV = ops.QKV_ATTENTION
DEEP = "[" * 200_000 + "]" * 200_000  # past the parser's recursion limit


def forget():
    """What a new process knows: the files, nothing else."""
    for state in (autotune._STATE, verify._STATE):
        state.update(table=None, path=None)
    for seen in (verify._REFUSED, verify._TRUSTED, verify._INCONCLUSIVE, verify._WARNED,
                 store._WARNED):
        seen.clear()
    QKV._decisions.clear()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("ADM_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("ADM_FAST_VERIFY", "1")
    # steady made-up timings: sdpa wins, and is stored
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad:
                        {"eager": 5.0, "sdpa": 1.0}[impl.backend])
    forget()
    yield tmp_path
    forget()


def _qkv(t=33):
    return torch.randn(2, 3 * 64, t, generator=torch.Generator().manual_seed(t))


def _autotune_key(qkv):
    return autotune.key(QKV, QKV.describe((qkv, 2, True)))


def _run_once_warned(match):
    """One call of the op: right values, exactly one CacheWarning matching."""
    qkv = _qkv()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = ops.qkv_attention(qkv, 2)
    torch.testing.assert_close(out, QKV.reference(qkv, 2, True), rtol=1e-5, atol=1e-6)
    damaged = [w for w in seen if issubclass(w.category, store.CacheWarning)]
    assert len(damaged) == 1, [str(w.message) for w in seen]
    assert damaged[0].filename.endswith("autotune.json") and damaged[0].lineno == 0
    assert match in str(damaged[0].message) and "\n" not in str(damaged[0].message)
    return qkv


@pytest.mark.parametrize("content, match", [
    (DEEP, "RecursionError"),
    ('{"a": ' + DEEP + "}", "RecursionError"),
    ("[1, 2]", "this table is an array, not a JSON object"),
    ("{not json", "cannot be read (JSONDecodeError"),
    (b"\xff\xfe{}", "cannot be read (UnicodeDecodeError"),
])
def test_a_damaged_autotune_file_is_ignored_and_measured_again(cache, content, match):
    file = cache / "autotune.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    qkv = _run_once_warned(match)
    assert json.loads(file.read_text()) == {_autotune_key(qkv): "sdpa"}  # replaced
    forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error", store.CacheWarning)
        ops.qkv_attention(qkv, 2)  # the new file reads cleanly


@pytest.mark.parametrize("damage, kind", [(["sdpa"], "an array"), ({"sdpa": 1}, "an object"),
                                          (3, "a number"), (None, "null"), (True, "a boolean")])
def test_autotune_entries_of_the_wrong_type_are_measured_again(cache, damage, kind):
    file = cache / "autotune.json"
    k = _autotune_key(_qkv())
    # what this process does not look up stays (another version may read it)
    others = {"other|key": {"a": [1]}, "kept|key": "eager"}
    file.write_text(json.dumps({k: damage, **others}))
    _run_once_warned(f"an entry is damaged (not what this table stores: {kind})")
    assert json.loads(file.read_text()) == {k: "sdpa", **others}


def test_entries_too_deep_to_write_back_are_dropped(cache, monkeypatch):
    """An entry the parser took may still be past the JSON writer's depth where
    the write happens (deeper in the stack): it goes, the rest stays."""
    file = cache / "autotune.json"
    file.write_text(json.dumps({"deep|key": [[[1]]], "kept|key": "eager"}))
    real = json.dumps

    def shallow_writer(obj, **kw):
        if any(isinstance(v, list) for v in obj.values()):
            raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")
        return real(obj, **kw)

    monkeypatch.setattr(json, "dumps", shallow_writer)
    qkv = _qkv()
    ops.qkv_attention(qkv, 2)
    monkeypatch.setattr(json, "dumps", real)
    assert json.loads(file.read_text()) == {_autotune_key(qkv): "sdpa", "kept|key": "eager"}


def test_retune_on_a_damaged_file_does_not_crash(cache):
    (cache / "autotune.json").write_text('{"x": ' + DEEP + "}")
    with pytest.warns(store.CacheWarning, match="RecursionError"):
        assert autotune.forget() == 0


def _verify_call():
    qkv = _qkv(17)
    call = QKV.describe((qkv, 2, True))
    return call, verify.key(QKV, QKV.impls["sdpa"], call)


@pytest.mark.parametrize("damage", [
    "deep", "deep value", "list verdict", "fields of the wrong type", "nested field"])
def test_a_damaged_verify_file_is_checked_again(cache, damage):
    file = cache / "verify.json"
    call, k = _verify_call()
    good = dict(ok=False, op="qkv_attention", impl="sdpa", call="c", what="output 0",
                device=verify.device_id(torch.device("cpu")), threads="t",
                torch=torch.__version__, build=verify._build(QKV.impls["sdpa"]), error=1.0,
                allowed=0.5, factor=16.0)
    content = {
        "deep": DEEP,
        "deep value": json.dumps({k: "X"}).replace('"X"', DEEP),
        "list verdict": json.dumps({k: [True]}),
        "fields of the wrong type": json.dumps({k: {**good, "ok": [False], "error": {"a": 1}}}),
        "nested field": json.dumps({k: {**good, "factor": [[16.0]]}}),
    }[damage]
    file.write_text(content)
    with pytest.warns(store.CacheWarning, match=r"verify\.json|cannot be read|not what"):
        assert verify.reasons(QKV, QKV.impls["sdpa"], call) == []  # checked again: it agrees
        assert verify.refused_here() == []  # adm-fast info reads the same table
    stored = json.loads(file.read_text())
    assert list(stored) == [k] and stored[k]["ok"] is True
