"""Every Python name README calls by its dotted path resolves after a plain
`import adm_fast`, which imports no torch (its names load on first use)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# adm_fast.<module>.<name>, and adm_fast.<name>( or [ : what a reader types in
# Python. `python -m adm_fast.x.y` runs a module and is left out.
DOTTED = re.compile(r"(?<![\w.])(?<!-m )adm_fast\.([a-z_]\w*)\.([A-Za-z_]\w*)")
CALLED = re.compile(r"(?<![\w.])adm_fast\.([A-Za-z_]\w*)[(\[]")


def _readme_names():
    text = (ROOT / "README.md").read_text()
    names = {f"{m}.{n}" for m, n in DOTTED.findall(text)}
    return sorted(names | set(CALLED.findall(text)))


def test_readme_finds_the_names_it_should():
    names = _readme_names()
    for want in ("checkpoint.read_diffusion_flags", "sampling.sample_images",
                 "evaluation.Evaluator", "load_checkpoint"):
        assert want in names, names
    assert not any(n.startswith(("demo.", "kernels.")) for n in names), names  # python -m


def test_readme_names_resolve_after_import_adm_fast():
    names = _readme_names()
    code = (
        "import json, sys\n"
        "import adm_fast\n"
        "torch_first = 'torch' in sys.modules\n"
        "bad = {}\n"
        f"for name in {names!r}:\n"
        "    obj = adm_fast\n"
        "    try:\n"
        "        for part in name.split('.'):\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError as e:\n"
        "        bad[name] = str(e)\n"
        "print(json.dumps({'torch_first': torch_first, 'bad': bad}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got == {"torch_first": False, "bad": {}}, got
