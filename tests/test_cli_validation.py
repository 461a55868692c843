"""Every command-line value is checked before the expensive part (issue 12, item 5).

Each bad value must give exit status 2, one line ``fewstep CMD: error: ...`` naming the argument
and the value, no traceback, and no work: the loaders and runners are replaced by functions that
fail the test if they are called, and no output folder may appear.  ``OSError`` while working is
one line naming the path (status 1), Ctrl-C says what was saved (status 130), and an exception
from the user's own model code keeps its traceback.  Everything runs in-process through
``fewstep.cli.main`` and takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep.cli as cli
from fewstep.cli import main


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although the arguments were bad")

    return fail


@pytest.fixture
def no_work(monkeypatch):
    """Every expensive entry point of the three commands fails the test if it is reached."""
    import fewstep.distill
    import fewstep.distill.cli as dcli
    import fewstep.eval.model_spec
    import fewstep.eval.report
    import fewstep.models.embedded
    import fewstep.samplers.tuning

    for mod, name in [(fewstep.eval.report, "run_report"), (fewstep.eval.model_spec, "resolve_model"),
                      (cli, "_tune_model"), (fewstep.samplers.tuning, "tune"), (fewstep.models.embedded, "digits_denoiser"),
                      (dcli, "_load_teacher"), (dcli, "_load_data"), (fewstep.distill, "Distiller")]:
        monkeypatch.setattr(mod, name, _forbidden(f"{mod.__name__}.{name}"))


def _err(capsys, argv, code=2):
    got = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out
    assert got == code, out.err
    return out.err


def _expect(capsys, argv, *needles, code=2):
    err = _err(capsys, argv, code)
    cmd = argv[0]
    assert f"fewstep {cmd}: error:" in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def files(tmp_path):
    """Paths for the tests: a regular file, an empty folder, bad image folders, a stub teacher."""
    from PIL import Image

    f = tmp_path / "a_file"
    f.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad_images"
    bad.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / f"ok{i}.png")
    (bad / "broken.png").write_text("not an image")
    mixed = tmp_path / "mixed_sizes"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mixed / "b.png")
    teacher = tmp_path / "teacher"
    (teacher / "unet").mkdir(parents=True)
    (teacher / "scheduler").mkdir()
    (teacher / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 1, "sample_size": 8}))
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    notzip = tmp_path / "stats.npz"
    notzip.write_text("not a zip")
    text_teacher = tmp_path / "text_teacher"  # a text-to-image pipeline folder (configs only: nothing is loaded)
    for sub in ("unet", "scheduler", "vae", "tokenizer", "text_encoder"):
        (text_teacher / sub).mkdir(parents=True)
    (text_teacher / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 8}))
    (text_teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    captions = tmp_path / "captions"
    captions.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(captions / f"{i}.png")
        (captions / f"{i}.txt").write_text("a red square")
    half = tmp_path / "half_captions"
    half.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(half / f"{i}.png")
    (half / "0.txt").write_text("a red square")
    return {"file": f, "empty": empty, "bad": bad, "mixed": mixed, "teacher": teacher, "notzip": notzip, "out": tmp_path / "out",
            "text_teacher": text_teacher, "captions": captions, "half": half}


# ---------------------------------------------------------------------------------------------
# fewstep report
# ---------------------------------------------------------------------------------------------

REPORT_CASES = [
    # (arguments, words the message must contain)
    (["--seed", "-1"], ["--seed", "'-1'"]),
    (["--seed", "abc"], ["--seed", "'abc'"]),
    (["--seed", "1.5"], ["--seed", "'1.5'"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--nfe", "0"], ["--nfe", "'0'", "positive"]),
    (["--nfe=-4,8"], ["--nfe", "-4"]),
    (["--nfe", "abc"], ["--nfe", "'abc'"]),
    (["--nfe", "4,8,4"], ["--nfe", "NFE 4", "more than once"]),
    (["--nfe", ","], ["--nfe"]),
    (["--num-samples", "0"], ["--num-samples", "'0'"]),
    (["--num-samples", "1"], ["--num-samples", ">= 2"]),
    (["--batch-size", "0"], ["--batch-size", "'0'"]),
    (["--batch-size", "-5"], ["--batch-size", "'-5'"]),
    (["--samplers", "dpmpp2m"], ["--samplers", "'dpmpp2m'", "did you mean 'dpmpp_2m'"]),
    (["--samplers", "ddim,ddim"], ["--samplers", "ddim", "more than once"]),
    (["--samplers", ","], ["--samplers"]),
    (["--device", "foo"], ["--device", "'foo'", "not a device"]),
    (["--device", "cuda:x"], ["--device", "'cuda:x'"]),
    (["--device", "meta"], ["--device", "'meta'", "cannot run on"]),
    (["--no-fid", "--no-exact"], ["--no-fid", "--no-exact"]),
    (["--no-fid", "--reference", "digits:test"], ["--reference", "--no-fid"]),
    (["--no-fid", "--device", "cpu", "--model", "embedded"], ["--model", "--device", "--no-fid"]),
    (["--model", "{empty}"], ["--model", "{empty}", "model_index.json"]),
    (["--model", "{file}"], ["--model", "{file}", "is a file"]),
    (["--model", "{out}/no_such_pipeline"], ["--model", "no_such_pipeline", "no such folder"]),
    (["--model", "no_such_module_xyz:den", "--reference", "digits:test"], ["--model", "no_such_module_xyz", "no module"]),
    (["--model", "fewstep:"], ["--model", "module:attribute"]),
    (["--model", "fewstep.eval.exact:default_schedule"], ["--model", "needs --reference"]),
    (["--shape", "1,8,8"], ["--shape", "embedded"]),
    (["--shape", "0,8"], ["--shape", "'0,8'"]),
    (["--extractor", "incepton"], ["--extractor", "'incepton'", "did you mean"]),
    (["--extractor", "no_such_module_xyz:feats"], ["--extractor", "no_such_module_xyz"]),
    (["--inception-path", "{file}"], ["--inception-path", "--extractor"]),
    (["--reference", "{empty}"], ["--reference", "{empty}", "no image files"]),
    (["--reference", "{bad}"], ["--reference", "broken.png", "1 of 4"]),
    (["--reference", "{mixed}"], ["--reference", "digits extractor", "takes 1x8x8", "1x16x16"]),
    (["--reference", "{out}/missing.npz"], ["--reference", "missing.npz", "no such file"]),
    (["--reference", "{notzip}"], ["--reference", "stats.npz", "not a readable .npz statistics file"]),
    (["--reference", "{file}"], ["--reference", "a_file", "is a file"]),
    (["--reference", "digits:val"], ["--reference", "'digits:val'", "digits:test"]),
    (["--reference", "{out}/nowhere"], ["--reference", "nowhere", "no such folder"]),
    (["--out", "{file}"], ["--out", "a_file", "not a folder"]),
    (["--out", "{file}/sub"], ["--out", "a_file", "not a folder"]),
    (["--no-fid", "--out", "{file}"], ["--out", "a_file"]),
    (["--run-dir", "{file}"], ["--run-dir", "a_file"]),
]


@pytest.mark.parametrize("argv,needles", REPORT_CASES, ids=[" ".join(a) for a, _ in REPORT_CASES])
def test_report_rejects_before_any_work(argv, needles, files, no_work, capsys):
    fill = {k: str(v) for k, v in files.items()}
    argv = [a.format(**fill) for a in argv]
    needles = [n.format(**fill) for n in needles]
    out = files["out"] if "--out" not in argv else None
    _expect(capsys, ["report", *(["--out", str(files["out"])] if out else []), "--quiet", *argv], *needles)
    assert not files["out"].exists()


def test_report_device_without_gpu_and_with_too_few(monkeypatch, files, no_work, capsys):
    out = ["--out", str(files["out"]), "--quiet"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect(capsys, ["report", "--device", "cuda", *out], "--device 'cuda'", "no CUDA device is available; use --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _expect(capsys, ["report", "--device", "cuda:3", *out], "--device 'cuda:3'", "1 CUDA device", "cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _expect(capsys, ["report", "--device", "cuda:2", *out], "2 CUDA devices", "cuda:0 to cuda:1")
    assert not files["out"].exists()


@pytest.mark.parametrize("extra", [[], ["--no-fid"]])
def test_report_out_that_cannot_be_written(extra, monkeypatch, files, no_work, capsys):
    """Writability is tried with a probe file (root passes os.access even on a read-only mount)."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _expect(capsys, ["report", "--out", str(files["out"]), "--quiet", *extra], "--out", str(files["out"]), "cannot write",
            "Permission denied")
    assert not files["out"].exists()


def test_report_inception_weights_missing_is_an_early_error(monkeypatch, files, no_work, capsys):
    from fewstep.eval import features as F

    monkeypatch.setenv(F.INCEPTION_ENV, str(files["out"] / "nowhere"))
    _expect(capsys, ["report", "--extractor", "inception", "--out", str(files["out"]), "--quiet"], "--extractor",
            F.INCEPTION_FILE, F.INCEPTION_ENV)
    _expect(capsys, ["report", "--extractor", "inception-tf", "--inception-path", str(files["empty"]), "--out",
                     str(files["out"]), "--quiet"], F.INCEPTION_FILE, str(files["empty"]))
    assert not files["out"].exists()


def test_report_unwritable_statistics_cache(monkeypatch, files, no_work, capsys):
    monkeypatch.setenv("FEWSTEP_CACHE", str(files["file"] / "cache"))
    _expect(capsys, ["report", "--out", str(files["out"]), "--quiet"], "reference-statistics cache", "FEWSTEP_CACHE")
    assert not files["out"].exists()


def test_run_report_checks_its_arguments_before_work(tmp_path, monkeypatch):
    """The Python entry point checks what it is given too (before creating anything)."""
    from fewstep.eval.report import run_report

    monkeypatch.setattr("fewstep.eval.exact.ExactStudy.make", _forbidden("ExactStudy.make"))
    (tmp_path / "f").write_text("x")
    for kwargs, match in [({"seed": -1}, "seed"), ({"num_samples": 1}, "num_samples"), ({"nfes": [4, 4]}, "nfes"),
                          ({"batch_size": 0}, "batch_size"), ({"out_dir": tmp_path / "f"}, "out_dir")]:
        with pytest.raises(ValueError, match=match):
            run_report(**{"out_dir": tmp_path / "r", "fid": False, "progress": False, **kwargs})
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# fewstep tune
# ---------------------------------------------------------------------------------------------

TUNE_CASES = [
    (["--seed", "-1"], ["--seed", "'-1'"]),
    (["--seed", "x"], ["--seed", "'x'"]),
    (["--nfe", "0"], ["--nfe", "'0'"]),
    (["--nfe", "-2"], ["--nfe", "'-2'"]),
    (["--nfe", "abc"], ["--nfe", "'abc'"]),
    (["--num-trajectories", "7"], ["--num-trajectories", "'7'", ">= 8"]),
    (["--num-trajectories", "0"], ["--num-trajectories", "'0'"]),
    (["--sampler", "unipc3"], ["--sampler", "'unipc3'", "did you mean"]),
    (["--sampler", "dpmpp_2m_sde"], ["--sampler", "'dpmpp_2m_sde'", "cannot be tuned"]),
    (["--sampler", "lcm"], ["--sampler", "'lcm'", "cannot be tuned"]),
    (["--ingredients", "grid,orderz"], ["--ingredients", "'orderz'", "did you mean 'orders'"]),
    (["--ingredients", "times"], ["--ingredients", "times", "coefficients"]),
    (["--ingredients", "grid,grid"], ["--ingredients", "grid", "more than once"]),
    (["--ingredients", ""], ["--ingredients"]),
    (["--model", "{out}/missing"], ["--model", "missing", "no such folder"]),
    (["--model", "{file}"], ["--model", "a_file", "is a file"]),
    (["--model", "{empty}"], ["--model", "model_index.json"]),
    (["--model", "no_such_module_xyz:den"], ["--model", "no_such_module_xyz", "no module"]),
    (["--model", "mixture", "--shape", "64"], ["--shape", "mixture"]),
    (["--out", "{empty}"], ["--out", "{empty}", "is a folder"]),
    (["--out", "{file}/plan.json"], ["--out", "a_file", "not a folder"]),
    (["--out", "/dev/null"], ["--out", "/dev/null", "not a regular file"]),
]


@pytest.mark.parametrize("argv,needles", TUNE_CASES, ids=[" ".join(a) for a, _ in TUNE_CASES])
def test_tune_rejects_before_any_work(argv, needles, files, no_work, capsys):
    fill = {k: str(v) for k, v in files.items()}
    argv = [a.format(**fill) for a in argv]
    needles = [n.format(**fill) for n in needles]
    plan = files["out"] / "plan.json"
    out = [] if "--out" in argv else ["--out", str(plan)]
    _expect(capsys, ["tune", "--quiet", *out, *argv], *needles)
    assert not files["out"].exists()


def test_tune_out_that_cannot_be_written(monkeypatch, files, no_work, capsys):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _expect(capsys, ["tune", "--model", "mixture", "--quiet", "--out", str(files["out"] / "p.json")], "--out", "cannot write",
            "Read-only file system")


# ---------------------------------------------------------------------------------------------
# fewstep distill
# ---------------------------------------------------------------------------------------------

DISTILL_CASES = [
    (["--lr", "0"], ["--lr", "'0'"]),
    (["--lr", "-1"], ["--lr", "'-1'"]),
    (["--lr", "nan"], ["--lr", "'nan'"]),
    (["--lr", "inf"], ["--lr", "'inf'"]),
    (["--batch-size", "0"], ["--batch-size", "'0'"]),
    (["--batch-size", "-8"], ["--batch-size", "'-8'"]),
    (["--probe-samples", "0"], ["--probe-samples", "'0'"]),
    (["--probe-samples", "1"], ["--probe-samples", "'1'"]),
    (["--num-intervals", "0"], ["--num-intervals", "'0'"]),
    (["--steps", "0"], ["--steps", "'0'"]),
    (["--grad-accum", "0"], ["--grad-accum", "'0'"]),
    (["--threads", "0"], ["--threads", "'0'"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every", "'0'"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints", "'0'"]),
    (["--validate-every", "-1"], ["--validate-every", "'-1'"]),
    (["--segments", "0"], ["--segments", "'0'"]),
    (["--target-ema", "1"], ["--target-ema", "'1'"]),
    (["--target-ema", "-0.1"], ["--target-ema", "'-0.1'"]),
    (["--seed", "-1"], ["--seed", "'-1'"]),
    (["--seed", "2.5"], ["--seed", "'2.5'"]),
    (["--batch-size", "10", "--grad-accum", "3"], ["--batch-size 10", "--grad-accum", "1 x 3"]),
    (["--objective", "ict", "--target-ema", "0.5"], ["--target-ema", "ict"]),
    (["--objective", "ict", "--num-intervals", "10", "--teacher-sampler", "ddim"], ["--num-intervals", "--teacher-sampler", "ict"]),
    (["--segments", "2"], ["--segments 2", "mcd"]),
    (["--objective", "mcd", "--num-intervals", "10", "--segments", "4"], ["--segments 4", "--num-intervals 10"]),
    (["--objective", "mcd", "--segments", "5"], ["--segments 5", "--num-intervals 32"]),
    (["--objective", "lcd"], ["--objective lcd", "--teacher"]),
    (["--teacher-sampler", "dpmpp_2m_sde"], ["--teacher-sampler", "'dpmpp_2m_sde'", "stochastic"]),
    (["--teacher-sampler", "ddimm"], ["--teacher-sampler", "'ddimm'", "did you mean 'ddim'"]),
    (["--data", "{file}"], ["--data", "--teacher"]),
    (["--teacher", "{out}/missing"], ["--teacher", "missing", "no such folder"]),
    (["--teacher", "{file}"], ["--teacher", "a_file", "not a folder"]),
    (["--teacher", "{empty}"], ["--teacher", "{empty}", "unet/config.json"]),
    (["--teacher", "{teacher}"], ["--teacher", "--data"]),
    (["--teacher", "{teacher}", "--data", "{out}/missing.pt"], ["--data", "missing.pt", "no such file"]),
    (["--teacher", "{teacher}", "--data", "{file}"], ["--data", "a_file", ".pt/.pth/.npy"]),
    (["--teacher", "{teacher}", "--data", "{empty}"], ["--data", "{empty}", "no image files"]),
    (["--teacher", "{teacher}", "--data", "{bad}"], ["--data", "broken.png"]),
    (["--teacher", "{teacher}", "--data", "{mixed}", "--objective", "lcd"], ["--objective lcd", "conditioning"]),
    (["--student", "{out}/missing"], ["--student", "missing", "no such folder"]),
    (["--student", "{empty}"], ["--student", "config.json"]),
    (["--resume", "{out}/missing"], ["--resume", "missing", "latest"]),
    (["--out", "{file}"], ["--out", "a_file", "not a folder"]),
    (["--out", "{file}/run"], ["--out", "a_file"]),
    # LCD, LoRA, image-text data (issue 16)
    (["--lora"], ["--lora", "--objective lcd only"]),
    (["--guidance-range", "1,2"], ["--guidance-range", "--objective lcd only"]),
    (["--guidance-range", "6,2"], ["--guidance-range", "'6,2'", "LO <= HI"]),
    (["--guidance-range", "2"], ["--guidance-range", "'2'", "LO,HI"]),
    (["--skip", "0"], ["--skip", "'0'"]),
    (["--lora-rank", "4"], ["--lora-rank 4", "needs --lora"]),
    (["--log-with", "mlflow"], ["--log-with", "'mlflow'", "tensorboard"]),
    (["--num-workers", "-1"], ["--num-workers", "'-1'"]),
    (["--validation-prompts", "a cat"], ["--validation-prompts", "--teacher"]),
    (["--teacher", "{teacher}", "--data", "{captions}"], ["image-caption --data", "text-to-image --teacher", "vae"]),
    (["--teacher", "{teacher}", "--data", "{mixed}", "--validation-prompts", "a cat"], ["--validation-prompts", "text_encoder"]),
    (["--teacher", "{text_teacher}", "--data", "{half}"], ["--data", "1 image(s) have no caption file", "1.png"]),
    (["--teacher", "{text_teacher}", "--data", "{captions}", "--objective", "lcd", "--lora", "--target-ema", "0.5"],
     ["--target-ema 0.5 with --lora", "stop-gradient"]),
    (["--teacher", "{text_teacher}", "--data", "{captions}", "--objective", "lcd", "--skip", "60"], ["--skip 60", "50 DDIM steps"]),
    (["--teacher", "{text_teacher}", "--data", "{mixed}", "--precompute", "{out}/lat"], ["--precompute", "holds none"]),
    (["--teacher", "{text_teacher}", "--data", "{captions}", "--precompute", "{file}"], ["--precompute", "a_file", "not a folder"]),
    (["--teacher", "{text_teacher}", "--data", "{captions}", "--precompute", "{out}/lat", "--resume", "latest"], ["--precompute", "--resume"]),
    (["--teacher", "{teacher}", "--data", "{mixed}", "--resolution", "64"], ["--resolution 64", "image-caption"]),
]


@pytest.mark.parametrize("argv,needles", DISTILL_CASES, ids=[" ".join(a) for a, _ in DISTILL_CASES])
def test_distill_rejects_before_any_work(argv, needles, files, no_work, capsys):
    fill = {k: str(v) for k, v in files.items()}
    argv = [a.format(**fill) for a in argv]
    needles = [n.format(**fill) for n in needles]
    out = [] if "--out" in argv else ["--out", str(files["out"])]
    _expect(capsys, ["distill", "--quiet", *out, *argv], *needles)
    assert not files["out"].exists()


def test_distill_refuses_an_existing_run_without_resume(files, no_work, capsys):
    ck = files["out"] / "checkpoints" / "checkpoint-0000500"
    ck.mkdir(parents=True)
    _expect(capsys, ["distill", "--quiet", "--out", str(files["out"])], "--out", "holds a distillation run", "checkpoints",
            "--resume latest")
    assert sorted(p.name for p in files["out"].rglob("*")) == ["checkpoint-0000500", "checkpoints"]


def test_distill_xformers_missing(files, no_work, capsys):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    _expect(capsys, ["distill", "--quiet", "--attention", "xformers", "--out", str(files["out"])], "--attention xformers",
            "not installed")


def test_distill_8bit_adam_without_bitsandbytes(files, no_work, capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    _expect(capsys, ["distill", "--quiet", "--optimizer", "adamw8bit", "--out", str(files["out"])], "--optimizer adamw8bit",
            "bitsandbytes is not installed")


def test_distill_data_is_checked_against_the_teacher_before_it_loads(files, monkeypatch, capsys):
    """The data is read before the teacher (whose loader must not run when the data is wrong)."""
    import fewstep.distill.cli as dcli

    monkeypatch.setattr(dcli, "_load_teacher", _forbidden("_load_teacher"))
    torch.save(torch.zeros(4, 3, 8, 8), files["out"].parent / "rgb.pt")
    _expect(capsys, ["distill", "--quiet", "--teacher", str(files["teacher"]), "--data", str(files["out"].parent / "rgb.pt"),
                     "--out", str(files["out"])], "--data", "rgb.pt", "3-channel", "1 channels")
    torch.save({"data": torch.zeros(4, 1, 8, 8)}, files["out"].parent / "nocond.pt")
    _expect(capsys, ["distill", "--quiet", "--objective", "lcd", "--teacher", str(files["teacher"]), "--data",
                     str(files["out"].parent / "nocond.pt"), "--out", str(files["out"])], "--objective lcd", "conditioning")
    assert not files["out"].exists()


# ---------------------------------------------------------------------------------------------
# Errors while working, Ctrl-C, and the user's own code
# ---------------------------------------------------------------------------------------------


def test_os_error_while_writing_is_one_line_naming_the_path(monkeypatch, tmp_path, capsys):
    import fewstep.eval.report

    target = tmp_path / "rep" / "fid_per_nfe.csv"

    def disk_full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(fewstep.eval.report, "run_report", disk_full)
    err = _expect(capsys, ["report", "--out", str(tmp_path / "rep"), "--quiet", "--no-fid"], "No space left on device",
                  str(target), code=1)
    assert len(err.strip().splitlines()) == 1

    class Plan:
        meta: dict = {}

        def save(self, path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(cli, "_tune_model", lambda spec, shape: (None, (4,), torch.float32, "a model"))
    monkeypatch.setattr("fewstep.samplers.tuning.tune", lambda *a, **k: Plan())
    _expect(capsys, ["tune", "--model", "mixture", "--quiet", "--out", str(tmp_path / "p.json")], "Permission denied",
            str(tmp_path / "p.json"), code=1)


def test_ctrl_c_says_what_was_saved(monkeypatch, tmp_path, capsys):
    import fewstep.eval.report
    import fewstep.models.embedded

    out = tmp_path / "rep"

    def interrupted_report(**kwargs):
        cell = out / "fid_run" / "cells" / "ddim-nfe4"
        cell.mkdir(parents=True)
        (cell / "chunk_0_250.npz").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(fewstep.eval.report, "run_report", interrupted_report)
    err = _err(capsys, ["report", "--out", str(out), "--quiet"], 130)
    assert "fewstep report: interrupted" in err and str(out / "fid_run") in err and "resume" in err

    monkeypatch.setattr(cli, "_tune_model", lambda spec, shape: (_ for _ in ()).throw(KeyboardInterrupt()))
    err = _err(capsys, ["tune", "--model", "mixture", "--quiet", "--out", str(tmp_path / "p.json")], 130)
    assert "fewstep tune: interrupted" in err and "nothing was written" in err and not (tmp_path / "p.json").exists()

    run = tmp_path / "run"

    def interrupted_training(*args, **kwargs):
        (run / "checkpoints" / "checkpoint-0000500").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(fewstep.models.embedded, "digits_denoiser", interrupted_training)
    err = _err(capsys, ["distill", "--quiet", "--out", str(run)], 130)
    assert "fewstep distill: interrupted" in err and "checkpoint-0000500" in err and "--resume latest" in err


USER_MODULE = '''
from fewstep.eval.exact import default_schedule


class Den:
    schedule = default_schedule()
    sample_shape = (1, 8, 8)

    def __call__(self, x, t, **cond):
        raise {exc}("boom inside the user's own forward")


den = Den()
'''


@pytest.mark.parametrize("exc", ["ValueError", "TypeError"])
def test_user_model_exceptions_keep_their_traceback(exc, tmp_path, monkeypatch):
    mod = f"user_models_{exc.lower()}"
    (tmp_path / f"{mod}.py").write_text(USER_MODULE.format(exc=exc))
    monkeypatch.syspath_prepend(str(tmp_path))
    argvs = [
        ["tune", "--model", f"{mod}:den", "--nfe", "2", "--num-trajectories", "8", "--ingredients", "grid", "--quiet",
         "--out", str(tmp_path / "p.json")],
        ["report", "--model", f"{mod}:den", "--reference", "digits:test", "--samplers", "ddim", "--nfe", "2",
         "--num-samples", "2", "--batch-size", "2", "--no-exact", "--quiet", "--out", str(tmp_path / "rep")],
    ]
    for argv in argvs:
        with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[exc], match="boom inside the user's own forward") as info:
            main(argv)
        frames = traceback.extract_tb(info.value.__traceback__)
        assert frames[-1].filename == str(tmp_path / f"{mod}.py")
        assert any(f.filename.endswith("cli.py") for f in frames)  # raised through main, not swallowed by it


def test_user_model_traceback_in_a_real_process(tmp_path):
    (tmp_path / "user_models_proc.py").write_text(USER_MODULE.format(exc="ValueError"))
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "tune", "--model", "user_models_proc:den", "--nfe", "2",
                        "--num-trajectories", "8", "--ingredients", "grid", "--quiet", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": f"{Path(cli.__file__).parents[1]}{os.pathsep}{tmp_path}"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "user_models_proc.py" in r.stderr, r.stderr
    assert "boom inside the user's own forward" in r.stderr


def test_fewstep_errors_raised_below_user_modules_stay_one_line(tmp_path, monkeypatch, capsys):
    """A fewstep check of a user's object (here: no sample shape) is a message, not a traceback."""
    (tmp_path / "user_models_noshape.py").write_text(USER_MODULE.format(exc="ValueError").replace("    sample_shape = (1, 8, 8)\n", ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    _expect(capsys, ["tune", "--model", "user_models_noshape:den", "--quiet", "--out", str(tmp_path / "p.json")],
            "user_models_noshape:den", "--shape")


def test_fewstep_traceback_env_keeps_tracebacks(monkeypatch, tmp_path):
    import fewstep.eval.report

    monkeypatch.setattr(fewstep.eval.report, "run_report", lambda **k: (_ for _ in ()).throw(ValueError("deep")))
    assert main(["report", "--out", str(tmp_path / "r"), "--quiet", "--no-fid"]) == 2
    monkeypatch.setenv("FEWSTEP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="deep"):
        main(["report", "--out", str(tmp_path / "r"), "--quiet", "--no-fid"])


def test_help_and_broken_pipe(monkeypatch, capsys):
    assert main(["report", "--help"]) == 0 and "--no-fid" in capsys.readouterr().out

    class Closed:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["samplers"]) == 1
