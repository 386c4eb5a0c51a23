"""The top-level `adm-fast` command: --version, every COMMAND --help answers
without running the command, and no flag is accepted by abbreviation."""

import subprocess
import sys
import types

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
    """COMMAND --help prints COMMAND's usage and exits 0. A command without a
    parser of its own (info) is replaced by one that fails if it runs."""
    if name in cli._NO_PARSER:
        module, _, func = cli.COMMANDS[name][0].partition(":")
        fake = types.ModuleType(module)

        def refuse(argv=None):
            raise AssertionError(f"adm-fast {name} --help ran {name}")
        setattr(fake, func or "main", refuse)
        monkeypatch.setitem(sys.modules, module, fake)
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
