"""The evaluation examples run end to end on the embedded model (no download, CPU)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from fewstep.eval import features as F

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_pipeline_example(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert _example("embedded_digits_pipeline").main(["--num-images", "4", "--nfe", "3", "--sampler", "unipc_2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (4 * 34, 2 * 34)  # two rows of 4 images, 8x8 scaled 4x with a 1-pixel border


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from fewstep.models.embedded import digits_pipeline

    d = tmp_path_factory.mktemp("pipe")
    digits_pipeline().save_pretrained(d)
    return d


def test_fid_vs_steps_example_with_digit_features(saved_pipeline, tmp_path):
    out = tmp_path / "study"
    args = [str(saved_pipeline), "--reference", "digits:test", "--extractor", "digits", "--samplers", "ddim,dpmpp_2m",
            "--nfe", "2,6", "--num-samples", "48", "--batch-size", "24", "--out", str(out), "--device", "cpu"]
    assert _example("fid_vs_steps").main(args) == 0
    rows = list(csv.DictReader(open(out / "fid_per_nfe.csv")))
    assert len(rows) == 4 and all(float(r["fid"]) > 0 for r in rows)
    assert (out / "fid_vs_nfe.png").is_file() and len(list((out / "run" / "cells").iterdir())) == 4


def test_fid_vs_steps_example_with_inception(saved_pipeline, tmp_path, monkeypatch, capsys):
    # The GPU user's path (Inception features, a folder of real images) on the TorchScript
    # stand-in; and without any weights file, a clear error and exit code 2.
    from fewstep.eval.inception_standin import save_inception_standin
    from fewstep.eval.reference import image_files
    from fewstep.models.embedded import digits_images
    from PIL import Image

    from fewstep.eval.features import to_uint8

    real = tmp_path / "real"
    real.mkdir()
    for i, u in enumerate(to_uint8(digits_images("test")[:40])):
        Image.fromarray(u[0].numpy()).save(real / f"{i}.png")
    assert len(image_files(real)) == 40
    weights = save_inception_standin(tmp_path / F.INCEPTION_FILE)
    example = _example("fid_vs_steps")
    args = [str(saved_pipeline), "--reference", str(real), "--samplers", "dpmpp_2m", "--nfe", "4", "--num-samples", "24",
            "--out", str(tmp_path / "study"), "--device", "cpu"]
    assert example.main(args + ["--inception-path", weights]) == 0
    assert "inception-clean" in capsys.readouterr().out
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    assert example.main(args) == 2
    assert "missing.pt" in capsys.readouterr().err
