"""The top-level `adm-fast` command: --version, every COMMAND --help answers
without running the command, and no flag is accepted by abbreviation."""

import importlib
import subprocess
import sys

import pytest

import adm_fast
from adm_fast import cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adm-fast {adm_fast.__version__}"


def test_version_from_the_installed_command():
    proc = subprocess.run([sys.executable, "-m", "adm_fast.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"adm-fast {adm_fast.__version__}"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_is_answered_by_a_parser(name, capsys, monkeypatch):
    """COMMAND --help prints COMMAND's usage and exits 0. A command whose
    parser lives in its own module (info) is replaced by one that fails if it
    runs."""
    module, _, func = cli.COMMANDS[name][0].partition(":")
    if module == cli.PARSERS.get(name, "").partition(":")[0]:
        def refuse(argv=None):
            raise AssertionError(f"adm-fast {name} --help ran {name}")
        monkeypatch.setattr(importlib.import_module(module), func or "main", refuse)
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as e:  # argparse's own exit, as the installed command gives it
        rc = e.code or 0
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(f"usage: adm-fast {name}"), out[:200]


def test_info_refuses_stray_flags(capsys):
    assert cli.main(["info", "--verbose"]) == 2
    assert "unrecognized arguments: --verbose" in capsys.readouterr().err


def test_info_retune_runs_from_the_command(tmp_path, monkeypatch, capsys):
    """`adm-fast info --retune` reaches info's own flag (the command once
    answered every info flag with a parser that knew none)."""
    monkeypatch.setenv("ADM_FAST_CACHE", str(tmp_path))
    assert cli.main(["info", "--retune"]) == 0
    assert "autotune: dropped 0 stored choices of this machine" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--vers"], "unknown option '--vers'"),
    (["--hel"], "unknown option '--hel'"),
    (["sampel"], "unknown command 'sampel'"),
])
def test_top_level_takes_no_abbreviations(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_sample_takes_no_abbreviations(capsys, tmp_path):
    """`--num_sample 2` once ran as --num_samples (with 1000 steps)."""
    rc = cli.main(["sample", "--model_path", "x.pt", "--num_sample", "2",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognized arguments: --num_sample 2" in err, err
    assert not (tmp_path / "o").exists()


def test_demo_takes_no_abbreviations(capsys):
    assert cli.main(["demo", "--step", "3"]) == 2
    assert "unrecognized arguments: --step" in capsys.readouterr().err
