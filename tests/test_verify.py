"""Auto checks an implementation against the reference before it uses it
(ops/verify.py): a kernel made wrong on purpose is passed over, with one
warning, its verdict stored, reused by a later process and listed by
`adm-fast info`; a named backend still runs it; what cannot be checked (no
values, NaN inputs) is not, and is not remembered."""

import contextlib
import json
import types
import warnings

import pytest
import torch
from helpers import CPU_EXT

import adm_fast
from adm_fast import ops
from adm_fast.ops import autotune, verify

pytestmark = pytest.mark.skipif(not CPU_EXT, reason="the wrong kernels are the C++ CPU ones")
GN = ops.GROUP_NORM_ACT


def forget():
    """What a new process knows: the stored tables, nothing else."""
    verify._STATE.update(table=None, path=None)
    for seen in (verify._REFUSED, verify._TRUSTED, verify._INCONCLUSIVE, verify._WARNED):
        seen.clear()
    for op in ops.ops().values():
        op._decisions.clear()


@pytest.fixture
def verifying(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_FAST_VERIFY", "1")
    monkeypatch.setenv("ADM_FAST_CACHE", str(tmp_path))
    forget()
    yield tmp_path
    forget()


@contextlib.contextmanager
def wrong(names, change):
    """adm_fast_native::<name> giving change(its real outputs), for each of
    names. Registered for AutogradCPU, which the dispatcher tries before the
    extension's CPU kernel: it reaches that kernel below autograd, and
    removing the registration leaves the extension's as it was."""
    lib = torch.library.Library("adm_fast_native", "IMPL")

    def kernel_of(real):
        def kernel(*args):
            with torch._C._AutoDispatchBelowAutograd():
                out = real(*args)
            return change(*out) if isinstance(out, tuple) else change(out)
        return kernel

    for name in (names,) if isinstance(names, str) else names:
        lib.impl(name, kernel_of(getattr(torch.ops.adm_fast_native, name).default),
                 "AutogradCPU")
    try:
        yield
    finally:
        lib._destroy()


def off_by_1e2(y, mean, rstd):
    return y + 1e-2, mean, rstd


def gn_args(shape=(2, 64, 16, 16), requires_grad=False):
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_(requires_grad)
    n, c = shape[:2]
    return (x, 32, torch.randn(c) + 1, torch.randn(c), torch.randn(n, c), torch.randn(n, c),
            1e-5, True)


def stored(folder):
    return json.loads((folder / "verify.json").read_text())


def refusals(record):
    return [w for w in record if issubclass(w.category, verify.VerificationWarning)]


def test_a_wrong_kernel_is_passed_over_warned_stored_reused_and_listed(verifying):
    args = gn_args()
    ref = GN.reference(*args)
    with wrong("group_norm_act_fwd", off_by_1e2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            y = GN(*args)
            GN(*args)  # decided already: no second check, no second warning
        assert torch.equal(y, ref)  # auto took the next in order, eager: the reference's bytes
        (warning,) = refusals(record)
        message = str(warning.message)
        assert "group_norm_act on cpu disagrees with the reference" in message
        assert "x=fp32[2, 64, 16, 16]" in message and "max error 0.01" in message
        assert verify.STATS["checks"] >= 1
        explained = adm_fast.explain("group_norm_act", *args)
        assert "cpu: not supported: disagreed with the reference on this machine" in explained
        assert "eager: chosen" in explained
        (key, verdict), = stored(verifying).items()
        assert verdict["ok"] is False and (verdict["op"], verdict["impl"]) == ("group_norm_act",
                                                                              "cpu")
        assert verdict["error"] > 9e-3 and verdict["allowed"] < 1e-3
        assert verdict["what"] == "output 0" and verdict["factor"] == GN.verify_factor
        # the key names the machine, torch, the extension's build and the signature
        for part in (verify.device_id(torch.device("cpu")), f"threads={torch.get_num_threads()}",
                     f"torch={torch.__version__}", f"cpu={ops.backends()['cpu'].build_id()}",
                     verdict["call"]):
            assert part in key
        # A later process reads the verdict: the same choice, no check, no warning.
        forget()
        checks = verify.STATS["checks"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(GN(*args), ref)
        assert verify.STATS["checks"] == checks
        from adm_fast.info import report
        listed = report().split("refused by auto here")[1]
        assert "group_norm_act on cpu: group_norm_act(x=fp32[2, 64, 16, 16]" in listed
        # A backend named explicitly runs what was named, checked or not.
        for setting in ("cpu", {"group_norm_act": "cpu"}):
            with adm_fast.use_backend(setting):
                assert (GN(*args) - ref).abs().max() > 5e-3
    # Once the kernel is right again, this build's verdict still holds; a new
    # build is checked again (and passes).
    forget()
    cpu = ops.backends()["cpu"]
    original = cpu.build_id
    cpu.build_id = lambda: original() + "-rebuilt"
    try:
        assert "cpu: chosen" in adm_fast.explain("group_norm_act", *args)
    finally:
        del cpu.build_id
    verdicts = sorted(stored(verifying).values(), key=lambda v: v["build"])
    assert [v["ok"] for v in verdicts] == [False, True]


def test_a_good_implementation_is_checked_once_and_stored(verifying):
    args = gn_args()
    y = GN(*args)
    with adm_fast.use_backend("cpu"):
        assert torch.equal(y, GN(*args))  # auto used the fused kernel
    (verdict,) = stored(verifying).values()
    assert verdict["ok"] is True and verdict["error"] <= verdict["allowed"]
    from adm_fast.info import report
    assert report().endswith("): none")


def test_a_wrong_backward_is_caught_when_the_call_wants_grads(verifying):
    def off_dx(dx, *rest):
        return (dx + 1e-2,) + rest

    args = gn_args(requires_grad=True)
    x = args[0]
    with wrong("group_norm_act_bwd", off_dx):
        with torch.no_grad():  # no backward wanted: the forward is right, cpu runs it
            with adm_fast.use_backend("cpu"):
                fused = GN(*args)
            assert torch.equal(GN(*args), fused)
        with pytest.warns(verify.VerificationWarning, match="grad of x max error"):
            (dx,) = torch.autograd.grad(GN(*args).sum(), x)
        with adm_fast.use_backend("eager"):
            (dx_ref,) = torch.autograd.grad(GN(*args).sum(), x)
        assert torch.equal(dx, dx_ref)
    verdicts = {",grad" in v["call"]: v["ok"] for v in stored(verifying).values()}
    assert verdicts == {False: True, True: False}  # without grads it passed, with them not


def test_a_model_under_auto_equals_the_reference_path(verifying):
    torch.manual_seed(3)
    model = adm_fast.UNetModel(16, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_heads=2,
                               use_scale_shift_norm=True).eval()
    with torch.no_grad():  # not ADM's zeroed output convs: every block must count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad(), wrong("group_norm_act_fwd", off_by_1e2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            auto = model(x, t)
        assert len(refusals(record)) == 1  # one per op and implementation, not per shape
        with adm_fast.use_backend({"group_norm_act": "eager"}):
            assert torch.equal(auto, model(x, t))
        with adm_fast.use_backend({"group_norm_act": "cpu"}):
            assert (model(x, t) - auto).abs().max() > 1e-3  # the kernel is wrong indeed
    refused = [v for v in stored(verifying).values() if not v["ok"]]
    assert len(refused) >= 2 and {v["op"] for v in refused} == {"group_norm_act"}


def test_timed_candidates_are_checked_first(verifying, monkeypatch):
    monkeypatch.setenv("ADM_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_STATE", {"table": None, "path": None})
    timed = []
    monkeypatch.setattr(autotune, "_time_ms", lambda op, impl, args, grad:
                        timed.append(impl.backend) or {"cpu": 1.0, "eager": 5.0}[impl.backend])
    x = (torch.randn(2, 16, 8, 8) + 0.3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 16, 3, 3) / 12, torch.randn(16)
    with torch.no_grad():
        with wrong(("conv3x3_winograd_u", "conv3x3_winograd"), lambda y: y + 1e-2), \
                pytest.warns(verify.VerificationWarning, match="conv3x3 on cpu"):
            y = ops.conv3x3(x, w, b)
        assert timed == [] and torch.equal(y, torch.nn.functional.conv2d(x, w, b, padding=1))
        x2 = x[:1].clone()  # a new signature, the kernel right: checked, timed, chosen
        with adm_fast.use_backend("cpu"):
            fused = ops.conv3x3(x2, w, b)
        assert torch.equal(ops.conv3x3(x2, w, b), fused)
        assert sorted(timed) == ["cpu"] * autotune.ROUNDS + ["eager"] * autotune.ROUNDS


def test_what_cannot_be_checked_is_not_and_not_remembered(verifying):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return GN(*args)

    calls(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in gn_args()))
    with FakeTensorMode() as mode:
        calls(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in gn_args()))
    args = gn_args()
    args[0][0, 0, 0, 0] = float("nan")
    with wrong("group_norm_act_fwd", off_by_1e2):
        y = calls(*args)  # NaN in: the kernel is not judged by it, and runs unchecked
    assert (y[1] - GN.reference(*args)[1]).abs().max() > 5e-3
    assert not (verifying / "verify.json").exists() and not GN._decisions
    args[0][0, 0, 0, 0] = 0.0  # the same signature with values: checked now
    GN(*args)
    assert [v["ok"] for v in stored(verifying).values()] == [True]


def test_a_damaged_table_is_ignored(verifying):
    (verifying / "verify.json").write_text("{not json")
    args = gn_args()
    GN(*args)
    (key, verdict), = stored(verifying).items()
    assert verdict["ok"] is True
    from adm_fast.info import report
    for damage in ("yes", [1], {"ok": "yes", "error": 0, "allowed": 1}, {"ok": False},
                   {"ok": False, "error": 1.0, "allowed": 0.1}):
        (verifying / "verify.json").write_text(json.dumps({key: damage, "other": 3}))
        forget()
        assert report().endswith("): none")
        GN(*args)
        table = stored(verifying)
        assert table[key]["ok"] is True and table["other"] == 3


def test_off_trusts_everything_and_says_so(verifying, monkeypatch):
    monkeypatch.setenv("ADM_FAST_VERIFY", "0")
    args = gn_args()
    with wrong("group_norm_act_fwd", off_by_1e2), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (GN(*args) - GN.reference(*args)).abs().max() > 5e-3  # the risk it takes
    assert not (verifying / "verify.json").exists()
    from adm_fast.info import report
    assert "ADM_FAST_VERIFY=0" in report()


def test_checking_leaves_the_random_state_alone(verifying):
    args = gn_args(requires_grad=True)
    state, checks = torch.get_rng_state(), verify.STATS["checks"]
    GN(*args).sum().backward()
    assert verify.STATS["checks"] > checks and torch.equal(torch.get_rng_state(), state)


def test_the_key_tells_gpus_drivers_and_builds_apart(monkeypatch):
    gpus = {0: ("NVIDIA H100 80GB HBM3", 9, 0), 1: ("NVIDIA A100-SXM4-80GB", 8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name=gpus[i][0], major=gpus[i][1], minor=gpus[i][2]))
    monkeypatch.setattr(verify, "_CUDA", {})
    monkeypatch.setattr(verify, "_driver", lambda: "550.54.14")
    h100, a100 = (verify.device_id(torch.device("cuda", i)) for i in (0, 1))
    assert "H100" in h100 and "sm_90" in h100 and "driver=550.54.14" in h100 and h100 != a100
    monkeypatch.setattr(verify, "_CUDA", {})
    monkeypatch.setattr(verify, "_driver", lambda: "560.28.03")
    assert verify.device_id(torch.device("cuda", 0)) != h100
    triton = ops.backends()["triton"]
    if not triton.unavailable_reasons():
        import triton as t
        assert t.__version__ in triton.build_id()


def test_torch_compile_checks_nothing_and_keeps_known_refusals(verifying):
    args = gn_args()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def compiled():
        torch._dynamo.reset()
        return torch.compile(lambda x: GN(x, *args[1:]), backend=backend, fullgraph=True)

    compiled()(args[0])
    assert "adm_fast.group_norm_act" in graphs[-1]  # the fused kernel, unchecked: no values
    assert not (verifying / "verify.json").exists()
    with wrong("group_norm_act_fwd", off_by_1e2), pytest.warns(verify.VerificationWarning):
        GN(*args)
    compiled()(args[0])  # a refusal this process knows holds for every signature
    assert "adm_fast.group_norm_act" not in graphs[-1] and "group_norm" in graphs[-1]
    torch._dynamo.reset()
