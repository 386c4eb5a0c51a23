import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from adm_fast.cli import openmp_defaults  # imports no torch

# The suite's processes wait as adm-fast's commands do (a short OpenMP spin,
# set before torch loads libgomp): on a machine shared with other work, long
# spins take the cores the tests need.
openmp_defaults()

import torch  # noqa: E402  (imports no Triton)

# Tests pick backends explicitly; a user's setting must not leak in. Choices
# timed at run time would differ between runs: the tests take the static order
# (test_autotune.py tests the timing itself).
os.environ.pop("ADM_FAST_BACKEND", None)
os.environ["ADM_FAST_AUTOTUNE"] = "0"
# Auto checks implementations against the reference before it uses them
# (ops/verify.py), in the tests as for users; the verdicts go to a folder of
# this process's (subprocesses inherit it), so no run depends on an earlier
# one or on the user's cache.
os.environ.pop("ADM_FAST_VERIFY", None)
os.environ["ADM_FAST_CACHE"] = tempfile.mkdtemp(prefix="adm_fast_tests_")
atexit.register(shutil.rmtree, os.environ["ADM_FAST_CACHE"], True)
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; it
# must be on before the kernels are defined (before adm_fast is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under pytest-xdist the workers share the cores: each takes its share of the
# threads, so that compute-bound tests do not oversubscribe the machine while
# the single-threaded ones (Triton's interpreter, nvcc, subprocesses) overlap.
# The share of torch's own default, not of os.cpu_count(): in a container that
# counts the host's cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads()
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _cpu_ext() -> bool:
    from adm_fast import ops

    return not ops.backends()["cpu"].unavailable_reasons()


CPU_EXT = _cpu_ext()

REF = Path(__file__).parent / "reference"
NUMERIC_CASES = sorted(p.stem for p in (REF / "numeric").glob("*.pt"))
MANIFESTS = sorted(p.stem for p in (REF / "manifests").glob("*.json"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, in fp64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def load_case(name: str) -> dict:
    return torch.load(REF / "numeric" / f"{name}.pt", weights_only=True)


def case_inputs(case: dict) -> dict:
    kind = case["flags"]["kind"]
    kw = {}
    if "y" in case and kind != "classifier":
        kw["y"] = case["y"]
    if "low_res" in case:
        kw["low_res"] = case["low_res"]
    return kw


def build_case(case: dict, **overrides):
    from adm_fast.script_util import create_from_flags

    flags = {k: v for k, v in case["flags"].items() if k != "kind"}
    model = create_from_flags(case["flags"]["kind"], {**flags, **overrides})
    model.load_state_dict(case["state_dict"], strict=True)
    return model.eval()


def run_case(model, case: dict, x: torch.Tensor = None):
    """The model's output and, for classifiers, ∂/∂x Σ log p(y|x)."""
    x = (case["x"] if x is None else x).detach().clone()
    if case["flags"]["kind"] != "classifier":
        return model(x, case["t"], **case_inputs(case)), None
    x.requires_grad_(True)
    logits = model(x, case["t"])
    log_p = torch.log_softmax(logits.float(), dim=-1)
    selected = log_p[torch.arange(len(logits)), case["y"]].sum()
    (grad,) = torch.autograd.grad(selected, x)
    return logits, grad


@contextlib.contextmanager
def poisoned():
    """Tensors allocated with torch.empty/empty_like start as NaN, so output
    elements a kernel fails to write show up."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def launched_pointers(module, monkeypatch):
    """A list that fills, as the launchers in kernel module `module` run, with
    (kernel name, the data pointers of its tensor arguments) per launch (the
    kernels still run): a tensor passed in place, not copied, shows up by its
    pointer."""
    launches = []
    real = module.wrap_triton

    def wrap(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launches.append((kernel.fn.__name__, {a.data_ptr() for a in args
                                                          if isinstance(a, torch.Tensor)}))
                    return launcher[grid](*args, **kwargs)
                return run
        return Grid()

    monkeypatch.setattr(module, "wrap_triton", wrap)
    return launches


def max_err(out, ref) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def assert_lowp_close(out, ref64, torch_lowp, what=""):
    """flash-attention's rule: at most twice the error torch itself makes at
    that precision (plus a hair for exact-zero cases)."""
    err, base = max_err(out, ref64), max_err(torch_lowp, ref64)
    assert err <= 2 * base + 1e-6 * ref64.abs().max().item(), (what, err, base)


def assert_grads_close(grads, ref_grads, tol):
    """Per tensor, relative to its own scale, with a floor at 1e-2 of the largest
    gradient: some gradients are zero in exact arithmetic (a conv bias right
    before a GroupNorm) and hold only rounding noise (~1e-7 of the largest)."""
    floor = 1e-2 * max(r.abs().max().item() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            scale = max(r.abs().max().item(), floor)
            assert (g - r).abs().max().item() <= tol * scale
