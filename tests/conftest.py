import os
from pathlib import Path

import pytest
import torch

# Tests pick backends explicitly; a user's setting must not leak in.
os.environ.pop("ADM_FAST_BACKEND", None)

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
