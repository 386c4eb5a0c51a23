"""adm_fast's import graph: no cycles and the layer rules (.ci/check_imports.py,
which CI also runs on its own)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_and_the_layers_hold():
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_imports.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycles" in proc.stdout and "layer rules hold" in proc.stdout


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """check_imports reading a toy adm_fast tree, and write(path, text) that adds
    a file to it (and the packages above it)."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import check_imports
    finally:
        sys.path.pop(0)
    pkg = tmp_path / "adm_fast"
    monkeypatch.setattr(check_imports, "PACKAGES", {"adm_fast": pkg})

    def write(path, text=""):
        file = pkg / path
        file.parent.mkdir(parents=True, exist_ok=True)
        for folder in file.relative_to(tmp_path).parents[:-1]:
            (tmp_path / folder / "__init__.py").touch()
        file.write_text(text)
    return check_imports, write


def test_the_checker_finds_a_cycle(toy):
    """The walker itself: a two-module cycle through a function-local import."""
    checker, write = toy
    write("a.py", "from . import b\n")
    write("b.py", "def f():\n    from .a import thing\n")
    graph = checker.edges(checker.modules())
    assert checker.cycles(graph) == [["adm_fast.a", "adm_fast.b"]]


def test_the_checker_names_a_broken_layer_rule(toy, capsys):
    """An op module reaching up into the models inside a function, a kernel
    loading the op layer through importlib, sampling importing train: each is
    named by file, line and rule (none of them closes a cycle); imports down
    the layers pass."""
    checker, write = toy
    write("models/unet.py", "from ..ops import conv\n")
    write("models/blocks.py", "import torch\n")
    write("ops/conv.py", "import torch\nfrom adm_fast.kernels import conv as k\n\n\n"
          "def f():\n    from adm_fast.models.blocks import Block\n")
    write("kernels/conv.py", "import importlib\n"
          "ops = importlib.import_module(f'adm_fast.ops.{1}')\n")
    write("train/loop.py", "from adm_fast.models import unet\n")
    write("sampling/cli.py", "from ..train import loop\nfrom ..models import unet\n")
    found = checker.layer_violations(checker.modules())
    assert [line.split(": breaks")[0] for line in found] == [
        "adm_fast/kernels/conv.py:2: adm_fast.kernels.conv imports adm_fast.ops",
        "adm_fast/ops/conv.py:6: adm_fast.ops.conv imports adm_fast.models.blocks",
        "adm_fast/sampling/cli.py:1: adm_fast.sampling.cli imports adm_fast.train.loop"]
    assert "'adm_fast.kernels imports only from adm_fast.kernels'" in found[0]
    assert "'adm_fast.ops imports only from adm_fast.ops, adm_fast.kernels, adm_fast.io'" in found[1]
    assert "'adm_fast.sampling imports nothing from adm_fast.train'" in found[2]
    assert all("(" in line and line.endswith(")") for line in found)  # the reason
    assert not checker.cycles(checker.edges(checker.modules()))
    assert checker.main() == 1  # CI's exit status
    assert capsys.readouterr().out.splitlines() == found


def test_the_io_layer_imports_nothing_of_adm_fast(toy):
    checker, write = toy
    write("io.py", "import os\n\n\ndef f():\n    import adm_fast\n")
    (found,) = checker.layer_violations(checker.modules())
    assert found.startswith("adm_fast/io.py:5: adm_fast.io imports adm_fast: breaks the rule "
                            "'adm_fast.io imports only from adm_fast.io'")
