"""What the tests share that is not a fixture: the device, whether the CPU
extension is built, guided-diffusion's recorded reference cases and how to
build and run them, and the comparison rules. Test files import it by name
(`from helpers import ...`): pytest puts tests/ on sys.path for the rootdir
conftest.py, which sets the environment (OpenMP, Triton's interpreter, the
verify cache) before any test file, and so this module, imports adm_fast."""

import contextlib
from pathlib import Path

import torch

from adm_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_EXT = not ops.backends()["cpu"].unavailable_reasons()

REF = Path(__file__).parent / "reference"
NUMERIC_CASES = sorted(p.stem for p in (REF / "numeric").glob("*.pt"))
MANIFESTS = sorted(p.stem for p in (REF / "manifests").glob("*.json"))


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
