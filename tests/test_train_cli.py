"""`adm-fast train` / `train-classifier` as a user meets them: --help, exact
flag names, classes from the data, the diffusion flags kept with the weights,
log lines beside a progress bar, one-line errors."""

import json
import re

import pytest
import torch
from test_checkpoint_files import _full_disk

import adm_fast.cli
from adm_fast import checkpoint as ckpt
from adm_fast.checkpoint import read_class_names, read_diffusion_flags
from adm_fast.train import make_image_folder, train, train_classifier
from adm_fast.train.config import defaults, parse, parser

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", num_head_channels=16, diffusion_steps=50,
            num_workers=0, progress=False, batch_size=4, max_steps=1, ema_rate="0.9")
TINY_CLS = dict(image_size=8, classifier_width=32, classifier_depth=1,
                classifier_channel_mult="1,2", classifier_attention_resolutions="4",
                diffusion_steps=50, num_workers=0, progress=False, batch_size=4, max_steps=1)
CLASSES = ("dog", "ant", "eel", "bee")


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    path = tmp_path_factory.mktemp("four")
    make_image_folder(path, 8, 8, classes=CLASSES, seed=3)
    return path


def _argv(command, flags):
    out = [command]
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_every_flag_has_a_help_line_and_its_default(kind):
    p = parser(kind)
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} == set(defaults(kind))
    for a in options:
        assert a.help and len(a.help) > 25 and "(default: " in a.help, a.dest
        assert a.help.endswith(f"(default: {json.dumps(a.default) if isinstance(a.default, str) else a.default})")
    text = p.format_help()
    assert "EXTRA" not in text
    titles = [g.title for g in p._action_groups]
    assert any("guided-diffusion's diffusion flags" in t for t in titles)
    assert any(t.startswith("training (guided-diffusion's") for t in titles)
    assert "adm_fast's additions" in titles
    assert "--num_classes" in text and "--allow_upscale" in text


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_abbreviations_are_refused(kind, capsys):
    with pytest.raises(SystemExit) as e:
        parse(kind, ["--data_dir", "x", "--log_interv", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --log_interv" in capsys.readouterr().err
    assert parse(kind, ["--data_dir", "x", "--log_interval", "3"])["log_interval"] == 3


def test_classes_come_from_the_data_and_are_stored(four_classes, tmp_path):
    log_dir = tmp_path / "run"
    train(**TINY, class_cond=True, data_dir=str(four_classes), log_dir=str(log_dir))
    names = sorted(CLASSES)
    for f in ("model000001.safetensors", "ema_0.9_000001.safetensors"):
        model = adm_fast.load_checkpoint(log_dir / f)
        assert model.num_classes == 4 and model.label_emb.weight.shape[0] == 4
        assert read_class_names(log_dir / f) == names and model.class_names == names
    state = torch.load(log_dir / "state000001.pt", weights_only=True)
    assert state["classes"] == names
    # Resume keeps the stored mapping: a class that appeared since is an error, not
    # a silent renumbering of the others.
    make_image_folder(four_classes / "new", 1, 8, classes=("cow",), seed=9)
    try:
        with pytest.raises(ValueError, match="class 'cow'.*not among the given classes"):
            train(**{**TINY, "max_steps": 2}, class_cond=True, data_dir=str(four_classes),
                  log_dir=str(log_dir))
    finally:
        (four_classes / "new" / "cow_00000.png").unlink()
        (four_classes / "new").rmdir()
    train(**{**TINY, "max_steps": 2}, class_cond=True, data_dir=str(four_classes),
          log_dir=str(log_dir))
    assert read_class_names(log_dir / "model000002.safetensors") == names


def test_num_classes_flag_overrides_and_the_classifier_infers(four_classes, tmp_path, capsys):
    train(**TINY, class_cond=True, num_classes=10, data_dir=str(four_classes),
          log_dir=str(tmp_path / "ten"))
    assert adm_fast.load_checkpoint(tmp_path / "ten" / "model000001.safetensors").num_classes == 10
    code = adm_fast.cli.main(_argv("train", {**TINY, "class_cond": True, "num_classes": 3,
                                             "data_dir": four_classes,
                                             "log_dir": tmp_path / "three"}))
    assert code == 2 and "--num_classes 3 is fewer than the 4 classes" in capsys.readouterr().err
    train_classifier(**TINY_CLS, data_dir=str(four_classes), log_dir=str(tmp_path / "clf"))
    clf = adm_fast.load_checkpoint(tmp_path / "clf" / "model000001.safetensors")
    assert clf.out_channels == 4 and clf.class_names == sorted(CLASSES)


def test_diffusion_flags_are_stored_with_every_weights_file(four_classes, tmp_path):
    log_dir = tmp_path / "run"
    gd = dict(diffusion_steps=50, noise_schedule="cosine", learn_sigma=True,
              rescale_learned_sigmas=True, timestep_respacing="", use_kl=False,
              predict_xstart=False, rescale_timesteps=True)
    train(**{**TINY, **gd}, data_dir=str(four_classes), log_dir=str(log_dir))
    for f in ("model000001.safetensors", "ema_0.9_000001.safetensors"):
        assert read_diffusion_flags(log_dir / f) == gd
    classifier_dir = tmp_path / "clf"
    train_classifier(**TINY_CLS, data_dir=str(four_classes), log_dir=str(classifier_dir))
    assert read_diffusion_flags(classifier_dir / "model000001.safetensors")["diffusion_steps"] == 50


def test_log_lines_print_above_the_progress_bar(four_classes, tmp_path, capsys):
    train(**{**TINY, "progress": True, "max_steps": 3, "log_interval": 1},
          data_dir=str(four_classes), log_dir=str(tmp_path))
    err = capsys.readouterr().err
    logged = [line for line in err.split("\n") if "step=" in line]
    assert len(logged) == 3
    for line in logged:
        shown = line.split("\r")[-1]  # what a terminal keeps of the line
        assert re.match(r"\d\d:\d\d:\d\d step=\d", shown), repr(line)
    assert "it/s" in err or "step/s" in err or "s/step" in err  # the bar was drawn


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_too_small_is_one_line_with_the_cli_flag(four_classes, tmp_path, capsys,
                                                          workers):
    argv = _argv("train", {**TINY, "image_size": 16, "num_workers": workers,
                           "data_dir": four_classes, "log_dir": tmp_path})
    assert adm_fast.cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert not [ln for ln in lines if not re.match(r"\d\d:\d\d:\d\d ", ln)][1:], lines
    err = lines[-1]  # one line, after the run's log lines
    assert err.startswith("adm-fast train: error: ") and str(four_classes) in err, lines
    assert "8x8, smaller than image_size=16" in err and "--allow_upscale True" in err


def test_a_full_disk_is_one_line(four_classes, tmp_path, capsys, monkeypatch):
    _full_disk(monkeypatch, after=1000)
    argv = _argv("train", {**TINY, "data_dir": four_classes, "log_dir": tmp_path})
    assert adm_fast.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"adm-fast train: error: disk full: cannot write {tmp_path}"), err
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_full_disk_while_logging_says_so(tmp_path, monkeypatch):
    import builtins
    import errno

    from adm_fast.train import metrics

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    m = metrics.Metrics(str(tmp_path))
    m.add("grad_norm", 1.0)
    monkeypatch.setattr(metrics, "open", lambda *a, **k: Full(builtins.open(*a, **k)),  # noqa: SIM115 (Full closes it)
                        raising=False)
    with pytest.raises(ckpt.DiskFullError, match="disk full: cannot write .*progress.jsonl"):
        m.dump(1)
