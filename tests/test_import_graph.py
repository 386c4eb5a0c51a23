"""No import cycles among adm_fast's modules (.ci/check_imports.py, which CI
also runs on its own)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles():
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_imports.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycles" in proc.stdout


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    """The walker itself: a two-module cycle through a function-local import."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import check_imports
    finally:
        sys.path.pop(0)
    pkg = tmp_path / "adm_fast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import thing\n")
    monkeypatch.setattr(check_imports, "PACKAGES", {"adm_fast": pkg})
    graph = check_imports.edges(check_imports.modules())
    assert check_imports.cycles(graph) == [["adm_fast.a", "adm_fast.b"]]
