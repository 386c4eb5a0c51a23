"""adm-fast bench: the guided-sampling benchmark on the tiny layout (timing,
validation against eager, table, CSV), its input errors, the FLOP count, and
the op/training benchmark pass-through."""

import csv
import re
from pathlib import Path

import pytest
import torch

from adm_fast.benchmarks import cli
from adm_fast.benchmarks.flops import step_flops
from adm_fast.benchmarks.layouts import TINY, BenchInputError, backend_settings
from adm_fast.benchmarks.sample import TABLE_KEYS
from adm_fast.script_util import create_from_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_sample_bench_validates_prints_and_appends(tmp_path, capsys, restore_threads):
    # An older row with fewer columns: it must survive, and the file gain columns.
    csv_path = tmp_path / "sample_cpu.csv"
    csv_path.write_text("date,commit,preset\n2020-01-01T00:00Z,old,tiny\n")
    rc = cli.main(["sample", "--preset", "tiny", "--batch_size", "2", "--steps", "3",
                   "--repeats", "1", "--backends", "auto", "--seed", "3",
                   # One thread: on a CPU shared with other jobs, OpenMP workers of
                   # two would wait on each other (seconds per step instead of 0.2 s).
                   "--threads", "1",
                   "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out

    lines = [ln for ln in out.splitlines() if ln.startswith("validation")]
    assert len(lines) == 1 and "adm_fast[auto] vs eager" in lines[0], out
    diffs = [float(v) for v in re.findall(r"max\|Δ\| ([0-9.e+-]+)", lines[0])]
    assert len(diffs) == 2 and all(0 <= d <= 1e-3 for d in diffs), lines[0]
    assert "3-step loop" in lines[0]

    header = next(ln for ln in out.splitlines() if ln.startswith("preset "))
    assert header.split() == TABLE_KEYS
    table_rows = [ln.split() for ln in out.splitlines() if ln.startswith("tiny ")]
    assert [r[TABLE_KEYS.index("impl")] for r in table_rows] == ["eager", "adm_fast[auto]"]
    for r in table_rows:
        assert float(r[TABLE_KEYS.index("ms_per_step")]) > 0
        assert float(r[TABLE_KEYS.index("img_per_s")]) > 0
        assert r[TABLE_KEYS.index("MFU%")] == "-"  # no peak is known for a CPU

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["commit"] for r in rows][0] == "old" and len(rows) == 3
    for key in ("device", "commit", "date", "torch", "triton", "impl", "ms_per_step",
                "img_per_s", "GFLOP_per_img_step", "step_max_abs_diff", "loop_max_abs_diff"):
        assert rows[1][key] and rows[2][key], key
    assert rows[1]["torch"] == torch.__version__ and rows[2]["batch"] == "2"
    assert rows[1]["backend"] == "eager" and rows[2]["backend"] == "auto"
    assert float(rows[2]["loop_max_abs_diff"]) == diffs[1]
    assert float(rows[2]["GFLOP_per_img_step"]) > 1


@pytest.mark.parametrize("argv, message", [
    (["sample", "--preset", "nope"], "unknown preset 'nope'"),
    (["sample", "--preset", "64x64_classifier"], "unknown preset '64x64_classifier'"),
    (["sample", "--preset", "tiny", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["sample", "--batch_size", "two"], "invalid int value"),
    (["sample", "--preset", "tiny", "--steps", "0"], "--steps must be at least 1"),
    (["sample", "--preset", "tiny", "--backends", "warp"], "unknown backend 'warp'"),
    (["sample", "--preset", "tiny", "--guidance", "-1"], "--guidance must be >= 0"),
    (["sample", "--preset", "tiny", "--threads", "0"], "--threads must be at least 1"),
    (["sample", "--preset", "lsun_cat", "--guidance", "1"], "no paired classifier"),
    (["sample", "--preset", "tiny", "64x64_diffusion", "--model_path", "m.pt"],
     "exactly one --preset"),
    (["sampel"], "unknown benchmark 'sampel'"),
    (["ops", "attention"], "unknown op benchmark 'attention'"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adm-fast bench: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_explicit_backend_that_cannot_run_here_is_an_input_error():
    if torch.cuda.is_available():
        pytest.skip("the CUDA backend can run on a GPU machine")
    with pytest.raises(BenchInputError, match="backend 'cuda' cannot run on cpu"):
        backend_settings(["cuda"], torch.device("cpu"), torch.float32)


def test_default_backends_are_auto_and_what_auto_could_pick():
    settings = dict(backend_settings(None, torch.device("cpu"), torch.float32))
    assert "adm_fast[auto]" in settings and "adm_fast[eager]" not in settings
    # The tests define the Triton kernels for its interpreter: auto never picks it.
    assert "adm_fast[triton]" not in settings
    assert settings["adm_fast[sdpa]"] == {"qkv_attention": "sdpa"}


def _meta_models():
    with torch.device("meta"):
        flags = {k: v for k, v in TINY.model_flags.items()
                 if k not in ("diffusion_steps", "noise_schedule")}
        return (create_from_flags("unet", flags).eval(),
                create_from_flags("classifier", TINY.classifier_flags).eval())


def test_flop_count_is_plausible_and_scales_with_batch():
    unet, clf = _meta_models()  # shapes only: counting needs no arithmetic
    counts = {}
    for b in (1, 2):
        x = torch.randn(b, 3, 32, 32, device="meta")
        t = torch.zeros(b, dtype=torch.long, device="meta")
        y = torch.zeros(b, dtype=torch.long, device="meta")
        counts[b] = step_flops(unet, x, t, {"y": y}, clf, y)
    assert all(counts[2][k] == 2 * counts[1][k] for k in ("unet", "classifier", "total"))
    one = counts[1]
    assert one["total"] == one["unet"] + one["classifier"]
    # Every weight is used at least once and at most at every pixel (2 FLOPs/MAC).
    params = sum(p.numel() for p in unet.parameters())
    assert 2 * params < one["unet"] < 2 * params * 32 * 32
    clf_params = sum(p.numel() for p in clf.parameters())
    # Forward plus the backward to the input: about twice the forward's FLOPs.
    assert 2 * 2 * clf_params < one["classifier"] < 3 * 2 * clf_params * 32 * 32
    no_clf = step_flops(unet, x[:1], t[:1], {"y": y[:1]})
    assert no_clf["classifier"] == 0 and no_clf["unet"] == one["unet"]


def test_results_go_to_the_current_folder_unless_told(tmp_path, monkeypatch, capsys,
                                                     restore_threads):
    """The installed command writes where the user says (--results), by default
    the current folder: never into the repository's tracked bench/results."""
    monkeypatch.chdir(tmp_path)
    before = sorted((REPO / "bench" / "results").iterdir())
    assert cli.main(["sample", "--preset", "tiny", "--batch_size", "1", "--steps", "2",
                     "--repeats", "1", "--backends", "auto", "--threads", "1"]) == 0
    assert (tmp_path / "sample_cpu.csv").is_file()
    assert sorted((REPO / "bench" / "results").iterdir()) == before
    capsys.readouterr()


def test_ops_run_in_process_with_their_flags(capsys):
    assert cli.main(["ops", "diffusion_step", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: adm-fast bench ops diffusion_step" in out and "--compile" in out
    assert "--results" in out
    assert cli.main(["ops", "nope"]) == 2
    assert "unknown op benchmark 'nope'" in capsys.readouterr().err
