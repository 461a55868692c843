"""`fewstep report` with the FID study: files, tables, floor, resume, model and extractor options."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from fewstep.cli import main
from fewstep.eval import features as F


def test_report_with_fid_and_exact_parts(tmp_path):
    out = tmp_path / "rep"
    args = ["report", "--out", str(out), "--samplers", "ddim,dpmpp_2m", "--nfe", "2,8", "--num-samples", "96", "--quiet",
            "--ode-reference", "dpmpp_3m:20"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "fid_per_nfe.csv")))
    assert [(r["sampler"], int(r["nfe"])) for r in rows] == [("ddim", 2), ("ddim", 8), ("dpmpp_2m", 2), ("dpmpp_2m", 8)]
    fid = {(r["sampler"], int(r["nfe"])): float(r["fid"]) for r in rows}
    for s in ("ddim", "dpmpp_2m"):
        assert fid[(s, 8)] < fid[(s, 2)]
    meta = json.loads((out / "fid_per_nfe.json").read_text())["meta"]
    floor = meta["floor"]
    assert meta["num_samples"] == 96 and meta["reference"]["source"] == "digits-test-n359"
    assert floor["n"] == 96 and floor["n_all"] == 1438 and 0 < floor["fid_all"] < floor["fid"]
    assert min(fid.values()) > floor["fid_all"]  # nothing beats the whole real train split
    md = (out / "report.md").read_text()
    assert "## FID per NFE" in md and "## Exact Gaussian mixture" in md and "Sampling floor" in md
    for name in ("fid_vs_nfe.png", "samples_nfe8.png", "exact_mixture.png"):
        assert (out / name).stat().st_size > 5_000 and name in md
    # Every FID / KID / FD cell has an interval (CSV, JSON, Markdown), and KID's subset spread is shown.
    for r in rows:
        for m in ("fid", "kid", "fd_ode"):
            lo, v, hi, se = (float(r[f"{m}{k}"]) for k in ("_lo", "", "_hi", "_se"))
            assert se > 0 and lo <= v <= hi
        assert float(r["fd_ode"]) < float(r["fid"])  # the exact-ODE samples are closer than the data
    assert meta["ode_reference"]["sampler"] == "dpmpp_3m" and meta["ode_reference"]["nfe"] == 20 and meta["bootstrap"] == 200
    ddim2 = next(r for r in rows if r["sampler"] == "ddim" and r["nfe"] == "2")
    assert f"{float(ddim2['fid']):.3g} ± " in md and "kid_std" in md and "FD to the model's exact-ODE samples" in md
    # Bold only where significant.  At 2 NFE DPM-Solver++(2M) is DDIM (both steps first order): a
    # difference of exactly 0, a tie.  Elsewhere a cell is bold exactly when every other cell of its
    # column is significantly above it.
    for m in ("fid", "kid", "fd_ode"):
        two = {r["sampler"]: r for r in rows if r["nfe"] == "2"}
        assert float(two["ddim"][m]) == float(two["dpmpp_2m"][m]) and not any(r[f"{m}_best"] == "True" for r in two.values())
        for nfe in ("2", "8"):
            col = [r for r in rows if r["nfe"] == nfe]
            for r in col:
                others = [o for o in col if o is not r]
                assert (r[f"{m}_best"] == "True") == (float(r[f"{m}_vs_best"]) == 0 and all(float(o[f"{m}_vs_best_lo"]) > 0 for o in others))
    assert "NFE 2: no sampler is significantly lowest" in md
    exact_rows = list(csv.DictReader(open(out / "exact_mixture.csv")))
    assert all(float(r["fd_lo"]) <= float(r["fd"]) <= float(r["fd_hi"]) and float(r["rmse_se"]) > 0 for r in exact_rows)
    e8 = next(r for r in exact_rows if r["sampler"] == "dpmpp_2m" and r["nfe"] == "8")
    assert f"**{float(e8['rmse']):.3g} ± " in md  # the exact mixture separates them at 8 NFE: 2M's RMSE is bold
    assert len(list(csv.DictReader(open(out / "exact_mixture.csv")))) == 4
    # Run again: everything comes from the run folder, the table is the same.
    assert main(args + ["--no-exact"]) == 0
    again = json.loads((out / "fid_per_nfe.json").read_text())
    assert again["meta"]["generated"] == 0
    assert [r["fid"] for r in again["rows"]] == [float(r["fid"]) for r in rows]


def test_report_on_a_saved_pipeline_and_a_python_denoiser(tmp_path):
    from fewstep.models.embedded import digits_pipeline

    digits_pipeline().save_pretrained(tmp_path / "pipe")
    common = ["--samplers", "dpmpp_2m", "--nfe", "3", "--num-samples", "32", "--quiet", "--no-exact"]
    assert main(["report", "--out", str(tmp_path / "a"), "--model", str(tmp_path / "pipe"), "--reference", "digits:test", *common]) == 0
    assert main(["report", "--out", str(tmp_path / "b"), "--model", "embedded", *common]) == 0
    a = json.loads((tmp_path / "a/fid_per_nfe.json").read_text())
    b = json.loads((tmp_path / "b/fid_per_nfe.json").read_text())
    assert a["rows"][0]["fid"] == pytest.approx(b["rows"][0]["fid"], rel=1e-6)  # the same network, loaded two ways
    assert "diffusers pipeline" in a["meta"]["model"]
    assert main(["report", "--out", str(tmp_path / "c"), "--model", "fid_worker:mixture_denoiser", "--reference",
                 "digits:test", *common]) == 0
    c = json.loads((tmp_path / "c/fid_per_nfe.json").read_text())
    assert c["meta"]["model_id"] == "callable-fid_worker:mixture_denoiser" and c["rows"][0]["fid"] > 0


def test_report_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "nowhere"))
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "report", "--extractor", "inception", "--out", str(tmp_path / "r"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and F.INCEPTION_FILE in r.stderr and F.INCEPTION_ENV in r.stderr
    assert main(["report", "--model", str(tmp_path), "--quiet", "--no-exact", "--out", str(tmp_path / "r")]) == 2
    assert main(["report", "--model", "fid_worker:mixture_denoiser", "--quiet", "--no-exact", "--out", str(tmp_path / "r")]) == 2


class _BrokenModel:
    """Stands in for the exact mixture with a denoiser that misbehaves in a given way."""

    def __init__(self, inner, how):
        self.inner, self.how = inner, how

    def denoiser(self, schedule):
        den = self.inner.denoiser(schedule)

        def broken(x, t):
            out = den(x, t)
            return out * float("nan") if self.how == "nan" else out[:, :-1]

        return broken


def test_exact_study_records_budgets_and_non_finite_runs_and_raises_the_rest(digits_mixture):
    """Only what the sampler cannot run with (a ValueError of fewstep.samplers.prepare) becomes an
    error row; a non-finite run is a distinct error row; anything else (here a denoiser returning
    the wrong shape) propagates.  ``stochastic`` follows the options of the run."""
    import dataclasses
    import math

    from fewstep.eval.exact import ExactStudy, default_schedule

    noise = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    study = ExactStudy(digits_mixture, default_schedule(), noise, torch.zeros_like(noise), 0.0)  # reference unused here
    budget = study.evaluate("ddim", 0)
    assert "at least nfe=1" in budget.error and math.isnan(budget.rmse)
    ok = study.evaluate("ddim", 4)
    assert not ok.error and math.isfinite(ok.rmse) and not ok.stochastic
    assert study.evaluate("ddim", 4, eta=1.0).stochastic
    nan = dataclasses.replace(study, model=_BrokenModel(digits_mixture, "nan")).evaluate("ddim", 4)
    assert nan.error.startswith("non-finite") and nan.rmse == math.inf
    with pytest.raises(ValueError, match="shape"):
        dataclasses.replace(study, model=_BrokenModel(digits_mixture, "shape")).evaluate("ddim", 4)


def test_model_spec_refuses_latent_pipelines_and_fingerprints_python_modules(tmp_path, monkeypatch):
    from fewstep.eval.model_spec import resolve_model

    latent = tmp_path / "sd"
    latent.mkdir()
    (latent / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(ValueError, match="latent diffusion pipeline.*VAE"):
        resolve_model(str(latent))
    assert main(["report", "--model", str(latent), "--reference", "digits:test", "--quiet", "--no-exact",
                 "--out", str(tmp_path / "r")]) == 2
    # module:attr naming an nn.Module: the model_id follows its weights
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from fewstep.models.embedded import digits_denoiser\n"
        "den = digits_denoiser()\n"
        "den.sample_shape = (1, 8, 8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = resolve_model("my_models:den")
    assert first.model_id.startswith("callable-my_models:den-") and resolve_model("my_models:den").model_id == first.model_id
    with torch.no_grad():
        next(first.denoiser.parameters()).add_(1e-3)
    assert resolve_model("my_models:den").model_id != first.model_id
